"""FB-OCC (FB-BEV @6e25469) in the kit: everything the shared modules know about it (:data:`SPEC`).

The launcher (:mod:`bevkit.launch`) runs ``torchrun ... <argv>`` from the upstream checkout with the argv built
here; the patched ``tools/train.py`` / ``tools/test.py`` call :func:`bevkit.models.fbocc.runtime.activate` and
:func:`bevkit.models.fbocc.config.finalize`. The model's other knowledge: runtime patches
(:mod:`.patches`), data checks (:mod:`.data_check`), metrics (:mod:`.results`), data preparation
(:mod:`.prepare`), reference results (``fbocc/reference.json``). This module imports neither torch nor
upstream code.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

from bevkit import REPO_ROOT
from bevkit.checkpoints import RESNET50, Checkpoint
from bevkit.data import jpeg
from bevkit.registry import CheckpointFormat, LaunchRequest, ModelSpec, Upstream

UPSTREAM = Upstream(
    name="FB-BEV", model="fbocc",
    url="https://github.com/NVlabs/FB-BEV.git",
    commit="6e25469256d98e7fcb52cc43efe812dc2fd2b446",
    tree="c428ac7bd504807dd6650242878747b25e34f638",
    patches=("fbocc/fbocc.patch",),
    src_env="FBBEV_SRC", src_option="--fbbev-src",
)

CONFIGS = {
    "full": "fbocc/configs/fbocc_r50_8p.py",
    "performance": "fbocc/configs/fbocc_r50_8p_performance.py",
    "eval": "fbocc/configs/fbocc_r50_8p.py",
    "smoke": "fbocc/configs/fbocc_tiny_smoke.py",
    "demo": "fbocc/configs/fbocc_tiny_demo.py",
}

#: Batch per device of the kit's configs (the tiny smoke config trains with 1); any other config is read.
#: tools/test.py always evaluates with 1 per device.
CONFIG_SAMPLES_PER_DEVICE = {"fbocc/configs/fbocc_r50_8p.py": 4, "fbocc/configs/fbocc_r50_8p_performance.py": 4,
                             "fbocc/configs/fbocc_tiny_smoke.py": 1, "fbocc/configs/fbocc_tiny_demo.py": 1}
EVAL_SAMPLES_PER_DEVICE = 1
#: the demo's processes: its 352-pixel-wide images decode at 1/4 of the JPEG's scale (bevkit.data.jpeg)
DEMO_ENV = {jpeg.ENV: "1"}
#: the demo's world: static classes in continuous bands (bevkit.data.world.SCENERIES), which the demo's 0.8 m grid
#: learns within its 20 minutes; the default world's scattered trees and gapped buildings it does not (fbocc/README.md)
DEMO_DATA = ("--scenery", "banded")

#: The depth-pretrained weights the reference recipe starts from (``load_from``); no published checksum: its
#: sha256 is recorded in the checkpoint folder's SHA256SUMS when first verified.
DEPTH_PRETRAIN = Checkpoint(
    "r50_256x705_depth_pretrain.pth",
    "https://github.com/zhiqi-li/storage/releases/download/v1.0/r50_256x705_depth_pretrain.pth")


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest training checkpoint mmcv wrote into a run folder: the highest ``iter_N.pth`` (``epoch_N.pth``
    for epoch-based configs); EMA files and the ``latest.pth`` link are not training checkpoints."""
    numbered = []
    for path in Path(run_dir).glob("*.pth"):
        m = re.fullmatch(r"(iter|epoch)_(\d+)\.pth", path.name)
        if m and path.is_file():
            numbered.append((m.group(1) == "iter", int(m.group(2)), path))
    return max(numbered)[2] if numbered else None


#: What FB-OCC checkpoints look like (bevkit.checkpoint_check): mmcv's {meta, state_dict, optimizer}, the
#: FBOCC detector's modules (the two history convolutions exist in every config with temporal fusion).
CHECKPOINT_FORMAT = CheckpointFormat(
    title="FB-OCC", framework="mmcv",
    modules=("img_backbone", "img_neck", "depth_net", "forward_projection", "backward_projection",
             "img_bev_encoder_backbone", "img_bev_encoder_neck", "occupancy_head"),
    optional_modules=("history_keyframe_time_conv", "history_keyframe_cat_conv", "pts_bbox_head", "img_bev_encoder"),
    allow_missing=("*.num_batches_tracked",),
    # the focal loss's radial weight map: a constant of the grid, not learned; kit versions before issue 14
    # saved it as a buffer
    allow_unexpected=("occupancy_head.focal_loss.c",),
    latest=latest_checkpoint, files="iter_N.pth (or latest.pth) of an FB-OCC run folder",
)


def config_for(request: LaunchRequest) -> Path:
    if request.config is not None:
        return Path(request.config)
    return REPO_ROOT / CONFIGS[request.mode]


def build_entry(request: LaunchRequest) -> List[str]:
    """argv for torchrun on every rank (relative to the FB-BEV checkout).

    The data root reaches the config through the launcher's ``BEVKIT_DATA_ROOT`` (:func:`.config.finalize`), not
    ``--cfg-options data_root=...``: mmcv's option parser splits values at commas and drops spaces and quotes, so
    such a path would arrive as another path (or a list)."""
    config = str(config_for(request))
    options: List[str] = []
    if request.mode == "eval":
        if request.checkpoint is None:
            raise ValueError("fbocc eval needs a checkpoint: fbocc/test/eval.sh CHECKPOINT [options]")
        argv = ["tools/test.py", config, str(request.checkpoint), "--launcher", "pytorch", "--eval", "mIoU"]
    else:
        argv = ["tools/train.py", config, "--launcher", "pytorch", "--work-dir", str(request.run_dir),
                "--seed", "0"]
        if request.resume is not None:  # counters, optimizer, scaler, EMA, RNG (bevkit.models.fbocc.resume)
            argv += ["--resume-from", str(request.resume)]
        elif request.checkpoint is not None:  # a new training from these weights (mmcv's load_from)
            options.append(f"load_from={request.checkpoint}")
    extra = list(request.extra_args)
    if "--cfg-options" in extra:  # merge the user's overrides into ours (argparse keeps only the last flag)
        at = extra.index("--cfg-options")
        values = []
        for item in extra[at + 1:]:
            if item.startswith("--"):
                break
            values.append(item)
        del extra[at:at + 1 + len(values)]
        if any(v.split("=", 1)[0] == "data_root" for v in values):
            raise ValueError("pass the data root with --data-root, not --cfg-options data_root=... (the launcher "
                             "checks that folder and hands it to the config)")
        options += values
    return argv + (["--cfg-options", *options] if options else []) + extra


def samples_per_device_for(request: LaunchRequest) -> int:
    """What the entry point will use: tools/test.py evaluates 1 sample per device; training uses the config's
    ``data.samples_per_gpu`` (the kit's configs: :data:`CONFIG_SAMPLES_PER_DEVICE`; another config is read)."""
    if request.mode == "eval":
        return EVAL_SAMPLES_PER_DEVICE
    config = config_for(request)
    try:
        known = CONFIG_SAMPLES_PER_DEVICE.get(config.resolve().relative_to(REPO_ROOT).as_posix())
    except ValueError:  # outside the repository
        known = None
    if known is not None:
        return known
    if not config.is_file():  # refused by the plan (a dry run shows it): the reference batch meanwhile
        return CONFIG_SAMPLES_PER_DEVICE[CONFIGS["full"]]
    found = _samples_per_gpu(config)
    return found if found is not None else CONFIG_SAMPLES_PER_DEVICE[CONFIGS["full"]]


def _samples_per_gpu(config: Path) -> Optional[int]:
    from mmcv import Config  # a user's config: evaluated like tools/train.py does (its _base_ files too)

    cfg = Config.fromfile(str(config))
    data = cfg.get("data") or {}
    value = data.get("samples_per_gpu", cfg.get("samples_per_gpu"))
    return int(value) if value is not None else None


SPEC = ModelSpec(
    name="fbocc",
    display_name="FBOCC",
    upstream=UPSTREAM,
    samples_per_device=CONFIG_SAMPLES_PER_DEVICE[CONFIGS["full"]],
    build_entry=build_entry,
    configs=dict(CONFIGS),
    samples_per_device_for=samples_per_device_for,
    smoke_prepare=("bevkit.models.fbocc.prepare", "--no-checkpoints"),  # the tiny config is trained from scratch
    smoke_eval_checkpoint="latest.pth",  # tools/test.py on what the smoke training wrote
    patch_set="bevkit.models.fbocc.patches:PATCHES",
    data_checks="bevkit.models.fbocc.data_check",
    metrics={"miou": ("mIoU", 1.0)},  # Occ3D mIoU in % (upstream's 'Overall')
    references="fbocc/reference.json",
    demo_data=DEMO_DATA,
    demo_env=DEMO_ENV,
    pictures="bevkit.models.fbocc.pictures",
    checkpoints=((RESNET50, "model.img_backbone.pretrained"), (DEPTH_PRETRAIN, "load_from")),
    checkpoint_format=CHECKPOINT_FORMAT,
)
