"""BEVDepth's metrics: mAP, NDS and the TP errors from the nuScenes devkit evaluation, into metrics.json.

``DetNuscEvaluator._evaluate_single`` is wrapped by the runtime patch 'evaluator_metrics'
(:func:`record_on_evaluate`): upstream computes these numbers and drops them; the kit prints them and writes
them (lower-case keys, devkit units) to ``$BEVKIT_RUN_DIR/metrics.json`` via :func:`bevkit.results.write_metrics`.
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


def record_on_evaluate(original):
    @functools.wraps(original)
    def _evaluate_single(self, result_path, *args, **kwargs):
        detail = original(self, result_path, *args, **kwargs)
        metrics = detection_metrics(detail)
        log.get("bevdepth").info("metrics: " + ", ".join(f"{k}: {metrics[k]:.4f}" for k in METRIC_NAMES
                                                         if k in metrics))
        if env.get("BEVKIT_RUN_DIR"):
            write_metrics({k.lower(): v for k, v in metrics.items()})
        return detail

    return _evaluate_single
