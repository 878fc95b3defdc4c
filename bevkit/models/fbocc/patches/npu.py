"""FB-OCC rewrites for the NPU's limits: every matmul at rank <= 6 (upstream broadcasts 4x4 / 3x3 matrices over
rank-7 tensors) and the stride-2 1x1x1 Conv3d shortcut as a stride-1 conv on a strided slice. The same maths as
upstream (float64 parity tests in test/fbocc_checks.py); applied on NPU only.

The matrix-times-vector products of the rewrites go through :data:`matvec`: ``torch.matmul`` unless the patch
'fbocc-npu-batch-matmul' binds it to ``bevkit.ops.batch_matvec`` (``mx_driving.npu_batch_matmul``: multiply and
sum on the vector unit, the DrivingSDK port's BatchMatmul patch)."""
from __future__ import annotations

import functools


def matvec(mat, vec):
    """mat [..., n, n] @ vec [..., n, 1] (the rewrites' rotations and projections)."""
    return mat.matmul(vec)


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
    points = matvec(torch.inverse(post_rots).reshape(bn, 1, 1, 1, 3, 3), points.unsqueeze(-1))
    points = torch.cat((points[..., :2, :] * points[..., 2:3, :], points[..., 2:3, :]), -2)
    combine = rots.matmul(torch.inverse(cam2imgs)).reshape(bn, 1, 1, 1, 3, 3)
    points = matvec(combine, points).squeeze(-1) + trans.reshape(bn, 1, 1, 1, 3)
    points = points.reshape(B, N * D, H, W, 3, 1)
    points = matvec(bda.reshape(B, 1, 1, 1, 3, 3), points).squeeze(-1)
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
    ref = matvec(torch.inverse(bda).reshape(B, 1, 1, 3, 3),
                 reference_points.reshape(1, H * W, Z, 3, 1)).squeeze(-1)                # B, HW, Z, 3
    ref = ref[:, None] - trans.reshape(B, N, 1, 1, 3)                                  # B, N, HW, Z, 3
    combine = rots.matmul(torch.inverse(intrins)).inverse().reshape(B * N, 1, 1, 3, 3)
    cam = matvec(combine, ref.reshape(B * N, H * W, Z, 3, 1)).squeeze(-1)              # BN, HW, Z, 3
    cam = torch.cat([cam[..., 0:2] / torch.maximum(cam[..., 2:3], torch.ones_like(cam[..., 2:3]) * eps),
                     cam[..., 2:3]], -1)
    cam = matvec(post_rots.reshape(B * N, 1, 1, 3, 3), cam.unsqueeze(-1)).squeeze(-1)
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



def _batch_matvec(original):
    """matvec -> bevkit.ops.batch_matvec (mx_driving.npu_batch_matmul on NPU, torch.matmul elsewhere)."""
    from bevkit.ops import batch_matvec

    return batch_matvec
