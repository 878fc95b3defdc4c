"""The random state of a training process, in a form every supported torch loads with ``weights_only=True``
(tensors, ints, floats, tuples): resumed runs restore it (FB-OCC: :mod:`bevkit.models.fbocc.resume`, BEVDepth:
:mod:`bevkit.models.bevdepth.cli`).

One state per checkpoint, captured on the rank that writes the checkpoint (global rank 0) and restored on every
rank: both recipes seed every rank alike (FB-OCC ``--seed 0`` without ``--diff-seed``, BEVDepth
``seed_everything``) and draw from the generators alike, so rank 0's state is every rank's. Data order comes
from the samplers' own seeds and epoch counters, restored with the counters.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Optional

from bevkit.device import RunDevice, run_device


def rng_state(device: Optional[RunDevice] = None) -> Dict[str, Any]:
    """Python's, numpy's, torch's CPU and the run device's generator states."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")),
                                                   "pos": int(pos), "has_gauss": int(has_gauss),
                                                   "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(), "device": (device or run_device()).rng_state()}


def set_rng_state(state: Dict[str, Any], device: Optional[RunDevice] = None) -> None:
    """Restore what :func:`rng_state` captured (missing parts are left alone)."""
    import numpy as np
    import torch

    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    n = state.get("numpy")
    if n is not None:
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    (device or run_device()).set_rng_state(state.get("device"))
