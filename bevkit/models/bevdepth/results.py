"""BEVDepth's metrics: mAP, NDS and the TP errors from the nuScenes devkit evaluation, into metrics.json.

``DetNuscEvaluator._evaluate_single`` is wrapped by the runtime patch 'evaluator_metrics'
(:func:`record_on_evaluate`): upstream computes these numbers and drops them; the kit prints them and writes
them (lower-case keys, devkit units; ``per_class_ap``: {class: AP} as fractions) to ``$BEVKIT_RUN_DIR/metrics.json``
via :func:`bevkit.results.write_metrics`.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Mapping

from bevkit import env, log
from bevkit.results import write_metrics

METRIC_NAMES = ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE")


def detection_metrics(detail: Mapping[str, Any]) -> Dict[str, float]:
    """{'mAP': ..., 'NDS': ..., 'mATE': ...} from the devkit's metrics detail (keys like 'x/mAP')."""
    metrics = {}
    for key, value in detail.items():
        name = key.rsplit("/", 1)[-1]
        if name in METRIC_NAMES:
            metrics[name] = float(value)
    return metrics


def per_class_ap(detail: Mapping[str, Any]) -> Dict[str, float]:
    """{class: AP} from the detail's '<prefix>/<class>_AP_dist_<d>' keys: the mean over the matching distances,
    which is the devkit's per-class AP (``mean_dist_aps``; its mAP is the mean of these)."""
    by_class: Dict[str, list] = {}
    for key, value in detail.items():
        name = key.rsplit("/", 1)[-1]
        cls, sep, _dist = name.partition("_AP_dist_")
        if sep:
            by_class.setdefault(cls, []).append(float(value))
    return {cls: sum(aps) / len(aps) for cls, aps in by_class.items()}


def record_on_evaluate(original):
    @functools.wraps(original)
    def _evaluate_single(self, result_path, *args, **kwargs):
        detail = original(self, result_path, *args, **kwargs)
        metrics = detection_metrics(detail)
        log.get("bevdepth").info("metrics: " + ", ".join(f"{k}: {metrics[k]:.4f}" for k in METRIC_NAMES
                                                         if k in metrics))
        if env.get("BEVKIT_RUN_DIR"):
            write_metrics(dict({k.lower(): v for k, v in metrics.items()}, per_class_ap=per_class_ap(detail)))
        return detail

    return _evaluate_single
