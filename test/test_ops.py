"""Portable bevkit.ops against independent, obviously-correct references (loops / dense one-hot math, float64)."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import bevkit.ops as ops
from bevkit import torchcompat
from bevkit.ops import _scatter, bev_pool as bev_pool_mod, dispatch
from bevkit.ops import voxel_pooling as vp_mod
from tolerance import sum_tolerance

D64 = torch.float64
F32 = torch.float32


@pytest.fixture(autouse=True)
def _portable():
    with ops.force_backend("portable"):
        yield


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- bev_pool_v2


def bev_pool_reference(depth, feat, rd, rf, rb, shape):
    """Dense one-hot math: out = onehot(rb)^T @ ((onehot(rd) @ depth) * (onehot(rf) @ feat))."""
    b, z, y, x, c = shape
    p = rb.numel()
    sd = F.one_hot(rd.long(), depth.numel()).to(D64) if p else torch.zeros(0, depth.numel(), dtype=D64)
    sf = F.one_hot(rf.long(), feat.numel() // c).to(D64) if p else torch.zeros(0, feat.numel() // c, dtype=D64)
    sb = F.one_hot(rb.long(), b * z * y * x).to(D64) if p else torch.zeros(0, b * z * y * x, dtype=D64)
    per_point = (sd @ depth.reshape(-1)).unsqueeze(1) * (sf @ feat.reshape(-1, c))
    return (sb.t() @ per_point).view(b, z, y, x, c).permute(0, 4, 1, 2, 3)


def random_bev_case(seed, b=2, n=2, d=3, h=2, w=3, c=5, grid=(2, 3, 4), p=40, sort=True, unique_depth=True):
    g = _gen(seed)
    z, y, x = grid
    depth = torch.rand(b, n, d, h, w, generator=g, dtype=D64)
    feat = torch.randn(b, n, h, w, c, generator=g, dtype=D64)
    if unique_depth:
        rd = torch.randperm(depth.numel(), generator=g)[:p]
    else:
        rd = torch.randint(0, depth.numel(), (p,), generator=g)
    rf = torch.randint(0, b * n * h * w, (p,), generator=g)
    rb = torch.randint(0, b * z * y * x, (p,), generator=g)
    if p:
        rb[: p // 2] = rb[0]  # many points in one cell
    if sort:
        order = torch.argsort(rb, stable=True)
        rd, rf, rb = rd[order], rf[order], rb[order]
    return depth, feat, rd.int(), rf.int(), rb.int(), (b, z, y, x, c)


def test_bev_pool_v2_upstream_vector():
    """UPSTREAM.md 3.3 test vector: sum 4.4 and the exact gradients."""
    depth = torch.tensor([0.3, 0.4, 0.2, 0.1, 0.7, 0.6, 0.8, 0.9]).view(1, 1, 2, 2, 2).requires_grad_()
    feat = torch.ones(1, 1, 2, 2, 2, requires_grad=True)
    rd = torch.tensor([0, 4, 1, 6], dtype=torch.int32)
    rf = torch.tensor([0, 0, 1, 2], dtype=torch.int32)
    rb = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    starts, lengths = ops.compute_intervals(rb)
    assert starts.tolist() == [0, 2] and lengths.tolist() == [2, 2]
    out = ops.bev_pool_v2(depth, feat, rd, rf, rb, (1, 1, 2, 2, 2), starts, lengths)
    assert out.shape == (1, 2, 1, 2, 2) and out.dtype == torch.float32
    assert out.sum().item() == pytest.approx(4.4, abs=1e-6)
    out.sum().backward()
    tol = sum_tolerance(F32, n_terms=2, magnitude=1.0)  # float32 sums of at most 2 terms of size <= 1
    torch.testing.assert_close(depth.grad.view(-1), torch.tensor([2., 2, 0, 0, 2, 0, 2, 0]), **tol)
    torch.testing.assert_close(feat.grad.view(-1), torch.tensor([1., 1, 0.4, 0.4, 0.8, 0.8, 0, 0]), **tol)


@pytest.mark.parametrize("strategy", ["csr", "chunked"])
@pytest.mark.parametrize("case", [
    dict(seed=0),
    dict(seed=1, c=1, b=1, p=30),
    dict(seed=2, p=1),  # a single point
    dict(seed=3, p=0),  # empty point set
    dict(seed=4, sort=False),  # unsorted ranks (bev_pool_v3 contract)
    dict(seed=5, unique_depth=False, c=13),  # repeated depth index, C not a multiple of 8
])
def test_bev_pool_v2_matches_reference(case, strategy, monkeypatch):
    monkeypatch.setattr(_scatter, "CHUNK_ELEMENTS", 16)  # several chunks / row blocks even on tiny inputs
    monkeypatch.setattr(_scatter, "BLOCK_ELEMENTS", 16)
    if strategy == "chunked":
        monkeypatch.setattr(bev_pool_mod, "csr_supported", lambda t: False)
    depth, feat, rd, rf, rb, shape = random_bev_case(**case)
    depth.requires_grad_(), feat.requires_grad_()
    intervals = ops.compute_intervals(rb) if case.get("sort", True) else (None, None)
    out = ops.bev_pool_v2(depth, feat, rd, rf, rb, shape, *intervals)
    ref = bev_pool_reference(depth, feat, rd, rf, rb, shape)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref)
    grad = torch.randn(ref.shape, generator=_gen(9), dtype=D64)
    got = torch.autograd.grad(out, (depth, feat), grad, allow_unused=True)
    want = torch.autograd.grad(ref, (depth, feat), grad, allow_unused=True)
    for g_got, g_want, t in zip(got, want, (depth, feat)):
        g_got = torch.zeros_like(t) if g_got is None else g_got
        g_want = torch.zeros_like(t) if g_want is None else g_want
        torch.testing.assert_close(g_got, g_want)


def test_bev_pool_v2_half_inputs_are_computed_in_float32():
    depth, feat, rd, rf, rb, shape = random_bev_case(6)
    out = ops.bev_pool_v2(depth.half(), feat.half(), rd, rf, rb, shape)
    assert out.dtype == torch.float32
    ref = bev_pool_reference(depth.half().double(), feat.half().double(), rd, rf, rb, shape)
    # float32 sums of at most P=40 products depth (< 1) x feat (randn), against exact sums of the same halves
    torch.testing.assert_close(out.double(), ref, **sum_tolerance(F32, n_terms=40, magnitude=1.0))


# fp16 CPU autocast exists only where an emulated device can use it (torch >= 2.3, bevkit.torchcompat); torch 2.1
# refuses it, so there the case cannot arise
@pytest.mark.parametrize("lower", [torch.bfloat16] + ([torch.float16] if torchcompat.cpu_fp16_amp() else []))
@pytest.mark.parametrize("strategy", ["csr", "chunked"])
def test_bev_pool_v2_is_not_autocast(strategy, lower, monkeypatch):
    """A pooling kernel sums in its inputs' dtype: under the caller's CPU autocast (bf16 on CPU runs, fp16 on an
    emulated device) the portable op gives the float32 result and gradients, not lowered (nor, for the sparse CSR
    product, which has no CPU fp16/bf16 kernel, an error)."""
    if strategy == "chunked":
        monkeypatch.setattr(bev_pool_mod, "csr_supported", lambda t: False)
    depth, feat, rd, rf, rb, shape = random_bev_case(8)
    depth, feat = depth.float(), feat.float()
    grad = torch.randn(2, 5, 2, 3, 4, generator=_gen(3))
    results = []
    for autocast in (False, True):
        d, f = depth.clone().requires_grad_(), feat.clone().requires_grad_()
        with torch.autocast("cpu", dtype=lower, enabled=autocast):
            out = ops.bev_pool_v2(d, f, rd, rf, rb, shape, *ops.compute_intervals(rb))
        results.append((out, *torch.autograd.grad(out, (d, f), grad)))
    assert results[1][0].dtype == torch.float32
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("strategy", ["csr", "chunked"])
def test_bev_pool_v2_gradcheck(strategy, monkeypatch):
    monkeypatch.setattr(_scatter, "BLOCK_ELEMENTS", 6)
    if strategy == "chunked":
        monkeypatch.setattr(bev_pool_mod, "csr_supported", lambda t: False)
    depth, feat, rd, rf, rb, shape = random_bev_case(7, b=1, n=1, d=2, h=2, w=2, c=3, grid=(1, 2, 2), p=6,
                                                     unique_depth=False)
    assert torch.autograd.gradcheck(lambda d_, f_: ops.bev_pool_v2(d_, f_, rd, rf, rb, shape),
                                    (depth.requires_grad_(), feat.requires_grad_()))


def test_bev_pool_v2_is_deterministic():
    depth, feat, rd, rf, rb, shape = random_bev_case(8, c=16, p=400, grid=(2, 4, 4), unique_depth=False)
    depth, feat = depth.float().requires_grad_(), feat.float().requires_grad_()
    runs = []
    for _ in range(3):
        out = ops.bev_pool_v2(depth, feat, rd, rf, rb, shape)
        gd, gf = torch.autograd.grad((out * out).sum(), (depth, feat))
        runs.append((out, gd, gf))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_bev_pool_v2_rejects_bad_input():
    depth, feat, rd, rf, rb, shape = random_bev_case(0)
    with pytest.raises(ValueError, match="bev_feat_shape C"):
        ops.bev_pool_v2(depth, feat, rd, rf, rb, shape[:4] + (shape[4] + 1,))
    with pytest.raises(ValueError, match="ranks_feat"):
        ops.bev_pool_v2(depth, feat, rd, rf[:-1], rb, shape)
    with pytest.raises(ValueError, match="both interval"):
        ops.bev_pool_v2(depth, feat, rd, rf, rb, shape, interval_starts=rb)


# ----------------------------------------------------------------------------------------------- voxel pooling


def voxel_reference(geom, feats, voxel_num):
    """Python loop over points (float64); floating geom is truncated toward zero like upstream `.int()`."""
    nx, ny, nz = voxel_num
    b = geom.shape[0]
    c = feats.shape[-1]
    geom = geom.reshape(b, -1, 3)
    feats = feats.reshape(b, -1, c)
    select = torch.zeros(b, ny * nx, geom.shape[1], dtype=D64)
    for bi in range(b):
        for j, (x, y, z) in enumerate(geom[bi].tolist()):
            x, y, z = int(x), int(y), int(z)  # Python int() truncates toward zero
            if 0 <= x < nx and 0 <= y < ny and 0 <= z < nz:
                select[bi, y * nx + x, j] = 1.0
    return (select @ feats.to(D64)).view(b, ny, nx, c).permute(0, 3, 1, 2)


def random_voxel_case(seed, b=2, n=30, c=5, voxel_num=(4, 3, 2), dtype=D64):
    g = _gen(seed)
    nx, ny, nz = voxel_num
    lo = torch.tensor([-2, -2, -1])
    hi = torch.tensor([nx + 2, ny + 2, nz + 1])
    geom = (lo + torch.rand(b, n, 3, generator=g) * (hi - lo)).floor().int()
    if n:
        geom[:, : n // 3] = geom[:, :1]  # duplicate voxel indices
    feats = torch.randn(b, n, c, generator=g, dtype=D64).to(dtype)
    return geom, feats


@pytest.mark.parametrize("case", [
    dict(seed=0),
    dict(seed=1, b=1, n=1, c=3),  # a single point
    dict(seed=2, n=0),  # empty point set
    dict(seed=3, c=13, voxel_num=(5, 1, 1)),  # C not a multiple of 8, one row
])
def test_voxel_pooling_train_matches_reference(case):
    geom, feats = random_voxel_case(**case)
    feats.requires_grad_()
    out = ops.voxel_pooling_train(geom, feats, case.get("voxel_num", (4, 3, 2)))
    ref = voxel_reference(geom, feats, case.get("voxel_num", (4, 3, 2)))
    assert out.shape == ref.shape and out.dtype == feats.dtype
    torch.testing.assert_close(out, ref)
    grad = torch.randn(ref.shape, generator=_gen(1), dtype=D64)
    got, = torch.autograd.grad(out, feats, grad)
    want, = torch.autograd.grad(ref, feats, grad)
    torch.testing.assert_close(got, want)


def test_voxel_pooling_train_all_points_out_of_range():
    geom = torch.tensor([[[-1, 0, 0], [0, -1, 0], [4, 0, 0], [0, 3, 0], [0, 0, 2], [0, 0, -1]]], dtype=torch.int32)
    feats = torch.ones(1, 6, 3, dtype=D64, requires_grad=True)
    out = ops.voxel_pooling_train(geom, feats, torch.tensor([4, 3, 2]))
    assert out.shape == (1, 3, 3, 4) and not out.any()
    out.sum().backward()
    assert not feats.grad.any()


def test_voxel_pooling_train_truncates_toward_zero():
    """Float coordinates in (-1, 0) land in cell 0 (upstream `.int()`); -1.0 and below are dropped."""
    geom = torch.tensor([[[-0.5, 0.2, 0.0], [-1.0, 0.0, 0.0], [1.9, -0.99, 0.5], [3.99, 2.5, 1.7],
                          [4.0, 0.0, 0.0], [0.0, 0.0, -0.3]]], dtype=D64)
    feats = torch.arange(1.0, 7.0, dtype=D64).view(1, 6, 1)
    out = ops.voxel_pooling_train(geom, feats, (4, 3, 2))
    ref = voxel_reference(geom, feats, (4, 3, 2))
    torch.testing.assert_close(out, ref)
    assert out[0, 0, 0, 0] == 1 + 6 and out[0, 0, 0, 1] == 3 and out[0, 0, 2, 3] == 4 and out.sum() == 14


def test_voxel_pooling_train_leading_dims_and_half():
    geom, feats = random_voxel_case(5, b=2, n=24, c=8)
    geom6 = geom.view(2, 2, 3, 2, 2, 3)
    feats6 = feats.view(2, 2, 3, 2, 2, 8)
    out = ops.voxel_pooling_train(geom6, feats6.half(), (4, 3, 2))
    assert out.dtype == torch.float16
    # float32 sums of at most 24 randn features per cell, rounded to float16
    torch.testing.assert_close(out.double(), voxel_reference(geom, feats.half().double(), (4, 3, 2)),
                               **sum_tolerance(F32, n_terms=24, magnitude=1.0, result_dtype=torch.float16))


def test_voxel_pooling_train_gradcheck():
    geom, feats = random_voxel_case(6, b=2, n=8, c=2)
    assert torch.autograd.gradcheck(lambda f: ops.voxel_pooling_train(geom, f, (4, 3, 2)),
                                    (feats.requires_grad_(),))


def inference_case(seed, b=2, ncam=2, d=3, h=2, w=3, c=4, voxel_num=(4, 3, 2)):
    g = _gen(seed)
    geom, _ = random_voxel_case(seed, b=b, n=ncam * d * h * w, c=1, voxel_num=voxel_num)
    geom = geom.view(b, ncam, d, h, w, 3)
    depth = torch.rand(b * ncam, d, h, w, generator=g, dtype=D64)
    context = torch.randn(b * ncam, c, h, w, generator=g, dtype=D64)
    return geom, depth, context


def inference_reference(geom, depth, context, voxel_num):
    b, ncam, d, h, w, _ = geom.shape
    c = context.shape[1]
    outer = depth.view(b, ncam, d, 1, h, w) * context.view(b, ncam, 1, c, h, w)
    return voxel_reference(geom, outer.permute(0, 1, 2, 4, 5, 3), voxel_num)


@pytest.mark.parametrize("strategy", ["csr", "chunked"])
def test_voxel_pooling_inference_matches_training_pooling_of_outer_product(strategy, monkeypatch):
    if strategy == "chunked":
        monkeypatch.setattr(vp_mod, "csr_supported", lambda t: False)
    geom, depth, context = inference_case(0)
    out = ops.voxel_pooling_inference(geom, depth, context, (4, 3, 2))
    torch.testing.assert_close(out, inference_reference(geom, depth, context, (4, 3, 2)))
    geom, depth, context = inference_case(1, b=1, ncam=2, d=3, h=1, w=2, c=2)
    assert torch.autograd.gradcheck(lambda d_, c_: ops.voxel_pooling_inference(geom, d_, c_, (4, 3, 2)),
                                    (depth.requires_grad_(), context.requires_grad_()))


def test_voxel_pooling_inference_half_and_shape_errors():
    geom, depth, context = inference_case(1, c=3)
    out = ops.voxel_pooling_inference(geom, depth.half(), context.half(), [4, 3, 2])
    assert out.dtype == torch.float16
    # float32 sums of at most Ncam*D*H*W = 36 products depth x context per cell, rounded to float16
    torch.testing.assert_close(out.double(), inference_reference(geom, depth.half().double(),
                                                                 context.half().double(), (4, 3, 2)),
                               **sum_tolerance(F32, n_terms=36, magnitude=1.0, result_dtype=torch.float16))
    with pytest.raises(ValueError, match="expected depth"):
        ops.voxel_pooling_inference(geom, depth[:1], context, (4, 3, 2))


# ------------------------------------------------------------------------------------ deformable attention (MSDA)


def bilinear_reference(img, x, y):
    """img [C, H, W]; sample pixel (x, y) bilinearly, zero outside (loops over the 4 taps)."""
    _, h, w = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(img.shape[0], dtype=D64)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= xx < w and 0 <= yy < h:
                out = out + img[:, yy, xx] * (wx * wy)
    return out


def msda_reference(value, shapes, starts, loc, attn):
    bs, _, nh, dh = value.shape
    _, nq, _, nl, npt, _ = loc.shape
    out = torch.zeros(bs, nq, nh, dh, dtype=D64)
    for b in range(bs):
        for q in range(nq):
            for hd in range(nh):
                acc = torch.zeros(dh, dtype=D64)
                for lvl in range(nl):
                    hh, ww = shapes[lvl].tolist()
                    s = int(starts[lvl])
                    img = value[b, s:s + hh * ww, hd].t().reshape(dh, hh, ww)
                    for p in range(npt):
                        x = float(loc[b, q, hd, lvl, p, 0]) * ww - 0.5
                        y = float(loc[b, q, hd, lvl, p, 1]) * hh - 0.5
                        acc = acc + attn[b, q, hd, lvl, p] * bilinear_reference(img, x, y)
                out[b, q, hd] = acc
    return out.view(bs, nq, nh * dh)


def msda_case(seed, bs=2, nq=3, nh=2, dh=3, shapes=((3, 4), (2, 2)), npt=2):
    g = _gen(seed)
    shapes_t = torch.tensor(shapes, dtype=torch.int64)
    starts = torch.cat([shapes_t.new_zeros(1), (shapes_t[:, 0] * shapes_t[:, 1]).cumsum(0)[:-1]])
    keys = int((shapes_t[:, 0] * shapes_t[:, 1]).sum())
    value = torch.randn(bs, keys, nh, dh, generator=g, dtype=D64)
    loc = torch.rand(bs, nq, nh, len(shapes), npt, 2, generator=g, dtype=D64) * 1.4 - 0.2  # some outside
    attn = torch.rand(bs, nq, nh, len(shapes), npt, generator=g, dtype=D64)
    return value, shapes_t, starts, loc, attn


def test_msda_matches_reference_and_gradcheck():
    value, shapes, starts, loc, attn = msda_case(0)
    out = ops.multi_scale_deformable_attn(value, shapes, starts, loc, attn)
    assert out.shape == (2, 3, 6)
    torch.testing.assert_close(out, msda_reference(value, shapes, starts, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, l_, a: ops.multi_scale_deformable_attn(v, shapes, starts, l_, a),
        (value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()))


def test_msda_wide_heads_gradcheck():
    """Head dims > 32 take the other weight-gradient branch (FB-OCC's depth sampling has 80)."""
    value, shapes, starts, loc, attn = msda_case(6, bs=1, nq=2, nh=1, dh=40, shapes=((2, 3),), npt=2)
    torch.testing.assert_close(ops.multi_scale_deformable_attn(value, shapes, starts, loc, attn),
                               msda_reference(value, shapes, starts, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, l_, a: ops.multi_scale_deformable_attn(v, shapes, starts, l_, a),
        (value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()))


def test_msda_half_inputs_give_half_output():
    """mmcv's MultiScaleDeformableAttnFunction and mx_driving (outside autocast) return value's dtype."""
    value, shapes, starts, loc, attn = msda_case(1, nq=2)
    out = ops.multi_scale_deformable_attn(value.half(), shapes, starts, loc.half(), attn.half())
    assert out.dtype == torch.float16
    ref = msda_reference(value.half().double(), shapes, starts, loc.half().double(), attn.half().double())
    # computed in float32: L*P = 4 samples of 4 bilinear taps each, weights < 1; the result rounded to float16
    torch.testing.assert_close(out.double(), ref, **sum_tolerance(F32, n_terms=16, magnitude=1.0,
                                                                 result_dtype=torch.float16))
    assert ops.multi_scale_deformable_attn(value.float(), shapes, starts, loc.half(), attn.half()).dtype == F32


def test_msda_rejects_bad_shapes():
    value, shapes, starts, loc, attn = msda_case(0)
    with pytest.raises(ValueError, match="attention_weights"):
        ops.multi_scale_deformable_attn(value, shapes, starts, loc, attn[..., :1])
    with pytest.raises(ValueError, match="keys"):
        ops.multi_scale_deformable_attn(value[:, :-1], shapes, starts, loc, attn)


def depth_case(seed, bs=2, nq=3, nz=2, per_anchor=2, nh=2, dh=3, h=3, w=4, nd=5):
    g = _gen(seed)
    value, shapes, starts, loc, attn = msda_case(seed, bs=bs, nq=nq, nh=nh, dh=dh, shapes=((h, w),),
                                                 npt=nz * per_anchor)
    depth_prob = torch.rand(bs, h * w, nd, generator=g, dtype=D64).softmax(-1)
    ref_pts = torch.rand(bs, nq, nz, 2, generator=g, dtype=D64) * 1.2 - 0.1
    z_metric = torch.rand(bs, nq, nz, generator=g, dtype=D64) * (nd + 2) * 0.5 + 1.0
    bins = torch.clip(torch.floor((z_metric - 2.0) / 0.5), 0, nd - 1).long()  # upstream's bin rule
    return value, shapes, starts, loc, attn, depth_prob, ref_pts, bins


def depth_weight_reference(depth_prob, hw, ref_pts, onehot):
    """UPSTREAM.md 1.2 item 5: sample the depth probability vector at the reference point, dot with the one-hot."""
    h, w = hw
    bs, nq, nz, _ = ref_pts.shape
    out = torch.zeros(bs, nq, nz, dtype=D64)
    for b in range(bs):
        img = depth_prob[b].t().reshape(-1, h, w)
        for q in range(nq):
            for z in range(nz):
                x, y = float(ref_pts[b, q, z, 0]) * w - 0.5, float(ref_pts[b, q, z, 1]) * h - 0.5
                vec = bilinear_reference(img, x, y)
                out[b, q, z] = (vec * onehot[b, q, z]).sum()
    return out


@pytest.mark.parametrize("bins_as", ["index", "onehot", "float"])
def test_depth_weighted_attention_applies_upstream_weighting(bins_as):
    value, shapes, starts, loc, attn, depth_prob, ref_pts, bins = depth_case(0)
    onehot = F.one_hot(bins, depth_prob.shape[-1])
    given = {"index": bins, "onehot": onehot, "float": onehot.double()}[bins_as]
    w_ref = depth_weight_reference(depth_prob, (3, 4), ref_pts, onehot)
    torch.testing.assert_close(ops.depth_weights(depth_prob, (3, 4), ref_pts, given), w_ref)
    # Upstream: weights.unsqueeze(2).repeat(1, 1, points_per_anchor, 1) -> sampling point j uses anchor j % Z.
    bs, nq, nh, nl, npt = attn.shape
    w_pts = w_ref.unsqueeze(2).repeat(1, 1, npt // 2, 1).reshape(bs, nq, npt)
    assert torch.equal(w_pts[:, :, 3], w_ref[:, :, 1]) and torch.equal(w_pts[:, :, 2], w_ref[:, :, 0])
    expected = msda_reference(value, shapes, starts, loc, attn * w_pts[:, :, None, None, :])
    out = ops.depth_weighted_deformable_attn(value, shapes, starts, loc, attn, depth_prob, ref_pts, given)
    torch.testing.assert_close(out, expected)
    # ... and it differs from the upstream non-CUDA fallback, which drops the weighting.
    assert not torch.allclose(out, msda_reference(value, shapes, starts, loc, attn))


def test_depth_weights_all_zero_onehot_row_gives_zero():
    _, _, _, _, _, depth_prob, ref_pts, bins = depth_case(1)
    onehot = F.one_hot(bins, depth_prob.shape[-1])
    onehot[0, 0, 0] = 0
    w = ops.depth_weights(depth_prob, (3, 4), ref_pts, onehot)
    assert w[0, 0, 0] == 0
    torch.testing.assert_close(w, depth_weight_reference(depth_prob, (3, 4), ref_pts, onehot))


def test_depth_weighted_attention_gradcheck():
    value, shapes, starts, loc, attn, depth_prob, ref_pts, bins = depth_case(2, bs=1, nq=2, nh=1, dh=2, nd=3)
    assert torch.autograd.gradcheck(
        lambda v, l_, a, dp, r: ops.depth_weighted_deformable_attn(v, shapes, starts, l_, a, dp, r, bins),
        tuple(t.requires_grad_() for t in (value, loc, attn, depth_prob, ref_pts)))


def test_depth_weighted_attention_rejects_bad_anchor_count():
    value, shapes, starts, loc, attn, depth_prob, ref_pts, bins = depth_case(0, nz=2, per_anchor=2)
    with pytest.raises(ValueError, match="Z dividing"):
        ops.depth_weighted_deformable_attn(value, shapes, starts, loc[..., :3, :], attn[..., :3], depth_prob,
                                           ref_pts, bins)


# -------------------------------------------------------------------------------------------------- grid sample 3D


def trilinear_reference(inp, grid):
    """align_corners=True, zero padding; loops over output voxels and the 8 taps."""
    n, c, d, h, w = inp.shape
    _, do, ho, wo, _ = grid.shape
    out = torch.zeros(n, c, do, ho, wo, dtype=D64)
    for b in range(n):
        for k in range(do):
            for i in range(ho):
                for j in range(wo):
                    gx, gy, gz = grid[b, k, i, j].tolist()
                    x, y, z = (gx + 1) / 2 * (w - 1), (gy + 1) / 2 * (h - 1), (gz + 1) / 2 * (d - 1)
                    x0, y0, z0 = math.floor(x), math.floor(y), math.floor(z)
                    for zz in (z0, z0 + 1):
                        for yy in (y0, y0 + 1):
                            for xx in (x0, x0 + 1):
                                if 0 <= xx < w and 0 <= yy < h and 0 <= zz < d:
                                    wt = (1 - abs(x - xx)) * (1 - abs(y - yy)) * (1 - abs(z - zz))
                                    out[b, :, k, i, j] += inp[b, :, zz, yy, xx] * wt
    return out


def test_grid_sample_3d_matches_reference_and_gradcheck():
    g = _gen(0)
    inp = torch.randn(2, 3, 3, 4, 5, generator=g, dtype=D64)
    grid = torch.rand(2, 2, 3, 2, 3, generator=g, dtype=D64) * 2.4 - 1.2
    out = ops.grid_sample_3d(inp, grid)
    torch.testing.assert_close(out, trilinear_reference(inp, grid))
    assert torch.autograd.gradcheck(lambda i, gr: ops.grid_sample_3d(i, gr),
                                    (inp.requires_grad_(), grid.requires_grad_()))


# --------------------------------------------------------------------------------------------- sigmoid focal loss


def focal_reference(pred, target, gamma, alpha, weight):
    m, c = pred.shape
    out = torch.zeros(m, c, dtype=D64)
    for n in range(m):
        t = int(target[n])
        for k in range(c):
            p = 1 / (1 + math.exp(-float(pred[n, k])))
            if t == k:
                v = -alpha * (1 - p) ** gamma * math.log(max(p, 1e-300))
            else:
                v = -(1 - alpha) * p ** gamma * math.log(max(1 - p, 1e-300))
            if weight is not None and t < c:
                v *= float(weight[t])
            out[n, k] = v
    return out


@pytest.mark.parametrize("chunk", [1 << 20, 8])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_loss_matches_kernel_math(reduction, chunk, monkeypatch):
    from bevkit.ops import focal_loss
    monkeypatch.setattr(focal_loss, "CHUNK_ELEMENTS", chunk)  # 8: two rows per chunk
    g = _gen(0)
    pred = torch.randn(6, 4, generator=g, dtype=D64) * 3
    target = torch.tensor([0, 1, 3, 4, 4, 2])  # 4 = background
    weight = torch.rand(4, generator=g, dtype=D64)
    for w in (None, weight):
        ref = focal_reference(pred, target, 2.0, 0.25, w)
        ref = {"none": ref, "mean": ref.sum() / 6, "sum": ref.sum()}[reduction]
        torch.testing.assert_close(ops.sigmoid_focal_loss(pred, target, 2.0, 0.25, w, reduction), ref)
    assert torch.autograd.gradcheck(lambda p: ops.sigmoid_focal_loss(p, target, 1.5, 0.3, weight, reduction),
                                    (pred.requires_grad_(),))


def test_sigmoid_focal_loss_rejects_float_targets():
    with pytest.raises(ValueError, match="int64"):
        ops.sigmoid_focal_loss(torch.zeros(2, 3), torch.zeros(2), reduction="none")


# ------------------------------------------------------------------------------------------------ deform conv 2d


def deform_conv_reference(inp, offset, weight, stride, padding, dilation, groups, dg):
    n, cin, h, w = inp.shape
    cout, cin_g, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    cols = torch.zeros(n, cin, kh * kw, ho, wo, dtype=D64)
    per_dg = cin // dg
    for b in range(n):
        for g_ in range(dg):
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    for oy in range(ho):
                        for ox in range(wo):
                            dy = float(offset[b, g_ * 2 * kh * kw + 2 * k, oy, ox])
                            dx = float(offset[b, g_ * 2 * kh * kw + 2 * k + 1, oy, ox])
                            y = oy * stride - padding + i * dilation + dy
                            x = ox * stride - padding + j * dilation + dx
                            img = inp[b, g_ * per_dg:(g_ + 1) * per_dg]
                            cols[b, g_ * per_dg:(g_ + 1) * per_dg, k, oy, ox] = bilinear_reference(img, x, y)
    out = torch.zeros(n, cout, ho, wo, dtype=D64)
    cout_g = cout // groups
    for gi in range(groups):
        wmat = weight[gi * cout_g:(gi + 1) * cout_g].reshape(cout_g, -1)
        cmat = cols[:, gi * cin_g:(gi + 1) * cin_g].reshape(n, cin_g * kh * kw, ho * wo)
        out[:, gi * cout_g:(gi + 1) * cout_g] = (wmat @ cmat).view(n, cout_g, ho, wo)
    return out


def deform_case(seed, n=2, cin=4, cout=4, h=5, w=4, k=3, stride=1, padding=1, dilation=1, groups=2, dg=2):
    g = _gen(seed)
    inp = torch.randn(n, cin, h, w, generator=g, dtype=D64)
    ho = (h + 2 * padding - (dilation * (k - 1) + 1)) // stride + 1
    wo = (w + 2 * padding - (dilation * (k - 1) + 1)) // stride + 1
    offset = torch.randn(n, dg * 2 * k * k, ho, wo, generator=g, dtype=D64) * 1.5
    weight = torch.randn(cout, cin // groups, k, k, generator=g, dtype=D64)
    return inp, offset, weight, dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                                     deform_groups=dg)


@pytest.mark.parametrize("cfg", [dict(), dict(stride=2, padding=0, dilation=1, groups=1, dg=1, h=6, w=7),
                                 dict(dilation=2, padding=2, groups=1, dg=4)])
def test_deform_conv2d_matches_reference(cfg):
    inp, offset, weight, kw = deform_case(0, **cfg)
    out = ops.deform_conv2d(inp, offset, weight, **kw)
    ref = deform_conv_reference(inp, offset, weight, kw["stride"], kw["padding"], kw["dilation"], kw["groups"],
                                kw["deform_groups"])
    torch.testing.assert_close(out, ref)


def test_deform_conv2d_gradcheck_and_bias():
    inp, offset, weight, kw = deform_case(1, n=1, cin=2, cout=2, h=3, w=3, groups=1, dg=1)
    bias = torch.randn(2, dtype=D64)
    out = ops.deform_conv2d(inp, offset, weight, bias=bias, **kw)
    torch.testing.assert_close(out, ops.deform_conv2d(inp, offset, weight, **kw) + bias.view(1, -1, 1, 1))
    assert torch.autograd.gradcheck(lambda i, o, w_: ops.deform_conv2d(i, o, w_, **kw),
                                    tuple(t.requires_grad_() for t in (inp, offset, weight)))


def import_mmcv(name):
    """An mmcv-full module, or skip (mmcv missing, or its imports failing on this machine)."""
    try:
        from bevkit.compat import prepare_imports  # torchvision's compiled ops may need a shim first
        prepare_imports()
    except ImportError:
        pass
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or torchvision/mmcv failing at import
        pytest.skip(f"needs mmcv-full with compiled ops ({name}: {type(exc).__name__}: {exc})")


def test_deform_conv2d_matches_mmcv_compiled_cpu_kernel():
    mod = import_mmcv("mmcv.ops.deform_conv")
    inp, offset, weight, kw = deform_case(2, n=2, cin=4, cout=4, groups=2, dg=2)
    inp, offset, weight = (t.float().requires_grad_() for t in (inp, offset, weight))
    ours = ops.deform_conv2d(inp, offset, weight, **kw)
    theirs = mod.deform_conv2d(inp, offset, weight, kw["stride"], kw["padding"], kw["dilation"], kw["groups"],
                               kw["deform_groups"], False, 32)
    # Largest float32 sums: an output is Cin/groups * k*k = 18 samples of 4 bilinear taps (72 terms); a weight
    # gradient N*Ho*Wo = 40 terms; an input gradient up to Cout/groups * k*k * 4 = 72 terms. Offsets are 1.5 randn,
    # so offset gradients carry pixel differences of size ~2.
    tol = sum_tolerance(F32, n_terms=72, magnitude=2.0)
    torch.testing.assert_close(ours, theirs, **tol)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (inp, offset, weight), g),
                    torch.autograd.grad(theirs, (inp, offset, weight), g)):
        torch.testing.assert_close(a, b, **tol)


def test_msda_matches_mmcv_pytorch_fallback():
    mod = import_mmcv("mmcv.ops.multi_scale_deform_attn")
    value, shapes, starts, loc, attn = msda_case(3, bs=2, nq=5, nh=2, dh=4)
    torch.testing.assert_close(ops.multi_scale_deformable_attn(value, shapes, starts, loc, attn),
                               mod.multi_scale_deformable_attn_pytorch(value, shapes, loc, attn))


# ------------------------------------------------------------------------------------------------------ dispatch


def test_force_backend_and_env(monkeypatch):
    value = torch.zeros(1)
    with ops.force_backend(None):
        monkeypatch.delenv(dispatch.ENV, raising=False)
        assert ops.backend_for(value) == "portable"
        monkeypatch.setenv(dispatch.ENV, "npu")
        assert ops.backend_for(value) == "npu"
        with ops.force_backend("cuda"):
            assert ops.backend_for(value) == "cuda"
        monkeypatch.setenv(dispatch.ENV, "tpu")
        with pytest.raises(ValueError, match="BEVKIT_OPS_BACKEND='tpu'"):
            ops.backend_for(value)
    with pytest.raises(ValueError, match="portable, npu, cuda"):
        with ops.force_backend("gpu"):
            pass


def test_cuda_backend_without_kernels_falls_back_to_portable_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "optional_import", lambda name: None)  # the one lookup of compiled kernels
    dispatch.reset_log_once()
    depth, feat, rd, rf, rb, shape = random_bev_case(0)
    with ops.force_backend("cuda"), caplog.at_level("WARNING", logger="bevkit.ops"):
        a = ops.bev_pool_v2(depth, feat, rd, rf, rb, shape)
        b = ops.bev_pool_v2(depth, feat, rd, rf, rb, shape)
    torch.testing.assert_close(a, bev_pool_reference(depth, feat, rd, rf, rb, shape))
    assert torch.equal(a, b)
    assert len([r for r in caplog.records if "bev_pool_v2_ext" in r.getMessage()]) == 1


def test_mmcv_signature_drop_in_and_broadcast_reference_points():
    value, shapes, starts, loc, attn = msda_case(4)
    out = ops.multi_scale_deformable_attn_pytorch(value.float(), shapes, loc.float(), attn.float())
    assert out.dtype == torch.float32
    # float32 inputs rounded from float64 and float32 sums of L*P = 4 samples of 4 bilinear taps, weights < 1
    torch.testing.assert_close(out.double(), msda_reference(value, shapes, starts, loc, attn),
                               **sum_tolerance(F32, n_terms=16, magnitude=1.0))
    value, shapes, starts, loc, attn, depth_prob, ref_pts, bins = depth_case(3)
    bs, nq, nz, _ = ref_pts.shape
    flat = ops.depth_weighted_deformable_attn(value, shapes, starts, loc, attn, depth_prob, ref_pts, bins)
    upstream_view = ref_pts[:, :, None, None, None, :, :]  # what DA_MSDeformableAttention.forward holds
    torch.testing.assert_close(
        ops.depth_weighted_deformable_attn(value, shapes, starts, loc, attn, depth_prob, upstream_view, bins), flat)


def test_mmcv_function_compat_shim():
    value, shapes, starts, loc, attn = msda_case(7)
    out = ops.MultiScaleDeformableAttnFunctionCompat.apply(value, shapes, starts, loc, attn, 64)
    torch.testing.assert_close(out, msda_reference(value, shapes, starts, loc, attn))
    fake_mmcv = type("M", (), {"MultiScaleDeformableAttnFunction": ops.MultiScaleDeformableAttnFunctionCompat})
    with pytest.MonkeyPatch.context() as mp, ops.force_backend("cuda"):
        mp.setattr(dispatch, "optional_import", lambda name: fake_mmcv)
        torch.testing.assert_close(ops.multi_scale_deformable_attn(value, shapes, starts, loc, attn), out)


def test_forced_cuda_backend_on_cpu_tensors_never_calls_a_cuda_kernel(caplog, monkeypatch):
    class FakeKernel:
        @staticmethod
        def apply(*args):
            raise AssertionError("a CUDA kernel got CPU tensors")

    fake_mod = type("M", (), {"MultiScaleDeformableAttnFunction": FakeKernel})
    monkeypatch.setattr(dispatch, "optional_import", lambda name: fake_mod)
    dispatch.reset_log_once()
    value, shapes, starts, loc, attn = msda_case(5)
    with ops.force_backend("cuda"), caplog.at_level("WARNING", logger="bevkit.ops"):
        out = ops.multi_scale_deformable_attn(value, shapes, starts, loc, attn)
    torch.testing.assert_close(out, msda_reference(value, shapes, starts, loc, attn))
    assert any("cuda backend chosen for a cpu tensor" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("op", ["voxel_pooling_train", "voxel_pooling_inference", "msda", "depth_weighted",
                                "deform_conv2d"])
def test_portable_ops_are_deterministic_on_cpu(op):
    if op == "voxel_pooling_train":
        geom, feats = random_voxel_case(10, b=2, n=500, c=16, dtype=torch.float32)
        fn, inputs = (lambda f: ops.voxel_pooling_train(geom, f, (4, 3, 2))), [feats]
    elif op == "voxel_pooling_inference":
        geom, depth, context = inference_case(11, d=8, h=4, w=5, c=16)
        fn, inputs = (lambda d_, c_: ops.voxel_pooling_inference(geom, d_, c_, (4, 3, 2))), [depth.float(),
                                                                                             context.float()]
    elif op == "msda":
        value, shapes, starts, loc, attn = msda_case(12, bs=2, nq=200, nh=4, dh=8)
        fn = lambda v, l_, a: ops.multi_scale_deformable_attn(v, shapes, starts, l_, a)  # noqa: E731
        inputs = [value.float(), loc.float(), attn.float()]
    elif op == "depth_weighted":
        value, shapes, starts, loc, attn, depth_prob, ref_pts, bins = depth_case(13, nq=200)
        fn = lambda v, l_, a, d_: ops.depth_weighted_deformable_attn(v, shapes, starts, l_, a, d_, ref_pts, bins)  # noqa
        inputs = [value.float(), loc.float(), attn.float(), depth_prob.float()]
    else:
        inp, offset, weight, kw = deform_case(14, n=2, cin=8, cout=8, h=9, w=11)
        fn = lambda i, o, w_: ops.deform_conv2d(i, o, w_, **kw)  # noqa: E731
        inputs = [inp.float(), offset.float(), weight.float()]
    runs = []
    for _ in range(3):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        runs.append([out] + list(torch.autograd.grad((out * out).sum(), leaves)))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_rebound_mmcv_functions_do_not_recurse(monkeypatch):
    """A runtime patch may rebind mmcv's deform_conv2d / sigmoid_focal_loss to ours; the kernel path must notice."""
    rebound = type("M", (), {"deform_conv2d": ops.deform_conv2d, "sigmoid_focal_loss": ops.sigmoid_focal_loss})
    monkeypatch.setattr(dispatch, "real_device", lambda t: "cuda")
    monkeypatch.setattr(dispatch, "optional_import", lambda m: rebound)
    inp, offset, weight, kw = deform_case(3, n=1, cin=2, cout=2, h=4, w=4, groups=1, dg=1)
    pred, target = torch.randn(3, 2, dtype=D64), torch.tensor([0, 2, 1])
    with ops.force_backend("cuda"):
        dcn = ops.deform_conv2d(inp, offset, weight, **kw)
        focal = ops.sigmoid_focal_loss(pred, target, reduction="sum")
    torch.testing.assert_close(dcn, deform_conv_reference(inp, offset, weight, 1, 1, 1, 1, 1))
    torch.testing.assert_close(focal, focal_reference(pred, target, 2.0, 0.25, None).sum())


# ------------------------------------------------------------------ inputs the models never produce (kernel parity)


def bev_pool_kernel_reference(depth, feat, rd, rf, rb, shape, starts, lengths):
    """The upstream CUDA kernel's forward as a loop (FB-BEV bev_pool_cuda.cu): interval i writes the sum of its
    points' depth x feat into cell ranks_bev[starts[i]]; points in no interval are not pooled."""
    b, z, y, x, c = shape
    out = torch.zeros(b * z * y * x, c, dtype=D64)
    d, f = depth.reshape(-1).to(D64), feat.reshape(-1, c).to(D64)
    for s_, n_ in zip(starts.tolist(), lengths.tolist()):
        acc = torch.zeros(c, dtype=D64)
        for k in range(s_, s_ + n_):
            acc = acc + d[int(rd[k])] * f[int(rf[k])]
        out[int(rb[s_])] = acc
    return out.view(b, z, y, x, c).permute(0, 4, 1, 2, 3)


def _grads(out, ref, leaves):
    g = torch.randn(ref.shape, generator=_gen(3), dtype=D64)
    return torch.autograd.grad(out, leaves, g, allow_unused=True), torch.autograd.grad(ref, leaves, g)


@pytest.mark.parametrize("strategy", ["csr", "chunked"])
@pytest.mark.parametrize("name, rb, starts, lengths", [
    # one interval spanning cells 0 and 1 (upstream adds it all into cell 0), then a run of cell 2
    ("spanning", [0, 0, 1, 1, 2], [0, 4], [4, 1]),
    # runs of distinct cells in unsorted order (the old portable op trusted given intervals to be sorted)
    ("unsorted runs", [3, 3, 1, 1, 2, 0], [0, 2, 4, 5], [2, 2, 1, 1]),
    # point 3 is in two intervals (pooled into cells 6 and 7); point 5 is in none (not pooled)
    ("gaps and overlaps", [5, 5, 6, 7, 7, 1, 0], [0, 2, 3, 6], [2, 2, 2, 1]),
    # a zero-length interval writes a zero sum into its cell: point 2 is not pooled
    ("zero-length interval", [2, 2, 4, 1], [0, 2, 3], [2, 0, 1]),
])
def test_bev_pool_v2_given_intervals_follow_the_kernel(name, rb, starts, lengths, strategy, monkeypatch):
    if strategy == "chunked":
        monkeypatch.setattr(bev_pool_mod, "csr_supported", lambda t: False)
    g = _gen(11)
    depth = torch.rand(1, 1, 2, 2, 3, generator=g, dtype=D64, requires_grad=True)
    feat = torch.randn(1, 1, 2, 3, 4, generator=g, dtype=D64, requires_grad=True)
    p = len(rb)
    rd = torch.randperm(depth.numel(), generator=g)[:p].int()
    rf = torch.randint(0, 6, (p,), generator=g).int()
    rb, starts, lengths = (torch.tensor(v, dtype=torch.int32) for v in (rb, starts, lengths))
    shape = (1, 2, 2, 2, 4)
    out = ops.bev_pool_v2(depth, feat, rd, rf, rb, shape, starts, lengths)
    ref = bev_pool_kernel_reference(depth, feat, rd, rf, rb, shape, starts, lengths)
    torch.testing.assert_close(out, ref)
    for got, want in zip(*_grads(out, ref, (depth, feat))):
        torch.testing.assert_close(got, want)


def test_bev_pool_v2_refuses_intervals_the_kernel_cannot_pool():
    depth, feat, rd, rf, rb, shape = random_bev_case(0, p=6)
    rb = torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="two intervals write BEV cell 0"):
        ops.bev_pool_v2(depth, feat, rd, rf, rb, shape, *ops.compute_intervals(rb))  # runs of unsorted ranks
    with pytest.raises(ValueError, match="within the 6 points"):
        ops.bev_pool_v2(depth, feat, rd, rf, rb, shape, torch.tensor([4], dtype=torch.int32),
                        torch.tensor([3], dtype=torch.int32))
    with pytest.raises(ValueError, match="ranks_bev must lie in"):
        ops.bev_pool_v2(depth, feat, rd, rf, rb + 1000, shape)
    with pytest.raises(ValueError, match="ranks_depth must lie in"):
        ops.bev_pool_v2(depth, feat, rd - 100, rf, rb, shape)


def test_bev_pool_v2_intervals_that_are_runs_change_nothing():
    """The common case keeps its meaning: runs of sorted ranks_bev with or without intervals, and an empty
    interval list pools nothing."""
    depth, feat, rd, rf, rb, shape = random_bev_case(1)
    with_runs = ops.bev_pool_v2(depth, feat, rd, rf, rb, shape, *ops.compute_intervals(rb))
    torch.testing.assert_close(with_runs, ops.bev_pool_v2(depth, feat, rd, rf, rb, shape))
    none = torch.zeros(0, dtype=torch.int32)
    assert not ops.bev_pool_v2(depth, feat, rd, rf, rb, shape, none, none).any()


def test_bev_pool_v2_cuda_kernel_gets_sorted_runs_and_unique_depth_ranks(monkeypatch):
    """What the kit hands FB-BEV's CUDA kernel (a stand-in records it): unsorted points sorted into runs with
    their intervals; given intervals as they are; repeated ranks_depth with a depth gradient -> portable."""
    seen = []

    def kernel(depth, feat, rd, rf, rb, shape, starts, lengths):
        seen.append((rb.clone(), starts.clone(), lengths.clone()))
        return bev_pool_kernel_reference(depth, feat, rd, rf, rb, tuple(shape), starts, lengths).to(depth.dtype)

    fake = type("M", (), {"bev_pool_v2": staticmethod(kernel)})
    depth, feat, rd, rf, rb, shape = random_bev_case(2, sort=False)
    want = bev_pool_reference(depth, feat, rd, rf, rb, shape)
    with ops.force_backend("cuda"), dispatch.stand_in("cuda", "mmdet3d.ops.bev_pool_v2.bev_pool", fake):
        out = ops.bev_pool_v2(depth, feat, rd, rf, rb, shape)
        rb_k, st, ln = seen[-1]
        assert bool((rb_k[1:] >= rb_k[:-1]).all())
        assert [t.tolist() for t in ops.compute_intervals(rb_k)] == [st.tolist(), ln.tolist()]
        torch.testing.assert_close(out, want)
        srt = torch.argsort(rb, stable=True)
        rd_s, rf_s, rb_s = rd[srt], rf[srt], rb[srt]
        runs = ops.compute_intervals(rb_s)
        ops.bev_pool_v2(depth, feat, rd_s, rf_s, rb_s, shape, *runs)
        assert torch.equal(seen[-1][1], runs[0])
        calls = len(seen)
        rd_rep = rd_s.clone()
        rd_rep[1] = rd_rep[0]
        out = ops.bev_pool_v2(depth.requires_grad_(), feat, rd_rep, rf_s, rb_s, shape, *runs)
        assert len(seen) == calls  # the kernel's backward would write, not sum, grad_depth of the repeated entry
    torch.testing.assert_close(out, bev_pool_reference(depth, feat, rd_rep, rf_s, rb_s, shape))


def test_voxel_pooling_non_contiguous_and_unsorted_inputs():
    geom, feats = random_voxel_case(7, b=2, n=40, c=6)
    perm = torch.randperm(40, generator=_gen(1))
    geom, feats = geom[:, perm], feats[:, perm]  # points in any order, duplicates kept
    feats_t = feats.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channels-first memory
    assert not feats_t.is_contiguous()
    torch.testing.assert_close(ops.voxel_pooling_train(geom, feats_t, (4, 3, 2)),
                               voxel_reference(geom, feats, (4, 3, 2)))


def test_voxel_pooling_cuda_kernel_only_gets_dtypes_it_handles():
    """BEVDepth's wrapper dispatches float32 and float16 (even C) only; other dtypes would leave zeros."""
    seen = []
    fake = type("M", (), {"voxel_pooling_train": staticmethod(
        lambda g, f, v: seen.append(f.dtype) or voxel_reference(g, f, v).to(f.dtype))})
    geom, feats = random_voxel_case(8, b=1, n=20, c=3)
    with ops.force_backend("cuda"), dispatch.stand_in("cuda", "bevdepth.ops.voxel_pooling_train", fake):
        ops.voxel_pooling_train(geom, feats.float(), (4, 3, 2))
        ops.voxel_pooling_train(geom, feats.half(), (4, 3, 2))  # odd C in float16: portable
        out = ops.voxel_pooling_train(geom, feats.bfloat16(), (4, 3, 2))  # bfloat16: portable
    assert seen == [F32] and out.dtype == torch.bfloat16


def test_msda_refuses_level_starts_outside_value_and_takes_strided_inputs():
    value, shapes, starts, loc, attn = msda_case(8)
    with pytest.raises(ValueError, match="reads past"):
        ops.multi_scale_deformable_attn(value, shapes, starts + 3, loc, attn)
    v_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_t = loc.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    assert not v_t.is_contiguous() and not loc_t.is_contiguous()
    torch.testing.assert_close(ops.multi_scale_deformable_attn(v_t, shapes, starts, loc_t, attn),
                               msda_reference(value, shapes, starts, loc, attn))


def test_msda_cuda_kernel_gets_an_im2col_step_dividing_the_batch():
    """mmcv's kernel asserts bs % min(bs, im2col_step) == 0; the step is only a batching knob."""
    steps = []

    class Kernel:
        @staticmethod
        def apply(value, shapes, starts, loc, attn, step):
            assert value.shape[0] % min(value.shape[0], step) == 0, "batch size must be divisible by im2col_step"
            steps.append(step)
            return msda_reference(value, shapes, starts, loc, attn)

    fake = type("M", (), {"MultiScaleDeformableAttnFunction": Kernel})
    value, shapes, starts, loc, attn = msda_case(9, bs=3)
    with ops.force_backend("cuda"), dispatch.stand_in("cuda", "mmcv.ops.multi_scale_deform_attn", fake):
        out = ops.multi_scale_deformable_attn(value, shapes, starts, loc, attn, im2col_step=2)
    assert steps == [1]
    torch.testing.assert_close(out, msda_reference(value, shapes, starts, loc, attn))


def test_depth_weights_bin_outside_the_distribution_weighs_zero():
    """An integer bin outside [0, D) has no one-hot column to read: weight 0 (the old code clamped it)."""
    _, _, _, _, _, depth_prob, ref_pts, bins = depth_case(4)
    bins[0, 0, 0], bins[1, 2, 1] = -1, depth_prob.shape[-1]
    w = ops.depth_weights(depth_prob, (3, 4), ref_pts, bins)
    assert w[0, 0, 0] == 0 and w[1, 2, 1] == 0
    inside = F.one_hot(bins.clamp(0, depth_prob.shape[-1] - 1), depth_prob.shape[-1])
    inside[0, 0, 0] = 0
    inside[1, 2, 1] = 0
    torch.testing.assert_close(w, depth_weight_reference(depth_prob, (3, 4), ref_pts, inside))
    with ops.force_backend("cuda"):  # the kernel-backed formulation (no CUDA here -> its portable MSDA)
        torch.testing.assert_close(ops.depth_weights(depth_prob, (3, 4), ref_pts, bins), w)


def test_deform_conv2d_output_dtype_follows_offset_and_odd_inputs():
    """mmcv casts input and weight to the offset's dtype; empty batches and strided inputs are fine."""
    inp, offset, weight, kw = deform_case(5, n=1, cin=2, cout=2, h=4, w=4, groups=1, dg=1)
    out = ops.deform_conv2d(inp.float(), offset.half(), weight.float(), **kw)
    assert out.dtype == torch.float16
    ref = deform_conv_reference(inp.float().double(), offset.half().double(), weight.float().double(), 1, 1, 1, 1, 1)
    # float32 sums of Cin * 3 * 3 = 18 samples of 4 bilinear taps, rounded to float16
    torch.testing.assert_close(out.double(), ref, **sum_tolerance(F32, 72, 1.0, result_dtype=torch.float16))
    assert ops.deform_conv2d(inp[:0], offset[:0], weight, **kw).shape == (0, 2, 4, 4)
    inp_t = inp.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(ops.deform_conv2d(inp_t, offset, weight, **kw),
                               deform_conv_reference(inp, offset, weight, 1, 1, 1, 1, 1))


def test_sigmoid_focal_loss_refuses_targets_outside_the_classes_and_handles_empty_and_half():
    pred = torch.randn(4, 3, generator=_gen(2), dtype=D64)
    for bad in ([0, 1, -1, 2], [0, 4, 1, 2]):  # -1 used to wrap to class C-1 (python indexing)
        with pytest.raises(ValueError, match=r"class indices in \[0, 3\]"):
            ops.sigmoid_focal_loss(pred, torch.tensor(bad), reduction="none")
    empty = ops.sigmoid_focal_loss(pred[:0], torch.zeros(0, dtype=torch.long), reduction="none")
    assert empty.shape == (0, 3)
    assert torch.isnan(ops.sigmoid_focal_loss(pred[:0], torch.zeros(0, dtype=torch.long), reduction="mean"))
    target = torch.tensor([0, 3, 1, 2])
    half = ops.sigmoid_focal_loss(pred.half(), target, reduction="none")
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), focal_reference(pred.half().double(), target, 2.0, 0.25, None),
                               **sum_tolerance(F32, 1, 1.0, result_dtype=torch.float16))


def test_depth_weighted_attention_half_and_empty_queries():
    value, shapes, starts, loc, attn, depth_prob, ref_pts, bins = depth_case(5)
    out = ops.depth_weighted_deformable_attn(value.half(), shapes, starts, loc.half(), attn.half(),
                                             depth_prob.half(), ref_pts.half(), bins)
    assert out.dtype == torch.float16
    want = ops.depth_weighted_deformable_attn(value.half().double(), shapes, starts, loc.half().double(),
                                              attn.half().double(), depth_prob.half().double(),
                                              ref_pts.half().double(), bins)
    # weights: 4 bilinear taps of one bin; attention: L*P = 4 samples of 4 taps; float32, rounded to float16
    torch.testing.assert_close(out.double(), want, **sum_tolerance(F32, 16, 1.0, result_dtype=torch.float16))
    empty = ops.depth_weighted_deformable_attn(value, shapes, starts, loc[:, :0], attn[:, :0], depth_prob,
                                               ref_pts[:, :0], bins[:, :0])
    assert empty.shape == (2, 0, 6)


def test_depth_weighted_attention_is_float32_under_autocast_like_upstreams_fp32_function():
    """FB-OCC's DA step uses MultiScaleDeformableAttnFunction_fp32 (custom_fwd(cast_inputs=float32)): under autocast
    half inputs give a float32 result; outside autocast the value's dtype."""
    value, shapes, starts, loc, attn, depth_prob, ref_pts, bins = depth_case(6)
    args = (shapes, starts, loc.float(), attn.float(), depth_prob.float(), ref_pts.float(), bins)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ops.depth_weighted_deformable_attn(value.bfloat16(), *args)
    outside = ops.depth_weighted_deformable_attn(value.bfloat16(), *args)
    assert inside.dtype == F32 and outside.dtype == torch.bfloat16
    torch.testing.assert_close(inside, ops.depth_weighted_deformable_attn(value.bfloat16().float(), *args))
