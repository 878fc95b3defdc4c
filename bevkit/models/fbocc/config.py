"""FB-OCC configs: where the upstream configs are, and the kit's last word on a loaded config.

Our configs (fbocc/configs/*.py) inherit the upstream config through ``_base_``; mmcv resolves a base path
relative to the config file unless it is absolute, so the kit's configs compute it from ``FBBEV_ROOT`` (set
by :func:`bevkit.models.fbocc.runtime.activate` from the entry script's location, or by the launcher)
with a fallback to ``upstream/FB-BEV`` next to the kit.

:func:`finalize` is one visible line in tools/train.py and tools/test.py (fbocc.patch), right after
``--cfg-options`` are merged. Upstream derives every data path from ``data_root`` once, when the config is
loaded, so ``--cfg-options data_root=...`` alone would not move them: the paths that still point at upstream's
default data folder follow ``data_root`` (a path you set yourself, e.g. ``--cfg-options
data.val.ann_file=...``, is kept); relative checkpoint paths follow the kit's checkpoint folder; then the
per-device policy (dist backend, fp16, SyncBN) and the kit's timing hook. The launcher hands the data root over in
``BEVKIT_DATA_ROOT`` (mmcv's ``--cfg-options`` parser would split a path with a comma and drop its spaces).
"""
from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from bevkit import checkpoints, env
from bevkit.device import RunDevice, run_device

UPSTREAM_CONFIG = "occupancy_configs/fb_occ/fbocc-r50-cbgs_depth_16f_16x4_20e.py"

#: Upstream's default data folder (its configs' ``data_root``, relative to the FB-BEV checkout) and the cluster
#: mount its dataset classes hard-coded for the Occ3D labels: paths under either still follow ``data_root``.
UPSTREAM_DATA_ROOT = "data/nuscenes"
UPSTREAM_MOUNT = "/mount/"


def fbbev_root() -> Path:
    """The FB-BEV checkout the configs inherit from."""
    env_root = os.environ.get("FBBEV_ROOT")
    if env_root:
        return Path(env_root)
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
    return posixpath.join(root.rstrip("/") + "/", name) if name else root.rstrip("/") + "/"


def upstream_default(path: Any) -> Optional[str]:
    """For a path that still points at upstream's default data folder, the part below it ('' for the folder
    itself); None for any other value (a path somebody chose)."""
    if not isinstance(path, str):
        return None
    if path.startswith(UPSTREAM_MOUNT):
        return ""  # upstream's Occ3D mount: its gts/ is DATA_ROOT/gts
    norm = posixpath.normpath(path)
    if norm == UPSTREAM_DATA_ROOT:
        return ""
    if norm.startswith(UPSTREAM_DATA_ROOT + "/"):
        return norm[len(UPSTREAM_DATA_ROOT) + 1:]
    return None


def rebase_data_paths(cfg, data_root: Optional[str] = None, ckpt_dir: Optional[str] = None) -> Dict[str, str]:
    """Point the paths that still name upstream's default data folder at ``data_root`` (default:
    cfg.data_root), and relative checkpoint paths at the checkpoint folder.

    - ``ann_file`` / ``data_root`` under ``data/nuscenes/`` -> the same file under DATA_ROOT;
    - ``occupancy_path`` (top level, datasets, pipelines) of upstream's (``data/nuscenes/gts`` or its
      ``/mount/...`` Occ3D folder) -> the top-level ``occupancy_path`` when you set one, else DATA_ROOT/gts;
    - relative ``load_from`` / backbone ``pretrained`` -> CKPT_DIR/<file name>, CKPT_DIR being ``cfg.ckpt_dir``,
      else the first existing of $BEVKIT_CKPT_DIR and DATA_ROOT/ckpts (:mod:`bevkit.checkpoints`); without
      one they stay relative to the working directory, as upstream has them (ckpts/ in the FB-BEV checkout).

    Any other path is yours and kept. Returns what changed (old -> new).
    """
    data_root = data_root or cfg.get("data_root")
    if not data_root:
        return {}
    data_root = str(data_root).rstrip("/") + "/"
    changed: Dict[str, str] = {}

    def rebase(node: dict, key: str, target: str) -> None:
        if node[key] != target:
            changed[node[key]] = target
            node[key] = target

    cfg.data_root = data_root
    top_occ = cfg.get("occupancy_path")
    gts = top_occ if isinstance(top_occ, str) and upstream_default(top_occ) is None else _join(data_root, "gts")
    for node in _walk(cfg._cfg_dict if hasattr(cfg, "_cfg_dict") else cfg):
        for key in ("ann_file", "data_root"):
            below = upstream_default(node.get(key))
            if below is not None:
                rebase(node, key, _join(data_root, below))
        if upstream_default(node.get("occupancy_path")) is not None:
            rebase(node, "occupancy_path", gts)
    folder = checkpoints.folder(data_root, explicit=ckpt_dir or cfg.get("ckpt_dir"))
    if folder is None:  # upstream layout: ckpts/ relative to the working directory (the FB-BEV checkout)
        return changed
    load_from = cfg.get("load_from")
    if isinstance(load_from, str) and checkpoints.relative_to_folder(load_from):
        cfg.load_from = _join(str(folder), posixpath.basename(load_from))
        changed[load_from] = cfg.load_from
    backbone = cfg.get("model", {}).get("img_backbone", {})
    pretrained = backbone.get("pretrained") if hasattr(backbone, "get") else None
    if isinstance(pretrained, str) and checkpoints.relative_to_folder(pretrained):
        backbone["pretrained"] = _join(str(folder), posixpath.basename(pretrained))
        changed[pretrained] = backbone["pretrained"]
    return changed


# ------------------------------------------------------------------------------------------ device policy
def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def sync_bn_policy(device, world: int) -> str:
    """'sync' keeps SyncBatchNorm; 'local' replaces it with per-process BatchNorm.

    - one process: nothing to synchronize ('local'; identical maths, no collective per BN call);
    - CPU (gloo): torch's SyncBatchNorm only runs on accelerator tensors ('local', each rank normalizes its
      own batch, which is what the DrivingSDK NPU recipe's sync_bn=False does for the ResNet-50 BNs too);
    - CUDA/NPU with several processes: 'sync' (upstream behaviour).
    """
    if world <= 1 or RunDevice.of(device).kind == 'cpu':
        return 'local'
    return 'sync'


def apply_sync_bn_policy(model, device=None, world: Optional[int] = None):
    """The SyncBN policy on a built model (config SyncBN and the hard-coded nn.SyncBatchNorm of the history
    fusion)."""
    from mmcv.cnn.utils import revert_sync_batchnorm

    device = device or run_device()
    world = world_size() if world is None else world
    if sync_bn_policy(device, world) == "local":
        model = revert_sync_batchnorm(model)
    return model


def device_policy(cfg, device, world: int) -> List[str]:
    """Per-device settings; returns human-readable notes of what differs from the upstream recipe."""
    device = RunDevice.of(device)
    notes = []
    cfg.setdefault("dist_params", {})
    cfg.dist_params["backend"] = device.dist_backend
    if device.kind == "cpu" and cfg.get("fp16") is not None:
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
    """The kit's hooks: step timing (bevkit.timing.mmcv_hook) and the resume state (bevkit.models.fbocc.resume;
    VERY_LOW: after the EMA hook has built its model)."""
    hooks = list(cfg.get("custom_hooks") or [])
    for kind, priority in (("BevkitTimingHook", "NORMAL"), ("BevkitResumeHook", "VERY_LOW")):
        if not any(h.get("type") == kind for h in hooks):
            hooks.append(dict(type=kind, priority=priority))
    cfg.custom_hooks = hooks


def foreach_optimizer(cfg) -> bool:
    """AdamW with ``foreach=True`` (the DrivingSDK port's setting): one multi-tensor kernel per update step instead
    of a loop over the ~70 M parameters' tensors, the same arithmetic (bit-identical updates; test_fbocc_unit.py).
    A ``foreach`` you set (e.g. ``--cfg-options optimizer.foreach=False``) is kept. Returns whether it was set."""
    optimizer = cfg.get("optimizer")
    if not optimizer or optimizer.get("type") != "AdamW" or "foreach" in optimizer:
        return False
    optimizer["foreach"] = True
    return True


def finalize(cfg) -> None:
    """The kit's adjustments to a loaded (and --cfg-options merged) FB-OCC config. The data root is the launcher's
    ``BEVKIT_DATA_ROOT`` when set (any path: it does not go through mmcv's option parser), else ``cfg.data_root``."""
    rebase_data_paths(cfg, data_root=env.get("BEVKIT_DATA_ROOT"))
    propagate_shared(cfg)
    device_policy(cfg, run_device(), int(os.environ.get("WORLD_SIZE", "1")))
    foreach_optimizer(cfg)
    workers = env.get_int("BEVKIT_WORKERS")
    if workers is not None:
        cfg.data.workers_per_gpu = workers
    add_timing_hook(cfg)
