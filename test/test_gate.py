"""Accuracy gates (tools/report --gate): fabricated results.json files against each model's reference data:
PASS, FAIL, a different recipe (a warning, never silent), missing metrics, the demo thresholds (also for an
evaluation of a checkpoint a demo trained), exit codes; and BEVDepth's per-class AP as the devkit computes it."""
from __future__ import annotations

import json
import subprocess

import pytest

from bevkit import REPO_ROOT, gate
from bevkit import results as res
from bevkit.registry import get_spec


def _results(tmp_path, name, model="fbocc", mode="full", metrics=None, nproc=8, batch=4, steps=80040, exit_code=0,
             **run):
    records = [{"step": i + 1, "time_s": 1.0, "loss": 1.0, "samples": nproc * batch} for i in range(steps)] \
        if mode != "eval" else []
    results = res.build_results(records=records, metrics=metrics or {}, model=model, display_name=model,
                                mode=mode, device="cuda", nproc_per_node=nproc, nnodes=1, batch_per_device=batch,
                                exit_code=exit_code, versions={"python": "3"}, extra=dict(run, run_dir=str(
                                    tmp_path / name)))
    path, _, _ = res.write_results(tmp_path / name, results)
    return path


def _verdict(path):
    return gate.evaluate(res.load_results(path))


def test_reference_gates_are_the_issue_numbers():
    fbocc, bevdepth = get_spec("fbocc").gates(), get_spec("bevdepth").gates()
    assert fbocc["reference"]["checks"] == [{"metric": "miou", "name": "mIoU", "target": 39.8, "tolerance": 0.5,
                                             "unit": "%"}]
    nds = bevdepth["reference"]["checks"][0]
    assert (nds["metric"], nds["scale"] * 0.433, nds["tolerance"]) == ("nds", pytest.approx(43.3), 0.5)
    assert {c["metric"]: c.get("min") for c in bevdepth["demo"]["checks"]} == {"nds": 0.30, "per_class_ap.car": 0.30}
    miou, classes = fbocc["demo"]["checks"]
    assert miou["min"] == 15.0 and (classes["above"], classes["at_least"]) == (20.0, 5)


def test_fbocc_reference_pass_and_fail(tmp_path):
    passed = _verdict(_results(tmp_path, "ok", metrics={"miou": 39.41}))
    assert passed.passed and passed.gate == "reference" and not passed.warnings
    assert "PASS mIoU 39.41%: within 0.5 of 39.80% (difference -0.39)" in passed.text()
    failed = _verdict(_results(tmp_path, "low", metrics={"miou": 39.2}))
    assert not failed.passed
    assert "FAIL mIoU 39.20%: outside 0.5 of 39.80% (difference -0.60)" in failed.text()
    assert failed.text().splitlines()[-1].startswith("FAIL: ")


def test_other_global_batch_or_schedule_is_a_warning_never_silent(tmp_path):
    # BEVDepth on 4 cards x 8: global batch 32, not the reference's 64; and a short schedule
    verdict = _verdict(_results(tmp_path, "half", model="bevdepth", nproc=4, batch=8, steps=500,
                                metrics={"nds": 0.4312, "map": 0.33}))
    assert verdict.passed  # compared anyway ...
    text = verdict.text()
    assert "PASS NDS 43.12%: within 0.5 of 43.30% (difference -0.18)" in text
    assert "WARNING global batch 32 (this run) is not the gate's 64" in text  # ... and said so
    assert "WARNING steps 500 (this run) is not the gate's 10536" in text


def test_missing_metrics_and_failed_runs_fail(tmp_path):
    perf = _verdict(_results(tmp_path, "perf", mode="performance", steps=600))
    assert not perf.passed and "mIoU: 'miou' missing from results.json metrics" in perf.text()
    crashed = _verdict(_results(tmp_path, "crash", metrics={"miou": 39.8}, exit_code=3))
    assert not crashed.passed and "FAIL the run did not succeed (status failed, exit 3)" in crashed.text()


def test_demo_flow_evaluation_uses_the_demo_gate_and_the_training_recipe(tmp_path):
    demo = get_spec("fbocc").gates()["demo"]
    train = _results(tmp_path, "train", mode="demo", nproc=2, batch=demo["global_batch"] // 2,
                     steps=demo["steps"], flow="demo")
    per_class = {"car": 45.0, "driveable_surface": 80.0, "sidewalk": 30.0, "terrain": 25.0, "manmade": 21.0,
                 "vegetation": 12.0, "bus": None}
    evaluation = _results(tmp_path, "eval", mode="eval", nproc=2, batch=1, flow="demo",
                          checkpoint=str(train.parent / "latest.pth"),
                          metrics={"miou": 17.3, "per_class_iou": per_class})
    verdict = _verdict(evaluation)
    assert verdict.gate == "demo" and verdict.passed and not verdict.warnings, verdict.text()
    assert "PASS mIoU 17.30% >= 15.00% (minimum)" in verdict.text()
    assert "PASS classes above 20% IoU (> 20.00%): 5 >= 5 needed (driveable_surface 80.00, car 45.00" in verdict.text()
    # one class fewer above 20%: FAIL; a checkpoint from a run with another batch: a warning
    other = _results(tmp_path, "train4", mode="demo", nproc=2, batch=2, steps=demo["steps"], flow="demo")
    evaluation = _results(tmp_path, "eval2", mode="eval", nproc=2, batch=1, checkpoint=str(other.parent / "x.pth"),
                          metrics={"miou": 17.3, "per_class_iou": dict(per_class, manmade=19.9)})
    verdict = _verdict(evaluation)
    assert verdict.gate == "demo" and not verdict.passed  # the demo was found from the checkpoint's training run
    assert "FAIL classes above 20% IoU (> 20.00%): 4 < 5 needed" in verdict.text()
    assert f"WARNING global batch 4 ({other}) is not the gate's {demo['global_batch']}" in verdict.text()


def test_bevdepth_demo_needs_nds_and_car_ap(tmp_path):
    metrics = {"nds": 0.34, "map": 0.2, "per_class_ap": {"car": 0.31, "pedestrian": 0.1}}
    demo = get_spec("bevdepth").gates()["demo"]
    ok = _verdict(_results(tmp_path, "d1", model="bevdepth", mode="demo", nproc=2, batch=demo["global_batch"] // 2,
                           steps=demo["steps"], metrics=metrics))
    assert ok.passed and "PASS NDS 0.34 >= 0.3 (minimum)" in ok.text() and "PASS car AP 0.31 >= 0.3" in ok.text()
    no_car = _verdict(_results(tmp_path, "d2", model="bevdepth", mode="demo", nproc=2, batch=2, steps=demo["steps"],
                               metrics={"nds": 0.34}))
    assert not no_car.passed and "car AP: 'per_class_ap.car' missing" in no_car.text()


def test_evaluation_of_an_unknown_checkpoint_warns(tmp_path):
    verdict = _verdict(_results(tmp_path, "ev", mode="eval", checkpoint=str(tmp_path / "downloaded.pth"),
                                metrics={"miou": 39.9}))
    assert verdict.passed and verdict.gate == "reference"
    assert "WARNING training recipe unknown (no results.json of a kit training run beside the checkpoint" in \
        verdict.text()


def test_tools_report_gate_exit_codes(tmp_path):
    good = _results(tmp_path, "good", metrics={"miou": 40.1})
    bad = _results(tmp_path, "bad", metrics={"miou": 20.0})
    tool = str(REPO_ROOT / "tools" / "report")
    out = subprocess.run([tool, "--gate", str(good.parent)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.rstrip().endswith(f"PASS: {good}"), out.stdout + out.stderr
    out = subprocess.run([tool, "--gate", str(good), str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "FAIL mIoU 20.00%" in out.stdout
    out = subprocess.run([tool, "--gate", str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no results.json" in out.stderr
    # the report itself carries the verdicts
    out = subprocess.run([tool, str(good), "--out", str(tmp_path / "rep")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "## Accuracy gate" in (tmp_path / "rep" / "report.md").read_text()


def test_bevdepth_per_class_ap_is_the_devkits():
    """per_class_ap from upstream's metrics detail (rounded '<class>_AP_dist_<d>' values) equals the nuScenes
    devkit's mean_dist_aps of the same APs."""
    config = pytest.importorskip("nuscenes.eval.detection.config")
    data_classes = pytest.importorskip("nuscenes.eval.detection.data_classes")
    from bevkit.models.bevdepth.results import per_class_ap

    cfg = config.config_factory("detection_cvpr_2019")
    metrics = data_classes.DetectionMetrics(cfg)
    for i, name in enumerate(cfg.class_names):
        for j, dist in enumerate(cfg.dist_ths):
            metrics.add_label_ap(name, dist, round(0.05 * i + 0.1 * j, 4))
    summary = json.loads(json.dumps(metrics.serialize()))
    detail = {f"img_bbox_NuScenes/{name}_AP_dist_{d}": v
              for name in cfg.class_names for d, v in summary["label_aps"][name].items()}
    detail["img_bbox_NuScenes/mAP"] = summary["mean_ap"]
    got = per_class_ap(detail)
    assert got == pytest.approx(summary["mean_dist_aps"])
    assert sum(got.values()) / len(got) == pytest.approx(summary["mean_ap"])
