"""pytorch-lightning (1.9.x API) callback that records each training batch with
:class:`bevkit.timing.StepRecorder` (BEVDepth).

Add it to the trainer: ``pl.Trainer(..., callbacks=[BevkitTimingCallback()])``. With
``BEVKIT_MAX_STEPS`` set it sets ``trainer.should_stop`` after that many batches, which ends the epoch
and the fit loop normally (checkpoint callbacks still run).

Loss terms: the ``loss`` the training step returned, plus every scalar the module logged with
``self.log`` (e.g. BEVDepth's ``detection_loss`` and ``depth_loss``; Lightning keeps them in
``trainer.callback_metrics``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from bevkit.compat import prepare_imports
from bevkit.timing import StepRecorder

prepare_imports()  # Lightning imports torchvision (through torchmetrics): the kit's shim on a CPU torch first

import pytorch_lightning as pl  # noqa: E402


class BevkitTimingCallback(pl.Callback):
    def __init__(self, max_steps: Optional[int] = None, samples_per_device: Optional[int] = None,
                 run_dir: Optional[str] = None, loss_keys: Optional[tuple] = None):
        self._kwargs = dict(max_steps=max_steps, samples_per_device=samples_per_device, run_dir=run_dir)
        self.loss_keys = loss_keys  # None: every logged metric whose name contains 'loss'
        self.recorder: Optional[StepRecorder] = None

    def on_train_start(self, trainer, pl_module) -> None:
        # global_step: optimizer steps before this run (a resumed training continues the count)
        self.recorder = StepRecorder(rank=trainer.global_rank, world_size=trainer.world_size,
                                     first_step=trainer.global_step, **self._kwargs)
        self.recorder.start()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # restart the clock: validation or checkpointing between epochs is not a training step
        self.recorder.start()

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, *args) -> None:
        self.recorder.step_begin()

    def _losses(self, trainer) -> Dict[str, Any]:
        metrics = getattr(trainer, "callback_metrics", {}) or {}
        keys = self.loss_keys if self.loss_keys is not None else [k for k in metrics if "loss" in k]
        return {k: metrics[k] for k in keys if k in metrics and k != "loss"}

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int,
                           *args) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        lr = None
        if trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0].get("lr")
        losses = self._losses(trainer) if self.recorder.rank == 0 else {}
        stop = self.recorder.step_end(loss=loss, losses=losses, lr=lr,
                                      epoch=trainer.current_epoch, global_step=trainer.global_step)
        if stop:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        if self.recorder is not None:
            self.recorder.close()
