"""The DrivingSDK ports' speed ops and the op-limit policy, against the fake mx_driving (test/fakes/mx_driving).

- ``add_relu``, ``max_pool2d``, ``batch_matvec`` (bevkit/ops/fused.py): the NPU backend reaches mx_driving's
  npu_add_relu / npu_max_pool2d / npu_batch_matmul within their contracts and gives the torch result (exactly
  for add+relu and max-pool, to the rounding of a 3- or 4-term sum for the multiply-and-sum matvec);
- ``BEVKIT_NPU_OP_LIMITS`` (bevkit/op_limits.py): ``documented`` splits / pads, ``port`` makes the ports' single
  unpadded calls, and the fake refuses a port-sized call under ``documented``.
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
from bevkit import op_limits
from bevkit.device import emulate_device
from bevkit.ops import dispatch
from tolerance import sum_tolerance

FAKE = pathlib.Path(__file__).parent / "fakes" / "mx_driving" / "__init__.py"


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
    monkeypatch.delenv(op_limits.ENV, raising=False)
    dispatch.reset_log_once()
    with emulate_device("npu"):
        yield fake


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -------------------------------------------------------------------------------------------------- add_relu


def test_add_relu_reaches_npu_add_relu_and_equals_relu_of_sum(mx):
    x = torch.randn(2, 8, 5, 7, generator=_gen(1), requires_grad=True)
    y = torch.randn(2, 8, 5, 7, generator=_gen(2), requires_grad=True)
    out = ops.add_relu(x * 1, y)  # x * 1: a temporary, as the ResNet blocks pass
    assert mx.calls("npu_add_relu") == [dict(shape=(2, 8, 5, 7), dtype="torch.float32", in_place=False)]
    ref = torch.relu(x + y)
    assert torch.equal(out, ref)  # the same two roundings: exact
    g = torch.randn(out.shape, generator=_gen(3))
    got = torch.autograd.grad(out, (x, y), g)
    want = torch.autograd.grad(ref, (x, y), g)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_add_relu_large_inputs_are_written_in_place_like_the_kernel(mx):
    x = torch.randn(2_000_000, generator=_gen(4))
    y = torch.randn(2_000_000, generator=_gen(5))
    expected = torch.relu(x + y)
    out = ops.add_relu(x, y)
    assert out.data_ptr() == x.data_ptr() and torch.equal(out, expected)  # why callers pass a temporary
    assert mx.calls("npu_add_relu")[0]["in_place"] is True


def test_add_relu_other_inputs_run_torch(mx):
    x, y = torch.randn(4, 3), torch.randn(3)  # broadcasting: the kernel takes equal shapes only
    assert torch.equal(ops.add_relu(x, y), torch.relu(x + y))
    assert torch.equal(ops.add_relu(x.double(), x.double()), torch.relu(2 * x.double()))
    assert mx.calls("npu_add_relu") == []
    with pytest.raises(mx.ContractError, match="one shape"):
        mx.npu_add_relu(x, y)
    with pytest.raises(mx.ContractError, match="float32 or float16"):
        mx.npu_add_relu(x.double(), x.double())


def test_add_relu_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(ops.add_relu(x, y), torch.relu(x + y))


# ------------------------------------------------------------------------------------------------ max_pool2d


def test_stem_max_pool_without_gradient_reaches_npu_max_pool2d(mx):
    x = torch.randn(2, 64, 30, 44, generator=_gen(6))
    with torch.no_grad():
        out = ops.max_pool2d(x, 3, 2, 1)
    assert mx.calls("npu_max_pool2d") == [dict(shape=(2, 64, 30, 44), dtype="torch.float32", fast_path=True)]
    assert torch.equal(out, F.max_pool2d(x, 3, 2, 1))  # a max is exact


def test_max_pool_needing_a_gradient_or_other_shapes_runs_torch(mx):
    x = torch.randn(1, 64, 16, 16, generator=_gen(7), requires_grad=True)
    out = ops.max_pool2d(x, 3, 2, 1)
    out.sum().backward()  # npu_max_pool2d has no backward: the kit never hands it such an input
    assert torch.equal(x.grad, torch.autograd.grad(F.max_pool2d(x, 3, 2, 1).sum(), x)[0])
    odd = torch.randn(1, 68, 16, 16)  # fast path (C >= 64) needs C % 8 == 0 in float32
    assert torch.equal(ops.max_pool2d(odd, 3, 2, 1), F.max_pool2d(odd, 3, 2, 1))
    assert torch.equal(ops.max_pool2d(odd, 2, 2, 0), F.max_pool2d(odd, 2, 2, 0))
    assert mx.calls("npu_max_pool2d") == []
    with pytest.raises(mx.ContractError, match="multiple of 8"):
        mx.npu_max_pool2d(odd, 3, 2, 1)
    with pytest.raises(mx.ContractError, match="kernel_size 3"):
        mx.npu_max_pool2d(odd, 2, 2, 0)
    leaf = torch.randn(1, 8, 6, 6, requires_grad=True)
    with pytest.raises(mx.ContractError, match="no backward"):
        mx.npu_max_pool2d(leaf, 3, 2, 1).sum().backward()


# ---------------------------------------------------------------------------------------------- batch_matvec


def _mul_sum(mat, vec):
    """npu_batch_matmul's documented formulation: broadcast multiply with the transposed vector, sum, keepdim."""
    return (mat * vec.transpose(-1, -2)).sum(-1, keepdim=True)


@pytest.mark.parametrize("mat_shape, vec_shape", [((6, 1, 1, 1, 3, 3), (6, 20, 4, 11, 3, 1)),
                                                   ((2, 1, 1, 4, 4), (1, 50, 8, 4, 1)),
                                                   ((6, 1220, 4, 4), (6, 1220, 4, 1))])
def test_multiply_and_sum_equals_matmul_in_float64(mat_shape, vec_shape):
    """The formulation itself, float64, against torch.matmul: a sum of n = 3 or 4 products each way."""
    mat = torch.randn(mat_shape, generator=_gen(8), dtype=torch.float64) * 3
    vec = torch.randn(vec_shape, generator=_gen(9), dtype=torch.float64) * 40
    n = mat_shape[-1]
    magnitude = float((mat.abs().max() * vec.abs().max()))
    torch.testing.assert_close(_mul_sum(mat, vec), torch.matmul(mat, vec),
                               **sum_tolerance(torch.float64, n, magnitude))


def test_batch_matvec_reaches_npu_batch_matmul(mx):
    mat = torch.randn(6, 1, 1, 1, 3, 3, generator=_gen(10), requires_grad=True)
    vec = (torch.randn(6, 20, 4, 11, 3, 1, generator=_gen(11)) * 40).requires_grad_()
    out = ops.batch_matvec(mat, vec)
    assert mx.calls("npu_batch_matmul") == [dict(mat=(6, 1, 1, 1, 3, 3), pts=(6, 20, 4, 11, 3, 1))]
    ref = torch.matmul(mat, vec)
    magnitude = float(mat.detach().abs().max() * vec.detach().abs().max())
    torch.testing.assert_close(out, ref, **sum_tolerance(torch.float32, 3, magnitude))
    g = torch.randn(out.shape, generator=_gen(12))
    got, want = torch.autograd.grad(out, (mat, vec), g), torch.autograd.grad(ref, (mat, vec), g)
    # d mat sums over the broadcast points (20 * 4 * 11 per camera); d vec over the 3 output rows
    torch.testing.assert_close(got[0], want[0], **sum_tolerance(torch.float32, 20 * 4 * 11,
                                                                float(g.abs().max() * vec.detach().abs().max())))
    torch.testing.assert_close(got[1], want[1], **sum_tolerance(torch.float32, 3, float(g.abs().max())))


def test_batch_matvec_outside_the_contract_runs_matmul(mx):
    rank7 = torch.randn(1, 2, 1, 1, 1, 3, 3), torch.randn(1, 2, 5, 4, 3, 3, 1)
    assert torch.equal(ops.batch_matvec(*rank7), torch.matmul(*rank7))
    f64 = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 7, 4, 1, dtype=torch.float64)
    assert torch.equal(ops.batch_matvec(*f64), torch.matmul(*f64))
    assert mx.calls("npu_batch_matmul") == []
    with pytest.raises(ValueError, match="n = 3 or 4"):
        ops.batch_matvec(torch.randn(2, 2, 2), torch.randn(2, 2, 1))
    with pytest.raises(mx.ContractError, match="4-6 dims"):
        mx.npu_batch_matmul(*rank7)


# ------------------------------------------------------------------------------------------ op-limit policy


def test_policy_values(monkeypatch):
    monkeypatch.delenv(op_limits.ENV, raising=False)
    assert op_limits.policy() == "documented" and not op_limits.port()
    assert op_limits.policy({op_limits.ENV: "PORT"}) == "port"
    assert "one call" in op_limits.describe({op_limits.ENV: "port"})
    with pytest.raises(ValueError, match="BEVKIT_NPU_OP_LIMITS='fast'.*documented.*port"):
        op_limits.policy({op_limits.ENV: "fast"})


def _history(c):
    inp = torch.randn(1, c, 2, 5, 6, generator=_gen(13))
    grid = torch.rand(1, 2, 5, 6, 3, generator=_gen(14)) * 2 - 1
    return inp, grid


def test_grid_sampler3d_policy(mx, monkeypatch, caplog):
    inp, grid = _history(1280)  # FB-OCC's 16 x 80 history channels
    ref = F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = ops.grid_sample_3d(inp, grid)
    assert [c["C"] for c in mx.calls("grid_sampler3d_v1")] == [128] * 10
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    mx.reset()
    monkeypatch.setenv(op_limits.ENV, "port")
    with caplog.at_level(logging.INFO, logger="bevkit.ops"):
        out = ops.grid_sample_3d(inp, grid)
    assert [c["C"] for c in mx.calls("grid_sampler3d_v1")] == [1280]  # the port's one call
    assert torch.equal(out, ref)
    assert "C=1280 channels in one grid_sampler3d_v1 call" in caplog.text
    monkeypatch.setenv(op_limits.ENV, "documented")
    with pytest.raises(mx.ContractError, match="C must be <= 128"):
        mx.grid_sampler3d_v1(inp, grid, "bilinear", "zeros", True)


def test_voxel_pooling_policy(mx, monkeypatch):
    b, n, c = 1, 150_000, 8
    geom = torch.randint(0, 16, (b, n, 3), generator=_gen(15), dtype=torch.int32)
    geom[..., 2] = 0
    feats = torch.randn(b, n, c, generator=_gen(16))
    ref = ops.voxel_pooling_train(geom, feats, [16, 16, 1])  # documented: two calls, summed
    assert [x["N"] for x in mx.calls("npu_voxel_pooling_train")] == [100_000, 50_000]
    mx.reset()
    monkeypatch.setenv(op_limits.ENV, "port")
    out = ops.voxel_pooling_train(geom, feats, [16, 16, 1])
    assert [x["N"] for x in mx.calls("npu_voxel_pooling_train")] == [n]  # as the BEVDepth port passes 473,088
    per_cell = int(torch.bincount((geom[0, :, 1] * 16 + geom[0, :, 0]).long()).max())
    torch.testing.assert_close(out, ref, **sum_tolerance(torch.float32, per_cell, 1.0))
    monkeypatch.setenv(op_limits.ENV, "documented")
    with pytest.raises(mx.ContractError, match="N=150000 > 100000"):
        mx.npu_voxel_pooling_train(geom, feats, [16, 16, 1])


def test_msda_policy(mx, monkeypatch):
    bs, nq, nh, dh, shapes, npt = 2, 7, 8, 10, [(6, 8), (3, 4)], 4  # FB-OCC: 8 heads of 10 dims
    keys = sum(h * w for h, w in shapes)
    value = torch.randn(bs, keys, nh, dh, generator=_gen(17))
    spatial = torch.tensor(shapes)
    starts = torch.tensor([0, shapes[0][0] * shapes[0][1]])
    loc = torch.rand(bs, nq, nh, len(shapes), npt, 2, generator=_gen(18))
    attn = torch.rand(bs, nq, nh, len(shapes), npt, generator=_gen(19))
    ref = ops.multi_scale_deformable_attn(value, spatial, starts, loc, attn)
    assert [x["dims"] for x in mx.calls("multi_scale_deformable_attn")] == [16]  # padded to a multiple of 8
    mx.reset()
    monkeypatch.setenv(op_limits.ENV, "port")
    out = ops.multi_scale_deformable_attn(value, spatial, starts, loc, attn)
    assert [x["dims"] for x in mx.calls("multi_scale_deformable_attn")] == [10]  # unpadded, one call
    torch.testing.assert_close(out, ref, **sum_tolerance(torch.float32, len(shapes) * npt * 4, 1.0))
    monkeypatch.setenv(op_limits.ENV, "documented")
    with pytest.raises(mx.ContractError, match="multiple of 8"):
        mx.multi_scale_deformable_attn(value, spatial, starts, loc, attn)
    monkeypatch.setenv(op_limits.ENV, "port")  # what mx_driving's own code checks still holds under port
    with pytest.raises(mx.ContractError, match="<= 256"):
        mx.multi_scale_deformable_attn(torch.randn(bs, keys, 1, 264), spatial, starts,
                                       loc[:, :, :1].contiguous(), attn[:, :, :1].contiguous())
