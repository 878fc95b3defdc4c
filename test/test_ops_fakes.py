"""The fake torch_npu's NpuFusedAdamW refuses what torch_npu's does (test/fakes/torch_npu/optim.py cites the
source): set_to_none, non fp32/fp16 parameters, parameters or gradients re-allocated after the first step, and a
parameter whose first gradient comes after the buffers were combined. Its update is AdamW's. And the stand-ins for
the compiled CUDA kernels (test/fakes/cuda_kernels.py) are reached on emulated cuda tensors."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from tolerance import sum_tolerance

FAKES = pathlib.Path(__file__).parent / "fakes"


@pytest.fixture
def npu_optim(fake_torch_npu):
    return fake_torch_npu.optim


def _model(dtype=torch.float32):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    g = torch.Generator().manual_seed(0)  # not torch.manual_seed: it would ask the fake 'npu' device module too
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype)


def _backward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 4, generator=g).to(next(model.parameters()).dtype)
    model(x).pow(2).sum().backward()


def test_set_to_none_is_refused_and_zero_grad_is_in_place(npu_optim):
    model = _model()
    opt = npu_optim.NpuFusedAdamW(model.parameters(), lr=1e-2)
    _backward(model)
    with pytest.raises(ValueError, match="set_to_none is not supported in fused optimizers"):
        opt.zero_grad(set_to_none=True)
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad()
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))


def test_only_fp32_and_fp16_parameters(npu_optim):
    for dtype, ok in ((torch.float32, True), (torch.float16, True), (torch.bfloat16, False), (torch.float64, False)):
        model = _model(dtype)
        opt = npu_optim.NpuFusedAdamW(model.parameters(), lr=1e-2)
        for p in model.parameters():  # no backward: torch 2.1 has no fp16 matmul on the CPU ("addmm_impl_cpu_")
            p.grad = torch.full_like(p, 0.5)
        if ok:
            opt.step()
        else:
            with pytest.raises(TypeError, match=f"must be either float32 or float16, but received {dtype}"):
                opt.step()


def test_reallocated_parameters_and_gradients_are_refused(npu_optim):
    model = _model()
    opt = npu_optim.NpuFusedAdamW(model.parameters(), lr=1e-2)
    _backward(model)
    opt.step()  # combines parameters and gradients into the fused buffers
    opt.zero_grad()
    _backward(model)
    opt.step()  # in-place gradients: fine
    model.zero_grad(set_to_none=True)  # torch 2.x Module.zero_grad default: new gradient tensors next backward
    _backward(model)
    with pytest.raises(RuntimeError, match="its gradient of a .* parameter was re-allocated"):
        opt.step()
    model2 = _model()
    opt2 = npu_optim.NpuFusedAdamW(model2.parameters(), lr=1e-2)
    _backward(model2)
    opt2.step()
    model2[0].weight.data = model2[0].weight.data.clone()
    with pytest.raises(RuntimeError, match="the parameter of a .* parameter was re-allocated"):
        opt2.step()


def test_parameter_with_a_late_first_gradient_fails_like_the_real_one(npu_optim):
    model = _model()
    opt = npu_optim.NpuFusedAdamW(model.parameters(), lr=1e-2)
    model[2].weight.requires_grad_(False)
    _backward(model)
    opt.step()  # model[2].weight has no gradient: not combined
    model[2].weight.requires_grad_(True)
    opt.zero_grad()
    _backward(model)
    with pytest.raises(KeyError, match="step"):
        opt.step()


def test_combining_between_forward_and_backward_keeps_the_graph(npu_optim):
    """Lightning's closure runs forward, zero_grad, backward; when the loss scaler skipped the first step (inf
    gradients at the initial scale), that zero_grad is the first with gradients and combines them. The real
    optimizer re-points data (npu_change_data_ptr) without bumping autograd's version counter, so the graph of
    the forward just run stays valid (found by the emulated npu lane: 'modified by an inplace operation')."""
    model = _model()
    opt = npu_optim.NpuFusedAdamW(model.parameters(), lr=1e-2)
    _backward(model)  # first step's gradients; its optimizer step skipped
    g = torch.Generator().manual_seed(2)
    loss = model(torch.randn(5, 4, generator=g)).pow(2).sum()
    opt.zero_grad()  # combines parameters and gradients
    loss.backward()
    assert opt.is_params_grads_combined and all(p.grad.any() for p in model.parameters())
    opt.step()


def test_update_is_adamw(npu_optim):
    fused, plain = _model(), _model()
    opt_f = npu_optim.NpuFusedAdamW(fused.parameters(), lr=1e-2, weight_decay=1e-2)
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=1e-2, foreach=False)
    for step in range(4):
        for model, opt in ((fused, opt_f), (plain, opt_p)):
            opt.zero_grad()
            _backward(model, seed=step)
            opt.step()
    for a, b in zip(fused.parameters(), plain.parameters()):
        # same float32 arithmetic per element, grouped differently: a few roundings of values of size ~1
        torch.testing.assert_close(a, b, **sum_tolerance(torch.float32, n_terms=8, magnitude=1.0))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        npu_optim.NpuFusedAdamW(fused.parameters(), lr=-1.0)


# ------------------------------------------------------------------------- CUDA kernel stand-ins (emulated cuda)


@pytest.fixture
def cuda_kernels():
    spec = importlib.util.spec_from_file_location("cuda_kernels_fake", FAKES / "cuda_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_emulated_cuda_reaches_every_kernel_stand_in(cuda_kernels):
    """On emulated cuda tensors each op calls its compiled kernel's stand-in (contract checked) and gives the
    portable result; the lane that emulates cuda (issue 11) registers them the same way."""
    import bevkit.ops as ops
    from bevkit.device import emulate_device

    g = torch.Generator().manual_seed(0)
    depth, feat = torch.rand(1, 2, 3, 4, 5, generator=g), torch.randn(1, 2, 4, 5, 8, generator=g)
    rd = torch.randperm(depth.numel(), generator=g)[:50].int()
    rf = torch.randint(0, 40, (50,), generator=g).int()
    rb = torch.randint(0, 2 * 3 * 3, (50,), generator=g).int()  # unsorted: the kit sorts before the kernel
    geom = torch.randint(-1, 5, (2, 30, 3), generator=g).int()
    feats = torch.randn(2, 30, 6, generator=g)
    shapes, starts = torch.tensor([[3, 4]]), torch.tensor([0])
    value, loc = torch.randn(3, 12, 2, 4, generator=g), torch.rand(3, 5, 2, 1, 2, 2, generator=g)
    attn = torch.rand(3, 5, 2, 1, 2, generator=g)
    x, off, w = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 18, 5, 5, generator=g), torch.randn(4, 4, 3, 3)
    pred, target = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 3, 3, 0])
    dep, ctx = torch.rand(2, 3, 2, 2, generator=g), torch.randn(2, 6, 2, 2, generator=g)
    calls = [
        lambda: ops.bev_pool_v2(depth, feat, rd, rf, rb, (1, 2, 3, 3, 8)),
        lambda: ops.voxel_pooling_train(geom, feats, [4, 4, 2]),
        lambda: ops.voxel_pooling_inference(geom[:1, :24].reshape(1, 2, 3, 2, 2, 3), dep, ctx, [4, 4, 2]),
        lambda: ops.multi_scale_deformable_attn(value, shapes, starts, loc, attn, im2col_step=2),
        lambda: ops.deform_conv2d(x, off, w, 1, 1, 1, 1, 1),
        lambda: ops.sigmoid_focal_loss(pred, target, reduction="none"),
    ]
    for call in calls:
        with emulate_device("cuda"), cuda_kernels.install():
            got = call()
        with ops.force_backend("portable"):
            want = call()
        assert torch.equal(got, want)  # the stand-in computed with the portable op, on the same inputs
    assert [n for n, _ in cuda_kernels.CALLS] == ["bev_pool_v2", "voxel_pooling_train", "voxel_pooling_inference",
                                                  "multi_scale_deformable_attn", "deform_conv2d", "sigmoid_focal_loss"]
    with pytest.raises(cuda_kernels.ContractError, match="bias is False"):
        cuda_kernels.deform_conv2d(x, off, w, 1, 1, 1, 1, 1, True)
    with pytest.raises(cuda_kernels.ContractError, match="runs of sorted ranks_bev"):
        cuda_kernels.bev_pool_v2(depth, feat, rd, rf, rb, [1, 2, 3, 3, 8], *ops.compute_intervals(rb))
    with pytest.raises(cuda_kernels.ContractError, match="even C"):
        cuda_kernels.voxel_pooling_train(geom, feats[..., :5].half().contiguous(), [4, 4, 2])
