"""Smoke runs: one model's whole pipeline in minutes, from nothing (``tools/launch --mode smoke``).

1. data: ``--data-root`` if given; else ``$BEVKIT_SMOKE_DATA`` or ``runs/synthetic-nuscenes``, generated with
   :mod:`bevkit.data.synthetic` when it does not exist yet;
2. the model's data preparation (``ModelSpec.smoke_prepare``: info files, depth ground truth);
3. training of the model's smoke config through the launcher (its own results.json);
4. when the model evaluates in a separate entry point (``ModelSpec.smoke_eval_checkpoint``), an evaluation
   launch of the checkpoint step 3 wrote (a second results.json, printed last).

Launcher options (``--device``, ``--nproc``, ``--work-dir``, ``-- ...``) are passed to both launches.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from bevkit import REPO_ROOT
from bevkit.models import get_spec

DEFAULT_DATA = REPO_ROOT / "runs" / "synthetic-nuscenes"

#: one launch: launcher argv -> (exit code, run folder)
LaunchOnce = Callable[[Sequence[str]], Tuple[int, Optional[Path]]]


def default_data_root(environ=None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ["BEVKIT_SMOKE_DATA"]) if environ.get("BEVKIT_SMOKE_DATA") else DEFAULT_DATA


def _say(message: str) -> None:
    print(f"[bevkit smoke] {message}", flush=True)


def run(argv: Sequence[str], launch_once: LaunchOnce) -> int:
    """The smoke flow for launcher argv containing ``--mode smoke``."""
    own, extra = list(argv), []
    if "--" in own:
        at = own.index("--")
        own, extra = own[:at], own[at:]
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # "--mode" is not "--model"
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    known, rest = parser.parse_known_args(own)
    spec = get_spec(known.model)
    dry = ["--dry-run"] if known.dry_run else []

    data_root = Path(os.path.abspath(known.data_root or default_data_root()))
    if known.data_root is None and not (data_root / "v1.0-trainval").is_dir():
        if known.dry_run:
            _say(f"would generate the synthetic dataset in {data_root}")
        else:
            _say(f"no --data-root: generating the synthetic dataset in {data_root}")
            from bevkit.data.synthetic import generate

            generate(data_root)
    if spec.smoke_prepare:
        module, *options = spec.smoke_prepare
        command = [sys.executable, "-m", module, str(data_root), *options]
        if known.dry_run:
            _say("would prepare the data: " + " ".join(command))
        else:
            _say("preparing the data: " + " ".join(command))
            if subprocess.call(command) != 0:
                print(f"error: data preparation failed: {' '.join(command)}", file=sys.stderr)
                return 1

    common = ["--model", spec.name, *rest, "--data-root", str(data_root), *dry]
    rc, run_dir = launch_once(common + extra)
    if rc != 0 or spec.smoke_eval_checkpoint is None:
        return rc
    checkpoint = (run_dir or Path("RUN_DIR")) / spec.smoke_eval_checkpoint
    config = REPO_ROOT / spec.configs["smoke"]
    rc, _ = launch_once(common + ["--mode", "eval", "--config", str(config), "--checkpoint", str(checkpoint)]
                        + extra)
    return rc
