"""Carrying out a plan: the run folder, launch.json, torchrun with its output teed to train.log, then
results.json (:mod:`bevkit.results`) and the final lines. Also the dry-run printout and the data check."""
from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Mapping, Sequence, Tuple

from bevkit import REPO_ROOT, __version__, log
from bevkit.data.decode import find_in_log
from bevkit.errors import EXIT_CHECKPOINT, CheckpointError, UserError
from bevkit.launch.plan import Plan
from bevkit.launch.request import LaunchError
from bevkit.registry import MODELS, ModelSpec

LOG_FILE = "train.log"
LAUNCH_FILE = "launch.json"


# ----------------------------------------------------------------------------------------- output
def render_command(plan: Plan) -> str:
    """The launch as one copy-pasteable shell command (environment changes + torchrun argv)."""
    parts = ["env"] + [f"-u {shlex.quote(k)}" for k in plan.env_unset]
    parts += [f"{k}={shlex.quote(v)}" for k, v in plan.env_set.items()]
    parts.append(" ".join(shlex.quote(a) for a in plan.argv))
    return f"cd {shlex.quote(str(plan.cwd))} && " + " \\\n  ".join(parts)


def print_dry_run(plan: Plan, out=None) -> None:
    out = out or sys.stdout
    w = lambda s="": print(s, file=out)
    w("# bevkit launch --dry-run: nothing was created or started")
    for note in plan.notes:
        w(f"# {note}")
    for warning in plan.warnings:
        w(f"# WARNING (a real launch would refuse): {warning}")
    w(f"# run folder (would be created): {plan.request.run_dir}")
    if plan.cann_set_env:
        w(f"# CANN environment from: {plan.cann_set_env}")
    w(f"# environment: the current one plus these changes ({', '.join(plan.env_files) or 'no env file'})")
    w(render_command(plan))


def launch_record(plan: Plan, launcher_argv: Sequence[str]) -> dict:
    r = plan.request
    return {
        "kit_version": __version__,
        "launcher_argv": list(launcher_argv),
        "command": plan.argv,
        "cwd": str(plan.cwd),
        "env_set": plan.env_set,
        "env_unset": plan.env_unset,
        "env_files": plan.env_files,
        "cann_set_env": str(plan.cann_set_env) if plan.cann_set_env else None,
        "hostname": socket.gethostname(),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "request": {"model": plan.spec.name, "mode": r.mode, "device": r.device, "data_root": str(r.data_root),
                    "run_dir": str(r.run_dir), "nproc_per_node": r.nproc_per_node, "nnodes": r.nnodes,
                    "node_rank": plan.node_rank, "master_addr": plan.master_addr, "launcher": plan.launcher,
                    "master_port": plan.master_port, "config": str(r.config) if r.config else None,
                    "checkpoint": str(r.checkpoint) if r.checkpoint else None,
                    "resume": str(r.resume) if r.resume else None, "max_steps": r.max_steps,
                    "extra_args": list(r.extra_args), "batch_per_device": plan.batch_per_device,
                    "warmup_steps": plan.warmup_steps, "flow": plan.launch.flow if plan.launch else None},
        "resumed_from": plan.resumed_from.summary() if plan.resumed_from else None,
        "checkpoint_check": plan.checkpoint_found,
        "notes": plan.notes,
    }


# ------------------------------------------------------------------------------------------ checks
def check_data(spec: ModelSpec, data_root: Path) -> Tuple[str, List[str]]:
    """('ok'|'problems'|'unavailable ...', problems as printable lines) from bevkit.data.validate."""
    if spec.name not in MODELS:
        return f"unavailable (no validator for model {spec.name!r})", []
    from bevkit.data import validate as validator  # numpy and the devkit: only when a launch checks data

    try:
        problems = validator.validate(spec.name, data_root)
    except Exception as e:  # a validator bug must not look like bad data, nor be skipped silently
        raise LaunchError(f"the data validator failed on {data_root}: {type(e).__name__}: {e} "
                          "(--no-data-check skips it)") from e
    lines = [f"{p.path}: {p.message}" + (f" -> fix: {p.fix}" if p.fix else "") for p in problems]
    return "ok" if not lines else "problems", lines


def refuse_bad_data(plan: Plan) -> None:
    """The data check of a plan: a real launch refuses problems, a dry run lists them."""
    state, problems = check_data(plan.spec, plan.request.data_root)
    if problems:
        message = (f"data root {plan.request.data_root} is not ready for {plan.spec.name}:\n  "
                   + "\n  ".join(problems)
                   + f"\n(check again: python -m bevkit.data.validate --model {plan.spec.name} "
                     f"{plan.request.data_root})")
        if plan.launch is None or not plan.launch.dry_run:
            raise LaunchError(message)
        plan.warnings.append(message)
    elif state != "ok":
        plan.notes.append(f"data check skipped: validator {state}")


def refuse_bad_checkpoint(plan: Plan) -> None:
    """The checkpoint the run will load, checked before anything starts (:mod:`bevkit.checkpoint_check`, in a
    process of its own: it imports torch, the launcher does not). A real launch refuses a problem with its one
    line (exit code 3); a dry run lists it."""
    if plan.checked_checkpoint is None:
        return
    path, purpose = plan.checked_checkpoint
    command = [sys.executable, "-m", "bevkit.checkpoint_check", "--model", plan.spec.name, "--purpose", purpose,
               "--data-root", str(plan.request.data_root), str(path)]
    try:
        done = subprocess.run(command, env=dict(plan.env), cwd=str(REPO_ROOT), capture_output=True, text=True,
                              timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(f"could not run the checkpoint check ({' '.join(command)}): {e}") from e
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode == 0:
        plan.checkpoint_found = json.loads(done.stdout.strip().splitlines()[-1])
        return
    if done.returncode == EXIT_CHECKPOINT and lines and lines[-1].startswith("error: "):
        problem: UserError = CheckpointError(lines[-1][len("error: "):])
    else:
        problem = LaunchError(f"the checkpoint check of {path} failed (exit {done.returncode}): "
                              + (lines[-1] if lines else "no output") + f" [{' '.join(command)}]")
    if plan.launch is not None and plan.launch.dry_run:
        plan.warnings.append(str(problem))
    else:
        raise problem


# --------------------------------------------------------------------------------------------- run
def run_tee(argv: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path, out=None) -> int:
    """Run argv, streaming its combined output to ``out`` and to log_path; returns the exit code.

    The child gets its own session so that a terminal Ctrl-C reaches it once, through us (torchrun stops
    its workers on the first SIGINT and must not get a second one mid-shutdown): SIGINT, SIGTERM and SIGHUP
    are forwarded, and we keep reading until it has finished its own shutdown. If we die without forwarding
    (SIGKILL, a crash), the child's parent-death signal (:func:`bevkit.launch.worker.preexec_for`) kills it,
    and torchrun's workers die with torchrun the same way (they start through :mod:`bevkit.launch.worker`):
    no trainer outlives the launcher. A run stopped by a forwarded signal exits 128 + the signal's number, like a
    shell reports it (torchrun itself exits 1).
    """
    from bevkit.launch import worker  # not at import time: `-m bevkit.launch.worker` imports this package first

    out = out if out is not None else sys.stdout.buffer
    proc = subprocess.Popen(list(argv), cwd=str(cwd), env=dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=worker.preexec_for(os.getpid()))

    received = []

    def forward(signum, _frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, forward)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        with open(log_path, "ab") as log:
            fd = proc.stdout.fileno()  # type: ignore[union-attr]
            while True:
                try:
                    chunk = os.read(fd, 65536)  # chunks, not lines: progress bars use '\r'
                except InterruptedError:
                    continue
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                try:
                    out.write(chunk)
                    out.flush()
                except (BrokenPipeError, ValueError):
                    pass  # our stdout went away (e.g. `| head`): keep logging to the file
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if rc != 0 and received:
        return 128 + received[0]
    return 128 - rc if rc < 0 else rc  # killed by signal N -> 128+N, like a shell


#: Modes that train: a run of one of these that recorded no optimizer step did not do its job.
TRAINING_MODES = ("full", "performance", "smoke", "demo")


def finish(plan: Plan, exit_code: int, e2e_s: float, out=None) -> Tuple[Path, int]:
    """Write results.json + the Ascend-style log from the run folder; print the final lines. Returns the
    results path and the run's exit code (1 for a training run that ended without a step)."""
    from bevkit import op_limits, provenance
    from bevkit import results as res
    from bevkit import visualize
    from bevkit.timing import STEPS_FILE, read_steps

    r = plan.request
    records = read_steps(r.run_dir / STEPS_FILE)
    metrics = res.read_metrics(r.run_dir)
    pictures = visualize.after_run(r.run_dir, out=out)  # what the evaluation dumped, drawn (eval runs)
    checkout = plan.cwd if plan.spec.upstream else None
    failure = None
    if exit_code == 0 and r.mode in TRAINING_MODES and not records and plan.node_rank == 0:
        exit_code = 1
        failure = (f"the run ended without a single optimizer step (no records in {r.run_dir / STEPS_FILE}): "
                   f"check that the training set holds at least one batch (batch per device x processes) and "
                   f"the epochs / steps passed to the entry point")
    results = res.build_results(
        records=records, metrics=metrics, model=plan.spec.name, display_name=plan.spec.display_name,
        mode=r.mode, device=r.device, nproc_per_node=r.nproc_per_node, nnodes=r.nnodes,
        node_rank=plan.node_rank, batch_per_device=plan.batch_per_device, exit_code=exit_code,
        e2e_duration_s=round(e2e_s, 3), warmup=plan.warmup_steps,
        versions=provenance.collect_versions(plan.env),
        upstream=provenance.upstream_info(plan.spec.upstream_name, checkout),
        npu_op_limits=op_limits.policy(plan.env),
        extra={"max_steps": r.max_steps, "run_dir": str(r.run_dir), "failure": failure,
               "flow": plan.launch.flow if plan.launch else None, "config": str(r.config) if r.config else None,
               "checkpoint": str(r.checkpoint) if r.checkpoint else None,
               "resumed_from": plan.resumed_from.summary() if plan.resumed_from else None,
               "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "host": socket.gethostname(), "arch": platform.machine(),
               "files": {"log": LOG_FILE, "launch": LAUNCH_FILE, "steps": STEPS_FILE if records else None,
                         "metrics": res.METRICS_FILE if metrics else None,
                         "pictures": [str(p.relative_to(r.run_dir)) for p in pictures] or None}})
    path, _log, printed = res.write_results(r.run_dir, results)
    out = out or sys.stdout
    for line in printed:
        print(line, file=out)
    if failure:
        print(f"error: {failure}", file=out)
    elif exit_code != 0:
        damaged = find_in_log(r.run_dir / LOG_FILE)  # the one line that says what to fix, if it is a data file
        if damaged:
            print(f"error: {damaged}", file=out)
        print(f"training exited with code {exit_code}; see {r.run_dir / LOG_FILE}", file=out)
    print(f"results: {path}", file=out)
    out.flush()
    return path, exit_code


def execute(plan: Plan, launcher_argv: Sequence[str]) -> int:
    """Run a plan whose run folder exists: launch.json, torchrun teed to train.log, results.json."""
    from bevkit.results import atomic_write_json

    atomic_write_json(plan.request.run_dir / LAUNCH_FILE, launch_record(plan, launcher_argv))
    say = log.get()
    for note in plan.notes:
        say.info(note)
    say.info(f"run folder: {plan.request.run_dir}")
    say.info(f"command: {' '.join(shlex.quote(a) for a in plan.argv)}")
    sys.stdout.flush()
    start = time.monotonic()
    try:
        rc = run_tee(plan.argv, plan.env, plan.cwd, plan.request.run_dir / LOG_FILE)
    except OSError as e:
        print(f"error: could not start {plan.argv[0]}: {e}", file=sys.stderr)
        rc = 127
    problem = user_error_of(plan) if rc != 0 else None
    if problem is not None:  # bad input found inside the run (bevkit.launch.worker): its code, its line last
        rc = problem.get("exit_code") or rc
    rc = finish(plan, rc, time.monotonic() - start)[1]
    if problem is not None:
        sys.stdout.flush()
        print(f"error: {problem.get('message')}", file=sys.stderr, flush=True)
    return rc


def user_error_of(plan: Plan):
    """The one-line input error a training process reported (``error.json`` in the run folder), if any."""
    from bevkit.launch.worker import ERROR_FILE

    try:
        found = json.loads((plan.request.run_dir / ERROR_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("message") else None
