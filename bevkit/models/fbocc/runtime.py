"""In-process side of the kit for FB-OCC: the shared runtime protocol (:mod:`bevkit.runtime`) for FB-BEV.

The patched ``tools/train.py`` / ``tools/test.py`` call, first thing, ``activate(__file__)``:

1. the run's device is resolved once (``BEVKIT_DEVICE`` from the launcher, else detected);
2. the upstream repository root (found from the entry script) becomes importable, as upstream's
   ``dist_train.sh`` does with PYTHONPATH; the pre-import fixes run (:func:`bevkit.compat.prepare_imports`;
   a placeholder for the CUDA-only ``bev_pool_v2_ext`` when it was not built, since the kit routes bev_pool_v2
   through ``bevkit.ops``);
3. the patch sets 'common' and 'fbocc' are applied for that device (``BEVKIT_DISABLE_PATCHES=a,b`` leaves named
   patches out);
4. the bevkit timing hook is registered with mmcv.

and, right after ``--cfg-options`` are merged, ``finalize_config(cfg)`` (:func:`.config.finalize`): data paths
follow ``data_root``, per-device settings, the timing hook in ``custom_hooks``.
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Optional

from bevkit.device import RunDevice
from bevkit.models.fbocc.config import finalize as finalize_config
from bevkit.runtime import ModelRuntime

__all__ = ["activate", "deactivate", "finalize_config", "RUNTIME"]

BEV_POOL_EXT = "mmdet3d.ops.bev_pool_v2.bev_pool_v2_ext"


def _stub_bev_pool_ext(device: RunDevice) -> None:
    """Register a placeholder for the CUDA-only extension when it was not built (CPU/NPU installs).

    ``mmdet3d/ops/bev_pool_v2/bev_pool.py`` imports it at module level; the kit never calls it (the
    'fbocc-bev-pool-v2' patch routes pooling through bevkit.ops), so a placeholder that explains itself is
    enough for the import.
    """
    if BEV_POOL_EXT in sys.modules:
        return
    import importlib.util

    try:
        if importlib.util.find_spec(BEV_POOL_EXT) is not None:
            return
    except (ImportError, ValueError):
        pass
    if device.memory == "cuda":
        # bevkit.ops uses the compiled kernel on CUDA: a placeholder would only fail later, inside the model.
        raise RuntimeError("FB-BEV's CUDA extension mmdet3d.ops.bev_pool_v2.bev_pool_v2_ext is not built: run "
                           "setup.sh on this machine (it builds it with CUDA), or 'cd upstream/FB-BEV && pip "
                           "install --no-build-isolation --no-deps -e .'")
    stub = types.ModuleType(BEV_POOL_EXT)

    def _missing(*_args, **_kwargs):
        raise RuntimeError("bev_pool_v2_ext (FB-BEV's CUDA extension) is not built in this install; the kit "
                           "routes bev_pool_v2 through bevkit.ops (patch 'fbocc-bev-pool-v2').")

    stub.bev_pool_v2_forward = _missing
    stub.bev_pool_v2_backward = _missing
    stub.__bevkit_placeholder__ = True
    sys.modules[BEV_POOL_EXT] = stub


def upstream_root_from(entry_file: Optional[str]) -> Optional[Path]:
    if entry_file is None:
        return None
    root = Path(entry_file).resolve().parent.parent  # <root>/tools/train.py
    return root if (root / "mmdet3d").is_dir() else None


class FBOCCRuntime(ModelRuntime):
    def prepare(self, device: RunDevice, entry_file: Optional[str]) -> None:
        root = upstream_root_from(entry_file)
        if root is not None:
            os.environ.setdefault("FBBEV_ROOT", str(root))  # the kit's configs inherit from this checkout
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))  # tools/ and deployment/ are imported from the repo root
        from bevkit import compat

        compat.prepare_imports()
        # FB-BEV imports spconv.pytorch unconditionally; the npu profile has no spconv: mx_driving stands in
        # (a no-op where the real spconv imports; one clear ImportError where neither does)
        from bevkit.ops.sparse import install_spconv_shim

        install_spconv_shim()
        _stub_bev_pool_ext(device)

    def finish(self, device: RunDevice) -> None:
        import bevkit.models.fbocc.resume  # noqa: F401  (registers BevkitResumeHook with mmcv's HOOKS)
        import bevkit.timing.mmcv_hook  # noqa: F401  (registers BevkitTimingHook with mmcv's HOOKS)

        if device.memory == "npu":
            import torch

            # Private NPU tensor formats break FB-OCC's reshapes of 5-D tensors (the DrivingSDK recipe turns
            # them off).
            torch.npu.config.allow_internal_format = False  # type: ignore[attr-defined]


RUNTIME = FBOCCRuntime("fbocc")
activate = RUNTIME.activate
deactivate = RUNTIME.deactivate
