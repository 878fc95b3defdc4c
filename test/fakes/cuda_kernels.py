"""Stand-ins for the compiled CUDA kernels bevkit.ops calls on CUDA (FB-BEV, BEVDepth, mmcv), for emulated cuda
runs on CPU tensors: each checks the argument contract of the real kernel and computes with bevkit's portable op.

``with install():`` registers them all through ``bevkit.ops.dispatch.stand_in('cuda', module, fake)``; every call
is recorded in ``CALLS``. Sources of the checks (pinned upstream commits, mmcv-full 1.7.2):

* FB-BEV ``mmdet3d/ops/bev_pool_v2/bev_pool.py`` + ``src/bev_pool_cuda.cu``: float depth/feat, integer ranks and
  intervals within their tensors (the kernel indexes raw memory), bev_feat_shape (B, Z, Y, X, C). The kernel
  writes one sum per interval into ranks_bev[start] (so two intervals on one cell race) and its backward
  recomputes per-point cells, so the kit promises runs of one cell each: refused otherwise.
* BEVDepth ``bevdepth/ops/voxel_pooling_{train,inference}/*.py`` + ``src/*.cpp``: contiguous inputs (asserted),
  int32 geometry, float32 or float16 with an even channel count (other dtypes leave the output at zero).
* mmcv 1.7.2 ``mmcv/ops/multi_scale_deform_attn.py`` / ``csrc``: batch divisible by min(batch, im2col_step).
  ``mmcv/ops/deform_conv.py``: bias must be False, batch divisible by min(batch, im2col_step).
  ``mmcv/ops/focal_loss.py``: int64 target [M] in [0, C] (C = background), input [M, C], weight [C] or None.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Dict, Iterator, List, Tuple

import torch

CALLS: List[Tuple[str, Dict[str, Any]]] = []
EMULATES = "cuda"


class ContractError(AssertionError):
    """A call the real CUDA kernel (or its Python wrapper) refuses or would mishandle."""


def _require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ContractError(f"{name}: {message}")


def _portable(fn, *args, **kwargs):
    from bevkit import ops

    with ops.force_backend("portable"):
        return fn(*args, **kwargs)


def bev_pool_v2(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_feat_shape, interval_starts, interval_lengths):
    from bevkit import ops

    name = "FB-BEV bev_pool_v2"
    _require(depth.is_floating_point() and feat.is_floating_point(), name, "depth and feat must be floating")
    _require(len(bev_feat_shape) == 5 and feat.shape[-1] == bev_feat_shape[4], name, "bev_feat_shape (B,Z,Y,X,C)")
    for t in (ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths):
        _require(not t.is_floating_point() and t.dim() == 1, name, "ranks and intervals must be 1-D integers")
    p = ranks_bev.numel()
    b, z, y, x, c = (int(v) for v in bev_feat_shape)
    for r, bound in ((ranks_depth, depth.numel()), (ranks_feat, feat.numel() // c), (ranks_bev, b * z * y * x)):
        _require(p == 0 or (int(r.min()) >= 0 and int(r.max()) < bound), name, "ranks outside their tensors")
    st, ln = interval_starts.long(), interval_lengths.long()
    runs = ops.compute_intervals(ranks_bev)
    _require(torch.equal(st, runs[0].long()) and torch.equal(ln, runs[1].long()) and
             (p < 2 or bool((ranks_bev[1:] >= ranks_bev[:-1]).all())), name,
             "the kit sends the runs of sorted ranks_bev (the kernel writes one sum per interval and its backward "
             "recomputes per-point cells)")
    CALLS.append(("bev_pool_v2", dict(P=p, C=c, intervals=int(st.numel()))))
    return _portable(ops.bev_pool_v2, depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_feat_shape,
                     interval_starts, interval_lengths)


def _voxel_checks(name, geom, feats_dtype, c):
    _require(geom.is_contiguous() and geom.dtype == torch.int32, name, "geom_xyz must be contiguous int32")
    _require(feats_dtype == torch.float32 or (feats_dtype == torch.float16 and c % 2 == 0), name,
             f"features must be float32, or float16 with an even C; got {feats_dtype}, C={c}")


def voxel_pooling_train(geom_xyz, input_features, voxel_num):
    from bevkit import ops

    name = "BEVDepth voxel_pooling_train"
    _require(input_features.is_contiguous(), name, "input_features must be contiguous")
    _voxel_checks(name, geom_xyz, input_features.dtype, input_features.shape[-1])
    CALLS.append(("voxel_pooling_train", dict(N=int(geom_xyz[..., 0].numel()), C=int(input_features.shape[-1]))))
    return _portable(ops.voxel_pooling_train, geom_xyz, input_features, voxel_num)


def voxel_pooling_inference(geom_xyz, depth_features, context_features, voxel_num):
    from bevkit import ops

    name = "BEVDepth voxel_pooling_inference"
    _require(depth_features.is_contiguous() and context_features.is_contiguous(), name, "inputs must be contiguous")
    _require(depth_features.dtype == context_features.dtype, name, "depth and context are read as one dtype")
    _voxel_checks(name, geom_xyz, context_features.dtype, context_features.shape[1])
    CALLS.append(("voxel_pooling_inference", dict(C=int(context_features.shape[1]))))
    return _portable(ops.voxel_pooling_inference, geom_xyz, depth_features, context_features, voxel_num)


class MultiScaleDeformableAttnFunction:
    @staticmethod
    def apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
        from bevkit import ops

        name = "mmcv MultiScaleDeformableAttnFunction"
        bs = value.shape[0]
        _require(bs % min(bs, int(im2col_step)) == 0, name, f"batch {bs} not divisible by im2col_step {im2col_step}")
        CALLS.append(("multi_scale_deformable_attn", dict(bs=bs, dtype=str(value.dtype))))
        return _portable(ops.multi_scale_deformable_attn, value, spatial_shapes, level_start_index,
                         sampling_locations, attention_weights)


def deform_conv2d(input, offset, weight, stride=1, padding=0, dilation=1, groups=1, deform_groups=1, bias=False,
                  im2col_step=32):
    from bevkit import ops

    name = "mmcv deform_conv2d"
    _require(bias is False, name, "Only support bias is False.")
    n = input.shape[0]
    _require(n == 0 or n % min(n, int(im2col_step)) == 0, name, "batch size must be divisible by im2col_step")
    CALLS.append(("deform_conv2d", dict(N=n, groups=groups, deform_groups=deform_groups)))
    return _portable(ops.deform_conv2d, input, offset, weight, stride, padding, dilation, groups, deform_groups)


def sigmoid_focal_loss(input, target, gamma=2.0, alpha=0.25, weight=None, reduction="mean"):
    from bevkit import ops

    name = "mmcv sigmoid_focal_loss"
    _require(target.dtype == torch.long and input.dim() == 2 and target.dim() == 1 and
             input.size(0) == target.size(0), name, "input [M, C] and int64 target [M]")
    _require(weight is None or (weight.dim() == 1 and weight.size(0) == input.size(1)), name, "weight must be [C]")
    CALLS.append(("sigmoid_focal_loss", dict(M=int(input.shape[0]), C=int(input.shape[1]))))
    return _portable(ops.sigmoid_focal_loss, input, target, gamma, alpha, weight, reduction)


#: kit lookup name (bevkit.ops.dispatch.kernel's ``module``) -> attributes this module provides for it
MODULES = {
    "mmdet3d.ops.bev_pool_v2.bev_pool": ("bev_pool_v2",),
    "bevdepth.ops.voxel_pooling_train": ("voxel_pooling_train",),
    "bevdepth.ops.voxel_pooling_inference": ("voxel_pooling_inference",),
    "mmcv.ops.multi_scale_deform_attn": ("MultiScaleDeformableAttnFunction",),
    "mmcv.ops.deform_conv": ("deform_conv2d",),
    "mmcv.ops.focal_loss": ("sigmoid_focal_loss",),
}


@contextlib.contextmanager
def install() -> Iterator[None]:
    """Register every stand-in for emulated cuda tensors (bevkit.ops.dispatch.stand_in) inside the block."""
    from bevkit.ops import dispatch

    here = globals()
    with contextlib.ExitStack() as stack:
        for module, attrs in MODULES.items():
            fake = types.SimpleNamespace(**{a: here[a] for a in attrs})
            stack.enter_context(dispatch.stand_in("cuda", module, fake))
        yield
