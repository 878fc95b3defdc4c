"""FB-OCC checkpoints: resuming with everything, starting from weights with a check, loading with weights_only.

``tools/train.py --resume-from CKPT`` (the launcher's ``--resume``) calls mmcv's ``IterBasedRunner.resume``,
which maps tensors to ``cuda`` (fails off CUDA), sets the counter one iteration short (mmcv records the 0-based
iteration the checkpoint was saved in, so ``iter_12.pth`` would repeat iteration 12) and drops the fp16 loss
scaler's state (only ``EpochBasedRunner`` keeps ``meta``). :func:`_resume` loads on the CPU, sets the counter
to the completed iterations, restores the optimizer and the loss scaler and hands the kit's state (EMA, RNG:
:mod:`bevkit.models.fbocc.resume`) to the resume hook.

The checkpoint the launcher checked (``BEVKIT_CHECKPOINT``: the evaluated weights, the starting weights or the
resumed checkpoint) is compared key by key with the built model before mmcv loads it (:func:`_checked_load`):
mmcv loads with ``strict=False`` and would only log what is missing.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from bevkit import env


def unwrap(model):
    """The model inside mmcv's / torch's wrappers (subclasses included: the kit's CPU and device DDP classes)."""
    from mmcv.parallel import is_module_wrapper

    while is_module_wrapper(model):
        model = model.module
    return model


def is_checked(filename: Any) -> bool:
    checked = env.get("BEVKIT_CHECKPOINT")
    return bool(checked) and isinstance(filename, (str, os.PathLike)) and \
        os.path.abspath(os.fspath(filename)) == os.path.abspath(checked)


def verify(model, filename) -> None:
    """The exact check of the checked checkpoint against ``model`` (CheckpointError naming the differences)."""
    from bevkit import torch_load
    from bevkit.checkpoint_check import compare, inspect
    from bevkit.models.fbocc import CHECKPOINT_FORMAT

    found = inspect(torch_load.load(filename, mmap=True), filename)
    expected = {k: tuple(v.shape) for k, v in unwrap(model).state_dict().items()}
    compare(expected, found.keys, CHECKPOINT_FORMAT, filename)


def _checked_load(original):
    def load_checkpoint(model, filename, *args, **kwargs):
        if is_checked(filename):
            verify(model, filename)
        return original(model, filename, *args, **kwargs)

    load_checkpoint.__bevkit_original__ = original
    return load_checkpoint


def _resume(original):
    def resume(self, checkpoint: str, resume_optimizer: bool = True, map_location="default") -> None:
        from bevkit.checkpoint_check import KIT_KEY

        ckpt = self.load_checkpoint(checkpoint, map_location="cpu" if map_location == "default" else map_location)
        meta: Mapping = ckpt.get("meta") or {}
        kit: Optional[Mapping] = meta.get(KIT_KEY)
        completed = kit.get("completed_iters") if kit else None
        if completed is None:
            completed = meta["iter"] + 1  # mmcv's IterBasedRunner saves in iteration meta['iter'] (0-based)
        self._epoch = meta.get("epoch", 0)
        self._iter = self._inner_iter = int(completed)
        if "optimizer" in ckpt and resume_optimizer:
            optimizers = self.optimizer if isinstance(self.optimizer, dict) else {None: self.optimizer}
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(ckpt["optimizer"] if name is None else ckpt["optimizer"][name])
        if "fp16" in meta:  # Fp16OptimizerHook.before_run restores its loss scaler from runner.meta
            self.meta = dict(self.meta or {}, fp16=meta["fp16"])
        self._bevkit_resumed = dict(kit or {})
        self.logger.info(f"resumed from {checkpoint}: {completed} iterations done"
                         + ("" if kit else " (no kit state in it: EMA and RNG start afresh)"))

    resume.__bevkit_original__ = original
    return resume


def _torch_safe_load(original):
    from bevkit.torch_load import TorchWithSafeLoad

    return TorchWithSafeLoad(original)
