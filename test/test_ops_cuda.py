"""CUDA backend of bevkit.ops (compiled upstream / mmcv kernels where importable) equals the portable backend."""
from __future__ import annotations

import pytest
import torch

import bevkit.ops as ops
from tolerance import sum_tolerance

pytestmark = [pytest.mark.hardware,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


def _same(fn, *tensors, n_terms, magnitude=1.0):
    """CUDA kernel and portable code agree to float32 rounding of sums of ``n_terms`` terms (test/tolerance.py)."""
    tol = sum_tolerance(torch.float32, n_terms, magnitude)
    outs = []
    for device, backend in (("cuda", None), ("cpu", "portable")):
        leaves = [t.to(device).detach().requires_grad_(t.is_floating_point()) for t in tensors]
        with ops.force_backend(backend):
            out = fn(*leaves)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(device, out.dtype)
        grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g, allow_unused=True)
        outs.append((out.cpu(), [None if x is None else x.cpu() for x in grads]))
    torch.testing.assert_close(outs[0][0], outs[1][0], **tol)
    for a, b in zip(outs[0][1], outs[1][1]):
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, **tol)


def test_bev_pool_v2_cuda_equals_portable():
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(1, 2, 4, 3, 5, generator=g)
    feat = torch.randn(1, 2, 3, 5, 16, generator=g)
    rd = torch.randperm(depth.numel(), generator=g)[:80].int()
    rf = torch.randint(0, 30, (80,), generator=g).int()
    rb = torch.sort(torch.randint(0, 32, (80,), generator=g)).values.int()
    _same(lambda d, f: ops.bev_pool_v2(d, f, rd.to(d.device), rf.to(d.device), rb.to(d.device), (1, 2, 4, 4, 16)),
          depth, feat, n_terms=80)  # 80 points; grad_depth sums 16 channels


def test_voxel_pooling_train_cuda_equals_portable():
    g = torch.Generator().manual_seed(1)
    geom = torch.randint(-2, 10, (2, 100, 3), generator=g).int()
    feats = torch.randn(2, 100, 8, generator=g)
    _same(lambda f: ops.voxel_pooling_train(geom.to(f.device), f, [8, 6, 4]), feats, n_terms=100)


def test_msda_cuda_equals_portable():
    g = torch.Generator().manual_seed(2)
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.tensor([0, 48])
    value = torch.randn(2, 60, 4, 8, generator=g)
    loc = torch.rand(2, 7, 4, 2, 3, 2, generator=g)
    attn = torch.rand(2, 7, 4, 2, 3, generator=g)
    _same(lambda v, l_, a: ops.multi_scale_deformable_attn(v, shapes.to(v.device), starts.to(v.device), l_, a),
          value, loc, attn, n_terms=7 * 2 * 3 * 4)  # value grad: nq * L * P * 4 taps


def test_grid_sample_focal_and_deform_conv_cuda_equal_portable():
    g = torch.Generator().manual_seed(3)
    _same(lambda i, gr: ops.grid_sample_3d(i, gr), torch.randn(1, 8, 3, 4, 5, generator=g),
          torch.rand(1, 2, 3, 4, 3, generator=g) * 2 - 1, n_terms=8 * 8, magnitude=2.0)
    target = torch.randint(0, 5, (10,), generator=g)
    _same(lambda p: ops.sigmoid_focal_loss(p, target.to(p.device), reduction="none"), torch.randn(10, 4, generator=g),
          n_terms=1)
    _same(lambda i, o, w: ops.deform_conv2d(i, o, w, 1, 1, 1, 1, 1), torch.randn(1, 4, 5, 6, generator=g),
          torch.randn(1, 18, 5, 6, generator=g), torch.randn(4, 4, 3, 3, generator=g), n_terms=4 * 9 * 4,
          magnitude=2.0)
