"""BEVDepth voxel pooling: ``voxel_pooling_train`` and ``voxel_pooling_inference`` (UPSTREAM.md 3.3).

Semantics (upstream CUDA kernels): point j of batch b with integer voxel coordinates (x, y, z) adds its
feature vector to out[b, :, y, x] when 0 <= x < nx, 0 <= y < ny and 0 <= z < nz; every other point is dropped.
z is only range-checked (all z cells fall into one BEV cell).

Quantization note: upstream turns metric coordinates into voxel indices with ``.int()``, which truncates
toward zero, so a coordinate in (-1, 0) lands in cell 0 and is kept, and only <= -1 is dropped. These ops take
the already-quantized int32 indices; a floating ``geom_xyz`` is quantized the same way (``.to(int32)``).

Backends:

* npu: ``mx_driving.npu_voxel_pooling_train`` within its documented limits (B <= 128, N <= 100000, C <= 256,
  nx, ny <= 1000, nz <= 10, B*ny*nx*C <= 1e8, B*N*C <= 1e8): points are split into chunks whose partial
  BEV maps are summed (``BEVKIT_NPU_OP_LIMITS=port``: all points in one call, as the DrivingSDK port, see
  :mod:`bevkit.op_limits`), channels and batches into chunks that are concatenated; nz > 10 is folded into nz = 1 by
  dropping out-of-range z first. The inference op runs as chunked training-mode pooling of depth x context
  (the chunk bounds the outer product's memory).
* cuda: BEVDepth's compiled ``bevdepth.ops`` kernels when importable, for the inputs they handle: float32 or
  float16 features (float16 with an even channel count, the wrapper's ``assert(num_channels % 2 == 0)``; any
  other dtype leaves their output at zero), and for inference depth and context of one dtype. Other inputs run
  the portable code.
* portable: linear BEV index + ``index_add_`` with a trash row for dropped points (no copy of the features);
  backward is a gather. Inference uses a sparse product over (pixel, depth bin) so depth x context is never
  materialised. float16/bfloat16 are accumulated in float32 and returned in the input dtype.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from bevkit import op_limits
from bevkit.ops._scatter import CHUNK_ELEMENTS, csr_supported, weighted_scatter
from bevkit.ops.dispatch import log_once, run_op

OP_TRAIN = "voxel_pooling_train"
OP_INFER = "voxel_pooling_inference"

#: mx_driving.npu_voxel_pooling_train limits (DrivingSDK docs/zh/api/context/npu_voxel_pooling_train.md).
NPU_MAX_B = 128
NPU_MAX_N = 100_000
NPU_MAX_C = 256
NPU_MAX_XY = 1000
NPU_MAX_Z = 10
NPU_MAX_OUT = 100_000_000  # B * ny * nx * C
NPU_MAX_IN = 100_000_000  # B * N * C

VoxelNum = Union[Sequence[int], torch.Tensor]


def _voxel_num(voxel_num: VoxelNum, op: str) -> Tuple[int, int, int]:
    vals = voxel_num.tolist() if isinstance(voxel_num, torch.Tensor) else list(voxel_num)
    if len(vals) != 3:
        raise ValueError(f"{op}: voxel_num must be (nx, ny, nz); got {voxel_num}")
    nx, ny, nz = (int(v) for v in vals)
    return nx, ny, nz


def _quantize(geom: torch.Tensor) -> torch.Tensor:
    # Truncation toward zero, like upstream's `.int()`: (-1, 0) -> 0.
    return geom.to(torch.int32) if geom.dtype.is_floating_point else geom


def _linear_index(geom: torch.Tensor, nx: int, ny: int, nz: int) -> torch.Tensor:
    """[B*N] int64 index into a [B*ny*nx (+1 trash), C] buffer; dropped points get B*ny*nx."""
    b = geom.shape[0]
    x, y, z = geom[..., 0], geom[..., 1], geom[..., 2]
    ok = (x >= 0) & (x < nx) & (y >= 0) & (y < ny) & (z >= 0) & (z < nz)
    base = torch.arange(b, device=geom.device, dtype=torch.int64).view(b, 1) * (ny * nx)
    lin = base + y.long() * nx + x.long()
    return torch.where(ok, lin, torch.full_like(lin, b * ny * nx)).reshape(-1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _PoolTrain(torch.autograd.Function):
    """rows[n_out, C]: sum of feats rows by index (index n_out = dropped); backward gathers."""

    @staticmethod
    def forward(ctx, idx, feats, n_out: int):
        acc = _acc_dtype(feats.dtype)
        out = feats.new_zeros(n_out + 1, feats.shape[1], dtype=acc)
        if feats.dtype == acc:
            out.index_add_(0, idx, feats)
        else:  # convert in chunks: a float32 copy of all points would double the memory of the largest input
            step = max(1, CHUNK_ELEMENTS // max(1, feats.shape[1]))
            for s in range(0, idx.numel(), step):
                out.index_add_(0, idx[s:s + step], feats[s:s + step].to(acc))
        ctx.save_for_backward(idx)
        ctx.n_out = n_out
        return out[:n_out].to(feats.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        g = grad.new_zeros(ctx.n_out + 1, grad.shape[1])
        g[:ctx.n_out] = grad
        return None, g.index_select(0, idx), None


def voxel_pooling_train(geom_xyz: torch.Tensor, features: torch.Tensor, voxel_num: VoxelNum) -> torch.Tensor:
    """Sum point features into a BEV grid; returns [B, C, ny, nx] in the features' dtype.

    Args:
        geom_xyz: [B, ..., 3] int32 voxel indices (x, y, z) (floating values are truncated toward zero).
        features: [B, ..., C] float32/float16/bfloat16 features, same number of points as geom_xyz.
        voxel_num: (nx, ny, nz), a sequence or a tensor.

    Out-of-range points are dropped. Gradient flows to features only (a gather of the output gradient).
    """
    nx, ny, nz = _voxel_num(voxel_num, OP_TRAIN)
    b, c = geom_xyz.shape[0], features.shape[-1]
    if geom_xyz.shape[-1] != 3 or features.shape[0] != b:
        raise ValueError(f"{OP_TRAIN}: geom_xyz must be [B, ..., 3] and features [B, ..., C] with the same B; "
                         f"got {tuple(geom_xyz.shape)} and {tuple(features.shape)}")
    geom = _quantize(geom_xyz).reshape(b, -1, 3)
    feats = features.reshape(b, -1, c)
    if geom.shape[1] != feats.shape[1]:
        raise ValueError(f"{OP_TRAIN}: {geom.shape[1]} points in geom_xyz but {feats.shape[1]} in features")
    def cuda(kernel):
        if not _cuda_dtype_ok(OP_TRAIN, feats.dtype, c):
            return None
        return kernel(geom.to(torch.int32).contiguous(), feats.contiguous(), [nx, ny, nz])

    return run_op(
        OP_TRAIN, features,
        portable=lambda: _portable_train(geom, feats, nx, ny, nz),
        npu=lambda mx: _npu_train(mx, geom, feats, nx, ny, nz),
        cuda=("bevdepth.ops.voxel_pooling_train", "voxel_pooling_train", cuda,
              "BEVDepth's compiled voxel_pooling_train_ext"))


def _cuda_dtype_ok(op: str, dtype: torch.dtype, c: int) -> bool:
    """BEVDepth's CUDA wrappers dispatch float32 and float16 (even C) only; anything else would stay zero."""
    if dtype == torch.float32 or (dtype == torch.float16 and c % 2 == 0):
        return True
    log_once(op, f"BEVDepth's CUDA kernel takes float32, or float16 with an even channel count, not {dtype} with "
                 f"C={c}; using the portable code")
    return False


def _portable_train(geom, feats, nx, ny, nz):
    b, _, c = feats.shape
    idx = _linear_index(geom, nx, ny, nz)
    rows = _PoolTrain.apply(idx, feats.reshape(-1, c), b * ny * nx)
    return rows.view(b, ny, nx, c).permute(0, 3, 1, 2)


def _npu_train(mx, geom, feats, nx, ny, nz) -> Optional[torch.Tensor]:
    b, n, c = feats.shape
    if b == 0 or n == 0 or c == 0:
        log_once(OP_TRAIN, "no points: npu_voxel_pooling_train rejects empty inputs; using the portable code",
                 logging.INFO)
        return None
    if nx > NPU_MAX_XY or ny > NPU_MAX_XY:
        log_once(OP_TRAIN, f"grid {nx}x{ny} exceeds npu_voxel_pooling_train's nx, ny <= {NPU_MAX_XY}; "
                           "using the portable code")
        return None
    if geom.dtype != torch.int32:
        geom = geom.to(torch.int32)
    if nz > NPU_MAX_Z:
        # z is only range-checked: drop out-of-range z here, then one z cell is exact.
        log_once(OP_TRAIN, f"nz={nz} exceeds npu_voxel_pooling_train's nz <= {NPU_MAX_Z}: range-checking z "
                           "before the call and passing nz=1")
        x, y, z = geom.unbind(-1)
        x = torch.where((z >= 0) & (z < nz), x, torch.full_like(x, -1))
        geom = torch.stack([x, y, torch.zeros_like(z)], -1)
        nz = 1
    dtype = feats.dtype
    if dtype not in (torch.float32, torch.float16):
        log_once(OP_TRAIN, f"npu_voxel_pooling_train takes float32/float16, not {dtype}: computing in float32")
        feats = feats.float()
    bstep = min(b, NPU_MAX_B)
    cstep = min(c, NPU_MAX_C, NPU_MAX_OUT // (bstep * ny * nx))
    if cstep < 1:
        log_once(OP_TRAIN, f"one channel of a {bstep}x{ny}x{nx} grid exceeds B*ny*nx*C <= 1e8; "
                           "using the portable code")
        return None
    # BEVKIT_NPU_OP_LIMITS=port: all points in one call, as the BEVDepth port passes N=473,088 (bevkit.op_limits)
    nstep = n if op_limits.port() else min(n, NPU_MAX_N, NPU_MAX_IN // (bstep * cstep))
    if nstep > NPU_MAX_N or bstep * nstep * cstep > NPU_MAX_IN:
        log_once(OP_TRAIN, f"port op limits: N={nstep} points of B={bstep}, C={cstep} in one call (documented: "
                           "N <= 100000, B*N*C <= 1e8)", logging.INFO)
    if (bstep, cstep, nstep) != (b, c, n):
        log_once(OP_TRAIN, f"B={b}, N={n}, C={c} exceeds npu_voxel_pooling_train's limits (B <= 128, "
                           "N <= 100000, C <= 256, B*ny*nx*C <= 1e8, B*N*C <= 1e8): splitting into "
                           f"chunks of B={bstep}, N={nstep}, C={cstep}")
    geom = geom.contiguous()
    per_batch = []
    for b0 in range(0, b, bstep):
        per_channel = []
        for c0 in range(0, c, cstep):
            acc = None
            for n0 in range(0, n, nstep):
                g = geom[b0:b0 + bstep, n0:n0 + nstep].contiguous()
                f = feats[b0:b0 + bstep, n0:n0 + nstep, c0:c0 + cstep].contiguous()
                part = mx.npu_voxel_pooling_train(g, f, [nx, ny, nz])
                acc = part if acc is None else acc + part
            per_channel.append(acc)
        per_batch.append(per_channel[0] if len(per_channel) == 1 else torch.cat(per_channel, 1))
    out = per_batch[0] if len(per_batch) == 1 else torch.cat(per_batch, 0)
    return out.to(dtype)


def voxel_pooling_inference(geom_xyz: torch.Tensor, depth: torch.Tensor, context: torch.Tensor,
                            voxel_num: VoxelNum) -> torch.Tensor:
    """Training-mode pooling of depth x context, without materialising the outer product.

    Args:
        geom_xyz: [B, Ncam, D, H, W, 3] int32 voxel indices (floating values are truncated toward zero).
        depth: [B*Ncam, D, H, W] depth probabilities.
        context: [B*Ncam, C, H, W] context features (same dtype as depth).
        voxel_num: (nx, ny, nz).

    Returns [B, C, ny, nx]: out[b, :, y, x] = sum over in-range points (n, d, h, w) of
    depth[b*Ncam+n, d, h, w] * context[b*Ncam+n, :, h, w]. (Upstream has no backward; ours is differentiable.)
    """
    nx, ny, nz = _voxel_num(voxel_num, OP_INFER)
    if geom_xyz.dim() != 6 or geom_xyz.shape[-1] != 3:
        raise ValueError(f"{OP_INFER}: geom_xyz must be [B, Ncam, D, H, W, 3]; got {tuple(geom_xyz.shape)}")
    b, ncam, d, h, w, _ = geom_xyz.shape
    if tuple(depth.shape) != (b * ncam, d, h, w) or context.dim() != 4 or \
            tuple(context.shape[::2]) != (b * ncam, h) or context.shape[3] != w:
        raise ValueError(f"{OP_INFER}: with geom_xyz {tuple(geom_xyz.shape)} expected depth [{b * ncam},{d},{h},{w}] "
                         f"and context [{b * ncam},C,{h},{w}]; got {tuple(depth.shape)} and {tuple(context.shape)}")
    geom = _quantize(geom_xyz)
    def cuda(kernel):
        if depth.dtype != context.dtype:
            log_once(OP_INFER, f"BEVDepth's CUDA kernel reads depth and context as one dtype, not {depth.dtype} and "
                               f"{context.dtype}; using the portable code")
            return None
        if not _cuda_dtype_ok(OP_INFER, context.dtype, context.shape[1]):
            return None
        return kernel(geom.to(torch.int32).contiguous(), depth.contiguous(), context.contiguous(), [nx, ny, nz])

    return run_op(
        OP_INFER, context,
        portable=lambda: _portable_inference(geom, depth, context, nx, ny, nz),
        npu=lambda mx: _npu_inference(mx, geom, depth, context, nx, ny, nz),
        cuda=("bevdepth.ops.voxel_pooling_inference", "voxel_pooling_inference", cuda,
              "BEVDepth's compiled voxel_pooling_inference_ext"))


def _portable_inference(geom, depth, context, nx, ny, nz):
    b, ncam, d, h, w, _ = geom.shape
    c = context.shape[1]
    acc = _acc_dtype(torch.promote_types(depth.dtype, context.dtype))
    # Order the points (image, pixel, depth bin): the source pixel index is then sorted, which the CSR path uses.
    idx = _linear_index(geom.reshape(b, -1, 3), nx, ny, nz).view(b * ncam, d, h * w).transpose(1, 2).reshape(-1)
    vals = depth.reshape(b * ncam, d, h * w).transpose(1, 2).reshape(-1).to(acc)
    pixels = context.reshape(b * ncam, c, h * w).transpose(1, 2).reshape(-1, c).to(acc)
    src = torch.arange(b * ncam * h * w, device=geom.device).repeat_interleave(d)
    out = weighted_scatter(vals, pixels, idx, src, b, ny * nx, "src" if csr_supported(pixels) else None)
    return out.view(b, c, ny, nx).to(context.dtype)


def _npu_inference(mx, geom, depth, context, nx, ny, nz) -> Optional[torch.Tensor]:
    b, ncam, d, h, w, _ = geom.shape
    c = context.shape[1]
    n = ncam * d * h * w
    if n == 0 or c == 0:
        return None
    geom = geom.reshape(b, n, 3)
    depth_flat = depth.reshape(b, n)
    ctx_rows = context.reshape(b, ncam, c, h * w).transpose(2, 3).reshape(b, ncam * h * w, c)
    # Point k = ((n*D + d)*H*W + hw) reads context pixel n*H*W + hw; chunks bound the outer product's memory
    # (the port policy makes one call with the whole product, as the BEVDepth port's evaluation does).
    step = n if op_limits.port() else \
        max(1, min(NPU_MAX_N, NPU_MAX_IN // max(1, min(b, NPU_MAX_B) * min(c, NPU_MAX_C))))
    out = None
    for s in range(0, n, step):
        k = torch.arange(s, min(n, s + step), device=geom.device)
        pix = (k // (d * h * w)) * (h * w) + k % (h * w)
        feats = depth_flat[:, s:s + step, None] * ctx_rows[:, pix]
        part = _npu_train(mx, geom[:, s:s + step], feats, nx, ny, nz)
        if part is None:
            return None
        out = part if out is None else out + part
    return out
