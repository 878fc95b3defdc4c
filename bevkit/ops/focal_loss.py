"""Sigmoid focal loss with mmcv's ``sigmoid_focal_loss`` contract (FB-OCC occupancy head).

Per element (n, c), with p = sigmoid(pred[n, c]) and t = target[n] (C means background: no positive class):
    loss = -alpha * (1 - p)^gamma * log(p)            if t == c
    loss = -(1 - alpha) * p^gamma * log(1 - p)        otherwise
times weight[t] when a per-class ``weight`` [C] is given (mmcv's kernel looks the weight up by the sample's
target class; background samples, for which that lookup would read past the end, are left unweighted here).
Reduction 'none' -> [M, C], 'sum', or 'mean' (= sum / M, as mmcv).

Backends: mmcv's compiled op on CUDA (and on real NPU tensors with an NPU build of mmcv) when importable;
otherwise the portable code, which uses log-sigmoid (more accurate than the kernel's log(max(p, FLT_MIN)) for
|pred| > 87, identical elsewhere) and autograd for the gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from bevkit.ops.dispatch import backend_for, log_once, optional_import, real_device

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
    backend = backend_for(pred)
    if backend in ("cuda", "npu") and real_device(pred) in ("cuda", "npu"):
        mod = optional_import("mmcv.ops.focal_loss")
        fn = getattr(mod, "sigmoid_focal_loss", None)
        if fn is not None:
            return fn(pred, target, gamma, alpha, weight, reduction)
        log_once(OP, "mmcv's compiled sigmoid_focal_loss is not importable; using the portable code")
    return _portable(pred, target, float(gamma), float(alpha), weight, reduction)


def _portable(pred, target, gamma, alpha, weight, reduction):
    x = pred if pred.dtype == torch.float64 else pred.float()
    m, c = x.shape
    positive = F.one_hot(target.clamp(0, c), c + 1)[:, :c].to(x.dtype)
    p = torch.sigmoid(x)
    loss = -(alpha * positive * (1 - p).pow(gamma) * F.logsigmoid(x)
             + (1 - alpha) * (1 - positive) * p.pow(gamma) * F.logsigmoid(-x))
    if weight is not None:
        per_sample = torch.cat([weight.to(x.dtype), x.new_ones(1)])[target.clamp(0, c)]
        loss = loss * per_sample[:, None]
    if reduction == "mean":
        loss = loss.sum() / m
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(pred.dtype)
