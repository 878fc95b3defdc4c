"""Bring BEVDepth up inside a process: upstream on sys.path, shared fixes, the 'bevdepth' runtime patches.

``activate(device)`` is all an entry point needs; ``run_exp(argv)`` is the kit's entry for an upstream
experiment file (``bevdepth/run.py EXP.py [args]``): it activates the kit, then runs the experiment as
``__main__``; the experiment's ``run_cli`` is the kit's (:mod:`bevkit.models.bevdepth.cli`).
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from bevkit import REPO_ROOT

_ACTIVE: dict = {}
#: argv of the experiment (after the exp path), read by the kit's run_cli
EXP_ARGV: List[str] = []


def upstream_checkout() -> Path:
    """The BEVDepth checkout to import: BEVDEPTH_SRC when it is a checkout, else upstream/BEVDepth."""
    src = os.environ.get("BEVDEPTH_SRC")
    if src and (Path(src) / "bevdepth" / "exps").is_dir():
        return Path(src).resolve()
    try:
        from bevkit.upstream import checkout_dir

        return checkout_dir("BEVDepth")
    except ImportError:  # pragma: no cover - registry not present
        return REPO_ROOT / "upstream" / "BEVDepth"


def ensure_upstream_importable() -> Path:
    """Make ``import bevdepth.exps`` resolve to the upstream checkout.

    Upstream ``bevdepth`` is a namespace package (no ``__init__.py``), so any ``bevdepth/`` folder on
    sys.path (like this kit's own ``bevdepth/`` model folder) joins it; that is harmless as long as the
    kit's folder holds none of upstream's subpackage names (test_bevdepth_layout checks this).
    """
    import importlib
    import importlib.util

    try:
        spec = importlib.util.find_spec("bevdepth.exps")
    except ModuleNotFoundError:  # no `bevdepth` on sys.path at all
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).parent.parent
    checkout = upstream_checkout()
    if not (checkout / "bevdepth" / "exps").is_dir():
        raise ModuleNotFoundError(
            f"BEVDepth source not found at {checkout}: run setup.sh (or set BEVDEPTH_SRC to a BEVDepth "
            f"checkout at the pinned commit and rerun setup.sh)")
    sys.path.insert(0, str(checkout))
    sys.modules.pop("bevdepth", None)  # drop a namespace package built from other path entries
    importlib.invalidate_caches()
    return checkout


def resolve_device(device: Optional[str] = None) -> str:
    from bevkit.device import DEVICES, default_device

    device = device or os.environ.get("BEVKIT_DEVICE") or default_device()
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    return device


def activate(device: Optional[str] = None) -> str:
    """Apply the shared and BEVDepth runtime patches for ``device`` (idempotent); returns the device."""
    device = resolve_device(device)
    if _ACTIVE:
        if _ACTIVE["device"] != device:
            raise RuntimeError(f"bevdepth runtime already active for {_ACTIVE['device']}, not {device}")
        return device
    os.environ["BEVKIT_DEVICE"] = device
    ensure_upstream_importable()
    from bevkit import compat

    compat.prepare_imports()
    if device == "npu":
        import torch_npu  # noqa: F401  (registers the 'npu' device before any model code runs)

        import torch

        torch.npu.config.allow_internal_format = False  # upstream NPU port: private formats break DDP
    with compat.mmcv_version_as("1.7.0"):  # PyPI mmdet3d 1.0.0rc4 asserts mmcv <= 1.7.0
        import mmdet3d  # noqa: F401
    common = compat.PATCHES
    owns_common = not common.applied  # FB-OCC's runtime may have applied the shared set in this process
    if owns_common:
        common.apply(device)
    from .patches import PATCHES

    PATCHES.apply(device)
    _ACTIVE.update(device=device, owns_common=owns_common)
    return device


def deactivate() -> None:
    """Undo what :func:`activate` applied (tests): the BEVDepth patches, and the shared set if it applied it."""
    from .patches import PATCHES

    PATCHES.undo()
    if _ACTIVE.get("owns_common"):
        from bevkit import compat

        compat.PATCHES.undo()
    _ACTIVE.clear()


def _exp_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path.resolve()
    candidate = upstream_checkout() / name
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"experiment file {name!r} not found (relative paths are tried from the current "
                            f"folder and from the BEVDepth checkout {upstream_checkout()})")


def run_exp(argv: Sequence[str]) -> int:
    """``bevdepth/run.py EXP.py [--device D] [upstream/Lightning args...]``."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: bevdepth/run.py EXP.py [--device {npu,cuda,cpu}] [-e --ckpt_path CKPT] [-b N] ...")
        return 0 if argv else 2
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default=None)
    known, _ = pre.parse_known_args(argv[1:])
    activate(known.device)
    exp = _exp_path(argv[0])
    EXP_ARGV[:] = list(argv[1:])
    runpy.run_path(str(exp), run_name="__main__")
    return 0
