"""Occ3D-nuScenes semantic occupancy mIoU, as FB-OCC evaluates it (camera-visible voxels).

The metric (facts from FB-BEV's evaluation, re-implemented): per val sample, voxels outside
``mask_camera`` are ignored; an 18x18 confusion matrix (17 classes + free) is accumulated over all
samples; per-class IoU = TP / (TP + FP + FN); mIoU = mean IoU over the 17 non-free classes
(classes absent from both prediction and ground truth are skipped), in percent, 2 decimals.

    m = OccMIoU()
    for pred, gt in pairs:                   # uint8 [200,200,16], ids 0..17 (17 = free)
        m.add(pred, gt['semantics'], mask_camera=gt['mask_camera'])
    m.result()   # {'mIoU': 39.1, 'Overall': 39.1, 'IoU': {'others': ..., ...}, 'samples': N}
"""
from __future__ import annotations

import os

import numpy as np

from .schema import OCC3D_CLASSES, OCC_KEYS

NUM_CLASSES = len(OCC3D_CLASSES)     # 18, the last is free


class OccMIoU:
    def __init__(self, num_classes: int = NUM_CLASSES, use_camera_mask: bool = True,
                 use_lidar_mask: bool = False):
        self.n = num_classes
        self.use_camera_mask = use_camera_mask
        self.use_lidar_mask = use_lidar_mask
        self.hist = np.zeros((num_classes, num_classes), np.int64)
        self.samples = 0

    def add(self, pred, gt, mask_camera=None, mask_lidar=None):
        """Accumulate one sample. pred / gt: integer class ids, same shape."""
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f'prediction shape {pred.shape} != ground truth shape {gt.shape}')
        keep = np.ones(gt.shape, bool)
        if self.use_camera_mask:
            if mask_camera is None:
                raise ValueError('mask_camera is required (use_camera_mask=True)')
            keep &= np.asarray(mask_camera).astype(bool)
        if self.use_lidar_mask:
            if mask_lidar is None:
                raise ValueError('mask_lidar is required (use_lidar_mask=True)')
            keep &= np.asarray(mask_lidar).astype(bool)
        g = gt[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        valid = (g >= 0) & (g < self.n)
        if ((p[valid] < 0) | (p[valid] >= self.n)).any():
            raise ValueError(f'prediction has class ids outside 0..{self.n - 1}')
        self.hist += np.bincount(self.n * g[valid] + p[valid],
                                 minlength=self.n ** 2).reshape(self.n, self.n)
        self.samples += 1

    def per_class_iou(self) -> np.ndarray:
        tp = np.diag(self.hist).astype(np.float64)
        with np.errstate(divide='ignore', invalid='ignore'):
            return tp / (self.hist.sum(0) + self.hist.sum(1) - tp)

    def result(self) -> dict:
        iou = self.per_class_iou()
        miou = float(np.nanmean(iou[:self.n - 1]) * 100) if np.isfinite(iou[:self.n - 1]).any() \
            else float('nan')
        return {'mIoU': round(miou, 2), 'Overall': round(miou, 2),     # 'Overall': FB-OCC's key
                'IoU': {OCC3D_CLASSES[i]: round(float(iou[i]) * 100, 2) for i in range(self.n - 1)},
                'samples': self.samples}


def load_occ_gt(data_root, scene_name: str, sample_token: str) -> dict:
    """The Occ3D labels of one sample: {'semantics', 'mask_lidar', 'mask_camera'}."""
    path = os.path.join(str(data_root), 'gts', scene_name, sample_token, 'labels.npz')
    with np.load(path) as z:
        return {k: z[k] for k in OCC_KEYS}
