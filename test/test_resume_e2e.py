"""Resume end to end on CPU (issue 12), for both models: a training is killed with SIGKILL (to the launcher)
after it wrote a checkpoint; no trainer survives it; ``--resume`` continues it in a new run folder to the same
final step with the training state restored, and the earlier folder stays byte-identical (sha256 of every
file before and after the resume).

Cheap settings: one process, the tiny configs, 4 optimizer steps with a checkpoint after step 2 (FB-OCC:
``runner.max_iters=4 checkpoint_config.interval=2``; BEVDepth: 2 epochs of 2 batches). Each model: two
launches with 3 + 2 steps, about 2 minutes on 2 free cores (slow)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bevkit import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.upstream]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The FB-OCC smoke test's dataset (shared in a session), prepared for both models in a copy."""
    from bevkit.data.testing import dataset, hardlink_copy

    source = dataset(tmp_path_factory, image_size=(1600, 900), train_scenes=2, val_scenes=2, samples_per_scene=6)
    root = hardlink_copy(source, tmp_path_factory.mktemp("resume") / "nuscenes")
    for module, *options in (("bevkit.models.fbocc.prepare", "--no-checkpoints"), ("bevkit.models.bevdepth.prepare",)):
        subprocess.run([sys.executable, "-m", module, str(root), *options], check=True, capture_output=True,
                       timeout=1800, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    return root


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _steps(run: Path) -> list:
    path = run / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEVKIT_")}
    env.update(BEVKIT_PYTHON=sys.executable, **extra)
    return env


def _kill_after(command, env, work: Path, step: int, timeout=1800) -> Path:
    """Start a training, SIGKILL the launcher once ``step`` is recorded; returns the run folder (no process of
    the run may outlive the launcher)."""
    from test_launch_orphans import _alive, _descendants

    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree, run = set(), None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            tree |= _descendants(proc.pid)
            runs = [d for d in work.iterdir() if d.is_dir()] if work.is_dir() else []
            run = runs[0] if runs else None
            if run is not None and len(_steps(run)) >= step:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert run is not None and len(_steps(run)) >= step, "the training did not get that far in time"
        proc.kill()
        proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(tree), f"processes of the killed run still alive after 10 s: {sorted(_alive(tree))}"
    finally:
        for pid in _alive(tree):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    return run


def _resume_and_check(model, command, env, work: Path, first: Path, checkpoint_step: int, total: int):
    before = _tree(first)
    done = subprocess.run(command + ["--resume", str(first)], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    results_path = Path(done.stdout.strip().splitlines()[-1].split("results: ", 1)[1])
    second = results_path.parent
    assert second.parent == work and second != first
    assert _tree(first) == before, "the resumed run changed the earlier run's folder"
    results = json.loads(results_path.read_text())
    record = json.loads((second / "launch.json").read_text())
    assert results["status"] == "ok" and results["resumed_from"]["run_dir"] == str(first)
    assert record["resumed_from"]["run_dir"] == str(first)
    assert record["checkpoint_check"]["step"] == checkpoint_step and record["checkpoint_check"]["resumable"]
    old, new = _steps(first), _steps(second)
    assert new[0]["step"] == checkpoint_step + 1  # the count continues after the checkpoint
    joined = [s for s in old if s["step"] <= checkpoint_step] + new
    assert [s["step"] for s in joined] == list(range(1, total + 1))  # the same final step, no gap, no repeat
    assert all(math.isfinite(s["loss"]) for s in joined)
    redone = {s["step"]: s for s in old if s["step"] > checkpoint_step}
    for s in new:  # the scheduler continued: the same learning rate at the same step as before the kill
        if s["step"] in redone:
            assert s["lr"] == pytest.approx(redone[s["step"]]["lr"])
    return second


def _optimizer_steps(optimizer_state: dict) -> set:
    return {int(float(s["step"])) for s in optimizer_state["state"].values() if "step" in s}


def test_fbocc_resume_after_sigkill(fbbev_checkout, data_root, tmp_path):
    torch = pytest.importorskip("torch")
    work = tmp_path / "runs"
    command = [str(REPO_ROOT / "tools" / "launch"), "--model", "fbocc", "--mode", "full", "--device", "cpu",
               "--nproc", "1", "--data-root", str(data_root), "--work-dir", str(work), "--no-data-check"]
    env = _env(FBBEV_ROOT=str(fbbev_checkout), BEVKIT_UPSTREAM_DIR=str(fbbev_checkout.parent))
    first = _kill_after(command + ["--config", str(REPO_ROOT / "fbocc/configs/fbocc_tiny_smoke.py"), "--",
                                   "--cfg-options", "runner.max_iters=4", "checkpoint_config.interval=2"],
                        env, work, step=3)
    assert (first / "iter_2.pth").is_file() and not (first / "results.json").exists()
    second = _resume_and_check("fbocc", command, env, work, first, checkpoint_step=2, total=4)
    log = (second / "train.log").read_text()
    assert "resumed from" in log and "2 iterations done" in log and "bevkit: restored EMA, RNG state" in log
    ckpt = torch.load(second / "iter_4.pth", map_location="cpu", weights_only=True)
    kit = ckpt["meta"]["bevkit"]
    assert kit["completed_iters"] == 4 and kit["model"] == "fbocc"
    assert _optimizer_steps(ckpt["optimizer"]) == {4}  # AdamW counted all 4 steps: its state came back
    assert kit["ema"]["updates"] == 3  # EMA of iterations 1-3 (iteration 4's runs after the checkpoint hook)

    # The same (complete, FB-OCC) checkpoint evaluated with the R50 config: the key-by-key check in
    # tools/test.py refuses it before any batch (mmcv alone would load it with strict=False and evaluate).
    before = _tree(second)
    done = subprocess.run([str(REPO_ROOT / "fbocc/test/eval.sh"), str(second / "iter_4.pth"), "--config",
                           str(REPO_ROOT / "fbocc/configs/fbocc_r50_8p.py")] + command[5:],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {second / 'iter_4.pth'} does not fit the FB-OCC model of the config: keys ")
    assert "of another shape" in last and "--config" in last
    assert _tree(second) == before


def test_bevdepth_resume_after_sigkill(bevdepth_checkout, data_root, tmp_path):
    torch = pytest.importorskip("torch")
    work = tmp_path / "runs"
    command = [str(REPO_ROOT / "tools" / "launch"), "--model", "bevdepth", "--mode", "full", "--device", "cpu",
               "--nproc", "1", "--data-root", str(data_root), "--work-dir", str(work), "--no-data-check"]
    env = _env(BEVDEPTH_SRC=str(bevdepth_checkout), BEVKIT_UPSTREAM_DIR=str(bevdepth_checkout.parent),
               BEVKIT_PRETRAINED="none")
    first = _kill_after(command + ["--config", str(REPO_ROOT / "bevdepth/configs/bev_depth_tiny_smoke.py"), "--",
                                   "-b", "2", "--max_epochs", "2", "--limit_train_batches", "2"], env, work, step=3)
    old = list(first.rglob("*.ckpt"))
    assert [p.name for p in old] == ["epoch=0-step=2.ckpt"]
    second = _resume_and_check("bevdepth", command, env, work, first, checkpoint_step=2, total=4)
    assert old[0].is_file()  # Lightning used to delete it ("The dirpath has changed ...")
    ckpt = torch.load(next(second.rglob("*.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 1
    assert _optimizer_steps(ckpt["optimizer_states"][0]) == {4}
    assert ckpt["callbacks"]["BevkitResumeState"]["model"] == "bevdepth"
