"""A fake ``torch_npu`` for tests on machines without Ascend hardware (never install it).

It provides the slice of torch_npu's device API the kit uses: ``torch.npu`` (is_available, device_count,
set_device, current_device, get_device_name, synchronize, memory_stats, empty_cache,
config.allow_internal_format, amp.GradScaler, amp.autocast; ``from torch.npu.amp import autocast`` works, as mmcv
does it on NPU), ``torch_npu.npu`` (the same module) and
``torch_npu.optim.NpuFusedAdamW`` (with the real one's constraints, see optim.py). Calls are
recorded in :data:`CALLS` so tests can assert what the kit asked for. Tensors stay on the CPU: pair it
with ``bevkit.device.emulate_device('npu')``.

Put ``test/fakes`` first on sys.path (the ``fake_npu`` fixture in test/test_bevdepth_npu.py does) and
remove ``torch.npu`` afterwards.
"""
from __future__ import annotations

import os
import sys
import types
from typing import Any, List, Tuple

import torch

from bevkit.emulation import EmulatedAutocast
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


class autocast(EmulatedAutocast):
    """Stands in for torch_npu.npu.amp.autocast (``torch_npu/npu/amp/autocast_mode.py``: ``torch.autocast('npu')``
    with ``enabled=True, dtype=torch.float16, cache_enabled=True`` defaults); CPU tensors stand in for NPU ones, so
    it is CPU autocast in the same dtype with the NPU's op rules (bevkit.emulation)."""

    def __init__(self, enabled: bool = True, dtype: torch.dtype = torch.float16, cache_enabled: bool = True):
        CALLS.append(("autocast", dict(enabled=enabled, dtype=str(dtype))))
        super().__init__(enabled=enabled, dtype=dtype, cache_enabled=cache_enabled)


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
amp = types.ModuleType("torch_npu.npu.amp")
amp.GradScaler = GradScaler
amp.autocast = autocast
npu.amp = amp


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
# torch.manual_seed seeds every registered device module that has these (torch_npu/npu/random.py)
npu.manual_seed = npu.manual_seed_all = lambda seed: CALLS.append(("manual_seed", seed))
npu._is_in_bad_fork = lambda: False

_HOOKS = []  # keeps the registered hooks object alive


def _register_hooks() -> None:
    """torch_npu registers its PrivateUse1 hooks with torch (C++ ``NPUHooksInterface``); torch >= 2.5 asks them
    which accelerator the machine has (``torch._C._get_accelerator``, e.g. in ``dist.barrier``). The fake registers
    Python ones answering as an available device."""
    acc = getattr(torch._C, "_acc", None)
    if acc is None or not hasattr(acc, "register_python_privateuseone_hook") or _HOOKS:
        return

    class Hooks(acc.PrivateUse1Hooks):
        def is_available(self) -> bool:
            return True

        def has_primary_context(self, dev_id) -> bool:
            return True

        def is_built(self) -> bool:
            return True

    _HOOKS.append(Hooks())
    try:
        acc.register_python_privateuseone_hook(_HOOKS[0])
    except RuntimeError:  # registered before in this process
        pass


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
    _register_hooks()
    sys.modules.setdefault("torch_npu.npu", npu)
    sys.modules.setdefault("torch_npu.npu.amp", amp)
    sys.modules["torch.npu.amp"] = amp  # torch_npu makes ``from torch.npu.amp import ...`` work (mmcv on NPU)


_register()
