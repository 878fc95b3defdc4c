"""BEVDepth speed techniques (the DrivingSDK port's, model_examples/BEVDepth/bevdepth.patch, and the kit's data
path), each a named runtime patch in :mod:`bevkit.models.bevdepth.patches`:

- ``get_geometry`` as elementwise multiply-and-sum: the three 4x4 transforms of the frustum (inv(ida), then
  sensor2ego @ inv(K), then bda) each as four broadcast products summed over the last axis, on [B, N, D*H*W, 4]
  rows, instead of upstream's rank-7 broadcast matmuls (the NPU's matmul takes rank <= 6; a K = 4 matmul wastes
  the cube unit). Upstream's association order is kept (the port folds bda into the camera matrix first);
- the head's target indices as int32 (the port's dtype for NPU gathers);
- 8 training dataloader workers on accelerators (the port's; ``BEVKIT_WORKERS`` overrides, on every device);
- precomputed depth ground truth (``depth_gt/<image>.bin`` from ``python -m bevkit.data.depth_gt``) read instead
  of projecting lidar in the loader, and then no lidar file read at all: upstream's ``get_image`` loads every
  key frame's lidar sweep although only ``get_lidar_depth`` uses it;
- opt-in (``BEVKIT_JPEG_DRAFT=1``, :mod:`bevkit.data.jpeg`): camera JPEGs decoded at the reduced DCT scale the
  resize needs (PIL draft mode). Off by default: it changes the pixels the model sees (PSNR in bevdepth/README.md).
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Optional

import torch

from bevkit import env, log
from bevkit.data import jpeg
from bevkit.device import run_device

# --------------------------------------------------------------------------------------------------- geometry


def _transform_rows(mat: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """rows[..., P, 4] of points transformed by mat[..., 4, 4]: out[..., p, i] = sum_j mat[..., i, j] p[..., p, j],
    as four broadcast products summed over the last axis (one per output coordinate)."""
    return torch.stack([(mat[..., i:i + 1, :] * points).sum(-1) for i in range(mat.shape[-2])], -1)


def get_geometry(self, sensor2ego_mat, intrin_mat, ida_mat, bda_mat):
    """Frustum points -> ego (BDA-augmented) coordinates [B, N, D, H, W, 3] by multiply-and-sum.

    Same maths and association order as upstream ``BaseLSSFPN.get_geometry``:
    bda @ ((sensor2ego @ K^-1) @ scale_uv(ida^-1 @ p)) with scale_uv(x) = (x_u * x_d, x_v * x_d, x_d, x_1).
    """
    batch_size, num_cams = sensor2ego_mat.shape[:2]
    depth, height, width, _ = self.frustum.shape
    points = self.frustum.reshape(1, 1, -1, 4)
    points = _transform_rows(ida_mat.inverse().unsqueeze(2), points)
    points = torch.cat((points[..., :2] * points[..., 2:3], points[..., 2:]), -1)
    combine = sensor2ego_mat.matmul(torch.inverse(intrin_mat))
    points = _transform_rows(combine.unsqueeze(2), points)
    if bda_mat is not None:
        points = _transform_rows(bda_mat[:, None, None], points)
    return points[..., :3].reshape(batch_size, num_cams, depth, height, width, 3)


# ----------------------------------------------------------------------------------------------------- targets

_int32_gather: dict = {}


def int32_gather_ok(device: torch.device) -> bool:
    """Does ``Tensor.gather`` take int32 indices on this device? NPU: yes (torch_npu; the port's targets are int32).
    CPU: torch >= 2.2 yes, torch 2.1 refuses ("Expected dtype int64 for index"); asked once per device type."""
    kind = device.type
    if kind == "npu":
        return True
    if kind not in _int32_gather:
        try:
            torch.zeros(2, device=device).gather(0, torch.zeros(1, dtype=torch.int32, device=device))
            _int32_gather[kind] = True
        except RuntimeError:
            _int32_gather[kind] = False
    return _int32_gather[kind]


def _targets_int32(original):
    """CenterHead.get_targets with the box-centre indices (`inds`, gathered from the head's output) as int32."""

    @functools.wraps(original)
    def get_targets(self, gt_bboxes_3d, gt_labels_3d):
        heatmaps, anno_boxes, inds, masks = original(self, gt_bboxes_3d, gt_labels_3d)
        if inds and int32_gather_ok(inds[0].device):
            inds = [ind.int() for ind in inds]  # values < H*W of the BEV map (128 x 128)
        return heatmaps, anno_boxes, inds, masks

    return get_targets


# --------------------------------------------------------------------------------------------------- workers

#: Training dataloader workers per process on accelerators: the port's 8 (upstream: 4).
ACCELERATOR_WORKERS = 8


def train_workers(device=None) -> Optional[int]:
    """BEVKIT_WORKERS, else 8 on NPU/CUDA; None (upstream's 4) on CPU."""
    workers = env.get_int("BEVKIT_WORKERS")
    if workers is not None:
        if workers < 0:
            raise ValueError(f"BEVKIT_WORKERS={workers}: use 0 or more dataloader workers")
        return workers
    return ACCELERATOR_WORKERS if (device or run_device()).kind in ("npu", "cuda") else None


def _train_dataloader(original):
    """The training DataLoader rebuilt with the kit's worker count (same dataset, batch, collate, drop_last; still
    inside Lightning's dataloader hook, so its sampler replacement sees the new one)."""

    @functools.wraps(original)
    def train_dataloader(self):
        loader = original(self)
        workers = train_workers()
        if workers is None or workers == loader.num_workers:
            return loader
        return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, num_workers=workers,
                                           drop_last=loader.drop_last, shuffle=False, collate_fn=loader.collate_fn,
                                           sampler=None, pin_memory=loader.pin_memory)

    return train_dataloader


# --------------------------------------------------------------------------------- depth ground truth, lidar

DEPTH_GT_DIR = "depth_gt"
_warned_online = []


def depth_gt_path(data_root: str, image_filename: str) -> str:
    """depth_gt/<image basename>.bin (the DrivingSDK port's layout)."""
    return os.path.join(data_root, DEPTH_GT_DIR, os.path.basename(image_filename) + ".bin")


def depth_gt_mode() -> str:
    """BEVKIT_DEPTH_GT: auto (default), precomputed or online."""
    mode = env.get("BEVKIT_DEPTH_GT") or "auto"
    if mode not in ("auto", "precomputed", "online"):
        raise ValueError(f"BEVKIT_DEPTH_GT={mode!r}: use auto, precomputed or online")
    return mode


def missing_depth_gt(path: str, data_root: str) -> FileNotFoundError:
    return FileNotFoundError(f"precomputed depth ground truth {path} is missing: run "
                             f"'python -m bevkit.data.depth_gt {data_root}' (or set BEVKIT_DEPTH_GT=online)")


def _get_lidar_depth(original):
    @functools.wraps(original)
    def get_lidar_depth(self, lidar_points, img, lidar_info, cam_info):
        mode = depth_gt_mode()
        if mode != "online":
            path = depth_gt_path(self.data_root, cam_info["filename"])
            if os.path.exists(path):
                import numpy as np

                return np.fromfile(path, dtype=np.float32).reshape(-1, 3)
            if mode == "precomputed":
                raise missing_depth_gt(path, self.data_root)
            if not _warned_online:
                _warned_online.append(path)
                log.get("bevdepth").warning(f"no precomputed depth GT ({path}); projecting lidar online, which is "
                                            f"slow. Run 'python -m bevkit.data.depth_gt {self.data_root}'.")
        return original(self, lidar_points, img, lidar_info, cam_info)

    return get_lidar_depth



_reading = threading.local()


class UnreadPoints:
    """Stands for a lidar sweep that was not read because the depth ground truth is precomputed: upstream's
    ``.reshape(-1, 5)[..., :4]`` keep it, any other use is an error (nothing may silently get no points)."""

    def reshape(self, *args, **kwargs):
        return self

    def __getitem__(self, key):
        return self

    def __getattr__(self, name):
        raise RuntimeError("lidar points were not read: the depth ground truth is precomputed "
                           "(BEVKIT_DEPTH_GT=online reads them)")


UNREAD = UnreadPoints()


class _NumpyForDataset:
    """numpy as nusc_det_dataset sees it: ``fromfile`` returns UNREAD while get_image skips the lidar sweeps."""

    def __init__(self, base):
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)

    def fromfile(self, *args, **kwargs):
        if getattr(_reading, "skip_lidar", False):
            return UNREAD
        return self._base.fromfile(*args, **kwargs)


def _numpy_for_dataset(original):
    return _NumpyForDataset(original)


def key_frame_depth_files(dataset, cam_infos, cams) -> bool:
    """True when every camera of the key frame has its depth_gt file (and depth is not forced online); with
    BEVKIT_DEPTH_GT=precomputed a missing file is an error naming it."""
    mode = depth_gt_mode()
    if mode == "online":
        return False
    for cam in cams:
        path = depth_gt_path(dataset.data_root, cam_infos[0][cam]["filename"])
        if not os.path.exists(path):
            if mode == "precomputed":
                raise missing_depth_gt(path, dataset.data_root)
            return False
    return True


def _get_image(original):
    """get_image without reading lidar files when only precomputed depth would use them (no lidar fusion)."""

    @functools.wraps(original)
    def get_image(self, cam_infos, cams, lidar_infos=None):
        skip = bool(lidar_infos) and self.return_depth and not self.use_fusion \
            and key_frame_depth_files(self, cam_infos, cams)
        if not skip:
            return original(self, cam_infos, cams, lidar_infos)
        _reading.skip_lidar = True
        try:
            return original(self, cam_infos, cams, lidar_infos)
        finally:
            _reading.skip_lidar = False

    return get_image


# -------------------------------------------------------------------------------------------- JPEG draft mode


def _img_transform_draft(original):
    """img_transform with the camera image decoded at the scale of its resize (BEVKIT_JPEG_DRAFT=1)."""

    @functools.wraps(original)
    def img_transform(img, resize, resize_dims, crop, flip, rotate):
        return original(jpeg.draft(img, resize_dims), resize, resize_dims, crop, flip, rotate)

    return img_transform
