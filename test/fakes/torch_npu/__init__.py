"""A fake ``torch_npu`` for tests on machines without Ascend hardware (never install it).

It provides the slice of torch_npu's device API the kit uses: ``torch.npu`` (is_available, device_count,
set_device, current_device, get_device_name, synchronize, memory_stats, empty_cache,
config.allow_internal_format, amp.GradScaler), ``torch_npu.npu`` (the same module) and
``torch_npu.optim.NpuFusedAdamW`` (with the real one's constraints, see optim.py). Calls are
recorded in :data:`CALLS` so tests can assert what the kit asked for. Tensors stay on the CPU: pair it
with ``bevkit.device.emulate_device('npu')``.

Put ``test/fakes`` first on sys.path (the ``fake_npu`` fixture in test/test_bevdepth_npu.py does) and
remove ``torch.npu`` afterwards.
"""
from __future__ import annotations

import os
import types
from typing import Any, List, Tuple

import torch

from bevkit.torchcompat import cpu_grad_scaler_class

FAKE = True
CALLS: List[Tuple[str, Any]] = []


def _device_count() -> int:
    return int(os.environ.get("FAKE_NPU_COUNT", "8"))


#: SoC name the fake reports (torch_npu.npu.get_device_name): an Atlas 800T A2 by default. mx_driving gates some
#: kernels on it (mx_driving/ops/grid_sampler3d_v1.py, mx_driving/ops/sigmoid_focal_loss.py, 26.1.0).
DEFAULT_SOC = "Ascend910B1"


def _device_name(device=None) -> str:
    return os.environ.get("FAKE_NPU_SOC", DEFAULT_SOC)


class _Config:
    allow_internal_format = True


class GradScaler(cpu_grad_scaler_class()):
    """Stands in for torch_npu.npu.amp.GradScaler (scales on the CPU where the torch can: bevkit.torchcompat)."""

    def __init__(self, *args, **kwargs):
        CALLS.append(("GradScaler", kwargs))
        super().__init__(*args, **kwargs)


def _set_device(device) -> None:
    CALLS.append(("set_device", device))
    npu.current = torch.device(device).index if not isinstance(device, int) else device


npu = types.ModuleType("torch_npu.npu")
npu.current = 0
npu.is_available = lambda: True
npu.device_count = _device_count
npu.set_device = _set_device
npu.current_device = lambda: npu.current
npu.synchronize = lambda *a: CALLS.append(("synchronize", a))
npu.get_device_name = _device_name
npu.memory_stats = lambda device=None: {"allocated_bytes.all.current": 0}
npu.empty_cache = lambda: CALLS.append(("empty_cache", None))
npu.config = _Config()
npu.amp = types.SimpleNamespace(GradScaler=GradScaler)


from . import optim  # noqa: E402  (torch_npu.optim.NpuFusedAdamW)
from .optim import NpuFusedAdamW  # noqa: E402,F401

npu.get_amp_supported_dtype = lambda: [torch.float16, torch.bfloat16]
# The autocast state functions of torch_npu/npu/autocast_utils.py (Ascend/pytorch; default dtype float16 per the
# torch_npu.npu.get_autocast_dtype doc page). torch 2.1's torch.autocast asserts the backend module has all five.
_AUTOCAST = {"enabled": False, "dtype": torch.float16}
npu.is_autocast_enabled = lambda: _AUTOCAST["enabled"]
npu.set_autocast_enabled = lambda enable: _AUTOCAST.update(enabled=bool(enable))
npu.get_autocast_dtype = lambda: _AUTOCAST["dtype"]
npu.set_autocast_dtype = lambda dtype: _AUTOCAST.update(dtype=dtype)


def _register() -> None:
    """What the real torch_npu does on import: name the PrivateUse1 backend 'npu' and expose torch.npu."""
    try:
        torch.utils.rename_privateuse1_backend("npu")
    except RuntimeError:  # already renamed (e.g. an earlier import of this fake in the same process)
        pass
    try:
        torch._register_device_module("npu", npu)
    except RuntimeError:  # registered before: just expose it again
        pass
    torch.npu = npu


_register()
