"""Statistics, results.json and the Ascend ModelZoo summary from a synthetic sequence of step records."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from bevkit import results as res


def synthetic(n=30, warm=(5.0, 3.0, 2.0), steady=1.5, batch=32):
    """Slow first steps, then a steady 1.5 s with a +-0.1 s wobble and one 4 s (checkpoint) step."""
    records = []
    for i in range(1, n + 1):
        t = warm[i - 1] if i <= len(warm) else steady + (0.1 if i % 2 else -0.1)
        if i == 20:
            t = 4.0
        records.append({"step": i, "time_s": t, "loss": 10.0 / i, "lr": 2e-4, "samples": batch})
    return records


def test_warmup_is_excluded_and_fps_is_global_batch_over_mean_step_time():
    records = synthetic()
    stats = res.summarize_steps(records)
    assert stats["warmup_steps"] == 3  # ceil(10% of 30)
    steady = [r["time_s"] for r in records[3:]]
    assert stats["timed_steps"] == 27
    assert stats["step_time_mean_s"] == pytest.approx(statistics.mean(steady))
    assert stats["step_time_median_s"] == pytest.approx(statistics.median(steady))
    assert stats["step_time_max_s"] == 4.0 and stats["step_time_min_s"] == pytest.approx(1.4)
    assert stats["fps"] == pytest.approx(32 / statistics.mean(steady))
    assert stats["fps_median"] == pytest.approx(32 / statistics.median(steady))
    assert stats["global_batch"] == 32
    assert stats["loss_first"] == 10.0 and stats["loss_last"] == pytest.approx(10.0 / 30)
    # an explicit warm-up wins; the warm-up steps (5 s, 3 s, 2 s) would raise the mean if counted
    assert res.summarize_steps(records, warmup=0)["step_time_mean_s"] > stats["step_time_mean_s"]
    assert res.summarize_steps(records, warmup=10)["warmup_steps"] == 10


def test_warmup_rule_edges_and_batch_without_samples():
    assert [res.default_warmup(n) for n in (0, 1, 2, 9, 10, 11, 600)] == [0, 0, 1, 1, 1, 2, 60]
    empty = res.summarize_steps([], global_batch=64)
    assert empty["steps"] == 0 and empty["fps"] is None and empty["step_time_mean_s"] is None
    one = res.summarize_steps([{"step": 1, "time_s": 2.0, "loss": 1.0}], global_batch=64)
    assert one["warmup_steps"] == 0 and one["fps"] == 32.0  # the launcher's batch when records lack it
    with pytest.raises(ValueError):
        res.summarize_steps(synthetic(), warmup=-1)


def _results(tmp_path, **kw):
    args = dict(records=synthetic(), metrics={"miou": 39.8512, "per_class_iou": {"car": 0.5}}, model="fbocc",
                display_name="FBOCC", mode="performance", device="npu", nproc_per_node=8, nnodes=1,
                batch_per_device=4, exit_code=0, e2e_duration_s=1234.4,
                versions={"python": "3.8.18", "torch": "2.1.0", "cann": "8.3.RC1"},
                upstream={"name": "FB-BEV", "commit": "6e25469"})
    args.update(kw)
    return res.build_results(**args)


def test_results_json_and_ascend_summary_are_derived_from_the_same_numbers(tmp_path):
    results = _results(tmp_path)
    for key in ("model", "mode", "device", "world_size", "nodes", "global_batch", "steps", "warmup_steps",
                "step_time_median_s", "step_time_mean_s", "fps", "loss_first", "loss_last", "metrics",
                "versions", "upstream", "kit_version", "exit_code", "e2e_duration_s"):
        assert key in results, key
    assert results["world_size"] == 8 and results["global_batch"] == 32 and results["status"] == "ok"
    assert len(results["per_step"]["time_s"]) == 30
    path, log_path, printed = res.write_results(tmp_path, results)
    loaded = json.loads(path.read_text())
    assert loaded["fps"] == pytest.approx(results["fps"]) and loaded["files"]["ascend_log"] == log_path.name
    assert log_path.name == "FBOCC_bs4_8p_perf.log"
    lines = log_path.read_text().splitlines()
    kv = dict(line.split(" = ", 1) for line in lines)
    assert kv["Network"] == "FBOCC" and kv["RankSize"] == "8" and kv["BatchSize"] == "4"
    assert kv["CaseName"] == "FBOCC_bs4_8p_perf"
    assert kv["FPS"] == f"{loaded['fps']:.3f}" and kv["ActualFPS"] == kv["FPS"]
    assert kv["TrainingTime"] == f"{loaded['step_time_mean_s'] * 1000:.2f}"
    assert kv["ActualLoss"] == f"{loaded['loss_last']:.4f}" and kv["mIoU"] == "39.8512"
    assert kv["E2ETrainingTime"] == "1234"
    assert printed[1] == f"Final Performance images/sec : {loaded['fps']:.3f}"
    assert "mIoU : 39.8512" in printed and printed[-1] == "E2E Training Duration sec : 1234"


def test_failed_and_eval_runs_still_produce_complete_results(tmp_path):
    failed = _results(tmp_path, records=[], metrics={}, exit_code=1, mode="full")
    assert failed["status"] == "failed" and failed["fps"] is None and failed["steps"] == 0
    _, log_path, printed = res.write_results(tmp_path, failed)
    assert "FPS = n/a" in log_path.read_text() and "ExitCode = 1" in log_path.read_text()
    assert printed[1] == "Final Performance images/sec : n/a"
    bev = _results(tmp_path, model="bevdepth", display_name="BEVDepth", batch_per_device=8, mode="eval",
                   records=[], metrics={"map": 0.325, "nds": 0.433, "mate": 0.6})
    name, lines, printed = res.ascend_summary(bev)
    assert name == "BEVDepth_bs8_8p_eval.log"
    # devkit fractions shown in % like the reference tables; TP errors in devkit units
    assert "mAP = 32.5000" in lines and "NDS = 43.3000" in lines and "mATE = 0.6000" in lines
    assert "mAP : 32.5000" in printed


def test_atomic_write_never_leaves_a_torn_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    res.atomic_write_json(target, {"fps": 1.0})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        res.atomic_write_json(target, {"fps": 2.0})
    assert json.loads(target.read_text()) == {"fps": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind
    with pytest.raises(ValueError):  # NaN is not JSON: refused, never written
        monkeypatch.undo()
        res.atomic_write_json(target, {"fps": float("nan")})
    assert json.loads(target.read_text()) == {"fps": 1.0}


def test_write_metrics_merges_on_rank_0_only(tmp_path, monkeypatch):
    monkeypatch.setenv("BEVKIT_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    res.write_metrics({"miou": 12.5, "per_class_iou": {"car": float("nan")}})
    res.write_metrics({"epoch": 2})
    assert res.read_metrics(tmp_path) == {"miou": 12.5, "per_class_iou": {"car": None}, "epoch": 2}
    monkeypatch.setenv("RANK", "3")
    assert res.write_metrics({"miou": 99.0}) is None
    assert res.read_metrics(tmp_path)["miou"] == 12.5
    monkeypatch.delenv("BEVKIT_RUN_DIR")
    monkeypatch.setenv("RANK", "0")
    assert res.write_metrics({"miou": 1.0}) is None  # outside a launcher run: nothing to write


def test_versions_are_read_without_importing_the_packages():
    code = ("import sys, json; from bevkit.provenance import collect_versions; v = collect_versions(); "
            "print(json.dumps([v, 'torch' in sys.modules, 'torch_npu' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    versions, torch_imported, npu_imported = json.loads(out.stdout)
    assert not torch_imported and not npu_imported
    assert versions["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    import torch

    # PyPI's CUDA wheels (torch 2.1.0 for cp38 on x86_64) label the build (+cu121) in torch.__version__ only, not
    # in the installed metadata read here; local builds (2.13.0+cpu) carry it in both.
    assert versions["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    for key in ("torch_npu", "mx_driving", "mmcv", "cann"):
        assert key in versions


def test_cann_version_from_install_info(tmp_path):
    (tmp_path / "ascend_toolkit_install.info").write_text("package_name=Ascend-cann-toolkit\nversion=8.3.RC1\n")
    from bevkit.provenance import cann_version

    assert cann_version({"ASCEND_TOOLKIT_HOME": str(tmp_path)}) == "8.3.RC1"


def test_per_step_arrays_are_written_compactly(tmp_path):
    records = [{"step": i, "time_s": 1.0, "loss": None if i == 5 else 1.0 / i, "samples": 8} for i in range(1, 2001)]
    results = _results(tmp_path, records=records)
    path, _, _ = res.write_results(tmp_path, results)
    text = path.read_text()
    assert len(text.splitlines()) < 200  # one line per array, not one per element
    loaded = json.loads(text)
    assert loaded["per_step"]["step"] == list(range(1, 2001)) and loaded["per_step"]["loss"][4] is None
    assert loaded["metrics"]["per_class_iou"] == {"car": 0.5} and loaded["steps"] == 2000


def test_results_are_typed_and_carry_their_schema(tmp_path):
    results = _results(tmp_path)
    assert isinstance(results, res.Results) and results.world_size == 8 and results.status == "ok"
    path, _, _ = res.write_results(tmp_path, results)
    loaded = res.load_results(path)
    assert loaded["schema"] == res.SCHEMA_VERSION and loaded == {**results.to_dict(), "_path": str(path),
                                                                  "files": loaded["files"]}
    newer = dict(loaded, schema=res.SCHEMA_VERSION + 1)
    res.atomic_write_json(tmp_path / "newer" / res.RESULTS_FILE, {k: v for k, v in newer.items() if k != "_path"})
    with pytest.raises(ValueError, match="schema"):
        res.load_results(tmp_path / "newer")
