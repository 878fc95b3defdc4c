"""Structured results of a run: steady-state statistics, ``results.json``, the Ascend ModelZoo summary.

In the training processes, evaluation code calls :func:`write_metrics` (global rank 0) to leave its
accuracy numbers in ``$BEVKIT_RUN_DIR/metrics.json``. After torchrun exits, the launcher builds a
:class:`Results` (:func:`build_results`, from ``steps.jsonl`` (see :mod:`bevkit.timing`) and ``metrics.json``)
and :func:`write_results`, the one writer of ``results.json`` (schema :data:`SCHEMA_VERSION`), writes it with
``<Network>_bs<B>_<N>p_<mode>.log``.

Statistics (documented in results.json itself under ``definitions``):

- warm-up: the first ``ceil(10%)`` of the recorded steps are excluded (at least 1 when there are 2 or
  more steps, never all of them); ``BEVKIT_WARMUP_STEPS`` / ``--warmup-steps`` overrides it.
- ``step_time_mean_s`` / ``step_time_median_s``: over the steps after the warm-up.
- ``fps`` = global batch / ``step_time_mean_s`` (the reference's definition: DrivingSDK averages the
  last logged iterations of its runs); ``fps_median`` = global batch / ``step_time_median_s`` (robust
  to evaluation or checkpoint steps).

Importing this module never imports torch.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from bevkit import __version__, env
from bevkit.fileio import atomic_write_bytes
from bevkit.registry import all_specs, get_spec
from bevkit.provenance import collect_versions

METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.json"
SCHEMA_VERSION = 1


def metric_display(model: Optional[str] = None) -> Dict[str, Tuple[str, float]]:
    """metrics.json key -> (display name, factor to the unit of the reference tables), from the model's
    spec (``ModelSpec.metrics``; every registered model's when ``model`` is unknown). Stored values keep the
    evaluators' own units: FB-OCC ``miou`` is a percentage (upstream's ``Overall``); BEVDepth ``map``/``nds``
    are nuScenes-devkit fractions (0-1), shown as % like the READMEs; the TP errors (``mate``...) are devkit
    units (metres, 1-IoU, radians, m/s, 1-acc)."""
    try:
        specs = [get_spec(model)] if model else all_specs()
    except KeyError:  # a model that is not registered (a test spec, a run of another kit version)
        specs = all_specs()
    display: Dict[str, Tuple[str, float]] = {}
    for spec in specs:
        display.update(spec.metrics)
    return display
#: mode -> tag in the Ascend-style case name (DrivingSDK wrote FBOCC_bs4_8p_{full,perf}.log)
MODE_TAG = {"full": "full", "performance": "perf", "eval": "eval", "smoke": "smoke"}

DEFINITIONS = {
    "warmup_steps": "first ceil(10%) of recorded steps (>= 1 when >= 2 steps) excluded from step-time "
                    "statistics unless overridden",
    "step_time_s": "wall time between the ends of consecutive optimizer steps on global rank 0, "
                   "device synchronized: data loading + forward + backward + optimizer",
    "fps": "global_batch / step_time_mean_s (steps after warm-up)",
    "fps_median": "global_batch / step_time_median_s (steps after warm-up)",
    "global_batch": "samples per optimizer step over all devices (batch per device x world size)",
}


# ------------------------------------------------------------------------------------------ writing
def atomic_write_text(path, text: str) -> Path:
    """Write a file so that readers see the old content or the new one, never a torn file (umask applies)."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=True)


def atomic_write_json(path, obj: Any) -> Path:
    """Indented JSON; lists of numbers stay on one line (per-step arrays of long runs stay small)."""
    placeholders: Dict[str, str] = {}

    def compact(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: compact(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and value and all(
                v is None or isinstance(v, (int, float)) for v in value):
            key = f"@@bevkit-compact-{len(placeholders)}@@"
            placeholders[key] = json.dumps(list(value), allow_nan=False)
            return key
        if isinstance(value, (list, tuple)):
            return [compact(v) for v in value]
        return value

    text = json.dumps(compact(obj), indent=2, allow_nan=False)
    for key, dumped in placeholders.items():
        text = text.replace(json.dumps(key), dumped, 1)
    return atomic_write_text(path, text + "\n")


def _jsonable(value: Any) -> Any:
    """Plain JSON values from tensors / numpy scalars / arrays; non-finite floats become None."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays/scalars, torch tensors
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_metrics(metrics: Mapping[str, Any], run_dir=None) -> Optional[Path]:
    """Record accuracy metrics of this run in ``$BEVKIT_RUN_DIR/metrics.json`` (merged with earlier calls).

    Keys: FB-OCC ``miou`` (%) and ``per_class_iou`` ({class: %}); BEVDepth ``map``, ``nds`` (devkit
    fractions 0-1), ``mate``, ``mase``, ``maoe``, ``mave``, ``maae`` (devkit units); see :func:`metric_display`.
    Call it on global rank 0; on other ranks it does nothing. Outside a launcher run (no BEVKIT_RUN_DIR
    and no run_dir) it does nothing and returns None.
    """
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return None
    run_dir = run_dir or env.get("BEVKIT_RUN_DIR")
    if not run_dir:
        return None
    path = Path(run_dir) / METRICS_FILE
    merged: Dict[str, Any] = {}
    if path.is_file():
        try:
            merged = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            merged = {}
    merged.update(_jsonable(dict(metrics)))
    return atomic_write_json(path, merged)


def read_metrics(run_dir) -> Dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        return {"error": f"unreadable {METRICS_FILE}: {e}"}


# --------------------------------------------------------------------------------------- statistics
def default_warmup(n: int) -> int:
    """Steps excluded from the statistics: ceil(10%), at least 1 when n >= 2, never all of them."""
    if n < 2:
        return 0
    return min(n - 1, max(1, math.ceil(0.1 * n)))


def summarize_steps(records: Sequence[Mapping[str, Any]], warmup: Optional[int] = None,
                    global_batch: Optional[int] = None) -> Dict[str, Any]:
    """Steady-state statistics from step records (see :mod:`bevkit.timing` for the record format).

    ``global_batch``: used when the records carry no ``samples`` (otherwise the records win).
    """
    n = len(records)
    if warmup is None:
        warmup = default_warmup(n)
    if warmup < 0:
        raise ValueError(f"warm-up steps must be >= 0, got {warmup}")
    warmup = min(warmup, n)
    steady = [r["time_s"] for r in records[warmup:] if r.get("time_s") is not None]
    samples = [r["samples"] for r in records if r.get("samples")]
    if samples:
        global_batch = int(statistics.median(samples))
    losses = [r.get("loss") for r in records]
    finite = [v for v in losses if v is not None]
    out: Dict[str, Any] = {
        "steps": n,
        "warmup_steps": warmup,
        "timed_steps": len(steady),
        "global_batch": global_batch,
        "step_time_median_s": None, "step_time_mean_s": None, "step_time_p90_s": None,
        "step_time_min_s": None, "step_time_max_s": None,
        "fps": None, "fps_median": None,
        "data_time_median_s": None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_min": min(finite) if finite else None,
        "nonfinite_steps": sum(1 for r in records if r.get("nonfinite")),
    }
    if steady:
        ordered = sorted(steady)
        out["step_time_median_s"] = statistics.median(ordered)
        out["step_time_mean_s"] = statistics.fmean(ordered) if hasattr(statistics, "fmean") \
            else sum(ordered) / len(ordered)
        out["step_time_p90_s"] = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
        out["step_time_min_s"], out["step_time_max_s"] = ordered[0], ordered[-1]
        if global_batch:
            out["fps"] = global_batch / out["step_time_mean_s"] if out["step_time_mean_s"] > 0 else None
            out["fps_median"] = (global_batch / out["step_time_median_s"]
                                 if out["step_time_median_s"] > 0 else None)
    data = [r["data_time_s"] for r in records[warmup:] if r.get("data_time_s") is not None]
    if data:
        out["data_time_median_s"] = statistics.median(data)
    return out


# ---------------------------------------------------------------------------------------- results
@dataclass
class Results(MappingABC):
    """One run's results.json (schema :data:`SCHEMA_VERSION`); read like a mapping of its JSON keys."""

    model: str
    display_name: str
    mode: str
    device: str
    nproc_per_node: int
    nodes: int
    node_rank: int
    batch_per_device: Optional[int]
    stats: Dict[str, Any]                  # summarize_steps(): steps, warm-up, step times, fps, losses
    metrics: Dict[str, Any]                # metrics.json of the run
    exit_code: int
    e2e_duration_s: Optional[float]
    versions: Dict[str, Any]               # bevkit.provenance.collect_versions()
    upstream: Dict[str, Any]               # bevkit.provenance.upstream_info()
    per_step: Dict[str, List[Any]]         # step, time_s, loss arrays
    run: Dict[str, Any] = field(default_factory=dict)  # the launcher's facts: run_dir, max_steps, host, files
    npu_op_limits: Optional[str] = None    # bevkit.op_limits policy of the run (documented / port)
    kit_version: str = __version__
    schema: int = SCHEMA_VERSION

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nodes

    @property
    def status(self) -> str:
        return "ok" if self.exit_code == 0 else "failed"

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "schema": self.schema, "model": self.model, "display_name": self.display_name, "mode": self.mode,
            "device": self.device, "device_count": self.world_size, "world_size": self.world_size,
            "nproc_per_node": self.nproc_per_node, "nodes": self.nodes, "node_rank": self.node_rank,
            "batch_per_device": self.batch_per_device, **self.stats, "metrics": dict(self.metrics),
            "exit_code": self.exit_code, "status": self.status, "e2e_duration_s": self.e2e_duration_s,
            "versions": dict(self.versions), "upstream": dict(self.upstream), "kit_version": self.kit_version,
            "npu_op_limits": self.npu_op_limits, "definitions": DEFINITIONS,
        }
        if self.nodes > 1 and self.node_rank != 0:
            out["note"] = ("steps.jsonl and metrics.json are written by global rank 0 (node 0); "
                           "read node 0's results.json")
        out.update(self.run)
        out["per_step"] = self.per_step
        return _jsonable(out)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def build_results(*, records: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any], model: str,
                  display_name: str, mode: str, device: str, nproc_per_node: int, nnodes: int,
                  node_rank: int = 0, batch_per_device: Optional[int] = None, exit_code: int = 0,
                  e2e_duration_s: Optional[float] = None, warmup: Optional[int] = None,
                  versions: Optional[Mapping[str, Any]] = None, upstream: Optional[Mapping[str, Any]] = None,
                  extra: Optional[Mapping[str, Any]] = None, npu_op_limits: Optional[str] = None) -> Results:
    world_size = nproc_per_node * nnodes
    launcher_batch = batch_per_device * world_size if batch_per_device else None
    stats = summarize_steps(records, warmup=warmup, global_batch=launcher_batch)
    if batch_per_device is None and stats["global_batch"]:  # the runner counted the samples
        batch_per_device = stats["global_batch"] // world_size
    return Results(
        model=model, display_name=display_name, mode=mode, device=device, nproc_per_node=nproc_per_node,
        nodes=nnodes, node_rank=node_rank, batch_per_device=batch_per_device, stats=stats,
        metrics=dict(metrics), exit_code=exit_code, e2e_duration_s=e2e_duration_s,
        versions=dict(versions) if versions is not None else collect_versions(), upstream=dict(upstream or {}),
        per_step={"step": [r.get("step") for r in records], "time_s": [r.get("time_s") for r in records],
                  "loss": [r.get("loss") for r in records]},
        run=dict(extra or {}), npu_op_limits=npu_op_limits)


def display_metrics(metrics: Mapping[str, Any], model: Optional[str] = None) -> List[Tuple[str, float]]:
    """(name, value in the reference tables' unit) for the model's scalar metrics, in its order."""
    out = []
    for key, (name, factor) in metric_display(model).items():
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((name, float(value) * factor))
    return out


def case_name(results: Mapping[str, Any]) -> str:
    bs = results.get("batch_per_device")
    if bs is None and results.get("global_batch") and results.get("world_size"):
        bs = results["global_batch"] // results["world_size"]
    tag = MODE_TAG.get(results["mode"], results["mode"])
    return f"{results.get('display_name') or results['model']}_bs{bs}_{results['world_size']}p_{tag}"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ascend_summary(results: Mapping[str, Any]) -> Tuple[str, List[str], List[str]]:
    """(file name, key = value lines, final printed lines) in the Ascend ModelZoo style.

    All values come from results.json. TrainingTime is the mean steady-state step time in ms
    (ModelZoo's per-iteration training time); E2ETrainingTime the launcher's wall time in seconds.
    """
    name = case_name(results)
    step_ms = results.get("step_time_mean_s")
    step_ms = step_ms * 1000.0 if step_ms is not None else None
    e2e = results.get("e2e_duration_s")
    e2e_str = str(int(round(e2e))) if e2e is not None else "n/a"
    kv: List[Tuple[str, str]] = [
        ("Network", results.get("display_name") or results["model"]),
        ("RankSize", str(results["world_size"])),
        ("BatchSize", _fmt(results.get("batch_per_device"))),
        ("DeviceType", platform.machine() or "unknown"),
        ("Device", f"{results['device']} x{results['world_size']} ({results['nodes']} node(s))"),
        ("CaseName", name),
        ("FPS", _fmt(results.get("fps"))),
        ("ActualFPS", _fmt(results.get("fps"))),
        ("TrainingTime", _fmt(step_ms, 2)),
        ("ActualLoss", _fmt(results.get("loss_last"), 4)),
    ]
    metric_lines = []
    for display, value in display_metrics(results.get("metrics") or {}, results.get("model")):
        kv.append((display, _fmt(value, 4)))
        metric_lines.append(f"{display} : {_fmt(value, 4)}")
    kv += [("Steps", str(results.get("steps"))), ("ExitCode", str(results.get("exit_code"))),
           ("E2ETrainingTime", e2e_str)]
    lines = [f"{k} = {v}" for k, v in kv]
    printed = (["------------------ Final result ------------------",
                f"Final Performance images/sec : {_fmt(results.get('fps'))}"]
               + metric_lines + [f"E2E Training Duration sec : {e2e_str}"])
    return f"{name}.log", lines, printed


def write_results(run_dir, results: Mapping[str, Any]) -> Tuple[Path, Path, List[str]]:
    """Write results.json and the Ascend-style log into run_dir (both atomically): the one place results.json
    is written.

    Returns (results path, log path, the lines to print at the end of the run).
    """
    run_dir = Path(run_dir)
    results = results.to_dict() if isinstance(results, Results) else dict(results)
    log_name, lines, printed = ascend_summary(results)
    results.setdefault("files", {})
    results["files"] = {**results["files"], "ascend_log": log_name}
    path = atomic_write_json(run_dir / RESULTS_FILE, results)
    log_path = atomic_write_text(run_dir / log_name, "\n".join(lines) + "\n")
    return path, log_path, printed


def load_results(path) -> Dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no results.json at {path}: pass a results.json or a run folder")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("schema", 0) > SCHEMA_VERSION:
        raise ValueError(f"{path}: not a results.json of schema <= {SCHEMA_VERSION} (written by a newer kit?)")
    data.setdefault("_path", str(path))
    return data
