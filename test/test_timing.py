"""Per-step recording: StepRecorder on a fake clock, and the mmcv hook / Lightning callback inside real
training loops (stopping at BEVKIT_MAX_STEPS)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bevkit.timing import STEPS_FILE, StepRecorder, read_steps


def _prepare_imports():
    """torchvision (imported by mmcv.runner and torchmetrics) needs the kit's shim on CPU-only torch."""
    try:
        from bevkit.compat import prepare_imports
    except ImportError:
        return
    prepare_imports()


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_recorder_times_losses_lr_and_samples(tmp_path):
    clock = FakeClock()
    rec = StepRecorder(run_dir=str(tmp_path), device="cpu", rank=0, world_size=8, samples_per_device=4,
                       clock=clock)
    rec.start()
    for i, (data, compute) in enumerate([(0.5, 1.5), (0.1, 0.9), (0.2, 0.8)], 1):
        clock.now += data
        rec.step_begin()
        clock.now += compute
        stop = rec.step_end(loss=torch.tensor(3.0 / i), losses={"loss_occ": torch.tensor(2.0 / i), "loss_depth": 1.0 / i},
                            lr=2e-4, epoch=0)
        assert stop is False
        # flushed per line: readable while the run is going on
        assert len(read_steps(tmp_path / STEPS_FILE)) == i
    rec.close()
    records = read_steps(tmp_path / STEPS_FILE)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["time_s"] for r in records] == pytest.approx([2.0, 1.0, 1.0])
    assert [r["data_time_s"] for r in records] == pytest.approx([0.5, 0.1, 0.2])
    assert records[1]["loss"] == pytest.approx(1.5) and records[1]["losses"] == pytest.approx(
        {"loss_occ": 1.0, "loss_depth": 0.5})
    assert all(r["samples"] == 32 and r["lr"] == 2e-4 and r["epoch"] == 0 for r in records)


def test_total_loss_defaults_to_sum_of_terms_and_nonfinite_is_flagged(tmp_path):
    rec = StepRecorder(run_dir=str(tmp_path), rank=0, clock=FakeClock())
    rec.start()
    rec.step_end(losses={"a": 1.0, "b": 2.5})
    rec.step_end(loss=float("nan"), losses={"a": float("inf"), "b": 1.0})
    rec.close()
    first, second = read_steps(tmp_path / STEPS_FILE)
    assert first["loss"] == 3.5
    assert second["loss"] is None and second["losses"]["a"] is None and second["nonfinite"] == ["loss", "a"]
    json.loads((tmp_path / STEPS_FILE).read_text().splitlines()[1])  # strict JSON (no NaN literal)


def test_max_steps_and_non_zero_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("BEVKIT_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("BEVKIT_MAX_STEPS", "3")
    monkeypatch.setenv("BEVKIT_SAMPLES_PER_DEVICE", "8")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    other = StepRecorder()
    other.start()
    assert [other.step_end(loss=1.0) for _ in range(3)] == [False, False, True]
    other.close()
    assert not (tmp_path / STEPS_FILE).exists()  # only global rank 0 writes
    monkeypatch.setenv("RANK", "0")
    rec = StepRecorder()
    rec.start()
    assert [rec.step_end(loss=1.0) for _ in range(3)] == [False, False, True] and rec.should_stop
    rec.close()
    assert [r["samples"] for r in read_steps(tmp_path / STEPS_FILE)] == [64, 64, 64]
    with pytest.raises(ValueError, match="max_steps"):
        StepRecorder(max_steps=0)


def test_recorder_without_start_and_torn_last_line(tmp_path):
    rec = StepRecorder(run_dir=str(tmp_path), rank=0, clock=FakeClock())
    rec.step_end(loss=1.0)  # no start(): the first step has no start time
    rec.step_end(loss=1.0)
    rec.close()
    with open(tmp_path / STEPS_FILE, "a") as f:
        f.write('{"step": 3, "time_')  # a run killed mid-write
    records = read_steps(tmp_path / STEPS_FILE)
    assert [r["time_s"] for r in records] == [None, 0.0]


# --------------------------------------------------------------------------------------------- mmcv
def test_mmcv_hook_records_and_stops_an_iter_based_runner(tmp_path, monkeypatch):
    _prepare_imports()
    mmcv_runner = pytest.importorskip("mmcv.runner", reason="needs mmcv (full) for the mmcv hook")
    from bevkit.timing.mmcv_hook import BevkitTimingHook

    assert mmcv_runner.HOOKS.get("BevkitTimingHook") is BevkitTimingHook  # usable from configs
    monkeypatch.setenv("BEVKIT_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("BEVKIT_MAX_STEPS", "7")
    monkeypatch.setenv("BEVKIT_SAMPLES_PER_DEVICE", "2")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def train_step(self, batch, optimizer, **kwargs):
            x, y = batch
            loss_a = torch.nn.functional.mse_loss(self.linear(x), y)
            loss_b = 0.1 * self.linear.weight.abs().sum()
            loss = loss_a + loss_b
            return {"loss": loss, "log_vars": {"loss_a": loss_a.item(), "loss_b": loss_b.item(),
                                               "loss": loss.item()}, "num_samples": len(x)}

    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = [(torch.randn(2, 3), torch.randn(2, 1)) for _ in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    import logging

    runner = mmcv_runner.IterBasedRunner(model, optimizer=optimizer, work_dir=str(tmp_path / "work"),
                                         logger=logging.getLogger("test_mmcv_hook"), max_iters=50)
    runner.register_optimizer_hook(mmcv_runner.OptimizerHook())
    after_run = []

    class AfterRun(mmcv_runner.Hook):
        def after_run(self, runner):
            after_run.append(runner.iter)

    runner.register_hook(AfterRun())
    runner.register_hook(BevkitTimingHook())
    runner.run([loader], [("train", 1)])
    assert runner.iter == 7 and after_run == [7]  # stopped cleanly, after_run hooks ran
    records = read_steps(tmp_path / STEPS_FILE)
    assert [r["step"] for r in records] == list(range(1, 8)) and [r["iter"] for r in records] == list(range(1, 8))
    assert all(r["time_s"] > 0 and r["lr"] == pytest.approx(0.01) and r["samples"] == 2 for r in records)
    assert set(records[0]["losses"]) == {"loss_a", "loss_b"}
    assert records[0]["loss"] == pytest.approx(records[0]["losses"]["loss_a"] + records[0]["losses"]["loss_b"])


def test_mmcv_hook_stop_is_the_runs_last_iteration_for_every_hook(tmp_path, monkeypatch):
    """Stopped by BEVKIT_MAX_STEPS, the run ends like one whose schedule was that long: the checkpoint hook
    (registered before the timing hook, as mmcv's training hooks are) saves latest.pth at the last step. It used
    not to, and an FB-OCC smoke run with --max-steps 3 had no checkpoint to evaluate."""
    _prepare_imports()
    mmcv_runner = pytest.importorskip("mmcv.runner", reason="needs mmcv (full) for the mmcv hook")
    import logging

    from bevkit.timing.mmcv_hook import BevkitTimingHook

    monkeypatch.setenv("BEVKIT_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("BEVKIT_MAX_STEPS", "3")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def train_step(self, batch, optimizer, **kwargs):
            loss = self.linear(batch).pow(2).mean()
            return {"loss": loss, "log_vars": {"loss": loss.item()}, "num_samples": len(batch)}

    model = Model()
    runner = mmcv_runner.IterBasedRunner(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                                         work_dir=str(tmp_path / "work"), logger=logging.getLogger("test_last"),
                                         max_iters=12)
    runner.register_optimizer_hook(mmcv_runner.OptimizerHook())
    runner.register_checkpoint_hook(dict(interval=12, by_epoch=False))  # the tiny smoke config: at the end only
    runner.register_hook(BevkitTimingHook())
    runner.run([torch.utils.data.DataLoader([torch.randn(2, 3) for _ in range(4)], batch_size=None)],
               [("train", 1)])
    assert runner.iter == 3 and len(read_steps(tmp_path / STEPS_FILE)) == 3
    assert (tmp_path / "work" / "latest.pth").exists() and (tmp_path / "work" / "iter_3.pth").exists()


# ---------------------------------------------------------------------------------------- Lightning
def test_lightning_callback_records_and_stops(tmp_path, monkeypatch):
    _prepare_imports()
    pl = pytest.importorskip("pytorch_lightning", reason="needs pytorch-lightning 1.9 for the callback")
    from bevkit.timing.lightning import BevkitTimingCallback

    monkeypatch.setenv("BEVKIT_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("BEVKIT_MAX_STEPS", "6")
    monkeypatch.setenv("BEVKIT_SAMPLES_PER_DEVICE", "4")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            detection_loss = torch.nn.functional.mse_loss(self.linear(x), y)
            depth_loss = 0.1 * self.linear.weight.abs().sum()
            self.log("detection_loss", detection_loss)
            self.log("depth_loss", depth_loss)
            return detection_loss + depth_loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.02)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
            return torch.utils.data.DataLoader(data, batch_size=4)  # 4 batches per epoch

    trainer = pl.Trainer(max_epochs=10, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[BevkitTimingCallback()], default_root_dir=str(tmp_path))
    trainer.fit(Module())
    assert trainer.global_step == 6  # stopped across an epoch boundary at BEVKIT_MAX_STEPS
    records = read_steps(tmp_path / STEPS_FILE)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["epoch"] for r in records] == [0, 0, 0, 0, 1, 1]
    assert all(r["time_s"] > 0 and r["lr"] == pytest.approx(0.02) and r["samples"] == 4 for r in records)
    for r in records:
        assert set(r["losses"]) == {"detection_loss", "depth_loss"}
        assert r["loss"] == pytest.approx(r["losses"]["detection_loss"] + r["losses"]["depth_loss"], rel=1e-5)
        assert math.isfinite(r["loss"])
