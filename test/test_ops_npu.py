"""The npu backend of bevkit.ops against a fake mx_driving (test/fakes/mx_driving).

CPU tensors stand in for NPU ones (bevkit.device.emulate_device('npu')). The fake checks every call against
mx_driving's documented contract (dtypes, shapes, positional order, size limits) and raises ContractError on a
breach; these tests check that bevkit.ops stays inside the limits by padding / splitting / falling back, and that
the results and gradients equal the portable backend's.
"""
from __future__ import annotations

import importlib.util
import logging
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

import bevkit.ops as ops
from bevkit.device import emulate_device
from bevkit.ops import bev_pool as bev_pool_mod, dispatch, voxel_pooling as vp_mod
from tolerance import sum_tolerance

FAKES = pathlib.Path(__file__).parent / "fakes"
FAKE = FAKES / "mx_driving" / "__init__.py"
F32 = torch.float32


def _load_fake():
    spec = importlib.util.spec_from_file_location("mx_driving", FAKE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def mx(monkeypatch):
    fake = _load_fake()
    monkeypatch.setitem(sys.modules, "mx_driving", fake)
    monkeypatch.delenv(dispatch.ENV, raising=False)
    dispatch.reset_log_once()
    with emulate_device("npu"):
        yield fake


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def both(fn, *tensors):
    """(npu result, portable result) of fn(*tensors) plus their gradients for a fixed random output gradient."""
    results = []
    for backend in (None, "portable"):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
        with ops.force_backend(backend):
            out = fn(*leaves)
        g = torch.randn(out.shape, generator=_gen(123), dtype=out.dtype)
        grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g, allow_unused=True)
        results.append((out.detach(), grads))
    return results


def assert_same(results, n_terms, magnitude=1.0, dtype=F32):
    """npu and portable results (outputs and gradients) agree to the rounding of ``dtype`` sums of at most
    ``n_terms`` terms of mean size ``magnitude`` (test/tolerance.py): the backends sum in different orders."""
    (out_n, grads_n), (out_p, grads_p) = results
    assert out_n.shape == out_p.shape and out_n.dtype == out_p.dtype
    tol = sum_tolerance(dtype, n_terms, magnitude, result_dtype=out_n.dtype)
    torch.testing.assert_close(out_n, out_p, **tol)
    for a, b in zip(grads_n, grads_p):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            torch.testing.assert_close(a, b, **tol)


def max_per_cell(geom, voxel_num):
    """Most in-range points any one BEV cell of one batch receives (the longest sum in voxel pooling)."""
    nx, ny, nz = voxel_num
    g = geom.reshape(geom.shape[0], -1, 3).long()
    ok = (g[..., 0] >= 0) & (g[..., 0] < nx) & (g[..., 1] >= 0) & (g[..., 1] < ny) & (g[..., 2] >= 0) & \
        (g[..., 2] < nz)
    cell = (torch.arange(g.shape[0]).view(-1, 1) * ny + g[..., 1]) * nx + g[..., 0]
    return int(torch.bincount(cell[ok]).max()) if bool(ok.any()) else 1


# ---------------------------------------------------------------------------------------------------- bev_pool


def bev_inputs(seed, c, b=1, n=2, d=4, h=3, w=5, grid=(2, 4, 4), p=60):
    g = _gen(seed)
    z, y, x = grid
    depth = torch.rand(b, n, d, h, w, generator=g)
    feat = torch.randn(b, n, h, w, c, generator=g)
    rd = torch.randperm(depth.numel(), generator=g)[:p]
    rf = torch.randint(0, b * n * h * w, (p,), generator=g)
    rb = torch.sort(torch.randint(0, b * z * y * x, (p,), generator=g)).values
    return depth, feat, rd.int(), rf.int(), rb.int(), (b, z, y, x, c)


@pytest.mark.parametrize("c, expected_calls", [(80, [80]), (12, [16]), (400, [360, 40])])
def test_bev_pool_v3_called_within_limits(mx, c, expected_calls):
    depth, feat, rd, rf, rb, shape = bev_inputs(0, c)
    res = both(lambda d_, f_: ops.bev_pool_v2(d_, f_, rd, rf, rb, shape), depth, feat)
    assert [call["C"] for call in mx.calls("bev_pool_v3")] == expected_calls
    assert_same(res, n_terms=max(60, c))  # 60 points into a cell at most; grad_depth sums over C


def test_bev_pool_v3_output_limit_splits_channels(mx, monkeypatch):
    depth, feat, rd, rf, rb, shape = bev_inputs(1, 40)
    cells = 2 * 4 * 4
    monkeypatch.setattr(bev_pool_mod, "NPU_MAX_OUT_ELEMENTS", cells * 16)  # pretend B*Z*Y*X*C <= 2^31 binds at C=16
    res = both(lambda d_, f_: ops.bev_pool_v2(d_, f_, rd, rf, rb, shape), depth, feat)
    assert [call["C"] for call in mx.calls("bev_pool_v3")][:3] == [16, 16, 8]
    assert_same(res, n_terms=60)


def test_bev_pool_v3_gets_int32_ranks_and_float32(mx):
    depth, feat, rd, rf, rb, shape = bev_inputs(2, 8)
    out = ops.bev_pool_v2(depth.half(), feat.double(), rd.long(), rf.long(), rb.long(), shape)
    assert out.dtype == torch.float32 and len(mx.calls("bev_pool_v3")) == 1
    with ops.force_backend("portable"):
        torch.testing.assert_close(out, ops.bev_pool_v2(depth.half(), feat.float(), rd, rf, rb, shape),
                                   **sum_tolerance(F32, n_terms=60, magnitude=1.0))


def test_bev_pool_v3_empty_points_use_portable(mx):
    depth, feat, rd, rf, rb, shape = bev_inputs(3, 8, p=0)
    out = ops.bev_pool_v2(depth, feat, rd, rf, rb, shape)
    assert not mx.calls("bev_pool_v3") and out.shape == (1, 8, 2, 4, 4) and not out.any()


def test_fake_rejects_contract_breaches(mx):
    """The fake is strict: the tests above would notice a breach."""
    depth, feat, rd, rf, rb, shape = bev_inputs(0, 12)
    with pytest.raises(mx.ContractError, match="multiple of 8"):
        mx.bev_pool_v3(depth, feat, rd, rf, rb, list(shape))
    with pytest.raises(mx.ContractError, match="int32"):
        mx.bev_pool_v3(depth, F.pad(feat, (0, 4)), rd.long(), rf, rb, [1, 2, 4, 4, 16])
    with pytest.raises(mx.ContractError, match="positional"):
        mx.npu_voxel_pooling_train(geom_xyz=None, input_features=None, voxel_num=None)
    with pytest.raises(mx.ContractError, match="N=100001"):
        mx.npu_voxel_pooling_train(torch.zeros(1, 100001, 3, dtype=torch.int32), torch.zeros(1, 100001, 1), [1, 1, 1])


# ------------------------------------------------------------------------------------------------ voxel pooling


def voxel_inputs(seed, b, n, c, voxel_num):
    g = _gen(seed)
    nx, ny, nz = voxel_num
    geom = torch.stack([torch.randint(-2, nx + 2, (b, n), generator=g), torch.randint(-2, ny + 2, (b, n), generator=g),
                        torch.randint(-1, nz + 1, (b, n), generator=g)], -1).int()
    return geom, torch.randn(b, n, c, generator=g)


@pytest.mark.parametrize("b, n, c, voxel_num, expect", [
    (2, 50, 80, [8, 6, 1], dict(calls=1)),
    (1, 250_001, 4, [8, 6, 1], dict(calls=3, max_n=100_000)),  # N > 100000: point chunks, summed
    (1, 30, 300, [8, 6, 1], dict(calls=2, max_c=256)),  # C > 256: channel chunks
    (130, 3, 2, [8, 6, 1], dict(calls=2, max_b=128)),  # B > 128: batch chunks
    (2, 40, 3, [8, 6, 12], dict(calls=1, nz=1)),  # nz > 10: z range-checked first
])
def test_npu_voxel_pooling_train_within_limits(mx, b, n, c, voxel_num, expect):
    geom, feats = voxel_inputs(0, b, n, c, voxel_num)
    res = both(lambda f: ops.voxel_pooling_train(geom, f, voxel_num), feats)
    calls = mx.calls("npu_voxel_pooling_train")
    assert len(calls) == expect["calls"]
    assert max(x["N"] for x in calls) <= expect.get("max_n", n)
    assert max(x["C"] for x in calls) <= expect.get("max_c", c)
    assert max(x["B"] for x in calls) <= expect.get("max_b", b)
    if "nz" in expect:
        assert all(x["voxel_num"][2] == 1 for x in calls)
    # Was a fixed 1e-5: 250,001 points put ~700 float32 terms into one cell, summed in another order (issue 10).
    assert_same(res, n_terms=max_per_cell(geom, voxel_num))


def test_npu_voxel_pooling_product_limits(mx, monkeypatch):
    """B*N*C <= 1e8 and B*ny*nx*C <= 1e8, with the limits scaled down so the test stays small."""
    monkeypatch.setattr(vp_mod, "NPU_MAX_IN", 2 * 10 * 6)
    monkeypatch.setattr(vp_mod, "NPU_MAX_OUT", 2 * 6 * 8 * 4)
    geom, feats = voxel_inputs(1, 2, 50, 10, [8, 6, 1])
    res = both(lambda f: ops.voxel_pooling_train(geom, f, [8, 6, 1]), feats)
    calls = mx.calls("npu_voxel_pooling_train")
    assert all(x["B"] * x["N"] * x["C"] <= 120 and x["B"] * 48 * x["C"] <= 384 for x in calls)
    assert {x["C"] for x in calls} == {4, 2} and len(calls) > 2
    assert_same(res, n_terms=max_per_cell(geom, [8, 6, 1]))


def test_npu_voxel_pooling_falls_back_for_large_grids_and_empty_input(mx, caplog):
    geom, feats = voxel_inputs(2, 1, 20, 3, [1200, 4, 1])
    with caplog.at_level(logging.WARNING, logger="bevkit.ops"):
        out = ops.voxel_pooling_train(geom, feats, [1200, 4, 1])
        ops.voxel_pooling_train(geom, feats, [1200, 4, 1])
    assert not mx.calls("npu_voxel_pooling_train")
    assert len([r for r in caplog.records if "nx, ny <= 1000" in r.getMessage()]) == 1  # logged once
    with ops.force_backend("portable"):
        assert torch.equal(out, ops.voxel_pooling_train(geom, feats, [1200, 4, 1]))  # both ran the portable code
    geom0, feats0 = voxel_inputs(2, 1, 0, 3, [4, 4, 1])
    assert ops.voxel_pooling_train(geom0, feats0, [4, 4, 1]).shape == (1, 3, 4, 4)
    assert not mx.calls("npu_voxel_pooling_train")


def test_npu_voxel_pooling_half(mx):
    geom, feats = voxel_inputs(3, 2, 40, 8, [8, 6, 1])
    out = ops.voxel_pooling_train(geom, feats.half(), [8, 6, 1])
    assert out.dtype == torch.float16 and len(mx.calls("npu_voxel_pooling_train")) == 1
    with ops.force_backend("portable"):
        # the (fake) kernel accumulates in float16, the portable code in float32
        torch.testing.assert_close(out.float(), ops.voxel_pooling_train(geom, feats.half(), [8, 6, 1]).float(),
                                   **sum_tolerance(torch.float16, max_per_cell(geom, [8, 6, 1]), 1.0))


def test_npu_voxel_pooling_inference_chunks_outer_product(mx, monkeypatch):
    monkeypatch.setattr(vp_mod, "NPU_MAX_N", 50)
    g = _gen(4)
    b, ncam, d, h, w, c = 2, 2, 5, 3, 4, 6
    geom = voxel_inputs(4, b, ncam * d * h * w, 1, [8, 6, 1])[0].view(b, ncam, d, h, w, 3)
    depth = torch.rand(b * ncam, d, h, w, generator=g)
    context = torch.randn(b * ncam, c, h, w, generator=g)
    res = both(lambda d_, c_: ops.voxel_pooling_inference(geom, d_, c_, [8, 6, 1]), depth, context)
    calls = mx.calls("npu_voxel_pooling_train")
    assert len(calls) == 3 and max(x["N"] for x in calls) <= 50  # 2 x 5 x 3 x 4 = 120 points per batch: 50, 50, 20
    assert_same(res, n_terms=120)


# ------------------------------------------------------------------------------------------ deformable attention


def msda_inputs(seed, bs, nq, nh, dh, shapes, npt):
    g = _gen(seed)
    shapes_t = torch.tensor(shapes)
    starts = torch.cat([shapes_t.new_zeros(1), (shapes_t[:, 0] * shapes_t[:, 1]).cumsum(0)[:-1]])
    keys = int((shapes_t[:, 0] * shapes_t[:, 1]).sum())
    value = torch.randn(bs, keys, nh, dh, generator=g)
    loc = torch.rand(bs, nq, nh, len(shapes), npt, 2, generator=g) * 1.2 - 0.1
    attn = torch.rand(bs, nq, nh, len(shapes), npt, generator=g)
    return value, shapes_t, starts, loc, attn


@pytest.mark.parametrize("nh, dh, shapes, npt, expect", [
    (8, 16, [(4, 6)], 4, dict(calls=1, dims={16})),
    (8, 10, [(4, 6)], 8, dict(calls=1, dims={16})),  # FB-OCC heads: 80/8 = 10 dims -> padded to 16
    (10, 8, [(4, 6)], 4, dict(calls=2, heads={8, 2})),  # > 8 heads: split heads
    (2, 8, [(4, 6), (2, 3)], 40, dict(calls=2, points={32, 8})),  # levels*points = 80 > 64: split points
    (1, 300, [(4, 6)], 1, dict(calls=2, dims={256, 48})),  # > 256 dims: split channels (300 -> 304)
])
def test_npu_msda_within_limits(mx, nh, dh, shapes, npt, expect):
    value, shapes_t, starts, loc, attn = msda_inputs(0, 2, 5, nh, dh, shapes, npt)
    res = both(lambda v, l_, a: ops.multi_scale_deformable_attn(v, shapes_t, starts, l_, a), value, loc, attn)
    calls = mx.calls("multi_scale_deformable_attn")
    assert len(calls) == expect["calls"]
    for key, field in (("dims", "dims"), ("heads", "heads"), ("points", "points")):
        if key in expect:
            assert {x[field] for x in calls} == expect[key]
    # Longest sums: a value gradient collects nq * L * P * 4 bilinear taps; a location gradient sums head dims.
    assert_same(res, n_terms=max(5 * len(shapes) * npt * 4, dh))


def test_npu_depth_weighted_attention(mx):
    value, shapes_t, starts, loc, attn = msda_inputs(1, 3, 7, 8, 10, [(4, 6)], 8)
    g = _gen(2)
    depth_prob = torch.rand(3, 24, 12, generator=g).softmax(-1)
    ref_pts = torch.rand(3, 7, 4, 2, generator=g)
    bins = torch.randint(0, 12, (3, 7, 4), generator=g)
    onehot = F.one_hot(bins, 12)
    res = both(lambda v, l_, a, dp: ops.depth_weighted_deformable_attn(v, shapes_t, starts, l_, a, dp, ref_pts,
                                                                       onehot), value, loc, attn, depth_prob)
    calls = mx.calls("multi_scale_deformable_attn")
    # per run: the depth sampling (1 head, 12 -> 16 dims, 1 point) and the main attention (8 heads, 10 -> 16)
    assert [(x["heads"], x["dims"], x["points"]) for x in calls[:2]] == [(1, 16, 1), (8, 16, 8)]
    assert_same(res, n_terms=7 * 8 * 4)  # nq * P * 4 taps into a value gradient


def test_npu_msda_empty_queries_use_portable(mx):
    value, shapes_t, starts, loc, attn = msda_inputs(3, 2, 0, 8, 16, [(4, 6)], 4)
    out = ops.multi_scale_deformable_attn(value, shapes_t, starts, loc, attn)
    assert out.shape == (2, 0, 128) and not mx.calls("multi_scale_deformable_attn")


# -------------------------------------------------------------------------------------------------- grid sample


@pytest.mark.parametrize("c, expected", [(8, [8]), (6, [8]), (1280, [128] * 10), (130, [128, 4])])
def test_npu_grid_sampler3d_channel_limits(mx, c, expected):
    g = _gen(5)
    inp = torch.randn(2, c, 3, 4, 5, generator=g)
    grid = torch.rand(2, 2, 3, 4, 3, generator=g) * 2.2 - 1.1
    res = both(lambda i, gr: ops.grid_sample_3d(i, gr), inp, grid)
    assert [x["C"] for x in mx.calls("grid_sampler3d_v1")] == expected
    # The grid gradient sums 8 taps over all C channels (chunks reorder those float32 sums); its terms carry the
    # (size - 1) / 2 unnormalisation factor (<= 2 here).
    assert_same(res, n_terms=8 * c, magnitude=2.0)


def test_npu_grid_sampler3d_unsupported_modes_fall_back(mx):
    g = _gen(6)
    inp = torch.randn(1, 4, 3, 4, 5, generator=g)
    grid = torch.rand(1, 2, 3, 4, 3, generator=g) * 2 - 1
    for kwargs in (dict(align_corners=False), dict(mode="nearest"), dict(padding_mode="border")):
        out = ops.grid_sample_3d(inp, grid, **kwargs)
        assert torch.equal(out, F.grid_sample(inp, grid, **{"align_corners": True, **kwargs}))  # the same call
    assert not mx.calls("grid_sampler3d_v1")
    out = ops.grid_sample_3d(inp.double(), grid.double())
    assert out.dtype == torch.float64 and len(mx.calls("grid_sampler3d_v1")) == 1


# ------------------------------------------------------------------------------------------------------ dispatch


def test_ops_without_mx_kernel_run_portable_on_npu(mx):
    pred = torch.randn(4, 3)
    target = torch.tensor([0, 1, 2, 3])
    with ops.force_backend("portable"):
        want = ops.sigmoid_focal_loss(pred, target, reduction="none")
    assert torch.equal(ops.sigmoid_focal_loss(pred, target, reduction="none"), want)  # portable both times
    assert not mx.CALLS


def test_forced_npu_without_mx_driving_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mx_driving", None)  # import fails
    monkeypatch.setitem(dispatch._import_failed, "mx_driving", "ImportError: not installed")
    depth, feat, rd, rf, rb, shape = bev_inputs(0, 8)
    with ops.force_backend("npu"), pytest.raises(RuntimeError, match="mx_driving does not import"):
        ops.bev_pool_v2(depth, feat, rd, rf, rb, shape)


def test_npu_device_without_mx_driving_falls_back(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mx_driving", None)
    monkeypatch.setitem(dispatch._import_failed, "mx_driving", "ImportError: not installed")
    dispatch.reset_log_once()
    depth, feat, rd, rf, rb, shape = bev_inputs(0, 8)
    with emulate_device("npu"), caplog.at_level(logging.WARNING, logger="bevkit.ops"):
        out = ops.bev_pool_v2(depth, feat, rd, rf, rb, shape)
    with ops.force_backend("portable"):
        assert torch.equal(out, ops.bev_pool_v2(depth, feat, rd, rf, rb, shape))  # portable both times
    assert any("mx_driving is not importable" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- what the real package refuses (26.1 wrappers)


def test_fake_refuses_strided_inputs_the_wrappers_pass_on(mx):
    """bev_pool_v3 and multi_scale_deformable_attn hand their tensors to the kernel without .contiguous()."""
    depth, feat, rd, rf, rb, shape = bev_inputs(0, 8)
    feat_t = feat.transpose(2, 3).contiguous().transpose(2, 3)
    with pytest.raises(mx.ContractError, match="feat must be contiguous"):
        mx.bev_pool_v3(depth, feat_t, rd, rf, rb, list(shape))
    value, shapes_t, starts, loc, attn = msda_inputs(0, 2, 5, 8, 16, [(4, 6)], 4)
    with pytest.raises(mx.ContractError, match="value must be contiguous"):
        mx.multi_scale_deformable_attn(value.transpose(0, 1).contiguous().transpose(0, 1), shapes_t, starts, loc,
                                       attn)
    loc_t = loc.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    with pytest.raises(mx.ContractError, match="sampling_locations must be contiguous"):
        mx.multi_scale_deformable_attn(value, shapes_t, starts, loc_t, attn)
    mx.multi_scale_deformable_attn(value, shapes_t, starts, loc_t.double(), attn)  # .type_as(value) copies it


def test_npu_ops_hand_the_kernels_dense_inputs(mx):
    """Strided inputs reach the kernels dense (the fake would refuse them) and give the portable results."""
    depth, feat, rd, rf, rb, shape = bev_inputs(4, 16)
    feat_t = feat.transpose(2, 3).contiguous().transpose(2, 3)
    depth_t = depth.transpose(3, 4).contiguous().transpose(3, 4)
    res = both(lambda d_, f_: ops.bev_pool_v2(d_, f_, rd, rf, rb, shape), depth_t, feat_t)
    assert len(mx.calls("bev_pool_v3")) == 1
    assert_same(res, n_terms=60)
    value, shapes_t, starts, loc, attn = msda_inputs(5, 2, 5, 8, 16, [(4, 6)], 4)
    v_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    a_t = attn.transpose(1, 3).contiguous().transpose(1, 3)
    res = both(lambda v, a: ops.multi_scale_deformable_attn(v, shapes_t, starts, loc, a), v_t, a_t)
    assert len(mx.calls("multi_scale_deformable_attn")) == 1
    assert_same(res, n_terms=5 * 4 * 4)


def test_npu_msda_dtype_follows_the_kernel(mx):
    """fp16 in gives fp16 out outside autocast (the kernel runs in fp16); under autocast the wrapper's
    custom_fwd(cast_inputs=float32) computes in fp32, and the kit hands back value's dtype either way."""
    value, shapes_t, starts, loc, attn = msda_inputs(6, 2, 5, 8, 16, [(4, 6)], 4)
    direct = mx.multi_scale_deformable_attn(value.half(), shapes_t, starts, loc.half(), attn.half())
    assert direct.dtype == torch.float16
    out = ops.multi_scale_deformable_attn(value.half(), shapes_t, starts, loc.half(), attn.half())
    assert out.dtype == torch.float16 and mx.calls("multi_scale_deformable_attn")[-1]["dtype"] == "torch.float16"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the emulated NPU's autocast (bevkit.device.autocast)
        assert mx.multi_scale_deformable_attn(value.half(), shapes_t, starts, loc.half(), attn.half()).dtype == F32
        out_ac = ops.multi_scale_deformable_attn(value.half(), shapes_t, starts, loc.half(), attn.half())
    assert out_ac.dtype == torch.float16
    assert mx.calls("multi_scale_deformable_attn")[-1]["autocast"] is True
    with ops.force_backend("portable"):
        want = ops.multi_scale_deformable_attn(value.half(), shapes_t, starts, loc.half(), attn.half())
    # the fake kernel sums fp16-rounded inputs in fp32 like the portable code: fp16 output rounding remains
    torch.testing.assert_close(out, want, **sum_tolerance(F32, 16, 1.0, result_dtype=torch.float16))
    torch.testing.assert_close(out_ac, want, **sum_tolerance(F32, 16, 1.0, result_dtype=torch.float16))


@pytest.mark.parametrize("soc, runs_kernel", [("Ascend910B1", True), ("Ascend910_9391", True),
                                              ("Ascend950PR", True), ("Ascend310P3", False)])
def test_npu_grid_sampler3d_chip_gate(mx, fake_torch_npu, monkeypatch, soc, runs_kernel):
    """grid_sampler3d_v1's wrapper serves Ascend910* and Ascend950* only and raises elsewhere: the kit asks the
    SoC first and runs the portable code on other chips."""
    monkeypatch.setenv("FAKE_NPU_SOC", soc)
    g = _gen(7)
    inp = torch.randn(1, 8, 3, 4, 5, generator=g)
    grid = torch.rand(1, 2, 3, 4, 3, generator=g) * 2 - 1
    if not runs_kernel:
        with pytest.raises(NotImplementedError, match="only supports Ascend910B, Ascend910C and Ascend950"):
            mx.grid_sampler3d_v1(inp, grid, "bilinear", "zeros", True)
    res = both(lambda i, gr: ops.grid_sample_3d(i, gr), inp, grid)
    assert bool(mx.calls("grid_sampler3d_v1")) == runs_kernel
    assert_same(res, n_terms=8 * 8, magnitude=2.0)


@pytest.mark.parametrize("cin, groups, dg, dtype, runs_kernel", [
    (64, 4, 1, torch.float32, True),  # BEVDepth's DCN shape class: groups 4, one deform group
    (64, 1, 1, torch.float16, True),  # AMP: computed in float32, returned in the offset's dtype
    (64, 1, 2, torch.float32, False),  # deformable_groups must be 1
    (32, 1, 1, torch.float32, False),  # c_in must be a multiple of 64
])
def test_npu_deform_conv2d_goes_to_mx_driving_within_its_limits(mx, cin, groups, dg, dtype, runs_kernel):
    g = _gen(8)
    x = torch.randn(2, cin, 5, 6, generator=g).to(dtype)
    offset = (torch.randn(2, dg * 18, 5, 6, generator=g) * 1.5).to(dtype)
    weight = (torch.randn(16, cin // groups, 3, 3, generator=g) * 0.1).to(dtype)
    res = both(lambda i, o, w: ops.deform_conv2d(i, o, w, 1, 1, 1, groups, dg), x, offset, weight)
    calls = mx.calls("deform_conv2d")
    assert bool(calls) == runs_kernel
    if runs_kernel:
        assert calls[0]["groups"] == groups and calls[0]["C_in"] == cin
    assert res[0][0].dtype == dtype
    # output: C_in/groups * 9 samples of 4 taps; weight gradient: N*Ho*Wo = 60 terms; offsets ~1.5 randn
    assert_same(res, n_terms=max(cin // groups * 36, 60), magnitude=2.0)


def test_fake_refuses_what_mx_driving_deform_conv_and_sparse_conv_refuse(mx):
    x, offset, weight = torch.randn(1, 64, 4, 4), torch.randn(1, 36, 4, 4), torch.randn(8, 64, 3, 3)
    with pytest.raises(mx.ContractError, match="deformable_groups must be 1"):
        mx.deform_conv2d(x, offset, weight, 1, 1, 1, 1, 2)
    with pytest.raises(mx.ContractError, match="multiple of 64"):
        mx.deform_conv2d(x[:, :32], offset[:, :18], weight[:, :32], 1, 1, 1, 1, 1)
    with pytest.raises(mx.ContractError, match="float32"):
        mx.deform_conv2d(x.half(), offset[:, :18].half(), weight.half(), 1, 1, 1, 1, 1)
    out = mx.deform_conv2d(x, offset[:, :18], weight, 1, 1, 1, 1, 1)
    assert out.shape == (1, 8, 4, 4) and not out.is_contiguous()  # the kernel returns a permuted view
    with pytest.raises(RuntimeError, match="do not support group"):
        mx.SubMConv3d(8, 8, 3, groups=2)
    with pytest.raises(mx.ContractError, match="stride must be 1"):
        mx.SubMConv3d(8, 8, 3, stride=2)
    with pytest.raises(mx.ContractError, match="kernel_size must be 1 or 3"):
        mx.SubMConv3d(8, 8, 2)
    with pytest.raises(mx.ContractError, match=r"kernel_size must be in \[1, 3\]"):
        mx.SparseConv3d(8, 8, 5, stride=2)
    with pytest.raises(mx.ContractError, match="dilation must be 1"):
        mx.SparseConv3d(8, 8, 3, dilation=2)


def test_npu_focal_loss_runs_mmcv_npu_kernel_within_its_contract(monkeypatch):
    """The NPU route of sigmoid_focal_loss is mmcv's NPU kernel (stand-in: test/fakes/mmcv_npu.py, which
    refuses targets >= C and scales weight per class as mmcv 1.7.2's NPU adapter does): the kit calls it
    without weight, applies weight[target] itself and adds a dummy class for background targets."""
    spec = importlib.util.spec_from_file_location("mmcv_npu_fake", FAKES / "mmcv_npu.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    g = _gen(9)
    pred = torch.randn(40, 5, generator=g) * 3
    weight = torch.rand(5, generator=g) + 0.5
    with pytest.raises(fake.ContractError, match="one_hot"):
        fake.sigmoid_focal_loss(pred, torch.full((40,), 5), 2.0, 0.25, None, "none")
    for target in (torch.randint(0, 5, (40,), generator=g), torch.randint(0, 6, (40,), generator=g)):
        for w in (None, weight):
            for reduction in ("none", "mean", "sum"):
                fake.CALLS.clear()
                results = []
                for backend in ("npu", "portable"):
                    p = pred.clone().requires_grad_()
                    with emulate_device("npu"), ops.force_backend(backend), \
                            dispatch.stand_in("npu", "mmcv.ops.focal_loss", fake):
                        out = ops.sigmoid_focal_loss(p, target, 2.0, 0.25, w, reduction)
                    results.append((out.detach(), torch.autograd.grad(out.sum(), p)[0]))
                assert len(fake.CALLS) == 1 and fake.CALLS[0][1]["weight"] is False
                # per element: one closed-form term; 'mean'/'sum' add M*C = 200 of them
                tol = sum_tolerance(F32, 200 if reduction != "none" else 1, 1.0)
                for a, b in zip(*results):
                    torch.testing.assert_close(a, b, **tol)
