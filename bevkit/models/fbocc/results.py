"""FB-OCC evaluation -> $BEVKIT_RUN_DIR/metrics.json (via bevkit.results.write_metrics)."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Mapping, Optional

#: Occ3D classes scored by Metric_mIoU (ids 0..16; 17 'free' is excluded from the mIoU).
OCC3D_CLASSES = ("others", "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle",
                 "pedestrian", "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat",
                 "sidewalk", "terrain", "manmade", "vegetation")


def _number(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def occupancy_metrics(evaluate_output: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """{'miou': %, 'per_class_iou': {class: % or None}} from NuScenesDataset.evaluate's dict, or None when it
    holds no occupancy result. Classes absent from GT and prediction have IoU NaN upstream -> None here."""
    if "Overall" not in evaluate_output:
        return None
    return {
        "miou": _number(evaluate_output["Overall"]),
        "per_class_iou": {name: _number(evaluate_output.get(name)) for name in OCC3D_CLASSES},
        "metric": "Occ3D-nuScenes mIoU (camera mask, 17 classes, %)",
    }


def record_metrics(evaluate_output: Mapping[str, Any]) -> Optional[str]:
    """Write metrics.json when running under the launcher (BEVKIT_RUN_DIR set); returns the path."""
    metrics = occupancy_metrics(evaluate_output)
    if metrics is None or not os.environ.get("BEVKIT_RUN_DIR"):
        return None
    try:
        from bevkit.results import write_metrics
    except ImportError:  # launcher package not installed: same file, written here
        path = os.path.join(os.environ["BEVKIT_RUN_DIR"], "metrics.json")
        with open(path, "w") as f:
            json.dump(metrics, f, indent=2)
        return path
    return str(write_metrics(metrics))
