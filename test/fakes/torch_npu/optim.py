"""Fake torch_npu.optim: ``NpuFusedAdamW`` with the real one's constraints (see the package docstring).

Source of every behaviour below: torch_npu v2.1.0-7.2.0 (Ascend/pytorch, the torch_npu 2.1.0.post17 branch),
``torch_npu/optim/npu_fused_optim_base.py`` (``NpuFusedOptimizerBase``), ``torch_npu/optim/npu_fused_adamw.py``
and ``torch_npu/utils/combine_tensors.py``:

* ``zero_grad(set_to_none=True)`` raises ``ValueError("set_to_none is not supported in fused optimizers")``;
  the default is ``set_to_none=False`` (unlike torch >= 2.0's optimizers).
* On the first ``step()`` (or ``zero_grad()`` once gradients exist) the parameters that have a gradient are
  "combined": copied into one flat buffer per dtype and re-pointed into it (``npu_combine_tensors`` /
  ``npu_change_data_ptr``); the gradients likewise. From then on the update runs on those flat buffers only.
  Parameters must be float32 or float16, else ``TypeError("Fused optimizer's parameters must be either
  float32 or float16, but received <dtype>")``.
* A parameter or gradient that is re-allocated afterwards (``p.data = ...``, ``p.grad = None`` then a new
  backward, ``module.zero_grad()`` with torch 2.x's ``set_to_none=True`` default) no longer lies in the buffer:
  the real optimizer silently keeps updating the stale buffer, so that parameter stops training. The fake
  checks what ``torch_npu.utils.is_combined_tensor_valid`` checks (every data pointer inside its buffer) before
  each step and raises instead, so tests see it.
* A parameter that gets its first gradient after the buffers were combined hits ``state['step'] += 1`` on an
  empty state in ``_group_step``: a ``KeyError: 'step'`` in the real optimizer, reproduced here.

The update itself is the real one's arithmetic (decoupled weight decay, bias-corrected moments, amsgrad).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch.optim.optimizer import Optimizer

_DTYPE_SLOTS = (torch.float32, torch.float16)


def _combine(tensors: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """One flat buffer holding ``tensors``, each re-pointed into it (npu_combine_tensors, CPU stand-in)."""
    if not tensors:
        return None
    total = sum(t.numel() for t in tensors)
    if total == 0:
        return None
    flat = torch.zeros(total, dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            flat[offset:offset + n].copy_(t.reshape(-1))
            # npu_change_data_ptr re-points the data and leaves autograd's version counter alone (a graph built
            # before the combination stays valid); set_() would count as an in-place change, ``.data =`` does not
            t.data = flat[offset:offset + n].view(t.shape)
            offset += n
    return flat


def _inside(flat: torch.Tensor, t: Optional[torch.Tensor]) -> bool:
    """torch_npu.utils.is_combined_tensor_valid for one tensor: its data lies inside ``flat``."""
    if t is None:
        return False
    start = flat.data_ptr()
    return start <= t.data_ptr() < start + flat.numel() * flat.element_size()


class NpuFusedAdamW(Optimizer):
    """Stands in for torch_npu.optim.NpuFusedAdamW (CPU tensors; the real one's constraints, see module doc)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        from . import CALLS

        # npu_fused_adamw.py: the same argument checks and messages (without pta_error's error-code suffix).
        if lr < 0.0:
            raise ValueError("Invalid learning rate: {}".format(lr))
        if eps < 0.0:
            raise ValueError("Invalid epsilon value: {}".format(eps))
        if betas[0] < 0.0 or betas[0] >= 1.0:
            raise ValueError("Invalid beta parameter at index 0: {}".format(betas[0]))
        if betas[1] < 0.0 or betas[1] >= 1.0:
            raise ValueError("Invalid beta parameter at index 1: {}".format(betas[1]))
        if weight_decay < 0.0:
            raise ValueError("Invalid weight_decay value: {}".format(weight_decay))
        CALLS.append(("NpuFusedAdamW", dict(lr=lr, weight_decay=weight_decay)))
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad))
        self.is_params_grads_combined = False
        self._combined: List[Dict[str, object]] = []  # per dtype slot: params, flat params, flat grads

    # ------------------------------------------------------------------------------------ combination

    def _maybe_combine(self) -> None:
        """npu_fused_optim_base._maybe_init_combined_params_and_grads: per group and dtype, the params with a
        grad (the real one keeps one buffer per dtype and gives each group its slice; same observable effect)."""
        if self.is_params_grads_combined:
            return
        combined = []
        for group in self.param_groups:
            by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {d: [] for d in _DTYPE_SLOTS}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype not in _DTYPE_SLOTS:
                    raise TypeError("Fused optimizer's parameters must be either float32 or float16, but received "
                                    "{}".format(p.dtype))
                by_dtype[p.dtype].append(p)
            for dtype in _DTYPE_SLOTS:
                params = by_dtype[dtype]
                flat_p = _combine(params)
                if flat_p is not None:
                    combined.append(dict(group=group, params=params, flat_p=flat_p,
                                         flat_g=_combine([p.grad for p in params]), state={"step": 0}))
        if combined:
            self._combined = combined
            self.is_params_grads_combined = True

    def _check_combined(self) -> None:
        for slot in self._combined:
            for p in slot["params"]:
                if not _inside(slot["flat_p"], p) or not _inside(slot["flat_g"], p.grad):
                    what = "its gradient" if _inside(slot["flat_p"], p) else "the parameter"
                    raise RuntimeError(
                        f"NpuFusedAdamW: {what} of a {tuple(p.shape)} parameter was re-allocated after the optimizer "
                        "combined it into its fused buffer (p.data = ..., or grads set to None, e.g. "
                        "module.zero_grad() with torch 2.x's set_to_none=True default); the real NpuFusedAdamW "
                        "would silently stop updating it. Zero gradients with optimizer.zero_grad() (in place).")

    # --------------------------------------------------------------------------------------- API

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = False) -> None:
        if set_to_none:
            raise ValueError("set_to_none is not supported in fused optimizers")
        if not self.is_params_grads_combined:
            self._maybe_combine()
            if not self.is_params_grads_combined:
                super().zero_grad(set_to_none=False)
                return
        for slot in self._combined:
            if slot["flat_g"] is not None:
                slot["flat_g"].zero_()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._maybe_combine()
        self._check_combined()
        combined_ids = {id(p) for slot in self._combined for p in slot["params"]}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("NpuFusedAdamW does not support sparse gradients, please consider SparseAdam "
                                       "instead")
                if id(p) not in combined_ids:
                    # _group_step: self.state[p]['step'] += 1 on a state that was never initialised.
                    raise KeyError("step")
                self.state[p]["step"] = self.state[p].get("step", 0) + 1
        for slot in self._combined:
            group, param, grad, state = slot["group"], slot["flat_p"], slot["flat_g"], slot["state"]
            if grad is None:
                continue
            beta1, beta2 = group["betas"]
            param.mul_(1 - group["lr"] * group["weight_decay"])
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(param)
            state["step"] += 1
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            bias_correction1 = 1 - beta1 ** state["step"]
            bias_correction2 = 1 - beta2 ** state["step"]
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            second = exp_avg_sq
            if group["amsgrad"]:
                torch.max(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                second = state["max_exp_avg_sq"]
            denom = (second.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
            step = exp_avg / denom  # division, not addcdiv: torch 2.1 has no fp16 addcdiv on the CPU
            param.add_(step, alpha=-group["lr"] / bias_correction1)
        return loss
