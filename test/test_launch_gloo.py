"""A real 2-process gloo run on CPU through tools/launch (toy model, no upstream): results.json with
per-step times; a failing run still writes results.json and exits non-zero; earlier runs stay untouched."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bevkit import REPO_ROOT

TOY = str(REPO_ROOT / "test" / "assets" / "toy_spec.py") + ":SPEC"


def _launch(tmp_path, *options, extra=()):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEVKIT_")}
    env["BEVKIT_PYTHON"] = sys.executable
    return subprocess.run(
        [str(REPO_ROOT / "tools" / "launch"), "--spec", TOY, "--device", "cpu", "--nproc", "2",
         "--data-root", str(data), "--work-dir", str(tmp_path / "runs"), *options, "--", *extra],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)


def _snapshot(folder: Path) -> dict:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir())}


def test_two_process_gloo_run_then_a_failing_run(tmp_path):
    done = _launch(tmp_path, "--mode", "performance", "--max-steps", "12", extra=["--sleep", "0.005"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.rstrip().splitlines()[-1]
    assert last.startswith("results: ")
    results_path = Path(last[len("results: "):])
    run_dir = results_path.parent
    assert run_dir.parent == tmp_path / "runs"
    results = json.loads(results_path.read_text())
    for key in ("model", "mode", "device", "world_size", "nodes", "global_batch", "steps", "warmup_steps",
                "step_time_median_s", "step_time_mean_s", "fps", "loss_first", "loss_last", "metrics",
                "versions", "upstream", "kit_version", "exit_code", "e2e_duration_s"):
        assert key in results, key
    assert results["model"] == "toy" and results["mode"] == "performance" and results["device"] == "cpu"
    assert results["world_size"] == 2 and results["nodes"] == 1 and results["global_batch"] == 8
    assert results["steps"] == 12 and results["exit_code"] == 0  # stopped by BEVKIT_MAX_STEPS
    times = results["per_step"]["time_s"]
    assert len(times) == 12 and all(t > 0.004 for t in times)  # each step sleeps 5 ms
    steady = sorted(times[results["warmup_steps"]:])
    assert results["step_time_mean_s"] == pytest.approx(sum(steady) / len(steady))
    assert results["fps"] == pytest.approx(8 / results["step_time_mean_s"])
    assert results["loss_last"] < results["loss_first"]  # the toy regression learns
    assert results["metrics"]["mse_final"] == pytest.approx(results["loss_last"], rel=0.5)
    assert results["versions"]["torch"] and results["versions"]["python"]
    # the per-step file, the log and the Ascend-style summary are there
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == list(range(1, 13))
    log = (run_dir / "train.log").read_text()
    assert "rank 0: done after 12 steps" in log and "rank 1: done after 12 steps" in log
    summary = (run_dir / "Toy_bs4_2p_perf.log").read_text()
    assert "RankSize = 2" in summary and f"FPS = {results['fps']:.3f}" in summary
    assert f"Final Performance images/sec : {results['fps']:.3f}" in done.stdout
    assert "E2E Training Duration sec : " in done.stdout
    launch_record = json.loads((run_dir / "launch.json").read_text())
    assert launch_record["command"][1:3] == ["-m", "torch.distributed.run"]
    assert launch_record["env_set"]["BEVKIT_RUN_DIR"] == str(run_dir)

    before = _snapshot(run_dir)
    failed = _launch(tmp_path, "--mode", "smoke", extra=["--fail-at", "3"])
    assert failed.returncode != 0
    last = failed.stdout.rstrip().splitlines()[-1]
    assert last.startswith("results: ")
    failed_results = json.loads(Path(last[len("results: "):]).read_text())
    assert failed_results["exit_code"] == failed.returncode and failed_results["status"] == "failed"
    assert failed_results["steps"] == 2  # steps 1-2 recorded; the process died in step 3
    assert Path(last[len("results: "):]).parent != run_dir
    assert _snapshot(run_dir) == before  # the first run's files are untouched


def test_terminated_run_still_writes_results(tmp_path):
    """SIGTERM (a scheduler's kill) reaches the ranks through the launcher; results.json says failed."""
    import signal
    import time

    data = tmp_path / "data"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEVKIT_")}
    env["BEVKIT_PYTHON"] = sys.executable
    proc = subprocess.Popen(
        [str(REPO_ROOT / "tools" / "launch"), "--spec", TOY, "--mode", "smoke", "--device", "cpu", "--nproc", "2",
         "--data-root", str(data), "--work-dir", str(tmp_path / "runs"), "--", "--sleep", "0.1"],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    steps = []
    while time.monotonic() < deadline and len(steps) < 3:  # wait until training is under way
        time.sleep(0.2)
        steps = list((tmp_path / "runs").glob("*/steps.jsonl"))
        steps = steps[0].read_text().splitlines() if steps else []
    assert len(steps) >= 3, "the toy run did not start training in time"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    last = out.rstrip().splitlines()[-1]
    results = json.loads(Path(last[len("results: "):]).read_text())
    assert results["status"] == "failed" and results["exit_code"] == proc.returncode
    assert results["steps"] >= 3 and results["step_time_median_s"] > 0.09
