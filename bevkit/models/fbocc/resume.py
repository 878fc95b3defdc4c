"""The kit's part of an FB-OCC resume (mmcv hook ``BevkitResumeHook``, added by :func:`.config.finalize`).

Saving: every checkpoint mmcv writes gets ``meta['bevkit']``: the model, the completed iterations, the EMA
weights and update count (upstream's EMA hook writes its own files only every few epochs), and the RNG state
(:mod:`bevkit.training_state`). Resuming (after the patched ``IterBasedRunner.resume``,
:mod:`.patches.checkpoints`): the EMA is restored (plus the update of the checkpoint's own iteration when the
EMA hook had not run yet when the checkpoint was written), the RNG state is restored before the data loaders
start, and the temporal-fusion switch of ``SequentialControlHook`` is set as it was.

Not restored: FB-OCC's history buffers (the resumed run starts a new sequence, as after any data loader restart)
and the data loader's position within its epoch (mmcv's IterBasedRunner restarts its loaders on resume).
"""
from __future__ import annotations

from bevkit.compat import prepare_imports

prepare_imports()

from mmcv.runner import HOOKS, Hook, IterBasedRunner  # noqa: E402

from bevkit import training_state  # noqa: E402
from bevkit.checkpoint_check import KIT_KEY  # noqa: E402
from bevkit.device import run_device  # noqa: E402


def _cpu(state):
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


@HOOKS.register_module(force=True)
class BevkitResumeHook(Hook):
    """Priority VERY_LOW: its before_run runs after the EMA hook built ``runner.ema_model``."""

    def before_run(self, runner) -> None:
        self._wrap_save(runner)
        state = getattr(runner, "_bevkit_resumed", None)
        if state:
            self._restore(runner, state)
        ema = getattr(runner, "ema_model", None)
        if ema is not None:
            self._track_ema(runner, ema)

    # --- saving -----------------------------------------------------------------------------------
    @staticmethod
    def _track_ema(runner, ema) -> None:
        update = ema.update

        def tracked(*args, **kwargs):
            update(*args, **kwargs)
            runner._bevkit_ema_iter = runner.iter + 1  # the iteration this update belongs to

        ema.update = tracked

    def _wrap_save(self, runner) -> None:
        save = runner.save_checkpoint

        def save_checkpoint(*args, **kwargs):
            meta = dict(kwargs.pop("meta", None) or {})
            meta[KIT_KEY] = self.state(runner)
            return save(*args, meta=meta, **kwargs)

        runner.save_checkpoint = save_checkpoint

    @staticmethod
    def state(runner) -> dict:
        """What the kit adds to a checkpoint written now (inside an iteration of an IterBasedRunner)."""
        completed = runner.iter + 1 if isinstance(runner, IterBasedRunner) else runner.iter
        state = {"model": "fbocc", "completed_iters": completed, "rng": training_state.rng_state()}
        ema = getattr(runner, "ema_model", None)
        if ema is not None:
            state["ema"] = {"state_dict": _cpu(ema.ema.state_dict()), "updates": int(ema.updates),
                            "up_to_date": getattr(runner, "_bevkit_ema_iter", 0) == completed}
        return state

    # --- resuming ---------------------------------------------------------------------------------
    @staticmethod
    def _restore(runner, state: dict) -> None:
        ema_state = state.get("ema")
        ema = getattr(runner, "ema_model", None)
        if ema_state and ema is not None:
            ema.ema.load_state_dict(ema_state["state_dict"])
            ema.updates = ema_state["updates"]
            if not ema_state.get("up_to_date", False):  # the checkpoint's own iteration: its EMA update
                ema.update(runner, runner.model.module)
        for hook in runner.hooks:  # the temporal-fusion switch as the finished iterations left it
            start = getattr(hook, "temporal_start_iter", None)
            if type(hook).__name__ == "SequentialControlHook" and start is not None and 0 <= start <= runner.iter - 1:
                hook.set_temporal_flag_v2(runner, True)
        if state.get("rng"):
            training_state.set_rng_state(state["rng"], run_device())
        runner.logger.info("bevkit: restored " + ", ".join(
            (["EMA"] if ema_state and ema is not None else []) + (["RNG state"] if state.get("rng") else [])))
