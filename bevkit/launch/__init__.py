"""The shared launcher: one command line for every model, device and cluster shape.

    python -m bevkit.launch --model fbocc --mode full [--data-root DIR] [--nproc 8] [--nnodes 1]
        [--node-rank 0] [--master-addr A] [--master-port P] [--device {npu,cuda,cpu}] [--work-dir DIR]
        [--config F] [--checkpoint F] [--resume RUN_DIR|auto] [--trust-checkpoint] [--max-steps N] [--warmup-steps N] [--no-data-check] [--dry-run]
        [-- ARGS passed to the upstream entry point]

Model scripts (``fbocc/test/train_8p_full.sh`` ...) are one ``exec tools/launch --model M --mode X "$@"``.
The package, in the order a launch goes through it:

- :mod:`.request`: the command line parsed once into a typed :class:`Request`;
- :mod:`.plan`: ``plan(request, machine) -> Plan``, pure: cluster shape, device, paths, the model's entry point
  and batch (its ModelSpec), refusals (a missing data root first; on a dry run the rest become warnings);
- :mod:`.environment`: the processes' environment (``configs/env/<device>.env``, the user's environment wins,
  CANN's ``set_env.sh`` on NPU, ``OMP_NUM_THREADS`` = cores // processes on CPU, PYTHONPATH, the ``BEVKIT_*``
  contract of :mod:`bevkit.env`);
- :mod:`.execute`: the data check (``bevkit.data.validate``), a new run folder ``<work-dir>/<UTC
  time>[-node<k>][-<n>]`` (earlier runs are never touched), ``launch.json``, torchrun teed to ``train.log``,
  ``results.json`` and ``<Network>_bs<B>_<N>p_<mode>.log`` (also when training failed), the Ascend-style
  summary lines and, last, ``results: <path>``; exit code = torchrun's;
- :mod:`.smoke`: ``--mode smoke`` / ``--mode demo``: data, preparation, training, then an evaluation request built
  from the training's (demo: then the accuracy gate of the demo);
- :mod:`.slurm`: ``--launcher slurm`` (or inside an srun step): nodes, node rank and master from ``SLURM_*``.

Multi-node: run the same command on every node with ``--nnodes N --node-rank K --master-addr <node 0>``;
each node gets its own run folder. ``steps.jsonl`` and ``metrics.json`` are written by global rank 0,
so node 0's ``results.json`` holds the timing and accuracy.

Nothing here imports torch (the launcher starts in well under a second; versions are read from package
metadata); a model may read a user's own ``--config`` to learn its batch.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

from bevkit import upstream
from bevkit.launch import smoke
from bevkit.launch.environment import ENV_DIR, expand, read_env_file, usable_cores
from bevkit.errors import UserError
from bevkit.launch.execute import execute, print_dry_run, refuse_bad_checkpoint, refuse_bad_data, render_command
from bevkit.launch.plan import Machine, Plan, free_port, load_spec, next_run_dir, plan
from bevkit.launch.request import DEFAULT_PERFORMANCE_STEPS, LaunchError, Request, build_parser, parse
from bevkit.registry import ModelSpec

__all__ = ["DEFAULT_PERFORMANCE_STEPS", "ENV_DIR", "LaunchError", "Machine", "Plan", "Request", "build_parser",
           "expand", "launch_once", "load_spec", "main", "make_plan", "next_run_dir", "parse", "plan",
           "print_dry_run", "read_env_file", "render_command", "this_machine", "upstream_checkout",
           "upstream_problems"]


def upstream_checkout(name: str) -> Tuple[Path, List[Path]]:
    """(checkout folder, its PYTHONPATH entries) of a registered upstream."""
    return upstream.checkout_dir(name), upstream.pythonpath(name)


def upstream_problems(name: str) -> List[str]:
    """What is wrong with the upstream checkout (wrong commit, patches not applied...), with the fixes."""
    return [f"{what} -> fix: {fix}" for what, fix in upstream.status(name).problems]


def this_machine(environ: Optional[Mapping[str, str]] = None, cores: Optional[int] = None) -> Machine:
    return Machine(environ=dict(os.environ if environ is None else environ), cores=cores or usable_cores(),
                   upstream_checkout=upstream_checkout, upstream_problems=upstream_problems, free_port=free_port)


def make_plan(args, extra: Sequence[str] = (), environ: Optional[Mapping[str, str]] = None,
              cores: Optional[int] = None, spec: Optional[ModelSpec] = None, run_dir: Optional[Path] = None) -> Plan:
    """:func:`plan` for a parsed command line (a Request, or build_parser()'s Namespace and the '--' args)
    on this machine."""
    request = args if isinstance(args, Request) else Request.from_args(args, extra)
    return plan(request, this_machine(environ, cores), spec=spec, run_dir=run_dir)


def launch_once(request: Request) -> Tuple[int, Optional[Path]]:
    """One torchrun launch: (exit code, run folder; the planned one on a dry run, None when refused)."""
    try:
        the_plan = make_plan(request)
        if request.data_check:
            refuse_bad_data(the_plan)
        refuse_bad_checkpoint(the_plan)
        if request.dry_run:
            print_dry_run(the_plan)
            return 0, the_plan.request.run_dir
        run_dir = next_run_dir(the_plan.work_dir, the_plan.node_rank if the_plan.request.nnodes > 1 else None)
        if run_dir != the_plan.request.run_dir:  # the planned name was taken meanwhile: plan with the real one
            request = dataclasses.replace(request, master_port=the_plan.master_port)
            found = the_plan.checkpoint_found
            the_plan = make_plan(request, spec=the_plan.spec, run_dir=run_dir)
            the_plan.checkpoint_found = found
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code, None
    return execute(the_plan, [sys.argv[0]] + list(sys.argv[1:])), the_plan.request.run_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    request = parse(sys.argv[1:] if argv is None else argv)
    if request.mode in smoke.FLOWS and request.spec_ref is None:  # data, preparation, training, eval (demo: gate)
        try:
            return smoke.run(request, launch_once)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
    return launch_once(request)[0]
