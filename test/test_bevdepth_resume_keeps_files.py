"""Issue 12, the data-loss bug: resuming a BEVDepth training from an earlier run's checkpoint deleted that
checkpoint (Lightning reloaded the earlier best_model_path and, with save_top_k=1, removed it after its first
save: "The dirpath has changed from ..."). Through the kit's own CLI (bevkit.models.bevdepth.cli.run_cli) with a
toy LightningModule in place of the BEVDepth experiment: the same Trainer, callbacks and resume path, seconds
on a CPU. Also: the kit's state (model name, RNG) is in the checkpoint, and the resumed run continues the step
count and restores the RNG state."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bevkit.compat import prepare_imports

prepare_imports()  # Lightning imports torchvision: the kit's shim on a CPU torch first
pl = pytest.importorskip("pytorch_lightning")
torch = pytest.importorskip("torch")


class Toy(pl.LightningModule):
    """Accepts the experiment keyword arguments run_cli passes; a linear regression on fixed data."""

    def __init__(self, **kwargs):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.noise = []  # one torch.rand draw per step: shows which RNG state the step ran with

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 4, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)

    def training_step(self, batch, batch_idx):
        self.noise.append(torch.rand(()).item())
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return [optimizer], [torch.optim.lr_scheduler.MultiStepLR(optimizer, [1])]


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fit(root: Path, *argv):
    from bevkit.models.bevdepth.cli import run_cli

    return run_cli(Toy, "toy", argv=["--default_root_dir", str(root), "--accelerator", "cpu", "--devices", "1",
                                     "--enable_progress_bar", "False", *argv])


def test_resume_from_another_run_keeps_its_checkpoint(tmp_path, monkeypatch):
    for name in ("BEVKIT_RUN_DIR", "BEVKIT_MAX_STEPS", "BEVKIT_CHECKPOINT", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BEVKIT_DEVICE", "cpu")
    first = _fit(tmp_path / "first", "--max_epochs", "1")
    old = next((tmp_path / "first").rglob("*.ckpt"))
    ckpt = torch.load(old, weights_only=False)  # our own file (torch 2.1 refuses its Counter with weights_only)
    assert ckpt["callbacks"]["BevkitResumeState"]["model"] == "bevdepth"
    before = _tree(tmp_path / "first")

    full = _fit(tmp_path / "straight", "--max_epochs", "2")  # the same schedule without interruption
    resumed = _fit(tmp_path / "second", "--max_epochs", "2", "--ckpt_path", str(old))

    assert _tree(tmp_path / "first") == before, "the earlier run's folder changed"
    assert old.is_file()
    assert resumed.global_step == full.global_step == 2 * first.global_step
    assert [p.name for p in (tmp_path / "second").rglob("*.ckpt")] == ["epoch=1-step=8.ckpt"]
    # the second epoch drew the same random numbers as the uninterrupted run: the RNG state came back
    assert resumed.lightning_module.noise == full.lightning_module.noise[first.global_step:]
