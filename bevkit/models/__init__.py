"""What the shared launcher needs to know about each model, and nothing more.

A model contributes a :class:`ModelSpec` (in ``bevkit/models/<name>/__init__.py``): its upstream, its
batch per device, and how to turn a :class:`LaunchRequest` into the argv of the upstream entry point
that torchrun runs on every rank. Everything else (torchrun, environment, run folders, results) is the
launcher's (``bevkit.launch``).

Contract between the launcher and the processes it starts (environment variables):

- ``BEVKIT_RUN_DIR``: the run folder; rank 0 writes ``steps.jsonl`` (``bevkit.timing``) and evaluation
  writes ``metrics.json`` (``bevkit.results.write_metrics``) there.
- ``BEVKIT_MODEL``, ``BEVKIT_MODE`` (full / performance / eval / smoke), ``BEVKIT_DEVICE`` (npu/cuda/cpu).
- ``BEVKIT_MAX_STEPS``: when set, training stops after that many optimizer steps (performance runs).
- ``BEVKIT_SAMPLES_PER_DEVICE``: batch per device, for samples-per-step accounting.
- ``BEVKIT_DATA_ROOT``: the nuScenes-format data root (also read by the launcher as a default).
- ``BEVKIT_WARMUP_STEPS``: steps excluded from the steady-state statistics (default: the first 10%).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

MODES = ("full", "performance", "eval", "smoke")


@dataclass(frozen=True)
class LaunchRequest:
    """One launch, as the model spec sees it (all paths absolute)."""

    mode: str
    device: str
    data_root: Path
    run_dir: Path
    nproc_per_node: int
    nnodes: int
    config: Optional[Path] = None          # model config (FB-OCC mmcv config; BEVDepth exp variant)
    checkpoint: Optional[Path] = None      # eval: the weights to evaluate
    max_steps: Optional[int] = None        # performance: stop after this many steps
    extra_args: Tuple[str, ...] = ()       # everything after '--' on the script's command line

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass(frozen=True)
class ModelSpec:
    name: str                 # 'fbocc' / 'bevdepth' (also the validator's --model)
    display_name: str         # 'FBOCC' / 'BEVDepth': Ascend-style log names
    upstream: str             # key in bevkit.upstream's registry
    samples_per_device: int   # default batch per device of the reference recipe
    #: LaunchRequest -> argv run by torchrun on every rank (script path first; relative to the upstream checkout
    #: or absolute), e.g. ['tools/train.py', CONFIG, '--launcher', 'pytorch', ...]
    build_entry: Callable[[LaunchRequest], List[str]]
    #: mode -> default config path relative to the repository root (e.g. 'fbocc/configs/fbocc_r50_8p.py')
    configs: Dict[str, str] = field(default_factory=dict)
    #: LaunchRequest -> samples per device actually used (configs may override the reference batch)
    samples_per_device_for: Optional[Callable[[LaunchRequest], int]] = None
    #: smoke runs: data preparation as (module, options...), run as ``python -m module DATA_ROOT options...``
    smoke_prepare: Tuple[str, ...] = ()
    #: smoke runs: checkpoint file in the training run folder to evaluate afterwards with mode 'eval'
    #: (None: the smoke training evaluates by itself)
    smoke_eval_checkpoint: Optional[str] = None
    #: steps a performance run trains for (None: the launcher's default, 600 like the FB-OCC reference)
    performance_steps: Optional[int] = None

    def batch_per_device(self, request: LaunchRequest) -> int:
        if self.samples_per_device_for is not None:
            return self.samples_per_device_for(request)
        return self.samples_per_device


#: model name -> module that defines ``SPEC``. Imported lazily: specs may import heavy things.
MODELS: Dict[str, str] = {
    "fbocc": "bevkit.models.fbocc",
    "bevdepth": "bevkit.models.bevdepth",
}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return importlib.import_module(MODELS[name]).SPEC
