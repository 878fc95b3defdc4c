"""The launcher's command line, parsed once into a typed :class:`Request` (environment defaults included)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from bevkit.device import DEVICES
from bevkit.errors import UserError
from bevkit.registry import MODELS, MODES

DEFAULT_NPROC = 8
#: performance runs stop after this many steps unless the model (ModelSpec.performance_steps) or --max-steps
#: says otherwise (FB-OCC's reference measures 600; its performance config runs the same 600 iterations)
DEFAULT_PERFORMANCE_STEPS = 600
#: multi-node runs need one port known to every node; torchrun's conventional default
MULTINODE_DEFAULT_PORT = 29500
#: how the cluster shape is found: options / environment, or the SLURM_* variables (bevkit.launch.slurm)
LAUNCHERS = ("local", "slurm")


class LaunchError(UserError):
    """A problem with the user's input or machine, reported as one clear message (exit code 2, unless a
    :class:`~bevkit.errors.UserError` subclass says otherwise)."""


@dataclass(frozen=True)
class Request:
    """One launch as asked for on the command line (paths absolute). None: not given, decided by the plan
    from the environment (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, BEVKIT_DATA_ROOT, BEVKIT_WARMUP_STEPS)
    or the defaults."""

    mode: str
    model: Optional[str] = None
    spec_ref: Optional[str] = None        # --spec module:attr / file.py:attr (tests, unregistered models)
    data_root: Optional[Path] = None      # None: $BEVKIT_DATA_ROOT or <repo>/data/nuscenes
    device: Optional[str] = None          # None: detected
    nproc: Optional[int] = None           # None: DEFAULT_NPROC
    nnodes: Optional[int] = None
    node_rank: Optional[int] = None
    master_addr: Optional[str] = None     # None: 127.0.0.1 on one node (required with several)
    master_port: Optional[int] = None     # None: a free port on one node, MULTINODE_DEFAULT_PORT with several
    work_dir: Optional[Path] = None       # None: <repo>/runs/<model>/<mode>
    config: Optional[Path] = None         # None: the model's config for the mode
    checkpoint: Optional[Path] = None     # eval: weights to evaluate; training: weights to start from
    resume: Optional[str] = None          # a run folder (absolute) or 'auto': continue that run's training
    trust_checkpoint: bool = False        # unpickle checkpoints from anywhere (see bevkit.torch_load)
    max_steps: Optional[int] = None       # None: performance runs get the model's step count
    warmup_steps: Optional[int] = None    # None: the first 10% of the steps
    launcher: Optional[str] = None        # None: 'slurm' inside a Slurm job task, else 'local'
    flow: Optional[str] = None            # the flow this launch is a step of ('smoke', 'demo'; recorded in results)
    data_check: bool = True
    dry_run: bool = False
    extra: Tuple[str, ...] = ()           # after '--': the upstream entry point's arguments

    @classmethod
    def from_args(cls, args: argparse.Namespace, extra: Sequence[str] = ()) -> "Request":
        return cls(
            mode=args.mode, model=args.model, spec_ref=args.spec, data_root=_abs(args.data_root),
            device=args.device, nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
            master_addr=args.master_addr, master_port=args.master_port, work_dir=_abs(args.work_dir),
            config=_abs(args.config), checkpoint=_abs(args.checkpoint),
            resume=(args.resume if args.resume in (None, "auto") else str(_abs(Path(args.resume)))),
            trust_checkpoint=bool(args.trust_checkpoint), max_steps=args.max_steps,
            warmup_steps=args.warmup_steps, launcher=args.launcher, data_check=not args.no_data_check,
            dry_run=bool(args.dry_run), extra=tuple(extra))


def _abs(path: Optional[Path]) -> Optional[Path]:
    return Path(os.path.abspath(os.path.expanduser(str(path)))) if path is not None else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/launch",
        description="Launch FB-OCC / BEVDepth training or evaluation on NPU, CUDA or CPU through torchrun. "
                    "Arguments after '--' go to the upstream entry point unchanged.",
        epilog="Environment defaults (OpenMMLab style): NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, "
               "BEVKIT_DATA_ROOT. Options win over the environment.")
    p.add_argument("--model", choices=sorted(MODELS), help="model to run")
    p.add_argument("--mode", required=True, choices=MODES,
                   help="full: train + evaluate; performance: train --max-steps steps (default: the model's, "
                        f"{DEFAULT_PERFORMANCE_STEPS} unless it says) for speed; eval: evaluate --checkpoint; "
                        "smoke: tiny run on synthetic data; demo: a run that learns the synthetic data, then "
                        "the demo's accuracy gate")
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
    p.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help="slurm: nodes, node rank and master address from the SLURM_* variables of an srun step "
                        "(one task per node); local: from the options / environment. Default: slurm when "
                        "SLURM_JOB_ID and SLURM_PROCID or SLURM_NODEID are set, else local")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="device type (default: detected without torch: npu-smi/CANN -> npu, "
                        "nvidia-smi -> cuda, else cpu; BEVKIT_PROFILE overrides)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="folder that receives one new run folder per run (default <repo>/runs/<model>/<mode>)")
    p.add_argument("--config", type=Path, default=None, help="model config (default: the model's config for the mode)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="eval: the weights to evaluate; training: start a new training from these weights "
                        "(fresh optimizer and counters); checked before anything starts")
    p.add_argument("--resume", metavar="RUN_DIR|auto", default=None,
                   help="continue the training of an earlier run folder from its newest checkpoint (counters, "
                        "optimizer, scheduler, EMA, scaler, RNG) in a new run folder; 'auto': the newest run of "
                        "this model and mode that did not finish. The earlier folder is only read")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that needs full unpickling (not weights_only) even from outside the "
                        "run folders and DATA_ROOT/ckpts: only for files from a source you trust")
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


def parse(argv: Sequence[str]) -> Request:
    """The launcher's argv (options, then '--' and the entry point's arguments) as a Request."""
    own, extra = split_passthrough(argv)
    return Request.from_args(build_parser().parse_args(own), extra)
