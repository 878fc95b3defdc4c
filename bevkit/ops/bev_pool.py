"""LSS voxel pooling of FB-OCC / BEVDet: ``bev_pool_v2`` (upstream contract, see UPSTREAM.md 3.3).

Backends:

* npu: ``mx_driving.bev_pool_v3`` (no sorting or intervals; atomic adds). Its documented limits are
  C % 8 == 0, C <= 360 and B*Z*Y*X*C <= 2^31: channels are zero-padded to a multiple of 8 (exact: the padded
  channels are cut off) and split into chunks that fit; a call no chunking can fit runs the portable code.
* cuda: FB-BEV's compiled ``mmdet3d.ops.bev_pool_v2.bev_pool.bev_pool_v2`` when importable.
* portable: a sparse-dense product (see ``_scatter``): out = A @ feat with A[bev, pixel] = depth values, never
  materialising the P x C per-point product; custom backward (grad_feat = A^T @ grad, grad_depth by SDDMM).

All backends cast depth and feat to float32 (as upstream does, which keeps AMP safe); float64 inputs stay
float64 on the portable path (tests).
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from bevkit.ops._scatter import csr_supported, weighted_scatter
from bevkit.ops.dispatch import log_once, run_op

OP = "bev_pool_v2"

#: mx_driving.bev_pool_v3 limits (DrivingSDK docs/zh/api/context/bev_pool_v3.md).
NPU_MAX_C = 360
NPU_C_MULTIPLE = 8
NPU_MAX_OUT_ELEMENTS = 2 ** 31


def compute_intervals(ranks_bev: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(interval_starts, interval_lengths), int32: the maximal runs of equal values in sorted ``ranks_bev``."""
    p = ranks_bev.numel()
    if p == 0:
        empty = torch.zeros(0, dtype=torch.int32, device=ranks_bev.device)
        return empty, empty.clone()
    kept = torch.ones(p, dtype=torch.bool, device=ranks_bev.device)
    kept[1:] = ranks_bev[1:] != ranks_bev[:-1]
    starts = torch.nonzero(kept).squeeze(1)
    lengths = torch.diff(starts, append=starts.new_tensor([p]))
    return starts.int(), lengths.int()


def _check(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_feat_shape, interval_starts, interval_lengths):
    if depth.dim() != 5 or feat.dim() != 5:
        raise ValueError(f"{OP}: depth must be [B,N,D,H,W] and feat [B,N,H,W,C]; got {tuple(depth.shape)} "
                         f"and {tuple(feat.shape)}")
    if depth.shape[:2] != feat.shape[:2] or depth.shape[3:] != feat.shape[2:4]:
        raise ValueError(f"{OP}: depth {tuple(depth.shape)} and feat {tuple(feat.shape)} disagree on B, N, H or W")
    if len(bev_feat_shape) != 5:
        raise ValueError(f"{OP}: bev_feat_shape must be (B, Z, Y, X, C); got {bev_feat_shape}")
    shape = tuple(int(s) for s in bev_feat_shape)
    if shape[4] != feat.shape[4]:
        raise ValueError(f"{OP}: bev_feat_shape C={shape[4]} but feat has C={feat.shape[4]}")
    n = ranks_bev.numel()
    for name, r in (("ranks_depth", ranks_depth), ("ranks_feat", ranks_feat), ("ranks_bev", ranks_bev)):
        if r.dim() != 1 or r.numel() != n or r.dtype.is_floating_point:
            raise ValueError(f"{OP}: {name} must be a 1-D integer tensor of the same length as ranks_bev ({n}); "
                             f"got {r.dtype} {tuple(r.shape)}")
    if (interval_starts is None) != (interval_lengths is None):
        raise ValueError(f"{OP}: pass both interval_starts and interval_lengths, or neither")
    return shape


def bev_pool_v2(depth: torch.Tensor, feat: torch.Tensor, ranks_depth: torch.Tensor, ranks_feat: torch.Tensor,
                ranks_bev: torch.Tensor, bev_feat_shape: Sequence[int],
                interval_starts: Optional[torch.Tensor] = None,
                interval_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum depth[ranks_depth[k]] * feat[ranks_feat[k], :] into BEV cell ranks_bev[k]; returns [B, C, Z, Y, X].

    Args:
        depth: [B, N, D, H, W] depth probabilities (flat index space B*N*D*H*W).
        feat: [B, N, H, W, C] context features (flat index space B*N*H*W, C innermost).
        ranks_depth, ranks_feat, ranks_bev: [P] integer indices (int32 upstream), ranks_bev = b*Z*Y*X + z*Y*X
            + y*X + x. Upstream sorts the points by ranks_bev; unsorted points are accepted here too.
        bev_feat_shape: (B, Z, Y, X, C).
        interval_starts, interval_lengths: optional [K] int32 runs of equal ranks_bev (as upstream's
            ``voxel_pooling_prepare_v2`` returns). Only the CUDA kernel needs them; computed when missing.

    Returns float32 [B, C, Z, Y, X] (contiguous), zero where no point lands. Gradients flow to depth and feat
    (accumulating: a depth entry used by several points gets the sum).
    """
    shape = _check(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_feat_shape,
                   interval_starts, interval_lengths)

    def cuda(kernel):
        starts, lengths = interval_starts, interval_lengths
        if starts is None:
            starts, lengths = compute_intervals(ranks_bev)
        return kernel(depth, feat, ranks_depth, ranks_feat, ranks_bev, list(shape), starts, lengths)

    return run_op(
        OP, feat,
        portable=lambda: _portable(depth, feat, ranks_depth, ranks_feat, ranks_bev, shape,
                                   interval_starts is not None),
        npu=lambda mx: _npu(mx, depth, feat, ranks_depth, ranks_feat, ranks_bev, shape),
        cuda=("mmdet3d.ops.bev_pool_v2.bev_pool", "bev_pool_v2", cuda, "FB-BEV's compiled bev_pool_v2_ext"))


def _portable(depth, feat, ranks_depth, ranks_feat, ranks_bev, shape, trusted_sorted: bool) -> torch.Tensor:
    b, z, y, x, c = shape
    cdtype = torch.float64 if torch.float64 in (depth.dtype, feat.dtype) else torch.float32
    d = depth.reshape(-1).to(cdtype)
    f = feat.reshape(-1, c).to(cdtype)
    rd, rf, rb = ranks_depth.long(), ranks_feat.long(), ranks_bev.long()
    order = None
    if csr_supported(f):
        # The CSR path needs rows in order; upstream sorts already (the given intervals vouch for that).
        if trusted_sorted or rb.numel() < 2 or bool((rb[1:] >= rb[:-1]).all()):
            order = "dst"
        else:
            perm = torch.argsort(rb, stable=True)
            rd, rf, rb = rd[perm], rf[perm], rb[perm]
            order = "dst"
    out = weighted_scatter(d.index_select(0, rd), f, rb, rf, b, z * y * x, order)  # [B, C, Z*Y*X]
    return out.view(b, c, z, y, x)


def _npu(mx, depth, feat, ranks_depth, ranks_feat, ranks_bev, shape) -> Optional[torch.Tensor]:
    b, z, y, x, c = shape
    if ranks_bev.numel() == 0 or feat.numel() == 0:
        log_once(OP, "no points: mx_driving.bev_pool_v3 rejects empty inputs; using the portable code",
                 logging.INFO)
        return None
    cells = b * z * y * x
    cmax = min(NPU_MAX_C, (NPU_MAX_OUT_ELEMENTS // cells) // NPU_C_MULTIPLE * NPU_C_MULTIPLE)
    if cmax < NPU_C_MULTIPLE:
        log_once(OP, f"B*Z*Y*X={cells} leaves no room for 8 channels under bev_pool_v3's 2^31 output limit; "
                     "using the portable code")
        return None
    depth32 = depth.float().contiguous()
    feat32 = feat.float().contiguous()
    cp = int(math.ceil(c / NPU_C_MULTIPLE) * NPU_C_MULTIPLE)
    if cp != c:
        log_once(OP, f"bev_pool_v3 needs C % 8 == 0: zero-padding C={c} to {cp} (exact; padding is cut off)")
        feat32 = F.pad(feat32, (0, cp - c))
    rd = ranks_depth.to(torch.int32).contiguous()
    rf = ranks_feat.to(torch.int32).contiguous()
    rb = ranks_bev.to(torch.int32).contiguous()
    if cp <= cmax:
        out = mx.bev_pool_v3(depth32, feat32, rd, rf, rb, [b, z, y, x, cp])
    else:
        log_once(OP, f"bev_pool_v3 takes at most {cmax} channels here (C <= 360, B*Z*Y*X*C <= 2^31): "
                     f"splitting C={cp} into chunks")
        outs = [mx.bev_pool_v3(depth32, feat32[..., s:s + cmax].contiguous(), rd, rf, rb,
                               [b, z, y, x, min(cmax, cp - s)])
                for s in range(0, cp, cmax)]
        out = torch.cat(outs, dim=1)
    return out[:, :c].contiguous() if cp != c else out
