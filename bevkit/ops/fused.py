"""Small ops the DrivingSDK FB-OCC port sends to mx_driving for speed: one contract each, same maths everywhere.

``add_relu(x, y)``: ``relu(x + y)`` (a ResNet block's shortcut add and activation).

* npu: ``mx_driving.npu_add_relu`` (docs/zh/api/context/npu_add_relu.md: same shape and dtype, no broadcast,
  element count within int32; the kernel is registered for float32 and float16, kernels/add_relu/op_host). Its
  wrapper (mx_driving/ops/npu_add_relu.py) runs the fused kernel from 2,000,000 elements on, **writing the result
  into x**; below that it computes ``relu(x + y)``. So x must be a temporary the caller does not read again.
* elsewhere (and for other inputs): ``torch.relu(x + y)``.

``max_pool2d(x, kernel_size, stride, padding)``: ``F.max_pool2d`` (floor mode, dilation 1).

* npu: ``mx_driving.npu_max_pool2d`` for the ResNet stem's 3x3 / stride 2 / padding 1 on 4-D float32/float16
  inputs with C <= 1024 (mx_driving/csrc/MaxPool2d.cpp; from 64 channels on, with H and W > 1 and at most 1e9
  elements, its fast path needs C % 8 == 0 in float32, C % 16 == 0 in float16). The op has no backward
  (mx_driving/ops/npu_max_pool2d.py defines none): only inputs that need no gradient go to it, as in the port.
* elsewhere: ``torch.nn.functional.max_pool2d``.

``batch_matvec(mat, vec)``: ``torch.matmul(mat, vec)`` for ``mat [..., n, n]`` and ``vec [..., n, 1]`` with
n = 3 or 4 and broadcastable batch dimensions of equal rank (the view transformers' rotations and projections).

* npu: ``mx_driving.npu_batch_matmul`` (docs/zh/api/context/npu_batch_matmul.md: float32, 4-6 dims, last dims
  3x3 / 4x4 and 3x1 / 4x1, mutually broadcastable): an elementwise multiply and a sum over the last dim on the
  vector unit instead of a K = 3 or 4 matmul on the cube unit. Same products, summed in another order: the
  results differ from matmul's by rounding only.
* elsewhere: ``torch.matmul``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bevkit.ops.dispatch import log_once, run_op

OP_ADD_RELU = "add_relu"
OP_MAX_POOL = "max_pool2d"
OP_MATVEC = "batch_matvec"

#: mx_driving limits (sources in the module doc).
NPU_MAX_ELEMENTS = 2 ** 31 - 1
NPU_POOL_MAX_C = 1024
NPU_POOL_FAST_MIN_C = 64
NPU_POOL_FAST_MAX_ELEMENTS = 1_000_000_000
NPU_POOL_C_MULTIPLE = {torch.float32: 8, torch.float16: 16}
NPU_MATVEC_RANKS = (4, 5, 6)


def add_relu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``relu(x + y)``; on NPU the result may be written into x (pass a temporary). Gradients flow to both."""

    def npu(mx):
        if x.shape != y.shape or x.dtype != y.dtype or x.dtype not in (torch.float32, torch.float16) \
                or x.numel() > NPU_MAX_ELEMENTS:
            log_once(OP_ADD_RELU, f"npu_add_relu needs equal shapes and dtypes (float32/float16), not "
                                  f"{tuple(x.shape)} {x.dtype} + {tuple(y.shape)} {y.dtype}; using relu(x + y)")
            return None
        return mx.npu_add_relu(x, y)

    return run_op(OP_ADD_RELU, x, portable=lambda: torch.relu(x + y), npu=npu)


def _npu_pool_ok(x: torch.Tensor, kernel_size, stride, padding) -> bool:
    if (kernel_size, stride, padding) != (3, 2, 1) or x.dim() != 4 or x.dtype not in NPU_POOL_C_MULTIPLE:
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False  # npu_max_pool2d has no backward
    n, c, h, w = x.shape
    if c > NPU_POOL_MAX_C or x.numel() == 0:
        return False
    fast = c >= NPU_POOL_FAST_MIN_C and h > 1 and w > 1 and x.numel() <= NPU_POOL_FAST_MAX_ELEMENTS
    return not fast or c % NPU_POOL_C_MULTIPLE[x.dtype] == 0


def max_pool2d(x: torch.Tensor, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (NCHW); mx_driving's kernel on NPU where it applies."""

    def npu(mx):
        if not _npu_pool_ok(x, kernel_size, stride, padding):
            return None
        return mx.npu_max_pool2d(x.contiguous(), 3, 2, 1)

    return run_op(OP_MAX_POOL, x, portable=lambda: F.max_pool2d(x, kernel_size, stride, padding), npu=npu)


def _check_matvec(mat: torch.Tensor, vec: torch.Tensor) -> None:
    n = mat.shape[-1] if mat.dim() >= 2 else -1
    if mat.dim() < 2 or mat.shape[-2] != n or n not in (3, 4) or vec.dim() != mat.dim() \
            or tuple(vec.shape[-2:]) != (n, 1):
        raise ValueError(f"{OP_MATVEC}: expected mat [..., n, n] and vec [..., n, 1] of one rank with n = 3 or 4; "
                         f"got {tuple(mat.shape)} and {tuple(vec.shape)}")
    for a, b in zip(mat.shape[:-2], vec.shape[:-2]):
        if a != b and a != 1 and b != 1:
            raise ValueError(f"{OP_MATVEC}: batch dims of {tuple(mat.shape)} and {tuple(vec.shape)} do not broadcast")


def batch_matvec(mat: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(mat, vec)`` for 3x3 / 4x4 matrices times column vectors: ``[..., n, 1]``."""
    _check_matvec(mat, vec)

    def npu(mx):
        if mat.dim() not in NPU_MATVEC_RANKS or mat.dtype != torch.float32 or vec.dtype != torch.float32:
            log_once(OP_MATVEC, f"npu_batch_matmul takes float32 tensors of rank 4-6, not rank {mat.dim()} "
                                f"{mat.dtype} x {vec.dtype}; using torch.matmul")
            return None
        return mx.npu_batch_matmul(mat, vec)

    return run_op(OP_MATVEC, mat, portable=lambda: torch.matmul(mat, vec), npu=npu)
