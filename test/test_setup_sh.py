"""setup.sh: help, argument errors, profile detection and per-profile plans (dry runs), and, when the
running venv was made by setup.sh, that a second run is a quick no-op."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "setup.sh"


def run(*args, env=None, path_prepend=None, timeout=120):
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("BEVKIT_", "ASCEND_")) and k not in ("FBBEV_SRC", "BEVDEPTH_SRC")}
    e.update(env or {})
    if path_prepend:
        e["PATH"] = f"{path_prepend}{os.pathsep}{e['PATH']}"
    return subprocess.run(["bash", str(SETUP), *args], cwd=str(REPO), env=e, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


def test_help_documents_every_option():
    proc = run("--help")
    assert proc.returncode == 0
    parsed = set(re.findall(r"^\s+(--[a-z-]+)\)", SETUP.read_text(), re.M))
    parsed |= {o for alt in re.findall(r"^\s+(-h\|--help)\)", SETUP.read_text(), re.M) for o in alt.split("|")}
    assert len(parsed) > 10
    for option in parsed:
        assert re.search(rf"^\s+(?:-\w, )?{re.escape(option)}\b", proc.stdout, re.M), f"{option} missing from --help"
    for env in ("FBBEV_SRC", "BEVDEPTH_SRC", "BEVKIT_TORCH_INDEX"):
        assert env in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--profile", "tpu"], "unknown profile 'tpu'"),
    (["--models", "fbocc,yolo"], "unknown model 'yolo'"),
    (["--venv"], "option --venv needs a value"),
    (["--fbbev-src", "--no-upstream"], "option --fbbev-src needs a value"),
    (["--jobs", "0"], "--jobs must be a positive number"),
    (["--profile=cpu"], "write '--profile cpu'"),
    (["--python", "no-such-python3"], "not found"),
])
def test_argument_errors_exit_2_with_a_message(args, message):
    proc = run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "--help" in proc.stderr
    assert proc.stdout == ""  # nothing was started


def _fake_tool(folder: Path, name: str) -> None:
    folder.mkdir(exist_ok=True)
    tool = folder / name
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)


def _plan(*args, **kw) -> str:
    proc = run("--dry-run", "--venv", "/nonexistent/venv", *args, **kw)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.hardware
def test_profile_detection(tmp_path):
    import shutil

    if shutil.which("nvidia-smi") or shutil.which("npu-smi"):
        pytest.skip("this machine has an accelerator tool on PATH")
    assert "profile cpu (detected)" in _plan()
    _fake_tool(tmp_path / "gpu", "nvidia-smi")
    assert "profile cuda (detected)" in _plan(path_prepend=tmp_path / "gpu")
    _fake_tool(tmp_path / "npu", "npu-smi")
    assert "profile npu (detected)" in _plan("--cann-env", "/dev/null", path_prepend=tmp_path / "npu")
    assert "profile cpu (chosen)" in _plan("--profile", "cpu", path_prepend=tmp_path / "gpu")
    assert "profile cuda (chosen)" in _plan(env={"BEVKIT_PROFILE": "cuda"})


def test_cpu_plan_never_installs_npu_packages_or_cuda_builds():
    plan = _plan("--profile", "cpu")
    assert "torch_npu" not in plan and "torch-npu" not in plan and "mx-driving" not in plan
    mmcv = next(line for line in plan.splitlines() if "mmcv:" in line)
    assert "MMCV_WITH_OPS=1" in mmcv and "--no-build-isolation" in mmcv and "FORCE_" not in mmcv
    assert "cpu-nodeps.txt" in plan and "--no-deps" in plan  # torchvision without a CUDA torch
    assert re.search(r"kit: would run: .*-e .* --no-build-isolation --no-deps", plan)


def test_npu_plan_picks_torch_npu_for_the_installed_cann(tmp_path):
    home = tmp_path / "ascend-toolkit" / "latest"
    (home / "aarch64-linux").mkdir(parents=True)
    (home / "aarch64-linux" / "ascend_toolkit_install.info").write_text("version=8.1.RC1\n")
    set_env = tmp_path / "ascend-toolkit" / "set_env.sh"
    set_env.write_text(f"export ASCEND_TOOLKIT_HOME={home}\nexport ASCEND_HOME_PATH={home}\n")
    plan = _plan("--profile", "npu", "--cann-env", str(set_env))
    assert f"cann: sourced {set_env}" in plan
    assert "torch-npu==2.1.0.post12" in plan  # CANN 8.1.RC1's build, not the default
    assert plan.index("torch-npu==") < plan.index("npu-accel.txt")  # mx_driving after torch_npu
    assert "FORCE_NPU=1" in plan
    assert "spconv" not in plan and "fbocc-npu" not in plan  # spconv is cpu/cuda only


def test_npu_without_cann_fails_with_the_fix(tmp_path):
    proc = run("--profile", "npu", "--venv", str(tmp_path / "v"))
    assert proc.returncode == 1 and "--cann-env" in proc.stderr
    assert not (tmp_path / "v").exists()


def test_emulated_npu_plan_installs_the_npu_pins_and_fakes_never_torch_npu():
    plan = _plan("--emulate", "--models", "bevdepth", "--no-upstream")
    assert "profile npu (emulated)" in plan
    emulate = next(line for line in plan.splitlines() if "emulate:" in line)
    assert "never installed" in emulate and "torch_npu" in emulate and str(REPO / "test" / "fakes") in emulate
    assert "cann:" not in plan  # no CANN needed
    assert "torch-npu==" not in plan and "npu-accel.txt" not in plan  # neither torch_npu nor mx_driving
    assert re.search(r"torch: would run: .*-r \S*/npu\.txt", plan)  # the npu profile's own pins
    fakes = next(line for line in plan.splitlines() if "npu-fakes:" in line)
    assert "bevkit-npu-fakes.pth" in fakes and "torch_npu with BEVKIT_EMULATE_DEVICE=npu" in fakes
    mmcv = next(line for line in plan.splitlines() if "mmcv:" in line)
    assert "MMCV_WITH_OPS=1" in mmcv and "FORCE_NPU" not in mmcv  # CPU ops: FORCE_NPU needs CANN
    assert "profile npu (emulated)" in _plan(env={"BEVKIT_EMULATE": "1"})


def _venv_with_stamps(folder: Path, *stamps: str) -> Path:
    """A venv folder setup.sh would reuse, stamped as a venv it made. Its python answers queries but refuses pip,
    so nothing is ever installed anywhere, whatever setup.sh does with it."""
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(f'#!/bin/sh\ncase "$*" in *pip*) echo "test venv: no pip" >&2; exit 99;; esac\n'
                      f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (folder / ".bevkit-stamps").mkdir()
    (folder / ".bevkit-stamps" / "profile").write_text("npu\n")
    for name in stamps:
        (folder / ".bevkit-stamps" / name).write_text("x")
    return folder


def test_emulated_and_real_npu_venvs_are_never_turned_into_each_other(tmp_path):
    set_env = tmp_path / "set_env.sh"
    set_env.write_text("export ASCEND_HOME_PATH=/nonexistent\n")
    emulated = _venv_with_stamps(tmp_path / "emulated", "emulate")
    proc = run("--profile", "npu", "--cann-env", str(set_env), "--venv", str(emulated), "--no-upstream")
    assert proc.returncode == 1 and "was set up with --emulate" in proc.stderr and "add --emulate" in proc.stderr
    real = _venv_with_stamps(tmp_path / "real", "torch-npu")
    proc = run("--emulate", "--venv", str(real), "--no-upstream")
    assert proc.returncode == 1 and "set up for a real npu" in proc.stderr
    assert not (real / ".bevkit-stamps" / "emulate").exists()
    assert sorted(p.name for p in (emulated / ".bevkit-stamps").iterdir()) == ["emulate", "profile"]


@pytest.mark.parametrize("args, env, message", [
    (["--emulate", "--profile", "cpu"], {}, "--emulate stands in for the npu profile"),
    ([], {"BEVKIT_EMULATE": "yes"}, "BEVKIT_EMULATE must be 0 or 1"),
])
def test_emulate_argument_errors(args, env, message):
    proc = run(*args, env=env)
    assert proc.returncode == 2 and message in proc.stderr


def test_fakes_are_importable_only_in_an_emulated_venv():
    """setup.sh --emulate makes the fake mx_driving importable in its venv (a .pth file), and the fake torch_npu
    in processes with BEVKIT_EMULATE_DEVICE=npu only (it reports 8 NPUs); no other venv sees either."""

    def which(module: str, emulate: bool) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("BEVKIT_EMULATE_DEVICE", "PYTHONPATH")}
        if emulate:
            env["BEVKIT_EMULATE_DEVICE"] = "npu"
        code = f"import {module}; print('fake' if getattr({module}, 'FAKE', False) or " \
               f"{module}.__dict__.get('__version__') == '0.0.fake' else 'real')"
        proc = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
        if proc.returncode == 0:
            return proc.stdout.strip()
        assert f"No module named '{module}'" in proc.stderr, proc.stderr
        return "missing"

    seen = {(m, e): which(m, e) for m in ("torch_npu", "mx_driving") for e in (False, True)}
    if (Path(sys.prefix) / ".bevkit-stamps" / "emulate").is_file():
        assert seen == {("torch_npu", False): "missing", ("torch_npu", True): "fake",
                        ("mx_driving", False): "fake", ("mx_driving", True): "fake"}
    else:
        assert set(seen.values()) == {"missing"}


def test_cuda_plan_builds_mmcv_with_cuda():
    plan = _plan("--profile", "cuda")
    assert "FORCE_CUDA=1" in plan and "fbocc-cuda.txt" in plan and "torch-npu" not in plan


def test_models_and_no_upstream_limit_the_work():
    plan = _plan("--profile", "cpu", "--models", "bevdepth", "--no-upstream")
    assert "bevdepth-deps" in plan and "bevdepth-nodeps" in plan
    assert "fbocc" not in plan.replace("models bevdepth", "")
    assert "upstream: skipped (--no-upstream)" in plan and "materialize" not in plan
    plan = _plan("--profile", "cpu", "--models", "fbocc", "--upstream-dir", "/somewhere/up")
    assert "upstream FB-BEV: would materialize into /somewhere/up/FB-BEV" in plan and "BEVDepth" not in plan


def _stamped_venv() -> Path:
    venv = Path(sys.prefix)
    if not (venv / ".bevkit-stamps" / "kit").is_file():
        pytest.skip(f"the running venv {venv} was not made by setup.sh")
    return venv


def test_second_run_is_a_quick_no_op():
    venv = _stamped_venv()
    profile = (venv / ".bevkit-stamps" / "profile").read_text().strip()
    emulate = ("--emulate",) if (venv / ".bevkit-stamps" / "emulate").is_file() else ()
    args = ("--profile", profile, *emulate, "--venv", str(venv), "--no-upstream")
    # The first run brings the venv up to date (pins may have changed since it was made); the second must not act.
    first = run(*args, timeout=1800)
    assert first.returncode == 0, first.stdout + first.stderr
    t0 = time.time()
    proc = run(*args, timeout=300)
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [line for line in proc.stdout.splitlines() if re.match(r"\[setup +\d+s\] [\w-]+: ", line)]
    ran = [line for line in steps if ": done (" in line]
    assert not ran, f"a second run re-ran steps: {ran}"
    assert sum("up to date" in line for line in steps) >= 6
    assert elapsed < 60
    assert proc.stdout.rstrip().splitlines()[-1].startswith("Next: ")


@pytest.mark.upstream
def test_setup_materializes_both_upstreams_from_local_sources(tmp_path):
    venv = _stamped_venv()
    if not (os.environ.get("FBBEV_SRC") and os.environ.get("BEVDEPTH_SRC")):
        pytest.skip("needs FBBEV_SRC and BEVDEPTH_SRC (a clone, bare git dir or tarball of each upstream)")
    profile = (venv / ".bevkit-stamps" / "profile").read_text().strip()
    emulate = ("--emulate",) if (venv / ".bevkit-stamps" / "emulate").is_file() else ()
    args = ("--profile", profile, *emulate, "--venv", str(venv), "--upstream-dir", str(tmp_path),
            "--fbbev-src", os.environ["FBBEV_SRC"], "--bevdepth-src", os.environ["BEVDEPTH_SRC"])
    proc = run(*args, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from bevkit import upstream

    for name in ("FB-BEV", "BEVDepth"):
        st = upstream.status(name, tmp_path / name)
        assert st.ok and st.state == "patched", st.problems
    proc = run(*args, timeout=600)  # again: recognised, nothing re-applied or re-cloned
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cloned" not in proc.stdout and "upstream FB-BEV: applied" not in proc.stdout
    assert "upstream FB-BEV: no kit patches" in proc.stdout or "upstream FB-BEV: 1 patch(es) already applied" in proc.stdout
