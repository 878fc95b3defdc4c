"""Accuracy gates: a run's results.json against its model's reference data (``tools/report --gate RUN...``).

Each model's reference file (``ModelSpec.references``, e.g. ``fbocc/reference.json``) holds ``gates``:
``reference`` (the published recipe: its global batch, its optimizer steps, the accuracy within a tolerance) and
``demo`` (the demo's thresholds). A demo run (mode ``demo``, or an evaluation in the demo flow, or of a
checkpoint a demo trained) is held to ``demo``; every other run to ``reference``. Each check says the tolerance
or threshold it used. The verdict is PASS only when every check passes and the run succeeded; a metric missing
from results.json fails its check.

The training recipe is compared, never silently: the run's own global batch and steps when it trained, else
(an evaluation) those of the kit run that wrote the checkpoint (its results.json, found beside the checkpoint).
A different global batch or step count, or an unknown recipe, is printed as a WARNING; the checks still run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from bevkit.registry import get_spec
from bevkit.results import RESULTS_FILE, load_results

TRAINING_MODES = ("full", "performance", "smoke", "demo")
#: how far above an evaluated checkpoint a training run's results.json is looked for (BEVDepth keeps its
#: checkpoints in <run>/lightning_logs/version_0/checkpoints/)
CHECKPOINT_DEPTH = 4


@dataclass
class Verdict:
    run: str                              # the results.json judged
    gate: str                             # 'reference' / 'demo' ('' when the model has none)
    header: str
    checks: List[Tuple[bool, str]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for ok, _ in self.checks)

    def text(self) -> str:
        lines = [self.header] + [f"  WARNING {w}" for w in self.warnings]
        lines += [f"  {'PASS' if ok else 'FAIL'} {line}" for ok, line in self.checks]
        lines.append(f"{'PASS' if self.passed else 'FAIL'}: {self.run}")
        return "\n".join(lines)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def metric_value(metrics: Mapping[str, Any], key: str) -> Any:
    """metrics['a']['b'] for 'a.b' (None when absent)."""
    value: Any = metrics
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _fmt(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1 else f"{value:.2f}"


def check(metrics: Mapping[str, Any], spec: Mapping[str, Any]) -> Tuple[bool, str]:
    """One check of a gate: (passed, the line that says what was compared with what)."""
    key = spec["metric"]
    name = spec.get("name", key)
    unit = spec.get("unit", "")
    unit_s = f" {unit}" if unit and unit != "%" else unit
    scale = float(spec.get("scale", 1.0))
    raw = metric_value(metrics, key)
    if "above" in spec:  # a count of classes: {'above': threshold, 'at_least': n}
        if not isinstance(raw, Mapping):
            return False, f"{name}: '{key}' missing from results.json metrics (did the run evaluate?)"
        values = {k: _number(v) for k, v in raw.items()}
        above = {k: v * scale for k, v in values.items() if v is not None and v * scale > spec["above"]}
        listed = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(above.items(), key=lambda kv: -kv[1]))
        ok = len(above) >= spec["at_least"]
        return ok, (f"{name} (> {_fmt(spec['above'])}{unit_s}): {len(above)} {'>=' if ok else '<'} "
                    f"{spec['at_least']} needed" + (f" ({listed})" if listed else ""))
    value = _number(raw)
    if value is None:
        return False, f"{name}: '{key}' missing from results.json metrics (did the run evaluate?)"
    value *= scale
    if "target" in spec:
        target, tolerance = float(spec["target"]), float(spec["tolerance"])
        ok = abs(value - target) <= tolerance
        return ok, (f"{name} {_fmt(value)}{unit_s}: {'within' if ok else 'outside'} {_fmt(tolerance)} of "
                    f"{_fmt(target)}{unit_s} (difference {value - target:+.2f})")
    minimum = float(spec["min"])
    ok = value >= minimum
    return ok, f"{name} {_fmt(value)}{unit_s} {'>=' if ok else '<'} {_fmt(minimum)}{unit_s} (minimum)"


def training_run(run: Mapping[str, Any]) -> Tuple[Optional[Mapping[str, Any]], str]:
    """(results of the run that trained the evaluated weights, where they came from); (None, why) if unknown."""
    if run.get("mode") in TRAINING_MODES:
        return run, "this run"
    checkpoint = run.get("checkpoint")
    if not checkpoint:
        return None, "the run names no checkpoint"
    folder = Path(checkpoint).parent
    for _ in range(CHECKPOINT_DEPTH):
        candidate = folder / RESULTS_FILE
        if candidate.is_file():
            try:
                trained = load_results(candidate)
            except (OSError, ValueError):
                break
            if trained.get("mode") in TRAINING_MODES:
                return trained, str(candidate)
            break
        folder = folder.parent
    return None, f"no results.json of a kit training run beside the checkpoint {checkpoint}"


def is_demo(run: Mapping[str, Any], trained: Optional[Mapping[str, Any]]) -> bool:
    return any(r is not None and "demo" in (r.get("mode"), r.get("flow")) for r in (run, trained))


def recipe_warnings(gate: Mapping[str, Any], trained: Optional[Mapping[str, Any]], source: str) -> List[str]:
    recipe = {k: gate[k] for k in ("global_batch", "steps") if gate.get(k) is not None}
    if not recipe:
        return ["the gate records no training recipe (global batch, steps): not compared"]
    wanted = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in recipe.items())
    if trained is None:
        return [f"training recipe unknown ({source}): compared with the gate's ({wanted}) anyway"]
    out = []
    for key, expected in recipe.items():
        actual = trained.get(key)
        if actual != expected:
            out.append(f"{key.replace('_', ' ')} {actual} ({source}) is not the gate's {expected}: "
                       "compared anyway, the numbers are not comparable one to one")
    return out


def evaluate(run: Mapping[str, Any]) -> Verdict:
    """The verdict of one loaded results.json (:func:`bevkit.results.load_results`)."""
    path = run.get("_path", "results.json")
    model = run.get("model", "?")
    try:
        spec = get_spec(model)
    except (KeyError, ImportError):
        return Verdict(path, "", f"{model} {run.get('mode')}: no registered model, no gate",
                       checks=[(False, f"model {model!r} has no reference data")])
    trained, source = training_run(run)
    name = "demo" if is_demo(run, trained) else "reference"
    gate = spec.gates().get(name)
    header = f"{model} {run.get('mode')} run" + (f" (flow {run['flow']})" if run.get("flow") else "")
    if gate is None:
        return Verdict(path, name, header, checks=[(False, f"{spec.references} has no '{name}' gate")])
    verdict = Verdict(path, name, f"{header}: gate '{name}' of {spec.references} ({gate.get('what', '')})",
                      warnings=recipe_warnings(gate, trained, source))
    if run.get("status") != "ok":
        verdict.checks.append((False, f"the run did not succeed (status {run.get('status')}, exit "
                                      f"{run.get('exit_code')})"))
    metrics = run.get("metrics") or {}
    verdict.checks.extend(check(metrics, c) for c in gate.get("checks", []))
    return verdict


def main(paths: Sequence[Path], out=None) -> int:
    """Gate each run; 0 when all pass, 1 when one fails, 2 when a results.json cannot be read."""
    import sys

    out = out or sys.stdout
    status = 0
    for path in paths:
        try:
            run = load_results(path)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        verdict = evaluate(run)
        print(verdict.text(), file=out)
        if not verdict.passed:
            status = 1
    return status
