"""Compare runs: a Markdown table of one or more results.json beside the reference results, and PNG plots.

    tools/report RUN_OR_RESULTS [...] [--out DIR] [--all-references]
    tools/report --gate RUN_OR_RESULTS [...]
    tools/report --reference-table

Writes ``DIR/report.md`` (runs, accuracy gates, links to each run's pictures of predictions), ``DIR/loss.png``
and ``DIR/step_time.png`` (default DIR: ``report/`` inside the first run folder) and prints the Markdown.
``--gate`` only judges accuracy (:mod:`bevkit.gate`) and exits 1 when a run fails its gate. The reference results
are each model's data (``ModelSpec.references``: ``fbocc/reference.json``, ``bevdepth/reference.json``, with their
sources), the same numbers as README.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from bevkit import gate
from bevkit.registry import all_specs
from bevkit.results import display_metrics, load_results
from bevkit.visualize import PICTURES_DIR


def references(models: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Reference rows of the registered models (or of ``models``), from each model's reference file. FPS =
    global batch / mean step time. Accuracy in the units of metrics.json (ModelSpec.metrics): mIoU in %,
    mAP / NDS as devkit fractions."""
    return [row for spec in all_specs() if models is None or spec.name in models for row in spec.reference_rows()]


ACCURACY_NAMES = ("mIoU", "mAP", "NDS")


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def accuracy_text(metrics: Mapping[str, Any], model: Optional[str] = None) -> str:
    """'mIoU 39.85' / 'mAP 32.53 / NDS 43.32' in the reference tables' units (%)."""
    parts = [f"{name} {_num(value)}" for name, value in display_metrics(metrics, model)
             if name in ACCURACY_NAMES]
    return " / ".join(parts) or "-"


def reference_for(run: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The reference row measured on the same device type, card count and global batch, if any."""
    for ref in references([run.get("model")]):
        if (ref["model"] == run.get("model") and ref["device"] == run.get("device") and ref["fps"]
                and ref["cards"] == run.get("world_size") and ref["global_batch"] == run.get("global_batch")):
            return ref
    return None


def reference_table(models: Optional[Sequence[str]] = None) -> str:
    """The reference results as a Markdown table (README.md carries it, tools/report appends it)."""
    refs = references(models)
    if not refs:
        return ""
    lines = ["| Model | Source | Where | Cards | Global batch | Schedule | Step time (ms) | FPS | Accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for ref in refs:
        accuracy = accuracy_text(ref["accuracy"], ref["model"]) + (f" ({ref['note']})" if ref.get("note") else "")
        lines.append("| " + " | ".join([
            ref["model"], ref["source"], ref["where"], str(ref["cards"]), str(ref["global_batch"]),
            ref["schedule"], _num(ref["step_ms"], 0), _num(ref["fps"]), accuracy]) + " |")
    return "\n".join(lines) + "\n"


def run_label(run: Mapping[str, Any]) -> str:
    path = Path(run.get("_path", ""))
    return path.parent.name or run.get("model", "run")


def markdown(runs: Sequence[Mapping[str, Any]], all_references: bool = False) -> str:
    header = ("| Run | Model | Mode | Device | Cards | Global batch | Steps (warm-up) | Step time mean / median (ms) "
              "| FPS | FPS vs reference | Accuracy | Loss first -> last | Status |")
    lines = ["## Runs", "", header, "|" + "---|" * (header.count("|") - 1)]
    for run in runs:
        mean, median = run.get("step_time_mean_s"), run.get("step_time_median_s")
        ref = reference_for(run)
        vs = (f"{run['fps'] / ref['fps']:.2f}x ({ref['where']})" if ref and run.get("fps") else "-")
        lines.append("| " + " | ".join([
            run_label(run), run.get("display_name") or run.get("model", "?"), run.get("mode", "?"),
            str(run.get("device", "?")), f"{run.get('world_size', '?')} ({run.get('nodes', 1)} node)",
            _num(run.get("global_batch")), f"{run.get('steps', 0)} ({run.get('warmup_steps', 0)})",
            f"{_num(mean * 1000 if mean is not None else None, 1)} / "
            f"{_num(median * 1000 if median is not None else None, 1)}",
            _num(run.get("fps")), vs, accuracy_text(run.get("metrics") or {}, run.get("model")),
            f"{_num(run.get('loss_first'), 4)} -> {_num(run.get('loss_last'), 4)}",
            f"{run.get('status', '?')} (exit {run.get('exit_code', '?')})",
        ]) + " |")
    models = sorted({r.get("model") for r in runs if r.get("model")})
    table = reference_table(None if all_references else models)
    if table:
        files = ", ".join(spec.references for spec in all_specs() if spec.references)
        lines += ["", f"## Reference results ({files})", "", table.rstrip("\n")]
    lines += ["", "FPS = global batch / mean step time over the steps after the warm-up (median in results.json "
              "as fps_median). Reference FPS: DrivingSDK averages the last logged iterations. Compare FPS only "
              "at the same cards and global batch (the FPS vs reference column does that)."]
    return "\n".join(lines) + "\n"


def gate_section(runs: Sequence[Mapping[str, Any]]) -> str:
    """Each run's accuracy gate (``tools/report --gate`` gives the same verdicts with an exit code)."""
    lines = ["", "## Accuracy gate", "", "```"]
    lines += [gate.evaluate(run).text() for run in runs]
    return "\n".join(lines + ["```", ""])


def pictures_section(runs: Sequence[Mapping[str, Any]], out_dir: Path) -> str:
    """Links to the pictures of predictions each run folder holds (``pictures/``: written after evaluation
    runs, more with ``tools/visualize RUN_DIR``), relative to the report's folder."""
    lines: List[str] = []
    for run in runs:
        folder = Path(run.get("_path", "")).parent / PICTURES_DIR
        pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if not pngs:
            continue
        lines += ["", f"### {run_label(run)} ({run.get('model')} {run.get('mode')})", ""]
        for png in pngs:
            link = os.path.relpath(png, out_dir)
            lines.append(f"![{png.stem}]({link})")
    if not lines:
        return ""
    return "\n".join(["", "## Pictures of predictions"] + lines) + "\n"


def _series(run: Mapping[str, Any], key: str) -> tuple:
    per = run.get("per_step") or {}
    steps, values = per.get("step") or [], per.get(key) or []
    pairs = [(s, v) for s, v in zip(steps, values) if s is not None and v is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot(runs: Sequence[Mapping[str, Any]], out_dir: Path) -> List[Path]:
    """loss.png and step_time.png (one line per run; the warm-up boundary dashed)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    written = []
    for key, name, ylabel, scale in (("loss", "loss.png", "loss", 1.0),
                                     ("time_s", "step_time.png", "step time (ms)", 1000.0)):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        positive = True
        drawn = 0
        for run in runs:
            xs, ys = _series(run, key)
            if not xs:
                continue
            ys = [y * scale for y in ys]
            positive = positive and min(ys) > 0
            line, = ax.plot(xs, ys, linewidth=1, label=f"{run_label(run)} ({run.get('model')}, "
                                                         f"{run.get('device')} x{run.get('world_size')})")
            drawn += 1
            if key == "time_s" and run.get("warmup_steps"):
                ax.axvline(run["warmup_steps"] + 0.5, color=line.get_color(), linestyle="--", linewidth=0.8)
        if key == "loss" and drawn and positive:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} per step" + (" (dashed: end of warm-up)" if key == "time_s" else ""))
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no step records", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tools/report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="results.json files or run folders")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: report/ inside the first run folder)")
    p.add_argument("--all-references", action="store_true", help="list the references of every model")
    p.add_argument("--reference-table", action="store_true",
                   help="print the reference results table (README.md's) and exit")
    p.add_argument("--gate", action="store_true",
                   help="only judge each run's accuracy against its model's reference data (the 'reference' gate, "
                        "or 'demo' for demo runs): PASS/FAIL with the tolerances used; exit 1 on FAIL")
    args = p.parse_args(argv)
    if args.reference_table:
        print(reference_table(), end="")
        return 0
    if not args.runs:
        p.error("name at least one results.json or run folder")
    if args.gate:
        return gate.main(args.runs)
    try:
        runs = [load_results(path) for path in args.runs]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = args.out or Path(runs[0]["_path"]).parent / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(runs, all_references=args.all_references) + gate_section(runs) + pictures_section(runs, out_dir)
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    pngs = plot(runs, out_dir)
    print(text)
    print(f"report: {out_dir / 'report.md'}")
    for png in pngs:
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
