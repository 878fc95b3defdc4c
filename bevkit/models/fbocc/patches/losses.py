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
        if target_voxels.shape[2] // H != 1:  # downsampled targets (a head without the deblock): upstream's path
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


def _uniform_ratio(target_voxels, out_shape):
    """Labels for upstream's downsampled-target path when the head is coarser on some axes than on others.

    Upstream takes the mode over ratio^3 blocks with one ratio for all three axes (the first axis'). A head at
    0.8 x 0.8 x 0.4 m (2x coarser than Occ3D in x and y only) has ratios (2, 2, 1): repeating every
    label along the z axis makes the ratio 2 everywhere, and the mode over each 2x2x2 block of the repeated labels
    is the mode over the coarse voxel's own 2x2x1 block (each label counted twice)."""
    shape = tuple(target_voxels.shape[1:])
    ratios = [t // o for t, o in zip(shape, out_shape)]
    if any(t != r * o for t, r, o in zip(shape, ratios, out_shape)):
        raise ValueError(f"OccHead: occupancy labels {list(shape)} do not divide into the head's output grid "
                         f"{list(out_shape)}; set the LSS grid (grid_config) to a divisor of the label grid.")
    top = max(ratios)
    for axis, ratio in enumerate(ratios, start=1):
        if top % ratio:
            raise ValueError(f"OccHead: downsampling ratios {ratios} (labels {list(shape)} over the output grid "
                             f"{list(out_shape)}) must divide each other.")
        if ratio != top:
            target_voxels = target_voxels.repeat_interleave(top // ratio, dim=axis)
    return target_voxels


def _shift_z(voxels, layers: int, fill):
    """voxels[..., z] -> voxels[..., z + layers] along the last axis; the layers shifted in are ``fill``
    (a value, or None: the nearest edge layer repeated)."""
    import torch

    if layers == 0:
        return voxels
    depth, n = voxels.shape[-1], abs(layers)
    if n >= depth:
        raise ValueError(f"OccHead: a z offset of {layers} layers leaves nothing of a {depth}-layer grid")
    kept = voxels[..., layers:] if layers > 0 else voxels[..., :layers]
    if fill is None:
        edge = (kept[..., -1:] if layers > 0 else kept[..., :1]).expand(*kept.shape[:-1], n)
    else:
        edge = torch.full_like(voxels[..., :n], fill)
    return torch.cat([kept, edge] if layers > 0 else [edge, kept], -1)


def _labels_per_output_grid(original):
    """OccHead.loss with the labels fitted to the output grid: moved to the head's ``output_range`` (a z offset
    of whole label layers; the layers it leaves are ignored, 255), then :func:`_uniform_ratio`. Identity when the
    head predicts at the label grid, as the reference recipe's does."""

    def loss(self, output_voxels=None, output_coords_fine=None, output_voxels_fine=None, target_voxels=None,
             visible_mask=None, **kwargs):
        grids = {tuple(v.shape[2:]) for v in output_voxels or ()}
        if target_voxels is not None and len(grids) == 1:
            target_voxels = _uniform_ratio(_shift_z(target_voxels, self.output_z_offset, 255), grids.pop())
        return original(self, output_voxels=output_voxels, output_coords_fine=output_coords_fine,
                        output_voxels_fine=output_voxels_fine, target_voxels=target_voxels,
                        visible_mask=visible_mask, **kwargs)

    return loss


def _head_grids(original):
    """OccHead.__init__ that keeps its ``final_occ_size`` (upstream accepts it and drops it: the label grid, which
    a head without the deblock evaluates on) and takes ``output_range``: the range its output covers when that is
    not the label grid's ``point_cloud_range`` (the demo's LSS grid starts 0.4 m higher, so that the ground layer
    and the unseen layer below it share a coarse voxel). Only a z offset of whole label layers is supported."""

    def __init__(self, *args, final_occ_size=(256, 256, 20), output_range=None, **kwargs):
        original(self, *args, final_occ_size=final_occ_size, **kwargs)
        self.final_occ_size = tuple(int(s) for s in final_occ_size)
        labels = [float(v) for v in self.point_cloud_range]
        out = labels if output_range is None else [float(v) for v in output_range]
        layer = (labels[5] - labels[2]) / self.final_occ_size[2]
        offset = (out[2] - labels[2]) / layer
        if (len(out) != 6 or out[:2] != labels[:2] or out[3:5] != labels[3:5] or abs(out[5] - out[2] - (
                labels[5] - labels[2])) > 1e-6 or abs(offset - round(offset)) > 1e-6):
            raise ValueError(f"OccHead: output_range {out} must be point_cloud_range {labels} moved in z by whole "
                             f"label layers ({layer:g} m); set it to the LSS grid (grid_config) of the config.")
        self.output_z_offset = int(round(offset))

    return __init__


def _coarse_output_on_grid(original):
    """OccHead.forward without the deblock (``use_deblock=False``, the demo config): at evaluation the logits are
    brought to the head's ``final_occ_size`` (Occ3D's 200x200x16) by nearest neighbour, and moved from its
    ``output_range`` to the label grid (layers below the head's range repeat its lowest layer).

    Upstream supports training such a head (loss_voxel's downsampled-target path takes the mode of each coarse
    voxel's block of labels) but its test output stays at the coarse grid, which Occ3D's evaluator cannot compare.
    Nearest is the inverse of that downsampling: each coarse voxel's class covers its block of fine voxels.
    Training is unchanged, and so is every head with the deblock and no output_range (the reference recipe's)."""

    def forward(self, voxel_feats, *args, **kwargs):
        result = original(self, voxel_feats, *args, **kwargs)
        if self.training or (self.use_deblock and not self.output_z_offset):
            return result
        import torch.nn.functional as F

        def on_label_grid(v):
            if tuple(v.shape[2:]) != self.final_occ_size:
                v = F.interpolate(v, size=self.final_occ_size, mode='nearest')
            return _shift_z(v, -self.output_z_offset, None)

        result['output_voxels'] = [on_label_grid(v) for v in result['output_voxels']]
        return result

    return forward
