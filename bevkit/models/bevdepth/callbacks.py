"""Lightning callbacks of the kit's BEVDepth CLI for checkpoints and resume (pytorch-lightning 1.9).

- :class:`RunFolderCheckpoint`: Lightning's ModelCheckpoint (same defaults: every epoch, keep the newest),
  except that it never deletes a file outside its own folder. Lightning reloads ``best_model_path`` from a
  resumed checkpoint even when the folder changed ("The dirpath has changed from ...") and, with
  ``save_top_k=1``, removes that "previous best" after its first save: the earlier run's checkpoint.
- :class:`BevkitResumeState`: the model's name and the RNG state (:mod:`bevkit.training_state`) in every
  checkpoint; restored when training resumes, before the first batch is drawn.
- :func:`resumable_ema`: upstream's EMA callback with its state (EMA weights, update count) in the checkpoint.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from bevkit.compat import prepare_imports

prepare_imports()

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402

from bevkit import log, training_state  # noqa: E402


def _inside(path: str, folder: Optional[str]) -> bool:
    if not folder:
        return False
    folder = os.path.realpath(folder).rstrip(os.sep) + os.sep
    return os.path.realpath(path).startswith(folder)


class RunFolderCheckpoint(ModelCheckpoint):
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) != self.dirpath:
            return  # another run's folder: its paths are not ours to replace or delete
        super().load_state_dict(state_dict)

    def _remove_checkpoint(self, trainer: "pl.Trainer", filepath: str) -> None:
        if not _inside(filepath, self.dirpath):
            log.get("bevdepth").warning(f"kept {filepath}: not in this run's checkpoint folder {self.dirpath}")
            return
        super()._remove_checkpoint(trainer, filepath)


class BevkitResumeState(pl.Callback):
    def __init__(self, model: str = "bevdepth"):
        self.model = model
        self._restore: Optional[dict] = None

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "rng": training_state.rng_state()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._restore = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        if self._restore and self._restore.get("rng"):
            training_state.set_rng_state(self._restore["rng"])
            self._restore = None


def resumable_ema(ema_callback_class):
    """A subclass of upstream's ``EMACallback`` whose state (EMA weights, updates) is saved in checkpoints
    and restored when training resumes."""

    class ResumableEMACallback(ema_callback_class):
        _loaded: Optional[dict] = None

        @property
        def state_key(self) -> str:
            return "EMACallback"

        def state_dict(self) -> Dict[str, Any]:
            ema = getattr(self, "_trainer_ema", None)
            if ema is None:
                return {}
            return {"state_dict": {k: v.detach().cpu() for k, v in ema.ema.state_dict().items()},
                    "updates": int(ema.updates)}

        def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
            self._loaded = state_dict or None

        def on_fit_start(self, trainer, pl_module):
            super().on_fit_start(trainer, pl_module)
            self._trainer_ema = trainer.ema_model
            if self._loaded:
                trainer.ema_model.ema.load_state_dict(self._loaded["state_dict"])
                trainer.ema_model.updates = self._loaded["updates"]

    return ResumableEMACallback
