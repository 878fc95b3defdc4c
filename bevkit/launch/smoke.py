"""Smoke runs: one model's whole pipeline in minutes, from nothing (``tools/launch --mode smoke``).

1. data: ``--data-root`` if given; else ``$BEVKIT_SMOKE_DATA`` or ``runs/synthetic-nuscenes``, generated with
   :mod:`bevkit.data.synthetic` when it does not exist yet;
2. the model's data preparation (``ModelSpec.smoke_prepare``: info files, depth ground truth);
3. training of the model's smoke config through the launcher (its own results.json);
4. when the model evaluates in a separate entry point (``ModelSpec.smoke_eval_checkpoint``), an evaluation
   of the checkpoint step 3 wrote: a second request built from the first (:func:`evaluation_after`), with the
   same launcher options and upstream arguments (a second results.json, printed last).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Tuple

from bevkit import REPO_ROOT, env, log
from bevkit.launch.plan import data_root_problem, load_spec, work_dir_problem
from bevkit.launch.request import LaunchError, Request
from bevkit.registry import ModelSpec

DEFAULT_DATA = REPO_ROOT / "runs" / "synthetic-nuscenes"

#: one launch: request -> (exit code, run folder; the planned one on a dry run, None when refused)
LaunchOnce = Callable[[Request], Tuple[int, Optional[Path]]]


def default_data_root(environ=None) -> Path:
    data = env.get("BEVKIT_SMOKE_DATA", environ)
    return Path(data) if data else DEFAULT_DATA


def evaluation_after(train: Request, run_dir: Path, spec: ModelSpec) -> Request:
    """The evaluation of what the smoke training ``train`` wrote into ``run_dir``."""
    return dataclasses.replace(train, mode="eval", config=REPO_ROOT / spec.configs["smoke"],
                               checkpoint=run_dir / spec.smoke_eval_checkpoint)


def run(request: Request, launch_once: LaunchOnce) -> int:
    """The smoke flow for a ``--mode smoke`` request."""
    spec = load_spec(request.model, request.spec_ref)
    say = log.get("smoke")
    # refused before minutes of data generation and preparation
    problem = ((request.data_root and data_root_problem(request.data_root))
               or (request.work_dir and not request.dry_run and work_dir_problem(request.work_dir)))
    if problem:
        raise LaunchError(problem)
    data_root = request.data_root or Path(os.path.abspath(default_data_root()))
    if request.data_root is None and not (data_root / "v1.0-trainval").is_dir():
        if request.dry_run:
            say.info(f"would generate the synthetic dataset in {data_root}")
        else:
            say.info(f"no --data-root: generating the synthetic dataset in {data_root}")
            from bevkit.data import synthetic

            synthetic.generate(data_root)
    if spec.smoke_prepare:
        module, *options = spec.smoke_prepare
        command = [sys.executable, "-m", module, str(data_root), *options]
        if request.dry_run:
            say.info("would prepare the data: " + " ".join(command))
        else:
            say.info("preparing the data: " + " ".join(command))
            if subprocess.call(command) != 0:
                print(f"error: data preparation failed: {' '.join(command)}", file=sys.stderr)
                return 1

    train = dataclasses.replace(request, data_root=data_root)
    rc, run_dir = launch_once(train)
    if rc != 0 or spec.smoke_eval_checkpoint is None:
        return rc
    rc, _ = launch_once(evaluation_after(train, run_dir or Path("RUN_DIR"), spec))
    return rc
