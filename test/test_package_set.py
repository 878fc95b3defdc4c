"""The package set of each setup profile (bevkit.package_set) and the import blocker of the emulated device lanes:
derived from configs/requirements/ the way setup.sh installs them, so an unconditional import of a package that a
profile does not install fails a test."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from bevkit import REPO_ROOT, package_set
from bevkit.package_set import ProfileImportBlocker, profile_distributions, requirement_files

MODELS = ("fbocc", "bevdepth")
FAKES = REPO_ROOT / "test" / "fakes"
#: The cpu venv of .ci/run has spconv (fbocc-cpu.txt); the emulated npu venv of .ci/py38 does not (the npu profile
#: never installs it), so there the blocker has nothing to refuse and `import spconv` fails by itself.
SPCONV_INSTALLED = importlib.util.find_spec("spconv") is not None


@pytest.fixture
def installed_spconv(tmp_path, monkeypatch):
    """spconv and its dependency cumm as installed distributions: the real ones, or (in a venv without them)
    minimal ones in a site folder of this test, so the blocker's refusal is checked in every venv."""
    if SPCONV_INSTALLED:
        return
    site = tmp_path / "site-packages"
    for name, requires in (("spconv", "Requires-Dist: cumm>=0.4.9\n"), ("cumm", "")):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("")
        info = site / f"{name}-2.3.8.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 2.3.8\n{requires}")
        (info / "top_level.txt").write_text(name + "\n")
    monkeypatch.syspath_prepend(str(site))
    sites = package_set.site_dirs()
    monkeypatch.setattr(package_set, "site_dirs", lambda: [site] + sites)


@pytest.mark.parametrize("profile", ["npu", "cuda", "cpu"])
def test_requirement_files_are_the_ones_setup_sh_installs(profile, tmp_path):
    """The same files in the same order as `setup.sh --dry-run` (each `pip_install ... -r FILE` it would run)."""
    proc = subprocess.run(["bash", str(REPO_ROOT / "setup.sh"), "--dry-run", "--profile", profile, "--no-upstream",
                           "--venv", str(tmp_path / "venv")], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert "dry run: nothing was changed" in proc.stdout, proc.stdout + proc.stderr
    installed = []
    for line in proc.stdout.splitlines():
        if "would run: pip_install" in line:
            installed += [m for m in re.findall(r"-r (\S+)", line)]
    ours = requirement_files(profile, MODELS)
    assert [str(p) for p, _ in ours] == installed
    no_deps = {m for line in proc.stdout.splitlines() if "--no-deps" in line for m in re.findall(r"-r (\S+)", line)}
    assert {str(p) for p, deps in ours if not deps} == no_deps


def test_spconv_only_in_the_profiles_that_install_it(installed_spconv):
    npu, cpu = profile_distributions("npu", MODELS), profile_distributions("cpu", MODELS)
    cuda = profile_distributions("cuda", MODELS)
    assert "spconv" in cpu and "cumm" in cpu  # fbocc-cpu.txt, and its dependency from the installed metadata
    assert "spconv" not in npu and "cumm" not in npu and "torch-npu" in npu
    assert "spconv-cu126" in cuda and "spconv" not in cuda
    assert "spconv" in profile_distributions("cuda", MODELS, substitutes={"spconv-cu126": "spconv"})
    assert "pytorch-lightning" in npu and "lightning-utilities" in npu  # bevdepth.txt and a dependency of it


def test_the_blocker_refuses_what_the_profile_lacks(installed_spconv):
    npu = ProfileImportBlocker("npu", MODELS)
    reason = npu.why_refused("spconv")
    assert reason and "spconv" in reason and "npu profile" in reason and "fbocc.txt" in reason
    assert npu.why_refused("cumm")  # spconv's dependency
    for allowed in ("torch", "numpy", "mmcv", "mmdet3d", "pytorch_lightning", "nuscenes", "os", "json", "bevkit"):
        assert npu.why_refused(allowed) is None, allowed
    assert ProfileImportBlocker("cpu", MODELS).why_refused("spconv") is None


def test_a_package_dropped_from_a_requirement_file_is_refused(tmp_path):
    """The set follows the files: without nuscenes-devkit in common.txt its import fails on every profile."""
    folder = tmp_path / "requirements"
    shutil.copytree(REPO_ROOT / "configs" / "requirements", folder)
    common = folder / "common.txt"
    common.write_text("\n".join(l for l in common.read_text().splitlines() if not l.startswith("nuscenes-devkit")))
    blocker = ProfileImportBlocker("npu", MODELS, folder=folder)
    assert "nuscenes-devkit" in blocker.why_refused("nuscenes")
    assert ProfileImportBlocker("npu", MODELS).why_refused("nuscenes") is None


def _lane_python(device, code):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FAKES), str(REPO_ROOT)]))
    env.pop("BEVKIT_RUN_DIR", None)
    if device:
        env["BEVKIT_EMULATE_DEVICE"] = device
    else:
        env.pop("BEVKIT_EMULATE_DEVICE", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_lane_processes_start_with_the_profiles_package_set():
    """test/fakes/sitecustomize.py, on an emulated lane's PYTHONPATH: spconv is refused on the npu lane with one
    clear line, the npu fakes on the cuda lane; without an emulated device it does nothing."""
    npu = _lane_python("npu", "import spconv")
    assert npu.returncode != 0
    last = npu.stderr.strip().splitlines()[-1]
    if SPCONV_INSTALLED:  # installed, and refused by the blocker with the reason
        assert last.startswith("ModuleNotFoundError: No module named 'spconv' on the npu profile"), npu.stderr
        assert "distribution spconv" in last and "configs/requirements/" in last
    else:  # the emulated npu venv: not installed at all, as on the device
        assert last == "ModuleNotFoundError: No module named 'spconv'", npu.stderr
    cuda = _lane_python("cuda", "import torch_npu")
    assert cuda.returncode != 0 and "npu lane's fake" in cuda.stderr
    both = _lane_python("npu", "import torch_npu, mx_driving, spconv.pytorch; print(torch_npu.FAKE)")
    assert "No module named 'spconv'" in both.stderr  # the fakes import, spconv does not
    if SPCONV_INSTALLED:  # without an emulated device the blocker is not there
        plain = _lane_python(None, "import spconv.pytorch; print('ok')")
        assert plain.returncode == 0 and plain.stdout.strip() == "ok", plain.stderr
