"""Ascend NPU support for pytorch-lightning 1.9 through its public extension points.

Nothing in the installed Lightning is edited (the DrivingSDK port patched site-packages after a
``git init``): the kit passes these objects to ``pl.Trainer``:

- :class:`NPUAccelerator`: device parsing / selection via ``torch.npu`` (torch_npu), registered as
  ``accelerator='npu'`` too.
- :class:`NPUDDPStrategy`: Lightning's DDP strategy with the ``hccl`` process-group backend (the default
  picks gloo for any non-CUDA device). :class:`SingleNPUStrategy` for one device.
- :class:`NPUMixedPrecisionPlugin`: the kit's mixed precision (:mod:`bevkit.lightning_amp`) with
  ``torch.autocast('npu')`` and torch_npu's GradScaler (Lightning's own would create ``torch.cuda.amp.GradScaler``).

``torch_npu`` is imported lazily, so this module imports anywhere (tests use a fake torch_npu). On an emulated
NPU (CPU tensors standing in, :mod:`bevkit.device`) the accelerator places the model on the CPU and still binds the
(fake) NPU of the process.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch

from bevkit.compat import prepare_imports
from bevkit.device import RunDevice

prepare_imports()  # Lightning imports torchvision (through torchmetrics)

from pytorch_lightning.accelerators import Accelerator, AcceleratorRegistry  # noqa: E402
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy  # noqa: E402

from bevkit.lightning_amp import DeviceMixedPrecisionPlugin  # noqa: E402


def _torch_npu():
    import torch_npu  # noqa: F401  (registers torch.npu)

    return torch_npu


class NPUAccelerator(Accelerator):
    """Accelerator for Ascend NPUs (``torch.npu`` from torch_npu)."""

    def setup_device(self, device: torch.device) -> None:
        run = RunDevice.of("npu")
        if device.type != run.memory:
            raise ValueError(f"NPUAccelerator got device {device}; expected an '{run.memory}' device")
        _torch_npu()
        torch.npu.set_device(run.local_rank if run.emulated else device)  # type: ignore[attr-defined]

    def get_device_stats(self, device: Union[str, torch.device]) -> Dict[str, Any]:
        _torch_npu()
        return dict(torch.npu.memory_stats(device))  # type: ignore[attr-defined]

    def teardown(self) -> None:
        _torch_npu()
        torch.npu.empty_cache()  # type: ignore[attr-defined]

    @staticmethod
    def parse_devices(devices: Union[int, str, List[int]]) -> List[int]:
        """``devices`` as in Lightning: a count, -1/'auto' (all), a list of indices or '0,1'."""
        count = NPUAccelerator.auto_device_count()
        if devices in (-1, "-1", "auto", None):
            return list(range(count))
        if isinstance(devices, str):
            devices = [int(d) for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
        if isinstance(devices, int):
            if devices < 1 or devices > count:
                raise ValueError(f"asked for {devices} NPUs, {count} visible (ASCEND_RT_VISIBLE_DEVICES?)")
            return list(range(devices))
        indices = [int(d) for d in devices]
        bad = [d for d in indices if d < 0 or d >= count]
        if bad:
            raise ValueError(f"NPU indices {bad} do not exist ({count} visible)")
        return indices

    @staticmethod
    def get_parallel_devices(devices: List[int]) -> List[torch.device]:
        if RunDevice.of("npu").emulated:  # CPU tensors stand in for NPU ones
            return [torch.device("cpu") for _ in devices]
        return [torch.device("npu", i) for i in devices]

    @staticmethod
    def auto_device_count() -> int:
        _torch_npu()
        return torch.npu.device_count()  # type: ignore[attr-defined]

    @staticmethod
    def is_available() -> bool:
        try:
            _torch_npu()
            return torch.npu.is_available()  # type: ignore[attr-defined]
        except Exception:  # ImportError or CANN failing to load
            return False

    @classmethod
    def register_accelerators(cls, accelerator_registry: Dict) -> None:
        accelerator_registry.register("npu", cls, description=cls.__name__)


class NPUDDPStrategy(DDPStrategy):
    """DDP over HCCL; everything else is Lightning's DDPStrategy."""

    strategy_name = "ddp_npu"

    def __init__(self, *args: Any, process_group_backend: Optional[str] = "hccl", **kwargs: Any) -> None:
        kwargs.setdefault("accelerator", None)
        super().__init__(*args, process_group_backend=process_group_backend, **kwargs)


class SingleNPUStrategy(SingleDeviceStrategy):
    strategy_name = "single_npu"

    def __init__(self, device: Union[int, torch.device] = 0, **kwargs: Any) -> None:
        if isinstance(device, int):
            device = torch.device("npu", device)
        super().__init__(device=device, **kwargs)


class NPUMixedPrecisionPlugin(DeviceMixedPrecisionPlugin):
    """fp16 autocast on 'npu' with torch_npu's dynamic loss scaler (bf16 without a scaler); gradients unscaled
    before clipping (see :mod:`bevkit.lightning_amp`)."""

    def __init__(self, precision: Union[str, int] = "16", scaler: Any = None) -> None:
        super().__init__(precision, device=RunDevice.of("npu"), scaler=scaler)


def register() -> None:
    """Make ``accelerator='npu'`` and ``strategy='ddp_npu'`` usable by name."""
    if "npu" not in AcceleratorRegistry:
        NPUAccelerator.register_accelerators(AcceleratorRegistry)
    from pytorch_lightning.strategies import StrategyRegistry

    if "ddp_npu" not in StrategyRegistry:
        StrategyRegistry.register("ddp_npu", NPUDDPStrategy, description="DDP over HCCL on Ascend NPUs")


register()
