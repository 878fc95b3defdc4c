"""Bad inputs about checkpoints and resuming (issue 12, part A), table-driven through the real launcher
(``tools/launch`` and the model scripts): each case ends in one line ``error: ...`` that names the file, what
is wrong and the fix, with the documented exit code (README "Resume and checkpoints": 2 bad options, 3 a
checkpoint that cannot be used, 4 nothing to resume), creates no run folder and changes nothing the user had
(sha256 of every file of the involved folders before and after). A few seconds per case (the checkpoint check
imports torch). The other bad inputs of the issue are in test_bad_inputs.py."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import pytest

from bevkit import REPO_ROOT

torch = pytest.importorskip("torch")

from test_checkpoint_check import run_folder, write_bevdepth, write_fbocc  # noqa: E402

pytestmark = pytest.mark.upstream  # the launcher checks the upstream checkouts before the checkpoint


@dataclass
class World:
    tmp: Path
    data: Path
    work: Path

    def fbocc_run(self, name="20260101T000000Z", mode="full", ckpt=True) -> Path:
        run = run_folder(self.work / "fbocc" / mode / name)
        record = json.loads((run / "launch.json").read_text())
        record["request"].update(model="fbocc", mode=mode)
        (run / "launch.json").write_text(json.dumps(record))
        if ckpt:
            write_fbocc(run / "iter_2.pth")
        return run

    def bevdepth_run(self, name="20260101T000000Z") -> Tuple[Path, Path]:
        run = run_folder(self.work / "bevdepth" / "full" / name)
        record = json.loads((run / "launch.json").read_text())
        record["request"].update(model="bevdepth", mode="full")
        (run / "launch.json").write_text(json.dumps(record))
        folder = run / "lightning_logs" / "version_0" / "checkpoints"
        folder.mkdir(parents=True)
        return run, write_bevdepth(folder / "epoch=6-step=7.ckpt")


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def launch(*args: str) -> List[str]:
    return [str(REPO_ROOT / "tools" / "launch"), *args]


def script(model: str, ckpt: Path) -> List[str]:
    return [str(REPO_ROOT / model / "test" / "eval.sh"), str(ckpt)]


def fbocc_full(*args: str) -> List[str]:
    return launch("--model", "fbocc", "--mode", "full", *args)


# --- setups: world -> (argv, paths whose bytes must not change; the first one is the file the line names)
def bevdepth_ckpt_to_fbocc_eval(w):
    run, ckpt = w.bevdepth_run()
    return script("fbocc", ckpt), [ckpt, run]


def truncated_fbocc(w):
    ckpt = truncate(write_fbocc(w.tmp / "iter_12.pth"))
    return script("fbocc", ckpt), [ckpt]


def truncated_bevdepth(w):
    run, ckpt = w.bevdepth_run()
    return script("bevdepth", truncate(ckpt)), [ckpt, run]


def checkpoint_on_fbocc_training(w):
    run, ckpt = w.bevdepth_run()
    return fbocc_full("--checkpoint", str(ckpt)), [ckpt, run]


def untrusted(w):
    ckpt = write_bevdepth(w.tmp / "downloads" / "x.ckpt", hparams={"args": argparse.Namespace(lr=1)})
    return script("bevdepth", ckpt), [ckpt]


def resume_plain_folder(w):
    (w.tmp / "mine").mkdir()
    folder = write_fbocc(w.tmp / "mine" / "iter_2.pth").parent
    return fbocc_full("--resume", str(folder)), [folder]


def resume_other_model(w):
    run, _ = w.bevdepth_run()
    return fbocc_full("--resume", str(run)), [run]


def resume_other_mode(w):
    run = w.fbocc_run(mode="smoke")
    return fbocc_full("--resume", str(run)), [run]


def resume_without_checkpoint(w):
    run = w.fbocc_run(ckpt=False)
    return fbocc_full("--resume", str(run)), [run]


def resume_auto_all_finished(w):
    run = w.fbocc_run()
    (run / "results.json").write_text(json.dumps({"status": "ok"}))
    return fbocc_full("--resume", "auto"), [run]


def resume_truncated(w):
    run = w.fbocc_run()
    truncate(run / "iter_2.pth")
    return fbocc_full("--resume", str(run)), [run / "iter_2.pth", run]


def resume_and_checkpoint(w):
    run = w.fbocc_run()
    return fbocc_full("--resume", str(run), "--checkpoint", str(run / "iter_2.pth")), [run]


def resume_eval(w):
    run = w.fbocc_run()
    return launch("--model", "fbocc", "--mode", "eval", "--resume", str(run)), [run]


#: case -> (setup, exit code, pieces of the one line: what is wrong, which file ({file}), the fix)
CASES = {
    "bevdepth checkpoint given to fbocc eval": (bevdepth_ckpt_to_fbocc_eval, 3, [
        "fbocc eval: {file} is a BEVDepth Lightning checkpoint (epoch 6, step 7), not an FB-OCC one",
        "--model bevdepth", "pass an iter_N.pth"]),
    "truncated fbocc checkpoint": (truncated_fbocc, 3, [
        "{file}", "is not a readable checkpoint", "truncated", "copy it again"]),
    "truncated bevdepth checkpoint": (truncated_bevdepth, 3, [
        "{file}", "is not a readable checkpoint", "copy it again"]),
    "--checkpoint on fbocc training with another model's weights": (checkpoint_on_fbocc_training, 3, [
        "fbocc --checkpoint (starting weights): {file} is a BEVDepth Lightning checkpoint", "--model bevdepth"]),
    "checkpoint needing full unpickling outside the trusted places": (untrusted, 3, [
        "{file} holds ", "could run code", "move it there or pass --trust-checkpoint"]),
    "--resume of a folder that is not a run": (resume_plain_folder, 4, [
        "--resume {file} is not a run folder of the kit", "--resume auto"]),
    "--resume of another model's run": (resume_other_model, 4, [
        "--resume {file} is a bevdepth run, not a fbocc one", "--model bevdepth"]),
    "--resume of a run of another mode": (resume_other_mode, 4, [
        "--resume {file} is a smoke run", "--mode smoke"]),
    "--resume of a run that wrote no checkpoint": (resume_without_checkpoint, 4, [
        "--resume {file}: the run wrote no checkpoint", "start a new run"]),
    "--resume auto with nothing unfinished": (resume_auto_all_finished, 4, [
        "--resume auto: no unfinished fbocc full run with a checkpoint", "--resume RUN_DIR"]),
    "--resume of a run whose checkpoint is truncated": (resume_truncated, 3, [
        "{file}", "is not a readable checkpoint"]),
    "--resume together with --checkpoint": (resume_and_checkpoint, 2, [
        "--resume continues a run with its own checkpoint", "pass one of them"]),
    "--resume of an evaluation": (resume_eval, 2, ["--resume continues a training", "--checkpoint FILE"]),
}


def _sha(paths) -> dict:
    out = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


def _runs(work: Path) -> set:
    return {str(p) for p in work.rglob("launch.json")} if work.is_dir() else set()


@pytest.fixture
def world(tmp_path, fbbev_checkout, bevdepth_checkout, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "downloads").mkdir()
    if fbbev_checkout.parent != bevdepth_checkout.parent:
        pytest.skip("needs both upstream checkouts in one folder (setup.sh's upstream/)")
    return World(tmp_path, data, tmp_path / "runs")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_input(case, world, fbbev_checkout):
    setup, code, pieces = CASES[case]
    argv, protected = setup(world)
    before, runs = _sha(protected), _runs(world.work)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEVKIT_")}
    env.update(BEVKIT_PYTHON=sys.executable, BEVKIT_UPSTREAM_DIR=str(fbbev_checkout.parent))
    if argv[0].endswith("tools/launch"):
        argv += ["--work-dir", str(world.work / argv[argv.index("--model") + 1] / argv[argv.index("--mode") + 1])]
    done = subprocess.run(argv + ["--data-root", str(world.data), "--device", "cpu", "--nproc", "1",
                                  "--no-data-check"], env=env, cwd=str(world.tmp), capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == code, "\n".join(lines[-20:])
    assert len(lines) == 1 and lines[0].startswith("error: "), "\n".join(lines[-20:])
    for piece in pieces:
        assert piece.format(file=protected[0]) in lines[0], lines[0]
    assert _sha(protected) == before and _runs(world.work) == runs  # nothing changed, no run folder made


def test_trust_checkpoint_lets_a_trusted_file_through(world, fbbev_checkout):
    """The same file as the untrusted case passes the check with --trust-checkpoint (dry run: nothing starts)."""
    ckpt = write_bevdepth(world.tmp / "downloads" / "x.ckpt", hparams={"args": argparse.Namespace(lr=1)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEVKIT_")}
    env.update(BEVKIT_PYTHON=sys.executable, BEVKIT_UPSTREAM_DIR=str(fbbev_checkout.parent))
    done = subprocess.run([str(REPO_ROOT / "bevdepth/test/eval.sh"), str(ckpt), "--trust-checkpoint", "--dry-run",
                           "--data-root", str(world.data), "--device", "cpu", "--nproc", "1", "--no-data-check",
                           "--work-dir", str(world.work)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "WARNING" not in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "BEVKIT_TRUST_CHECKPOINT=1" in done.stdout and f"--ckpt_path {ckpt}" in done.stdout


def test_an_error_found_inside_the_run_ends_the_launch_with_its_line_and_code(tmp_path):
    """The key-by-key check runs inside the training processes (it needs the built model): the ranks stop with
    one 'error:' line (rank 0), which the launcher repeats last, exiting with the checkpoint exit code 3."""
    toy = str(REPO_ROOT / "test" / "assets" / "toy_spec.py") + ":SPEC"
    (tmp_path / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEVKIT_")}
    env["BEVKIT_PYTHON"] = sys.executable
    done = subprocess.run(launch("--spec", toy, "--mode", "performance", "--max-steps", "3", "--device", "cpu",
                                 "--nproc", "2", "--data-root", str(tmp_path / "data"), "--work-dir",
                                 str(tmp_path / "runs"), "--", "--bad-checkpoint"),
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "error: " in line]
    assert len(errors) == 2 and errors[0] == errors[1]  # rank 0's line (not one per rank), repeated last
    assert done.stderr.strip().splitlines()[-1] == "error: toy.pth does not fit the Toy model of the config: keys " \
        "1 missing (e.g. w); pass the config it was trained with (--config)"
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert results["exit_code"] == 3 and results["status"] == "failed"
