"""Provenance of a run: installed versions, the CANN toolkit version, file hashes, git commits.

Everything here reads files and package metadata only: no torch, torch_npu or mx_driving import (those break
``import`` on machines without CANN, and importing torch costs seconds).
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

#: CANN's default install folder (``ASCEND_TOOLKIT_HOME`` / ``ASCEND_HOME_PATH`` point elsewhere).
CANN_DEFAULT_HOME = "/usr/local/Ascend/ascend-toolkit/latest"


def dist_version(*names: str) -> Optional[str]:
    """Installed version of the first distribution found among ``names`` (each also with '-'/'_' swapped)."""
    from importlib import metadata

    for name in names:
        for spelling in dict.fromkeys((name, name.replace("_", "-"), name.replace("-", "_"))):
            try:
                return metadata.version(spelling)
            except metadata.PackageNotFoundError:
                continue
    return None


def sha256(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def git_head(path: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


# ------------------------------------------------------------------------------------------------ CANN

def cann_home(environ: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """The CANN toolkit folder the environment names (ASCEND_TOOLKIT_HOME, then ASCEND_HOME_PATH), or None."""
    env = os.environ if environ is None else environ
    for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        if env.get(var) and Path(env[var]).is_dir():
            return Path(env[var])
    return None


def _version_files(home: Path):
    yield from sorted(home.glob("*-linux/ascend_toolkit_install.info"))
    for rel in ("ascend_toolkit_install.info", "compiler/version.info", "runtime/version.info", "version.info",
                "version.cfg"):
        yield home / rel


def cann_version(where: Union[None, str, Path, Mapping[str, str]] = None) -> Optional[str]:
    """CANN toolkit version (e.g. '8.3.RC1') from the version files of an install, or None.

    ``where``: a toolkit folder, or an environment (default ``os.environ``) whose ASCEND_TOOLKIT_HOME /
    ASCEND_HOME_PATH name it; CANN's default install folder is tried last.
    """
    if isinstance(where, (str, Path)):
        homes = [Path(where)]
    else:
        found = cann_home(where)
        homes = ([found] if found else []) + [Path(CANN_DEFAULT_HOME)]
    for home in homes:
        for path in _version_files(home):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            m = re.search(r"(?im)^\s*(?:version|toolkit_version|runtime_running_version)\s*=\s*"
                          r"\[?\"?([0-9]+\.[0-9]+\.[0-9A-Za-z.]+)", text)
            if m:
                return m.group(1)
            m = re.search(r":([0-9]+\.[0-9]+\.(?:RC)?[0-9A-Za-z.]*)\]", text)  # version.cfg: [inner:8.3.RC1]
            if m:
                return m.group(1)
    return None


def collect_versions(environ: Optional[Mapping[str, str]] = None) -> Dict[str, Optional[str]]:
    """Versions of the stack that ran (None = not installed)."""
    return {
        "python": platform.python_version(),
        "torch": dist_version("torch"),
        "torch_npu": dist_version("torch_npu"),
        "mx_driving": dist_version("mx_driving"),
        "mmcv": dist_version("mmcv-full", "mmcv"),
        "mmdet": dist_version("mmdet"),
        "mmdet3d": dist_version("mmdet3d"),
        "mmsegmentation": dist_version("mmsegmentation"),
        "pytorch_lightning": dist_version("pytorch-lightning"),
        "numpy": dist_version("numpy"),
        "cann": cann_version(environ),
        "platform": platform.platform(),
    }


def upstream_info(name, checkout: Optional[Path] = None) -> Dict[str, Any]:
    """Upstream provenance: pinned commit, the checkout's commit and patch state, sha256 of our patches.

    Read from bevkit.upstream (registry + read-only status); best effort: never fails the results.
    """
    if not name:
        return {}
    from bevkit import upstream as up  # the registry imports the model specs: only when asked

    name = getattr(name, "name", name)
    info: Dict[str, Any] = {"name": name, "pinned_commit": None, "commit": None,
                            "checkout": str(checkout) if checkout else None, "state": None, "patches": {}}
    try:
        entry = up.get(name)
        info["pinned_commit"] = entry.commit
        info["url"] = entry.url
        for rel in entry.patches:
            path = Path(entry.patch_root) / rel
            info["patches"][str(rel)] = {"sha256": sha256(path) if path.is_file() else None, "state": None}
        st = up.status(name, dest=checkout) if checkout is not None else up.status(name)
        info["commit"] = st.commit
        info["state"] = st.state
        for rel, state in st.patches:
            info["patches"].setdefault(str(rel), {"sha256": None})["state"] = state
        if st.problems:
            info["problems"] = [f"{what} -> {fix}" for what, fix in st.problems]
    except Exception as e:  # best effort: results.json of a failed run must still be written
        info["error"] = f"bevkit.upstream: {type(e).__name__}: {e}"
        if checkout is not None and Path(checkout).is_dir() and not info["commit"]:
            info["commit"] = git_head(Path(checkout))
    return info
