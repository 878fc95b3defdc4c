""".ci/run and the CI skip policy of test/conftest.py: CI runs the README's test command, a skip outside the
tests marked ``hardware`` fails the run, and the skipped tests and the time per phase are printed."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_DIR = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

def test_passes():
    assert True

def test_needs_an_upstream():
    pytest.skip("needs the FB-BEV source: set FBBEV_SRC")

@pytest.mark.hardware
def test_needs_a_gpu():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.slow
def test_smoke():
    assert True
'''


def readme_test_command() -> str:
    quick = REPO.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(\S*python -m pytest[^\n#]*)", quick, re.M)
    assert len(commands) == 1, f"README Quick start should show one test command, found {commands}"
    return commands[0].strip()


def test_ci_runs_the_readme_test_command_with_upstreams_and_fails_on_exit_5():
    ci = REPO.joinpath(".ci/run").read_text()
    assert readme_test_command() in ci
    assert "--no-upstream" not in ci and "FB-BEV.git.tar.gz" in ci and "BEVDepth.git.tar.gz" in ci
    assert re.search(r"rc -eq 5 \]\];\s*then[^f]*exit 1", ci)
    assert "BEVKIT_CI=1" in ci and "-m 'not slow'" not in ci and '-m "not slow"' not in ci


def _run_sample(tmp_path: Path, ci: bool):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    timings = tmp_path / "timings.json"
    env = {k: v for k, v in os.environ.items() if k not in ("BEVKIT_CI", "BEVKIT_TEST_TIMINGS")}
    env.update(PYTHONPATH=os.pathsep.join([str(TEST_DIR), env.get("PYTHONPATH", "")]),
               BEVKIT_TEST_TIMINGS=str(timings))
    if ci:
        env["BEVKIT_CI"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
                          cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=120)
    return proc, timings


def test_in_ci_a_non_hardware_skip_fails_and_is_named(tmp_path):
    proc, timings = _run_sample(tmp_path, ci=True)
    assert proc.returncode == 1, proc.stdout
    assert "1 failed" in proc.stdout and "1 skipped" in proc.stdout, proc.stdout
    assert "test_needs_an_upstream skipped in CI: needs the FB-BEV source" in proc.stdout
    listing = proc.stdout.split("skipped: not checked in this run", 1)[1]
    assert "test_needs_a_gpu: needs a CUDA GPU" in listing
    assert "test_needs_an_upstream: needs the FB-BEV source: set FBBEV_SRC  [FAILED" in listing
    import json

    data = json.loads(timings.read_text())
    assert data["tests"] == {"unit": 3, "upstream": 0, "smoke": 1}
    assert "time per phase" in proc.stdout


def test_outside_ci_skips_stay_skips(tmp_path):
    proc, _ = _run_sample(tmp_path, ci=False)
    assert proc.returncode == 0, proc.stdout
    assert "2 passed, 2 skipped" in proc.stdout
