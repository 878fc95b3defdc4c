"""``tools/npu_ab``: the op-limit policy A/B on a real NPU, in one command.

    tools/npu_ab --model fbocc [--steps 50] [--nproc 8] [--data-root DIR] [--work-dir DIR] [-- LAUNCHER OPTIONS]

Runs the performance mode once per policy of :mod:`bevkit.op_limits` (``BEVKIT_NPU_OP_LIMITS=documented``, then
``port``) through the launcher, the same command otherwise (same seed, data order and step count), each run in its
own folder ``<work-dir>/<policy>/<UTC time>``, and prints per policy the FPS, the mean step time and the loss after
the N steps (from each run's results.json), then which policy to keep:

- ``port`` when both runs finished, port is at least ``MIN_GAIN`` faster and its loss after N steps is within
  ``LOSS_TOLERANCE`` of documented's (the two differ by rounding only when the kernels are right beyond their
  documented limits; a wrong kernel shows as a diverging or non-finite loss);
- ``documented`` (the default) otherwise.

Exit status 0 when both runs finished, 1 otherwise. Options after ``--`` go to ``tools/launch`` unchanged.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from bevkit import REPO_ROOT, log, op_limits
from bevkit.launch.request import split_passthrough

#: port must be at least this much faster (FPS ratio - 1) to be worth leaving the documented limits
MIN_GAIN = 0.02
#: relative difference of the losses after N steps still counted as "the same training"
LOSS_TOLERANCE = 0.05

Runner = Callable[[List[str], Mapping[str, str]], int]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/npu_ab", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Options after '--' go to tools/launch (e.g. --config F, --device npu).")
    p.add_argument("--model", help="fbocc or bevdepth")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per run (default 50)")
    p.add_argument("--nproc", type=int, default=None, help="processes (devices) per node (launcher default 8)")
    p.add_argument("--data-root", type=Path, default=None, help="data root (launcher default)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="folder of the two runs (default <repo>/runs/<model>/npu_ab/<UTC time>)")
    p.add_argument("--policies", default=",".join(op_limits.POLICIES),
                   help="policies to run, in order (default documented,port)")
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)  # the launcher's test-model option
    return p


def launcher_argv(args: argparse.Namespace, work_dir: Path, passthrough: Sequence[str]) -> List[str]:
    argv = ["--mode", "performance", "--max-steps", str(args.steps), "--work-dir", str(work_dir)]
    if args.model:
        argv += ["--model", args.model]
    if args.spec:
        argv += ["--spec", args.spec]
    if args.nproc is not None:
        argv += ["--nproc", str(args.nproc)]
    if args.data_root is not None:
        argv += ["--data-root", str(args.data_root)]
    return argv + list(passthrough)


def run_launcher(argv: List[str], env: Mapping[str, str]) -> int:
    """One launcher run in a child process (its own torchrun, output on this terminal)."""
    return subprocess.run([sys.executable, "-m", "bevkit.launch", *argv], env=dict(env), cwd=str(REPO_ROOT)).returncode


def newest_results(work_dir: Path) -> Optional[Path]:
    found = sorted(work_dir.glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def read_row(policy: str, rc: int, results_path: Optional[Path]) -> Dict[str, object]:
    from bevkit.results import load_results

    row: Dict[str, object] = {"policy": policy, "exit_code": rc, "results": str(results_path) if results_path else None}
    if results_path is not None:
        data = load_results(results_path)
        recorded = data.get("npu_op_limits")
        if recorded != policy:
            raise RuntimeError(f"{results_path} records npu_op_limits={recorded!r}, not {policy!r}: the run did not "
                               "use the policy it was started with")
        row.update({k: data.get(k) for k in ("fps", "step_time_mean_s", "loss_last", "steps", "device",
                                               "world_size", "status")})
    return row


def _ok(row: Mapping[str, object]) -> bool:
    loss = row.get("loss_last")
    return row.get("exit_code") == 0 and row.get("status") == "ok" and isinstance(row.get("fps"), (int, float)) \
        and isinstance(loss, (int, float)) and math.isfinite(loss)


def recommendation(rows: Sequence[Mapping[str, object]]) -> str:
    """Which policy to keep, and why (the rule in the module doc)."""
    by = {r["policy"]: r for r in rows}
    doc, port = by.get(op_limits.DOCUMENTED), by.get(op_limits.PORT)
    if doc is None or port is None:
        return "keep documented: run both policies to compare"
    devices = {r.get("device") for r in rows if r.get("device")}
    if devices and devices != {"npu"}:
        return (f"none: the runs were on {', '.join(sorted(devices))}, where the policy changes nothing "
                "(run on an NPU)")
    if not _ok(doc):
        return "keep documented, and look at its run first: it did not finish with a finite loss"
    if not _ok(port):
        return "keep documented: the port run did not finish with a finite loss"
    gain = port["fps"] / doc["fps"] - 1
    loss_rel = abs(port["loss_last"] - doc["loss_last"]) / max(abs(doc["loss_last"]), 1e-12)
    if loss_rel > LOSS_TOLERANCE:
        return (f"keep documented: the losses after {doc['steps']} steps differ by {loss_rel:.1%} "
                f"(> {LOSS_TOLERANCE:.0%}): the kernels may not be right beyond their documented limits")
    if gain < MIN_GAIN:
        return f"keep documented: port is {gain:+.1%} in FPS (< {MIN_GAIN:.0%}), not worth leaving the limits"
    return (f"set BEVKIT_NPU_OP_LIMITS=port: {gain:+.1%} FPS, losses after {doc['steps']} steps within "
            f"{loss_rel:.1%}")


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def summary(rows: Sequence[Mapping[str, object]]) -> List[str]:
    lines = [f"{'policy':<11} {'exit':>4} {'FPS':>9} {'step ms':>9} {'loss@N':>10} {'steps':>5}  results"]
    for r in rows:
        step_ms = r["step_time_mean_s"] * 1000 if isinstance(r.get("step_time_mean_s"), (int, float)) else None
        lines.append(f"{r['policy']:<11} {r['exit_code']:>4} {_fmt(r.get('fps'), '9.2f')} {_fmt(step_ms, '9.1f')} "
                     f"{_fmt(r.get('loss_last'), '10.4f')} {_fmt(r.get('steps'), '5d')}  {r.get('results') or '-'}")
    lines.append("recommendation: " + recommendation(rows))
    return lines


def main(argv: Optional[Sequence[str]] = None, runner: Runner = run_launcher,
         environ: Optional[Mapping[str, str]] = None) -> int:
    own, passthrough = split_passthrough(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    if not args.model and not args.spec:
        print("error: --model is required (fbocc or bevdepth)", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in op_limits.POLICIES]
    if bad or not policies:
        print(f"error: --policies {args.policies!r}: choose from {', '.join(op_limits.POLICIES)}", file=sys.stderr)
        return 2
    base = dict(os.environ if environ is None else environ)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    work_dir = args.work_dir or REPO_ROOT / "runs" / (args.model or "model") / "npu_ab" / stamp
    rows = []
    for policy in policies:
        run_dir = Path(work_dir) / policy
        log.get("npu_ab").info(f"{op_limits.ENV}={policy}: performance run of {args.steps} steps in {run_dir}")
        sys.stdout.flush()
        rc = runner(launcher_argv(args, run_dir, passthrough), {**base, op_limits.ENV: policy})
        rows.append(read_row(policy, rc, newest_results(run_dir)))
    for line in summary(rows):
        print(line)
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
