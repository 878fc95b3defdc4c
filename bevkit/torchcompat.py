"""Where torch's API differs between the two stacks the kit runs on, decided once: torch 2.1 (the Ascend reference
stack, Python 3.8) and the current torch (2.13, Python 3.11).

Every decision here goes by the running torch's version (:func:`torch_at_least`), so a test can take either
branch on either stack by setting ``torch.__version__``; where no release note names the version, a probe of the
running torch decides (:func:`function_modes_see_indexing`). Importing this module does not import torch.
"""
from __future__ import annotations

import re
from typing import Tuple


def torch_version() -> Tuple[int, int]:
    """(major, minor) of the running torch; '2.1.0+cu121' -> (2, 1), '2.13.0a0+git' -> (2, 13)."""
    import torch

    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if not m:
        raise RuntimeError(f"cannot read torch.__version__ {torch.__version__!r}")
    return int(m.group(1)), int(m.group(2))


def torch_at_least(major: int, minor: int) -> bool:
    return torch_version() >= (major, minor)


_PROBED: dict = {}


def function_modes_see_indexing() -> bool:
    """Whether a ``TorchFunctionMode`` receives ``Tensor.__getitem__``. torch 2.13: yes; torch 2.1: no (indexing
    bypasses modes), so a patch that rewrites indexing inside a mode would be listed as applied and change
    nothing. Probed once per process."""
    if "indexing" not in _PROBED:
        import torch
        from torch.overrides import TorchFunctionMode

        seen = []

        class Probe(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                seen.append(func)
                return func(*args, **(kwargs or {}))

        values = torch.zeros(2)
        with Probe():
            values[torch.tensor([True, False])]
        _PROBED["indexing"] = torch.Tensor.__getitem__ in seen
    return _PROBED["indexing"]


def cpu_fp16_amp() -> bool:
    """Whether fp16 mixed precision can run on CPU tensors, as an emulated device's AMP path needs it: fp16
    autocast on the CPU and a CPU GradScaler. torch >= 2.3: both. torch 2.1: neither (CPU autocast refuses
    float16, "AutocastCPU only support Bfloat16"; no CPU unscale/update kernels), so on that stack the fp16 path
    of CUDA or NPU runs only on the device itself."""
    return torch_at_least(2, 3)


def cpu_grad_scaler_class() -> type:
    """A GradScaler class for CPU tensors (the fake torch_npu's amp.GradScaler derives from it).

    torch >= 2.3: ``torch.amp.GradScaler('cpu')``, dynamic loss scaling on the CPU. Before 2.3, torch has neither
    ``torch.amp.GradScaler`` nor CPU kernels for unscaling and scale updates (``_amp_foreach_non_finite_check_
    and_unscale_`` / ``_amp_update_scale_`` have no CPU implementation in 2.1): ``torch.cuda.amp.GradScaler``
    built disabled, which passes through (``scale`` returns its input, ``step`` steps the optimizer, ``update``
    does nothing), so fp16 code paths run unchanged, unscaled.
    """
    import torch

    if cpu_fp16_amp():
        base = torch.amp.GradScaler

        class CPUGradScaler(base):  # type: ignore[misc,valid-type]
            def __init__(self, *args, **kwargs):
                super().__init__("cpu", *args, **kwargs)
    else:
        base = torch.cuda.amp.GradScaler

        class CPUGradScaler(base):  # type: ignore[misc,valid-type,no-redef]
            def __init__(self, *args, **kwargs):
                kwargs["enabled"] = False
                super().__init__(*args, **kwargs)

    return CPUGradScaler
