#!/usr/bin/env python3
"""Time bevkit.ops' portable implementations against their baselines at the real FB-OCC / BEVDepth shapes.

Prints ONE JSON document: a list of records
    {op, pass: 'fwd'|'fwd_bwd', impl, median_ms, peak_mb, [speedup_vs_baseline], input_mb, output_mb, ...}
Baselines run in the same process:
  * 'lss-cumsum': the cumsum trick of the original LSS (sort by rank, cumsum, differences at run ends, custom
    backward) for bev_pool_v2 and voxel_pooling_train (written here from its description);
  * 'mmcv-pytorch': mmcv's ``multi_scale_deformable_attn_pytorch`` for MSDA (skipped if mmcv is missing);
  * 'mmcv-compiled-cpu': mmcv's compiled deform_conv2d CPU kernel, when importable.

Peak memory on CPU: torch has no CPU peak counter, so each measured call runs once more under
``torch.profiler`` with ``profile_memory=True``; every CPU allocation and free made by torch's allocator is an
event, and the running sum of the events in time order gives the peak growth of live tensor memory during the
call (``peak_mb``: outputs, gradients and temporaries; memory held before the call, such as the inputs, is not
counted). Allocations outside torch's allocator (MKL's internal buffers) are not seen; ``peak_rss_mb`` is a
cross-check from sampling the process RSS every millisecond with glibc's mmap threshold pinned at 64 KiB (so
freed large blocks leave the RSS at once). ``peak_extra_mb`` = peak_mb minus the bytes of the results every
implementation must return (the output, and in fwd_bwd the input gradients): the working memory the formulation
itself needs, which the targets compare with the input tensors (``extra_vs_inputs``).

Usage: python tools/bench_ops.py [--repeat 5] [--ops bev_pool_v2,voxel_pooling_train,...] [--quick]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bevkit.ops as ops  # noqa: E402

MB = 1024.0 * 1024.0


# ------------------------------------------------------------------------------------------------ geometry


class Rig:
    """Six outward-looking pinhole cameras 1.6 m above the ego origin (a stand-in for the nuScenes rig)."""

    def __init__(self, n=6, img=(256, 704), src_width=1600.0, focal=1260.0, height=1.6):
        self.n, self.img, self.height = n, img, height
        self.fx = self.fy = focal * img[1] / src_width
        self.cx, self.cy = img[1] / 2.0, img[0] / 2.0
        yaw = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
        self.fwd = torch.stack([yaw.cos(), yaw.sin(), torch.zeros(n, dtype=torch.float64)], -1)
        self.right = torch.stack([yaw.sin(), -yaw.cos(), torch.zeros(n, dtype=torch.float64)], -1)

    def frustum(self, depths, h, w):
        """Ego points [N, D, H, W, 3] of the LSS frustum (u, v on the image grid, d from ``depths``)."""
        u = torch.linspace(0, self.img[1] - 1, w, dtype=torch.float64)
        v = torch.linspace(0, self.img[0] - 1, h, dtype=torch.float64)
        d, vv, uu = torch.meshgrid(depths.double(), v, u, indexing="ij")
        xc, yc = (uu - self.cx) / self.fx * d, (vv - self.cy) / self.fy * d
        pts = d[None, ..., None] * self.fwd.view(-1, 1, 1, 1, 3) + xc[None, ..., None] * self.right.view(-1, 1, 1, 1, 3)
        pts[..., 2] = pts[..., 2] + self.height - yc[None]
        return pts

    def project(self, pts):
        """pts [..., 3] ego -> (u/W, v/H) [N, ..., 2], camera depth [N, ...]."""
        rel = pts.double().clone()
        rel[..., 2] -= self.height
        shape = (self.n,) + (1,) * (pts.dim() - 1) + (3,)
        zc = (rel.unsqueeze(0) * self.fwd.view(shape)).sum(-1)
        xc = (rel.unsqueeze(0) * self.right.view(shape)).sum(-1)
        yc = -rel[..., 2].unsqueeze(0).expand_as(zc)
        zs = zc.clamp(min=1e-5)
        u = (self.fx * xc / zs + self.cx) / self.img[1]
        v = (self.fy * yc / zs + self.cy) / self.img[0]
        return torch.stack([u, v], -1), zc


def fbocc_bev_pool_inputs(b=1, n=6, d=80, h=16, w=44, c=80):
    """Upstream voxel_pooling_prepare_v2 on the synthetic rig: FB-OCC grid 100x100x8 (0.8 m), bins 2..42 (0.5 m)."""
    rig = Rig(n)
    pts = rig.frustum(2.0 + 0.5 * torch.arange(d), h, w).float()
    pts = pts.unsqueeze(0).expand(b, n, d, h, w, 3)
    lower = torch.tensor([-40.0, -40.0, -1.0])
    coor = ((pts - lower) / 0.8).long().view(-1, 3)  # truncation toward zero, as upstream
    nx, ny, nz = 100, 100, 8
    total = b * n * d * h * w
    ranks_depth = torch.arange(total, dtype=torch.int32)
    ranks_feat = torch.arange(b * n * h * w, dtype=torch.int32).view(b, n, 1, h, w).expand(b, n, d, h, w).reshape(-1)
    batch = torch.arange(b).view(b, 1).expand(b, total // b).reshape(-1)
    kept = ((coor >= 0) & (coor < torch.tensor([nx, ny, nz]))).all(1)
    coor, ranks_depth, ranks_feat, batch = coor[kept], ranks_depth[kept], ranks_feat[kept], batch[kept]
    ranks_bev = batch * (nz * ny * nx) + coor[:, 2] * (ny * nx) + coor[:, 1] * nx + coor[:, 0]
    order = ranks_bev.argsort()
    ranks_bev, ranks_depth, ranks_feat = ranks_bev[order].int(), ranks_depth[order], ranks_feat[order]
    starts, lengths = ops.compute_intervals(ranks_bev)
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(b, n, d, h, w, generator=g).softmax(2)
    feat = torch.randn(b, n, h, w, c, generator=g)
    return dict(depth=depth, feat=feat, ranks_depth=ranks_depth.contiguous(), ranks_feat=ranks_feat.contiguous(),
                ranks_bev=ranks_bev.contiguous(), shape=(b, nz, ny, nx, c), starts=starts, lengths=lengths)


def bevdepth_geom(b=1, n=6, d=112, h=16, w=44):
    """BEVDepth get_geometry + quantisation: grid 128x128x1 over x, y [-51.2, 51.2] (0.8 m), z [-5, 3]; bins 2..58."""
    rig = Rig(n)
    pts = rig.frustum(2.0 + 0.5 * torch.arange(d), h, w).float()
    pts = pts.unsqueeze(0).expand(b, n, d, h, w, 3)
    lower = torch.tensor([-51.2, -51.2, -5.0])
    size = torch.tensor([0.8, 0.8, 8.0])
    return ((pts - lower) / size).int().contiguous()  # `.int()` truncates toward zero, as upstream


def msda_inputs(kind, b=1, seed=0):
    """The three FB-OCC uses of MSDA (UPSTREAM.md 3.3), with sampling locations built like upstream."""
    g = torch.Generator().manual_seed(seed)
    if kind == "bev_self_attn":
        nq, nh, dh, npt, shape = 10000, 8, 10, 4, (100, 100)
        ys, xs = torch.meshgrid(torch.arange(100), torch.arange(100), indexing="ij")
        ref = torch.stack([(xs + 0.5) / 100, (ys + 0.5) / 100], -1).view(1, nq, 1, 1, 1, 2).float()
        off = torch.randn(b, nq, nh, 1, npt, 2, generator=g) * 2.0 / torch.tensor([100.0, 100.0])
        loc = (ref + off).expand(b, nq, nh, 1, npt, 2).contiguous()
        bs = b
    else:
        ref, max_len = _da_reference_points(b)
        bs, nz = b * 6, 4
        if kind == "da_cross_attn":
            nq, nh, dh, npt, shape = max_len, 8, 10, 8, (16, 44)
            off = torch.randn(bs, nq, nh, 1, npt // nz, nz, 2, generator=g) / torch.tensor([44.0, 16.0])
            loc = (ref[:, :, None, None, None] + off).view(bs, nq, nh, 1, npt, 2)
        else:  # depth sampling: plain bilinear sampling of the 80-bin depth distribution at the reference points
            nq, nh, dh, npt, shape = max_len * nz, 1, 80, 1, (16, 44)
            loc = ref.reshape(bs, nq, 1, 1, 1, 2)
    value = torch.randn(bs, shape[0] * shape[1], nh, dh, generator=g)
    attn = torch.rand(bs, nq, nh, 1, npt, generator=g).softmax(-1) if npt > 1 else torch.ones(bs, nq, nh, 1, 1)
    shapes = torch.tensor([shape])
    return dict(value=value, shapes=shapes, starts=torch.zeros(1, dtype=torch.long), loc=loc.float().contiguous(),
                attn=attn.contiguous())


def _da_reference_points(b):
    """Per-camera rebatched reference points [B*6, max_len, 4, 2] of FB-OCC's spatial cross attention."""
    rig = Rig(6)
    cells = (torch.arange(100, dtype=torch.float64) + 0.5) * 0.8 - 40.0
    ys, xs = torch.meshgrid(cells, cells, indexing="ij")
    zs = torch.tensor([-0.2, 1.4, 3.0, 4.6], dtype=torch.float64)
    pts = torch.stack([xs[..., None].expand(100, 100, 4), ys[..., None].expand(100, 100, 4),
                       zs.expand(100, 100, 4)], -1).view(10000, 4, 3)
    uv, z = rig.project(pts)  # [6, 10000, 4, 2], [6, 10000, 4]
    visible = (z > 1e-5) & (uv > 1e-5).all(-1) & (uv < 1 - 1e-5).all(-1)
    per_cam = [torch.nonzero(visible[i].any(-1)).squeeze(1) for i in range(6)]
    max_len = max(len(q) for q in per_cam)
    ref = torch.zeros(6, max_len, 4, 2)
    for i, q in enumerate(per_cam):
        ref[i, :len(q)] = uv[i, q].float()
    return ref.repeat(b, 1, 1, 1), max_len


# ------------------------------------------------------------------------------------------------ baselines


class QuickCumsum(torch.autograd.Function):
    """The original LSS cumsum trick: x sorted by rank -> one row per rank (sum of its run)."""

    @staticmethod
    def forward(ctx, x, ranks):
        x = x.cumsum(0)
        kept = torch.ones(x.shape[0], device=x.device, dtype=torch.bool)
        kept[:-1] = ranks[1:] != ranks[:-1]
        x, ranks = x[kept], ranks[kept]
        x = torch.cat((x[:1], x[1:] - x[:-1]))
        ctx.save_for_backward(kept)
        ctx.mark_non_differentiable(ranks)
        return x, ranks

    @staticmethod
    def backward(ctx, gradx, gradranks):
        (kept,) = ctx.saved_tensors
        back = torch.cumsum(kept, 0)
        back[kept] -= 1
        return gradx[back], None


def lss_bev_pool(depth, feat, ranks_depth, ranks_feat, ranks_bev, shape):
    b, z, y, x, c = shape
    pts = depth.reshape(-1)[ranks_depth.long()].unsqueeze(1) * feat.reshape(-1, c)[ranks_feat.long()]
    rows, ranks = QuickCumsum.apply(pts, ranks_bev.long())
    out = torch.zeros(b * z * y * x, c, dtype=rows.dtype)
    out[ranks] = rows
    return out.view(b, z, y, x, c).permute(0, 4, 1, 2, 3).contiguous()


def lss_voxel_pooling(geom, feats, voxel_num):
    nx, ny, nz = voxel_num
    b, c = feats.shape[0], feats.shape[-1]
    g = geom.reshape(-1, 3).long()
    x = feats.reshape(-1, c)
    batch = torch.arange(b).repeat_interleave(g.shape[0] // b)
    kept = (g[:, 0] >= 0) & (g[:, 0] < nx) & (g[:, 1] >= 0) & (g[:, 1] < ny) & (g[:, 2] >= 0) & (g[:, 2] < nz)
    x, g, batch = x[kept], g[kept], batch[kept]
    ranks = (batch * ny + g[:, 1]) * nx + g[:, 0]
    order = ranks.argsort()
    x, ranks = x[order], ranks[order]
    rows, ranks = QuickCumsum.apply(x, ranks)
    out = torch.zeros(b * ny * nx, c, dtype=rows.dtype)
    out[ranks] = rows
    return out.view(b, ny, nx, c).permute(0, 3, 1, 2)


def _prepare_mmcv():
    from bevkit.compat import prepare_imports  # torchvision's compiled ops may need a shim first

    prepare_imports()


def mmcv_msda():
    _prepare_mmcv()
    try:
        from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch
        return multi_scale_deformable_attn_pytorch
    except Exception:  # mmcv missing or broken
        return None


# ------------------------------------------------------------------------------------------------ measuring


def _pin_malloc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big blocks are mmapped and unmapped on free
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def _rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _nbytes(ts):
    seen, total = set(), 0
    for t in ts:
        if t is None:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _run(fn, inputs, grad_inputs, backward):
    leaves = [t.detach().requires_grad_(True) if i in grad_inputs and backward else t for i, t in enumerate(inputs)]
    if backward:
        out = fn(*leaves)
        g = _grad_for(out)
        grads = torch.autograd.grad(out, [leaves[i] for i in grad_inputs], g, allow_unused=True)
        return out, grads
    with torch.no_grad():
        return fn(*leaves), ()


_GRADS = {}


def _grad_for(out):
    key = (tuple(out.shape), out.dtype)
    if key not in _GRADS:
        _GRADS[key] = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return _GRADS[key]


def time_interleaved(impls, backward, repeat, warmup=1):
    """Median wall time of each impl; the impls take turns in every round, so a busy machine hurts all alike."""
    for fn, inputs, grad_inputs in impls:
        for _ in range(warmup):
            _run(fn, inputs, grad_inputs, backward)
        if backward:
            _grad_for(_run(fn, inputs, grad_inputs, False)[0])  # build the output gradient outside the timing
    times = [[] for _ in impls]
    for _ in range(repeat):
        for i, (fn, inputs, grad_inputs) in enumerate(impls):
            gc.collect()
            t0 = time.perf_counter()
            res = _run(fn, inputs, grad_inputs, backward)
            times[i].append((time.perf_counter() - t0) * 1000.0)
            del res
    return [(round(statistics.median(t), 2), round(min(t), 2)) for t in times]


def memory(fn, inputs, grad_inputs, backward):
    """Peak growth of torch's CPU allocations (profiler events) and of the sampled RSS during one call."""
    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out, grads = _run(fn, inputs, grad_inputs, backward)
    result_bytes = _nbytes(_tensors(out) + list(grads))
    del out, grads
    events = sorted(((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                     if e.self_cpu_memory_usage), key=lambda t: t[0])
    peak = level = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    gc.collect()
    base = _rss()
    samples = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(_rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    res = _run(fn, inputs, grad_inputs, backward)
    stop.set()
    th.join()
    del res
    return dict(peak_mb=round(peak / MB, 2), peak_rss_mb=round((max(samples) - base) / MB, 2),
                result_mb=round(result_bytes / MB, 2), peak_extra_mb=round(max(0, peak - result_bytes) / MB, 2))


# ------------------------------------------------------------------------------------------------ cases


def cases(selected, quick):
    out = []

    def want(name):
        return not selected or name in selected

    if want("bev_pool_v2"):
        kw = fbocc_bev_pool_inputs(d=20 if quick else 80)
        args = [kw["depth"], kw["feat"], kw["ranks_depth"], kw["ranks_feat"], kw["ranks_bev"], kw["starts"],
                kw["lengths"]]
        note = dict(points=int(kw["ranks_bev"].numel()), shape=list(kw["shape"]))
        out.append(("bev_pool_v2", "bevkit-portable", True,
                    lambda d, f, rd, rf, rb, st, ln, sh=kw["shape"]: ops.bev_pool_v2(d, f, rd, rf, rb, sh, st, ln),
                    args, [0, 1], note))
        out.append(("bev_pool_v2", "lss-cumsum", False,
                    lambda d, f, rd, rf, rb, st, ln, shape=kw["shape"]: lss_bev_pool(d, f, rd, rf, rb, shape), args,
                    [0, 1], note))
    if want("voxel_pooling_train") or want("voxel_pooling_inference"):
        d = 28 if quick else 112
        geom = bevdepth_geom(d=d)
        g = torch.Generator().manual_seed(0)
        depth = torch.rand(6, d, 16, 44, generator=g).softmax(1)
        context = torch.randn(6, 80, 16, 44, generator=g)
        feats = (depth.view(1, 6, d, 1, 16, 44) * context.view(1, 6, 1, 80, 16, 44)).permute(0, 1, 2, 4, 5, 3)
        feats = feats.contiguous()
        kept = ((geom >= 0) & (geom < torch.tensor([128, 128, 1], dtype=torch.int32))).all(-1)
        note = dict(points=int(geom[..., 0].numel()), in_range=int(kept.sum()), voxel_num=[128, 128, 1])
        if want("voxel_pooling_train"):
            out.append(("voxel_pooling_train", "bevkit-portable", True,
                        lambda gm, f: ops.voxel_pooling_train(gm, f, [128, 128, 1]), [geom, feats], [1], note))
            out.append(("voxel_pooling_train", "lss-cumsum", False,
                        lambda gm, f: lss_voxel_pooling(gm, f, [128, 128, 1]), [geom, feats], [1], note))
        if want("voxel_pooling_inference"):
            out.append(("voxel_pooling_inference", "bevkit-portable", True,
                        lambda gm, dp, cx: ops.voxel_pooling_inference(gm, dp, cx, [128, 128, 1]),
                        [geom, depth, context], None, note))
            out.append(("voxel_pooling_inference", "lss-cumsum", False,
                        lambda gm, dp, cx: lss_voxel_pooling(
                            gm, (dp.view(1, 6, d, 1, 16, 44) * cx.view(1, 6, 1, 80, 16, 44)).permute(0, 1, 2, 4, 5, 3),
                            [128, 128, 1]), [geom, depth, context], None, note))
    msda_names = ("msda", "msda_bev_self_attn", "msda_da_cross_attn", "msda_depth_sampling",
                  "depth_weighted_deformable_attn")
    wants_msda = any(want(n) for n in msda_names)
    ref = mmcv_msda() if wants_msda else None
    for kind in ("bev_self_attn", "da_cross_attn", "depth_sampling"):
        if not want("msda") and not want(f"msda_{kind}"):
            continue
        kw = msda_inputs(kind)
        args = [kw["value"], kw["loc"], kw["attn"]]
        note = dict(value=list(kw["value"].shape), sampling_locations=list(kw["loc"].shape))
        name = f"msda_{kind}"
        out.append((name, "bevkit-portable", True,
                    lambda v, l_, a, kw=kw: ops.multi_scale_deformable_attn(v, kw["shapes"], kw["starts"], l_, a),
                    args, [0, 1, 2], note))
        if ref is not None:
            out.append((name, "mmcv-pytorch", False, lambda v, l_, a, kw=kw: ref(v, kw["shapes"], l_, a),
                        args, [0, 1, 2], note))
    if want("msda") or want("depth_weighted_deformable_attn"):
        kw = msda_inputs("da_cross_attn")
        refpts, max_len = _da_reference_points(1)
        g = torch.Generator().manual_seed(3)
        depth_prob = torch.rand(6, 704, 80, generator=g).softmax(-1)
        bins = torch.randint(0, 80, (6, max_len, 4), generator=g)
        onehot = F.one_hot(bins, 80)
        args = [kw["value"], kw["loc"], kw["attn"], depth_prob]
        note = dict(value=list(kw["value"].shape), sampling_locations=list(kw["loc"].shape), depth=[6, 704, 80])
        out.append(("depth_weighted_deformable_attn", "bevkit-portable", True,
                    lambda v, l_, a, dp, kw=kw: ops.depth_weighted_deformable_attn(v, kw["shapes"], kw["starts"], l_,
                                                                                   a, dp, refpts, onehot),
                    args, [0, 1, 2, 3], note))
        if ref is not None:
            def upstream_math(v, l_, a, dp, kw=kw):
                # the upstream CUDA path's math, run through mmcv's pure-PyTorch MSDA
                w = ref(dp.unsqueeze(2), kw["shapes"], refpts.reshape(6, max_len * 4, 1, 1, 1, 2),
                        torch.ones(6, max_len * 4, 1, 1, 1)).view(6, max_len, 4, 80)
                w = (w * onehot).sum(-1).unsqueeze(2).repeat(1, 1, 2, 1).reshape(6, max_len, 8)
                return ref(v, kw["shapes"], l_, a * w[:, :, None, None, :])

            out.append(("depth_weighted_deformable_attn", "mmcv-pytorch", False, upstream_math, args, [0, 1, 2, 3],
                        note))
            out.append(("depth_weighted_deformable_attn", "mmcv-pytorch-no-depth (upstream CPU fallback)", None,
                        lambda v, l_, a, dp, kw=kw: ref(v, kw["shapes"], l_, a), args, [0, 1, 2, 3], note))
    if want("grid_sample_3d"):
        g = torch.Generator().manual_seed(4)
        c = 128 if quick else 1280
        hist = torch.randn(1, c, 8, 100, 100, generator=g)
        grid = (torch.rand(1, 8, 100, 100, 3, generator=g) * 2.1 - 1.05)
        out.append(("grid_sample_3d", "bevkit-portable (F.grid_sample)", None,
                    lambda i, gr: ops.grid_sample_3d(i, gr), [hist, grid], None, dict(input=list(hist.shape))))
    if want("sigmoid_focal_loss"):
        g = torch.Generator().manual_seed(5)
        m = 200 * 200 * 16 // (256 if quick else 1)
        pred = torch.randn(m, 18, generator=g)
        target = torch.randint(0, 19, (m,), generator=g)
        out.append(("sigmoid_focal_loss", "bevkit-portable", True,
                    lambda p: ops.sigmoid_focal_loss(p, target, 2.0, 0.25, None, "none"), [pred], [0],
                    dict(pred=list(pred.shape))))
        _prepare_mmcv()
        try:  # FB-OCC's non-CUDA path: one-hot with C+1 classes, last column dropped, mmdet's python focal loss
            from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss
            out.append(("sigmoid_focal_loss", "mmdet-python (upstream CPU fallback)", False,
                        lambda p: py_sigmoid_focal_loss(p, F.one_hot(target, 19)[:, :18].to(p.dtype), None, 2.0, 0.25,
                                                        "none"), [pred], [0], dict(pred=list(pred.shape))))
        except Exception:  # mmdet missing or failing to import
            pass
    if want("deform_conv2d"):
        g = torch.Generator().manual_seed(6)
        cin = 128 if quick else 512
        x = torch.randn(6, cin, 16, 44, generator=g)
        offset = torch.randn(6, 18, 16, 44, generator=g)
        weight = torch.randn(cin, cin // 4, 3, 3, generator=g) * 0.02
        args = [x, offset, weight]
        note = dict(input=list(x.shape), groups=4)
        out.append(("deform_conv2d", "bevkit-portable", True,
                    lambda i, o, w: ops.deform_conv2d(i, o, w, 1, 1, 1, 4, 1), args, [0, 1, 2], note))
        _prepare_mmcv()
        try:
            from mmcv.ops.deform_conv import deform_conv2d as mmcv_dcn
            out.append(("deform_conv2d", "mmcv-compiled-cpu", False,
                        lambda i, o, w: mmcv_dcn(i, o, w, 1, 1, 1, 4, 1, False, 128), args, [0, 1, 2], note))
        except Exception:
            pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ops", default="", help="comma-separated subset: bev_pool_v2, voxel_pooling_train, "
                    "voxel_pooling_inference, msda, depth_weighted_deformable_attn, grid_sample_3d, "
                    "sigmoid_focal_loss, deform_conv2d")
    ap.add_argument("--quick", action="store_true", help="smaller shapes (smoke test of the script)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    selected = {s.strip() for s in args.ops.split(",") if s.strip()}
    records = []
    groups = {}
    for case in cases(selected, args.quick):
        groups.setdefault(case[0], []).append(case)
    with ops.force_backend("portable"):
        for op, group in groups.items():
            for p in ("fwd", "fwd_bwd"):
                group_p = [c for c in group if p == "fwd" or c[5]]
                if not group_p:
                    continue
                backward = p == "fwd_bwd"
                timings = time_interleaved([(c[3], c[4], c[5] or []) for c in group_p], backward, args.repeat)
                for (op_, impl, ours, fn, inputs, grad_inputs, note), (median, best) in zip(group_p, timings):
                    m = memory(fn, inputs, grad_inputs or [], backward)
                    in_mb = _nbytes(inputs) / MB
                    rec = dict(op=op, **{"pass": p}, impl=impl, median_ms=median, peak_mb=m["peak_mb"],
                               min_ms=best, peak_rss_mb=m["peak_rss_mb"], input_mb=round(in_mb, 2),
                               result_mb=m["result_mb"], peak_extra_mb=m["peak_extra_mb"],
                               extra_vs_inputs=round(m["peak_extra_mb"] / in_mb, 3) if in_mb else None,
                               baseline=ours is False, **note)
                    records.append(rec)
                    print(f"# {op:32s} {p:7s} {impl:48s} {median:9.1f} ms  peak {m['peak_mb']:8.1f} MB  "
                          f"extra {m['peak_extra_mb']:8.1f} MB  rss {m['peak_rss_mb']:8.1f} MB",
                          file=sys.stderr, flush=True)
    for rec in records:
        if rec["baseline"]:
            continue
        base = [r for r in records if r["op"] == rec["op"] and r["pass"] == rec["pass"] and r["baseline"]]
        if base and not rec["impl"].startswith("mmcv"):
            rec["speedup_vs_baseline"] = round(base[0]["median_ms"] / rec["median_ms"], 2)
            rec["baseline_impl"] = base[0]["impl"]
            fallback = [r for r in records if r["op"] == rec["op"] and r["pass"] == rec["pass"]
                        and "no-depth" in r["impl"]]
            if fallback:  # vs what upstream computes off CUDA (no depth weighting at all)
                rec["speedup_vs_upstream_cpu_fallback"] = round(fallback[0]["median_ms"] / rec["median_ms"], 2)
    env = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
               load_avg=os.getloadavg()[0])
    for rec in records:
        rec["env"] = env
    print(json.dumps(records, indent=1))


if __name__ == "__main__":
    _pin_malloc()  # process-wide malloc settings: only when run as the benchmark script
    main()
