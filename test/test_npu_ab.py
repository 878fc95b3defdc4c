"""tools/npu_ab (bevkit/launch/ab.py): one performance run per op-limit policy, summary and recommendation.

The runs are made by a stub runner here (it writes the results.json a launcher run would, from the environment the
A/B hands it): emulated NPU lanes through the launcher are not on main yet. The real launcher path was run by hand
on CPU with the toy spec (test/assets/toy_spec.py); the policy's way into results.json is checked below on the
launcher's own functions.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bevkit import op_limits
from bevkit.launch import ab
from bevkit.results import build_results, write_results


def _stub_runner(tmp_path, fps, loss, device="npu", exit_codes=None):
    """A launcher stand-in: records argv and environment, writes a results.json like a run of `policy`."""
    calls = []

    def run(argv, env):
        policy = env[op_limits.ENV]
        calls.append((list(argv), policy))
        work = Path(argv[argv.index("--work-dir") + 1])
        rc = (exit_codes or {}).get(policy, 0)
        steps = int(argv[argv.index("--max-steps") + 1])
        step_s = 32 / fps[policy]
        records = [{"step": i + 1, "time_s": step_s, "loss": loss[policy], "samples": 32} for i in range(steps)]
        results = build_results(records=records, metrics={}, model="fbocc", display_name="FBOCC",
                                mode="performance", device=device, nproc_per_node=8, nnodes=1, batch_per_device=4,
                                exit_code=rc, versions={}, npu_op_limits=op_limits.policy(env))
        write_results(work / "20250101T000000Z", results)
        return rc

    return run, calls


def test_two_runs_one_per_policy_and_the_port_recommendation(tmp_path, capsys):
    run, calls = _stub_runner(tmp_path, fps={"documented": 20.0, "port": 23.0}, loss={"documented": 10.0, "port": 10.1})
    rc = ab.main(["--model", "fbocc", "--steps", "50", "--work-dir", str(tmp_path), "--", "--device", "npu"],
                 runner=run, environ={})
    out = capsys.readouterr().out
    assert rc == 0
    assert [policy for _, policy in calls] == ["documented", "port"]
    argv = calls[0][0]
    assert argv[:4] == ["--mode", "performance", "--max-steps", "50"] and argv[-2:] == ["--device", "npu"]
    assert argv[argv.index("--work-dir") + 1] == str(tmp_path / "documented")
    assert calls[1][0][calls[1][0].index("--work-dir") + 1] == str(tmp_path / "port")
    doc_line = next(line for line in out.splitlines() if line.startswith("documented"))
    port_line = next(line for line in out.splitlines() if line.startswith("port "))
    assert "20.00" in doc_line and "1600.0" in doc_line and "10.0000" in doc_line and " 50 " in doc_line
    assert "23.00" in port_line and "10.1000" in port_line
    assert "recommendation: set BEVKIT_NPU_OP_LIMITS=port: +15.0% FPS" in out


@pytest.mark.parametrize("fps, loss, codes, expect", [
    ({"documented": 20.0, "port": 23.0}, {"documented": 10.0, "port": 12.0}, None, "differ by 20.0%"),
    ({"documented": 20.0, "port": 20.2}, {"documented": 10.0, "port": 10.0}, None, "+1.0% in FPS"),
    ({"documented": 20.0, "port": 23.0}, {"documented": 10.0, "port": float("nan")}, None, "port run did not"),
    ({"documented": 20.0, "port": 23.0}, {"documented": 10.0, "port": 10.0}, {"port": 1}, "port run did not"),
])
def test_documented_is_kept_unless_port_is_faster_and_trains_the_same(tmp_path, capsys, fps, loss, codes, expect):
    run, _ = _stub_runner(tmp_path, fps=fps, loss=loss, exit_codes=codes)
    rc = ab.main(["--model", "fbocc", "--work-dir", str(tmp_path)], runner=run, environ={})
    out = capsys.readouterr().out
    assert "recommendation: keep documented" in out and expect in out, out
    assert rc == (1 if codes else 0)


def test_runs_off_npu_recommend_nothing(tmp_path, capsys):
    run, _ = _stub_runner(tmp_path, fps={"documented": 20.0, "port": 25.0}, loss={"documented": 1.0, "port": 1.0},
                          device="cpu")
    assert ab.main(["--model", "fbocc", "--work-dir", str(tmp_path)], runner=run, environ={}) == 0
    assert "recommendation: none: the runs were on cpu" in capsys.readouterr().out


def test_a_run_that_did_not_use_its_policy_is_an_error(tmp_path):
    def run(argv, env):  # records the wrong policy: the A/B would compare nothing
        res = build_results(records=[], metrics={}, model="fbocc", display_name="FBOCC", mode="performance",
                            device="npu", nproc_per_node=1, nnodes=1, versions={}, npu_op_limits="documented")
        write_results(Path(argv[argv.index("--work-dir") + 1]) / "x", res)
        return 0

    with pytest.raises(RuntimeError, match="npu_op_limits='documented', not 'port'"):
        ab.main(["--model", "fbocc", "--work-dir", str(tmp_path)], runner=run, environ={})


def test_bad_arguments_are_one_clear_line(capsys):
    assert ab.main(["--steps", "5"], runner=None) == 2
    assert "--model is required" in capsys.readouterr().err
    assert ab.main(["--model", "fbocc", "--policies", "documented,fast"], runner=None) == 2
    assert "choose from documented, port" in capsys.readouterr().err
    assert ab.main(["--model", "fbocc", "--steps", "0"], runner=None) == 2


def test_results_json_records_the_policy(tmp_path):
    res = build_results(records=[], metrics={}, model="fbocc", display_name="FBOCC", mode="performance",
                        device="npu", nproc_per_node=1, nnodes=1, versions={}, npu_op_limits="port")
    path, _, _ = write_results(tmp_path, res)
    assert json.loads(path.read_text())["npu_op_limits"] == "port"


def test_launcher_notes_the_policy_on_npu_and_refuses_a_bad_one(tmp_path, monkeypatch):
    """The launcher's plan says the policy for NPU runs and refuses a value that is not one."""
    from bevkit import launch

    data = tmp_path / "data"
    data.mkdir()
    cann = tmp_path / "cann" / "set_env.sh"
    cann.parent.mkdir()
    cann.write_text("export ASCEND_TOOLKIT_HOME=/x\n")
    spec = launch.load_spec(None, str(Path(__file__).parent / "assets" / "toy_spec.py") + ":SPEC")
    base = dict(os.environ, BEVKIT_CANN_SET_ENV=str(cann))
    options = ["--mode", "performance", "--device", "npu", "--nproc", "1", "--data-root", str(data),
               "--work-dir", str(tmp_path / "runs"), "--master-port", "29700"]
    plan = launch.make_plan(launch.parse(options), environ=base, spec=spec)
    assert any(note.startswith("NPU op limits: documented") for note in plan.notes)
    plan = launch.make_plan(launch.parse(options), environ=dict(base, BEVKIT_NPU_OP_LIMITS="port"), spec=spec)
    assert any(note.startswith("NPU op limits: port") for note in plan.notes)
    with pytest.raises(launch.LaunchError, match="BEVKIT_NPU_OP_LIMITS='fastest'"):
        launch.make_plan(launch.parse(options), environ=dict(base, BEVKIT_NPU_OP_LIMITS="fastest"), spec=spec)
