"""Device-dispatched ops for FB-OCC and BEVDepth: one contract per op, correct on every device.

Each function takes the upstream contract (UPSTREAM.md 3.3) and runs on the backend chosen per call by
``bevkit.ops.dispatch`` (npu -> mx_driving, and mmcv's NPU kernel for the focal loss; cuda -> upstream/mmcv
compiled kernels when importable; cpu -> portable PyTorch); ``add_relu``, ``max_pool2d`` and ``batch_matvec``
(:mod:`bevkit.ops.fused`) are the DrivingSDK port's speed ops, torch itself off NPU; ``force_backend(name)`` or
``BEVKIT_OPS_BACKEND={portable,npu,cuda}`` forces one. ``bevkit.ops.sparse.install_spconv_shim()`` serves FB-BEV's
``spconv.pytorch`` imports from mx_driving where spconv does not import.
"""
from __future__ import annotations

from bevkit.ops.bev_pool import bev_pool_v2, compute_intervals
from bevkit.ops.deform_attn import (MultiScaleDeformableAttnFunctionCompat, depth_weighted_deformable_attn,
                                    depth_weights, multi_scale_deformable_attn, multi_scale_deformable_attn_pytorch)
from bevkit.ops.deform_conv import deform_conv2d
from bevkit.ops.dispatch import BACKENDS, backend_for, force_backend, forced_backend
from bevkit.ops.focal_loss import sigmoid_focal_loss
from bevkit.ops.fused import add_relu, batch_matvec, max_pool2d
from bevkit.ops.grid_sample import grid_sample_3d
from bevkit.ops.voxel_pooling import voxel_pooling_inference, voxel_pooling_train

__all__ = [
    "BACKENDS", "backend_for", "force_backend", "forced_backend",
    "bev_pool_v2", "compute_intervals",
    "voxel_pooling_train", "voxel_pooling_inference",
    "multi_scale_deformable_attn", "depth_weighted_deformable_attn", "depth_weights",
    "multi_scale_deformable_attn_pytorch", "MultiScaleDeformableAttnFunctionCompat",
    "grid_sample_3d", "sigmoid_focal_loss", "deform_conv2d", "add_relu", "max_pool2d", "batch_matvec",
]
