"""bevkit.torchcompat on both stacks: the branch the running torch takes (2.1 in the Python 3.8 lane, 2.13 in the
cpu venv), and the other branch through a patched ``torch.__version__``."""
from __future__ import annotations

import warnings

import pytest
import torch

from bevkit import torchcompat

RUNNING = torchcompat.torch_version()


@pytest.mark.parametrize("version, expect", [("2.1.0+cu121", (2, 1)), ("2.13.0+cpu", (2, 13)),
                                             ("2.3.0a0+git1234", (2, 3)), ("10.0.1", (10, 0))])
def test_torch_version_reads_major_minor(monkeypatch, version, expect):
    monkeypatch.setattr(torch, "__version__", version)
    assert torchcompat.torch_version() == expect
    assert torchcompat.torch_at_least(*expect) and not torchcompat.torch_at_least(expect[0], expect[1] + 1)


def test_unreadable_version_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "nightly")
    with pytest.raises(RuntimeError, match="torch.__version__ 'nightly'"):
        torchcompat.torch_version()


def _one_step(scaler):
    """An fp32 AdamW step through the scaler; returns (scaled loss, updated parameter)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.AdamW([p], lr=0.1)
    loss = (p * torch.tensor([3.0, 4.0])).sum()
    scaled = scaler.scale(loss)
    scaled.backward()
    scaler.step(opt)
    scaler.update()
    return scaled, p.detach()


def _reference_step():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.AdamW([p], lr=0.1)
    (p * torch.tensor([3.0, 4.0])).sum().backward()
    opt.step()
    return p.detach()


def test_cpu_grad_scaler_of_the_running_torch():
    scaler = torchcompat.cpu_grad_scaler_class()(init_scale=1024.0)
    scaled, updated = _one_step(scaler)
    assert torch.allclose(updated, _reference_step())  # (un)scaling never changes the step
    if RUNNING >= (2, 3):  # torch.amp.GradScaler('cpu') really scales
        assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
        assert float(scaled.detach()) == pytest.approx(1024.0 * -5.0)
    else:  # torch 2.1: no CPU unscale/update kernels, a disabled scaler passes through
        assert isinstance(scaler, torch.cuda.amp.GradScaler) and not scaler.is_enabled()
        assert float(scaled.detach()) == pytest.approx(-5.0)


def test_cpu_grad_scaler_other_branch(monkeypatch):
    if RUNNING >= (2, 3):
        monkeypatch.setattr(torch, "__version__", "2.1.0+cu121")
        cls = torchcompat.cpu_grad_scaler_class()
        assert issubclass(cls, torch.cuda.amp.GradScaler)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp.GradScaler is deprecated in new torch
            scaler = cls(init_scale=1024.0)
        assert not scaler.is_enabled()
        scaled, updated = _one_step(scaler)
        assert float(scaled.detach()) == pytest.approx(-5.0) and torch.allclose(updated, _reference_step())
    else:
        seen = []

        class AmpGradScaler:  # what torch >= 2.3 has as torch.amp.GradScaler(device, ...)
            def __init__(self, device, *args, **kwargs):
                seen.append((device, kwargs))

        monkeypatch.setattr(torch, "__version__", "2.3.0")
        monkeypatch.setattr(torch.amp, "GradScaler", AmpGradScaler, raising=False)
        cls = torchcompat.cpu_grad_scaler_class()
        assert issubclass(cls, AmpGradScaler)
        cls(init_scale=8.0)
        assert seen == [("cpu", {"init_scale": 8.0})]


def test_function_modes_and_indexing_probe_matches_the_stack():
    """torch 2.13 hands Tensor.__getitem__ to function modes, torch 2.1 does not (the masked-select speed patches
    are off there); the probe answers what a mode really sees."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Mode():
        torch.arange(3)[torch.tensor([True, False, True])]
    assert torchcompat.function_modes_see_indexing() == (torch.Tensor.__getitem__ in seen)
    if RUNNING == (2, 1):
        assert not torchcompat.function_modes_see_indexing()
    elif RUNNING >= (2, 13):
        assert torchcompat.function_modes_see_indexing()


def test_cpu_fp16_amp_matches_what_the_running_torch_can_do():
    """The decision agrees with the running torch: fp16 autocast and a CPU GradScaler both work, or neither."""
    a = torch.ones(2, 2)
    if torchcompat.cpu_fp16_amp():
        with torch.autocast("cpu", dtype=torch.float16):
            assert torch.mm(a, a).dtype == torch.float16
        assert torch.amp.GradScaler("cpu").is_enabled()
    else:  # torch 2.1: "AutocastCPU only support Bfloat16 as the autocast_cpu_dtype"
        with pytest.raises(RuntimeError, match="Bfloat16"):
            with torch.autocast("cpu", dtype=torch.float16):
                torch.mm(a, a)
        assert not hasattr(torch.amp, "GradScaler")


def test_emulated_cuda_scaler_follows_the_decision(monkeypatch):
    """An emulated cuda run gets the GradScaler class of a real one on CPU memory, or, where torch cannot do fp16
    on CPU tensors, one line that says so and what to use."""
    from bevkit.device import RunDevice

    run = RunDevice("cuda", emulated=True)
    if torchcompat.cpu_fp16_amp():
        scaler = run.grad_scaler(init_scale=1024.0)
        assert type(scaler) is torch.amp.GradScaler and scaler.is_enabled()
        monkeypatch.setattr(torch, "__version__", "2.1.0+cu121")
    with pytest.raises(RuntimeError, match=r"cannot emulate cuda's fp16 AMP .*use torch >= 2.3, or run on a CUDA GPU"):
        run.grad_scaler()


def test_emulated_autocast_lowers_to_what_the_cpu_can_do():
    """An emulated device's autocast: fp16 where CPU tensors can take it, else bfloat16 (torch 2.1); either way with
    the device's float32 rule for softmax."""
    from bevkit.emulation import EmulatedAutocast

    a = torch.ones(2, 2)
    with EmulatedAutocast():
        out = torch.mm(a, a)
        soft = torch.softmax(out, 0)
    assert out.dtype == (torch.float16 if torchcompat.cpu_fp16_amp() else torch.bfloat16)
    assert soft.dtype == torch.float32
