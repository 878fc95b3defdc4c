"""tools/gpu_check without a GPU: argument parsing, the one-line "no CUDA" exit, the JSON summary's shape and the
training-step check's reading of a run (the GPU parts themselves run only on a GPU machine, never here)."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bevkit import REPO_ROOT, gpu_check

KEYS = {"name", "phase", "pass", "max_error", "tolerance", "seconds", "detail"}


def test_arguments():
    args = gpu_check.parse_args([])
    assert args.phases == list(gpu_check.PHASES) and args.models == ["fbocc", "bevdepth"] and args.steps is None
    args = gpu_check.parse_args(["--phases", "ops,models", "--models", "bevdepth", "--steps", "3"])
    assert args.phases == ["ops", "models"] and args.models == ["bevdepth"] and args.steps == 3
    for bad in (["--phases", "bench"], ["--models", "bevformer"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.parse_args(bad)
        assert exc.value.code == gpu_check.EXIT_USAGE


def test_no_cuda_is_one_line_and_its_own_exit_code():
    proc = subprocess.run([str(REPO_ROOT / "tools" / "gpu_check")], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "BEVKIT_PYTHON": sys.executable})
    assert proc.returncode == gpu_check.EXIT_NO_CUDA == 3
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert "no CUDA GPU" in proc.stderr and "setup.sh --profile cuda" in proc.stderr


def test_summary_shape_and_exit_codes(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_check, "cuda_status", lambda: (True, "Fake GPU"))
    monkeypatch.setattr(gpu_check, "build_phase", lambda d: [gpu_check.check("build FB-BEV", "build", True, 1.0)])
    monkeypatch.setattr(gpu_check, "ops_phase", lambda d: [
        gpu_check.check("bev_pool_v2", "ops", True, 0.5, 1e-6, 1e-4, "vs portable 1e-06")])
    seen = []
    monkeypatch.setattr(gpu_check, "model_phase", lambda m, steps, work, data: seen.append((m, steps, work)) or
                        gpu_check.check(f"train {m}", "models", m == "fbocc", 2.0, detail="x"))
    rc = gpu_check.main(["--work-dir", str(tmp_path), "--steps", "2"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == gpu_check.EXIT_FAILED and doc["passed"] is False  # bevdepth's step check failed
    assert {"passed", "seconds", "gpu", "torch", "cuda", "checks"} <= set(doc) and doc["gpu"] == "Fake GPU"
    assert [c["phase"] for c in doc["checks"]] == ["build", "ops", "models", "models"]
    assert all(set(c) == KEYS for c in doc["checks"])
    assert [(m, s) for m, s, _ in seen] == [("fbocc", 2), ("bevdepth", 2)] and seen[0][2] == tmp_path
    rc = gpu_check.main(["--phases", "build,ops"])
    assert rc == gpu_check.EXIT_OK and json.loads(capsys.readouterr().out)["passed"] is True


def _fake_launch(tmp_path, log_text, exit_code=0, losses=(3.0, 2.5)):
    calls = []

    def launch(argv, env):
        calls.append(argv)
        run_dir = tmp_path / "run"
        run_dir.mkdir(exist_ok=True)
        (run_dir / "train.log").write_text(log_text)
        (run_dir / "results.json").write_text(json.dumps(dict(exit_code=exit_code, steps=4, loss_first=losses[0],
                                                              loss_last=losses[1], step_time_median_s=0.2)))
        return types.SimpleNamespace(returncode=exit_code, stdout=f"... \nresults: {run_dir / 'results.json'}\n",
                                     stderr="")

    return launch, calls


def test_model_check_reads_the_run(tmp_path):
    launch, calls = _fake_launch(tmp_path, "(ABOVE_NORMAL) Fp16OptimizerHook\n")
    res = gpu_check.model_phase("fbocc", 4, tmp_path / "w", None, launch=launch)
    assert res["pass"] and res["phase"] == "models" and "loss 3.0 -> 2.5" in res["detail"]
    argv = calls[0]
    assert argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--max-steps") + 1] == "4"
    cfg = Path(argv[argv.index("--config") + 1]).read_text()
    assert "fp16 = dict(loss_scale='dynamic')" in cfg and "max_norm=5" in cfg and "fbocc_tiny_smoke.py" in cfg
    launch, _ = _fake_launch(tmp_path, "no amp banner here\n")
    res = gpu_check.model_phase("bevdepth", None, tmp_path / "w", None, launch=launch)
    assert not res["pass"] and "16bit" in res["detail"]
    launch, _ = _fake_launch(tmp_path, "Using 16bit native Automatic Mixed Precision (AMP)\n", exit_code=1,
                             losses=(3.0, float("nan")))
    assert not gpu_check.model_phase("bevdepth", None, tmp_path / "w", None, launch=launch)["pass"]
