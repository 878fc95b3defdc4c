"""Per-step timing from inside the training loop (not from log text).

:class:`StepRecorder` is framework-free: call :meth:`StepRecorder.start` once before the first batch is
fetched, optionally :meth:`StepRecorder.step_begin` when a batch arrives, and
:meth:`StepRecorder.step_end` after each optimizer step. On global rank 0 it appends one JSON line per
step to ``$BEVKIT_RUN_DIR/steps.jsonl`` (flushed per line, so a crashed run keeps its steps)::

    {"step": 1, "time_s": 0.91, "data_time_s": 0.02, "loss": 3.2, "losses": {"loss_depth": 1.1, ...},
     "lr": 0.0002, "samples": 32, "t": 1731000000.1}

``time_s`` is the wall time from the end of the previous step (or from :meth:`start`) to the end of this
one, measured after synchronizing the device, so it covers data loading, forward, backward and the
optimizer like mmcv's ``time`` column. ``samples`` = batch per device x world size.

Framework adapters (import them explicitly; neither is imported here so that this module needs
neither mmcv nor Lightning):

- :mod:`bevkit.timing.mmcv_hook`: ``BevkitTimingHook`` for mmcv runners (FB-OCC).
- :mod:`bevkit.timing.lightning`: ``BevkitTimingCallback`` for pytorch-lightning 1.9 (BEVDepth).

Both stop training cleanly after ``$BEVKIT_MAX_STEPS`` steps (performance runs).

Steps are counted from the training's own counter: a resumed run (``--resume``) starts at the step after its
checkpoint (``first_step``), so the ``steps.jsonl`` of the earlier run up to the checkpoint and that of the
resumed run join into one curve, and ``BEVKIT_MAX_STEPS`` ends both at the same total.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from bevkit import env
from bevkit.device import RunDevice, run_device

STEPS_FILE = "steps.jsonl"


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def to_float(value: Any) -> Optional[float]:
    """A Python float from a float, int, 0-d tensor or numpy scalar (None stays None)."""
    if value is None:
        return None
    if hasattr(value, "detach"):  # torch tensor: one host sync, only on the recording rank
        value = value.detach()
        if value.numel() != 1:
            value = value.float().mean()
        value = value.item()
    elif hasattr(value, "item"):
        value = value.item()
    return float(value)


class StepRecorder:
    """Records wall time, losses and learning rate of each optimizer step.

    Every rank must call :meth:`step_end` (so all ranks agree on when to stop), but only global rank 0
    synchronizes, converts losses and writes. Arguments default to the run's device
    (:func:`bevkit.device.run_device`) and the launcher's environment: ``BEVKIT_RUN_DIR``,
    ``BEVKIT_MAX_STEPS``, ``BEVKIT_SAMPLES_PER_DEVICE``, ``RANK`` and ``WORLD_SIZE`` (set by torchrun).
    """

    def __init__(self, run_dir: Optional[str] = None, device: Optional[str] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 samples_per_device: Optional[int] = None, max_steps: Optional[int] = None,
                 sync: bool = True, clock=time.perf_counter, first_step: int = 0):
        run_dir = run_dir if run_dir is not None else env.get("BEVKIT_RUN_DIR")
        self.run_dir = Path(run_dir) if run_dir else None
        self.device = RunDevice.of(device) if device else run_device()
        self.rank = rank if rank is not None else (_env_int("RANK") or 0)
        self.world_size = world_size if world_size is not None else (_env_int("WORLD_SIZE") or 1)
        self.samples_per_device = (samples_per_device if samples_per_device is not None
                                   else env.get_int("BEVKIT_SAMPLES_PER_DEVICE"))
        self.max_steps = max_steps if max_steps is not None else env.get_int("BEVKIT_MAX_STEPS")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        self.sync = sync
        self._clock = clock
        self.first_step = int(first_step or 0)  # steps done before this process (a resumed training)
        self.steps = self.first_step
        self._last_end: Optional[float] = None
        self._begin: Optional[float] = None
        self._file = None

    @property
    def is_writer(self) -> bool:
        return self.rank == 0 and self.run_dir is not None

    @property
    def should_stop(self) -> bool:
        return self.max_steps is not None and self.steps >= self.max_steps

    def start(self) -> None:
        """Mark the start of training (before the first batch is fetched)."""
        if self.rank == 0 and self.sync:
            self.device.synchronize()
        self._last_end = self._clock()
        if self.is_writer and self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # append: a resumed run in the same run folder keeps its earlier steps
            self._file = open(self.run_dir / STEPS_FILE, "a", encoding="utf-8")

    def step_begin(self) -> None:
        """Optional: the batch has arrived (splits ``data_time_s`` out of the step time)."""
        if self.rank == 0:
            if self._last_end is None:
                self.start()
            self._begin = self._clock()

    def step_end(self, loss: Any = None, losses: Optional[Mapping[str, Any]] = None, lr: Any = None,
                 samples: Optional[int] = None, **extra: Any) -> bool:
        """Close one optimizer step; returns True when training should stop (max steps reached).

        ``samples``: samples in this global step; default batch per device x world size.
        ``extra``: more JSON-serialisable fields for the record (e.g. epoch=3).
        """
        self.steps += 1
        if self.rank != 0:
            return self.should_stop
        if self.sync:
            self.device.synchronize()
        now = self._clock()
        started = self._last_end is not None
        if not started:  # start() was never called: this step has no start time
            self.start()
        record: Dict[str, Any] = {"step": self.steps,
                                  "time_s": round(now - self._last_end, 6) if started else None}
        if self._begin is not None and started:
            record["data_time_s"] = round(self._begin - self._last_end, 6)
        self._last_end, self._begin = now, None
        terms = {str(k): to_float(v) for k, v in (losses or {}).items()}
        total = to_float(loss)
        if total is None and terms:
            total = sum(v for v in terms.values() if v is not None)
        # JSON has no NaN/Inf: store null and name the offending terms (a diverged run must be visible)
        bad = [k for k, v in [("loss", total)] + list(terms.items()) if v is not None and not math.isfinite(v)]
        if bad:
            record["nonfinite"] = bad
            total = total if total is None or math.isfinite(total) else None
            terms = {k: (v if v is None or math.isfinite(v) else None) for k, v in terms.items()}
        record["loss"] = total
        if terms:
            record["losses"] = terms
        lr = to_float(lr)
        record["lr"] = lr if lr is None or math.isfinite(lr) else None
        if samples is None and self.samples_per_device is not None:
            samples = self.samples_per_device * self.world_size
        record["samples"] = samples
        record["t"] = round(time.time(), 3)
        record.update(extra)
        return self._after_write(record)

    def _after_write(self, record: Optional[dict]) -> bool:
        if record is not None and self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        return self.should_stop

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "StepRecorder":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_steps(path) -> list:
    """Step records from a steps.jsonl (a torn last line from a killed run is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
