"""Sigmoid focal loss with mmcv's ``sigmoid_focal_loss`` contract (FB-OCC occupancy head).

Per element (n, c), with p = sigmoid(pred[n, c]) and t = target[n] (C means background: no positive class):
    loss = -alpha * (1 - p)^gamma * log(p)            if t == c
    loss = -(1 - alpha) * p^gamma * log(1 - p)        otherwise
times weight[t] when a per-class ``weight`` [C] is given (mmcv's kernel looks the weight up by the sample's
target class; background samples, for which that lookup would read past the end, are left unweighted here).
Reduction 'none' -> [M, C], 'sum', or 'mean' (= sum / M, as mmcv).

Targets outside [0, C] are refused (the CUDA kernel would read weight[target] out of bounds; ignore labels
such as 255 must be filtered out first, as FB-OCC does). M = 0 gives an empty 'none' result and NaN for 'mean'
(0 / 0, as mmcv).

Backends:

* npu: mmcv's NPU kernel (an mmcv built with ``FORCE_NPU=1``: the CANN ``SigmoidFocalLoss`` op), which is what
  the DrivingSDK FB-OCC port runs (``transfer_to_npu`` makes upstream's ``pred.is_cuda`` test pass, so
  CustomFocalLoss calls mmcv's op). mx_driving's own ``sigmoid_focal_loss`` is documented for Atlas A5 only
  (DrivingSDK docs/zh/api/context/sigmoid_focal_loss.md) and is not in its default patcher. mmcv 1.7.2's NPU
  adapter (mmcv/ops/csrc/pytorch/npu/focal_loss_npu.cpp) one-hot encodes the target with C classes (no
  background label) and broadcasts ``weight`` per class instead of per target: so the kit calls it without
  weight and applies weight[target] itself, and adds a dummy class column when some target is C (background).
* cuda: mmcv's compiled op when importable.
* portable: the kernel's closed-form forward and backward, with log-sigmoid (more accurate than the kernel's
  log(max(p, FLT_MIN)) for |pred| > 87, identical elsewhere), in row chunks (no one-hot target, no saved
  temporaries).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from bevkit.ops.dispatch import backend_for, mmcv_compiled

OP = "sigmoid_focal_loss"
REDUCTIONS = ("none", "mean", "sum")


def sigmoid_focal_loss(pred: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25,
                       weight: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """mmcv ``sigmoid_focal_loss(pred [M, C], target int64 [M] in [0, C], gamma, alpha, weight [C], reduction)``."""
    if pred.dim() != 2 or target.dim() != 1 or target.shape[0] != pred.shape[0]:
        raise ValueError(f"{OP}: pred must be [M, C] and target [M]; got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if target.dtype != torch.long:
        raise ValueError(f"{OP}: target must be int64 class indices (C = background); got {target.dtype}")
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != pred.shape[1]):
        raise ValueError(f"{OP}: weight must be [C={pred.shape[1]}]; got {tuple(weight.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    fn = mmcv_compiled(OP, pred, "mmcv.ops.focal_loss", "sigmoid_focal_loss", sigmoid_focal_loss)
    if fn is not None and backend_for(pred) == "cuda":
        return fn(pred, target, gamma, alpha, weight, reduction)
    if fn is not None:
        return _mmcv_npu(fn, pred, target, float(gamma), float(alpha), weight, reduction)
    _check_targets(target, pred.shape[1])
    return _portable(pred, target, float(gamma), float(alpha), weight, reduction)


def _check_targets(target, c):
    if target.numel() and (int(target.min()) < 0 or int(target.max()) > c):
        raise ValueError(f"{OP}: targets must be class indices in [0, {c}] ({c} = background); got values in "
                         f"[{int(target.min())}, {int(target.max())}]. Filter ignore labels out first.")


def _mmcv_npu(fn, pred, target, gamma, alpha, weight, reduction):
    """mmcv 1.7.2's NPU kernel within its contract: targets < C only, no weight (see the module doc)."""
    m, c = pred.shape
    if m == 0:
        return _portable(pred, target, gamma, alpha, weight, reduction)
    lo_hi = torch.stack([target.min(), target.max()]).tolist()  # one host sync
    if lo_hi[0] < 0 or lo_hi[1] > c:
        _check_targets(target, c)
    x = pred if pred.dtype in (torch.float32, torch.float16) else pred.float()
    if lo_hi[1] == c:  # background rows: a dummy class C makes every real class a negative, as in the kernel
        loss = fn(F.pad(x, (0, 1)), target, gamma, alpha, None, "none")[:, :c]
    else:
        loss = fn(x, target, gamma, alpha, None, "none")
    if weight is not None:
        loss = loss * _row_weight(weight.to(loss.dtype), target, 0, m, c)
    loss = loss.to(pred.dtype)
    if reduction == "none":
        return loss
    return loss.sum() / m if reduction == "mean" else loss.sum()


def _portable(pred, target, gamma, alpha, weight, reduction):
    x = pred if pred.dtype == torch.float64 else pred.float()
    w = None if weight is None else weight.to(x.dtype)
    return _FocalLoss.apply(x, target, w, gamma, alpha, reduction).to(pred.dtype)


#: Elements per row chunk: bounds the temporaries to a few MB whatever M is (FB-OCC: M ~ 640k voxels x 18).
CHUNK_ELEMENTS = 1 << 20


def _chunks(m: int, c: int):
    step = max(1, CHUNK_ELEMENTS // max(1, c))
    return [(s, min(m, s + step)) for s in range(0, m, step)]


def _positive(x, target, s, e):
    """Rows of [s, e) whose target is a class (< C), and the logits at that class."""
    c = x.shape[1]
    t = target[s:e]
    rows = torch.nonzero((t >= 0) & (t < c)).squeeze(1)
    cols = t[rows]
    return rows, cols, x[s:e][rows, cols]


def _row_weight(weight, target, s, e, c):
    # mmcv's kernel scales every element of a sample by weight[target]; background samples (target == C) are kept
    # unweighted (the kernel would read past the end of weight there).
    t = target[s:e]
    return torch.cat([weight, weight.new_ones(1)])[t.clamp(0, c)].unsqueeze(1)


class _FocalLoss(torch.autograd.Function):
    """Closed-form forward and backward (the mmcv kernel's math with log-sigmoid), in row chunks, so neither a
    one-hot target nor autograd's saved temporaries are materialised."""

    @staticmethod
    def forward(ctx, x, target, weight, gamma, alpha, reduction):
        m, c = x.shape
        out = x.new_empty(m, c) if reduction == "none" else x.new_zeros(())
        for s, e in _chunks(m, c):
            xs = x[s:e]
            # negatives: (1 - alpha) * p^gamma * softplus(x)   (= -(1-alpha) p^g log(1-p))
            loss = torch.sigmoid(xs).pow_(gamma).mul_(F.softplus(xs)).mul_(1 - alpha)
            rows, cols, xp = _positive(x, target, s, e)
            # positives: alpha * (1 - p)^gamma * softplus(-x)   (= -alpha (1-p)^g log p)
            loss[rows, cols] = torch.sigmoid(-xp).pow(gamma) * F.softplus(-xp) * alpha
            if weight is not None:
                loss.mul_(_row_weight(weight, target, s, e, c))
            if reduction == "none":
                out[s:e] = loss
            else:
                out += loss.sum()
        if reduction == "mean":
            out = out / m
        ctx.save_for_backward(x, target, weight)
        ctx.gamma, ctx.alpha, ctx.reduction = gamma, alpha, reduction
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, target, weight = ctx.saved_tensors
        gamma, alpha, reduction = ctx.gamma, ctx.alpha, ctx.reduction
        m, c = x.shape
        grad = torch.empty_like(x)
        scale = grad_out / m if reduction == "mean" else grad_out
        for s, e in _chunks(m, c):
            xs = x[s:e]
            p = torch.sigmoid(xs)
            # d/dx negatives: (1 - alpha) * p^gamma * (gamma * (1 - p) * softplus(x) + p)
            g = F.softplus(xs).mul_(1 - p).mul_(gamma).add_(p).mul_(p.pow(gamma)).mul_(1 - alpha)
            rows, cols, xp = _positive(x, target, s, e)
            pp = torch.sigmoid(xp)
            # d/dx positives: -alpha * (1 - p)^gamma * (gamma * p * softplus(-x) + 1 - p)
            g[rows, cols] = -alpha * (1 - pp).pow(gamma) * (gamma * pp * F.softplus(-xp) + 1 - pp)
            if weight is not None:
                g.mul_(_row_weight(weight, target, s, e, c))
            grad[s:e] = g * (scale[s:e] if reduction == "none" else scale)
        return grad, None, None, None, None, None
