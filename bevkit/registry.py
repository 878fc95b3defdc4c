"""The registry of models: one line per model in :data:`MODELS`, and what a model contributes, as data.

A model is one package ``bevkit/models/<name>/`` whose ``SPEC`` (:class:`ModelSpec`) says everything the shared
modules need: its upstream (:class:`Upstream`), launch entry and batch (for a :class:`LaunchRequest`), runtime
patch set, data checks, metrics, reference results, checkpoints. Every shared module (launcher, upstream
checkouts, patch registry, data validator, doctor, results, report) iterates over :func:`all_specs`; nothing
else lists the models. No torch, no upstream code, no other kit module here.

The launcher -> training process contract (environment variables) is :mod:`bevkit.env`.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from bevkit import REPO_ROOT

MODES = ("full", "performance", "eval", "smoke", "demo")


@dataclass(frozen=True)
class Upstream:
    """One upstream repository the kit runs, pinned (defined by the model that runs it)."""

    name: str                      # registry key and checkout folder name
    model: str                     # kit model using it ('fbocc' / 'bevdepth')
    url: str                       # default source (git clone)
    commit: str                    # pinned commit
    tree: str                      # that commit's tree id: verifies a source archive without history
    patches: Tuple[str, ...] = ()  # patch files (relative to patch_root), applied in this order
    src_env: str = ""              # environment variable naming a local source
    src_option: str = ""           # setup.sh option naming a local source
    #: entries (relative to the checkout) the launcher puts first on PYTHONPATH; the upstreams are not
    #: pip-installed: FB-BEV vendors its own mmdet3d, which must shadow the PyPI one BEVDepth uses.
    pythonpath: Tuple[str, ...] = (".",)
    #: profiles on which the upstream's own CUDA extensions are built in place (elsewhere the kit's ops
    #: replace them, and its setup.py cannot build without CUDA).
    build_profiles: Tuple[str, ...] = ("cuda",)
    build_command: Tuple[str, ...] = ("setup.py", "build_ext", "--inplace")
    patch_root: Path = field(default=REPO_ROOT, compare=False)


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
    checkpoint: Optional[Path] = None      # eval: the weights to evaluate; training: the weights to start from
    resume: Optional[Path] = None          # training: the checkpoint to continue from (counters, optimizer, ...)
    max_steps: Optional[int] = None        # performance: stop after this many steps
    extra_args: Tuple[str, ...] = ()       # everything after '--' on the script's command line

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass(frozen=True)
class CheckpointFormat:
    """What a model's checkpoints look like: the knowledge :mod:`bevkit.checkpoint_check` needs to tell a
    model's checkpoint from another's, to find the newest resumable one in a run folder, and which keys may
    differ from the built model (data only; no torch)."""

    title: str                     # how messages name the model ('FB-OCC')
    framework: str                 # container its training writes: 'mmcv' (meta, state_dict, optimizer) or 'lightning'
    #: top-level modules of the state dict that every full checkpoint of the model has (after key_prefix)
    modules: Tuple[str, ...]
    optional_modules: Tuple[str, ...] = ()   # modules only some configs have
    key_prefix: str = ""           # Lightning: the LightningModule attribute that holds the model ('model.')
    #: fnmatch patterns of keys that may be missing from / extra in a checkpoint (the documented allow-list)
    allow_missing: Tuple[str, ...] = ("*.num_batches_tracked",)
    allow_unexpected: Tuple[str, ...] = ()
    #: run folder -> its newest resumable checkpoint (None: it wrote none)
    latest: Optional[Callable[[Path], Optional[Path]]] = None
    files: str = ""                # what its checkpoints are called, for messages ('iter_N.pth of an FB-OCC run')


@dataclass(frozen=True)
class ModelSpec:
    """Everything the shared modules know about one model. References to code are 'module' or
    'module:attr' strings, imported when used (they may import torch and upstream code)."""

    name: str                 # 'fbocc' / 'bevdepth' (also the validator's --model)
    display_name: str         # 'FBOCC' / 'BEVDepth': Ascend-style log names
    #: the pinned upstream this model runs (bevkit.upstream's registry is built from the specs), or the
    #: name of one ('' for a model without an upstream checkout)
    upstream: Union[str, Upstream]
    samples_per_device: int   # batch per device of the reference recipe
    #: LaunchRequest -> argv run by torchrun on every rank (script path first; relative to the upstream checkout
    #: or absolute), e.g. ['tools/train.py', CONFIG, '--launcher', 'pytorch', ...]
    build_entry: Callable[[LaunchRequest], List[str]]
    #: mode -> default config path relative to the repository root (e.g. 'fbocc/configs/fbocc_r50_8p.py')
    configs: Dict[str, str] = field(default_factory=dict)
    #: LaunchRequest -> samples per device the entry point will use (from the request: mode, options)
    samples_per_device_for: Optional[Callable[[LaunchRequest], int]] = None
    #: smoke and demo runs: data preparation as (module, options...), run as ``python -m module DATA_ROOT options...``
    smoke_prepare: Tuple[str, ...] = ()
    #: smoke and demo runs: checkpoint file in the training run folder to evaluate afterwards with mode 'eval'
    #: (None: the training evaluates by itself)
    smoke_eval_checkpoint: Optional[str] = None
    #: steps a performance run trains for (None: bevkit.launch.DEFAULT_PERFORMANCE_STEPS)
    performance_steps: Optional[int] = None
    #: 'module:attr' of the model's runtime PatchSet (bevkit.patching lists it)
    patch_set: str = ""
    #: module whose ``check(root, tables, full, report)`` validates the model's files in a data root, with
    #: ``PREPARE_HINT``, ``MIN_SAMPLES_PER_SCENE`` and ``NEEDS_TEST_TABLES`` (bevkit.data.validate)
    data_checks: str = ""
    #: metrics.json key -> (display name, factor to the unit of the reference tables), in display order
    metrics: Dict[str, Tuple[str, float]] = field(default_factory=dict)
    #: reference data beside the model's README (relative to the repository root): published 'results' (rows)
    #: and accuracy 'gates' (bevkit.gate)
    references: str = ""
    #: module drawing the pictures of predictions: ``render(sample, out_dir, options) -> [png paths]`` for one
    #: ``predictions/<token>.npz`` its evaluation patch dumped (bevkit.visualize)
    pictures: str = ""
    #: demo runs: options of ``python -m bevkit.data.synthetic`` for the data a demo generates when no --data-root
    #: is given (its folder is named after them, so data of other options is never reused)
    demo_data: Tuple[str, ...] = ()
    #: demo runs (the training and its evaluation): environment defaults of the training processes; a variable
    #: already in the user's environment wins (as with configs/env files)
    demo_env: Dict[str, str] = field(default_factory=dict)
    #: pretrained checkpoints the reference recipe loads: (bevkit.checkpoints.Checkpoint, what it is used as)
    checkpoints: Tuple[Tuple[Any, str], ...] = ()
    #: what the model's own checkpoints look like (checks before eval / resume / --checkpoint; None: unchecked)
    checkpoint_format: Optional[CheckpointFormat] = None

    @property
    def upstream_name(self) -> str:
        return self.upstream if isinstance(self.upstream, str) else self.upstream.name

    def batch_per_device(self, request: LaunchRequest) -> int:
        if self.samples_per_device_for is not None:
            return self.samples_per_device_for(request)
        return self.samples_per_device

    def data_module(self):
        """The module of :attr:`data_checks`."""
        return importlib.import_module(self.data_checks)

    def _reference_data(self) -> Dict[str, Any]:
        if not self.references:
            return {}
        data = json.loads((REPO_ROOT / self.references).read_text(encoding="utf-8"))
        return {"results": data} if isinstance(data, list) else data

    def reference_rows(self) -> List[Dict[str, Any]]:
        """The published results of :attr:`references` ('results', each with 'model' filled in)."""
        return [dict(row, model=self.name) for row in self._reference_data().get("results", [])]

    def gates(self) -> Dict[str, Dict[str, Any]]:
        """The accuracy gates of :attr:`references` ('gates': 'reference' for the reference recipe, 'demo' for
        the demo), read by :mod:`bevkit.gate`."""
        return dict(self._reference_data().get("gates") or {})


#: model name -> package that defines ``SPEC``. Imported lazily: a spec module imports nothing heavy, but
#: the registry stays importable even while one model is broken.
MODELS: Dict[str, str] = {
    "fbocc": "bevkit.models.fbocc",
    "bevdepth": "bevkit.models.bevdepth",
}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return importlib.import_module(MODELS[name]).SPEC


def all_specs() -> List[ModelSpec]:
    """Every registered model's spec, in registry order."""
    return [get_spec(name) for name in MODELS]
