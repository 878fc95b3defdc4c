"""FB-OCC resume mechanics on a real mmcv IterBasedRunner with a toy model (no upstream, seconds): a run
stopped after its iteration-2 checkpoint and resumed through the kit (patch 'fbocc-resume' + BevkitResumeHook)
ends with exactly the weights, optimizer state and EMA of an uninterrupted run (dropout makes it depend on the
RNG state), on the CPU and on emulated NPU / CUDA run devices. mmcv's own resume repeats iteration 2."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bevkit.compat import prepare_imports

prepare_imports()
torch = pytest.importorskip("torch")
mmcv_runner = pytest.importorskip("mmcv.runner")

from mmcv.parallel import MMDataParallel  # noqa: E402
from mmcv.runner import Hook, IterBasedRunner  # noqa: E402

from bevkit.device import RunDevice, set_run_device  # noqa: E402
from bevkit.models.fbocc.patches.checkpoints import _resume  # noqa: E402
from bevkit.models.fbocc.resume import BevkitResumeHook  # noqa: E402


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.drop = torch.nn.Dropout(0.5)

    def train_step(self, data, optimizer):
        loss = self.lin(self.drop(data)).pow(2).mean()
        return dict(loss=loss, log_vars={"loss": loss.item()}, num_samples=len(data))


class ToyEMA:
    """The part of FB-BEV's ModelEMA the kit relies on: ``ema`` (a module), ``updates``, ``update(runner, model)``."""

    def __init__(self, model):
        self.ema = Toy()
        self.ema.load_state_dict(model.state_dict())
        self.updates = 0

    def update(self, runner, model):
        self.updates += 1
        with torch.no_grad():
            for k, v in self.ema.state_dict().items():
                v.mul_(0.5).add_(0.5 * model.state_dict()[k])


class ToyEMAHook(Hook):
    """Like MEGVIIEMAHook: builds runner.ema_model in before_run, updates after every iteration (NORMAL, after
    the checkpoint hook)."""

    def before_run(self, runner):
        runner.ema_model = ToyEMA(runner.model.module)

    def after_train_iter(self, runner):
        runner.ema_model.update(runner, runner.model.module)


def _runner(work: Path, max_iters: int) -> IterBasedRunner:
    model = MMDataParallel(Toy())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    runner = IterBasedRunner(model, optimizer=optimizer, work_dir=str(work), logger=logging.getLogger("toy"),
                             max_iters=max_iters, meta={})
    runner.register_training_hooks(lr_config=dict(policy="step", step=[3]), optimizer_config=dict(grad_clip=None),
                                   checkpoint_config=dict(interval=2))
    runner.register_hook(ToyEMAHook(), priority="NORMAL")
    runner.register_hook(BevkitResumeHook(), priority="VERY_LOW")
    return runner


def _loader():
    data = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 16  # 2 batches per epoch
    return torch.utils.data.DataLoader(data, batch_size=2)


def _state(runner):
    return ({k: v.clone() for k, v in runner.model.module.state_dict().items()},
            {k: v.clone() for k, v in runner.ema_model.ema.state_dict().items()}, runner.ema_model.updates,
            runner.optimizer.state_dict()["state"][0]["exp_avg"].clone(), runner.iter)


@pytest.mark.parametrize("device", [RunDevice("cpu"), RunDevice("npu", emulated=True),
                                    RunDevice("cuda", emulated=True)], ids=["cpu", "npu-emulated", "cuda-emulated"])
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, device, monkeypatch):
    set_run_device(device)
    monkeypatch.setattr(IterBasedRunner, "resume", _resume(IterBasedRunner.resume))
    try:
        torch.manual_seed(1)
        straight = _runner(tmp_path / "straight", 4)
        straight.run([_loader()], [("train", 1)])
        expected = _state(straight)

        torch.manual_seed(1)
        first = _runner(tmp_path / "first", 2)  # "killed" after the iteration-2 checkpoint
        first.run([_loader()], [("train", 1)])
        kit = torch.load(tmp_path / "first" / "iter_2.pth", weights_only=True)["meta"]["bevkit"]
        assert kit["completed_iters"] == 2 and kit["ema"]["updates"] == 1 and not kit["ema"]["up_to_date"]

        torch.manual_seed(123)  # whatever the new process would draw: the checkpoint's state must win
        second = _runner(tmp_path / "second", 4)
        second.resume(str(tmp_path / "first" / "iter_2.pth"))
        assert second.iter == 2
        second.run([_loader()], [("train", 1)])
        got = _state(second)
    finally:
        set_run_device(None)
    for name, want, have in zip(("model", "EMA"), expected[:2], got[:2]):
        for k in want:
            assert torch.equal(want[k], have[k]), f"{name} {k} differs from the uninterrupted run"
    assert got[2:3] == expected[2:3] and torch.equal(got[3], expected[3]) and got[4] == expected[4] == 4


def test_mmcvs_own_resume_repeats_the_checkpoints_iteration(tmp_path):
    first = _runner(tmp_path / "first", 2)
    first.run([_loader()], [("train", 1)])
    plain = _runner(tmp_path / "plain", 4)
    plain.resume(str(tmp_path / "first" / "iter_2.pth"), map_location="cpu")
    assert plain.iter == 1  # what the 'fbocc-resume' patch corrects (iter_2.pth holds 2 finished iterations)


def test_checkpoint_check_sees_through_the_kits_wrapper_subclasses():
    """The key-by-key check compares with the bare model: on CPU the kit wraps it in a subclass of mmcv's DDP
    (patches.device._cpu_ddp_class), which a check by class name missed ('module.' on every key, resume refused)."""
    pytest.importorskip("mmcv")
    import torch
    from mmcv.parallel import MMDataParallel

    from bevkit.models.fbocc.patches.checkpoints import unwrap

    class CPUDataParallelOfTheKit(MMDataParallel):
        pass

    model = torch.nn.Linear(2, 2)
    assert unwrap(CPUDataParallelOfTheKit(model)) is model
    assert unwrap(model) is model
