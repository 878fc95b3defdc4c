"""The one way the kit reads a checkpoint file: ``torch.load(..., weights_only=True)`` first, always.

``weights_only=True`` unpickles tensors and plain containers only, so a file cannot run code while it loads.
Both supported torch versions have it (2.1 and 2.13), but their allow-lists differ: torch 2.1 refuses e.g. the
``collections.Counter`` of a Lightning checkpoint's MultiStepLR state, which torch 2.13 accepts. When a file
needs more than the installed torch allows, :func:`load` unpickles it in full (``weights_only=False``) only when
it lies in a trusted place (:func:`bevkit.checkpoints.trusted_place`: a kit run folder, the checkpoint folder,
or ``--trust-checkpoint``); otherwise it refuses with one line (:class:`bevkit.errors.CheckpointError`).

The loads inside the upstream stacks go through here too (runtime patches: mmcv's checkpoint loader and model-zoo
downloads, Lightning's checkpoint IO, FB-BEV's EMA hook): :class:`TorchWithSafeLoad` stands in for the ``torch``
name of a module whose ``torch.load`` calls should be ours.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Optional

from bevkit import checkpoints, log
from bevkit.errors import CheckpointError

_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
_told = set()


def is_weights_only_refusal(exc: BaseException) -> bool:
    """True when torch refused a file because it needs more than ``weights_only=True`` allows."""
    return isinstance(exc, pickle.UnpicklingError) and _WEIGHTS_ONLY_REFUSAL in str(exc)


def needed_globals(exc: BaseException) -> str:
    """The class or function torch named when it refused the file (best effort, for the message)."""
    text = str(exc)
    for marker in ("Unsupported global: GLOBAL ", "Unsupported class ", "Trying to instantiate unsupported class "):
        if marker in text:
            return text.split(marker, 1)[1].split()[0].rstrip(".,")
    return "objects other than tensors"


def untrusted_message(path, exc: BaseException) -> str:
    return (f"{path} holds {needed_globals(exc)}, which torch.load(weights_only=True) of this torch refuses; "
            "loading it in full could run code written into the file, and it is outside the kit's run folders "
            "and the checkpoint folder (DATA_ROOT/ckpts, BEVKIT_CKPT_DIR): move it there or pass "
            "--trust-checkpoint if you trust its source")


def load(f: Any, map_location: Any = "cpu", mmap: bool = False, data_root: Optional[str] = None) -> Any:
    """``torch.load`` with ``weights_only=True``; a file that needs more is loaded in full only from a trusted
    place (see the module doc), else :class:`CheckpointError`. ``f``: a path or a file object (a file object
    has no place, so it is never trusted)."""
    import torch

    if isinstance(f, os.PathLike):
        f = os.fspath(f)  # torch 2.1 memory-maps str paths only
    kwargs = {"map_location": map_location, "weights_only": True}
    if mmap:
        kwargs["mmap"] = True
    try:
        return torch.load(f, **kwargs)
    except pickle.UnpicklingError as exc:
        if not is_weights_only_refusal(exc):
            raise
        path = os.fspath(f) if isinstance(f, (str, os.PathLike)) else None
        reason = checkpoints.trusted_place(path, data_root) if path else None
        if reason is None:
            raise CheckpointError(untrusted_message(path or "a checkpoint stream", exc)) from None
        if path not in _told:
            _told.add(path)
            log.get().info(f"{path}: loaded with weights_only=False ({needed_globals(exc)} needs it; trusted: "
                           f"{reason})")
        kwargs["weights_only"] = False
        return torch.load(f, **kwargs)


class TorchWithSafeLoad:
    """A stand-in for the ``torch`` module inside one upstream module: everything is torch's, except ``load``,
    which is :func:`load` (a patch replaces that module's ``torch`` name with this)."""

    def __init__(self, torch_module):
        self.__bevkit_original__ = torch_module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__bevkit_original__, name)

    @staticmethod
    def load(f, map_location=None, *args, **kwargs):  # upstream callers pass (f, map_location)
        return load(f, map_location=map_location)


def load_url(url: str, model_dir: Optional[str] = None, map_location: Any = None, **kwargs) -> Any:
    """A model-zoo download, loaded with ``weights_only=True`` (torch.hub's default is False); published
    weights that need more are refused."""
    import torch

    return torch.hub.load_state_dict_from_url(url, model_dir=model_dir, map_location=map_location,
                                              weights_only=True, **kwargs)
