"""The packages a setup profile installs, and an import blocker that refuses every other installed package.

An emulated device lane (``BEVKIT_EMULATE_DEVICE=npu|cuda``, see README "Emulated device lanes") runs in the cpu
profile's environment, which holds packages the npu or cuda profile does not install (spconv, for one). To fail
as the device's own environment would, the lane's processes install :class:`ProfileImportBlocker`: a top-level
import that resolves into site-packages, to files of a distribution outside the lane profile's set, raises
ImportError naming the package, the profile and the requirement files.

The set is derived, not listed: :func:`requirement_files` names the files ``setup.sh`` installs for a profile
(same rule and order; ``test/test_package_set.py`` compares it with ``setup.sh --dry-run``), plus what setup.sh
installs by name (:func:`named_installs`); the dependencies of each come from the installed distributions'
metadata (``Requires-Dist``), except for the files and packages setup.sh installs with ``--no-deps``.
Imports that do not resolve into site-packages (the standard library, the kit, the upstream checkouts, the
test fakes) are not this module's business.
"""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from bevkit import REPO_ROOT

REQUIREMENTS = REPO_ROOT / "configs" / "requirements"
PROFILES = ("npu", "cuda", "cpu")


def canonical(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_files(profile: str, models: Sequence[str], folder: Path = REQUIREMENTS) -> List[Tuple[Path, bool]]:
    """(file, installed with dependencies) for each requirement file setup.sh installs, in its order: the torch
    step (``<profile>.txt``, then ``<profile>-nodeps.txt`` without deps), npu's ``npu-accel.txt``, ``common.txt``,
    then per model ``<model>.txt``, ``<model>-<profile>.txt`` and ``<model>-nodeps.txt`` (without deps)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    names = [(f"{profile}.txt", True), (f"{profile}-nodeps.txt", False)]
    if profile == "npu":
        names.append(("npu-accel.txt", True))
    names.append(("common.txt", True))
    for model in models:
        names += [(f"{model}.txt", True), (f"{model}-{profile}.txt", True), (f"{model}-nodeps.txt", False)]
    return [(folder / name, deps) for name, deps in names if (folder / name).is_file()]


def named_installs(profile: str) -> List[Tuple[str, bool]]:
    """(distribution, with dependencies) setup.sh installs by name rather than from a file: its build tools,
    torch_npu on npu (the build matching the installed CANN), mmcv-full (built with the profile's ops), and the
    kit (editable, ``--no-deps``)."""
    named = [("setuptools", True), ("wheel", True)]
    if profile == "npu":
        named.append(("torch-npu", True))
    return named + [("mmcv-full", True), ("bevkit", False)]


def _requirement(line: str):
    """(name, marker or None) of one requirement line, or None for blanks, comments and pip options."""
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    from packaging.requirements import Requirement

    req = Requirement(line)
    return canonical(req.name), req.marker


def _applies(marker) -> bool:
    return marker is None or marker.evaluate({"extra": ""})


def _installed(name: str):
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def profile_distributions(profile: str, models: Sequence[str], folder: Path = REQUIREMENTS,
                          substitutes: Optional[Dict[str, str]] = None) -> Set[str]:
    """Every distribution the profile installs: requirement files and named installs whose markers apply here,
    with the installed metadata's dependencies (transitively), except where setup.sh passes ``--no-deps``.

    ``substitutes``: a distribution of the profile that is not installed here -> the installed one standing in
    for it (an emulated lane: the CPU build ``spconv`` for the cuda profile's ``spconv-cu126``); the stand-in
    joins the set with its own dependencies."""
    substitutes = {canonical(k): canonical(v) for k, v in (substitutes or {}).items()}
    roots: List[Tuple[str, bool]] = []
    for path, deps in requirement_files(profile, models, folder):
        for line in path.read_text(encoding="utf-8").splitlines():
            parsed = _requirement(line)
            if parsed is not None and _applies(parsed[1]):
                roots.append((parsed[0], deps))
    roots += [(canonical(name), deps) for name, deps in named_installs(profile)]
    roots += [(substitutes[name], deps) for name, deps in roots if name in substitutes and not _installed(name)]
    found: Set[str] = set()
    todo = [name for name, deps in roots if deps]
    found.update(name for name, _ in roots)
    while todo:
        dist = _installed(todo.pop())
        for line in (dist.requires or []) if dist is not None else []:
            parsed = _requirement(line)
            if parsed is not None and _applies(parsed[1]) and parsed[0] not in found:
                found.add(parsed[0])
                todo.append(parsed[0])
    return found


def _top_level(dist) -> Set[str]:
    """The top-level entries (folders, module files) a distribution put into site-packages."""
    text = dist.read_text("top_level.txt")
    if text:
        names = {n.strip() for n in text.splitlines() if n.strip()}
        if names:
            return names
    entries = set()
    for line in (dist.read_text("RECORD") or "").splitlines():
        first = line.split(",", 1)[0].split("/", 1)[0]
        if first and not first.startswith("..") and not first.endswith((".dist-info", ".egg-info", ".pth")):
            entries.add(first.split(".", 1)[0])  # six.py / _cffi_backend.cpython-311-x86_64-linux-gnu.so -> name
    return entries


def site_dirs() -> List[Path]:
    """The folders installed distributions live in."""
    paths = sysconfig.get_paths()
    found = {Path(paths[key]).resolve() for key in ("purelib", "platlib") if key in paths}
    return sorted(found)


class ProfileImportBlocker:
    """A ``sys.meta_path`` finder: a top-level import that resolves into site-packages, to an entry no
    distribution of ``profile`` installed, raises ModuleNotFoundError (an ImportError) saying why.

    ``refused``: module name -> reason, refused wherever they are found (e.g. another device's test fakes).
    """

    def __init__(self, profile: str, models: Sequence[str], refused: Optional[Dict[str, str]] = None,
                 substitutes: Optional[Dict[str, str]] = None, folder: Path = REQUIREMENTS):
        self.profile = profile
        self.files = [p.name for p, _ in requirement_files(profile, models, folder)]
        self.distributions = profile_distributions(profile, models, folder, substitutes)
        self.allowed: Set[str] = set()
        for name in self.distributions:
            dist = _installed(name)
            if dist is not None:
                self.allowed |= _top_level(dist)
        self.refused = dict(refused or {})
        self.sites = site_dirs()
        self._decided: Dict[str, Optional[str]] = {}
        self.refusals: List[str] = []  # names refused so far in this process (an emulated lane records them)

    def _owners(self, entry: str) -> List[str]:
        """Installed distributions that put ``entry`` into site-packages (only asked when refusing)."""
        owners = []
        for dist in importlib.metadata.distributions():
            if entry in _top_level(dist):
                owners.append(dist.metadata["Name"])
        return sorted(set(owners))

    def why_refused(self, name: str) -> Optional[str]:
        """The reason a top-level import of ``name`` is refused, or None."""
        if name in self._decided:
            return self._decided[name]
        reason = None
        if name in self.refused:
            reason = self.refused[name]
        else:
            spec = importlib.machinery.PathFinder.find_spec(name)
            locations = []
            if spec is not None:
                locations = [spec.origin] if spec.origin not in (None, "namespace") else []
                locations += list(spec.submodule_search_locations or [])
            for location in locations:
                entry = _entry_in(Path(location), self.sites)
                if entry is not None and entry not in self.allowed:
                    owners = self._owners(entry) or ["unknown"]
                    reason = (f"distribution {', '.join(owners)} is not installed by the {self.profile} profile "
                              f"(setup.sh installs configs/requirements/{{{','.join(self.files)}}} and "
                              f"{', '.join(n for n, _ in named_installs(self.profile))}, with their dependencies)")
                    break
        self._decided[name] = reason
        return reason

    def find_spec(self, fullname: str, path=None, target=None):
        if "." in fullname:
            return None  # the top-level package was decided already
        reason = self.why_refused(fullname)
        if reason is not None:
            self.refusals.append(fullname)
            raise ModuleNotFoundError(f"No module named {fullname!r} on the {self.profile} profile: {reason}. "
                                      f"Import it only where the profile has it, or add it to the profile's "
                                      f"requirements.", name=fullname)
        return None

    def install(self) -> "ProfileImportBlocker":
        """Put the blocker first on ``sys.meta_path`` (once)."""
        if not any(isinstance(f, ProfileImportBlocker) for f in sys.meta_path):
            sys.meta_path.insert(0, self)
        return self


def _entry_in(location: Path, sites: Iterable[Path]) -> Optional[str]:
    """The site-packages entry name (without suffixes) holding ``location``, or None outside site-packages."""
    try:
        resolved = Path(os.path.realpath(str(location)))
    except OSError:
        return None
    for site in sites:
        try:
            rel = resolved.relative_to(site)
        except ValueError:
            continue
        return rel.parts[0].split(".", 1)[0] if rel.parts else None
    return None
