"""Config helpers for FB-OCC: where the upstream configs are, and the kit's last word on a loaded config.

Our configs (fbocc/configs/*.py) inherit the upstream config through ``_base_``; mmcv resolves a base path
relative to the config file unless it is absolute, so the kit's configs compute it from ``FBBEV_ROOT`` (set
by :func:`bevkit.models.fbocc.runtime.activate` from the entry script's location, or by the launcher)
with a fallback to ``upstream/FB-BEV`` next to the kit.

:func:`finalize` runs inside tools/train.py and tools/test.py right after ``--cfg-options`` are merged
(patch 'fbocc-config-finalize'). It makes every data and checkpoint path follow ``data_root`` (upstream
derives them once, at config load, so ``--cfg-options data_root=...`` alone would not move them), and
applies the per-device policy (dist backend, fp16, SyncBN) and the kit's timing hook.
"""
from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

UPSTREAM_CONFIG = "occupancy_configs/fb_occ/fbocc-r50-cbgs_depth_16f_16x4_20e.py"

#: Checkpoint file names the reference recipe loads (sha256 in bevkit.models.fbocc.prepare.CHECKPOINTS).
BACKBONE_CKPT = "resnet50-0676ba61.pth"
DEPTH_PRETRAIN_CKPT = "r50_256x705_depth_pretrain.pth"


def fbbev_root() -> Path:
    """The FB-BEV checkout the configs inherit from."""
    env = os.environ.get("FBBEV_ROOT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "upstream" / "FB-BEV"


def upstream_config_path() -> Path:
    return fbbev_root() / UPSTREAM_CONFIG


def _walk(node: Any) -> Iterator[dict]:
    """Every dict (mmcv ConfigDict included) inside a config tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _walk(value)


def _join(root: str, name: str) -> str:
    return posixpath.join(root.rstrip("/") + "/", name)


def rebase_data_paths(cfg, data_root: Optional[str] = None, ckpt_dir: Optional[str] = None) -> Dict[str, str]:
    """Point ann files, Occ3D gts and checkpoints at ``data_root`` (default: cfg.data_root).

    - ``data.{train,val,test}.ann_file`` -> DATA_ROOT/<same file name>; ``data_root`` keys -> DATA_ROOT;
    - every ``occupancy_path`` (top level, datasets, pipelines) -> DATA_ROOT/gts;
    - relative checkpoint paths (``load_from``, backbone ``pretrained``) -> CKPT_DIR/<file name>, where
      CKPT_DIR is ``cfg.ckpt_dir``, else DATA_ROOT/ckpts when that folder exists; otherwise they stay relative to
      the working directory, as upstream has them (ckpts/ in the FB-BEV checkout).
    Returns what changed (for the log).
    """
    data_root = data_root or cfg.get("data_root")
    if not data_root:
        return {}
    data_root = str(data_root).rstrip("/") + "/"
    changed: Dict[str, str] = {}
    cfg.data_root = data_root
    gts = _join(data_root, "gts")
    if "occupancy_path" in cfg:
        cfg.occupancy_path = gts
    for node in _walk(cfg._cfg_dict if hasattr(cfg, "_cfg_dict") else cfg):
        if "ann_file" in node and isinstance(node["ann_file"], str):
            new = _join(data_root, posixpath.basename(node["ann_file"]))
            if new != node["ann_file"]:
                changed[node["ann_file"]] = new
            node["ann_file"] = new
        if "occupancy_path" in node:
            node["occupancy_path"] = gts
        if "data_root" in node and isinstance(node["data_root"], str):
            node["data_root"] = data_root
    ckpt_dir = ckpt_dir or cfg.get("ckpt_dir")
    if not ckpt_dir and os.path.isdir(_join(data_root, "ckpts")):
        ckpt_dir = _join(data_root, "ckpts")
    if not ckpt_dir:  # upstream layout: ckpts/ relative to the working directory (the FB-BEV checkout)
        return changed
    load_from = cfg.get("load_from")
    if isinstance(load_from, str) and not os.path.isabs(load_from):
        cfg.load_from = _join(ckpt_dir, posixpath.basename(load_from))
        changed[load_from] = cfg.load_from
    backbone = cfg.get("model", {}).get("img_backbone", {})
    pretrained = backbone.get("pretrained") if hasattr(backbone, "get") else None
    if isinstance(pretrained, str) and not pretrained.startswith(("torchvision://", "open-mmlab://", "http")) \
            and not os.path.isabs(pretrained):
        backbone["pretrained"] = _join(ckpt_dir, posixpath.basename(pretrained))
        changed[pretrained] = backbone["pretrained"]
    return changed


def device_policy(cfg, device: str, world: int) -> List[str]:
    """Per-device settings; returns human-readable notes of what differs from the upstream recipe."""
    from bevkit.device import DIST_BACKEND, emulated_device

    from .patches import sync_bn_policy

    notes = []
    backend = "gloo" if (device == "cpu" or emulated_device() == device) else DIST_BACKEND[device]
    cfg.setdefault("dist_params", {})
    cfg.dist_params["backend"] = backend
    if device == "cpu" and cfg.get("fp16") is not None:
        # mmcv's Fp16OptimizerHook and auto_fp16 are built on torch.cuda.amp; CPU has no fp16 autocast.
        cfg.fp16 = None
        notes.append("fp16 off on CPU (fp32)")
    if sync_bn_policy(device, world) == "local" and cfg.get("sync_bn", False):
        cfg.sync_bn = False
        notes.append("SyncBatchNorm -> BatchNorm (single process or CPU)")
    return notes


#: Top-level settings that upstream copies by value into pipelines when the config is loaded.
SHARED_KEYS = ("data_config", "grid_config", "bda_aug_conf")


def propagate_shared(cfg) -> List[str]:
    """Make the data pipelines use the top-level data_config/grid_config/bda_aug_conf.

    A child config (e.g. the tiny smoke config) that changes ``data_config`` would otherwise still feed
    the pipelines the base config's copies (mmcv evaluates each file separately). Model settings are not
    touched: configs set those explicitly.
    """
    touched = []
    for key in SHARED_KEYS:
        if key not in cfg:
            continue
        value = cfg[key]
        for section in ("data", "evaluation", "train_pipeline", "test_pipeline"):
            if section not in cfg:
                continue
            for node in _walk(cfg[section]):
                if key in node and node[key] != value:
                    node[key] = value
                    touched.append(f"{section}:{node.get('type', '?')}.{key}")
    return touched


def add_timing_hook(cfg) -> None:
    hooks = list(cfg.get("custom_hooks") or [])
    if not any(h.get("type") == "BevkitTimingHook" for h in hooks):
        hooks.append(dict(type="BevkitTimingHook", priority="NORMAL"))
    cfg.custom_hooks = hooks


def finalize(cfg) -> None:
    """The kit's adjustments to a loaded (and --cfg-options merged) FB-OCC config."""
    from . import runtime

    rebase_data_paths(cfg)
    propagate_shared(cfg)
    device_policy(cfg, runtime.run_device(), int(os.environ.get("WORLD_SIZE", "1")))
    if os.environ.get("BEVKIT_WORKERS"):
        cfg.data.workers_per_gpu = int(os.environ["BEVKIT_WORKERS"])
    add_timing_hook(cfg)
