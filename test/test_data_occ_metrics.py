"""Occ3D mIoU (camera-mask evaluation, 17 classes + free) on hand-made examples."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bevkit.data.occ_metrics import OccMIoU


def test_hand_computed_iou_and_mask():
    gt = np.array([4, 4, 4, 11, 11, 17, 17, 7], np.uint8)
    pred = np.array([4, 4, 11, 11, 11, 17, 4, 0], np.uint8)
    mask = np.array([1, 1, 1, 1, 1, 1, 1, 0], np.uint8)      # the last voxel is not seen
    m = OccMIoU()
    m.add(pred, gt, mask_camera=mask)
    res = m.result()
    # car: TP 2, FP 1 (free->car), FN 1 (car->road) -> 2/4; road: TP 2, FP 1 -> 2/3
    assert res['IoU']['car'] == pytest.approx(50.0)
    assert res['IoU']['driveable_surface'] == pytest.approx(66.67)
    # pedestrian only in the unseen voxel and nowhere predicted: absent, so NaN and not averaged
    assert math.isnan(res['IoU']['pedestrian'])
    assert res['mIoU'] == pytest.approx(round((50 + 200 / 3) / 2, 2))
    assert res['Overall'] == res['mIoU'] and res['samples'] == 1


def test_accumulates_over_samples_before_dividing():
    m = OccMIoU()
    m.add(np.array([4, 17]), np.array([4, 17]), mask_camera=np.array([1, 1]))
    m.add(np.array([17, 17]), np.array([4, 17]), mask_camera=np.array([1, 1]))
    assert m.result()['IoU']['car'] == pytest.approx(50.0)     # 1 TP, 1 FN over both samples


def test_free_class_is_not_averaged_and_errors_are_clear():
    m = OccMIoU()
    m.add(np.array([17, 17, 4]), np.array([17, 17, 4]), mask_camera=np.ones(3))
    assert m.result()['mIoU'] == 100.0 and 'free' not in m.result()['IoU']
    with pytest.raises(ValueError, match='mask_camera'):
        m.add(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match='shape'):
        m.add(np.zeros(3), np.zeros(4), mask_camera=np.ones(4))
    with pytest.raises(ValueError, match='outside'):
        m.add(np.array([18]), np.array([1]), mask_camera=np.ones(1))
