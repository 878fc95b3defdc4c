"""5-D trilinear grid sampling (FB-OCC history fusion; ``F.grid_sample`` contract).

Backends:

* npu: ``mx_driving.grid_sampler3d_v1`` (positional ``(input, grid, 'bilinear', 'zeros', True)``) within its
  documented limits: float32, bilinear / zeros / align_corners=True only, C <= 128 and a multiple of 4, element
  counts within int32, no empty tensors. Channels are zero-padded to a multiple of 4 and split into chunks of
  <= 128 (FB-OCC samples 16 x 80 = 1280 history channels; ``BEVKIT_NPU_OP_LIMITS=port``: one call with all of
  them, as the DrivingSDK port makes it, see :mod:`bevkit.op_limits`); other modes run the portable code. The kernel also
  rejects inf/NaN, which is not checked here (that would cost a device sync per call). Its wrapper serves only
  Ascend910* (A2/A3) and Ascend950* SoCs and raises NotImplementedError on others (mx_driving/ops/
  grid_sampler3d_v1.py): on another SoC the portable code runs.
* cuda / portable: ``torch.nn.functional.grid_sample`` (native on CPU and CUDA).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from bevkit import op_limits
from bevkit.ops.dispatch import backend_for, log_once, mx_driving, npu_soc_name

OP = "grid_sample_3d"

NPU_MAX_C = 128
NPU_C_MULTIPLE = 4
NPU_MAX_ELEMENTS = 2 ** 31 - 1


def grid_sample_3d(input: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                   align_corners: bool = True) -> torch.Tensor:
    """Sample input [N, C, D, H, W] at grid [N, Do, Ho, Wo, 3] ((x, y, z) -> (W, H, D), in [-1, 1]).

    Same semantics as ``F.grid_sample`` for 5-D inputs ('bilinear' is trilinear); returns [N, C, Do, Ho, Wo] in
    the input's dtype. Gradients flow to input and grid. The grid is cast to the input's dtype.
    """
    if input.dim() != 5 or grid.dim() != 5 or grid.shape[-1] != 3 or grid.shape[0] != input.shape[0]:
        raise ValueError(f"{OP}: input must be [N, C, D, H, W] and grid [N, Do, Ho, Wo, 3] with the same N; got "
                         f"{tuple(input.shape)} and {tuple(grid.shape)}")
    if backend_for(input) == "npu":
        mx = mx_driving(OP)
        if mx is not None:
            out = _npu(mx, input, grid, mode, padding_mode, align_corners)
            if out is not None:
                return out
    return F.grid_sample(input, grid.to(input.dtype), mode=mode, padding_mode=padding_mode,
                         align_corners=align_corners)


#: SoC name fragments grid_sampler3d_v1's wrapper serves (mx_driving/ops/grid_sampler3d_v1.py, 26.1).
NPU_SOCS = ("Ascend910", "Ascend950")


def _npu(mx, input, grid, mode, padding_mode, align_corners):
    if not hasattr(mx, "grid_sampler3d_v1"):  # DrivingSDK branch_v7.0.RC1 has none
        log_once(OP, "this mx_driving has no grid_sampler3d_v1; using the portable code")
        return None
    soc = npu_soc_name(input)
    if soc is not None and not any(s in soc for s in NPU_SOCS):
        log_once(OP, f"grid_sampler3d_v1 serves only Ascend910B/910C/950 SoCs, not {soc}; using the portable code")
        return None
    if (mode, padding_mode, bool(align_corners)) != ("bilinear", "zeros", True):
        log_once(OP, f"grid_sampler3d_v1 supports only bilinear/zeros/align_corners=True, not {mode}/{padding_mode}/"
                     f"align_corners={align_corners}; using the portable code")
        return None
    if input.numel() == 0 or grid.numel() == 0:
        log_once(OP, "empty input: grid_sampler3d_v1 rejects empty tensors; using the portable code")
        return None
    n, c, d, h, w = input.shape
    _, do, ho, wo, _ = grid.shape
    spatial = max(d * h * w, do * ho * wo)
    # BEVKIT_NPU_OP_LIMITS=port: all channels in one call, as the FB-OCC port passes C=1280 (bevkit.op_limits)
    max_c = c + (-c) % NPU_C_MULTIPLE if op_limits.port() else NPU_MAX_C
    cmax = min(max_c, NPU_MAX_ELEMENTS // (n * spatial) // NPU_C_MULTIPLE * NPU_C_MULTIPLE)
    if cmax < NPU_C_MULTIPLE or grid.numel() > NPU_MAX_ELEMENTS:
        log_once(OP, f"input {tuple(input.shape)} / grid {tuple(grid.shape)} exceed grid_sampler3d_v1's int32 "
                     "element limits even with 4 channels per call; using the portable code")
        return None
    dtype = input.dtype
    if dtype != torch.float32:
        log_once(OP, f"grid_sampler3d_v1 takes float32, not {dtype}: computing in float32")
    x = input.float()
    g = grid.float().contiguous()
    cp = int(math.ceil(c / NPU_C_MULTIPLE) * NPU_C_MULTIPLE)
    if cp != c:
        log_once(OP, f"grid_sampler3d_v1 needs C % 4 == 0: zero-padding C={c} to {cp} (exact; padding is cut off)")
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, cp - c))
    if cmax > NPU_MAX_C:
        log_once(OP, f"port op limits: C={cp} channels in one grid_sampler3d_v1 call (documented: C <= 128)",
                 logging.INFO)
    if cp > cmax:
        log_once(OP, f"grid_sampler3d_v1 takes at most {cmax} channels: splitting C={cp} into chunks of {cmax}")
    outs = [mx.grid_sampler3d_v1(x[:, s:s + cmax].contiguous(), g, "bilinear", "zeros", True)
            for s in range(0, cp, cmax)]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    if cp != c:
        out = out[:, :c]
    return out.to(dtype)
