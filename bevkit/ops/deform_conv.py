"""Deformable convolution v1 with mmcv's ``deform_conv2d`` / ``DeformConv2d`` contract (BEVDepth DepthNet DCN).

offset [N, deform_groups * 2 * kh * kw, Ho, Wo] holds, per deform group g and kernel tap k = i * kw + j, the
(dy, dx) pair at channels g*2*K + 2k and g*2*K + 2k + 1. Tap k of output (ho, wo) samples the input channels of
group g bilinearly at (ho*stride_h - pad_h + i*dil_h + dy, wo*stride_w - pad_w + j*dil_w + dx), zero outside the
image; the samples are then convolved with weight [Cout, Cin/groups, kh, kw].

Output dtype: the offset's (mmcv casts input and weight to the offset's type: "the flag for whether to use fp16
or amp is the type of offset"); half inputs are computed in float32.

Backends:

* npu: ``mx_driving.deform_conv2d`` (positional ``(x, offset, weight, stride, padding, dilation, groups,
  deformable_groups)``), within its documented limits (DrivingSDK docs/zh/api/context/deform_conv2d.md):
  float32 (half is computed in float32), deformable_groups == 1, input channels a multiple of 64; other calls
  run the portable code. Chosen over mmcv's NPU branch (torch_npu's ``npu_deformable_conv2d``): it is the
  replacement mx_driving's own patcher installs for mmcv's ``DeformConv2dFunction`` (``DeformConv`` in its
  default patch set, mx_driving/patcher/mmcv_patch.py) and is documented for Atlas A2; BEVDepth's DCN (512
  channels, groups 4, one deform group) is within its limits.
* cuda: mmcv's compiled ``deform_conv2d`` when importable.
* portable: one ``F.grid_sample`` for all taps (the im2col columns) and one grouped matmul. torchvision's
  compiled deform_conv2d is not used (its C ops do not load everywhere).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from bevkit.ops.dispatch import log_once, mmcv_compiled, run_op

OP = "deform_conv2d"

#: mx_driving.deform_conv2d limits (DrivingSDK docs/zh/api/context/deform_conv2d.md).
NPU_CIN_MULTIPLE = 64
NPU_DEFORM_GROUPS = 1

IntPair = Union[int, Tuple[int, int]]


def _pair(v: IntPair) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, stride: IntPair = 1,
                  padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1, deform_groups: int = 1,
                  bias: Union[bool, None, torch.Tensor] = False, im2col_step: int = 32) -> torch.Tensor:
    """mmcv ``deform_conv2d(input, offset, weight, stride, padding, dilation, groups, deform_groups, bias=False,
    im2col_step)``; returns [N, Cout, Ho, Wo] in the offset's dtype (not necessarily contiguous: mx_driving's
    kernel returns a permuted view). ``bias`` may also be a [Cout] tensor (added after the convolution; mmcv
    itself only accepts False). im2col_step only matters to mmcv's kernel."""
    n, cin, h, w = input.shape
    cout, cin_g, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    if cin % groups or cout % groups or cin_g * groups != cin or cin % deform_groups:
        raise ValueError(f"{OP}: input channels {cin}, weight {tuple(weight.shape)}, groups {groups} and "
                         f"deform_groups {deform_groups} are inconsistent")
    if tuple(offset.shape) != (n, deform_groups * 2 * kh * kw, ho, wo):
        raise ValueError(f"{OP}: offset must be [{n}, {deform_groups * 2 * kh * kw}, {ho}, {wo}] for this input and "
                         f"kernel; got {tuple(offset.shape)}")
    bias_t: Optional[torch.Tensor] = bias if isinstance(bias, torch.Tensor) else None
    args = (input, offset, weight, (sh, sw), (ph, pw), (dh, dw), groups, deform_groups)
    fn = mmcv_compiled(OP, input, "mmcv.ops.deform_conv", "deform_conv2d", deform_conv2d, devices=("cuda",))
    if fn is not None:
        out = fn(*args, False, im2col_step)
    else:
        out = run_op(OP, input, portable=lambda: _portable(*args, ho, wo), npu=lambda mx: _npu(mx, *args, ho, wo))
    return out if bias_t is None else out + bias_t.to(out.dtype).view(1, -1, 1, 1)


def _npu(mx, input, offset, weight, stride, padding, dilation, groups, dg, ho, wo):
    n, cin = input.shape[:2]
    if input.numel() == 0 or offset.numel() == 0:
        return None
    if dg != NPU_DEFORM_GROUPS or cin % NPU_CIN_MULTIPLE:
        log_once(OP, f"mx_driving.deform_conv2d takes deformable_groups == 1 and input channels % 64 == 0, not "
                     f"deform_groups={dg}, C_in={cin}; using the portable code")
        return None
    out = mx.deform_conv2d(input.float(), offset.float(), weight.float(), stride, padding, dilation, groups, dg)
    return out.to(offset.dtype)


def _portable(input, offset, weight, stride, padding, dilation, groups, dg, ho, wo):
    n, cin, h, w = input.shape
    cout, cin_g, kh, kw = weight.shape
    k = kh * kw
    out_dtype = offset.dtype  # mmcv: input.type_as(offset), weight.type_as(input)
    dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    dev = input.device
    if n * cout * ho * wo == 0:
        return offset.new_zeros(n, cout, ho, wo)
    # Sampling positions, in pixels: base grid of each tap plus its learned offset.
    ky = torch.arange(kh, device=dev, dtype=dtype).repeat_interleave(kw) * dilation[0]
    kx = torch.arange(kw, device=dev, dtype=dtype).repeat(kh) * dilation[1]
    oy = torch.arange(ho, device=dev, dtype=dtype) * stride[0] - padding[0]
    ox = torch.arange(wo, device=dev, dtype=dtype) * stride[1] - padding[1]
    off = offset.to(dtype).view(n, dg, k, 2, ho, wo)
    py = ky.view(1, 1, k, 1, 1) + oy.view(1, 1, 1, ho, 1) + off[:, :, :, 0]
    px = kx.view(1, 1, k, 1, 1) + ox.view(1, 1, 1, 1, wo) + off[:, :, :, 1]
    # grid_sample with align_corners=False maps pixel p to (2p + 1) / size - 1 (valid for size 1 too).
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], -1).view(n * dg, k * ho, wo, 2)
    cols = F.grid_sample(input.to(dtype).reshape(n * dg, cin // dg, h, w), grid, mode="bilinear",
                         padding_mode="zeros", align_corners=False)  # [n*dg, cin/dg, k*ho, wo]
    cols = cols.view(n, groups, cin_g * k, ho * wo)
    out = torch.matmul(weight.to(dtype).view(groups, cout // groups, cin_g * k), cols)
    return out.view(n, cout, ho, wo).to(out_dtype)
