"""The shared launcher: one command line for every model, device and cluster shape.

    python -m bevkit.launch --model fbocc --mode full [--data-root DIR] [--nproc 8] [--nnodes 1]
        [--node-rank 0] [--master-addr A] [--master-port P] [--device {npu,cuda,cpu}] [--work-dir DIR]
        [--config F] [--checkpoint F] [--max-steps N] [--warmup-steps N] [--no-data-check] [--dry-run]
        [-- ARGS passed to the upstream entry point]

Model scripts (``fbocc/test/train_8p_full.sh`` ...) are one ``exec tools/launch --model M --mode X "$@"``.

What a run does, in order:

1. Refuses a missing data root, then runs the data validator (``bevkit.data.validate``) and refuses on
   problems (``--no-data-check`` skips the validator, not the existence check).
2. Builds the environment: the device's settings from ``configs/env/<device>.env`` (the user's own
   environment wins), the CANN ``set_env.sh`` on NPU, ``OMP_NUM_THREADS`` = cores // processes on CPU,
   ``PYTHONPATH`` = upstream checkout + kit, and the ``BEVKIT_*`` contract of :mod:`bevkit.models`.
3. Creates a new run folder ``<work-dir>/<UTC time>[-node<k>][-<n>]`` (default work dir
   ``runs/<model>/<mode>``); earlier runs are never touched. Writes ``launch.json`` (exact command,
   the environment variables the launcher set, working directory).
4. Runs ``python -m torch.distributed.run`` (torchrun) and tees its output to ``train.log``.
5. Writes ``results.json`` and ``<Network>_bs<B>_<N>p_<mode>.log`` (also when training failed), prints
   the Ascend-style summary lines and, last, ``results: <path>``; exits with torchrun's exit code.

Multi-node: run the same command on every node with ``--nnodes N --node-rank K --master-addr <node 0>``;
each node gets its own run folder. ``steps.jsonl`` and ``metrics.json`` are written by global rank 0,
so node 0's ``results.json`` holds the timing and accuracy.

This module never imports torch (the launcher starts in well under a second; versions are read from
package metadata).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from bevkit import REPO_ROOT, __version__
from bevkit.device import DEVICES, DIST_BACKEND, detect_profile
from bevkit.models import MODELS, MODES, LaunchRequest, ModelSpec, get_spec

DEFAULT_NPROC = 8
#: multi-node runs need one port known to every node; torchrun's conventional default
MULTINODE_DEFAULT_PORT = 29500
#: performance runs stop after this many steps unless --max-steps (FB-OCC reference: 600)
DEFAULT_PERFORMANCE_STEPS = 600
ENV_DIR = REPO_ROOT / "configs" / "env"
LOG_FILE = "train.log"
LAUNCH_FILE = "launch.json"


class LaunchError(Exception):
    """A problem with the user's input or machine, reported as one clear message (exit code 2)."""


# ------------------------------------------------------------------------------------------ options
def _int_env(environ: Mapping[str, str], name: str) -> Optional[int]:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/launch",
        description="Launch FB-OCC / BEVDepth training or evaluation on NPU, CUDA or CPU through torchrun. "
                    "Arguments after '--' go to the upstream entry point unchanged.",
        epilog="Environment defaults (OpenMMLab style): NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, "
               "BEVKIT_DATA_ROOT. Options win over the environment.")
    p.add_argument("--model", choices=sorted(MODELS), help="model to run")
    p.add_argument("--mode", required=True, choices=MODES,
                   help="full: train + evaluate; performance: train --max-steps steps (default "
                        f"{DEFAULT_PERFORMANCE_STEPS}) for speed; eval: evaluate --checkpoint; smoke: tiny run")
    p.add_argument("--data-root", type=Path,
                   help="nuScenes-format data root (default: $BEVKIT_DATA_ROOT or <repo>/data/nuscenes)")
    p.add_argument("--nproc", type=int, default=None,
                   help=f"processes (devices) per node (default {DEFAULT_NPROC})")
    p.add_argument("--nnodes", type=int, default=None, help="number of nodes (default $NNODES or 1)")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (default $NODE_RANK or 0)")
    p.add_argument("--master-addr", default=None,
                   help="address of node 0 (default $MASTER_ADDR; 127.0.0.1 on one node; "
                        "required with --nnodes > 1)")
    p.add_argument("--master-port", type=int, default=None,
                   help="rendezvous port (default $MASTER_PORT; a free port on one node, "
                        f"{MULTINODE_DEFAULT_PORT} with several nodes - the same on every node)")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="device type (default: detected without torch: npu-smi/CANN -> npu, "
                        "nvidia-smi -> cuda, else cpu; BEVKIT_PROFILE overrides)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="folder that receives one new run folder per run (default <repo>/runs/<model>/<mode>)")
    p.add_argument("--config", type=Path, default=None, help="model config (default: the model's config for the mode)")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights to evaluate (eval mode) or start from")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop training after N optimizer steps (sets BEVKIT_MAX_STEPS)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps excluded from step-time statistics (default: first 10%%)")
    p.add_argument("--no-data-check", action="store_true",
                   help="skip the data validator (a missing data root is still refused)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the exact command and environment; create and start nothing")
    # A spec that is not in bevkit.models.MODELS ('module:attr' or 'file.py:attr'): used by the tests
    # and for trying a new model before registering it.
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p


def split_passthrough(argv: Sequence[str]) -> Tuple[List[str], Tuple[str, ...]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], tuple(argv[i + 1:])
    return argv, ()


def load_spec(model: Optional[str], spec_ref: Optional[str]) -> ModelSpec:
    if spec_ref is None:
        if model is None:
            raise LaunchError("--model is required (one of: " + ", ".join(sorted(MODELS)) + ")")
        try:
            return get_spec(model)
        except ImportError as e:
            raise LaunchError(f"model {model!r} is registered but its spec does not import: {e}") from e
    ref, _, attr = spec_ref.rpartition(":")
    if not ref or not attr:
        raise LaunchError(f"--spec {spec_ref!r}: expected 'module:attr' or 'path/to/file.py:attr'")
    if ref.endswith(".py"):
        path = Path(ref).resolve()
        if not path.is_file():
            raise LaunchError(f"--spec: no file {path}")
        module_spec = importlib.util.spec_from_file_location(f"_bevkit_spec_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        module = importlib.import_module(ref)
    spec = getattr(module, attr)
    if model is not None and model != spec.name:
        raise LaunchError(f"--model {model} does not match --spec {spec_ref} (model {spec.name!r})")
    return spec


# ------------------------------------------------------------------------------------- environment
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def expand(value: str, environ: Mapping[str, str]) -> str:
    """Shell-style ${VAR}, ${VAR:-default} and $VAR expansion (no command substitution)."""
    def repl(m: "re.Match[str]") -> str:
        name = m.group(1) or m.group(3)
        current = environ.get(name, "")
        if m.group(2) is not None and not current:
            return expand(m.group(2), environ)
        return current
    return _VAR.sub(repl, value)


def read_env_file(path: Path, environ: Mapping[str, str]) -> Dict[str, str]:
    """KEY=VALUE lines of a configs/env file, expanded against ``environ`` (comments and blanks skipped)."""
    values: Dict[str, str] = {}
    scope = dict(environ)
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"{path}:{lineno}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = expand(value, scope)
        scope.setdefault(key, values[key])
    return values


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / cgroup cpusets
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def find_cann_set_env(environ: Mapping[str, str], file_values: Mapping[str, str]) -> Optional[Path]:
    explicit = environ.get("BEVKIT_CANN_SET_ENV")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise LaunchError(f"BEVKIT_CANN_SET_ENV={explicit}: no such file (point it at CANN's set_env.sh)")
        return path
    for candidate in file_values.get("BEVKIT_CANN_SET_ENV_CANDIDATES", "").split(":"):
        if candidate and Path(candidate).is_file():
            return Path(os.path.normpath(candidate))
    return None


def source_env_script(script: Path, environ: Mapping[str, str]) -> Dict[str, str]:
    """The environment after sourcing a shell script (CANN set_env.sh) in bash."""
    try:
        out = subprocess.run(["bash", "-c", '. "$0" >/dev/null 2>&1; env -0', str(script)],
                             env=dict(environ), capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(f"could not source {script}: {e}") from e
    if out.returncode != 0:
        raise LaunchError(f"sourcing {script} failed (exit {out.returncode}): "
                          f"{out.stderr.decode(errors='replace')[-500:]}")
    env: Dict[str, str] = {}
    for item in out.stdout.split(b"\0"):
        key, sep, value = item.decode(errors="surrogateescape").partition("=")
        if sep and key and key not in ("_", "SHLVL", "PWD", "OLDPWD"):
            env[key] = value
    return env


def _join_paths(*parts: Optional[str]) -> str:
    seen: List[str] = []
    for part in parts:
        for item in (part or "").split(os.pathsep):
            if item and item not in seen:
                seen.append(item)
    return os.pathsep.join(seen)


def upstream_checkout(name: str) -> Tuple[Path, List[Path]]:
    """(checkout folder, its PYTHONPATH entries) from bevkit.upstream, or <repo>/upstream/<name>."""
    try:
        from bevkit import upstream  # the registry; lazily, it is not needed for upstream-free specs

        checkout = Path(upstream.checkout_dir(name))
        entries = [Path(p) for p in upstream.pythonpath(name)] if hasattr(upstream, "pythonpath") else [checkout]
        return checkout, entries
    except (ImportError, AttributeError):
        checkout = REPO_ROOT / "upstream" / name
        return checkout, [checkout]


def upstream_problems(name: str) -> List[str]:
    """What is wrong with the upstream checkout (wrong commit, patches not applied...), with the fixes."""
    try:
        from bevkit import upstream
    except ImportError:
        return []
    if not hasattr(upstream, "status"):
        return []
    st = upstream.status(name)
    return [f"{what} -> fix: {fix}" for what, fix in getattr(st, "problems", [])]


# ------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    spec: ModelSpec
    request: LaunchRequest
    argv: List[str]
    env: Dict[str, str]                 # the child's full environment
    env_set: Dict[str, str]             # what the launcher set or changed (printed, recorded)
    env_unset: List[str]                # inherited variables the launcher removed
    cwd: Path
    work_dir: Path
    node_rank: int
    master_addr: str
    master_port: int
    batch_per_device: int
    cann_set_env: Optional[Path] = None
    env_files: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)      # said before starting
    warnings: List[str] = field(default_factory=list)   # dry run: would refuse / may fail


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _abs(path: Optional[Path]) -> Optional[Path]:
    return Path(os.path.abspath(os.path.expanduser(str(path)))) if path is not None else None


def make_plan(args: argparse.Namespace, extra: Sequence[str], environ: Optional[Mapping[str, str]] = None,
              cores: Optional[int] = None, spec: Optional[ModelSpec] = None,
              run_dir: Optional[Path] = None) -> Plan:
    """Everything about a launch except side effects; raises LaunchError on bad input.

    ``run_dir``: the (already created) run folder; by default the name the next run would get.
    """
    environ = dict(os.environ if environ is None else environ)
    spec = spec or load_spec(args.model, args.spec)
    dry = bool(args.dry_run)
    notes: List[str] = []
    warnings: List[str] = []

    def refuse(message: str) -> None:
        """A real launch stops here; a dry run shows the problem and goes on printing the command."""
        if not dry:
            raise LaunchError(message)
        warnings.append(message)

    # --- cluster shape
    nproc = args.nproc if args.nproc is not None else DEFAULT_NPROC
    nnodes = args.nnodes if args.nnodes is not None else (_int_env(environ, "NNODES") or 1)
    node_rank = args.node_rank if args.node_rank is not None else (_int_env(environ, "NODE_RANK") or 0)
    if nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}")
    if nnodes < 1:
        raise LaunchError(f"--nnodes must be >= 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank must be in [0, {nnodes - 1}] for --nnodes {nnodes}, got {node_rank}")
    master_addr = args.master_addr or environ.get("MASTER_ADDR") or None
    port = args.master_port if args.master_port is not None else _int_env(environ, "MASTER_PORT")
    if nnodes > 1:
        if not master_addr:
            raise LaunchError(f"--nnodes {nnodes} needs --master-addr (or MASTER_ADDR): the address of node 0, "
                              "the same on every node")
        if port is None:
            port = MULTINODE_DEFAULT_PORT
            notes.append(f"multi-node: using the default master port {port} (pass the same --master-port "
                         "on every node to change it)")
    else:
        master_addr = master_addr or "127.0.0.1"
        if port is None:
            port = free_port()
    if not 0 < port < 65536:
        raise LaunchError(f"--master-port must be in 1..65535, got {port}")

    device = args.device or detect_profile()
    if device not in DEVICES:
        raise LaunchError(f"--device must be one of {DEVICES}, got {device!r}")

    # --- data root: a missing one is refused before anything else
    data_root = _abs(args.data_root) if args.data_root is not None else \
        _abs(Path(environ["BEVKIT_DATA_ROOT"])) if environ.get("BEVKIT_DATA_ROOT") else REPO_ROOT / "data" / "nuscenes"
    if not data_root.is_dir():
        make = "python -m bevkit.data.synthetic --out DIR"
        raise LaunchError(f"data root {data_root} does not exist: pass --data-root DIR (a nuScenes-format "
                          f"folder; a small synthetic one is made with `{make}`)")

    # --- paths
    mode = args.mode
    config = _abs(args.config)
    if config is None and spec.configs.get(mode):
        config = REPO_ROOT / spec.configs[mode]
    if config is not None and not config.is_file():
        refuse(f"config {config} does not exist (--config FILE)")
    checkpoint = _abs(args.checkpoint)
    if checkpoint is not None and not checkpoint.is_file():
        refuse(f"checkpoint {checkpoint} does not exist (--checkpoint FILE)")
    max_steps = args.max_steps
    if max_steps is None and mode == "performance":
        max_steps = spec.performance_steps or DEFAULT_PERFORMANCE_STEPS
    if max_steps is not None and max_steps < 1:
        raise LaunchError(f"--max-steps must be >= 1, got {max_steps}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise LaunchError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")

    work_dir = _abs(args.work_dir) if args.work_dir is not None else REPO_ROOT / "runs" / spec.name / mode
    if run_dir is None:
        run_dir = next_run_dir(work_dir, node_rank if nnodes > 1 else None, create=False)

    # --- upstream checkout
    checkout: Optional[Path] = None
    upstream_path: List[Path] = []
    if spec.upstream:
        checkout, upstream_path = upstream_checkout(spec.upstream)
        if not checkout.is_dir():
            refuse(
                f"upstream {spec.upstream} is not checked out at {checkout}: run ./setup.sh "
                f"(or tools/upstream materialize {spec.upstream}) first")
        else:
            problems = upstream_problems(spec.upstream)
            if problems:
                refuse(f"upstream checkout {checkout} is not usable:\n  "
                                              + "\n  ".join(problems))

    request = LaunchRequest(mode=mode, device=device, data_root=data_root, run_dir=run_dir,
                            nproc_per_node=nproc, nnodes=nnodes, config=config, checkpoint=checkpoint,
                            max_steps=max_steps, extra_args=tuple(extra))
    try:
        entry = [str(a) for a in spec.build_entry(request)]
        batch = spec.batch_per_device(request)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise LaunchError(f"{spec.name} {mode}: {e}") from e
    if not entry:
        raise LaunchError(f"model spec {spec.name!r} returned an empty entry point")

    # --- environment: CANN, then the device file (user wins), then the launcher's own variables
    env = dict(environ)
    env_files: List[str] = []
    cann: Optional[Path] = None
    env_file = ENV_DIR / f"{device}.env"
    file_values = read_env_file(env_file, env) if env_file.is_file() else {}
    if env_file.is_file():
        env_files.append(str(env_file.relative_to(REPO_ROOT)))
    if device == "npu":
        cann = find_cann_set_env(env, file_values)
        if cann is not None:
            env = source_env_script(cann, env)
        elif env.get("ASCEND_TOOLKIT_HOME") or env.get("ASCEND_OPP_PATH"):
            notes.append("CANN set_env.sh not found; using the CANN environment already loaded in this shell")
        else:
            refuse(
                "CANN not found: install the CANN toolkit or point ASCEND_HOME_PATH at it "
                "(e.g. /usr/local/Ascend/ascend-toolkit/latest), or set BEVKIT_CANN_SET_ENV=/path/to/set_env.sh")
    for key, value in file_values.items():
        if key.startswith("BEVKIT_"):
            continue  # launcher settings, not for the training processes
        if key not in environ:
            env[key] = value
    if device == "cpu" and "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(max(1, (cores or usable_cores()) // nproc))
    env.setdefault("PYTHONUNBUFFERED", "1")  # stream rank output into the tee as it happens
    env["PYTHONPATH"] = _join_paths(*[str(p) for p in upstream_path], str(REPO_ROOT), env.get("PYTHONPATH"))
    env.update({
        "BEVKIT_RUN_DIR": str(run_dir),
        "BEVKIT_MODEL": spec.name,
        "BEVKIT_MODE": mode,
        "BEVKIT_DEVICE": device,
        "BEVKIT_DATA_ROOT": str(data_root),
        "BEVKIT_SAMPLES_PER_DEVICE": str(batch),
    })
    if max_steps is not None:
        env["BEVKIT_MAX_STEPS"] = str(max_steps)
    else:
        env.pop("BEVKIT_MAX_STEPS", None)  # an exported value must not cut a full run short
    env_set = {k: v for k, v in sorted(env.items()) if environ.get(k) != v}
    env_unset = sorted(k for k in environ if k not in env)

    argv = [sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", f"--node_rank={node_rank}",
            f"--master_addr={master_addr}", f"--master_port={port}"] + entry
    cwd = checkout if checkout is not None and checkout.is_dir() else REPO_ROOT
    notes.insert(0, f"{spec.name} {mode}: {nnodes} node(s) x {nproc} {device} process(es) "
                    f"({DIST_BACKEND[device]}), batch {batch}/device, global batch {batch * nproc * nnodes}")
    return Plan(spec=spec, request=request, argv=argv, env=env, env_set=env_set, env_unset=env_unset,
                cwd=cwd, work_dir=work_dir, node_rank=node_rank, master_addr=master_addr, master_port=port,
                batch_per_device=batch, cann_set_env=cann, env_files=env_files, notes=notes,
                warnings=warnings)


# ---------------------------------------------------------------------------------------- run dirs
def _timestamp(now: Optional[datetime] = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def next_run_dir(work_dir: Path, node_rank: Optional[int] = None, create: bool = True,
                 now: Optional[datetime] = None) -> Path:
    """A run folder that did not exist before: <work_dir>/<UTC time>[-node<k>][-<n>].

    With create=True it is made with an exclusive mkdir, so two launches in the same second (or two
    nodes sharing a file system) never share a folder.
    """
    base = _timestamp(now) + (f"-node{node_rank}" if node_rank is not None else "")
    for n in range(0, 10000):
        candidate = work_dir / (base if n == 0 else f"{base}-{n}")
        if not create:
            if not candidate.exists():
                return candidate
            continue
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise LaunchError(f"could not find a free run folder name under {work_dir}")


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
                    "node_rank": plan.node_rank, "master_addr": plan.master_addr,
                    "master_port": plan.master_port, "config": str(r.config) if r.config else None,
                    "checkpoint": str(r.checkpoint) if r.checkpoint else None, "max_steps": r.max_steps,
                    "extra_args": list(r.extra_args), "batch_per_device": plan.batch_per_device},
        "notes": plan.notes,
    }


# ------------------------------------------------------------------------------------------ checks
def check_data(spec: ModelSpec, data_root: Path) -> Tuple[str, List[str]]:
    """('ok'|'unavailable', problems as printable lines) from bevkit.data.validate."""
    if spec.name not in MODELS:
        return f"unavailable (no validator for model {spec.name!r})", []
    try:
        from bevkit.data import validate as validator  # issue-4 module; imported only when needed
    except ImportError as e:
        return f"unavailable ({e})", []
    try:
        problems = validator.validate(spec.name, data_root)
    except Exception as e:  # a validator bug must not look like bad data, nor be skipped silently
        raise LaunchError(f"the data validator failed on {data_root}: {type(e).__name__}: {e} "
                          "(--no-data-check skips it)") from e
    lines = []
    for p in problems:
        path, message, fix = (getattr(p, "path", ""), getattr(p, "message", str(p)), getattr(p, "fix", ""))
        lines.append(f"{path}: {message}" + (f" -> fix: {fix}" if fix else ""))
    return "ok" if not lines else "problems", lines


# --------------------------------------------------------------------------------------------- run
def run_tee(argv: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path, out=None) -> int:
    """Run argv, streaming its combined output to ``out`` and to log_path; returns the exit code.

    The child gets its own session so that a terminal Ctrl-C reaches it once, through us: SIGINT,
    SIGTERM and SIGHUP are forwarded, and we keep reading until it has finished its own shutdown.
    """
    out = out if out is not None else sys.stdout.buffer
    proc = subprocess.Popen(list(argv), cwd=str(cwd), env=dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def forward(signum, _frame):
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
    return 128 - rc if rc < 0 else rc  # killed by signal N -> 128+N, like a shell


def finish(plan: Plan, exit_code: int, e2e_s: float, warmup: Optional[int], out=None) -> Path:
    """Write results.json + the Ascend-style log from the run folder; print the final lines."""
    from bevkit import results as res
    from bevkit.timing import STEPS_FILE, read_steps

    r = plan.request
    records = read_steps(r.run_dir / STEPS_FILE)
    metrics = res.read_metrics(r.run_dir)
    if warmup is None and plan.env.get("BEVKIT_WARMUP_STEPS", "").strip().isdigit():
        warmup = int(plan.env["BEVKIT_WARMUP_STEPS"])  # (anything else: the default rule)
    checkout = plan.cwd if plan.spec.upstream else None
    results = res.build_results(
        records=records, metrics=metrics, model=plan.spec.name, display_name=plan.spec.display_name,
        mode=r.mode, device=r.device, nproc_per_node=r.nproc_per_node, nnodes=r.nnodes,
        node_rank=plan.node_rank, batch_per_device=plan.batch_per_device, exit_code=exit_code,
        e2e_duration_s=round(e2e_s, 3), warmup=warmup, versions=res.collect_versions(plan.env),
        upstream=res.upstream_info(plan.spec.upstream, checkout),
        extra={"max_steps": r.max_steps, "run_dir": str(r.run_dir),
               "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "host": socket.gethostname(), "arch": platform.machine(),
               "files": {"log": LOG_FILE, "launch": LAUNCH_FILE, "steps": STEPS_FILE if records else None,
                         "metrics": res.METRICS_FILE if metrics else None}})
    path, _log, printed = res.write_results(r.run_dir, results)
    out = out or sys.stdout
    if exit_code == 0 and r.mode in ("full", "performance", "smoke") and not records and plan.node_rank == 0:
        print(f"WARNING: no step records in {r.run_dir / STEPS_FILE}: the entry point did not use "
              "bevkit.timing, so no step time or FPS could be measured", file=out)
    for line in printed:
        print(line, file=out)
    if exit_code != 0:
        print(f"training exited with code {exit_code}; see {r.run_dir / LOG_FILE}", file=out)
    print(f"results: {path}", file=out)
    out.flush()
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(split_passthrough(argv)[0])
    if args.mode == "smoke" and args.spec is None:  # the whole pipeline: data, preparation, training, eval
        from bevkit.smoke import run

        return run(argv, launch_once)
    return launch_once(argv)[0]


def launch_once(argv: Sequence[str]) -> Tuple[int, Optional[Path]]:
    """One torchrun launch: (exit code, run folder; the planned one on a dry run, None when refused)."""
    argv = list(argv)
    own, extra = split_passthrough(argv)
    parser = build_parser()
    args = parser.parse_args(own)
    try:
        plan = make_plan(args, extra)
        if not args.no_data_check:
            state, problems = check_data(plan.spec, plan.request.data_root)
            if problems:
                message = (f"data root {plan.request.data_root} is not ready for {plan.spec.name}:\n  "
                           + "\n  ".join(problems)
                           + f"\n(check again: python -m bevkit.data.validate --model {plan.spec.name} "
                             f"{plan.request.data_root})")
                if not args.dry_run:
                    raise LaunchError(message)
                plan.warnings.append(message)
            elif state != "ok":
                plan.notes.append(f"data check skipped: validator {state}")
        if args.dry_run:
            print_dry_run(plan)
            return 0, plan.request.run_dir
        run_dir = next_run_dir(plan.work_dir, plan.node_rank if plan.request.nnodes > 1 else None)
        if run_dir != plan.request.run_dir:  # the planned name was taken meanwhile: plan with the real one
            args.master_port = plan.master_port
            plan = make_plan(args, extra, spec=plan.spec, run_dir=run_dir)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    from bevkit.results import atomic_write_json

    atomic_write_json(plan.request.run_dir / LAUNCH_FILE, launch_record(plan, [sys.argv[0]] + argv))
    for note in plan.notes:
        print(f"[bevkit] {note}", flush=True)
    print(f"[bevkit] run folder: {plan.request.run_dir}", flush=True)
    print(f"[bevkit] command: {' '.join(shlex.quote(a) for a in plan.argv)}", flush=True)
    sys.stdout.flush()
    start = time.monotonic()
    try:
        rc = run_tee(plan.argv, plan.env, plan.cwd, plan.request.run_dir / LOG_FILE)
    except OSError as e:
        print(f"error: could not start {plan.argv[0]}: {e}", file=sys.stderr)
        rc = 127
    finish(plan, rc, time.monotonic() - start, args.warmup_steps)
    return rc, plan.request.run_dir


if __name__ == "__main__":
    sys.exit(main())
