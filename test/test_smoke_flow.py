"""The shared smoke flow (tools/launch --mode smoke): data, preparation, training, then evaluation.

The evaluation is a second request built from the training request (same launcher options and upstream
arguments), not a rewritten command line."""
import subprocess
from pathlib import Path

import pytest

from bevkit import REPO_ROOT
from bevkit.launch import Request, smoke
from bevkit.models import ModelSpec


def _request(**options):
    return Request(**{"mode": "smoke", "model": "toy", **options})


def _spec(eval_checkpoint, demo_data=()):
    return ModelSpec(name="toy", display_name="Toy", upstream="none", samples_per_device=1,
                     build_entry=lambda r: ["train.py"], configs={"smoke": "toy/smoke.py", "demo": "toy/demo.py"},
                     smoke_prepare=("toy.prepare", "--fast"), smoke_eval_checkpoint=eval_checkpoint,
                     demo_data=demo_data)


@pytest.fixture
def flow(monkeypatch, tmp_path):
    """Records what the flow does instead of doing it."""
    done = {"generated": [], "prepared": [], "launches": [], "prepare_rc": 0, "train_rc": 0}
    monkeypatch.setenv("BEVKIT_SMOKE_DATA", str(tmp_path / "synthetic"))
    monkeypatch.setattr("bevkit.data.synthetic.generate", lambda out: done["generated"].append(Path(out)))
    monkeypatch.setattr("bevkit.data.synthetic.main", lambda argv: done["generated"].append(list(argv)) or 0)
    monkeypatch.delenv("BEVKIT_DEMO_DATA", raising=False)
    monkeypatch.setattr(smoke, "gate", lambda run_dir: done.setdefault("gated", []).append(run_dir) or 0)

    def call(command):
        done["prepared"].append(command)
        return done["prepare_rc"]

    monkeypatch.setattr(subprocess, "call", call)

    def launch_once(request):
        done["launches"].append(request)
        return (done["train_rc"] if len(done["launches"]) == 1 else 0), tmp_path / f"run{len(done['launches'])}"

    done["launch_once"] = launch_once
    return done


def test_generates_prepares_trains_then_evaluates(monkeypatch, flow, tmp_path):
    monkeypatch.setattr(smoke, "load_spec", lambda model, ref: _spec("latest.pth"))
    rc = smoke.run(_request(nproc=2, extra=("x=1",)), flow["launch_once"])
    data = tmp_path / "synthetic"
    assert rc == 0
    assert flow["generated"] == [data]
    assert flow["prepared"][0][-3:] == ["toy.prepare", str(data), "--fast"]
    train, evaluation = flow["launches"]
    assert (train.model, train.mode, train.nproc, train.data_root, train.extra) == ("toy", "smoke", 2, data, ("x=1",))
    assert evaluation.extra == ("x=1",) and evaluation.nproc == 2 and evaluation.data_root == data
    assert evaluation.checkpoint == tmp_path / "run1" / "latest.pth"
    assert evaluation.mode == "eval" and evaluation.config == REPO_ROOT / "toy/smoke.py"


def test_given_data_root_is_never_generated_and_self_evaluating_models_launch_once(monkeypatch, flow, tmp_path):
    monkeypatch.setattr(smoke, "load_spec", lambda model, ref: _spec(None))
    (tmp_path / "mine").mkdir()
    rc = smoke.run(_request(data_root=tmp_path / "mine"), flow["launch_once"])
    assert rc == 0 and flow["generated"] == [] and len(flow["launches"]) == 1


@pytest.mark.parametrize("make, message", [(lambda p: p.write_text("x"), "is a file, not a folder"),
                                           (lambda p: None, "does not exist")])
def test_a_given_data_root_that_is_no_folder_is_refused_before_preparation(monkeypatch, flow, tmp_path, make,
                                                                           message):
    from bevkit.launch.request import LaunchError

    monkeypatch.setattr(smoke, "load_spec", lambda model, ref: _spec("latest.pth"))
    make(tmp_path / "mine")
    with pytest.raises(LaunchError, match=message):
        smoke.run(_request(data_root=tmp_path / "mine"), flow["launch_once"])
    assert flow["prepared"] == [] and flow["launches"] == []


def test_failures_stop_the_flow(monkeypatch, flow, tmp_path):
    monkeypatch.setattr(smoke, "load_spec", lambda model, ref: _spec("latest.pth"))
    flow["prepare_rc"] = 3
    assert smoke.run(_request(), flow["launch_once"]) == 1
    assert flow["launches"] == []
    flow["prepare_rc"], flow["train_rc"] = 0, 7
    assert smoke.run(_request(), flow["launch_once"]) == 7
    assert len(flow["launches"]) == 1  # no evaluation of a failed training


def test_dry_run_changes_nothing(monkeypatch, flow, tmp_path):
    monkeypatch.setattr(smoke, "load_spec", lambda model, ref: _spec("latest.pth"))
    assert smoke.run(_request(dry_run=True), flow["launch_once"]) == 0
    assert flow["generated"] == [] and flow["prepared"] == []
    assert all(request.dry_run for request in flow["launches"]) and len(flow["launches"]) == 2


def test_launcher_dispatches_smoke_mode(monkeypatch):
    from bevkit import launch

    seen = []
    monkeypatch.setattr(smoke, "run", lambda request, once: seen.append((request, once)) or 0)
    assert launch.main(["--model", "fbocc", "--mode", "smoke", "--dry-run"]) == 0
    assert seen and seen[0][1] is launch.launch_once


def test_demo_generates_its_own_data_trains_the_demo_config_evaluates_then_gates(monkeypatch, flow, tmp_path):
    monkeypatch.setattr(smoke, "load_spec", lambda model, ref: _spec("latest.pth", demo_data=("--preset", "demo")))
    monkeypatch.setattr(smoke, "DEFAULT_DATA", tmp_path / "synthetic-nuscenes")
    assert smoke.run(Request(mode="demo", model="toy", nproc=2), flow["launch_once"]) == 0
    data = tmp_path / "synthetic-nuscenes-preset-demo"  # named after its options: never the smoke data
    assert flow["generated"] == [["--out", str(data), "--preset", "demo"]]
    assert flow["prepared"][0][-3:] == ["toy.prepare", str(data), "--fast"]
    train, evaluation = flow["launches"]
    assert (train.mode, train.flow, train.data_root, train.config) == ("demo", "demo", data, None)
    assert (evaluation.mode, evaluation.flow, evaluation.config) == ("eval", "demo", REPO_ROOT / "toy/demo.py")
    assert evaluation.checkpoint == tmp_path / "run1" / "latest.pth"
    assert flow["gated"] == [tmp_path / "run2"]  # the evaluation's results are judged


def test_demo_verdict_is_the_exit_status_and_smoke_is_never_gated(monkeypatch, flow, tmp_path):
    monkeypatch.setattr(smoke, "load_spec", lambda model, ref: _spec(None))
    monkeypatch.setattr(smoke, "gate", lambda run_dir: 1)
    (tmp_path / "d").mkdir()  # a given data root must be a folder (refused before the flow otherwise)
    assert smoke.run(Request(mode="demo", model="toy", data_root=tmp_path / "d"), flow["launch_once"]) == 1
    assert smoke.run(Request(mode="smoke", model="toy", data_root=tmp_path / "d"), flow["launch_once"]) == 0
    assert [r.flow for r in flow["launches"]] == ["demo", "smoke"]
    # BEVKIT_DEMO_DATA names the demo's data; without options the demo reuses the smoke data's folder
    assert smoke.default_data_root({"BEVKIT_DEMO_DATA": "/d"}, _spec(None), "demo") == Path("/d")
    assert smoke.default_data_root({}, _spec(None), "demo") == smoke.DEFAULT_DATA


def test_demo_dry_run_changes_nothing_and_judges_nothing(monkeypatch, flow, tmp_path):
    monkeypatch.setattr(smoke, "load_spec", lambda model, ref: _spec("latest.pth", demo_data=("--preset", "demo")))
    assert smoke.run(Request(mode="demo", model="toy", dry_run=True), flow["launch_once"]) == 0
    assert flow["generated"] == [] and flow["prepared"] == [] and "gated" not in flow
    assert len(flow["launches"]) == 2 and all(r.dry_run for r in flow["launches"])


def test_model_scripts_plan_the_demo(tmp_path):
    """fbocc/test/train_demo.sh and bevdepth/test/train_demo.sh: one launcher call each, the model's demo config,
    2 CPU processes; nothing is created on a dry run."""
    import os
    import sys

    from bevkit.registry import get_spec

    data = tmp_path / "data"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEVKIT_", "SLURM_"))}
    env["BEVKIT_PYTHON"] = sys.executable
    for model in ("fbocc", "bevdepth"):
        out = subprocess.run([str(REPO_ROOT / model / "test" / "train_demo.sh"), "--data-root", str(data),
                              "--work-dir", str(tmp_path / "runs"), "--dry-run", "--no-data-check"],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        config = str(REPO_ROOT / get_spec(model).configs["demo"])
        assert f"# {model} demo: 1 node(s) x 2 cpu process(es)" in out.stdout
        assert config in out.stdout and "--nproc_per_node=2" in out.stdout
        assert "would judge the results with the demo gate" in out.stderr + out.stdout
    assert not (tmp_path / "runs").exists()
def test_a_resumed_smoke_training_is_evaluated_as_a_new_checkpoint(monkeypatch, flow, tmp_path):
    """--resume belongs to the training launch only: the evaluation afterwards takes the new run's checkpoint."""
    monkeypatch.setattr(smoke, "load_spec", lambda model, ref: _spec("latest.pth"))
    assert smoke.run(_request(resume=str(tmp_path / "earlier")), flow["launch_once"]) == 0
    train, evaluation = flow["launches"]
    assert train.resume == str(tmp_path / "earlier") and evaluation.resume is None
    assert evaluation.checkpoint == tmp_path / "run1" / "latest.pth"


def test_the_evaluation_uses_the_config_the_flow_trained(monkeypatch, flow, tmp_path):
    """``--config MINE``: the flow's evaluation builds the model from MINE too (a different width would not load)."""
    monkeypatch.setattr(smoke, "load_spec", lambda model, ref: _spec("latest.pth"))
    mine = tmp_path / "mine.py"
    (tmp_path / "d").mkdir()
    assert smoke.run(Request(mode="demo", model="toy", data_root=tmp_path / "d", config=mine),
                     flow["launch_once"]) == 0
    train, evaluation = flow["launches"]
    assert train.config == evaluation.config == mine and evaluation.mode == "eval"
