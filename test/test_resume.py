"""--resume RUN_DIR|auto (issue 12): which run and checkpoint, what the new run inherits, the commands both
models get, and the RNG state a resumed run restores. Unit level (no training; see test_resume_e2e.py)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bevkit import launch
from bevkit.errors import ResumeError
from bevkit.launch import resume
from bevkit.models import get_spec

BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/home/user"}


def make_run(work: Path, name: str, model="fbocc", mode="full", status=None, files=(), **request) -> Path:
    run = work / name
    run.mkdir(parents=True)
    record = {"request": dict({"model": model, "mode": mode, "run_dir": str(run)}, **request)}
    (run / "launch.json").write_text(json.dumps(record))
    if status:
        (run / "results.json").write_text(json.dumps({"status": status}))
    for f in files:
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_bytes(b"x")
    return run


def test_an_explicit_run_and_its_newest_checkpoint(tmp_path):
    fbocc = get_spec("fbocc")
    run = make_run(tmp_path, "20260101T000000Z", files=("iter_4.pth", "iter_12.pth", "iter_12_ema.pth",
                                                        "latest.pth", "iter_8.pth"))
    found = resume.find(str(run), fbocc, "full", tmp_path)
    assert found.run_dir == run and found.checkpoint == run / "iter_12.pth"
    bevdepth = get_spec("bevdepth")
    ckpts = "lightning_logs/version_0/checkpoints"
    run = make_run(tmp_path, "20260101T000001Z", model="bevdepth",
                   files=(f"{ckpts}/epoch=0-step=9.ckpt", f"{ckpts}/epoch=1-step=18.ckpt"))
    assert resume.find(str(run), bevdepth, "full", tmp_path).checkpoint.name == "epoch=1-step=18.ckpt"


def test_a_run_killed_before_its_first_checkpoint_continues_from_the_one_it_resumed(tmp_path):
    fbocc = get_spec("fbocc")
    first = make_run(tmp_path, "20260101T000000Z", files=("iter_4.pth",))
    second = make_run(tmp_path, "20260101T000100Z")
    record = json.loads((second / "launch.json").read_text())
    record["resumed_from"] = {"run_dir": str(first), "checkpoint": str(first / "iter_4.pth")}
    (second / "launch.json").write_text(json.dumps(record))
    assert resume.find(str(second), fbocc, "full", tmp_path).checkpoint == first / "iter_4.pth"


@pytest.mark.parametrize("setup, message", [
    (lambda w: w / "nothing", "no such folder"),
    (lambda w: (w / "plain").mkdir() or w / "plain", "is not a run folder of the kit (no launch.json"),
    (lambda w: make_run(w, "a", model="bevdepth", files=("x.ckpt",)), "is a bevdepth run, not a fbocc one"),
    (lambda w: make_run(w, "b", mode="performance", files=("iter_1.pth",)), "resume it with --mode performance"),
    (lambda w: make_run(w, "c"), "wrote no checkpoint to continue from"),
])
def test_what_cannot_be_resumed_is_one_line(tmp_path, setup, message):
    with pytest.raises(ResumeError) as e:
        resume.find(str(setup(tmp_path)), get_spec("fbocc"), "full", tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 4


def test_auto_takes_the_newest_unfinished_run_with_a_checkpoint(tmp_path):
    fbocc = get_spec("fbocc")
    make_run(tmp_path, "20260101T000000Z", files=("iter_2.pth",))                     # unfinished, older
    wanted = make_run(tmp_path, "20260102T000000Z", status="failed", files=("iter_4.pth",))
    make_run(tmp_path, "20260103T000000Z", status="ok", files=("iter_12.pth",))       # finished
    make_run(tmp_path, "20260104T000000Z")                                            # no checkpoint
    make_run(tmp_path, "20260105T000000Z", mode="smoke", files=("iter_1.pth",))       # other mode
    make_run(tmp_path, "20260106T000000Z", model="bevdepth", files=("x.ckpt",))       # other model
    found = resume.find("auto", fbocc, "full", tmp_path)
    assert found.run_dir == wanted and found.checkpoint.name == "iter_4.pth"
    with pytest.raises(ResumeError, match="no unfinished fbocc performance run"):
        resume.find("auto", fbocc, "performance", tmp_path)


@pytest.fixture
def machine(tmp_path, monkeypatch):
    checkout = tmp_path / "upstream"
    checkout.mkdir()
    monkeypatch.setattr(launch, "upstream_checkout", lambda name: (checkout, [checkout]))
    monkeypatch.setattr(launch, "upstream_problems", lambda name: [])
    (tmp_path / "data").mkdir()
    return tmp_path


def _plan(tmp, model, *options, extra=()):
    args = launch.build_parser().parse_args(["--model", model, "--mode", "full", "--data-root", str(tmp / "data"),
                                             "--work-dir", str(tmp / "runs"), "--device", "cpu", "--nproc", "2",
                                             "--dry-run", *options])
    return launch.make_plan(args, list(extra), environ=dict(BASE_ENV), cores=4)


def test_resume_commands_and_what_the_new_run_inherits(machine):
    config = machine / "my_config.py"
    config.write_text("samples_per_gpu = 1\ndata = dict(samples_per_gpu=1)\n")
    run = make_run(machine / "runs", "20260101T000000Z", files=("iter_4.pth",), config=str(config),
                   max_steps=None, extra_args=["--cfg-options", "runner.max_iters=8"])
    plan = _plan(machine, "fbocc", "--resume", str(run))
    argv = plan.argv
    assert argv[argv.index("--resume-from") + 1] == str(run / "iter_4.pth")
    assert argv[argv.index("tools/train.py") + 1] == str(config)  # the earlier run's config
    assert "runner.max_iters=8" in argv                              # and its upstream arguments
    assert plan.env["BEVKIT_CHECKPOINT"] == str(run / "iter_4.pth")
    assert plan.resumed_from.run_dir == run and plan.checked_checkpoint == (run / "iter_4.pth", "resume")
    assert plan.request.run_dir.parent == machine / "runs" and plan.request.run_dir != run

    ckpt = "lightning_logs/version_0/checkpoints/epoch=0-step=2.ckpt"
    run = make_run(machine / "runs", "20260101T000001Z", model="bevdepth", files=(ckpt,),
                   extra_args=["-b", "2", "--max_epochs", "2"])
    argv = _plan(machine, "bevdepth", "--resume", "auto").argv
    assert argv[argv.index("--ckpt_path") + 1] == str(run / ckpt) and argv[-4:] == ["-b", "2", "--max_epochs", "2"]


def test_checkpoint_on_training_starts_from_the_weights(machine):
    weights = machine / "w.pth"
    weights.write_bytes(b"x")
    plan = _plan(machine, "fbocc", "--checkpoint", str(weights))
    assert f"load_from={weights}" in plan.argv and "--resume-from" not in plan.argv
    assert plan.checked_checkpoint == (weights, "init")
    argv = _plan(machine, "bevdepth", "--checkpoint", str(weights)).argv
    assert argv[argv.index("--load_weights") + 1] == str(weights) and "--ckpt_path" not in argv


def test_resume_refusals_in_the_plan(machine):
    weights = machine / "w.pth"
    weights.write_bytes(b"x")
    with pytest.raises(launch.LaunchError, match="pass one of them"):
        _plan(machine, "fbocc", "--resume", "auto", "--checkpoint", str(weights))
    with pytest.raises(ResumeError, match="no unfinished fbocc full run"):
        _plan(machine, "fbocc", "--resume", "auto")


def test_rng_state_round_trip_survives_weights_only(tmp_path):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    from bevkit import training_state
    from bevkit.device import RunDevice

    device = RunDevice("cpu")
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.normal()  # a cached gaussian in numpy's state
    torch.save({"rng": training_state.rng_state(device)}, tmp_path / "s.pth")
    expected = (random.random(), np.random.normal(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    training_state.set_rng_state(torch.load(tmp_path / "s.pth", weights_only=True)["rng"], device)
    assert (random.random(), np.random.normal(), torch.rand(3).tolist()) == expected
    emulated = RunDevice("npu", emulated=True)  # CPU memory: the CPU generator is the device's
    assert emulated.rng_state() is None
