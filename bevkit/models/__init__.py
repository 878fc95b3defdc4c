"""The models of the kit, one package each (``bevkit/models/<name>/``); the registry is :mod:`bevkit.registry`."""
from bevkit.registry import MODELS, MODES, LaunchRequest, ModelSpec, Upstream, all_specs, get_spec

__all__ = ["MODES", "MODELS", "LaunchRequest", "ModelSpec", "Upstream", "all_specs", "get_spec"]
