"""Structured results of a run: steady-state statistics, ``results.json``, the Ascend ModelZoo summary.

In the training processes, evaluation code calls :func:`write_metrics` (global rank 0) to leave its
accuracy numbers in ``$BEVKIT_RUN_DIR/metrics.json``. After torchrun exits, the launcher calls
:func:`build_results` + :func:`write_results`, which read ``steps.jsonl`` (see :mod:`bevkit.timing`) and
``metrics.json`` and write ``results.json`` and ``<Network>_bs<B>_<N>p_<mode>.log``.

Statistics (documented in results.json itself under ``definitions``):

- warm-up: the first ``ceil(10%)`` of the recorded steps are excluded (at least 1 when there are 2 or
  more steps, never all of them); ``BEVKIT_WARMUP_STEPS`` / ``--warmup-steps`` overrides it.
- ``step_time_mean_s`` / ``step_time_median_s``: over the steps after the warm-up.
- ``fps`` = global batch / ``step_time_mean_s`` (the reference's definition: DrivingSDK averages the
  last logged iterations, ANCHORS.md); ``fps_median`` = global batch / ``step_time_median_s`` (robust
  to evaluation or checkpoint steps).

Importing this module never imports torch.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from bevkit import REPO_ROOT, __version__

METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.json"
SCHEMA_VERSION = 1

#: metric key in metrics.json -> (display name, factor to the unit of the reference tables).
#: Stored values keep the evaluators' own units: FB-OCC ``miou`` is a percentage (upstream's
#: ``Overall``); BEVDepth ``map``/``nds`` are nuScenes-devkit fractions (0-1), shown as % like the
#: READMEs; the TP errors (``mate``...) are devkit units (metres, 1-IoU, radians, m/s, 1-acc).
METRIC_DISPLAY = {"miou": ("mIoU", 1.0), "map": ("mAP", 100.0), "nds": ("NDS", 100.0),
                  "mate": ("mATE", 1.0), "mase": ("mASE", 1.0), "maoe": ("mAOE", 1.0),
                  "mave": ("mAVE", 1.0), "maae": ("mAAE", 1.0)}
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
    """Write a file so that readers see the old content or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
    fractions 0-1), ``mate``, ``mase``, ``maoe``, ``mave``, ``maae`` (devkit units); see METRIC_DISPLAY.
    Call it on global rank 0; on other ranks it does nothing. Outside a launcher run (no BEVKIT_RUN_DIR
    and no run_dir) it does nothing and returns None.
    """
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return None
    run_dir = run_dir or os.environ.get("BEVKIT_RUN_DIR")
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


# ------------------------------------------------------------------------------------ provenance
def _dist_version(*names: str) -> Optional[str]:
    # importlib.metadata reads installed metadata without importing the package: torch_npu and
    # mx_driving break `import` on machines without CANN, and importing torch costs seconds.
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    for name in names:
        for spelling in {name, name.replace("_", "-"), name.replace("-", "_")}:
            try:
                return metadata.version(spelling)
            except Exception:
                continue
    return None


def cann_version(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """CANN toolkit version from its install info file (no CANN import), or None."""
    env = os.environ if environ is None else environ
    homes = [env.get(k) for k in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH") if env.get(k)]
    homes.append("/usr/local/Ascend/ascend-toolkit/latest")
    for home in homes:
        for name in ("ascend_toolkit_install.info", "version.info", "version.cfg"):
            path = Path(home) / name
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition("=")
                if key.strip().lower() in ("version", "toolkit_version", "runtime_running_version"):
                    return value.strip().strip('"[]').split(":")[0] or None
    return None


def collect_versions(environ: Optional[Mapping[str, str]] = None) -> Dict[str, Optional[str]]:
    """Versions of the stack that ran (None = not installed)."""
    return {
        "python": platform.python_version(),
        "torch": _dist_version("torch"),
        "torch_npu": _dist_version("torch_npu", "torch-npu"),
        "mx_driving": _dist_version("mx_driving", "mx-driving"),
        "mmcv": _dist_version("mmcv-full", "mmcv"),
        "mmdet": _dist_version("mmdet"),
        "mmdet3d": _dist_version("mmdet3d"),
        "mmsegmentation": _dist_version("mmsegmentation"),
        "pytorch_lightning": _dist_version("pytorch-lightning"),
        "numpy": _dist_version("numpy"),
        "cann": cann_version(environ),
        "platform": platform.platform(),
    }


def _sha256(path: Path) -> Optional[str]:
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _git_head(path: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def upstream_info(name: Optional[str], checkout: Optional[Path] = None) -> Dict[str, Any]:
    """Upstream provenance: pinned commit, the checkout's commit and patch state, sha256 of our patches.

    Read from bevkit.upstream (registry + read-only status); best effort: never fails the results.
    """
    if not name:
        return {}
    info: Dict[str, Any] = {"name": name, "pinned_commit": None, "commit": None,
                            "checkout": str(checkout) if checkout else None, "state": None, "patches": {}}
    try:
        from bevkit import upstream as up

        entry = up.get(name)
        info["pinned_commit"] = entry.commit
        info["url"] = entry.url
        for rel in entry.patches:
            path = Path(entry.patch_root) / rel
            info["patches"][str(rel)] = {"sha256": _sha256(path), "state": None}
        st = up.status(name, dest=checkout) if checkout is not None else up.status(name)
        info["commit"] = st.commit
        info["state"] = st.state
        for rel, state in st.patches:
            info["patches"].setdefault(str(rel), {"sha256": None})["state"] = state
        if st.problems:
            info["problems"] = [f"{what} -> {fix}" for what, fix in st.problems]
    except Exception as e:  # an old/partial bevkit.upstream, or git missing
        info["error"] = f"bevkit.upstream: {type(e).__name__}: {e}"
        if checkout is not None and Path(checkout).is_dir() and not info["commit"]:
            info["commit"] = _git_head(Path(checkout))
    return info


# ---------------------------------------------------------------------------------------- results
def build_results(*, records: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any], model: str,
                  display_name: str, mode: str, device: str, nproc_per_node: int, nnodes: int,
                  node_rank: int = 0, batch_per_device: Optional[int] = None, exit_code: int = 0,
                  e2e_duration_s: Optional[float] = None, warmup: Optional[int] = None,
                  versions: Optional[Mapping[str, Any]] = None, upstream: Optional[Mapping[str, Any]] = None,
                  extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    world_size = nproc_per_node * nnodes
    launcher_batch = batch_per_device * world_size if batch_per_device else None
    stats = summarize_steps(records, warmup=warmup, global_batch=launcher_batch)
    results: Dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "model": model,
        "display_name": display_name,
        "mode": mode,
        "device": device,
        "device_count": world_size,
        "world_size": world_size,
        "nproc_per_node": nproc_per_node,
        "nodes": nnodes,
        "node_rank": node_rank,
        "batch_per_device": batch_per_device,
        **stats,
        "metrics": dict(metrics),
        "exit_code": exit_code,
        "status": "ok" if exit_code == 0 else "failed",
        "e2e_duration_s": e2e_duration_s,
        "versions": dict(versions) if versions is not None else collect_versions(),
        "upstream": dict(upstream or {}),
        "kit_version": __version__,
        "definitions": DEFINITIONS,
    }
    if nnodes > 1 and node_rank != 0:
        results["note"] = ("steps.jsonl and metrics.json are written by global rank 0 (node 0); "
                           "read node 0's results.json")
    if extra:
        results.update(extra)
    results["per_step"] = {
        "step": [r.get("step") for r in records],
        "time_s": [r.get("time_s") for r in records],
        "loss": [r.get("loss") for r in records],
    }
    return _jsonable(results)


def display_metrics(metrics: Mapping[str, Any]) -> List[Tuple[str, float]]:
    """(name, value in the reference tables' unit) for the known scalar metrics, in a fixed order."""
    out = []
    for key, (name, factor) in METRIC_DISPLAY.items():
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
    for display, value in display_metrics(results.get("metrics") or {}):
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
    """Write results.json and the Ascend-style log into run_dir (both atomically).

    Returns (results path, log path, the lines to print at the end of the run).
    """
    run_dir = Path(run_dir)
    log_name, lines, printed = ascend_summary(results)
    results = dict(results)
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
    data.setdefault("_path", str(path))
    return data
