"""bevkit.doctor: the report on this (accelerator-less) machine, and each consistency rule on fakes."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from bevkit import doctor
from bevkit.doctor import NA, OK, PROBLEM, WARN


@pytest.mark.hardware
def test_doctor_on_this_machine_reports_cpu_only_and_fails_on_missing_upstream(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = doctor.main(["--profile", "cpu", "--upstream-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    acc = [line for line in out.splitlines() if line.startswith("accelerators")]
    assert acc and "usable: cpu (CPU only)" in acc[0] and "npu" not in acc[0] and "cuda" not in acc[0]
    assert "FB-BEV is not checked out" in out and "BEVDepth is not checked out" in out
    # one fix line per problem, naming how to get the checkout
    fixes = [line for line in out.splitlines() if line.startswith("- upstream FB-BEV:")]
    assert len(fixes) == 1 and "setup.sh" in fixes[0] and "FBBEV_SRC" in fixes[0]


def test_environment_only_check_has_no_upstream_rows(capsys):
    doctor.main(["--profile", "cpu", "--no-upstream"])
    assert "upstream" not in capsys.readouterr().out


def test_unknown_model_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        doctor.main(["--models", "fbocc,yolo"])
    assert exc.value.code == 2 and "yolo" in capsys.readouterr().err


def test_torch_npu_on_a_machine_without_npu_is_a_problem(monkeypatch):
    monkeypatch.setattr(doctor, "dist_version", lambda *names: "2.1.0.post17" if "torch-npu" in names else None)
    row = doctor.check_torch_npu("cpu", "2.13.0+cpu")
    assert row.status == PROBLEM and "pip uninstall -y torch_npu" in row.fix
    monkeypatch.setattr(doctor, "dist_version", lambda *names: None)
    assert doctor.check_torch_npu("cpu", "2.13.0+cpu").status == NA


def _fake_cann(tmp_path: Path, version: str) -> dict:
    home = tmp_path / "ascend-toolkit" / "latest"
    (home / "x86_64-linux").mkdir(parents=True)
    (home / "x86_64-linux" / "ascend_toolkit_install.info").write_text(
        f"package_name=Ascend-cann-toolkit\nversion={version}\ninnerversion=V100R001\n")
    return {"ASCEND_TOOLKIT_HOME": str(home)}


def test_cann_version_and_torch_npu_matrix(tmp_path):
    env = _fake_cann(tmp_path, "8.1.RC1")
    assert doctor.cann_version(doctor.cann_home(env)) == "8.1.RC1"
    assert doctor.torch_npu_for("8.1.RC1") == ("2.1.0.post12", "8.1.RC1")
    assert doctor.torch_npu_for("8.3.RC1") == ("2.1.0.post17", "8.3.RC1")
    pin, row = doctor.torch_npu_for(None)
    assert row is None and pin == doctor.npu_matrix()[0][1]
    assert doctor.check_cann("npu", env).status == OK
    missing = doctor.check_cann("npu", {})
    assert missing.status == PROBLEM and "set_env.sh" in missing.fix
    assert doctor.check_cann("cpu", {}).status == NA


def test_torch_npu_must_match_cann_and_torch(tmp_path, monkeypatch):
    env = _fake_cann(tmp_path, "8.3.RC1")
    monkeypatch.setattr(doctor, "dist_version", lambda *names: "2.1.0.post12" if "torch-npu" in names else None)
    row = doctor.check_torch_npu("npu", "2.1.0", env)
    assert row.status == PROBLEM and "CANN 8.3.RC1 needs torch_npu 2.1.0.post17" in row.detail
    assert "torch-npu==2.1.0.post17" in row.fix
    monkeypatch.setattr(doctor, "dist_version", lambda *names: "2.1.0.post17" if "torch-npu" in names else None)
    assert doctor.check_torch_npu("npu", "2.1.0", env).status == OK
    row = doctor.check_torch_npu("npu", "2.13.0", env)
    assert row.status == PROBLEM and "built for torch 2.1.0" in row.detail


def test_npu_profile_without_npu_is_a_problem():
    import torch

    row = doctor.check_accelerators("npu", torch)
    assert row.status == PROBLEM and "npu-smi" in row.fix
    assert doctor.check_accelerators("cpu", torch).status == OK


def test_pins_follow_the_requirement_files():
    assert doctor.pins("common.txt")["mmdet"] == "2.28.0"
    torch_pin = doctor.pins("cpu.txt")["torch"]
    assert torch_pin.startswith("2.13.0") and torch_pin.endswith("+cpu")
    # no PyPI mx-driving is documented with a PyPI torch_npu 2.1.0 build: npu-accel.txt pins none for that stack
    assert "mx-driving" not in doctor.pins("npu-accel.txt")


def test_npu_matrix_rows_follow_the_profile_torch():
    """npu-cann.tsv lists stacks for several torch versions; setup.sh and doctor pick among the npu profile's."""
    rows = doctor.npu_matrix()
    assert rows and all(npu.startswith("2.1.0.post") for _, npu in rows)  # npu.txt installs torch 2.1.0
    assert doctor.npu_matrix("2.7.1") == [("9.1.0", "2.7.1.post8")]
    assert doctor.torch_npu_for("9.1.0") == (rows[0][1], None)  # not a torch 2.1.0 CANN: the default, said so


def test_missing_data_validator_degrades_to_a_clear_problem(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bevkit.data.validate", None)  # import raises ImportError
    rows = doctor.check_data(["fbocc"], tmp_path)
    assert len(rows) == 1 and rows[0].status == PROBLEM and "validator is not available" in rows[0].detail


def test_data_problems_become_rows_with_their_fix(tmp_path, monkeypatch):
    problem = types.SimpleNamespace(path=tmp_path / "gts", message="missing", fix="run the Occ3D download")
    fake = types.ModuleType("bevkit.data.validate")
    fake.validate = lambda model, root, full=False: [problem] if model == "fbocc" else []
    monkeypatch.setitem(sys.modules, "bevkit.data.validate", fake)
    rows = doctor.check_data(["fbocc", "bevdepth"], tmp_path)
    assert [(r.name, r.status) for r in rows] == [("data fbocc", PROBLEM), ("data bevdepth", OK)]
    assert rows[0].fix == "run the Occ3D download" and "gts" in rows[0].detail


def test_render_lists_one_fix_per_problem():
    rows = [doctor.Check("a", OK, "fine"), doctor.Check("b", PROBLEM, "broken", "do x"),
            doctor.Check("c", PROBLEM, "also broken", "do y")]
    text = doctor.render(rows, "cpu")
    assert "2 problem(s); to fix:" in text and "- b: do x" in text and "- c: do y" in text
    assert "no problems found" in doctor.render(rows[:1], "cpu")


def test_default_models_follow_what_setup_sh_set_up(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert doctor.default_models() == "fbocc,bevdepth"  # no record: all
    (tmp_path / ".bevkit-stamps").mkdir()
    (tmp_path / ".bevkit-stamps" / "models").write_text("bevdepth\n")
    assert doctor.default_models() == "bevdepth"
