"""FB-OCC patches that route its operators through :mod:`bevkit.ops` (one contract per op; the tensor's device
picks mx_driving on NPU, the compiled kernels on CUDA, portable PyTorch elsewhere)."""
from __future__ import annotations


def _ops():
    """bevkit.ops, imported when first used (it may pull in mx_driving on NPU)."""
    import bevkit.ops as ops

    return ops


def _level_start_index(spatial_shapes):
    import torch

    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))


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

