"""One runtime protocol for every model: what a training process calls before any upstream code runs.

Each model's ``runtime`` module holds one :class:`ModelRuntime` and exposes its two methods::

    activate(entry_file=None, device=None, disable=None) -> Activation
    deactivate() -> None

``activate``:

1. resolves the run's device once (:meth:`bevkit.device.RunDevice.resolve`: ``device``, else the launcher's
   ``BEVKIT_DEVICE``, else detected) and makes it the process's run device, which every patch and hook asks;
2. runs the model's preparation before upstream imports (:meth:`ModelRuntime.prepare`: sys.path, import fixes);
3. applies the patch sets (``common`` and the model's, :mod:`bevkit.patching`) for that device, leaving out the
   patches named in ``disable`` (default: ``BEVKIT_DISABLE_PATCHES=a,b``); an unknown name is refused;
4. runs the model's finishing steps (:meth:`ModelRuntime.finish`: hooks registered, device settings).

On NPU it logs the op-limit policy of :mod:`bevkit.op_limits` (``BEVKIT_NPU_OP_LIMITS``).

It returns an :class:`Activation`: the applied patch names per set (a dict) and the device. Activating again
in the same process returns the same Activation; asking for another device then is an error.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from bevkit import env, log, op_limits
from bevkit.device import DEVICES, RunDevice, set_run_device
from bevkit.patching import load_patch_set

COMMON = "common"


class Activation(Dict[str, List[str]]):
    """Applied patch names per patch set, plus the run's :class:`~bevkit.device.RunDevice` (``.device``)."""

    def __init__(self, device: RunDevice, applied: Dict[str, List[str]]):
        super().__init__(applied)
        self.device = device


class ModelRuntime:
    """The in-process side of one model; subclasses override :meth:`prepare` and :meth:`finish`."""

    def __init__(self, model: str):
        self.model = model
        self.patch_sets = (COMMON, model)
        self._activation: Optional[Activation] = None
        self._owned: List[str] = []

    @property
    def activation(self) -> Optional[Activation]:
        return self._activation

    def prepare(self, device: RunDevice, entry_file: Optional[str]) -> None:
        """Before the patches: make upstream importable, pre-import fixes."""

    def finish(self, device: RunDevice) -> None:
        """After the patches: register hooks, device settings."""

    def activate(self, entry_file: Optional[str] = None, device: Optional[str] = None,
                 disable: Optional[Sequence[str]] = None) -> Activation:
        """Prepare this process for the model on the run's device (see the module doc)."""
        if entry_file in DEVICES:
            raise TypeError(f"activate({entry_file!r}): the first argument is the entry file; pass "
                            f"device={entry_file!r}")
        if self._activation is not None:
            active = self._activation.device
            if device is not None and device != active.kind:
                raise RuntimeError(f"{self.model} runtime already active for {active.kind}, not {device}")
            return self._activation
        run = RunDevice.resolve(device)
        if disable is None:
            disable = [n for n in (env.get("BEVKIT_DISABLE_PATCHES") or "").split(",") if n.strip()]
        sets = [load_patch_set(name) for name in self.patch_sets]
        known = {p.name for s in sets for p in s.patches}
        unknown = sorted(set(disable) - known)
        if unknown:
            raise ValueError(f"BEVKIT_DISABLE_PATCHES / disable names unknown {self.model} patches {unknown}; "
                             f"list them with: python -m bevkit.patching list {' '.join(self.patch_sets)}")
        set_run_device(run)
        if run.kind == "npu":  # the NPU backends' limit policy, said once per process (and a bad value refused)
            log.get("ops").info(op_limits.describe())
        try:
            self.prepare(run, entry_file)
            applied: Dict[str, List[str]] = {}
            for patch_set in sets:
                if patch_set.applied:  # another model's runtime applied a shared set in this process
                    applied[patch_set.name] = patch_set.applied
                    continue
                names = {p.name for p in patch_set.patches}
                applied[patch_set.name] = patch_set.apply(run.kind, disable=[n for n in disable if n in names])
                self._owned.append(patch_set.name)
            self.finish(run)
        except BaseException:
            self.deactivate()  # nothing half-done stays behind
            raise
        self._activation = Activation(run, applied)
        return self._activation

    def deactivate(self) -> None:
        """Undo the patches this runtime applied, newest set first (tests compare patched and upstream code)."""
        for name in reversed(self._owned):
            load_patch_set(name).undo()
        self._owned = []
        self._activation = None
        set_run_device(None)
