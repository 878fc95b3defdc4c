"""Mixed precision for pytorch-lightning 1.9 on the run's device, with gradient clipping for fused optimizers.

The kit trains BEVDepth with fused optimizers (``torch.optim.AdamW(fused=True)`` on CUDA, torch_npu's
``NpuFusedAdamW`` on NPU), fp16 AMP and upstream's ``gradient_clip_val=5``. Lightning's ``MixedPrecisionPlugin``
skips ``scaler.unscale_`` for an optimizer that can unscale inside its step (``_step_supports_amp_scaling``,
i.e. torch's fused ones) and then refuses to clip for it ("does not allow for gradient clipping"), so the CUDA
path stopped at its first step. :class:`DeviceMixedPrecisionPlugin` unscales every optimizer's gradients before
clipping; torch's ``GradScaler.step`` then hands a fused optimizer no scale (the gradients are unscaled already)
and the inf/NaN flag, so a step with overflowed gradients is still skipped inside the fused kernel. The fused
kernels stay (the foreach optimizer would be the other way out, one kernel launch per tensor list and step).

Autocast and the loss scaler are the run device's (:class:`bevkit.device.RunDevice`): ``torch.autocast`` on the
device's memory and its GradScaler (torch's on CUDA, torch_npu's on NPU).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from bevkit import log
from bevkit.compat import prepare_imports
from bevkit.device import RunDevice, run_device

prepare_imports()  # Lightning imports torchvision (through torchmetrics)

from pytorch_lightning.plugins.precision import MixedPrecisionPlugin, PrecisionPlugin  # noqa: E402


class DeviceMixedPrecisionPlugin(MixedPrecisionPlugin):
    """Lightning's native AMP on ``device`` (default: the run's): fp16 with the device's GradScaler, or bf16;
    gradients unscaled before clipping for every optimizer, fused ones included."""

    def __init__(self, precision: Union[str, int] = "16", device: Optional[Union[str, RunDevice]] = None,
                 scaler: Any = None) -> None:
        run = RunDevice.of(device) if device is not None else run_device()
        precision = str(precision)
        if scaler is None and precision == "16":
            scaler = run.grad_scaler()
        super().__init__(precision, device=run.kind, scaler=scaler)
        self.run = run
        log.get("amp").info(f"mixed precision {precision} on {run.kind}: autocast on {run.memory}, "
                            f"{type(scaler).__name__ if scaler is not None else 'no'} loss scaler, gradients "
                            f"unscaled before clipping (fused optimizers too)")

    def autocast_context_manager(self):
        return self.run.autocast(dtype=torch.bfloat16 if self.precision == "bf16" else torch.half)

    def optimizer_step(self, optimizer, model, optimizer_idx: int, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if self.scaler is None:
            return super().optimizer_step(optimizer, model=model, optimizer_idx=optimizer_idx, closure=closure,
                                          **kwargs)
        closure_result = closure()
        # unscale for every optimizer (Lightning skips fused ones), so clipping sees the true gradients
        self.scaler.unscale_(optimizer)
        self._after_closure(model, optimizer, optimizer_idx)  # on_before_optimizer_step, then gradient clipping
        skipped_backward = closure_result is None
        if not model.automatic_optimization or not skipped_backward:
            step_output = self.scaler.step(optimizer, **kwargs)  # skipped when the gradients hold inf/NaN
            self.scaler.update()
            return step_output
        return closure_result

    def clip_gradients(self, optimizer, clip_val: Union[int, float] = 0.0, gradient_clip_algorithm=None) -> None:
        # the gradients are unscaled by now (optimizer_step), whatever the optimizer: plain clipping is right
        if gradient_clip_algorithm is None:
            PrecisionPlugin.clip_gradients(self, optimizer, clip_val=clip_val)
        else:
            PrecisionPlugin.clip_gradients(self, optimizer, clip_val=clip_val,
                                           gradient_clip_algorithm=gradient_clip_algorithm)
