"""BEVDepth (Megvii-BaseDetection/BEVDepth @d78c7b5) in the kit: everything the shared modules know about it
(:data:`SPEC`).

Every rank runs ``bevdepth/run.py <exp file> --device D ...`` (see :mod:`.runtime`), which applies the
kit's runtime patches (:mod:`.patches`) and runs the experiment through the kit's Lightning 1.9 CLI
(:mod:`.cli`). The model's other knowledge: data checks (:mod:`.data_check`), metrics (:mod:`.results`),
data preparation (:mod:`.prepare`), reference results (``bevdepth/reference.json``). Importing this package
does not import torch.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

from bevkit import REPO_ROOT, env
from bevkit.checkpoints import RESNET50
from bevkit.data import jpeg
from bevkit.registry import CheckpointFormat, LaunchRequest, ModelSpec, Upstream

UPSTREAM = Upstream(
    name="BEVDepth", model="bevdepth",
    url="https://github.com/Megvii-BaseDetection/BEVDepth.git",
    commit="d78c7b58b10b9ada940462ba83ab24d99cae5833",
    tree="acfcdd64d014088f7bcf61692ed45b73d6104f04",
    patches=("bevdepth/bevdepth.patch",),
    src_env="BEVDEPTH_SRC", src_option="--bevdepth-src",
)

RUNNER = REPO_ROOT / "bevdepth" / "run.py"
REFERENCE_EXP = "bevdepth/configs/bev_depth_lss_r50_256x704_128x128_24e_2key.py"
SMOKE_EXP = "bevdepth/configs/bev_depth_tiny_smoke.py"
BATCH_PER_DEVICE = 8
SMOKE_BATCH_PER_DEVICE = 2
EPOCHS = 24
SMOKE_EPOCHS = 12
#: the demo (tools/launch --mode demo); epochs None leaves them to the experiment (run_cli's
#: extra_trainer_config_args={'epochs': N}), where its LR milestones are derived from them
DEMO_EXP = "bevdepth/configs/bev_depth_tiny_demo.py"
DEMO_EPOCHS: Optional[int] = None
#: the demo's synthetic world: twice the default train scenes (more variety for the val scenes to be like)
DEMO_DATA = ("--train-scenes", "12")
DEMO_BATCH_PER_DEVICE = SMOKE_BATCH_PER_DEVICE
#: the demo's processes: its 288-pixel-wide images decode at 1/4 of the JPEG's scale (bevkit.data.jpeg): the data
#: loader workers otherwise take about a third of the 2 cores
DEMO_ENV = {jpeg.ENV: "1"}
#: modes that train, evaluate the final weights and stop (no separate evaluation launch)
SELF_EVALUATING = ("smoke", "demo")


def _passes(extra, *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in extra for f in flags)


def batch_per_device(request: LaunchRequest) -> int:
    extra = list(request.extra_args)
    for i, arg in enumerate(extra):
        if arg in ("-b", "--batch_size_per_device") and i + 1 < len(extra):
            return int(extra[i + 1])
        if arg.startswith("--batch_size_per_device="):
            return int(arg.split("=", 1)[1])
    return {"smoke": SMOKE_BATCH_PER_DEVICE, "demo": DEMO_BATCH_PER_DEVICE}.get(request.mode, BATCH_PER_DEVICE)


def checkpoints_under(folder: Path) -> List[Path]:
    """Lightning checkpoints below ``folder``, newest first."""
    found = [p for p in Path(folder).rglob("*.ckpt") if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _step_of(path: Path) -> int:
    m = re.search(r"step=(\d+)", path.name)
    return int(m.group(1)) if m else -1


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest Lightning checkpoint of a run folder (highest step in ``epoch=E-step=S.ckpt``, then time)."""
    found = checkpoints_under(run_dir)
    return max(found, key=lambda p: (_step_of(p), p.stat().st_mtime)) if found else None


#: What BEVDepth checkpoints look like (bevkit.checkpoint_check): Lightning's, the model under ``model.``.
CHECKPOINT_FORMAT = CheckpointFormat(
    title="BEVDepth", framework="lightning", modules=("backbone", "head"), key_prefix="model.",
    allow_missing=("*.num_batches_tracked",), latest=latest_checkpoint,
    files="epoch=E-step=S.ckpt of a BEVDepth run folder (lightning_logs/version_0/checkpoints/)")


def latest_full_checkpoint(work_dir: Optional[Path] = None) -> Path:
    """The newest checkpoint of the newest full run that wrote one (runs/bevdepth/full/<run>/...)."""
    work_dir = Path(work_dir or REPO_ROOT / "runs" / "bevdepth" / "full")
    runs = sorted((d for d in work_dir.glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime,
                  reverse=True) if work_dir.is_dir() else []
    for run in runs:
        ckpts = checkpoints_under(run)
        if ckpts:
            return ckpts[0]
    raise FileNotFoundError(f"no checkpoint found under {work_dir} (no finished full run): pass one with "
                            f"--checkpoint FILE (bevdepth/test/eval.sh FILE)")


def build_entry(request: LaunchRequest) -> List[str]:
    """argv of every rank: the kit runner, the experiment, then upstream/Lightning arguments."""
    exp = request.config or REPO_ROOT / {"smoke": SMOKE_EXP, "demo": DEMO_EXP}.get(request.mode, REFERENCE_EXP)
    extra = list(request.extra_args)
    argv = [str(RUNNER), str(exp), "--device", request.device, "--data_root", str(request.data_root),
            "--default_root_dir", str(request.run_dir)]
    if not _passes(extra, "-b", "--batch_size_per_device"):
        argv += ["-b", str(batch_per_device(request))]
    if request.mode == "eval":
        full_runs = env.get("BEVKIT_FULL_WORK_DIR")
        checkpoint = request.checkpoint or latest_full_checkpoint(Path(full_runs) if full_runs else None)
        argv += ["-e", "--ckpt_path", str(checkpoint)]
    else:
        if request.resume is not None:  # Lightning restores counters, optimizer, scheduler, scaler; the kit RNG, EMA
            argv += ["--ckpt_path", str(request.resume)]
        elif request.checkpoint is not None:  # a new training from these weights
            argv += ["--load_weights", str(request.checkpoint)]
        epochs = {"full": EPOCHS, "performance": 1, "smoke": SMOKE_EPOCHS, "demo": DEMO_EPOCHS}[request.mode]
        if epochs is not None and not _passes(extra, "--max_epochs"):
            argv += ["--max_epochs", str(epochs)]
        if request.mode in SELF_EVALUATING:
            argv += ["--evaluate_after_fit"]
    return argv + extra


SPEC = ModelSpec(
    name="bevdepth",
    display_name="BEVDepth",
    upstream=UPSTREAM,
    samples_per_device=BATCH_PER_DEVICE,
    build_entry=build_entry,
    configs={"full": REFERENCE_EXP, "performance": REFERENCE_EXP, "eval": REFERENCE_EXP, "smoke": SMOKE_EXP,
             "demo": DEMO_EXP},
    samples_per_device_for=batch_per_device,
    smoke_prepare=("bevkit.models.bevdepth.prepare",),  # info files + offline depth ground truth
    # One epoch of nuScenes train at global batch 64 (28130 // 64), the DrivingSDK performance recipe.
    performance_steps=28130 // 64,
    patch_set="bevkit.models.bevdepth.patches:PATCHES",
    data_checks="bevkit.models.bevdepth.data_check",
    # map / nds: nuScenes-devkit fractions (0-1), shown in % like the READMEs; TP errors in devkit units
    metrics={"map": ("mAP", 100.0), "nds": ("NDS", 100.0), "mate": ("mATE", 1.0), "mase": ("mASE", 1.0),
             "maoe": ("mAOE", 1.0), "mave": ("mAVE", 1.0), "maae": ("mAAE", 1.0)},
    references="bevdepth/reference.json",
    demo_data=DEMO_DATA,
    demo_env=DEMO_ENV,
    pictures="bevkit.models.bevdepth.pictures",
    checkpoints=((RESNET50, "img_backbone_conf.init_cfg (torchvision://resnet50)"),),
    checkpoint_format=CHECKPOINT_FORMAT,
)
