"""The shared smoke flow (tools/launch --mode smoke): data, preparation, training, then evaluation."""
import subprocess
from pathlib import Path

import pytest

from bevkit import smoke
from bevkit.models import ModelSpec


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

    def launch_once(argv):
        done["launches"].append(list(argv))
        return (done["train_rc"] if len(done["launches"]) == 1 else 0), tmp_path / f"run{len(done['launches'])}"

    done["launch_once"] = launch_once
    return done


def test_generates_prepares_trains_then_evaluates(monkeypatch, flow, tmp_path):
    monkeypatch.setattr(smoke, "get_spec", lambda name: _spec("latest.pth"))
    rc = smoke.run(["--model", "toy", "--mode", "smoke", "--nproc", "2", "--", "x=1"], flow["launch_once"])
    data = tmp_path / "synthetic"
    assert rc == 0
    assert flow["generated"] == [data]
    assert flow["prepared"][0][-3:] == ["toy.prepare", str(data), "--fast"]
    train, evaluation = flow["launches"]
    assert train == ["--model", "toy", "--mode", "smoke", "--nproc", "2", "--data-root", str(data), "--", "x=1"]
    assert evaluation[-2:] == ["--", "x=1"]
    at = evaluation.index("--checkpoint")
    assert evaluation[at + 1] == str(tmp_path / "run1" / "latest.pth")
    assert evaluation[evaluation.index("--mode", 4) + 1] == "eval"  # the later --mode wins in argparse


def test_given_data_root_is_never_generated_and_self_evaluating_models_launch_once(monkeypatch, flow, tmp_path):
    monkeypatch.setattr(smoke, "get_spec", lambda name: _spec(None))
    rc = smoke.run(["--model", "toy", "--mode", "smoke", "--data-root", str(tmp_path / "mine")], flow["launch_once"])
    assert rc == 0 and flow["generated"] == [] and len(flow["launches"]) == 1


def test_failures_stop_the_flow(monkeypatch, flow, tmp_path):
    monkeypatch.setattr(smoke, "get_spec", lambda name: _spec("latest.pth"))
    flow["prepare_rc"] = 3
    assert smoke.run(["--model", "toy", "--mode", "smoke"], flow["launch_once"]) == 1
    assert flow["launches"] == []
    flow["prepare_rc"], flow["train_rc"] = 0, 7
    assert smoke.run(["--model", "toy", "--mode", "smoke"], flow["launch_once"]) == 7
    assert len(flow["launches"]) == 1  # no evaluation of a failed training


def test_dry_run_changes_nothing(monkeypatch, flow, tmp_path):
    monkeypatch.setattr(smoke, "get_spec", lambda name: _spec("latest.pth"))
    assert smoke.run(["--model", "toy", "--mode", "smoke", "--dry-run"], flow["launch_once"]) == 0
    assert flow["generated"] == [] and flow["prepared"] == []
    assert all("--dry-run" in argv for argv in flow["launches"]) and len(flow["launches"]) == 2


def test_launcher_dispatches_smoke_mode(monkeypatch):
    from bevkit import launch

    seen = []
    monkeypatch.setattr(smoke, "run", lambda argv, once: seen.append((list(argv), once)) or 0)
    assert launch.main(["--model", "fbocc", "--mode", "smoke", "--dry-run"]) == 0
    assert seen and seen[0][1] is launch.launch_once
