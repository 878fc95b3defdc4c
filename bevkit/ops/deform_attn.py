"""Multi-scale deformable attention (mmcv contract) and FB-OCC's depth-aware variant.

``multi_scale_deformable_attn``: for every batch b, query q, head h, level l and point p, bilinearly sample
the level-l value map of head h (as [Dh, H_l, W_l]) at pixel (x * W_l - 0.5, y * H_l - 0.5) with zeros outside,
multiply by the attention weight and sum over l and p. Output [bs, nq, nH*Dh], head-major channels.

``depth_weighted_deformable_attn``: the cross-attention step of FB-OCC's ``DA_MSDeformableAttention``
(UPSTREAM.md 1.2, item 5): the attention weights are multiplied (no renormalisation) by the probability of each
Z anchor's depth bin, read from the predicted depth distribution bilinearly at the anchor's reference point.
Upstream applies that weighting only when the value lives on CUDA and silently drops it elsewhere; here it is
applied on every device.

Backends:

* npu: ``mx_driving.multi_scale_deformable_attn`` within its documented limits (embed_dims a multiple of 8 and
  <= 256, num_heads <= 8, num_points*num_levels <= 64, no empty tensors): head dims are zero-padded to a multiple
  of 8 (exact; the padding is cut off; ``BEVKIT_NPU_OP_LIMITS=port`` passes them unpadded, as the DrivingSDK
  port, see :mod:`bevkit.op_limits`), and heads, channel blocks and points are split into calls whose outputs
  are concatenated (heads, channels) or summed (points).
* cuda: mmcv's compiled ``MultiScaleDeformableAttnFunction`` when importable.
* portable: ``F.grid_sample`` per level (mmcv's pure-PyTorch formulation) laid out points-before-queries so the
  weighted sum runs over contiguous rows, and without mmcv's stacking copy; the depth weighting reads only the
  anchor's own depth bin (4 bilinear taps of one channel instead of sampling all D channels and taking a one-hot
  dot product).

Precision: half inputs are computed in float32 (float64 stays float64), like FB-OCC's ``_fp32`` kernels; the
output has the value's dtype, as mmcv's ``MultiScaleDeformableAttnFunction`` and mx_driving's kernel return it
outside autocast (mx_driving's ``custom_fwd(cast_inputs=float32)`` casts only under autocast).
"""
from __future__ import annotations

import logging
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from bevkit import op_limits
from bevkit.ops.dispatch import backend_for, log_once, run_op

OP = "multi_scale_deformable_attn"
OP_DEPTH = "depth_weighted_deformable_attn"

#: mx_driving.multi_scale_deformable_attn limits (DrivingSDK docs/zh/api/context/multi_scale_deformable_attn.md).
NPU_DIM_MULTIPLE = 8
NPU_MAX_DIM = 256
NPU_MAX_HEADS = 8
NPU_MAX_LEVEL_POINTS = 64


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, op=OP):
    if value.dim() != 4:
        raise ValueError(f"{op}: value must be [bs, num_keys, num_heads, head_dims]; got {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"{op}: sampling_locations must be [bs, nq, num_heads, num_levels, num_points, 2]; "
                         f"got {tuple(sampling_locations.shape)}")
    bs, nq, nh, nl, npt, _ = sampling_locations.shape
    if tuple(attention_weights.shape) != (bs, nq, nh, nl, npt):
        raise ValueError(f"{op}: attention_weights must be {[bs, nq, nh, nl, npt]} to match sampling_locations; "
                         f"got {list(attention_weights.shape)}")
    if value.shape[0] != bs or value.shape[2] != nh:
        raise ValueError(f"{op}: value {tuple(value.shape)} disagrees with sampling_locations "
                         f"{tuple(sampling_locations.shape)} on bs or num_heads")
    if tuple(spatial_shapes.shape) != (nl, 2) or tuple(level_start_index.shape) != (nl,):
        raise ValueError(f"{op}: spatial_shapes must be [{nl}, 2] (H, W) and level_start_index [{nl}]; got "
                         f"{tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}")


def multi_scale_deformable_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                                sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                                im2col_step: int = 64) -> torch.Tensor:
    """mmcv ``MultiScaleDeformableAttnFunction`` contract.

    Args:
        value: [bs, num_keys, num_heads, head_dims], num_keys = sum of H_l * W_l.
        spatial_shapes: [num_levels, 2] integer (H, W) per level.
        level_start_index: [num_levels] integer offset of each level in num_keys.
        sampling_locations: [bs, nq, num_heads, num_levels, num_points, 2] normalized (x, y) in [0, 1].
        attention_weights: [bs, nq, num_heads, num_levels, num_points].
        im2col_step: batch chunking of mmcv's CUDA kernel (other backends ignore it).

    Returns [bs, nq, num_heads * head_dims] in value's dtype; gradients flow to value, sampling_locations and
    attention_weights.
    """
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    out = _dispatch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step)
    return out if out.dtype == value.dtype else out.to(value.dtype)


def _dispatch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):

    def cuda(fn):
        if fn is MultiScaleDeformableAttnFunctionCompat:  # a runtime patch pointed mmcv at us: no recursion
            log_once(OP, "mmcv's MultiScaleDeformableAttnFunction is bevkit's own here; using the portable code")
            return None
        cd = _compute_dtype(value)
        # mmcv's kernel asserts bs % min(bs, im2col_step) == 0; the step is only a batching knob: use a divisor.
        bs = value.shape[0]
        step = max(1, min(bs, int(im2col_step)))
        while bs % step:
            step -= 1
        return fn.apply(value.to(cd), spatial_shapes, level_start_index, sampling_locations.to(cd),
                        attention_weights.to(cd), step)

    return run_op(
        OP, value,
        portable=lambda: _portable(value, spatial_shapes, level_start_index, sampling_locations, attention_weights),
        npu=lambda mx: _npu(mx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights),
        cuda=("mmcv.ops.multi_scale_deform_attn", "MultiScaleDeformableAttnFunction", cuda,
              "mmcv's compiled MultiScaleDeformableAttnFunction"))


def _levels(spatial_shapes, level_start_index, num_keys: int, op=OP) -> List[Tuple[int, int, int]]:
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    if sum(h * w for h, w in shapes) != num_keys:
        raise ValueError(f"{op}: value has {num_keys} keys but spatial_shapes {shapes} cover "
                         f"{sum(h * w for h, w in shapes)}")
    for (h, w), s in zip(shapes, starts):
        # The kernels read value rows start .. start + H*W - 1 of each level: outside [0, num_keys) is out of bounds.
        if s < 0 or s + h * w > num_keys:
            raise ValueError(f"{op}: level_start_index {starts} with spatial_shapes {shapes} reads past the "
                             f"{num_keys} keys of value; level_start_index must be the offsets of the levels")
    return [(h, w, s) for (h, w), s in zip(shapes, starts)]


def _portable(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    bs, num_keys, nh, dh = value.shape
    _, nq, _, nl, npt, _ = sampling_locations.shape
    cd = _compute_dtype(value, sampling_locations, attention_weights)
    levels = _levels(spatial_shapes, level_start_index, num_keys)
    if bs * nq * nh * dh == 0:
        return value.new_zeros(bs, nq, nh * dh, dtype=cd)
    # [bs*nh, dh, keys]: one copy of value into grid_sample's channel-first layout.
    v = value.to(cd).permute(0, 2, 3, 1).reshape(bs * nh, dh, num_keys)
    # Points before queries ([.., P, nq]): the weighted sum over points then runs over contiguous query rows, which
    # is much faster than mmcv's reduction over a trailing size-P axis.
    # grid in [-1, 1] with align_corners=False is exactly the pixel (x*W - 0.5, y*H - 0.5) of the kernel.
    grids = sampling_locations.to(cd).permute(0, 2, 3, 4, 1, 5).contiguous() * 2 - 1  # [bs, nh, L, P, nq, 2]
    weights = attention_weights.to(cd).permute(0, 2, 3, 4, 1)  # [bs, nh, L, P, nq]
    out = None
    for lvl, (h, w, start) in enumerate(levels):
        v_l = v[:, :, start:start + h * w].reshape(bs * nh, dh, h, w)
        g_l = grids[:, :, lvl].reshape(bs * nh, npt, nq, 2)
        sampled = F.grid_sample(v_l, g_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        o_l = _WeightedPointSum.apply(sampled, weights[:, :, lvl].reshape(bs * nh, npt, nq))  # [bs*nh, dh, nq]
        out = o_l if out is None else out + o_l
    return out.view(bs, nh * dh, nq).transpose(1, 2).contiguous()


class _WeightedPointSum(torch.autograd.Function):
    """out[n, d, q] = sum_p s[n, d, p, q] * w[n, p, q] for s [N, D, P, Q], w [N, P, Q].

    Accumulating slice by slice (P passes forward, D passes for the weight gradient) over contiguous query rows
    is 2-5x faster on CPU than broadcasting a [N, D, P, Q] product and reducing it, and holds no such temporary.
    """

    @staticmethod
    def forward(ctx, s, w):
        ctx.save_for_backward(s, w)
        out = s[:, :, 0] * w[:, None, 0]
        for p in range(1, s.shape[2]):
            out.addcmul_(s[:, :, p], w[:, None, p])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        s, w = ctx.saved_tensors
        grad_s = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_s = g.unsqueeze(2) * w.unsqueeze(1)
        if ctx.needs_input_grad[1]:
            if s.shape[1] <= 32:
                grad_w = s[:, 0] * g[:, 0, None]
                for d in range(1, s.shape[1]):
                    grad_w.addcmul_(s[:, d], g[:, d, None])
            else:
                grad_w = (s * g.unsqueeze(2)).sum(1)
        return grad_s, grad_w


def _npu(mx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    bs, num_keys, nh, dh = value.shape
    _, nq, _, nl, npt, _ = sampling_locations.shape
    if value.numel() == 0 or attention_weights.numel() == 0 or spatial_shapes.numel() == 0:
        log_once(OP, "empty input: mx_driving.multi_scale_deformable_attn rejects empty tensors; using the "
                     "portable code")
        return None
    if nl > NPU_MAX_LEVEL_POINTS:
        log_once(OP, f"{nl} levels exceed multi_scale_deformable_attn's num_points*num_levels <= 64; using the "
                     "portable code")
        return None
    dtype = value.dtype if value.dtype in (torch.float32, torch.float16) else torch.float32
    value = value.to(dtype)
    sampling_locations = sampling_locations.to(dtype)
    attention_weights = attention_weights.to(dtype)
    # BEVKIT_NPU_OP_LIMITS=port: unpadded head dims, as the FB-OCC port passes 10 (bevkit.op_limits)
    dp = dh if op_limits.port() else int(math.ceil(dh / NPU_DIM_MULTIPLE) * NPU_DIM_MULTIPLE)
    if dp % NPU_DIM_MULTIPLE:
        log_once(OP, f"port op limits: head dims {dp} unpadded (documented: a multiple of 8)", logging.INFO)
    if dp != dh:
        log_once(OP, f"multi_scale_deformable_attn needs head dims % 8 == 0: zero-padding {dh} to {dp} "
                     "(exact; the padding is cut off)")
        value = F.pad(value, (0, dp - dh))
    hstep = min(nh, NPU_MAX_HEADS)
    pstep = min(npt, NPU_MAX_LEVEL_POINTS // nl)
    cstep = min(dp, NPU_MAX_DIM)
    if (hstep, pstep, cstep) != (nh, npt, dp):
        log_once(OP, f"num_heads={nh}, num_levels*num_points={nl * npt}, head dims={dp} exceed "
                     "multi_scale_deformable_attn's limits (heads <= 8, levels*points <= 64, dims <= 256): "
                     f"splitting into calls of {hstep} heads, {pstep} points, {cstep} dims")
    shapes = spatial_shapes.contiguous()
    starts = level_start_index.contiguous()
    heads = []
    for h0 in range(0, nh, hstep):
        h1 = min(nh, h0 + hstep)
        blocks = []
        for c0 in range(0, dp, cstep):
            v = value[:, :, h0:h1, c0:c0 + cstep].contiguous()
            acc = None
            for p0 in range(0, npt, pstep):
                loc = sampling_locations[:, :, h0:h1, :, p0:p0 + pstep].contiguous()
                att = attention_weights[:, :, h0:h1, :, p0:p0 + pstep].contiguous()
                part = mx.multi_scale_deformable_attn(v, shapes, starts, loc, att)
                acc = part if acc is None else acc + part
            blocks.append(acc.view(bs, nq, h1 - h0, -1))
        heads.append(blocks[0] if len(blocks) == 1 else torch.cat(blocks, -1))
    out = heads[0] if len(heads) == 1 else torch.cat(heads, 2)  # [bs, nq, nh, dp]
    if dp != dh:
        out = out[..., :dh]
    return out.reshape(bs, nq, nh * dh)


# --------------------------------------------------------------------------------------------------------------
# FB-OCC depth-aware cross attention


def _bin_index(depth_bins: torch.Tensor, nz: int, op=OP_DEPTH):
    """(bin index [bs,nq,Z] int64, scale [bs,nq,Z] or None) for integer bins / one-hot; None for soft weights."""
    if depth_bins.dtype.is_floating_point:
        return None
    if depth_bins.dim() == 3:
        return depth_bins.long(), None
    # F.one_hot output: the bin is the argmax; the value there (0 for an all-zero row) scales the weight, exactly
    # like the dot product with the one-hot row would.
    idx = depth_bins.argmax(-1)
    return idx, depth_bins.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def depth_weights(depth_prob: torch.Tensor, spatial_shape: Sequence[int], reference_points: torch.Tensor,
                  depth_bins: torch.Tensor) -> torch.Tensor:
    """Depth weight of every Z anchor: p(anchor's depth bin) at the anchor's reference point; [bs, nq, Z].

    depth_prob [bs, H*W, D] is sampled bilinearly (zeros outside, pixel = (x*W - 0.5, y*H - 0.5)) at
    reference_points [bs, nq, Z, 2] and dotted with the anchor's bin: depth_bins is [bs, nq, Z] integer bin
    indices, [bs, nq, Z, D] integer one-hot (upstream's ``bev_query_depth``), or [bs, nq, Z, D] float weights.
    ``spatial_shape`` = (H, W) of the depth map (level 0 of the attention's value).
    """
    bs, hw, nd = depth_prob.shape
    h, w = (int(s) for s in spatial_shape)
    if h * w != hw:
        raise ValueError(f"{OP_DEPTH}: depth_prob has {hw} pixels but spatial shape {(h, w)} has {h * w}")
    if reference_points.dim() != 4 or reference_points.shape[0] != bs or reference_points.shape[-1] != 2:
        raise ValueError(f"{OP_DEPTH}: reference_points must be [bs={bs}, nq, Z, 2]; got "
                         f"{tuple(reference_points.shape)}")
    nq, nz = reference_points.shape[1:3]
    if tuple(depth_bins.shape[:3]) != (bs, nq, nz) or depth_bins.dim() not in (3, 4) or \
            (depth_bins.dim() == 4 and depth_bins.shape[3] != nd):
        raise ValueError(f"{OP_DEPTH}: depth_bins must be [bs, nq, Z] bin indices or [bs, nq, Z, D={nd}] one-hot/"
                         f"weights matching reference_points {tuple(reference_points.shape)}; got "
                         f"{tuple(depth_bins.shape)}")
    backend = backend_for(depth_prob)
    binned = _bin_index(depth_bins, nz)
    if backend == "portable" and binned is not None:
        return _depth_weights_gather(depth_prob, h, w, reference_points, *binned)
    # Kernel backends (and soft weights): sample the whole depth distribution at the reference points like
    # upstream does (one head, one level, one point with weight 1), then take the dot product with the bins.
    cd = _compute_dtype(depth_prob, reference_points)
    shapes = torch.tensor([[h, w]], dtype=torch.int64, device=depth_prob.device)
    starts = torch.zeros(1, dtype=torch.int64, device=depth_prob.device)
    loc = reference_points.to(cd).reshape(bs, nq * nz, 1, 1, 1, 2)
    sampled = multi_scale_deformable_attn(depth_prob.to(cd).unsqueeze(2), shapes, starts, loc,
                                          loc.new_ones(bs, nq * nz, 1, 1, 1)).view(bs, nq, nz, nd)
    if binned is None:
        return (sampled * depth_bins.to(sampled.dtype)).sum(-1)
    idx, scale = binned
    out = sampled.gather(-1, idx.clamp(0, nd - 1).unsqueeze(-1)).squeeze(-1)
    scale = _bin_scale(idx, nd, scale, out.dtype)
    return out * scale


def _depth_weights_gather(depth_prob, h, w, reference_points, idx, scale):
    """Bilinear read of channel idx of depth_prob at the reference points: 4 taps, one gather."""
    bs, hw, nd = depth_prob.shape
    cd = _compute_dtype(depth_prob, reference_points)
    flat = depth_prob.to(cd).reshape(-1)
    x = reference_points[..., 0].to(cd) * w - 0.5
    y = reference_points[..., 1].to(cd) * h - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = (x - x0).unsqueeze(-1), (y - y0).unsqueeze(-1)
    dev = flat.device
    xs = x0.long().unsqueeze(-1) + torch.tensor([0, 1, 0, 1], device=dev)  # taps (x0,y0) (x1,y0) (x0,y1) (x1,y1)
    ys = y0.long().unsqueeze(-1) + torch.tensor([0, 0, 1, 1], device=dev)
    wx = torch.cat([1 - fx, fx], -1).repeat(1, 1, 1, 2)
    wy = torch.cat([1 - fy, fy], -1).repeat_interleave(2, -1)
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    base = torch.arange(bs, device=dev).view(bs, 1, 1, 1) * hw
    pix = base + ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)
    taps = flat[pix * nd + idx.clamp(0, nd - 1).unsqueeze(-1)]
    out = (taps * (wx * wy).masked_fill(~inside, 0)).sum(-1)
    return out * _bin_scale(idx, nd, scale, cd)


def _bin_scale(idx, nd, scale, dtype):
    """Per anchor factor: 0 for a bin index outside [0, D) (no one-hot column to dot with), else the one-hot
    value (1 for plain indices)."""
    valid = ((idx >= 0) & (idx < nd)).to(dtype)
    return valid if scale is None else valid * scale.to(dtype)


def depth_weighted_deformable_attn(value: torch.Tensor, spatial_shapes: torch.Tensor,
                                   level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                                   attention_weights: torch.Tensor, depth_prob: torch.Tensor,
                                   reference_points: torch.Tensor, depth_bins: torch.Tensor,
                                   im2col_step: int = 64) -> torch.Tensor:
    """FB-OCC ``DA_MSDeformableAttention`` attention step, with the depth weighting on every device.

    Args (shapes as inside ``DA_MSDeformableAttention.forward``; bs = B * num_cams, nq = max_len):
        value: [bs, num_keys, num_heads, head_dims] projected image context (``value`` after value_proj/view).
        spatial_shapes: [num_levels, 2] (H, W); level 0 must be the depth map's resolution.
        level_start_index: [num_levels].
        sampling_locations: [bs, nq, num_heads, num_levels, P, 2], P = num_Z_anchors * points_per_anchor,
            ordered point-within-anchor major, anchor minor (sampling point j belongs to anchor j % Z), as
            upstream builds them from ``reference_points[:, :, None, None, None, :, :] + offsets``.
        attention_weights: [bs, nq, num_heads, num_levels, P], already softmax-normalised.
        depth_prob: [bs, H0*W0, D] predicted depth distribution (upstream ``pred_img_depth``).
        reference_points: [bs, nq, Z, 2] normalised (x, y) image reference point of every Z anchor (upstream's
            broadcast view [bs, nq, 1, 1, 1, Z, 2] is accepted too).
        depth_bins: the anchor's depth bin: [bs, nq, Z] integer bin indices, or upstream's
            ``bev_query_depth`` one-hot [bs, nq, Z, D] (integer; float values are used as soft weights).
        im2col_step: forwarded to mmcv's CUDA kernel.

    Computes w[b, q, z] = depth_weights(depth_prob, spatial_shapes[0], reference_points, depth_bins), multiplies
    attention_weights[b, q, h, l, j] by w[b, q, j % Z] (no renormalisation) and returns
    ``multi_scale_deformable_attn(value, ..., sampling_locations, weighted)``: [bs, nq, num_heads*head_dims] in
    value's dtype, or float32 for half inputs under autocast (upstream's ``_fp32`` function casts them).
    Gradients flow to value, sampling_locations, attention_weights, depth_prob (and reference_points).
    """
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, OP_DEPTH)
    if value.dtype in (torch.float16, torch.bfloat16) and _autocast_enabled(value):
        # Upstream runs this step through MultiScaleDeformableAttnFunction_fp32 (custom_fwd(cast_inputs=float32)),
        # as mx_driving's kernel does: under autocast the inputs are cast and the result is float32.
        value = value.float()
    bs, nq, nh, nl, npt, _ = sampling_locations.shape
    if reference_points.dim() == 7 and reference_points.shape[2:5] == (1, 1, 1):
        reference_points = reference_points.reshape(bs, nq, -1, 2)  # upstream's [bs, nq, 1, 1, 1, Z, 2] view
    nz = reference_points.shape[2] if reference_points.dim() == 4 else -1
    if nz <= 0 or npt % nz or tuple(reference_points.shape[:2]) != (bs, nq):
        raise ValueError(f"{OP_DEPTH}: reference_points must be [bs={bs}, nq={nq}, Z, 2] with Z dividing the "
                         f"{npt} sampling points; got {tuple(reference_points.shape)}")
    hw0 = [int(v) for v in spatial_shapes[0].tolist()]  # one tiny host copy on device tensors
    w = depth_weights(depth_prob, hw0, reference_points, depth_bins)  # [bs, nq, Z]
    w = w.unsqueeze(2).expand(bs, nq, npt // nz, nz).reshape(bs, nq, 1, 1, npt)
    weighted = attention_weights.to(w.dtype) * w
    return multi_scale_deformable_attn(value, spatial_shapes, level_start_index, sampling_locations, weighted,
                                       im2col_step)


def _autocast_enabled(tensor: torch.Tensor) -> bool:
    """Is autocast on for the tensor's (real) device? (Emulated NPU autocast is CPU autocast.)"""
    kind = tensor.device.type
    try:
        return bool(torch.is_autocast_enabled(kind))  # torch >= 2.4
    except TypeError:
        if kind == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        if kind == "cuda":
            return bool(torch.is_autocast_enabled())
        npu = getattr(torch, "npu", None)
        return bool(npu is not None and npu.is_autocast_enabled())


def multi_scale_deformable_attn_pytorch(value: torch.Tensor, value_spatial_shapes: torch.Tensor,
                                        sampling_locations: torch.Tensor,
                                        attention_weights: torch.Tensor) -> torch.Tensor:
    """Drop-in for mmcv's ``multi_scale_deformable_attn_pytorch`` (same signature; returns value's dtype).

    A runtime patch can rebind ``mmcv.ops.multi_scale_deform_attn.multi_scale_deformable_attn_pytorch`` to this:
    mmcv's ``MultiScaleDeformableAttention`` calls it whenever the value is not a CUDA tensor, and it dispatches
    like every bevkit op (mx_driving on NPU, portable on CPU).
    """
    shapes = value_spatial_shapes
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    out = multi_scale_deformable_attn(value, shapes, starts, sampling_locations, attention_weights)
    return out.to(value.dtype)


class MultiScaleDeformableAttnFunctionCompat:
    """Drop-in for mmcv's ``MultiScaleDeformableAttnFunction`` (only ``apply``, same positional arguments).

    For a runtime patch of mmcv's ``MultiScaleDeformableAttention`` on NPU, where torch_npu's transfer_to_npu
    sends NPU tensors down mmcv's CUDA branch. Do not install it on CUDA: there the compiled kernel is the point
    (bevkit's cuda backend refuses it and runs the portable code instead of recursing).
    """

    @staticmethod
    def apply(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
              im2col_step=64):
        return multi_scale_deformable_attn(value, value_spatial_shapes, value_level_start_index,
                                           sampling_locations, attention_weights, im2col_step)
