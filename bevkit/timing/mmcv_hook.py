"""mmcv hook that records each training iteration with :class:`bevkit.timing.StepRecorder`.

Use it from an mmcv config (FB-OCC)::

    custom_imports = dict(imports=['bevkit.timing.mmcv_hook'], allow_failed_imports=False)
    custom_hooks = [dict(type='BevkitTimingHook')]

or ``runner.register_hook(BevkitTimingHook())``. The default priority NORMAL runs it after the optimizer
hook (ABOVE_NORMAL), so a step's time includes the backward pass and the optimizer update, and before
the evaluation hooks (LOW), whose time lands in the following step (as in mmcv's own ``time`` column,
the median is robust to such steps).

Stopping (``BEVKIT_MAX_STEPS``): on an ``IterBasedRunner`` the hook lowers ``runner._max_iters`` to the
current iteration + 1 when the last step *begins*, so every hook sees that iteration as the run's last one (the
checkpoint hook saves ``latest.pth`` there, as at the end of a full schedule: a smoke run of 3 steps can be
evaluated) and the runner leaves its loop normally and runs its ``after_run`` hooks (no ``sys.exit`` inside the
loop). On an ``EpochBasedRunner`` it can only end after the current epoch.
"""
from __future__ import annotations

from typing import Any, Optional

from bevkit.compat import prepare_imports
from bevkit.timing import StepRecorder

prepare_imports()  # mmcv.runner imports torchvision, which may need the kit's shim on a CPU torch

from mmcv.runner import HOOKS, Hook, IterBasedRunner  # noqa: E402


def _first_lr(lr: Any) -> Optional[float]:
    """runner.current_lr(): a list per param group, or a dict of such lists (several optimizers)."""
    if isinstance(lr, dict):
        lr = next(iter(lr.values()), None)
    if isinstance(lr, (list, tuple)):
        lr = lr[0] if lr else None
    return lr


@HOOKS.register_module(force=True)
class BevkitTimingHook(Hook):
    def __init__(self, max_steps: Optional[int] = None, samples_per_device: Optional[int] = None,
                 run_dir: Optional[str] = None):
        self._kwargs = dict(max_steps=max_steps, samples_per_device=samples_per_device, run_dir=run_dir)
        self.recorder: Optional[StepRecorder] = None

    def before_run(self, runner) -> None:
        # runner.rank / world_size come from mmcv.runner.get_dist_info (global rank)
        # runner.iter: iterations done before this run (a resumed training continues the count)
        self.recorder = StepRecorder(rank=runner.rank, world_size=runner.world_size, first_step=runner.iter,
                                     **self._kwargs)
        self.recorder.start()

    def before_train_epoch(self, runner) -> None:
        # EpochBasedRunner: restart the clock per epoch, so evaluation between epochs is not a step
        if self.recorder is not None:
            self.recorder.start()

    def before_train_iter(self, runner) -> None:
        self.recorder.step_begin()
        last = self.recorder.max_steps is not None and self.recorder.steps + 1 >= self.recorder.max_steps
        if last and isinstance(runner, IterBasedRunner):
            runner._max_iters = min(runner._max_iters, runner.iter + 1)  # this iteration is the last one

    def after_train_iter(self, runner) -> None:
        outputs = runner.outputs or {}
        log_vars = dict(outputs.get("log_vars") or {})
        loss = log_vars.pop("loss", None)
        if loss is None:
            loss = outputs.get("loss")
        samples = None
        if self.recorder.samples_per_device is None and outputs.get("num_samples") is not None:
            samples = int(outputs["num_samples"]) * self.recorder.world_size
        try:
            lr = _first_lr(runner.current_lr())
        except Exception:  # no optimizer (e.g. a custom runner): record without lr
            lr = None
        stop = self.recorder.step_end(loss=loss, losses=log_vars, lr=lr, samples=samples,
                                      iter=runner.iter + 1, epoch=runner.epoch)
        if stop:
            self._stop(runner)

    def _stop(self, runner) -> None:
        n = self.recorder.steps - self.recorder.first_step
        if isinstance(runner, IterBasedRunner):
            # IterBasedRunner increments runner.iter after this hook; its loop ends when iter >= _max_iters
            runner._max_iters = min(runner._max_iters, runner.iter + 1)
        else:  # EpochBasedRunner: the epoch in progress is the last one
            runner._max_epochs = runner.epoch + 1
        runner.logger.info(f"bevkit: stopping after {n} steps (BEVKIT_MAX_STEPS)")

    def after_run(self, runner) -> None:
        if self.recorder is not None:
            self.recorder.close()
