"""In-process side of the kit for FB-OCC: called first thing by the patched ``tools/train.py`` / ``tools/test.py``.

``activate(__file__)`` (the two lines fbocc.patch adds to each entry point):

1. decides the run's device (``BEVKIT_DEVICE``, else the best available: npu > cuda > cpu);
2. makes the upstream repository root importable (upstream's ``dist_train.sh`` sets PYTHONPATH to it);
3. runs the pre-import fixes (:func:`bevkit.compat.prepare_imports`: torchvision on CPU torch; a placeholder
   for the CUDA-only ``bev_pool_v2_ext`` when it was not built, since the kit routes bev_pool_v2 through
   ``bevkit.ops``);
4. applies the patch sets 'common' and 'fbocc' for that device (``BEVKIT_DISABLE_PATCHES=a,b`` leaves named
   patches out, for A/B measurements) and registers the bevkit timing hook (it is added to the config by the
   'fbocc-config-finalize' patch).

Nothing here runs at import time.
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Dict, List, Optional

from bevkit.device import DEVICES, DIST_BACKEND, default_device, emulated_device

_state: Dict[str, object] = {"device": None, "applied": None, "upstream_root": None}


def run_device() -> str:
    """The device type this run targets: 'npu', 'cuda' or 'cpu'."""
    if _state["device"] is not None:
        return str(_state["device"])
    kind = os.environ.get("BEVKIT_DEVICE") or emulated_device() or default_device()
    if kind not in DEVICES:
        raise ValueError(f"BEVKIT_DEVICE={kind!r} is not one of {', '.join(DEVICES)}")
    return kind


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def tensor_device():
    """torch.device where this process puts the model and batches (CPU when the device is emulated)."""
    import torch

    kind = run_device()
    if kind == "cpu" or emulated_device() == kind:
        return torch.device("cpu")
    return torch.device(kind, local_rank())


def dist_backend() -> str:
    """Collective backend for the run's device; emulated devices use gloo on CPU tensors."""
    kind = run_device()
    if emulated_device() == kind:
        return "gloo"
    return DIST_BACKEND[kind]


def collective_device():
    """Device of tensors handed to torch.distributed collectives (gloo needs CPU tensors)."""
    import torch
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else dist_backend()
    if str(backend) == "gloo":
        return torch.device("cpu")
    return tensor_device()


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _stub_bev_pool_ext() -> None:
    """Register a placeholder for the CUDA-only extension when it was not built (CPU/NPU installs).

    ``mmdet3d/ops/bev_pool_v2/bev_pool.py`` imports it at module level; the kit never calls it (the
    'fbocc-bev-pool-v2' patch routes pooling through bevkit.ops), so a placeholder that explains itself is
    enough for the import.
    """
    name = "mmdet3d.ops.bev_pool_v2.bev_pool_v2_ext"
    if name in sys.modules:
        return
    import importlib.util

    try:
        if importlib.util.find_spec(name) is not None:
            return
    except (ImportError, ValueError):
        pass
    if run_device() == "cuda" and emulated_device() != "cuda":
        # bevkit.ops uses the compiled kernel on CUDA: a placeholder would only fail later, inside the model.
        raise RuntimeError("FB-BEV's CUDA extension mmdet3d.ops.bev_pool_v2.bev_pool_v2_ext is not built: run "
                           "setup.sh on this machine (it builds it with CUDA), or 'cd upstream/FB-BEV && pip "
                           "install --no-build-isolation --no-deps -e .'")
    stub = types.ModuleType(name)

    def _missing(*_args, **_kwargs):
        raise RuntimeError("bev_pool_v2_ext (FB-BEV's CUDA extension) is not built in this install; the kit "
                           "routes bev_pool_v2 through bevkit.ops (patch 'fbocc-bev-pool-v2').")

    stub.bev_pool_v2_forward = _missing
    stub.bev_pool_v2_backward = _missing
    stub.__bevkit_placeholder__ = True
    sys.modules[name] = stub


def upstream_root_from(entry_file: Optional[str]) -> Optional[Path]:
    if entry_file is None:
        return None
    root = Path(entry_file).resolve().parent.parent  # <root>/tools/train.py
    return root if (root / "mmdet3d").is_dir() else None


def activate(entry_file: Optional[str] = None, device: Optional[str] = None,
             disable: Optional[List[str]] = None) -> Dict[str, List[str]]:
    """Prepare this process for FB-OCC on ``device``; returns the applied patch names per set."""
    if _state["applied"] is not None:
        return _state["applied"]  # type: ignore[return-value]
    kind = device or run_device()
    if kind not in DEVICES:
        raise ValueError(f"device {kind!r} is not one of {', '.join(DEVICES)}")
    _state["device"] = kind
    os.environ["BEVKIT_DEVICE"] = kind

    root = upstream_root_from(entry_file)
    if root is not None:
        _state["upstream_root"] = root
        os.environ.setdefault("FBBEV_ROOT", str(root))
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))  # tools/ and deployment/ are imported from the repo root

    from bevkit import compat
    from bevkit.patching import load_patch_set

    compat.prepare_imports()
    _stub_bev_pool_ext()

    if disable is None:
        disable = [n for n in os.environ.get("BEVKIT_DISABLE_PATCHES", "").split(",") if n]
    applied: Dict[str, List[str]] = {}
    for set_name in ("common", "fbocc"):
        patch_set = load_patch_set(set_name)
        names = {p.name for p in patch_set.patches}
        applied[set_name] = patch_set.apply(kind, disable=[n for n in disable if n in names])
    unknown = set(disable) - {n for s in ("common", "fbocc") for n in
                              (p.name for p in load_patch_set(s).patches)}
    if unknown:
        raise ValueError(f"BEVKIT_DISABLE_PATCHES names unknown patches: {sorted(unknown)}")

    import bevkit.timing.mmcv_hook  # noqa: F401  (registers BevkitTimingHook with mmcv's HOOKS)

    if kind == "npu" and emulated_device() != "npu":
        import torch

        # Private NPU tensor formats break FB-OCC's reshapes of 5-D tensors (the DrivingSDK recipe turns them off).
        torch.npu.config.allow_internal_format = False  # type: ignore[attr-defined]

    _state["applied"] = applied
    return applied


def deactivate() -> None:
    """Undo every patch (tests compare patched and unpatched code in one process)."""
    from bevkit.patching import load_patch_set

    for set_name in ("fbocc", "common"):
        load_patch_set(set_name).undo()
    _state["applied"] = None
    _state["device"] = None
