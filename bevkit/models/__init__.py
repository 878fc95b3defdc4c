"""The registry of models: one line per model in :data:`MODELS`.

A model is one package ``bevkit/models/<name>/`` whose ``SPEC`` (:class:`ModelSpec`) says everything the shared
modules need: its upstream, launch entry and batch, runtime patch set, data checks, metrics, reference results,
checkpoints. Shared modules iterate over :func:`all_specs`; nothing else lists the models.

The launcher -> training process contract (environment variables) is :mod:`bevkit.env`.
"""
from __future__ import annotations

import importlib
from typing import Dict, List

from bevkit.models.spec import MODES, LaunchRequest, ModelSpec, Upstream

__all__ = ["MODES", "MODELS", "LaunchRequest", "ModelSpec", "Upstream", "all_specs", "get_spec"]

#: model name -> package that defines ``SPEC``. Imported lazily: a spec module imports nothing heavy, but
#: the registry stays importable even while one model is broken.
MODELS: Dict[str, str] = {
    "fbocc": "bevkit.models.fbocc",
    "bevdepth": "bevkit.models.bevdepth",
}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return importlib.import_module(MODELS[name]).SPEC


def all_specs() -> List[ModelSpec]:
    """Every registered model's spec, in registry order."""
    return [get_spec(name) for name in MODELS]
