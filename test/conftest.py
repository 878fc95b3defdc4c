"""Shared fixtures: patched upstream checkouts for the tests that need the real upstream code.

``fbbev_checkout`` / ``bevdepth_checkout`` give the path of a checkout at the pinned commit with the kit
patches applied: the existing ``upstream/<name>`` when it is healthy, otherwise one materialized once per
session from ``FBBEV_SRC`` / ``BEVDEPTH_SRC`` (a clone, bare git dir or tarball) into a temporary folder.
Without either, the test is skipped and says which variable to set.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the suite also runs without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from bevkit import upstream  # noqa: E402


def _patched_checkout(name: str, tmp_path_factory) -> Path:
    up = upstream.get(name)
    default = upstream.checkout_dir(up)
    why = f"{default} does not exist"
    if default.exists():
        st = upstream.status(up, default)
        if st.ok:
            return default
        why = "; ".join(msg for msg, _ in st.problems)
    src = os.environ.get(up.src_env)
    if not src:
        pytest.skip(f"needs the {up.name} source: set {up.src_env}=<clone, bare git dir or tarball> "
                    f"or run setup.sh ({why})")
    dest = tmp_path_factory.mktemp(f"upstream-{up.model}") / up.name
    try:
        return upstream.materialize(up, src=src, dest=dest, log=lambda msg: None)
    except upstream.UpstreamError as exc:  # a kit bug (e.g. a patch that no longer applies): fail loudly
        pytest.fail(f"could not materialize {up.name} from {up.src_env}={src}: {exc}")


@pytest.fixture(scope="session")
def fbbev_checkout(tmp_path_factory) -> Path:
    """FB-BEV at the pinned commit with fbocc patches applied (skips without a source)."""
    return _patched_checkout("FB-BEV", tmp_path_factory)


@pytest.fixture(scope="session")
def bevdepth_checkout(tmp_path_factory) -> Path:
    """BEVDepth at the pinned commit with bevdepth patches applied (skips without a source)."""
    return _patched_checkout("BEVDepth", tmp_path_factory)


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    """The small synthetic nuScenes + Occ3D dataset, generated once per session (data tests)."""
    from bevkit.data.testing import small_dataset

    return small_dataset(tmp_path_factory)


@pytest.fixture(scope="session")
def nusc(root):
    """The devkit's NuScenes over :func:`root`."""
    nuscenes = pytest.importorskip("nuscenes.nuscenes")
    return nuscenes.NuScenes("v1.0-trainval", str(root), verbose=False)


@pytest.fixture
def fake_torch_npu(monkeypatch):
    """The fake torch_npu (test/fakes) imported in this process for one test; torch.npu is removed afterwards
    when the test started without it, so other tests see a plain CPU torch."""
    import importlib.util

    import torch

    fakes = Path(__file__).parent / "fakes"
    spec = importlib.util.spec_from_file_location("torch_npu", fakes / "torch_npu" / "__init__.py",
                                                  submodule_search_locations=[str(fakes / "torch_npu")])
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    previous = getattr(torch, "npu", None)
    spec.loader.exec_module(mod)
    if previous is None:
        monkeypatch.delattr(torch, "npu", raising=False)
    else:  # e.g. the stand-in pytest_runtest_teardown leaves
        monkeypatch.setattr(torch, "npu", previous)
    return mod



def pytest_runtest_teardown(item, nextitem):
    """After a test that imported the fake torch_npu in this process: torch keeps its 'npu' backend name and the
    fake's accelerator hooks (neither can be unregistered), so torch.accelerator and torch.optim's step ask for
    torch.npu. Fixtures remove the fake module; a stand-in that reports no NPU keeps the later tests on a plain
    CPU machine."""
    torch = sys.modules.get("torch")
    if torch is None or hasattr(torch, "npu") or torch._C._get_privateuse1_backend_name() != "npu":
        return
    import types

    retired = types.ModuleType("torch.npu")
    retired.__doc__ = "The fake torch_npu was unloaded after a test: no NPU in this process."
    retired.is_available = lambda: False
    retired.device_count = lambda: 0
    torch.npu = retired


@pytest.fixture
def fake_npu(monkeypatch):
    """The fake torch_npu imported by name from test/fakes (as the kit imports it), fresh for one test."""
    import importlib

    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fakes"))
    for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
        monkeypatch.delitem(sys.modules, name)
    fake = importlib.import_module("torch_npu")
    assert getattr(fake, "FAKE", False), "the real torch_npu must never be imported by tests"
    fake.CALLS.clear()
    yield fake
    for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
        sys.modules.pop(name, None)
    if getattr(getattr(torch, "npu", None), "__name__", "") == "torch_npu.npu":
        delattr(torch, "npu")


# ------------------------------------------------------------------------------------------------ CI policy
#: Set by .ci/run. In CI only tests marked ``hardware`` (they need a CUDA GPU or an Ascend NPU, or need none)
#: may skip; any other skip means something CI must check was not checked (an upstream missing, a package
#: setup.sh should have installed), so it fails the run and says which test and why.
IN_CI = os.environ.get("BEVKIT_CI") == "1"

#: The tools/* entries the tests start run with the Python running the tests: without it they take the
#: repository's .venv or python3 on PATH, which is another Python in the Python 3.8 lane's .venv38.
os.environ.setdefault("BEVKIT_PYTHON", sys.executable)

#: Phase of a test for the timing table: smoke runs (marker ``slow``), tests on the real upstream code
#: (marker ``upstream`` or an upstream checkout fixture) and the rest.
_UPSTREAM_FIXTURES = {"fbbev_checkout", "bevdepth_checkout"}
_phase_seconds: dict = {"unit": 0.0, "upstream": 0.0, "smoke": 0.0}
_phase_counts: dict = {"unit": 0, "upstream": 0, "smoke": 0}
_skipped: list = []


def _phase(item) -> str:
    if item.get_closest_marker("slow"):
        return "smoke"
    if item.get_closest_marker("upstream") or _UPSTREAM_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "upstream"
    return "unit"


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).replace("Skipped: ", "", 1)
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    phase = _phase(item)
    _phase_seconds[phase] += report.duration
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _phase_counts[phase] += 1
    if not report.skipped:
        return
    reason = _skip_reason(report)
    allowed = item.get_closest_marker("hardware") is not None
    _skipped.append((item.nodeid, reason, allowed))
    if IN_CI and not allowed:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} skipped in CI: {reason}\n"
                           "In CI only tests that need a CUDA GPU or an Ascend NPU (marker 'hardware') may skip; "
                           "this one needs something .ci/run should have provided (upstream sources from "
                           "../shared/upstream, or a package setup.sh installs).")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    if _skipped:
        tr.section("skipped: not checked in this run")
        for nodeid, reason, allowed in _skipped:
            tag = "" if allowed else ("  [FAILED: skip not allowed in CI]" if IN_CI else "")
            tr.write_line(f"{nodeid}: {reason}{tag}")
    tr.section("time per phase")
    for phase in ("unit", "upstream", "smoke"):
        tr.write_line(f"{phase:<9} {_phase_counts[phase]:4d} tests {_phase_seconds[phase]:8.1f} s")
    out = os.environ.get("BEVKIT_TEST_TIMINGS")
    if out:
        import json

        Path(out).write_text(json.dumps({"seconds": _phase_seconds, "tests": _phase_counts,
                                         "skipped": [{"test": n, "reason": r, "hardware": a}
                                                     for n, r, a in _skipped]}, indent=1))
