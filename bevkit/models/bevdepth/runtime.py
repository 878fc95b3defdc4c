"""In-process side of the kit for BEVDepth: the shared runtime protocol (:mod:`bevkit.runtime`) for BEVDepth.

``activate(entry_file=None, device=None, disable=None)`` makes the upstream checkout importable, runs the
pre-import fixes, registers the NPU device (torch_npu) on NPU runs, applies the patch sets 'common' and
'bevdepth' for the run's device (``BEVKIT_DISABLE_PATCHES=a,b`` leaves named patches out).

``run_exp(argv)`` is the kit's entry for an upstream experiment file (``bevdepth/run.py EXP.py [args]``): it
takes the kit's own option (``--device``), activates the kit once, and runs the experiment as ``__main__`` with
the remaining arguments as its command line (``sys.argv``, as ``python EXP.py args`` would); the experiment's
``run_cli`` is then the kit's (:mod:`bevkit.models.bevdepth.cli`).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import runpy
import sys
from pathlib import Path
from typing import Optional, Sequence

from bevkit.device import DEVICES, RunDevice
from bevkit.runtime import ModelRuntime
from bevkit.upstream import checkout_dir

__all__ = ["activate", "deactivate", "run_exp", "RUNTIME"]


def upstream_checkout() -> Path:
    """The BEVDepth checkout to import: BEVDEPTH_SRC when it is a checkout, else upstream/BEVDepth."""
    import os

    src = os.environ.get("BEVDEPTH_SRC")
    if src and (Path(src) / "bevdepth" / "exps").is_dir():
        return Path(src).resolve()
    return checkout_dir("BEVDepth")


def ensure_upstream_importable() -> Path:
    """Make ``import bevdepth.exps`` resolve to the upstream checkout.

    Upstream ``bevdepth`` is a namespace package (no ``__init__.py``), so any ``bevdepth/`` folder on
    sys.path (like this kit's own ``bevdepth/`` model folder) joins it; that is harmless as long as the
    kit's folder holds none of upstream's subpackage names (test_bevdepth_layout checks this).
    """
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


class BEVDepthRuntime(ModelRuntime):
    def prepare(self, device: RunDevice, entry_file: Optional[str]) -> None:
        ensure_upstream_importable()
        from bevkit import compat

        compat.prepare_imports()
        if device.kind == "npu":
            import torch_npu  # noqa: F401  (registers the 'npu' device before any model code runs)

            import torch

            torch.npu.config.allow_internal_format = False  # upstream NPU port: private formats break DDP
        with compat.mmcv_version_as("1.7.0"):  # PyPI mmdet3d 1.0.0rc4 asserts mmcv <= 1.7.0
            import mmdet3d  # noqa: F401


RUNTIME = BEVDepthRuntime("bevdepth")
activate = RUNTIME.activate
deactivate = RUNTIME.deactivate


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
    kit = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    kit.add_argument("--device", choices=DEVICES, default=None,
                     help="device type (default: $BEVKIT_DEVICE or the best available)")
    own, rest = kit.parse_known_args(argv[1:])
    activate(device=own.device)
    exp = _exp_path(argv[0])
    sys.argv = [str(exp), *rest]  # the experiment's command line, as `python EXP.py args` would have it
    runpy.run_path(str(exp), run_name="__main__")
    return 0
