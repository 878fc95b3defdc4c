"""FB-OCC's occupancy losses: the focal loss without its .cuda() map and through bevkit.ops, and the NaN/Inf
cleaning of the voxel logits (exact, and two host syncs fewer per step)."""
from __future__ import annotations

from bevkit.models.fbocc.patches.ops import _ops


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


def _coarse_output_on_grid(original):
    """OccHead.forward without the deblock (``use_deblock=False``, the demo config): at evaluation the logits are
    brought to the grid the deblock would have produced, 2x per axis by nearest neighbour.

    Upstream supports training such a head (loss_voxel's downsampled-target path takes the 2x2x2 mode of the
    labels) but its test output stays at the coarse grid, which Occ3D's evaluator cannot compare. Nearest is the
    inverse of that downsampling: each coarse voxel's class covers its 8 fine voxels. Training is unchanged, and so
    is every head with the deblock (the reference recipe's)."""

    def forward(self, voxel_feats, *args, **kwargs):
        result = original(self, voxel_feats, *args, **kwargs)
        if self.training or self.use_deblock:
            return result
        import torch.nn.functional as F

        result['output_voxels'] = [F.interpolate(v, scale_factor=2, mode='nearest') for v in result['output_voxels']]
        return result

    return forward
