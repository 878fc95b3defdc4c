"""End to end on CPU: bevdepth/test/train_smoke.sh trains the tiny 2-key-frame variant with 2 gloo
processes on a synthetic dataset and evaluates it with nuscenes-devkit (minutes: marked slow).

Loss threshold: the mean loss of the last 20 % of steps must be below 85 % of the mean of the first 20 %
(measured on this 2-core machine with the default 180 steps: see bevdepth/README.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bevkit import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.upstream]
LOSS_RATIO = 0.85


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    pytest.importorskip("mmcv")
    root = tmp_path_factory.mktemp("bevdepth-smoke") / "nuscenes"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    subprocess.run([sys.executable, "-m", "bevkit.data.synthetic", "--out", str(root), "--quiet"],
                   check=True, env=env, timeout=1200)
    return root


def test_smoke_trains_and_evaluates(bevdepth_checkout, synthetic_root, tmp_path):
    # the interpreter running the tests trains too (tools/launch would take the repository's .venv)
    env = dict(os.environ, BEVDEPTH_SRC=str(bevdepth_checkout), BEVKIT_PYTHON=sys.executable)
    proc = subprocess.run([str(REPO_ROOT / "bevdepth/test/train_smoke.sh"), "--data-root", str(synthetic_root),
                           "--work-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    results_line = [line for line in out.splitlines() if line.startswith("results: ")]
    assert results_line, out[-3000:]
    results = json.loads(Path(results_line[-1].split(": ", 1)[1]).read_text())
    assert results["status"] == "ok" and results["world_size"] == 2 and results["device"] == "cpu"
    losses = results["per_step"]["loss"]
    assert len(losses) >= 100
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < LOSS_RATIO * first, f"loss did not drop enough: first {first:.3f}, last {last:.3f}"
    metrics = results["metrics"]
    for key in ("map", "nds", "mate", "mase", "maoe", "mave", "maae"):
        assert key in metrics, metrics
    assert 0.0 <= metrics["map"] <= 1.0 and 0.0 <= metrics["nds"] <= 1.0
    assert set(metrics["per_class_ap"]) >= {"car", "pedestrian"}  # what the demo gate reads
    # the evaluation left pictures of its predictions: boxes from above, in the cameras, the front camera's depth
    run_dir = Path(results_line[-1].split(": ", 1)[1]).parent
    pngs = sorted(p.name for p in (run_dir / "pictures").glob("*.png"))
    assert len(pngs) == 6 and {p.split("_", 1)[1] for p in pngs} == {"boxes_bev.png", "boxes_cameras.png",
                                                                      "depth.png"}, pngs
    assert (synthetic_root / "depth_gt").is_dir()  # the script prepared the precomputed depth


#: The demo's learning on a shortened schedule: the demo experiment, through the demo command, on the smoke data
#: above (60 train samples) for DEMO_SHORT_EPOCHS epochs (60 steps) instead of 20 epochs of the 120 demo samples.
DEMO_SHORT_EPOCHS = 4
DEMO_NDS_FLOOR = 0.15
DEMO_MAP_FLOOR = 0.05


def test_demo_learns_on_a_short_schedule(bevdepth_checkout, synthetic_root, tmp_path):
    """``bevdepth/test/train_demo.sh -- --max_epochs 4``: the metric rises clearly above an untrained model's.

    Measured on the synthetic val split (20 samples) with the demo experiment (96x288 images, 1/8 features),
    2 CPU processes, 2026-12-02: untrained (``--max_epochs 0``) NDS 0.030, mAP 0.0002 (every class AP 0); after
    4 epochs (60 steps) NDS 0.254, mAP 0.115 (barrier AP 0.33, traffic_cone 0.33, construction_vehicle 0.13).
    Floors: NDS 0.15 (5 x untrained) and mAP 0.05. Duration: 3.8 min for the 4 epochs and 1 min untrained, both
    sharing the 2 cores with an FB-OCC run; the data is the smoke test's (module fixture), generated once.
    The run's demo gate compares it with the full demo's schedule, so it warns and (short of the targets) fails:
    the test reads the metrics, not the verdict.
    """
    env = dict(os.environ, BEVDEPTH_SRC=str(bevdepth_checkout))
    proc = subprocess.run([str(REPO_ROOT / "bevdepth/test/train_demo.sh"), "--data-root", str(synthetic_root),
                           "--work-dir", str(tmp_path / "runs"), "--", "--max_epochs", str(DEMO_SHORT_EPOCHS)],
                          capture_output=True, text=True, env=env, timeout=3600)
    out = proc.stdout + proc.stderr
    results_line = [line for line in out.splitlines() if line.startswith("results: ")]
    assert results_line, out[-5000:]
    results = json.loads(Path(results_line[-1].split(": ", 1)[1]).read_text())
    assert results["status"] == "ok" and results["mode"] == "demo", results["status"]
    assert len(results["per_step"]["loss"]) == DEMO_SHORT_EPOCHS * 15  # 60 samples / global batch 4
    # the gate judged it: a verdict line, with the schedule warning; its exit status is the flow's
    assert proc.returncode in (0, 1) and ("WARNING" in out) and any(
        line.startswith(("PASS: ", "FAIL: ")) for line in out.splitlines()), out[-3000:]
    metrics = results["metrics"]
    assert metrics["nds"] > DEMO_NDS_FLOOR and metrics["map"] > DEMO_MAP_FLOOR, metrics
