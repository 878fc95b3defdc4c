"""``plan(request, machine) -> Plan``: everything about a launch, decided without side effects.

What the machine contributes (environment, cores, the upstream checkout's state, a free port, the detected
device, sourcing CANN's set_env.sh) comes in as a :class:`Machine`, so a plan is computed from its inputs only:
no process is started and nothing is created. Bad input raises :class:`LaunchError`; on a dry run what a real
launch would refuse is collected in ``Plan.warnings`` instead.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from bevkit import REPO_ROOT, op_limits
from bevkit.device import DEVICES, RunDevice, detect_profile
from bevkit.launch import environment, resume, slurm
from bevkit.launch.request import (DEFAULT_NPROC, DEFAULT_PERFORMANCE_STEPS, MULTINODE_DEFAULT_PORT, LaunchError,
                                   Request, _abs)
from bevkit.registry import MODELS, LaunchRequest, ModelSpec, get_spec


#: every rank runs its entry point through this module (parent-death signal, one-line errors)
WORKER = "bevkit.launch.worker"


@dataclass
class Machine:
    """The facts of this machine a plan depends on (tests pass their own)."""

    environ: Dict[str, str]
    cores: int
    #: upstream name -> (checkout folder, its PYTHONPATH entries)
    upstream_checkout: Callable[[str], Tuple[Path, List[Path]]]
    #: upstream name -> what is wrong with the checkout, with the fixes
    upstream_problems: Callable[[str], List[str]]
    free_port: Callable[[], int]
    detect_device: Callable[[], str] = detect_profile
    source: Optional[Callable[[Path, Mapping[str, str]], Dict[str, str]]] = None  # CANN's set_env.sh


@dataclass
class Plan:
    spec: ModelSpec
    request: LaunchRequest              # the launch as the model sees it
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
    launch: Optional[Request] = None    # what was asked for (the smoke flow derives its evaluation from it)
    launcher: str = "local"             # how the cluster shape was found: local (options, environment) or slurm
    resumed_from: Optional[resume.Earlier] = None   # --resume: the earlier run and its checkpoint
    #: the checkpoint the run loads and what for ('eval', 'init', 'resume'), checked before the launch
    checked_checkpoint: Optional[Tuple[Path, str]] = None
    checkpoint_found: Optional[dict] = None   # what the check found in it (recorded in launch.json)
    warmup_steps: Optional[int] = None
    cann_set_env: Optional[Path] = None
    env_files: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)      # said before starting
    warnings: List[str] = field(default_factory=list)   # dry run: would refuse / may fail


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def _int_env(environ: Mapping[str, str], name: str) -> Optional[int]:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def _first(*values):
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


def _slurm_shape(request: Request, environ: Mapping[str, str]) -> Optional[slurm.SlurmCluster]:
    """The Slurm step's cluster shape with --launcher slurm, or by default inside a Slurm job task."""
    chosen = request.launcher
    if chosen == "local" or (chosen is None and not slurm.detected(environ)):
        return None
    try:
        return slurm.cluster(environ)
    except slurm.SlurmError as e:
        raise LaunchError(str(e) + ("" if chosen else " (a Slurm job was detected; --launcher local ignores it)")) \
            from None


def _timestamp(now: Optional[datetime] = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def data_root_problem(data_root: Path) -> Optional[str]:
    """Why ``data_root`` cannot be a data root (None when it is a folder)."""
    make = "python -m bevkit.data.synthetic --out DIR"
    if data_root.is_dir():
        return None
    if data_root.exists():
        return (f"data root {data_root} is a file, not a folder: pass --data-root DIR, the folder that holds "
                f"v1.0-trainval/ and samples/")
    return (f"data root {data_root} does not exist: pass --data-root DIR (a nuScenes-format folder; a small "
            f"synthetic one is made with `{make}`)")


def work_dir_problem(work_dir: Path) -> Optional[str]:
    """Why run folders cannot be made under ``work_dir`` (None when they can, as far as permissions tell)."""
    existing = work_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is" if existing == work_dir else f"is inside {existing}, which is"
        return (f"--work-dir {work_dir} {what} a file, not a folder: pass a folder (each run gets a new folder "
                f"inside it)")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == work_dir else f"would be made in {existing}, which is"
        return (f"--work-dir {work_dir} {what} not writable (a read-only file system, or no permission for this "
                f"user): pass a folder you can write to (each run gets a new folder inside it)")
    return None


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
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
            candidate.mkdir()
        except FileExistsError:
            if not work_dir.is_dir():
                raise LaunchError(work_dir_problem(work_dir) or f"--work-dir {work_dir} is not a folder") from None
            continue
        except OSError as e:  # read-only file system, no permission (root passes the access check above)
            raise LaunchError(f"--work-dir {work_dir}: cannot create a run folder there ({e.strerror}): pass a "
                              f"folder you can write to") from None
        return candidate
    raise LaunchError(f"could not find a free run folder name under {work_dir}")


def plan(request: Request, machine: Machine, spec: Optional[ModelSpec] = None,
         run_dir: Optional[Path] = None) -> Plan:
    """Everything about a launch except side effects; raises LaunchError on bad input.

    ``run_dir``: the (already created) run folder; by default the name the next run would get.
    """
    spec = spec or load_spec(request.model, request.spec_ref)
    notes: List[str] = []
    warnings: List[str] = []

    def refuse(message: str) -> None:
        """A real launch stops here; a dry run shows the problem and goes on printing the command."""
        if not request.dry_run:
            raise LaunchError(message)
        warnings.append(message)

    # --- cluster shape: options, then Slurm (an srun step) or the environment (OpenMMLab style), then defaults
    environ = machine.environ
    shape = _slurm_shape(request, environ)
    if shape is not None:
        notes.extend(shape.notes)
    nproc = request.nproc if request.nproc is not None else DEFAULT_NPROC
    nnodes = _first(request.nnodes, shape and shape.nnodes, _int_env(environ, "NNODES"), 1)
    node_rank = _first(request.node_rank, shape and shape.node_rank, _int_env(environ, "NODE_RANK"), 0)
    if nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}")
    if nnodes < 1:
        raise LaunchError(f"--nnodes must be >= 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank must be in [0, {nnodes - 1}] for --nnodes {nnodes}, got {node_rank}")
    master_addr = request.master_addr or (shape and shape.master_addr) or environ.get("MASTER_ADDR") or None
    port = _first(request.master_port, shape and shape.master_port, _int_env(environ, "MASTER_PORT"))
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
            port = machine.free_port()
    if not 0 < port < 65536:
        raise LaunchError(f"--master-port must be in 1..65535, got {port}")

    device = request.device or machine.detect_device()
    if device not in DEVICES:
        raise LaunchError(f"--device must be one of {DEVICES}, got {device!r}")

    # --- data root: a missing one is refused before anything else
    data_root = request.data_root or (_abs(Path(environ["BEVKIT_DATA_ROOT"])) if environ.get("BEVKIT_DATA_ROOT")
                                      else REPO_ROOT / "data" / "nuscenes")
    problem = data_root_problem(data_root)
    if problem:
        raise LaunchError(problem)

    # --- paths and steps
    mode = request.mode
    work_dir = request.work_dir or REPO_ROOT / "runs" / spec.name / mode
    earlier: Optional[resume.Earlier] = None
    if request.resume is not None:
        if mode == "eval":
            raise LaunchError("--resume continues a training; to evaluate a checkpoint pass --checkpoint FILE")
        if request.checkpoint is not None:
            raise LaunchError("--resume continues a run with its own checkpoint; --checkpoint FILE starts a new "
                              "training from weights: pass one of them")
        if spec.checkpoint_format is None:
            raise LaunchError(f"model {spec.name} cannot resume: its spec has no checkpoint_format")
        earlier = resume.find(request.resume, spec, mode, work_dir)
        before = earlier.request  # the earlier run's schedule, unless given again
        if request.config is None and before.get("config"):
            request = replace(request, config=Path(before["config"]))
        if request.max_steps is None and before.get("max_steps") is not None:
            request = replace(request, max_steps=int(before["max_steps"]))
        if not request.extra and before.get("extra_args"):
            request = replace(request, extra=tuple(before["extra_args"]))
        notes.append(f"resuming {earlier.run_dir} from {earlier.checkpoint.name} (the earlier folder is only read)")
    config = request.config
    if config is None and spec.configs.get(mode):
        config = REPO_ROOT / spec.configs[mode]
    if config is not None and not config.is_file():
        refuse(f"config {config} does not exist (--config FILE)")
    checkpoint = request.checkpoint
    if checkpoint is not None and not checkpoint.is_file():
        refuse(f"checkpoint {checkpoint} does not exist (--checkpoint FILE)")
    max_steps = request.max_steps
    if max_steps is None and mode == "performance":
        max_steps = spec.performance_steps or DEFAULT_PERFORMANCE_STEPS
    if max_steps is not None and max_steps < 1:
        raise LaunchError(f"--max-steps must be >= 1, got {max_steps}")
    warmup = request.warmup_steps
    if warmup is not None and warmup < 0:
        raise LaunchError(f"--warmup-steps must be >= 0, got {warmup}")
    if warmup is None and environ.get("BEVKIT_WARMUP_STEPS", "").strip().isdigit():
        warmup = int(environ["BEVKIT_WARMUP_STEPS"])  # (anything else: the default rule)

    problem = work_dir_problem(work_dir)
    if problem:
        refuse(problem)
    if run_dir is None:
        run_dir = next_run_dir(work_dir, node_rank if nnodes > 1 else None, create=False)

    # --- upstream checkout
    checkout: Optional[Path] = None
    upstream_path: List[Path] = []
    if spec.upstream:
        checkout, upstream_path = machine.upstream_checkout(spec.upstream_name)
        if not checkout.is_dir():
            refuse(f"upstream {spec.upstream_name} is not checked out at {checkout}: run ./setup.sh "
                   f"(or tools/upstream materialize {spec.upstream_name}) first")
        else:
            problems = machine.upstream_problems(spec.upstream_name)
            if problems:
                refuse(f"upstream checkout {checkout} is not usable:\n  " + "\n  ".join(problems))

    launch_request = LaunchRequest(mode=mode, device=device, data_root=data_root, run_dir=run_dir,
                                   nproc_per_node=nproc, nnodes=nnodes, config=config, checkpoint=checkpoint,
                                   resume=earlier.checkpoint if earlier else None, max_steps=max_steps,
                                   extra_args=request.extra)
    checked = None
    if spec.checkpoint_format is not None and (checkpoint is not None or earlier is not None):
        checked = (earlier.checkpoint, "resume") if earlier else (checkpoint, "eval" if mode == "eval" else "init")
    try:
        entry = [str(a) for a in spec.build_entry(launch_request)]
        batch = spec.batch_per_device(launch_request)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise LaunchError(f"{spec.name} {mode}: {e}") from e
    if not entry:
        raise LaunchError(f"model spec {spec.name!r} returned an empty entry point")

    # --- environment
    # An emulated device (BEVKIT_EMULATE_DEVICE = --device, tests): CPU tensors stand in for the device's
    # (environment.build says what changes); the variable is passed on only then.
    run = RunDevice(device, emulated=environ.get("BEVKIT_EMULATE_DEVICE") == device != "cpu")
    contract = {"BEVKIT_RUN_DIR": str(run_dir), "BEVKIT_MODEL": spec.name, "BEVKIT_MODE": mode,
                "BEVKIT_DEVICE": device, "BEVKIT_DATA_ROOT": str(data_root),
                "BEVKIT_SAMPLES_PER_DEVICE": str(batch),
                "BEVKIT_MAX_STEPS": str(max_steps) if max_steps is not None else None,
                "BEVKIT_EMULATE_DEVICE": device if run.emulated else None,
                # the checkpoint the launcher checked: the training process compares it with the built model
                "BEVKIT_CHECKPOINT": str(checked[0]) if checked else None,
                "BEVKIT_TRUST_CHECKPOINT": "1" if request.trust_checkpoint or
                environ.get("BEVKIT_TRUST_CHECKPOINT") == "1" else None}
    env = environment.build(environ=environ, device=run, nproc=nproc, cores=machine.cores,
                            pythonpath=upstream_path, contract=contract, refuse=refuse, notes=notes,
                            source=machine.source,
                            defaults=spec.demo_env if "demo" in (mode, request.flow) else None)

    argv = [sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", f"--node_rank={node_rank}",
            f"--master_addr={master_addr}", f"--master_port={port}", "-m", WORKER] + entry
    cwd = checkout if checkout is not None and checkout.is_dir() else REPO_ROOT
    try:
        limits = op_limits.describe(env.env)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if device == "npu":
        notes.append(limits)
    notes.insert(0, f"{spec.name} {mode}: {nnodes} node(s) x {nproc} {device}{' (emulated)' if run.emulated else ''} "
                    f"process(es) ({run.dist_backend}), batch {batch}/device, global batch {batch * nproc * nnodes}")
    return Plan(spec=spec, request=launch_request, argv=argv, env=env.env, env_set=env.env_set,
                env_unset=env.env_unset, cwd=cwd, work_dir=work_dir, node_rank=node_rank, master_addr=master_addr,
                master_port=port, batch_per_device=batch, launch=request, launcher="slurm" if shape else "local",
                resumed_from=earlier, checked_checkpoint=checked, warmup_steps=warmup,
                cann_set_env=env.cann_set_env, env_files=env.env_files, notes=notes, warnings=warnings)
