"""FB-OCC checks against the real upstream code, run in a child process by test/test_fbocc_upstream.py.

Why a child process: FB-BEV vendors its own ``mmdet3d`` (it registers classes into mmdet's registries), which
must not share a Python process with BEVDepth's PyPI mmdet3d. Usage::

    python test/fbocc_checks.py FBBEV_DIR OUT.json check [check ...]

Each check returns a dict of measured facts (written to OUT.json) or raises; the pytest side asserts.
"""
from __future__ import annotations

import importlib.machinery
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


# --------------------------------------------------------------------------------------------------
# helpers


def _rot_z(angle, torch):
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def camera_params(B, input_size, gen, torch, perturb=0.05):
    """nuScenes-like rig (6 cameras around the car) with random perturbations and augmentations, float64."""
    H, W = input_size
    base = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    yaws = [0.0, -0.96, 0.96, math.pi, -1.92, 1.92]
    rots, trans, intrins, post_rots, post_trans = [], [], [], [], []
    for _b in range(B):
        r, t, k, pr, pt = [], [], [], [], []
        for yaw in yaws:
            noise = torch.randn(3, 3, generator=gen, dtype=torch.float64) * perturb
            q, _ = torch.linalg.qr(torch.eye(3, dtype=torch.float64) + noise)
            q = q * torch.sign(torch.diagonal(q))[None]
            r.append(_rot_z(yaw, torch) @ base @ q)
            t.append(torch.tensor([1.0, 0.0, 1.5], dtype=torch.float64) + torch.randn(3, generator=gen,
                                                                                   dtype=torch.float64) * 0.3)
            f = W * (0.7 + 0.1 * torch.rand(1, generator=gen, dtype=torch.float64).item())
            k.append(torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], dtype=torch.float64))
            ang = (torch.rand(1, generator=gen).item() - 0.5) * 0.2
            scale = 0.9 + 0.2 * torch.rand(1, generator=gen).item()
            m = torch.eye(3, dtype=torch.float64)
            m[:2, :2] = scale * torch.tensor([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]],
                                             dtype=torch.float64)
            pr.append(m)
            tt = torch.zeros(3, dtype=torch.float64)
            tt[:2] = torch.randn(2, generator=gen, dtype=torch.float64) * 10
            pt.append(tt)
        rots.append(torch.stack(r)); trans.append(torch.stack(t)); intrins.append(torch.stack(k))
        post_rots.append(torch.stack(pr)); post_trans.append(torch.stack(pt))
    bda = []
    for _b in range(B):
        m = _rot_z((torch.rand(1, generator=gen).item() - 0.5) * 0.8, torch)
        if torch.rand(1, generator=gen).item() < 0.5:
            m = m @ torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
        bda.append(m)
    return (torch.stack(rots), torch.stack(trans), torch.stack(intrins), torch.stack(post_rots),
            torch.stack(post_trans), torch.stack(bda))


def _rel(a, b):
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())


def activated(device="cpu"):
    from bevkit.models.fbocc import runtime

    fbbev = Path(os.environ["FBBEV_ROOT"])
    return runtime.activate(str(fbbev / "tools" / "train.py"), device=device)


def applied_original(patch_name):
    from bevkit.patching import load_patch_set

    for set_name in ("common", "fbocc"):
        for patch, _owner, _attr, original in load_patch_set(set_name)._applied:
            if patch.name == patch_name:
                return original
    raise KeyError(patch_name)


def view_transformer(torch, input_size=(256, 704)):
    from mmdet3d.models.fbbev.view_transformation.forward_projection.view_transformer import \
        LSSViewTransformerFunction3D

    grid = {'x': [-40, 40, 0.8], 'y': [-40, 40, 0.8], 'z': [-1, 5.4, 0.8], 'depth': [2.0, 42.0, 0.5]}
    vt = LSSViewTransformerFunction3D(grid_config=grid, input_size=input_size, downsample=16)
    vt.frustum = vt.frustum.double()
    return vt


# --------------------------------------------------------------------------------------------------
# checks


@check
def imports():
    """The patched upstream imports on CPU without CUDA after activation (train and test entry modules too)."""
    import torch

    applied = activated()
    import importlib

    for name in ("mmdet3d.models", "mmdet3d.apis", "mmdet3d.datasets", "tools.data_converter.nuscenes_converter",
                 "deployment.eval_orin.validate_trt_outputs"):
        importlib.import_module(name)
    from mmdet3d.models.builder import DETECTORS  # noqa: F401
    from mmdet.models import DETECTORS as MMDET_DETECTORS

    return {"cuda_available": torch.cuda.is_available(), "applied": applied,
            "fbocc_registered": MMDET_DETECTORS.get("FBOCC") is not None}


@check
def lidar_coor_rank6():
    import torch

    activated()
    from bevkit.models.fbocc.patches.npu import lidar_coor_rank6 as ours
    from mmdet3d.models.fbbev.view_transformation.forward_projection.view_transformer import \
        LSSViewTransformerFunction3D

    vt = view_transformer(torch)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for trial in range(3):
        params = camera_params(2, vt.input_size, gen, torch)
        ref = LSSViewTransformerFunction3D.get_lidar_coor(vt, *params)
        got = ours(vt, *params)
        assert got.shape == ref.shape == (2, 6, 80, 16, 44, 3), got.shape
        worst = max(worst, float((got - ref).abs().max()))
    return {"max_abs_err_m": worst, "dtype": "float64", "shape": list(got.shape)}


@check
def cam2ego_coor_rank6():
    import torch

    activated()
    from bevkit.models.fbocc.patches.npu import cam2ego_coor_rank6 as ours
    from mmdet3d.models.fbbev.view_transformation.forward_projection.view_transformer import \
        LSSViewTransformerFunction3D

    vt = view_transformer(torch)
    gen = torch.Generator().manual_seed(1)
    params = camera_params(2, vt.input_size, gen, torch)
    ref = LSSViewTransformerFunction3D.get_cam2ego_coor(vt, params, downsample=16)
    got = ours(vt, params, downsample=16)
    inside = int((ref[..., 0] >= 0).sum())
    return {"mismatches": int((got != ref).any(-1).sum()), "points": int(ref[..., 0].numel()),
            "inside": inside, "shape": list(got.shape)}


@check
def point_sampling_rank6():
    import torch

    activated()
    from bevkit.models.fbocc.patches.npu import point_sampling_rank6 as ours
    from mmdet3d.models.fbbev.view_transformation.backward_projection.bevformer_utils.bevformer_encoder import \
        bevformer_encoder

    enc = bevformer_encoder.__new__(bevformer_encoder)
    torch.nn.Module.__init__(enc)
    enc.x_bound, enc.y_bound, enc.z_bound = [-40, 40, 0.8], [-40, 40, 0.8], [-1, 5.4, 1.6]
    enc.final_dim = (256, 704)
    enc.pc_range = [-40, -40, -1.0, 40, 40, 5.4]
    enc.fp16_enabled = False
    ref3d = bevformer_encoder.get_reference_points(enc, 100, 100, dim='3d', device='cpu', dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    params = camera_params(2, enc.final_dim, gen, torch)
    ref = bevformer_encoder.point_sampling(enc, ref3d.clone(), enc.pc_range, None, cam_params=params)
    got = ours(enc, ref3d.clone(), enc.pc_range, None, cam_params=params)
    errs = [float((g.double() - r.double()).abs().max()) for g, r in zip(got, ref) if g.dtype != torch.bool]
    shapes_equal = all(tuple(g.shape) == tuple(r.shape) for g, r in zip(got, ref))
    return {"max_abs_err": max(errs), "mask_mismatches": int((got[2] != ref[2]).sum()),
            "visible_anchors": int(ref[2].sum()), "shapes_equal": shapes_equal,
            "shapes": [list(r.shape) for r in ref]}


class _CudaTagged(object):
    pass


@check
def da_msda_depth_weighting():
    """Our DA_MSDeformableAttention.forward vs upstream's CUDA-branch formula computed with mmcv's reference
    MSDA (float64), plus a check that the depth weighting is really applied."""
    import torch
    import torch.nn.functional as F

    activated()
    from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction  # noqa: F401
    import importlib

    sca = importlib.import_module("mmdet3d.models.fbbev.view_transformation.backward_projection."
                                  "bevformer_utils.spatial_cross_attention_depth")
    from bevkit.models.fbocc.patches.ops import _level_start_index  # noqa: F401

    upstream_forward = applied_original("fbocc-da-msda")
    reference_msda = applied_original("fbocc-msda-self-attn")  # mmcv's multi_scale_deformable_attn_pytorch

    class Tagged(torch.Tensor):
        """Reports is_cuda so upstream takes its CUDA branch (the one with the depth weighting)."""

        @property
        def is_cuda(self):
            return True

    class RefFunction:
        @staticmethod
        def apply(value, shapes, level_start, loc, attn, im2col_step):
            return reference_msda(value.as_subclass(torch.Tensor), shapes, loc.as_subclass(torch.Tensor),
                                  attn.as_subclass(torch.Tensor))

    torch.manual_seed(0)
    m = sca.DA_MSDeformableAttention(embed_dims=32, num_heads=4, num_levels=1, num_points=8,
                                     num_Z_anchors=4).double()
    for p in m.parameters():  # non-trivial weights (init sets offsets/attention to constants)
        p.data.normal_(0, 0.3)
    bs, nq, H, W, DC = 3, 50, 8, 12, 20
    query = torch.randn(bs, nq, 32, dtype=torch.float64)
    value = torch.randn(bs, H * W, 32, dtype=torch.float64)
    ref_pts = torch.rand(bs, nq, 4, 2, dtype=torch.float64) * 1.2 - 0.1
    shapes = torch.tensor([[H, W]])
    start = torch.tensor([0])
    depth_prob = torch.softmax(torch.randn(bs, H * W, DC, dtype=torch.float64), -1)
    bins = F.one_hot(torch.randint(0, DC, (bs, nq, 4)), DC)
    kw = dict(reference_points=ref_pts, spatial_shapes=shapes, level_start_index=start,
              bev_query_depth=bins, pred_img_depth=depth_prob)
    m.batch_first = True
    ours = m(query, value=value, **kw)
    saved = (sca.MultiScaleDeformableAttnFunction_fp32, sca.torch)

    class TorchWithCuda:
        def __getattr__(self, name):
            return getattr(torch, name)

        class cuda:
            @staticmethod
            def is_available():
                return True

    sca.MultiScaleDeformableAttnFunction_fp32 = RefFunction
    sca.torch = TorchWithCuda()
    try:
        ref = upstream_forward(m, query, value=value.as_subclass(Tagged), **kw).as_subclass(torch.Tensor)
    finally:
        sca.MultiScaleDeformableAttnFunction_fp32, sca.torch = saved
    # Without the weighting (upstream's CPU fallback) the result differs: the test would catch a dropped weight.
    no_weight = upstream_forward(m, query, value=value, **kw)
    return {"max_abs_err": float((ours - ref).abs().max()), "rel_err": _rel(ours, ref),
            "diff_vs_unweighted": float((ours - no_weight).abs().max()), "shape": list(ours.shape)}


@check
def focal_loss_op():
    import torch

    activated()
    from mmdet3d.models.fbbev.modules.occ_loss_utils.focal_loss import CustomFocalLoss

    upstream_forward = applied_original("fbocc-focal-loss-op")
    torch.manual_seed(0)
    loss = CustomFocalLoss().double()
    assert loss.c.shape == (200, 200) and loss.c.device.type == "cpu"
    B, C = 1, 19
    pred = torch.randn(B, C, 200, 200, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, C, (B, 200, 200, 4))
    target[torch.rand(target.shape) < 0.3] = 255
    weight = torch.rand(C, dtype=torch.float64)
    ours = loss(pred, target, weight)
    g_ours, = torch.autograd.grad(ours, pred)
    loss_ref = CustomFocalLoss().double()
    ref = upstream_forward(loss_ref, pred, target, weight)  # CPU: upstream's one-hot python path
    g_ref, = torch.autograd.grad(ref, pred)
    return {"value": float(ours), "rel_err": abs(float(ours - ref)) / abs(float(ref)),
            "grad_max_abs_err": float((g_ours - g_ref).abs().max())}


@check
def occ_loss_nan():
    """Our loss_voxel (nan_to_num) vs upstream's (in-place zeroing) on logits with NaN/Inf: same losses and
    gradients, finite; and the DrivingSDK multiply-by-mask formulation keeps NaN."""
    import torch

    activated()
    from mmdet3d.models.fbbev.heads.occupancy_head import OccHead

    upstream_loss = applied_original("fbocc-occ-loss-nan")
    torch.manual_seed(0)
    head = OccHead(in_channels=[8], out_channel=19, num_level=1, use_focal_loss=True, empty_idx=18,
                   norm_cfg=dict(type='BN', requires_grad=True), final_occ_size=[40, 40, 4])
    B, C, X, Y, Z = 1, 19, 40, 40, 4
    logits = torch.randn(B, C, X, Y, Z)  # float32: upstream's Lovasz term casts to float
    logits[0, 3, 1, 2, 0] = float('nan')
    logits[0, 5, 4, 4, 1] = float('inf')
    logits[0, 7, 6, 1, 2] = -float('inf')
    target = torch.randint(0, C, (B, X, Y, Z))
    target[torch.rand(target.shape) < 0.2] = 255
    head.focal_loss.c = torch.ones(X, Y)  # the radial map is 200x200 upstream; use a flat one at this size

    a = logits.clone().requires_grad_(True)
    ours = head.loss_voxel(a, target, 'c_0')
    g_ours, = torch.autograd.grad(sum(ours.values()), a)
    b = logits.clone().requires_grad_(True)
    ref = upstream_loss(head, b.clone(), target, 'c_0')
    g_ref, = torch.autograd.grad(sum(ref.values()), b)
    masked = logits * (~(torch.isnan(logits) | torch.isinf(logits)))
    return {"keys_equal": sorted(ours) == sorted(ref),
            "max_abs_err": max(abs(float(ours[k] - ref[k])) for k in ref),
            "max_rel_err": max(abs(float(ours[k] - ref[k])) / max(abs(float(ref[k])), 1e-30) for k in ref),
            "n_terms": B * C * X * Y * Z, "grad_max": float(g_ref.abs().max()),
            "finite": all(bool(torch.isfinite(v)) for v in ours.values()),
            "grad_max_abs_err": float((g_ours - g_ref).abs().max()),
            "grad_finite": bool(torch.isfinite(g_ours).all()),
            "mask_multiply_keeps_nan": bool(torch.isnan(masked).any())}


@check
def coarse_occ_output():
    """Heads without the deblock: training output and losses at the coarse grid (upstream's downsampled-label
    path), evaluation logits at final_occ_size (each coarse voxel's logits on its block of fine voxels): 2x2x2
    (LSS grid 0.8 m), 2x2x1 (0.8 x 0.8 x 0.4 m) and 2x2x2 on a grid one label layer higher (output_range, the
    demo's); with the deblock, training and evaluation outputs both stay at the deblock's grid, as upstream. For
    the last two, the losses equal those of the head's own label path (loss_voxel at ratio 1) on labels
    downsampled here by the mode over each voxel's block (after moving them one layer down, 255 above)."""
    import torch

    activated()
    from mmdet3d.models.fbbev.heads.occupancy_head import OccHead

    labels_range = [-8.0, -8.0, -1.0, 8.0, 8.0, 2.2]     # 40 x 40 x 8 voxels of 0.4 m
    higher = labels_range[:2] + [-0.6] + labels_range[3:5] + [2.6]
    facts = {}
    for tag, deblock, coarse_z, output_range in (("deblock", True, 4, None), ("coarse", False, 4, None),
                                                 ("coarse_xy", False, 8, None), ("coarse_higher", False, 4, higher)):
        torch.manual_seed(0)
        head = OccHead(in_channels=[8, 8], out_channel=19, num_level=2, use_focal_loss=True, empty_idx=18,
                       soft_weights=True, norm_cfg=dict(type='BN3d', requires_grad=True), final_occ_size=[40, 40, 8],
                       point_cloud_range=labels_range, use_deblock=deblock, output_range=output_range)
        head.focal_loss.c = torch.ones(40, 40)  # the radial map is 200x200 upstream; a flat one at this size
        feats = [torch.randn(1, 8, 20, 20, coarse_z), torch.randn(1, 8, 10, 10, coarse_z // 2)]
        head.train()
        train_out = head(feats)['output_voxels'][0]
        # labels 1..18: upstream's downsampling gives label-0 voxels ('noise') unique ranks, no tie to compare
        target = torch.randint(1, 19, (1, 40, 40, 8))
        losses = head.loss(output_voxels=[train_out], target_voxels=target)
        head.eval()
        with torch.no_grad():
            test_out = head(feats)['output_voxels'][0]
            coarse = applied_original("fbocc-coarse-occ-output")(head, feats)['output_voxels'][0]
        ratio = [t // n for t, n in zip((40, 40, 8), coarse.shape[2:])]
        fine = coarse.repeat_interleave(ratio[0], 2).repeat_interleave(ratio[1], 3).repeat_interleave(ratio[2], 4)
        if output_range is not None:    # one layer higher: label layer z is output layer z - 1
            fine = torch.cat([fine[..., :1], fine[..., :-1]], -1)
        facts[tag] = {"train_shape": list(train_out.shape[2:]), "test_shape": list(test_out.shape[2:]),
                      "losses_finite": all(bool(torch.isfinite(v)) for v in losses.values()),
                      "blocks_equal_coarse": bool(torch.equal(test_out, fine if not deblock else coarse))}
        if tag in ("coarse_xy", "coarse_higher"):
            moved = target if output_range is None else torch.cat(
                [target[..., 1:], torch.full_like(target[..., :1], 255)], -1)
            rz = ratio[2]
            blocks = moved.reshape(1, 20, 2, 20, 2, 8 // rz, rz).permute(0, 1, 3, 5, 2, 4, 6).reshape(
                1, 20, 20, 8 // rz, 4 * rz)
            own = head.loss_voxel(train_out, torch.mode(blocks, dim=-1)[0], tag='c_0')
            facts[tag]["losses_equal_own_block_mode"] = all(
                torch.allclose(losses[k], own[k], rtol=1e-6, atol=0) for k in own)
    try:
        OccHead(in_channels=[8], out_channel=19, final_occ_size=[40, 40, 8], point_cloud_range=labels_range,
                norm_cfg=dict(type='BN3d', requires_grad=True),
                output_range=labels_range[:2] + [-0.7] + labels_range[3:5] + [2.5])
        facts["half_layer_offset"] = "accepted"
    except ValueError as exc:
        facts["half_layer_offset"] = str(exc)
    return facts


@check
def conv3d_shortcut():
    import torch

    activated()
    from bevkit.models.fbocc.patches.npu import _conv1x1x1
    from mmdet3d.models.fbbev.modules import resnet3d

    make = _conv1x1x1(resnet3d.conv1x1x1)
    torch.manual_seed(0)
    ours = make(8, 16, stride=2).double()
    ref = torch.nn.Conv3d(8, 16, kernel_size=1, stride=2, bias=True).double()
    ref.load_state_dict(ours.state_dict())
    worst = 0.0
    for shape in ((2, 8, 100, 100, 8), (1, 8, 25, 25, 3)):
        x = torch.randn(*shape, dtype=torch.float64)
        worst = max(worst, float((ours(x) - ref(x)).abs().max()))
        assert ours(x).shape == ref(x).shape
    return {"max_abs_err": worst, "class": type(ours).__name__, "stride_conv_calls": 0}


def _grads(torch, out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


@check
def resnet_blocks_add_relu():
    """The fused add+relu ResNet block forwards (2-D mmdet blocks, 3-D FB-BEV blocks) against upstream's, float64
    on CPU (bevkit.ops.add_relu is relu(x + y) there): outputs and gradients, with and without with_cp."""
    import torch
    import torch.nn as nn

    activated()
    from mmdet.models.backbones.resnet import BasicBlock, Bottleneck
    from mmdet3d.models.fbbev.modules import resnet3d

    from bevkit.models.fbocc.patches import speed

    torch.manual_seed(0)
    worst, cases = 0.0, []

    def compare(name, block, upstream_forward, ours_forward, x):
        block = block.double()
        for p in block.parameters():
            p.data.normal_(0, 0.2)
        out = []
        for fwd in (upstream_forward, ours_forward):
            leaf = x.clone().requires_grad_(True)
            block.zero_grad()
            y = fwd(block, leaf)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype))
            out.append((y.detach(), [leaf.grad] + [p.grad.clone() for p in block.parameters()]))
        (y_ref, g_ref), (y_ours, g_ours) = out
        nonlocal worst
        worst = max([worst, float((y_ref - y_ours).abs().max())] +
                    [float((a - b).abs().max()) for a, b in zip(g_ref, g_ours)])
        cases.append(name)

    for with_cp in (False, True):
        down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        compare(f"2d-basic-cp{with_cp}", BasicBlock(16, 32, stride=2, downsample=down, with_cp=with_cp),
                BasicBlock.forward, speed._basic_block_forward(BasicBlock.forward), torch.randn(2, 16, 12, 10).double())
        down = nn.Sequential(nn.Conv2d(16, 64, 1, stride=1, bias=False), nn.BatchNorm2d(64))
        compare(f"2d-bottleneck-cp{with_cp}", Bottleneck(16, 16, downsample=down, with_cp=with_cp),
                Bottleneck.forward, speed._bottleneck_forward(Bottleneck.forward), torch.randn(2, 16, 9, 7).double())
    norm = dict(type='BN3d', requires_grad=True)
    down = nn.Sequential(nn.Conv3d(8, 16, 1, stride=2), nn.BatchNorm3d(16))
    compare("3d-basic", resnet3d.BasicBlock(8, 16, stride=2, downsample=down, norm_cfg=norm),
            resnet3d.BasicBlock.forward, speed._basic_block3d_forward(resnet3d.BasicBlock.forward),
            torch.randn(2, 8, 10, 10, 4).double())
    down = nn.Sequential(nn.Conv3d(8, 32, 1), nn.BatchNorm3d(32))
    compare("3d-bottleneck", resnet3d.Bottleneck(8, 8, downsample=down, norm_cfg=norm),
            resnet3d.Bottleneck.forward, speed._bottleneck3d_forward(resnet3d.Bottleneck.forward),
            torch.randn(2, 8, 6, 6, 4).double())
    pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    x = torch.randn(2, 64, 33, 40, dtype=torch.float64)
    ref = pool(x)
    pool.__class__ = speed._stem_max_pool_cls()
    return {"max_abs_err": worst, "cases": cases, "stem_pool_equal": bool(torch.equal(pool(x), ref))}


@check
def trilinear_axes():
    """Trilinear resizing on reversed axes against F.interpolate, float64, at FB-OCC's shapes (FPN3D: 25x25x2 ->
    50x50x4; occupancy head: 50x50x4 -> 200x200x16), values and input gradients; and the module proxy routes
    FPN3D's and OccHead's call forms to it."""
    import torch
    import torch.nn.functional as F

    activated()
    from bevkit.models.fbocc.patches import speed

    out = {}
    gen = torch.Generator().manual_seed(3)
    for name, shape, size in (("fpn3d", (1, 4, 25, 25, 2), [50, 50, 4]), ("occ_head", (1, 3, 50, 50, 4),
                                                                          [200, 200, 16])):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
        ref = F.interpolate(x, size=size, mode='trilinear', align_corners=False)
        ours = speed.interpolate_axes_reversed(F.interpolate, x, size)
        proxy = speed._FunctionalTrilinearReversed(F)
        routed = (proxy.interpolate(x, size=size, align_corners=False, mode='trilinear'),  # FPN3D's form
                  proxy.interpolate(x, size=size, mode='trilinear', align_corners=False))  # OccHead's form
        g_ref, = _grads(torch, ref, [x])
        g_ours, = _grads(torch, ours, [x])
        ratio = max(s // d for s, d in zip(size, shape[2:]))
        out[name] = {"max_abs_err": float((ours - ref).abs().max()), "x_max": float(x.detach().abs().max()),
                     "grad_max_abs_err": float((g_ours - g_ref).abs().max()),
                     "grad_terms": 8 * ratio ** 3, "grad_out_max": 1.0 * 5,  # |g| of a standard normal < 5
                     "routed_equal": all(bool(torch.equal(r, ours)) for r in routed),
                     "scale_factor_not_routed": bool(torch.equal(
                         proxy.interpolate(x, scale_factor=2, mode='trilinear', align_corners=False),
                         F.interpolate(x, scale_factor=2, mode='trilinear', align_corners=False)))}
    return out


def _modes_see_indexing() -> bool:
    from bevkit.torchcompat import function_modes_see_indexing

    return function_modes_see_indexing()


@check
def masked_select_indexing():
    """voxel_pooling_prepare_v2 (float64) and the depth loss (float32, as upstream computes it) with boolean-mask
    indexing as masked_select: the same
    tensors bit for bit, the same gradients; and masked_select really ran."""
    import torch

    activated()
    from mmdet3d.models.fbbev.modules.depth_net import CM_DepthNet
    from mmdet3d.models.fbbev.view_transformation.forward_projection.view_transformer import \
        LSSViewTransformerFunction3D

    from bevkit.models.fbocc.patches import speed

    vt = view_transformer(torch)
    params = camera_params(1, vt.input_size, torch.Generator().manual_seed(4), torch)
    coor = LSSViewTransformerFunction3D.get_lidar_coor(vt, *params)
    prepare = LSSViewTransformerFunction3D.voxel_pooling_prepare_v2
    calls = []
    real = torch.masked_select

    def counting(*args, **kwargs):
        calls.append(args[0].dim())
        return real(*args, **kwargs)

    ref = prepare(vt, coor)
    torch.masked_select = counting
    try:
        ours = speed._masked_select_indexing(prepare)(vt, coor)
        net = CM_DepthNet.__new__(CM_DepthNet)
        net.downsample, net.sid, net.D, net.depth_channels, net.loss_depth_weight = 16, False, 80, 80, 3.0
        net.grid_config = {'depth': [2.0, 42.0, 0.5]}
        gen = torch.Generator().manual_seed(5)
        labels = torch.zeros(1, 6, 256, 704)  # float32: upstream's label one-hot is .float()
        sel = torch.rand(labels.shape, generator=gen) < 0.05
        labels[sel] = 2 + 38 * torch.rand(int(sel.sum()), generator=gen)
        preds = torch.softmax(torch.randn(1, 6, 80, 16, 44, generator=gen), 2)
        losses = []
        for fn in (CM_DepthNet.get_depth_loss, speed._masked_select_indexing(CM_DepthNet.get_depth_loss)):
            p = preds.clone().requires_grad_(True)
            loss = fn(net, labels, p)['loss_depth']
            losses.append((loss.detach(), torch.autograd.grad(loss, p)[0]))
    finally:
        torch.masked_select = real
    return {"prepare_equal": all(torch.equal(a, b) for a, b in zip(ref, ours)), "kept": int(ref[0].numel()),
            "points": int(coor[..., 0].numel()), "masked_select_dims": sorted(set(calls)), "calls": len(calls),
            "depth_loss_equal": bool(torch.equal(losses[0][0], losses[1][0])),
            "depth_grad_equal": bool(torch.equal(losses[0][1], losses[1][1])), "depth_loss": float(losses[0][0]),
            "modes_see_indexing": _modes_see_indexing()}


@check
def batch_matmul_view_transform():
    """The rank <= 6 rewrites with their matrix-times-vector products as multiply-and-sum (what
    mx_driving.npu_batch_matmul computes) against upstream's rank-7 matmuls, float64."""
    import torch

    activated()
    from mmdet3d.models.fbbev.view_transformation.backward_projection.bevformer_utils.bevformer_encoder import \
        bevformer_encoder
    from mmdet3d.models.fbbev.view_transformation.forward_projection.view_transformer import \
        LSSViewTransformerFunction3D

    from bevkit.models.fbocc.patches import npu

    def mul_sum(mat, vec):  # docs/zh/api/context/npu_batch_matmul.md: broadcast product, sum over the last dim
        return (mat * vec.transpose(-1, -2)).sum(-1, keepdim=True)

    vt = view_transformer(torch)
    gen = torch.Generator().manual_seed(6)
    params = camera_params(2, vt.input_size, gen, torch)
    ref = LSSViewTransformerFunction3D.get_lidar_coor(vt, *params)
    enc = bevformer_encoder.__new__(bevformer_encoder)
    torch.nn.Module.__init__(enc)
    enc.x_bound, enc.y_bound, enc.z_bound = [-40, 40, 0.8], [-40, 40, 0.8], [-1, 5.4, 1.6]
    enc.final_dim, enc.pc_range, enc.fp16_enabled = (256, 704), [-40, -40, -1.0, 40, 40, 5.4], False
    ref3d = bevformer_encoder.get_reference_points(enc, 100, 100, dim='3d', device='cpu', dtype=torch.float64)
    ps_ref = bevformer_encoder.point_sampling(enc, ref3d.clone(), enc.pc_range, None, cam_params=params)
    saved = npu.matvec
    npu.matvec = mul_sum
    try:
        got = npu.lidar_coor_rank6(vt, *params)
        ps = npu.point_sampling_rank6(enc, ref3d.clone(), enc.pc_range, None, cam_params=params)
    finally:
        npu.matvec = saved
    # largest term of the sums: pixel coordinates times depth (the frustum) before the camera matrices
    frustum = float(vt.frustum.abs().max()) * float(vt.frustum[..., 2].abs().max())
    return {"lidar_max_abs_err_m": float((got - ref).abs().max()), "term_magnitude": frustum,
            "lidar_max_m": float(ref.abs().max()),
            "point_sampling_rel_err": [float((a - b).abs().max() / b.abs().max())
                                       for a, b in zip(ps, ps_ref) if a.dtype != torch.bool],
            "mask_mismatches": int((ps[2] != ps_ref[2]).sum())}


def _build_tiny(torch, config="fbocc/configs/fbocc_tiny_smoke.py"):
    from mmcv import Config
    from mmdet3d.models import build_model

    from bevkit.models.fbocc.config import finalize

    cfg = Config.fromfile(str(REPO / config))
    finalize(cfg)
    model = build_model(cfg.model, train_cfg=cfg.get('train_cfg'), test_cfg=cfg.get('test_cfg'))
    model.init_weights()
    return cfg, model


def synthetic_batch(cfg, torch, B=1, seed=0, start=True):
    gen = torch.Generator().manual_seed(seed)
    H, W = cfg.data_config['input_size']
    params = [p.float() for p in camera_params(B, (H, W), gen, torch)]
    imgs = torch.randn(B, 6, 3, H, W, generator=gen)
    occ = torch.randint(0, 19, (B, 200, 200, 16), generator=gen)
    occ[torch.rand(occ.shape, generator=gen) < 0.9] = 255  # mostly invisible: cheaper losses, same code
    depth = torch.zeros(B, 6, H, W)
    sel = torch.rand(depth.shape, generator=gen) < 0.05
    depth[sel] = 2 + 38 * torch.rand(int(sel.sum()), generator=gen)
    metas = [dict(sequence_group_idx=b, start_of_sequence=start, curr_to_prev_ego_rt=torch.eye(4),
                  index=b, scene_name='scene-0001', sample_idx=str(b)) for b in range(B)]
    return dict(img_inputs=[imgs] + params, img_metas=metas, gt_occupancy=occ, gt_depth=depth,
                gt_bboxes_3d=None, gt_labels_3d=None)


def _reference_ops(torch, mmcv_msda):
    """Upstream/documented reference implementations of every op the model routes through bevkit.ops."""
    import torch.nn.functional as F

    def bev_pool_v2(depth, feat, ranks_depth, ranks_feat, ranks_bev, shape, starts, lengths):
        B, Z, Y, X, C = shape
        vals = depth.reshape(-1)[ranks_depth.long()][:, None] * feat.reshape(-1, C)[ranks_feat.long()]
        out = torch.zeros(B * Z * Y * X, C, dtype=vals.dtype).index_add_(0, ranks_bev.long(), vals)
        return out.view(B, Z, Y, X, C).permute(0, 4, 1, 2, 3).contiguous()

    def msda(value, shapes, starts, loc, attn, im2col_step=64):
        return mmcv_msda(value, shapes, loc, attn)

    def depth_weighted(value, shapes, starts, loc, attn, depth_prob, ref_pts, bins, im2col_step=64):
        bs, nq, nz = ref_pts.shape[:3]
        sampled = mmcv_msda(depth_prob.unsqueeze(2), shapes[0:1], ref_pts.reshape(bs, nq * nz, 1, 1, 1, 2),
                            ref_pts.new_ones(bs, nq * nz, 1, 1, 1)).view(bs, nq, nz, -1)
        w = (sampled * bins).sum(-1)
        P = loc.shape[4]
        w = w[:, :, None, :].expand(bs, nq, P // nz, nz).reshape(bs, nq, 1, 1, P)
        return mmcv_msda(value, shapes, loc, attn * w)

    def grid_sample_3d(input, grid, mode='bilinear', padding_mode='zeros', align_corners=True):
        return F.grid_sample(input, grid.to(input.dtype), mode=mode, padding_mode=padding_mode,
                             align_corners=align_corners)

    def sigmoid_focal_loss(pred, target, gamma, alpha, weight=None, reduction='none'):
        C = pred.shape[1]
        t = F.one_hot(target, C + 1)[:, :C].type_as(pred)
        p = pred.sigmoid()
        pt = (1 - p) * t + p * (1 - t)
        fw = (alpha * t + (1 - alpha) * (1 - t)) * pt.pow(gamma)
        return F.binary_cross_entropy_with_logits(pred, t, reduction='none') * fw

    return dict(bev_pool_v2=bev_pool_v2, multi_scale_deformable_attn=msda,
                depth_weighted_deformable_attn=depth_weighted, grid_sample_3d=grid_sample_3d,
                sigmoid_focal_loss=sigmoid_focal_loss)


@check
def model_forward_ops_parity():
    """Tiny model, forward_train + a history step: bevkit.ops vs reference ops give the same losses (float32:
    the upstream model hard-codes float32 in places, e.g. the frustum and mlp inputs)."""
    import torch

    import bevkit.ops as ops

    activated()
    cfg, model = _build_tiny(torch)
    model = model.train()
    model.do_history = True
    torch.manual_seed(0)
    refs = _reference_ops(torch, applied_original("fbocc-msda-self-attn"))

    def run(backward=False):
        model.history_bev = None
        model.zero_grad()
        torch.manual_seed(0)  # the depth net's ASPP has dropout 0.5 in training mode
        out = []
        for step, start in enumerate((True, False)):
            losses = model.forward_train(**synthetic_batch(cfg, torch, seed=step, start=start))
            out.append({k: float(v) for k, v in losses.items()})
        if backward:  # the occupancy losses alone, from the step that used the history
            sum(v for k, v in losses.items() if k.startswith('loss_voxel')).backward()
        return out

    ours = run(backward=True)
    sca = [m for m in model.modules() if type(m).__name__ == 'DA_MSDeformableAttention'][0]
    depth_grad = float(model.depth_net.depth_mlp.fc1.weight.grad.abs().sum())
    sca_grad = float(sca.value_proj.weight.grad.abs().sum())
    history_shape = list(model.history_bev.shape)
    saved = {name: getattr(ops, name) for name in refs}
    try:
        for name, fn in refs.items():
            setattr(ops, name, fn)
        ref = run()
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)
    errs = {k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for a, b in zip(ours, ref) for k in b}
    return {"losses": ours, "reference": ref, "max_rel_err": max(errs.values()), "worst": max(errs, key=errs.get),
            "finite": all(math.isfinite(v) for r in ours for v in r.values()),
            "depth_net_grad_from_occ_loss": depth_grad, "sca_value_proj_grad": sca_grad,
            "history_shape": history_shape}


@check
def tiny_train_step():
    """Tiny config, float32: forward_train with temporal fusion + backward; finite losses, grads reach the
    depth net through the depth-aware attention."""
    import torch

    activated()
    cfg, model = _build_tiny(torch)
    model.train()
    model.do_history = True
    model.history_bev = None
    t0 = time.time()
    results = []
    for step, start in enumerate((True, False)):
        batch = synthetic_batch(cfg, torch, seed=step, start=start)
        losses = model.forward_train(**batch)
        total = sum(losses.values())
        model.zero_grad()
        total.backward()
        results.append({k: float(v) for k, v in losses.items()})
    depth_grad = model.depth_net.depth_mlp.fc1.weight.grad
    sca = [m for m in model.modules() if type(m).__name__ == 'DA_MSDeformableAttention'][0]
    return {"losses": results, "finite": all(math.isfinite(v) for r in results for v in r.values()),
            "history_shape": list(model.history_bev.shape) if model.history_bev is not None else None,
            "depth_net_grad": float(depth_grad.abs().sum()) if depth_grad is not None else 0.0,
            "sca_value_proj_grad": float(sca.value_proj.weight.grad.abs().sum()),
            "seconds": time.time() - t0}


@check
def full_size_forward():
    """The 8-card config's full-size model on CPU: build, one forward_train on one synthetic sample (no
    backward), expected output shape and finite losses."""
    import torch

    activated()
    from mmcv import Config
    from mmdet3d.models import build_model

    from bevkit.models.fbocc.config import finalize

    cfg = Config.fromfile(str(REPO / "fbocc/configs/fbocc_r50_8p.py"))
    cfg.model.img_backbone.pretrained = None
    finalize(cfg)
    t0 = time.time()
    model = build_model(cfg.model)
    model.init_weights()
    params = sum(p.numel() for p in model.parameters())
    model.train()
    batch = synthetic_batch(cfg, torch)
    seen = {}
    head_forward = model.occupancy_head.forward

    def forward(*args, **kwargs):  # forward_train calls self.forward directly: hooks would not fire
        out = head_forward(*args, **kwargs)
        seen['occ'] = list(out['output_voxels'][0].shape)
        return out

    model.occupancy_head.forward = forward
    with torch.no_grad():
        losses = model.forward_train(**batch)
    import resource

    return {"params_M": params / 1e6, "occ_shape": seen.get('occ'),
            "losses": {k: float(v) for k, v in losses.items()},
            "finite": all(math.isfinite(float(v)) for v in losses.values()),
            "seconds": time.time() - t0,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


@check
def fake_npu_step():
    """The NPU code path (emulated device, fake mx_driving checking every op contract): one training step of
    the tiny model with temporal fusion, forward and backward; records which mx_driving ops ran."""
    import torch

    sys.path.insert(0, str(REPO / "test" / "fakes"))
    import mx_driving

    from bevkit.device import emulated_device

    assert emulated_device() == "npu", "run with BEVKIT_EMULATE_DEVICE=npu"
    applied = activated("npu")
    cfg, model = _build_tiny(torch)
    model = model.cuda()  # 'fbocc-model-placement': the run's device (CPU tensors standing in for NPU)
    model.train()
    model.do_history = True
    model.history_bev = None
    mx_driving.reset()
    from bevkit.models.fbocc.patches import speed

    counts = {"masked_select": 0, "trilinear_reversed": 0}
    real_select, real_trilinear = torch.masked_select, speed.interpolate_axes_reversed

    def select(*args, **kwargs):
        counts["masked_select"] += 1
        return real_select(*args, **kwargs)

    def trilinear(*args, **kwargs):
        counts["trilinear_reversed"] += 1
        return real_trilinear(*args, **kwargs)

    torch.masked_select, speed.interpolate_axes_reversed = select, trilinear
    try:
        # one step with temporal fusion on (the history starts as copies of the current frame and is warped)
        losses = model.forward_train(**synthetic_batch(cfg, torch, seed=0, start=True))
        sum(losses.values()).backward()
        train_ops = sorted({name for name, _ in mx_driving.CALLS})
        with torch.no_grad():  # evaluation: the stem max-pool needs no gradient and goes to npu_max_pool2d
            model.img_backbone(torch.randn(1, 3, *cfg.data_config['input_size']))
    finally:
        torch.masked_select, speed.interpolate_axes_reversed = real_select, real_trilinear
    results = [{k: float(v) for k, v in losses.items()}]
    convs = [type(m).__name__ for m in model.img_bev_encoder_backbone.modules()
             if type(m).__name__ == "StridedPointwiseConv3d"]
    ops_called = sorted({name for name, _ in mx_driving.CALLS})
    blockers = [f for f in sys.meta_path if type(f).__name__ == "ProfileImportBlocker"]
    return {"applied": applied, "losses": results, "ops_called": ops_called, "train_ops": train_ops,
            "strided_convs": len(convs), "stem_pool": type(model.img_backbone.maxpool).__name__,
            "add_relu_calls": len(mx_driving.calls("npu_add_relu")), "counts": counts,
            "modes_see_indexing": _modes_see_indexing(),
            "finite": all(math.isfinite(v) for r in results for v in r.values()),
            "profile": blockers[0].profile if blockers else None,
            "spconv_refused": blockers[0].why_refused("spconv") if blockers else None,
            "spconv_on_path": importlib.machinery.PathFinder.find_spec("spconv") is not None,
            "spconv_shim": bool(getattr(sys.modules.get("spconv"), "__bevkit_spconv_shim__", False))}


def main(argv):
    fbbev, out, names = argv[0], argv[1], argv[2:]
    os.environ["FBBEV_ROOT"] = str(Path(fbbev).resolve())
    os.environ.setdefault("BEVKIT_DEVICE", "cpu")
    results = {}
    for name in names:
        t0 = time.time()
        try:
            results[name] = {"ok": True, "facts": CHECKS[name](), "seconds": time.time() - t0}
        except Exception as exc:  # reported to pytest, which fails the matching test with the traceback
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc(), "seconds": time.time() - t0}
        with open(out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
