"""BEVDepth's training step on CUDA and on NPU, on CPU tensors standing in for the device: the optimizer the kit
builds for the device, the precision plugin pl.Trainer uses with the kit's Trainer arguments for that device (fp16
autocast and the device's GradScaler) and upstream's ``gradient_clip_val=5``.

On CUDA the kit builds ``torch.optim.AdamW(fused=True)``; a fused optimizer unscales inside its step, and Lightning
1.9's ``MixedPrecisionPlugin.clip_gradients`` refuses to clip for such an optimizer ("does not allow for gradient
clipping"), so BEVDepth stopped at its first step on every GPU. The gradients must be unscaled, then clipped, then
stepped (skipped on inf/NaN), with every optimizer the kit builds.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from bevkit.compat import prepare_imports  # noqa: E402

prepare_imports()
pl = pytest.importorskip("pytorch_lightning")

from pytorch_lightning.plugins.precision import MixedPrecisionPlugin, PrecisionPlugin  # noqa: E402

from bevkit import torchcompat  # noqa: E402
from bevkit.device import RunDevice, emulate_device, set_run_device  # noqa: E402
from bevkit.models.bevdepth.cli import trainer_setup  # noqa: E402
from bevkit.models.bevdepth.patches import make_optimizer  # noqa: E402

FAKES = Path(__file__).resolve().parent / "fakes"


def fp16_on_cpu_tensors(test):
    """These tests run the device's fp16 AMP path on CPU tensors. torch 2.1 (the Python 3.8 lane) has neither fp16
    CPU autocast nor a CPU GradScaler (bevkit.torchcompat.cpu_fp16_amp), so there only the device runs the path:
    a hardware skip, as for the CUDA op tests."""
    if torchcompat.cpu_fp16_amp():
        return test
    reason = (f"torch {torch.__version__} has no fp16 autocast or GradScaler on CPU tensors: the fp16 AMP path "
              "runs only on the device with this torch (torch >= 2.3 emulates it)")
    return pytest.mark.hardware(pytest.mark.skip(reason=reason)(test))
CLIP = 5.0  # upstream's gradient_clip_val (bevkit.models.bevdepth.cli.build_parser)


def precision_plugin_of(trainer_kwargs: dict) -> PrecisionPlugin:
    """The precision plugin pl.Trainer(**trainer_kwargs) runs with: the one the kit passes in ``plugins``, else
    the one Lightning 1.9.5 builds for ``precision=16`` on a GPU (``_AcceleratorConnector._check_and_init_precision``:
    ``MixedPrecisionPlugin(16, device='cuda')``, whose scaler is ``torch.cuda.amp.GradScaler()``)."""
    for plugin in trainer_kwargs.get("plugins") or []:
        if isinstance(plugin, PrecisionPlugin):
            return plugin
    assert str(trainer_kwargs["precision"]) == "16" and trainer_kwargs["accelerator"] == "gpu", trainer_kwargs
    return MixedPrecisionPlugin(str(trainer_kwargs["precision"]), device="cuda")


class Regression(pl.LightningModule):
    """A regression whose gradients are well above the clipping norm; records what each step sees."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        self.seen = []  # per step: loss, output dtype, loss scale, grad norms before clipping / at the step, update

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        loss = torch.nn.functional.mse_loss(out.float(), y)
        self.seen.append({"loss": float(loss.detach()), "dtype": out.dtype})
        return loss

    def on_before_optimizer_step(self, optimizer, optimizer_idx):
        # Lightning calls this after unscaling and before clipping (_after_closure)
        scaler = self.trainer.precision_plugin.scaler
        self.seen[-1].update(norm_before_clip=_grad_norm(self.parameters()), scale=float(scaler.get_scale()),
                             before=[p.detach().clone() for p in self.parameters()])

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.seen[-1]
        step["updated"] = any(not torch.equal(a, p.detach()) for a, p in zip(step.pop("before"), self.parameters()))

    def configure_optimizers(self):
        optimizer = make_optimizer(self.parameters(), lr=1e-2, weight_decay=1e-7, kind=self.kind)

        def at_step(opt, args, kwargs):
            self.seen[-1]["norm_at_step"] = _grad_norm(self.parameters())

        optimizer.register_step_pre_hook(at_step)
        return optimizer

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 8, generator=g).repeat(STEPS, 1)  # the same batch at every step: comparable losses
        y = 3.0 * x.sum(1, keepdim=True)  # gradient norms of tens: clipped to 5 at every step
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _grad_norm(params) -> float:
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


STEPS = 16


def _train(kind: str):
    args = argparse.Namespace(devices=1, gpus=None, num_nodes=None, precision=None)
    kwargs = trainer_setup(RunDevice.resolve(kind), args)
    plugin = precision_plugin_of(kwargs)
    model = Regression(kind)
    trainer = pl.Trainer(accelerator="cpu", devices=1, plugins=[plugin], gradient_clip_val=CLIP, max_steps=STEPS,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model)
    return model, plugin, trainer


def _assert_trained_with_amp_and_clipping(model, plugin):
    seen = model.seen
    assert len(seen) == STEPS and all("norm_before_clip" in s for s in seen), seen
    assert all(s["dtype"] == torch.float16 for s in seen), "fp16 autocast was not on"
    assert plugin.scaler is not None and plugin.scaler.is_enabled()
    # fp16 gradients of the loss scaled by 65536 overflow at first: those steps leave the weights as they were
    # (also inside a fused kernel) and halve the scale, until the scaled gradients fit
    overflow = [s for s in seen if not math.isfinite(s["norm_before_clip"])]
    good = [s for s in seen if math.isfinite(s["norm_before_clip"])]
    assert overflow and not any(s["updated"] for s in overflow), seen
    assert len(good) >= STEPS // 2 and all(s["updated"] for s in good), seen
    for s in good:
        # unscaled before clipping: the loss's own gradient norm (tens), not times the loss scale (>= 256 here)
        assert s["scale"] >= 256 and CLIP < s["norm_before_clip"] < 1e3, s
        # clipped before the optimizer step (clip_grad_norm_'s 1e-6 guard puts it a hair under CLIP)
        assert s["norm_at_step"] <= CLIP * (1 + 1e-4), s
    assert good[-1]["loss"] < good[0]["loss"], [s["loss"] for s in good]


@fp16_on_cpu_tensors
def test_cuda_fused_adamw_fp16_with_gradient_clipping_trains():
    """The CUDA path (emulated): fused AdamW + the cuda precision plugin + gradient_clip_val=5. Before the fix:
    RuntimeError: The current optimizer, AdamW, does not allow for gradient clipping because it performs
    unscaling of gradients internally."""
    with emulate_device("cuda"):
        set_run_device(RunDevice.resolve("cuda"))
        try:
            model, plugin, trainer = _train("cuda")
        finally:
            set_run_device(None)
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True  # the kit's cuda optimizer
    assert plugin.device == "cuda"
    _assert_trained_with_amp_and_clipping(model, plugin)


@fp16_on_cpu_tensors
def test_npu_fused_adamw_fp16_with_gradient_clipping_trains(fake_npu):
    """The NPU path (emulated, fake torch_npu): NpuFusedAdamW + the NPU precision plugin with torch_npu's
    GradScaler + gradient_clip_val=5."""
    with emulate_device("npu"):
        set_run_device(RunDevice.resolve("npu"))
        try:
            model, plugin, trainer = _train("npu")
        finally:
            set_run_device(None)
    assert type(trainer.optimizers[0]) is fake_npu.NpuFusedAdamW
    assert plugin.device == "npu" and isinstance(plugin.scaler, fake_npu.GradScaler)
    assert [name for name, _ in fake_npu.CALLS if name in ("GradScaler", "NpuFusedAdamW")] == \
        ["GradScaler", "NpuFusedAdamW"]
    _assert_trained_with_amp_and_clipping(model, plugin)


def test_the_gpu_check_recognizes_the_cuda_precision_plugin(caplog):
    """tools/gpu_check confirms BEVDepth's CUDA AMP path by the line the kit's plugin logs (Lightning prints no
    AMP banner for a plugin passed in)."""
    from bevkit import gpu_check
    from bevkit.lightning_amp import DeviceMixedPrecisionPlugin

    with caplog.at_level("INFO", logger="bevkit"), pytest.warns(UserWarning):  # no CUDA here: the scaler says so
        DeviceMixedPrecisionPlugin("16", RunDevice("cuda"))
    assert all(evidence in caplog.text for evidence in gpu_check.MODEL_EVIDENCE["bevdepth"]), caplog.text
