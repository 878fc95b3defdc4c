"""No trainer outlives the launcher (issue 12): a SIGKILL to tools/launch stops torchrun and its workers
within seconds; Ctrl-C (SIGINT) still reaches the ranks once, through the launcher, and results.json is
written. A real 2-process gloo run of the toy model (no upstream), about 10-20 s each on 2 cores."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bevkit import REPO_ROOT

TOY = str(REPO_ROOT / "test" / "assets" / "toy_spec.py") + ":SPEC"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc and prctl")


def _parents() -> dict:
    """pid -> (ppid, state) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            found[int(entry.name)] = (int(fields[1]), fields[0])
    return found


def _descendants(root: int) -> set:
    procs = _parents()
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in procs.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pids) -> set:
    procs = _parents()
    return {p for p in pids if p in procs and procs[p][1] != "Z"}  # a zombie has stopped running


def _start(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEVKIT_")}
    env["BEVKIT_PYTHON"] = sys.executable
    proc = subprocess.Popen(
        [str(REPO_ROOT / "tools" / "launch"), "--spec", TOY, "--mode", "performance", "--max-steps", "100000",
         "--device", "cpu", "--nproc", "2", "--data-root", str(data), "--work-dir", str(tmp_path / "runs"),
         "--", "--sleep", "0.1"],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    steps = []
    while time.monotonic() < deadline and len(steps) < 3:  # training is under way on both ranks
        time.sleep(0.2)
        found = list((tmp_path / "runs").glob("*/steps.jsonl"))
        steps = found[0].read_text().splitlines() if found else []
    assert len(steps) >= 3, "the toy run did not start training in time"
    tree = _descendants(proc.pid)
    assert len(tree) >= 3, f"expected torchrun and 2 workers below the launcher, found {sorted(tree)}"
    return proc, tree


def _wait_gone(pids, seconds: float) -> set:
    deadline = time.monotonic() + seconds
    left = _alive(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _alive(pids)
    return left


def test_sigkill_of_the_launcher_leaves_no_trainer(tmp_path):
    proc, tree = _start(tmp_path)
    try:
        proc.kill()  # SIGKILL: the launcher cannot forward anything
        proc.wait(timeout=30)
        left = _wait_gone(tree, 10)
        assert not left, f"still running 10 s after SIGKILL of the launcher: {sorted(left)}"
    finally:
        for pid in _alive(tree):  # never leave the machine busy, even when the test fails
            os.kill(pid, signal.SIGKILL)
        proc.stdout.close()


def test_ctrl_c_still_reaches_the_ranks_through_the_launcher(tmp_path):
    proc, tree = _start(tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0
        results = json.loads(Path(out.rstrip().splitlines()[-1][len("results: "):]).read_text())
        assert results["status"] == "failed" and results["steps"] >= 3
        assert not _wait_gone(tree, 10)
    finally:
        for pid in _alive(tree):
            os.kill(pid, signal.SIGKILL)
