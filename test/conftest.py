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
