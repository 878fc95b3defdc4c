"""``--resume RUN_DIR|auto``: which earlier run, which of its checkpoints, what it ran with.

Only reads: nothing in an earlier run folder is created, changed, moved or deleted; the resumed training
writes into a new run folder whose ``launch.json`` and ``results.json`` name the earlier one (``resumed_from``).

- ``RUN_DIR``: a run folder the launcher made (it holds the ``launch.json`` that names it) of the same model and
  mode; its newest checkpoint (the model's :attr:`~bevkit.registry.CheckpointFormat.latest`), or, when it wrote
  none (it was itself resumed and killed early), the one it resumed from.
- ``auto``: the newest run folder under the work dir of this model and mode that did not finish (no
  ``results.json`` with status ok) and has a checkpoint to continue from.

The new run takes the earlier run's ``--config``, ``--max-steps`` and upstream arguments unless given again, so
the schedule stays the same; data root, device and cluster shape are this command's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bevkit.checkpoints import RUN_RECORD
from bevkit.errors import ResumeError
from bevkit.registry import ModelSpec

RESULTS = "results.json"


@dataclass(frozen=True)
class Earlier:
    run_dir: Path          # the run folder named by --resume (or found by auto)
    checkpoint: Path       # the checkpoint the new run continues from
    record: dict           # the earlier run's launch.json

    @property
    def request(self) -> dict:
        return self.record.get("request") or {}

    def summary(self) -> dict:
        return {"run_dir": str(self.run_dir), "checkpoint": str(self.checkpoint)}


def read_record(run_dir: Path) -> Optional[dict]:
    """The launch.json of a kit run folder (None when ``run_dir`` is not one)."""
    try:
        record = json.loads((Path(run_dir) / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("request"), dict) else None


def finished(run_dir: Path) -> bool:
    try:
        return json.loads((Path(run_dir) / RESULTS).read_text(encoding="utf-8")).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def checkpoint_of(run_dir: Path, spec: ModelSpec, record: dict, depth: int = 0) -> Optional[Path]:
    """The newest checkpoint of a run, else of the run it resumed from (a resumed run killed before it wrote
    its first checkpoint still continues from there)."""
    found = spec.checkpoint_format.latest(run_dir) if spec.checkpoint_format.latest else None
    if found is not None or depth > 50:
        return found
    earlier = (record.get("resumed_from") or {}).get("run_dir")
    previous = read_record(Path(earlier)) if earlier else None
    return checkpoint_of(Path(earlier), spec, previous, depth + 1) if previous else None


def find(resume: str, spec: ModelSpec, mode: str, work_dir: Path) -> Earlier:
    """The run and checkpoint ``--resume`` names; ResumeError (one line, with the fix) otherwise."""
    if resume == "auto":
        return _newest_unfinished(spec, mode, work_dir)
    run_dir = Path(resume)
    if not run_dir.is_dir():
        raise ResumeError(f"--resume {run_dir}: no such folder; pass a run folder (runs/{spec.name}/{mode}/<time>) "
                          "or --resume auto")
    record = read_record(run_dir)
    if record is None or Path(record["request"].get("run_dir") or "") != run_dir:
        raise ResumeError(f"--resume {run_dir} is not a run folder of the kit (no launch.json of its own): pass a "
                          f"folder the launcher made, e.g. under runs/{spec.name}/{mode}/, or --resume auto")
    model, earlier_mode = record["request"].get("model"), record["request"].get("mode")
    if model != spec.name:
        raise ResumeError(f"--resume {run_dir} is a {model} run, not a {spec.name} one: resume it with "
                          f"--model {model}, or pass a {spec.name} run folder")
    if earlier_mode != mode:
        raise ResumeError(f"--resume {run_dir} is a {earlier_mode} run: resume it with --mode {earlier_mode}")
    checkpoint = checkpoint_of(run_dir, spec, record)
    if checkpoint is None:
        raise ResumeError(f"--resume {run_dir}: the run wrote no checkpoint to continue from (it stopped before "
                          "its first one); start a new run")
    return Earlier(run_dir, checkpoint, record)


def _newest_unfinished(spec: ModelSpec, mode: str, work_dir: Path) -> Earlier:
    runs = sorted((d for d in Path(work_dir).iterdir() if d.is_dir()), key=lambda d: d.name,
                  reverse=True) if Path(work_dir).is_dir() else []
    for run_dir in runs:  # names are UTC times: newest first
        record = read_record(run_dir)
        if record is None or record["request"].get("model") != spec.name or record["request"].get("mode") != mode:
            continue
        if finished(run_dir):
            continue
        checkpoint = checkpoint_of(run_dir, spec, record)
        if checkpoint is not None:
            return Earlier(run_dir, checkpoint, record)
    raise ResumeError(f"--resume auto: no unfinished {spec.name} {mode} run with a checkpoint under {work_dir} "
                      "(finished runs are not resumed): pass --resume RUN_DIR or start a new run")
