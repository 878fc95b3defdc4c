"""FB-OCC runtime patches (patch set 'fbocc'): device portability, ops through bevkit.ops, NPU reformulations.

Every change to FB-BEV's behaviour that is not in fbocc/fbocc.patch is a named :class:`RuntimePatch` here,
with its reason and the devices it applies to. The replacements are written from the documented maths
(shared/reference/UPSTREAM.md), not copied; float64 parity tests in test/test_fbocc_parity.py compare each
one with the upstream formulation.

Where a rewrite applies:
- device portability and ops routing: every device where the upstream code would fail or diverge;
- rank <= 6 matmul rewrites and the Conv3d shortcut rewrite: NPU only (needed there; on CPU/CUDA the
  upstream code is already right and the rewrite measured no faster, see fbocc/README.md);
- the occupancy-loss NaN/Inf cleaning: every device (exact, and it drops two host syncs per step).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

from bevkit.patching import PatchSet, RuntimePatch

from . import runtime

FB = "mmdet3d.models.fbbev"
VT = f"{FB}.view_transformation.forward_projection.view_transformer"
BEVFORMER = f"{FB}.view_transformation.backward_projection.bevformer_utils"
SCA = f"{BEVFORMER}.spatial_cross_attention_depth"
ENCODER = f"{BEVFORMER}.bevformer_encoder"
DETECTOR = f"{FB}.detectors.fbocc"
FOCAL = f"{FB}.modules.occ_loss_utils.focal_loss"
SAMPLER = "mmdet3d.datasets.samplers.infinite_group_each_sample_in_batch_sampler"


def _ops():
    """bevkit.ops, imported when first used (it may pull in mx_driving on NPU)."""
    import bevkit.ops as ops

    return ops


def _level_start_index(spatial_shapes):
    import torch

    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))


# ------------------------------------------------------------------------------------------------
# Device portability


def _focal_init(original):
    """CustomFocalLoss.__init__ without the .cuda() call; the radial weight map follows the module."""

    def __init__(self, use_sigmoid=True, gamma=2.0, alpha=0.25, reduction='mean', loss_weight=100.0,
                 activated=False):
        import torch
        import torch.nn as nn

        nn.Module.__init__(self)
        if use_sigmoid is not True:
            raise ValueError('CustomFocalLoss: only the sigmoid focal loss exists (use_sigmoid=True).')
        self.use_sigmoid, self.gamma, self.alpha = use_sigmoid, gamma, alpha
        self.reduction, self.loss_weight, self.activated = reduction, loss_weight, activated
        # Radial weight 1 + r/r_max over the 200x200 BEV (upstream's map); a non-persistent buffer so it
        # moves with model.to(device) and stays out of checkpoints, as upstream's plain attribute did.
        self.register_buffer('c', _radial_weight(200, 200, torch.float32), persistent=False)

    return __init__


def _radial_weight(h: int, w: int, dtype):
    import torch

    ys, xs = torch.meshgrid(torch.arange(h) - h / 2, torch.arange(w) - w / 2, indexing='ij')
    r = torch.sqrt(ys.to(torch.float64) ** 2 + xs.to(torch.float64) ** 2)
    return (r / r.max() + 1).to(dtype)


def _focal_forward(original):
    """CustomFocalLoss.forward with the per-element focal term from bevkit.ops.sigmoid_focal_loss.

    Same maths as upstream: over visible voxels (target != ignore), loss = sigmoid focal loss x
    class weight x radial weight, summed over classes and averaged over voxels, times loss_weight.
    """

    def forward(self, pred, target, weight=None, avg_factor=None, ignore_index=255, reduction_override=None):
        if self.activated:  # probability inputs: upstream's python path (unused by FB-OCC)
            return original(self, pred, target, weight, avg_factor, ignore_index, reduction_override)
        B, H, W, D = target.shape
        radial = self.c
        if radial.shape != (H, W):
            radial = _radial_weight(H, W, pred.dtype)
        radial = radial.to(pred.device, pred.dtype)[None, :, :, None].expand(B, H, W, D).reshape(-1)
        visible = (target != ignore_index).reshape(-1).nonzero().squeeze(-1)
        num_classes = pred.size(1)
        pred = pred.permute(0, 2, 3, 4, 1).reshape(-1, num_classes)[visible]
        target = target.reshape(-1)[visible].long()
        per_class = _ops().sigmoid_focal_loss(pred.contiguous(), target.contiguous(), self.gamma, self.alpha,
                                              None, 'none')
        weight_mask = weight[None, :] * radial[visible, None]
        return self.loss_weight * (per_class * weight_mask).sum(-1).mean()

    return forward


def _with_device(original, param: str = 'device', collective: bool = True):
    """Call ``original`` with its hard-coded 'cuda' default replaced by the run's device."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if param not in kwargs:
            kwargs[param] = runtime.collective_device() if collective else runtime.tensor_device()
        return original(*args, **kwargs)

    return wrapper


def _module_cuda(original):
    """``model.cuda()`` in upstream's train/test code means "put the model on the run's device"."""

    def cuda(self, device=None):
        return self.to(runtime.tensor_device())

    return cuda


def _current_device(original):
    """upstream passes torch.cuda.current_device() as DDP device_ids; the kit's wrapper ignores it."""

    def current_device():
        return runtime.local_rank()

    return current_device


def _init_dist_pytorch(original):
    """mmcv's torchrun initialization binds a CUDA (or real NPU) device first: rank % torch.cuda.device_count()
    divides by zero without CUDA. CPU processes (and emulated devices) only need the process group."""

    @functools.wraps(original)
    def init(backend, **kwargs):
        if runtime.tensor_device().type != 'cpu':
            return original(backend, **kwargs)
        import torch.distributed as dist

        dist.init_process_group(backend=runtime.dist_backend(), **kwargs)

    return init


_CPU_DDP = {}


def _cpu_ddp_class(base):
    """MMDistributedDataParallel for CPU processes: mmcv only unwraps DataContainers when it has device ids, so
    batches are scattered to the CPU (mmcv's device -1) here first; the DDP gradient sync is unchanged."""
    if base in _CPU_DDP:
        return _CPU_DDP[base]
    from mmcv.parallel.scatter_gather import scatter_kwargs

    class CPUDistributedDataParallel(base):
        def _on_cpu(self, inputs, kwargs):
            inputs, kwargs = scatter_kwargs(inputs, kwargs, [-1], dim=self.dim)
            return inputs[0], kwargs[0]

        def train_step(self, *inputs, **kwargs):
            inputs, kwargs = self._on_cpu(inputs, kwargs)
            return super().train_step(*inputs, **kwargs)

        def val_step(self, *inputs, **kwargs):
            inputs, kwargs = self._on_cpu(inputs, kwargs)
            return super().val_step(*inputs, **kwargs)

        def _run_ddp_forward(self, *inputs, **kwargs):
            inputs, kwargs = self._on_cpu(inputs, kwargs)
            return self.module(*inputs, **kwargs)

    _CPU_DDP[base] = CPUDistributedDataParallel
    return CPUDistributedDataParallel


def _ddp_factory(original):
    """MMDistributedDataParallel(model, device_ids=[cuda idx], ...) -> the wrapper for the run's device.

    NPU: mmcv's NPUDistributedDataParallel; CUDA: MMDistributedDataParallel on the local GPU; CPU (and
    emulated devices): MMDistributedDataParallel with device_ids=None, i.e. torch DDP over gloo on CPU
    tensors (mmcv's scatter keeps CPU batches as they are).
    """

    def make(module, device_ids=None, **kwargs):
        kind = runtime.run_device()
        module = module.to(runtime.tensor_device())
        if runtime.tensor_device().type == 'cpu':
            return _cpu_ddp_class(original)(module, device_ids=None, **kwargs)
        if kind == 'npu':
            from mmcv.device.npu import NPUDistributedDataParallel

            return NPUDistributedDataParallel(module, device_ids=[runtime.local_rank()], **kwargs)
        return original(module, device_ids=[runtime.local_rank()], **kwargs)

    return _factory_class(original, make)


def _factory_class(original, make):
    """A subclass of ``original`` whose constructor returns the device's wrapper (an instance of ``original``
    or of one of its subclasses), so the patched name still works with isinstance and as a base class."""

    class DeviceWrapper(original):
        def __new__(cls, module, device_ids=None, **kwargs):
            if cls is not DeviceWrapper:  # a subclass defined after patching: plain construction
                return super().__new__(cls)
            return make(module, device_ids, **kwargs)

    DeviceWrapper.__name__ = DeviceWrapper.__qualname__ = f"Device{original.__name__}"
    DeviceWrapper.__bevkit_original__ = original
    return DeviceWrapper


def _dp_factory(original):
    """MMDataParallel for single-process runs (launcher 'none') on the run's device."""

    def make(module, device_ids=None, **kwargs):
        kind = runtime.run_device()
        module = module.to(runtime.tensor_device())
        if runtime.tensor_device().type == 'cpu':
            return original(module, device_ids=None, **kwargs)  # mmcv: no device ids = CPU
        if kind == 'npu':
            from mmcv.device.npu import NPUDataParallel

            return NPUDataParallel(module, device_ids=[runtime.local_rank()], **kwargs)
        return original(module, device_ids=[runtime.local_rank()], **kwargs)

    return _factory_class(original, make)


class _TorchWithRunDevice:
    """The ``torch`` module as seen by one upstream module, with tensor factories' device='cuda' mapped to the
    device collectives use (gloo: CPU; hccl: npu). Everything else is torch itself."""

    _FACTORIES = ("full", "tensor", "zeros", "ones", "empty", "arange")

    def __init__(self, base):
        self._base = base

    def __getattr__(self, name):
        attr = getattr(self._base, name)
        if name not in self._FACTORIES:
            return attr

        @functools.wraps(attr)
        def factory(*args, **kwargs):
            device = kwargs.get('device')
            if device is not None and str(device).split(':')[0] == 'cuda':
                kwargs['device'] = runtime.collective_device()
            return attr(*args, **kwargs)

        return factory


def _torch_with_run_device(original):
    return _TorchWithRunDevice(original)


class _AutocastOff:
    """``autocast(enabled=False)`` for the run's device (upstream disables only CUDA autocast)."""

    def __init__(self, enabled: bool = True, **kwargs):
        import torch

        kind = runtime.tensor_device().type
        self._ctx = torch.autocast(device_type=kind, enabled=enabled) if not enabled else None

    def __enter__(self):
        if self._ctx is not None:
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            return self._ctx.__exit__(*exc)
        return False


def _autocast_for_device(original):
    return _AutocastOff


# ------------------------------------------------------------------------------------------------
# SyncBatchNorm policy and config finalization


def sync_bn_policy(device: str, world: int) -> str:
    """'sync' keeps SyncBatchNorm; 'local' replaces it with per-process BatchNorm.

    - one process: nothing to synchronize ('local'; identical maths, no collective per BN call);
    - CPU (gloo): torch's SyncBatchNorm only runs on accelerator tensors ('local', each rank normalizes its
      own batch, which is what the DrivingSDK NPU recipe's sync_bn=False does for the ResNet-50 BNs too);
    - CUDA/NPU with several processes: 'sync' (upstream behaviour).
    """
    if world <= 1 or device == 'cpu':
        return 'local'
    return 'sync'


def _build_model(original):
    """build_model, then apply the SyncBN policy to every SyncBatchNorm (config SyncBN and the hard-coded
    nn.SyncBatchNorm of the history fusion)."""

    @functools.wraps(original)
    def build_model(*args, **kwargs):
        model = original(*args, **kwargs)
        return apply_sync_bn_policy(model)

    return build_model


def apply_sync_bn_policy(model, device: Optional[str] = None, world: Optional[int] = None):
    from mmcv.cnn.utils import revert_sync_batchnorm

    device = device or runtime.run_device()
    world = runtime.world_size() if world is None else world
    if sync_bn_policy(device, world) == 'local':
        model = revert_sync_batchnorm(model)
    return model


def _setup_multi_processes(original):
    """tools/train.py and tools/test.py call setup_multi_processes(cfg) right after --cfg-options are
    merged: the one place where the kit sees the final config before anything is built."""

    @functools.wraps(original)
    def setup_multi_processes(cfg):
        from .config import finalize

        finalize(cfg)
        return original(cfg)

    return setup_multi_processes


# ------------------------------------------------------------------------------------------------
# Ops through bevkit.ops


def _bev_pool(original):
    def bev_pool_v2(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_feat_shape, interval_starts,
                    interval_lengths):
        return _ops().bev_pool_v2(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_feat_shape,
                                  interval_starts, interval_lengths)

    bev_pool_v2.__bevkit_original__ = original
    return bev_pool_v2


def _msda_pytorch(original):
    """mmcv's MultiScaleDeformableAttention calls this name whenever value is not a CUDA tensor (CPU, NPU):
    route it through bevkit.ops (portable on CPU, mx_driving on NPU)."""

    def multi_scale_deformable_attn_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
        return _ops().multi_scale_deformable_attn(value, value_spatial_shapes,
                                                  _level_start_index(value_spatial_shapes),
                                                  sampling_locations, attention_weights)

    multi_scale_deformable_attn_pytorch.__bevkit_original__ = original
    return multi_scale_deformable_attn_pytorch


def _da_msda_forward(original):
    """DA_MSDeformableAttention.forward with the depth weighting on every device.

    Upstream applies the depth-aware weight only on its CUDA branch and silently drops it elsewhere. Here:
    offsets are normalized by the level's (W, H); each of the num_Z_anchors reference points owns
    num_points/num_Z_anchors sampling points (point-within-anchor major, anchor minor); the predicted depth
    distribution is sampled bilinearly at every anchor's projection (an MSDA call with one head, one point
    and weight 1), dotted with the one-hot of the anchor's depth bin, and multiplies the softmaxed attention
    weights of that anchor's points (no renormalization); the main MSDA then runs on the projected value.
    """
    from mmcv.runner import force_fp32

    @force_fp32()
    def forward(self, query, key=None, value=None, identity=None, query_pos=None, key_padding_mask=None,
                reference_points=None, spatial_shapes=None, level_start_index=None, bev_query_depth=None,
                pred_img_depth=None, **kwargs):
        import torch

        ops = _ops()
        if value is None:
            value = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.permute(1, 0, 2)
            value = value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        num_value = value.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if reference_points.shape[-1] != 2:
            raise ValueError(f'DA_MSDeformableAttention expects 2-d reference points, got '
                             f'{reference_points.shape[-1]}')
        anchors = reference_points.shape[2]
        if points % anchors:
            raise ValueError(f'num_points={points} is not a multiple of the {anchors} Z anchors')

        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, heads, -1)
        offsets = self.sampling_offsets(query).view(bs, num_query, heads, levels, points, 2)
        weights = self.attention_weights(query).view(bs, num_query, heads, levels * points)
        if self.disable_deformable:
            offsets = offsets * 0
            weights = weights * 0
        weights = weights.softmax(-1).view(bs, num_query, heads, levels, points)

        wh = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets)
        offsets = (offsets / wh[None, None, None, :, None, :]).view(
            bs, num_query, heads, levels, points // anchors, anchors, 2)
        locations = (reference_points[:, :, None, None, None, :, :] + offsets).view(
            bs, num_query, heads, levels, points, 2)

        # p(depth bin of each anchor) at its projection, times the softmaxed weights of that anchor's points
        output = ops.depth_weighted_deformable_attn(
            value, spatial_shapes, level_start_index, locations.contiguous(), weights.contiguous(),
            pred_img_depth, reference_points, bev_query_depth, self.im2col_step)
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return output

    forward.__bevkit_original__ = original
    return forward


class _FunctionalWithOps:
    """torch.nn.functional for fbocc.py, with 5-D grid_sample (history warp) routed through bevkit.ops."""

    def __init__(self, base):
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)

    def grid_sample(self, input, grid, mode='bilinear', padding_mode='zeros', align_corners=None):
        if input.dim() == 5:
            return _ops().grid_sample_3d(input, grid, mode=mode, padding_mode=padding_mode,
                                         align_corners=bool(align_corners))
        return self._base.grid_sample(input, grid, mode=mode, padding_mode=padding_mode,
                                      align_corners=align_corners)


def _functional_with_ops(original):
    return _FunctionalWithOps(original)


# ------------------------------------------------------------------------------------------------
# NPU reformulations (rank <= 6 matmuls, Conv3d stride <= kernel) and the occupancy-loss NaN cleaning


def lidar_coor_rank6(self, rots, trans, cam2imgs, post_rots, post_trans, bda):
    """Frustum points in the ego frame, [B,N,D,H,W,3], with every matmul at rank <= 6.

    Same maths as upstream get_lidar_coor: undo the image augmentation (post_trans, inv(post_rot)), scale
    (u, v) by the depth, apply rots @ inv(K) and trans, then the BEV augmentation. B and N are merged for
    the camera transforms, N and D for the BDA (which is per sample).
    """
    import torch

    B, N, _ = trans.shape
    D, H, W, _ = self.frustum.shape
    bn = B * N
    points = self.frustum.to(rots)[None] - post_trans.reshape(bn, 1, 1, 1, 3)
    points = torch.inverse(post_rots).reshape(bn, 1, 1, 1, 3, 3).matmul(points.unsqueeze(-1))
    points = torch.cat((points[..., :2, :] * points[..., 2:3, :], points[..., 2:3, :]), -2)
    combine = rots.matmul(torch.inverse(cam2imgs)).reshape(bn, 1, 1, 1, 3, 3)
    points = combine.matmul(points).squeeze(-1) + trans.reshape(bn, 1, 1, 1, 3)
    points = points.reshape(B, N * D, H, W, 3, 1)
    points = bda.reshape(B, 1, 1, 1, 3, 3).matmul(points).squeeze(-1)
    return points.reshape(B, N, D, H, W, 3)


def _lidar_coor(original):
    return lidar_coor_rank6


def cam2ego_coor_rank6(self, input, downsample=1):
    """Occupancy-voxel index of every frustum point (-999 outside), rank <= 6 and without fixed sizes.

    Upstream hard-codes a 0.4 m voxel and a 200x200x16 grid: the LSS grid refined 2x (the occupancy head's
    deblock factor). Both are derived from grid_config here, so the default config gives the same result.
    """
    import torch

    depth_cfg = self.grid_config['depth']
    H_in, W_in = self.input_size
    H_feat, W_feat = H_in // downsample, W_in // downsample
    d = torch.arange(*depth_cfg, dtype=torch.float).view(-1, 1, 1).expand(-1, H_feat, W_feat)
    D = d.shape[0]
    xs = torch.linspace(0, W_in - 1, W_feat, dtype=torch.float).view(1, 1, W_feat).expand(D, H_feat, W_feat)
    ys = torch.linspace(0, H_in - 1, H_feat, dtype=torch.float).view(1, H_feat, 1).expand(D, H_feat, W_feat)
    frustum = torch.stack((xs, ys, d), -1)
    rots, trans, cam2imgs, post_rots, post_trans, bda = input
    holder = _FrustumHolder(frustum)
    points = lidar_coor_rank6(holder, rots, trans, cam2imgs, post_rots, post_trans, bda)
    voxel = self.grid_interval.to(points) / 2
    size = (self.grid_size * 2).round().long().tolist()
    coor = ((points - self.grid_lower_bound.to(points)) / voxel).long()
    kept = ((coor[..., 0] >= 0) & (coor[..., 0] < size[0]) & (coor[..., 1] >= 0) & (coor[..., 1] < size[1])
            & (coor[..., 2] >= 0) & (coor[..., 2] < size[2]))
    return torch.where(kept[..., None], coor, torch.full_like(coor, -999))


class _FrustumHolder:
    def __init__(self, frustum):
        self.frustum = frustum


def _cam2ego_coor(original):
    return cam2ego_coor_rank6


def point_sampling_rank6(self, reference_points, pc_range, img_metas, cam_params=None, gt_bboxes_3d=None):
    """BEV reference points projected into every camera, with every matmul at rank <= 6.

    Same maths and outputs as upstream point_sampling: inv(bda), minus trans, inv(rots @ inv(K)), perspective
    divide by max(z, eps), post_rot/post_trans, normalize by the input size; mask = z > eps and inside
    (eps, 1 - eps). B and N are merged, and the (H, W, Z) anchors are flattened, for the matmuls.
    """
    import torch

    rots, trans, intrins, post_rots, post_trans, bda = cam_params
    B, N, _ = trans.shape
    eps = 1e-5
    ogfH, ogfW = self.final_dim
    H, W, Z, _ = reference_points.shape
    ref = torch.inverse(bda).reshape(B, 1, 1, 3, 3).matmul(
        reference_points.reshape(1, H * W, Z, 3, 1)).squeeze(-1)                     # B, HW, Z, 3
    ref = ref[:, None] - trans.reshape(B, N, 1, 1, 3)                                  # B, N, HW, Z, 3
    combine = rots.matmul(torch.inverse(intrins)).inverse().reshape(B * N, 1, 1, 3, 3)
    cam = combine.matmul(ref.reshape(B * N, H * W, Z, 3, 1)).squeeze(-1)               # BN, HW, Z, 3
    cam = torch.cat([cam[..., 0:2] / torch.maximum(cam[..., 2:3], torch.ones_like(cam[..., 2:3]) * eps),
                     cam[..., 2:3]], -1)
    cam = post_rots.reshape(B * N, 1, 1, 3, 3).matmul(cam.unsqueeze(-1)).squeeze(-1)
    cam = cam + post_trans.reshape(B * N, 1, 1, 3)
    scale = cam.new_tensor([1.0 / ogfW, 1.0 / ogfH, 1.0])
    cam = cam * scale
    mask = ((cam[..., 2:3] > eps) & (cam[..., 0:1] > eps) & (cam[..., 0:1] < (1.0 - eps))
            & (cam[..., 1:2] > eps) & (cam[..., 1:2] < (1.0 - eps)))
    cam = cam.reshape(B, N, H * W, Z, 3).transpose(0, 1)
    mask = mask.reshape(B, N, H * W, Z).transpose(0, 1)
    reference_points = ref.reshape(B, N, H, W, Z, 3)
    return reference_points, cam[..., :2], mask, cam[..., 2:3]


def _point_sampling(original):
    from mmcv.runner import force_fp32

    return force_fp32(apply_to=('reference_points', 'cam_params'))(point_sampling_rank6)


def _strided_pointwise_conv3d_cls():
    import torch.nn as nn
    import torch.nn.functional as F

    class StridedPointwiseConv3d(nn.Conv3d):
        """1x1x1 Conv3d with stride s computed as stride-1 conv on x[:, :, ::s, ::s, ::s] (exactly equal;
        NPU Conv3d does not support stride > kernel size). Same parameters and state-dict keys."""

        def forward(self, x):
            sd, sh, sw = self.stride
            return F.conv3d(x[:, :, ::sd, ::sh, ::sw], self.weight, self.bias, 1, 0, self.dilation, self.groups)

    return StridedPointwiseConv3d


def _conv1x1x1(original):
    @functools.wraps(original)
    def conv1x1x1(in_planes, out_planes, stride=1, use_spase_3dtensor=False):
        conv = original(in_planes, out_planes, stride, use_spase_3dtensor)
        if use_spase_3dtensor or conv.stride == (1, 1, 1):
            return conv
        cls = _strided_pointwise_conv3d_cls()
        conv.__class__ = cls  # same parameters, forward that never strides past the kernel
        return conv

    return conv1x1x1


def _loss_voxel(original):
    """OccHead.loss_voxel with NaN/Inf logits set to 0 by torch.nan_to_num (upstream: two boolean-index
    assignments and two asserts, i.e. host syncs; the DrivingSDK NPU port multiplied by a mask, which keeps
    NaN since NaN * 0 = NaN). Gradients at cleaned positions are 0 in both formulations."""
    import sys

    head_module = sys.modules[original.__module__]

    def loss_voxel(self, output_voxels, target_voxels, tag):
        import torch

        B, C, H, W, D = output_voxels.shape
        if target_voxels.shape[2] // H != 1:  # downsampled targets: not used by FB-OCC, keep upstream
            return original(self, output_voxels, target_voxels, tag)
        output_voxels = torch.nan_to_num(output_voxels.float(), nan=0.0, posinf=0.0, neginf=0.0)
        losses = {}
        class_weights = self.class_weights.type_as(output_voxels)
        if self.use_focal_loss:
            ce = self.focal_loss(output_voxels, target_voxels, class_weights, ignore_index=255)
        else:
            ce = head_module.CE_ssc_loss(output_voxels, target_voxels, class_weights, ignore_index=255)
        losses[f'loss_voxel_ce_{tag}'] = self.loss_voxel_ce_weight * ce
        losses[f'loss_voxel_sem_scal_{tag}'] = self.loss_voxel_sem_scal_weight * head_module.sem_scal_loss(
            output_voxels, target_voxels, ignore_index=255)
        losses[f'loss_voxel_geo_scal_{tag}'] = self.loss_voxel_geo_scal_weight * head_module.geo_scal_loss(
            output_voxels, target_voxels, ignore_index=255, non_empty_idx=self.empty_idx)
        losses[f'loss_voxel_lovasz_{tag}'] = self.loss_voxel_lovasz_weight * head_module.lovasz_softmax(
            torch.softmax(output_voxels, dim=1), target_voxels, ignore=255)
        if self.use_dice_loss:
            return original(self, output_voxels, target_voxels, tag)
        return losses

    from mmcv.runner import force_fp32

    return force_fp32()(loss_voxel)


# ------------------------------------------------------------------------------------------------
# Evaluation results -> metrics.json


def _evaluate(original):
    """NuScenesDataset.evaluate: also hand the occupancy mIoU to bevkit.results (metrics.json), and write the
    upstream results.csv into the run folder."""

    @functools.wraps(original)
    def evaluate(self, results, *args, **kwargs):
        import os

        if os.environ.get('BEVKIT_RUN_DIR') and not args:
            # upstream writes results.csv under ./test/<config>/<time> (inside the checkout): keep it in the run
            kwargs['jsonfile_prefix'] = os.path.join(os.environ['BEVKIT_RUN_DIR'], 'eval')
        out = original(self, results, *args, **kwargs)
        from .results import record_metrics

        record_metrics(out)
        return out

    return evaluate


ALL = ("npu", "cuda", "cpu")
NO_CUDA = ("npu", "cpu")

PATCHES = PatchSet("fbocc", [
    # --- config and build -------------------------------------------------------------------------
    RuntimePatch("fbocc-config-finalize", "mmdet.utils:setup_multi_processes", _setup_multi_processes,
                 why="Single hook point after --cfg-options are merged: data root -> ann files, Occ3D gts and "
                     "checkpoints; per-device fp16 / dist backend / SyncBN; the bevkit timing hook."),
    RuntimePatch("fbocc-sync-bn-policy", "mmdet3d.models:build_model", _build_model,
                 why="SyncBatchNorm (config SyncBN and the hard-coded nn.SyncBatchNorm of the history fusion) "
                     "only works on accelerators with several processes; elsewhere it becomes BatchNorm."),
    # --- device portability -----------------------------------------------------------------------
    RuntimePatch("fbocc-focal-loss-init", f"{FOCAL}:CustomFocalLoss.__init__", _focal_init,
                 why="CustomFocalLoss.__init__ calls .cuda() on its radial weight map: model build fails "
                     "without CUDA. The map becomes a non-persistent buffer that follows the module."),
    RuntimePatch("fbocc-seed-broadcast", "mmdet3d.apis:init_random_seed",
                 lambda orig: _with_device(orig), devices=NO_CUDA,
                 why="init_random_seed broadcasts the seed in a 'cuda' tensor."),
    RuntimePatch("fbocc-sampler-seed-sync", f"{SAMPLER}:sync_random_seed",
                 lambda orig: _with_device(orig), devices=NO_CUDA,
                 why="The group-each-sample sampler syncs its seed via dist.broadcast of a 'cuda' tensor."),
    RuntimePatch("fbocc-eval-collect-device", "mmdet3d.apis.test:torch", _torch_with_run_device,
                 devices=NO_CUDA,
                 why="custom_multi_gpu_test's collect_results_cpu broadcasts its temp-dir name in 'cuda' tensors."),
    RuntimePatch("fbocc-model-placement", f"{DETECTOR}:FBOCC.cuda", _module_cuda, devices=NO_CUDA,
                 why="apis/train.py and tools/test.py place the model with model.cuda(): it goes to the run's "
                     "device (npu:LOCAL_RANK or cpu) instead."),
    RuntimePatch("fbocc-current-device", "torch.cuda:current_device", _current_device, devices=NO_CUDA,
                 why="DDP construction passes torch.cuda.current_device(), which raises without CUDA; the DDP "
                     "factory ignores it."),
    RuntimePatch("fbocc-init-dist-cpu", "mmcv.runner.dist_utils:_init_dist_pytorch", _init_dist_pytorch,
                 devices=NO_CUDA,
                 why="mmcv init_dist('pytorch') calls torch.cuda.set_device(rank % device_count()) off NPU: a "
                     "ZeroDivisionError on CPU. CPU and emulated devices just join the gloo process group."),
    RuntimePatch("fbocc-ddp-train", "mmdet3d.apis.train:MMDistributedDataParallel", _ddp_factory,
                 why="DDP wrapper per device: mmcv NPUDistributedDataParallel on NPU, MMDistributedDataParallel "
                     "on CUDA, torch DDP (gloo, device_ids=None) on CPU."),
    RuntimePatch("fbocc-ddp-test", "mmcv.parallel:MMDistributedDataParallel", _ddp_factory,
                 why="tools/test.py imports MMDistributedDataParallel from mmcv.parallel (after activation)."),
    RuntimePatch("fbocc-dp-train", "mmdet3d.apis.train:MMDataParallel", _dp_factory,
                 why="Single-process (launcher none) training wraps with MMDataParallel on GPU ids."),
    RuntimePatch("fbocc-dp-test", "mmcv.parallel:MMDataParallel", _dp_factory,
                 why="Single-process tools/test.py wraps with MMDataParallel on GPU ids."),
    RuntimePatch("fbocc-depth-loss-autocast", f"{FB}.modules.depth_net:autocast", _autocast_for_device,
                 devices=NO_CUDA,
                 why="The depth BCE disables torch.cuda.amp autocast only; disable the run device's autocast."),
    RuntimePatch("fbocc-semkitti-autocast", f"{FB}.modules.occ_loss_utils.semkitti:autocast",
                 _autocast_for_device, devices=NO_CUDA,
                 why="sem/geo scal losses disable torch.cuda.amp autocast only."),
    RuntimePatch("fbocc-lovasz-autocast", f"{FB}.modules.occ_loss_utils.lovasz_softmax:autocast",
                 _autocast_for_device, devices=NO_CUDA,
                 why="Lovasz loss disables torch.cuda.amp autocast only."),
    # --- ops through bevkit.ops -------------------------------------------------------------------
    RuntimePatch("fbocc-bev-pool-v2", f"{VT}:bev_pool_v2", _bev_pool,
                 why="LSS pooling (LSSViewTransformerFunction and ...3D) needs FB-BEV's CUDA extension; "
                     "bevkit.ops.bev_pool_v2 has CUDA, NPU (mx_driving) and portable backends."),
    RuntimePatch("fbocc-bev-pool-v2-necks", "mmdet3d.models.necks.view_transformer:bev_pool_v2", _bev_pool,
                 why="The BEVDet LSS view transformers (LSSViewTransformer, LSSViewTransformer2) use the same "
                     "CUDA extension."),
    RuntimePatch("fbocc-da-msda", f"{SCA}:DA_MSDeformableAttention.forward", _da_msda_forward,
                 why="Upstream drops the depth-aware weighting whenever value is not a CUDA tensor; this forward "
                     "keeps it on every device and runs both MSDA calls through bevkit.ops."),
    RuntimePatch("fbocc-msda-self-attn", "mmcv.ops.multi_scale_deform_attn:multi_scale_deformable_attn_pytorch",
                 _msda_pytorch, devices=NO_CUDA,
                 why="mmcv MultiScaleDeformableAttention (BEV self-attention) falls back to this name off CUDA: "
                     "route it through bevkit.ops (mx_driving kernel on NPU)."),
    RuntimePatch("fbocc-history-grid-sample", f"{DETECTOR}:F", _functional_with_ops,
                 why="fuse_history's 5-D grid_sample goes through bevkit.ops.grid_sample_3d (mx_driving "
                     "grid_sampler3d on NPU; torch elsewhere)."),
    RuntimePatch("fbocc-focal-loss-op", f"{FOCAL}:CustomFocalLoss.forward", _focal_forward,
                 why="The focal term comes from bevkit.ops.sigmoid_focal_loss on every device (upstream picks "
                     "mmcv's CUDA kernel or a one-hot python version by device)."),
    # --- NPU reformulations and loss cleaning -----------------------------------------------------
    RuntimePatch("fbocc-lidar-coor-rank6", f"{VT}:LSSViewTransformerFunction3D.get_lidar_coor", _lidar_coor,
                 devices=("npu",), why="NPU matmul supports rank <= 6; upstream uses rank-7 matmuls."),
    RuntimePatch("fbocc-lidar-coor-rank6-2d", f"{VT}:LSSViewTransformerFunction.get_lidar_coor", _lidar_coor,
                 devices=("npu",), why="Same rank-7 matmuls in the 2-D LSS view transformer."),
    RuntimePatch("fbocc-cam2ego-coor-rank6", f"{VT}:LSSViewTransformerFunction3D.get_cam2ego_coor",
                 _cam2ego_coor, devices=("npu",),
                 why="Rank-7 matmuls; also derives upstream's hard-coded 0.4 m / 200x200x16 from grid_config."),
    RuntimePatch("fbocc-point-sampling-rank6", f"{ENCODER}:bevformer_encoder.point_sampling", _point_sampling,
                 devices=("npu",), why="Rank-7 matmuls when projecting BEV anchors into the cameras."),
    RuntimePatch("fbocc-conv3d-shortcut-stride", f"{FB}.modules.resnet3d:conv1x1x1", _conv1x1x1,
                 devices=("npu",),
                 why="NPU Conv3d does not support stride > kernel size (the 1x1x1 stride-2 shortcut convs)."),
    RuntimePatch("fbocc-occ-loss-nan", f"{FB}.heads.occupancy_head:OccHead.loss_voxel", _loss_voxel,
                 why="Clear NaN/Inf logits with nan_to_num (exact, no host sync); the NPU port's multiply-by-"
                     "mask kept NaN."),
    # --- results ----------------------------------------------------------------------------------
    RuntimePatch("fbocc-metrics-json", "mmdet3d.datasets.nuscenes_dataset:NuScenesDataset.evaluate", _evaluate,
                 why="Write the occupancy mIoU and per-class IoU to $BEVKIT_RUN_DIR/metrics.json."),
])
