"""LSS voxel pooling of FB-OCC / BEVDet: ``bev_pool_v2`` (upstream contract, see UPSTREAM.md 3.3).

Backends:

* npu: ``mx_driving.bev_pool_v3`` (no sorting or intervals; atomic adds). Its documented limits are
  C % 8 == 0, C <= 360 and B*Z*Y*X*C <= 2^31: channels are zero-padded to a multiple of 8 (exact: the padded
  channels are cut off) and split into chunks that fit; a call no chunking can fit runs the portable code.
* cuda: FB-BEV's compiled ``mmdet3d.ops.bev_pool_v2.bev_pool.bev_pool_v2`` when importable, given points sorted
  into runs of one cell (it needs them) and unique ranks_depth when depth needs a gradient (its backward writes
  grad_depth per point); otherwise the portable code.
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


def _is_sorted(r: torch.Tensor) -> bool:
    return r.numel() < 2 or bool((r[1:] >= r[:-1]).all())


def _interval_points(ranks_bev: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, sorted_rb: bool):
    """The points the kernels pool for given intervals, as ``(positions, cells)``, or None for plain runs.

    Kernel semantics (FB-BEV ``bev_pool_cuda.cu``, DrivingSDK ``bev_pool_v2``): interval i writes the sum over
    points starts[i] .. starts[i] + lengths[i] - 1 into cell ``ranks_bev[starts[i]]``, whatever the ranks_bev of
    the other points in it; a point in no interval is not pooled, a point in two intervals is pooled twice.
    ``positions`` [Q] are the pooled points in that order and ``cells`` [Q] the cell each one is added to. None
    means the intervals are exactly the runs of ranks_bev (each point once, one cell per run): the ranks then
    stand as they are. Refused: intervals reading past the points, and two intervals writing the same cell (the
    kernel writes, so the result would depend on thread order). ``sorted_rb``: ranks_bev is non-decreasing.
    """
    if starts.dim() != 1 or lengths.dim() != 1 or starts.numel() != lengths.numel() or \
            starts.dtype.is_floating_point or lengths.dtype.is_floating_point:
        raise ValueError(f"{OP}: interval_starts and interval_lengths must be 1-D integer tensors of one length; got "
                         f"{starts.dtype} {tuple(starts.shape)} and {lengths.dtype} {tuple(lengths.shape)}")
    p, k = ranks_bev.numel(), starts.numel()
    if k == 0:
        empty = torch.zeros(0, dtype=torch.long, device=ranks_bev.device)
        return None if p == 0 else (empty, empty)
    st, ln = starts, lengths.to(starts.dtype)  # int32 upstream; index_select takes int32 and int64 alike
    ends = st + ln
    lo_s, hi_s, lo_l, hi_end = torch.stack([st.min(), st.max(), ln.min(), ends.max()]).tolist()
    if lo_s < 0 or hi_s >= p or lo_l < 0 or hi_end > p:
        raise ValueError(f"{OP}: intervals must lie within the {p} points (0 <= interval_starts < {p}, "
                         f"interval_lengths >= 0, start + length <= {p}); got starts in [{lo_s}, {hi_s}], lengths >= "
                         f"{lo_l}, ends up to {hi_end}")
    cells = ranks_bev.index_select(0, st)
    contiguous = (st[1:] == ends[:-1]).all() & (st[0] == 0) & (ends[-1] == p)
    if sorted_rb and lo_l > 0:
        # Sorted ranks (the common case, one host sync): the intervals are the runs iff they tile the points, each
        # run's last point has its first point's cell, and the cells increase from run to run.
        constant = (ranks_bev.index_select(0, ends - 1) == cells).all()
        if bool(contiguous & constant & (cells[1:] > cells[:-1]).all()):
            return None
    ordered = torch.sort(cells).values
    if k > 1 and bool((ordered[1:] == ordered[:-1]).any()):
        dup = int(ordered[1:][ordered[1:] == ordered[:-1]][0])
        raise ValueError(f"{OP}: two intervals write BEV cell {dup}: the kernel writes one sum per interval, so the "
                         "result would depend on thread order. Pass the runs of sorted ranks_bev "
                         "(compute_intervals(ranks_bev)) or no intervals.")
    st, ln, cells = st.long(), ln.long(), cells.long()
    if bool(contiguous) and bool((ranks_bev.long() == cells.repeat_interleave(ln)).all()):
        return None  # unsorted, but every interval is a run of one cell and no two share a cell
    offsets = torch.cumsum(ln, 0) - ln
    q = int(ln.sum())
    first = st.repeat_interleave(ln, output_size=q)
    positions = first + torch.arange(q, device=st.device) - offsets.repeat_interleave(ln, output_size=q)
    return positions, cells.repeat_interleave(ln, output_size=q)


def bev_pool_v2(depth: torch.Tensor, feat: torch.Tensor, ranks_depth: torch.Tensor, ranks_feat: torch.Tensor,
                ranks_bev: torch.Tensor, bev_feat_shape: Sequence[int],
                interval_starts: Optional[torch.Tensor] = None,
                interval_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum depth[ranks_depth[k]] * feat[ranks_feat[k], :] into BEV cells; returns [B, C, Z, Y, X].

    Args:
        depth: [B, N, D, H, W] depth probabilities (flat index space B*N*D*H*W).
        feat: [B, N, H, W, C] context features (flat index space B*N*H*W, C innermost).
        ranks_depth, ranks_feat, ranks_bev: [P] integer indices (int32 upstream), ranks_bev = b*Z*Y*X + z*Y*X
            + y*X + x. Any order, repeats allowed; values outside their index spaces are refused (portable).
        bev_feat_shape: (B, Z, Y, X, C).
        interval_starts, interval_lengths: optional [K] integer intervals of points, as upstream's
            ``voxel_pooling_prepare_v2`` returns them (the runs of sorted ranks_bev).

    Without intervals point k is added into cell ranks_bev[k]. With intervals the kernels' semantics hold:
    interval i adds points starts[i] .. starts[i]+lengths[i]-1 into cell ranks_bev[starts[i]], points outside
    every interval are left out, and two intervals naming the same cell are refused (see ``_interval_points``).
    For the runs of ranks_bev both readings agree.

    Returns float32 [B, C, Z, Y, X] (contiguous), zero where nothing lands. Gradients flow to depth and feat and
    are those of this sum (accumulating: a depth entry used by several points gets the sum). The upstream CUDA
    kernel's backward instead recomputes per-point cells and writes grad_depth per point; the two agree for
    intervals that are runs and unique ranks_depth, and the kit hands the kernel only such input.
    """
    shape = _check(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_feat_shape,
                   interval_starts, interval_lengths)
    rd, rf, rb = ranks_depth, ranks_feat, ranks_bev
    runs = interval_starts is not None
    sorted_rb: Optional[bool] = None  # unknown until asked
    if runs:
        sorted_rb = _is_sorted(ranks_bev)
        picked = _interval_points(ranks_bev, interval_starts, interval_lengths, sorted_rb)
        if picked is not None:
            positions, cells = picked
            rd, rf, rb = ranks_depth.index_select(0, positions), ranks_feat.index_select(0, positions), cells
            runs, sorted_rb = False, None  # the kernels get the pooled points, each with its own cell

    def cuda(kernel):
        if torch.is_grad_enabled() and depth.requires_grad and rd.numel() != torch.unique(rd).numel():
            log_once(OP, "repeated ranks_depth: the CUDA kernel's backward writes grad_depth per point instead of "
                         "summing; using the portable code")
            return None
        if runs:
            return kernel(depth, feat, rd, rf, rb, list(shape), interval_starts, interval_lengths)
        r_d, r_f, r_b = rd, rf, rb
        if not _is_sorted(r_b):
            order = torch.argsort(r_b, stable=True)  # the kernel needs each cell's points in one run
            r_d, r_f, r_b = r_d[order], r_f[order], r_b[order]
        starts, lengths = compute_intervals(r_b)
        return kernel(depth, feat, r_d, r_f, r_b, list(shape), starts, lengths)

    return run_op(
        OP, feat,
        portable=lambda: _portable(depth, feat, rd, rf, rb, shape, sorted_rb),
        npu=lambda mx: _npu(mx, depth, feat, rd, rf, rb, shape),
        cuda=("mmdet3d.ops.bev_pool_v2.bev_pool", "bev_pool_v2", cuda, "FB-BEV's compiled bev_pool_v2_ext"))


def _check_ranges(depth, feat, rd, rf, rb, shape) -> None:
    """Indices outside their index spaces: the kernels read or write out of bounds; refuse them."""
    if rb.numel() == 0:
        return
    b, z, y, x, c = shape
    bounds = (("ranks_depth", rd, depth.numel()), ("ranks_feat", rf, feat.numel() // max(1, c)),
              ("ranks_bev", rb, b * z * y * x))
    lims = torch.stack([t for _, r, _ in bounds for t in (r.min().long(), r.max().long())]).tolist()
    for i, (name, _, hi) in enumerate(bounds):
        lo_v, hi_v = lims[2 * i], lims[2 * i + 1]
        if lo_v < 0 or hi_v >= hi:
            raise ValueError(f"{OP}: {name} must lie in [0, {hi}) for depth {tuple(depth.shape)}, feat "
                             f"{tuple(feat.shape)} and bev_feat_shape {tuple(shape)}; got values in [{lo_v}, {hi_v}]")


def _portable(depth, feat, ranks_depth, ranks_feat, ranks_bev, shape, sorted_rb: Optional[bool] = None):
    _check_ranges(depth, feat, ranks_depth, ranks_feat, ranks_bev, shape)
    b, z, y, x, c = shape
    cdtype = torch.float64 if torch.float64 in (depth.dtype, feat.dtype) else torch.float32
    d = depth.reshape(-1).to(cdtype)
    f = feat.reshape(-1, c).to(cdtype)
    rd, rf, rb = ranks_depth.long(), ranks_feat.long(), ranks_bev.long()
    order = None
    if csr_supported(f):
        # The CSR path needs rows in order: sort unsorted points by cell (stable, so sums keep their order).
        if not (_is_sorted(rb) if sorted_rb is None else sorted_rb):
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
