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


def _spec(eval_checkpoint):
    return ModelSpec(name="toy", display_name="Toy", upstream="none", samples_per_device=1,
                     build_entry=lambda r: ["train.py"], configs={"smoke": "toy/smoke.py"},
                     smoke_prepare=("toy.prepare", "--fast"), smoke_eval_checkpoint=eval_checkpoint)


@pytest.fixture
def flow(monkeypatch, tmp_path):
    """Records what the flow does instead of doing it."""
    done = {"generated": [], "prepared": [], "launches": [], "prepare_rc": 0, "train_rc": 0}
    monkeypatch.setenv("BEVKIT_SMOKE_DATA", str(tmp_path / "synthetic"))
    monkeypatch.setattr("bevkit.data.synthetic.generate", lambda out: done["generated"].append(Path(out)))

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
