"""Stand-ins for mmcv-full 1.7.2's NPU kernels (an mmcv built with ``FORCE_NPU=1``), for emulated NPU runs.

Register one for the kit's kernel lookup with ``bevkit.ops.dispatch.stand_in('npu', 'mmcv.ops.focal_loss', mod)``
where ``mod`` is this module: on CPU tensors standing in for NPU ones the kit then calls these instead of
running its portable code, and each call is checked against what the real NPU path accepts and computes.

``sigmoid_focal_loss`` = ``mmcv.ops.focal_loss.sigmoid_focal_loss`` on NPU tensors. Sources (open-mmlab/mmcv
v1.7.2): ``mmcv/ops/focal_loss.py`` (``SigmoidFocalLossFunction``: the asserts on target dtype and ranks, weight
[C], reduction in none/mean/sum; 'mean' divides by M) and ``mmcv/ops/csrc/pytorch/npu/focal_loss_npu.cpp``
(the NPU adapter: ``at::one_hot(target, n_class)`` so every target must be a class index < C, there is no
background label; the per-class ``weight`` is ``broadcast_to(weight, input.sizes())``, i.e. it scales column c
by weight[c], unlike the CUDA kernel which scales each row by weight[target]; the CANN ``SigmoidFocalLoss`` op
computes the loss per element).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

CALLS: List[Tuple[str, Dict[str, Any]]] = []
EMULATES = "npu"


class ContractError(AssertionError):
    """A call mmcv 1.7.2's NPU path refuses."""


def sigmoid_focal_loss(input, target, gamma=2.0, alpha=0.25, weight=None, reduction="mean"):
    # focal_loss.py asserts (they raise AssertionError on the real path too).
    if target.dtype != torch.long:
        raise ContractError("mmcv sigmoid_focal_loss: target must be int64")
    if input.dim() != 2 or target.dim() != 1 or input.size(0) != target.size(0):
        raise ContractError("mmcv sigmoid_focal_loss: input [M, C] and target [M] expected")
    if weight is not None and (weight.dim() != 1 or weight.size(0) != input.size(1)):
        raise ContractError("mmcv sigmoid_focal_loss: weight must be [C]")
    if reduction not in ("none", "mean", "sum"):
        raise ContractError(f"mmcv sigmoid_focal_loss: reduction {reduction!r}")
    # CANN SigmoidFocalLoss: float16 / float32 logits.
    if input.dtype not in (torch.float32, torch.float16):
        raise ContractError(f"mmcv sigmoid_focal_loss (NPU): input must be float32/float16; got {input.dtype}")
    m, c = input.shape
    # focal_loss_npu.cpp: at::one_hot(target, n_class) (n_class > 1) raises for a target outside [0, C).
    if m and c > 1 and (int(target.min()) < 0 or int(target.max()) >= c):
        raise ContractError("mmcv sigmoid_focal_loss (NPU): one_hot(target, C) needs every target in [0, C); "
                            f"got [{int(target.min())}, {int(target.max())}] with C={c}")
    CALLS.append(("sigmoid_focal_loss", dict(M=m, C=c, weight=weight is not None, reduction=reduction)))
    x = input.float()
    onehot = F.one_hot(target, c).to(x.dtype) if c > 1 else (1 - target.view(m, 1)).to(x.dtype)
    p = torch.sigmoid(x)
    pos = -alpha * (1 - p).pow(gamma) * F.logsigmoid(x)
    neg = -(1 - alpha) * p.pow(gamma) * F.logsigmoid(-x)
    loss = onehot * pos + (1 - onehot) * neg
    if weight is not None:
        loss = loss * weight.to(x.dtype).view(1, c)  # broadcast per class (the 1.7.2 NPU adapter)
    loss = loss.to(input.dtype)
    if reduction == "mean":
        return loss.sum() / m
    if reduction == "sum":
        return loss.sum()
    return loss
