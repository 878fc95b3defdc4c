"""Named runtime patches: the one mechanism the kit uses to change upstream code without editing it.

A :class:`RuntimePatch` names its target by import path (``"pkg.module:Class.method"``), says why it
exists, on which devices it applies, and builds the replacement from the original attribute (so a patch
can wrap rather than copy upstream code). A :class:`PatchSet` resolves *every* target before changing
anything: if one is missing (upstream moved, wrong commit, import failure) it raises
:class:`PatchTargetMissing` naming the patch, the target and what to do, and nothing is half-applied.

All patch sets of the kit are listed in :data:`PATCH_SETS` (the shared 'common' set and each registered model's
``ModelSpec.patch_set``); ``python -m bevkit.patching list`` prints them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bevkit.device import DEVICES
from bevkit.registry import all_specs

#: Every patch set of the kit, by name -> "module:attribute" of a PatchSet (imported lazily, because
#: model patch modules import torch and upstream code).
PATCH_SETS: Dict[str, str] = {"common": "bevkit.compat:PATCHES",
                              **{spec.name: spec.patch_set for spec in all_specs() if spec.patch_set}}


class PatchTargetMissing(RuntimeError):
    """A runtime patch's target does not exist: the upstream is not what the patch was written for."""


class PatchCheckFailed(RuntimeError):
    """A runtime patch's target exists but does not look like what the patch was written for."""


def _split_target(target: str) -> Tuple[str, List[str]]:
    if ":" not in target:
        raise ValueError(f"patch target {target!r} must look like 'package.module:Attr.attr'")
    module, attrs = target.split(":", 1)
    return module, attrs.split(".")


@dataclass(frozen=True)
class RuntimePatch:
    """One named change to an upstream attribute.

    ``build(original) -> replacement``; ``check(original) -> bool`` optionally verifies the target is
    the code the patch was written for (e.g. a function still has the expected parameters).
    ``devices`` limits the patch to runs on those device types; ``enabled() -> bool``, when given, makes the patch
    opt-in (asked once, when the set is applied; e.g. an environment switch that is off by default).
    """

    name: str
    target: str
    build: Callable[[Any], Any]
    why: str
    devices: Tuple[str, ...] = DEVICES
    check: Optional[Callable[[Any], bool]] = None
    enabled: Optional[Callable[[], bool]] = None

    def __post_init__(self):
        _split_target(self.target)
        unknown = set(self.devices) - set(DEVICES)
        if unknown:
            raise ValueError(f"patch {self.name}: unknown devices {sorted(unknown)}")

    def applies_to(self, device: str) -> bool:
        return device in self.devices and (self.enabled is None or bool(self.enabled()))

    def resolve(self) -> Tuple[Any, str, Any]:
        """(owner object, attribute name, original value); raises PatchTargetMissing."""
        module_name, attrs = _split_target(self.target)
        try:
            owner: Any = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or the upstream failing while importing
            raise PatchTargetMissing(
                f"runtime patch '{self.name}': cannot import module '{module_name}' "
                f"({type(exc).__name__}: {exc}). Check the upstream checkout with "
                f"'python -m bevkit.upstream status' and rerun setup.sh.") from exc
        for attr in attrs[:-1]:
            if not hasattr(owner, attr):
                raise self._missing(attr, owner)
            owner = getattr(owner, attr)
        last = attrs[-1]
        if not hasattr(owner, last):
            raise self._missing(last, owner)
        # Read from __dict__ when possible so staticmethod/classmethod wrappers are kept intact.
        original = vars(owner).get(last, getattr(owner, last)) if hasattr(owner, "__dict__") else getattr(owner, last)
        if self.check is not None and not self.check(original):
            raise PatchCheckFailed(
                f"runtime patch '{self.name}': target '{self.target}' exists but is not the code this patch "
                f"was written for (its check failed). The upstream checkout is probably at another commit; "
                f"run 'python -m bevkit.upstream status'.")
        return owner, last, original

    def _missing(self, attr: str, owner: Any) -> PatchTargetMissing:
        return PatchTargetMissing(
            f"runtime patch '{self.name}': target '{self.target}' not found ('{attr}' missing on {owner!r}). "
            f"The upstream checkout is probably at another commit or unpatched; run "
            f"'python -m bevkit.upstream status' and rerun setup.sh.")


@dataclass
class PatchSet:
    """An ordered list of patches applied (and undone) together."""

    name: str
    patches: Sequence[RuntimePatch]
    _applied: List[Tuple[RuntimePatch, Any, str, Any]] = field(default_factory=list, repr=False)

    def __post_init__(self):
        names = [p.name for p in self.patches]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"patch set {self.name}: duplicate patch names {sorted(dupes)}")

    @property
    def applied(self) -> List[str]:
        return [p.name for p, *_ in self._applied]

    def apply(self, device: str, disable: Sequence[str] = ()) -> List[str]:
        """Apply the patches for ``device`` (minus ``disable``); all targets are resolved first."""
        if self._applied:
            raise RuntimeError(f"patch set {self.name} is already applied ({', '.join(self.applied)})")
        unknown = set(disable) - {p.name for p in self.patches}
        if unknown:
            raise ValueError(f"patch set {self.name}: cannot disable unknown patches {sorted(unknown)}")
        chosen = [p for p in self.patches if p.applies_to(device) and p.name not in disable]
        resolved = [(p, *p.resolve()) for p in chosen]  # raises before anything is changed
        for patch, owner, attr, original in resolved:
            setattr(owner, attr, patch.build(original))
            self._applied.append((patch, owner, attr, original))
        return self.applied

    def undo(self) -> None:
        """Restore every original, newest first (tests use this to compare patched and unpatched code)."""
        while self._applied:
            _patch, owner, attr, original = self._applied.pop()
            setattr(owner, attr, original)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    def describe(self) -> List[Dict[str, str]]:
        return [{"set": self.name, "name": p.name, "target": p.target,
                 "devices": ",".join(p.devices) + (" (opt-in)" if p.enabled else ""), "why": p.why}
                for p in self.patches]


def load_patch_set(name: str) -> PatchSet:
    """The patch set registered under ``name`` in :data:`PATCH_SETS`."""
    if name not in PATCH_SETS:
        raise KeyError(f"no patch set {name!r}; known: {', '.join(PATCH_SETS)}")
    module, attr = PATCH_SETS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bevkit.patching",
                                     description="List the kit's runtime patches.")
    parser.add_argument("command", choices=["list"])
    parser.add_argument("sets", nargs="*", help="patch sets to list (default: all)")
    args = parser.parse_args(argv)
    status = 0
    for set_name in args.sets or list(PATCH_SETS):
        try:
            rows = load_patch_set(set_name).describe()
        except ImportError as exc:  # a model set may import its upstream's packages
            print(f"[{set_name}] not loadable here: {type(exc).__name__}: {exc}")
            status = 1
            continue
        for row in rows:
            print(f"[{row['set']}] {row['name']:<40} {row['devices']:<14} {row['target']}\n    {row['why']}")
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
