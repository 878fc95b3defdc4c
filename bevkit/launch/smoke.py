"""Smoke and demo runs: one model's whole pipeline from nothing (``tools/launch --mode smoke|demo``).

1. data: ``--data-root`` if given; else generated with :mod:`bevkit.data.synthetic` when it does not exist yet:
   smoke runs use ``$BEVKIT_SMOKE_DATA`` or ``runs/synthetic-nuscenes``; demo runs ``$BEVKIT_DEMO_DATA`` or
   ``runs/synthetic-nuscenes`` plus a suffix naming the model's demo data options (``ModelSpec.demo_data``, passed
   to the generator), so data made with other options is never reused;
2. the model's data preparation (``ModelSpec.smoke_prepare``: info files, depth ground truth);
3. training of the model's config for the mode (``ModelSpec.configs['smoke' | 'demo']``) through the launcher
   (its own results.json);
4. when the model evaluates in a separate entry point (``ModelSpec.smoke_eval_checkpoint``), an evaluation
   of the checkpoint step 3 wrote: a second request built from the first (:func:`evaluation_after`), with the
   same launcher options and upstream arguments (a second results.json, printed last);
5. demo runs only: the accuracy gate of the last results.json against the model's demo thresholds
   (:mod:`bevkit.gate`); its verdict is the exit status (1 when the demo did not learn enough).

Every launch of a flow records the flow ('smoke' / 'demo') in its launch.json and results.json.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Tuple

from bevkit import REPO_ROOT, env, log
from bevkit.launch.plan import data_root_problem, load_spec, work_dir_problem
from bevkit.launch.request import LaunchError, Request
from bevkit.registry import ModelSpec

DEFAULT_DATA = REPO_ROOT / "runs" / "synthetic-nuscenes"
FLOWS = ("smoke", "demo")

#: one launch: request -> (exit code, run folder; the planned one on a dry run, None when refused)
LaunchOnce = Callable[[Request], Tuple[int, Optional[Path]]]


def default_data_root(environ=None, spec: Optional[ModelSpec] = None, mode: str = "smoke") -> Path:
    """Where a flow without --data-root keeps its synthetic data."""
    if mode == "demo":
        data = env.get("BEVKIT_DEMO_DATA", environ)
        if data:
            return Path(data)
        options = spec.demo_data if spec is not None else ()
        suffix = re.sub(r"[^A-Za-z0-9.]+", "-", " ".join(options)).strip("-")
        return DEFAULT_DATA.with_name(DEFAULT_DATA.name + (f"-{suffix}" if suffix else ""))
    data = env.get("BEVKIT_SMOKE_DATA", environ)
    return Path(data) if data else DEFAULT_DATA


def evaluation_after(train: Request, run_dir: Path, spec: ModelSpec) -> Request:
    """The evaluation of what the flow's training ``train`` wrote into ``run_dir`` (with the config it trained)."""
    config = train.config if train.config is not None else REPO_ROOT / spec.configs[train.mode]
    return dataclasses.replace(train, mode="eval", config=config,
                               checkpoint=run_dir / spec.smoke_eval_checkpoint, flow=train.mode, resume=None)


def generate(data_root: Path, options: Tuple[str, ...]) -> None:
    from bevkit.data import synthetic

    if not options:
        synthetic.generate(data_root)
        return
    if synthetic.main(["--out", str(data_root), *options]) != 0:
        raise LaunchError(f"generating the synthetic data failed: python -m bevkit.data.synthetic --out {data_root} "
                          + " ".join(options))


def gate(run_dir: Optional[Path]) -> int:
    """The demo's accuracy gate on the results.json in ``run_dir``: prints the verdict; 0 PASS, 1 FAIL."""
    from bevkit import gate as gates

    if run_dir is None:
        return 1
    return gates.main([run_dir])


def run(request: Request, launch_once: LaunchOnce) -> int:
    """The smoke or demo flow for a ``--mode smoke`` / ``--mode demo`` request."""
    if request.mode not in FLOWS:
        raise LaunchError(f"--mode {request.mode} is not a flow (one of: {', '.join(FLOWS)})")
    spec = load_spec(request.model, request.spec_ref)
    if request.mode not in spec.configs:
        raise LaunchError(f"model {spec.name} has no {request.mode} config (ModelSpec.configs)")
    say = log.get(request.mode)
    # refused before minutes of data generation and preparation
    problem = ((request.data_root and data_root_problem(request.data_root))
               or (request.work_dir and not request.dry_run and work_dir_problem(request.work_dir)))
    if problem:
        raise LaunchError(problem)
    options = spec.demo_data if request.mode == "demo" else ()
    data_root = request.data_root or Path(os.path.abspath(default_data_root(spec=spec, mode=request.mode)))
    if request.data_root is None and not (data_root / "v1.0-trainval").is_dir():
        described = f"the synthetic dataset{' (' + ' '.join(options) + ')' if options else ''} in {data_root}"
        if request.dry_run:
            say.info(f"would generate {described}")
        else:
            say.info(f"no --data-root: generating {described}")
            generate(data_root, options)
    if spec.smoke_prepare:
        module, *prepare_options = spec.smoke_prepare
        command = [sys.executable, "-m", module, str(data_root), *prepare_options]
        if request.dry_run:
            say.info("would prepare the data: " + " ".join(command))
        else:
            say.info("preparing the data: " + " ".join(command))
            if subprocess.call(command) != 0:
                print(f"error: data preparation failed: {' '.join(command)}", file=sys.stderr)
                return 1

    train = dataclasses.replace(request, data_root=data_root, flow=request.mode)
    rc, run_dir = launch_once(train)
    if rc == 0 and spec.smoke_eval_checkpoint is not None:
        rc, run_dir = launch_once(evaluation_after(train, run_dir or Path("RUN_DIR"), spec))
    if rc != 0 or request.mode != "demo":
        return rc
    if request.dry_run:
        say.info(f"would judge the results with the demo gate of {spec.references} (tools/report --gate)")
        return 0
    return gate(run_dir)
