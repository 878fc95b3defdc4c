"""Which mx_driving limits the NPU backends of :mod:`bevkit.ops` keep: one setting, ``BEVKIT_NPU_OP_LIMITS``.

- ``documented`` (default): every limit of DrivingSDK's API pages (``docs/zh/api/context/<op>.md``) is kept;
  calls beyond them are split, padded or run portably (``bevkit.ops`` logs each once).
- ``port``: the three limits the DrivingSDK model ports exceed with their reported results are not kept; those
  calls go to mx_driving in one piece, unpadded, as the ports make them (and no further: every other documented
  limit still holds, since no port measured beyond it):

  ===============================  ======================================  ===========================================
  op                               documented limit                        what the port passes
  ===============================  ======================================  ===========================================
  ``grid_sampler3d_v1``            C <= 128                                C = 1280 (FB-OCC history, one call)
  ``npu_voxel_pooling_train``      N <= 100,000 and B*N*C <= 1e8           N = 473,088 per sample (BEVDepth, one call)
  ``multi_scale_deformable_attn``  embed_dims a multiple of 8              10 per head (FB-OCC, unpadded)
  ===============================  ======================================  ===========================================

The documented limits may be stale (DrivingSDK's own op tests cover unaligned dims 37 and 147), but nothing here
can tell without hardware: ``tools/npu_ab`` runs the performance mode once per policy on a real NPU and prints
both speeds and losses. The policy is logged by NPU runs and written into results.json (``npu_op_limits``).

Importing this module never imports torch (the launcher reads the policy too).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

from bevkit import env

ENV = "BEVKIT_NPU_OP_LIMITS"
DOCUMENTED = "documented"
PORT = "port"
POLICIES = (DOCUMENTED, PORT)

#: What each policy means, for the log line and README.
DESCRIPTION: Dict[str, str] = {
    DOCUMENTED: "mx_driving calls kept within the documented limits (grid_sampler3d_v1 C <= 128, "
                "npu_voxel_pooling_train N <= 100000 and B*N*C <= 1e8, multi_scale_deformable_attn dims % 8): "
                "split or padded",
    PORT: "mx_driving called as the DrivingSDK ports call it: grid_sampler3d_v1 with all channels, "
          "npu_voxel_pooling_train with all points, multi_scale_deformable_attn with unpadded dims (one call each)",
}


def policy(environ: Optional[Mapping[str, str]] = None) -> str:
    """The active policy ('documented' when unset); one clear error for anything else."""
    value = env.get(ENV, environ)
    if value is None:
        return DOCUMENTED
    value = value.lower()
    if value not in POLICIES:
        raise ValueError(f"{ENV}={value!r} is not a policy: use 'documented' (the default, DrivingSDK's "
                         f"documented op limits) or 'port' (one call, no padding, as the DrivingSDK ports)")
    return value


def port(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when the ports' way of calling mx_driving is chosen."""
    return policy(environ) == PORT


def describe(environ: Optional[Mapping[str, str]] = None) -> str:
    """One line for the logs: the policy and what it does."""
    chosen = policy(environ)
    return f"NPU op limits: {chosen} ({ENV}): {DESCRIPTION[chosen]}"
