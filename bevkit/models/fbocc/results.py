"""FB-OCC's metrics: the Occ3D mIoU and per-class IoU from upstream's evaluation, into metrics.json.

``NuScenesDataset.evaluate`` is wrapped by the runtime patch 'fbocc-metrics-json' (:func:`record_on_evaluate`):
the result goes to ``$BEVKIT_RUN_DIR/metrics.json`` through :func:`bevkit.results.write_metrics`.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Dict, Mapping, Optional

from bevkit import env
from bevkit.results import write_metrics

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
    if metrics is None or not env.get("BEVKIT_RUN_DIR"):
        return None
    path = write_metrics(metrics)
    return str(path) if path is not None else None


def record_on_evaluate(original):
    """NuScenesDataset.evaluate: also hand the occupancy mIoU to metrics.json, and write the upstream
    results.csv into the run folder."""

    @functools.wraps(original)
    def evaluate(self, results, *args, **kwargs):
        run_dir = env.get("BEVKIT_RUN_DIR")
        if run_dir and not args:
            # upstream writes results.csv under ./test/<config>/<time> (inside the checkout): keep it in the run
            kwargs['jsonfile_prefix'] = os.path.join(run_dir, 'eval')
        out = original(self, results, *args, **kwargs)
        record_metrics(out)
        return out

    return evaluate
