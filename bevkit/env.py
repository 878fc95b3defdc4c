"""The environment contract: every ``BEVKIT_*`` variable the kit reads, what it means and its default.

``python -m bevkit.env`` prints the table README.md carries ("Environment variables"); a test fails when the
kit's code or scripts read a variable that is not listed here, and when README's table differs.

Who sets a variable: ``user`` (an option of yours), ``launcher`` (``tools/launch`` sets it for the processes
it starts; setting it yourself only matters when you run an entry point without the launcher), ``setup``
(``setup.sh`` and the ``tools/*`` shell entries), ``env file`` (a launcher setting inside ``configs/env/``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple


@dataclass(frozen=True)
class Var:
    name: str
    set_by: str    # user / launcher / setup / env file
    default: str   # what applies when unset ('-': nothing)
    meaning: str


VARIABLES: Tuple[Var, ...] = (
    # --- the launcher -> training process contract
    Var("BEVKIT_RUN_DIR", "launcher", "-",
        "the run folder: rank 0 writes steps.jsonl there, evaluation writes metrics.json"),
    Var("BEVKIT_MODEL", "launcher", "-", "model of the run (fbocc, bevdepth)"),
    Var("BEVKIT_MODE", "launcher", "-", "full, performance, eval, smoke or demo"),
    Var("BEVKIT_DEVICE", "launcher", "best available (npu > cuda > cpu)",
        "the run's device type: npu, cuda or cpu (the launcher's --device, else detected)"),
    Var("BEVKIT_DATA_ROOT", "launcher / user", "<repo>/data/nuscenes",
        "the nuScenes-format data root (the launcher's default for --data-root)"),
    Var("BEVKIT_SAMPLES_PER_DEVICE", "launcher", "-", "batch per device, for the samples of each step record"),
    Var("BEVKIT_MAX_STEPS", "launcher", "- (performance runs: the model's step count)",
        "stop training after this many optimizer steps"),
    Var("BEVKIT_CHECKPOINT", "launcher", "-",
        "the checkpoint the launcher checked (--checkpoint, or the --resume run's): compared key by key with the "
        "built model before it is used"),
    Var("BEVKIT_TRUST_CHECKPOINT", "launcher / user", "-",
        "1: load checkpoints that need full unpickling from anywhere (--trust-checkpoint); else only from run "
        "folders, BEVKIT_CKPT_DIR and DATA_ROOT/ckpts"),
    Var("BEVKIT_WARMUP_STEPS", "user", "first 10% of the steps",
        "steps left out of the step-time statistics (also --warmup-steps)"),
    # --- launcher settings
    Var("BEVKIT_CANN_SET_ENV", "user", "ASCEND_HOME_PATH's or the default install's set_env.sh",
        "CANN's set_env.sh, sourced for NPU runs"),
    Var("BEVKIT_CANN_SET_ENV_CANDIDATES", "env file", "see configs/env/npu.env",
        "':'-separated set_env.sh locations tried in order (a launcher setting, not passed to training)"),
    Var("BEVKIT_SMOKE_DATA", "user", "<repo>/runs/synthetic-nuscenes",
        "data root of smoke runs without --data-root (generated when missing)"),
    Var("BEVKIT_DEMO_DATA", "user", "<repo>/runs/synthetic-nuscenes[-<the model's demo data options>]",
        "data root of demo runs without --data-root (generated with the model's demo options when missing)"),
    Var("BEVKIT_FULL_WORK_DIR", "user", "<repo>/runs/bevdepth/full",
        "where BEVDepth's eval looks for the newest checkpoint when none is given"),
    Var("BEVKIT_UPSTREAM_DIR", "user", "<repo>/upstream", "folder holding the upstream checkouts"),
    # --- runtime behaviour
    Var("BEVKIT_OPS_BACKEND", "user", "by the tensor's device",
        "force one bevkit.ops backend: portable, npu or cuda"),
    Var("BEVKIT_DISABLE_PATCHES", "user", "-",
        "comma-separated runtime patch names to leave out (A/B measurements; both models)"),
    Var("BEVKIT_EMULATE_DEVICE", "user (tests)", "-",
        "npu or cuda, equal to --device: an emulated device lane (CPU tensors, the device's path with the test "
        "fakes; see \"Emulated device lanes\")"),
    Var("BEVKIT_NPU_OP_LIMITS", "user", "documented",
        "mx_driving limits the NPU ops keep: documented (split/pad to DrivingSDK's documented limits) or port "
        "(one call, no padding, as the DrivingSDK ports; compare with tools/npu_ab)"),
    Var("BEVKIT_WORKERS", "user", "FB-OCC: the config's; BEVDepth training: 8 on NPU/CUDA, upstream's 4 on CPU",
        "dataloader workers per process"),
    Var("BEVKIT_JPEG_DRAFT", "user", "-; 1 in demo runs",
        "1: camera JPEGs decoded at the reduced DCT scale the resize needs (PIL draft mode; both models; faster, "
        "changes the input pixels slightly, see bevdepth/README.md); 0: full decode, also in demo runs"),
    Var("BEVKIT_CKPT_DIR", "user", "-",
        "pretrained checkpoints folder, searched first (then DATA_ROOT/ckpts, then the torch hub cache)"),
    Var("BEVKIT_PRETRAINED", "user", "-", "'none': BEVDepth trains its image backbone from scratch"),
    Var("BEVKIT_DEPTH_GT", "user", "auto",
        "BEVDepth depth ground truth: auto (precomputed files, else online), precomputed or online"),
    Var("BEVKIT_PREDICTION_SAMPLES", "user", "6",
        "samples an evaluation dumps to RUN_DIR/predictions/ for the pictures (0: none)"),
    Var("BEVKIT_NUSC_VERSION", "user", "v1.0-trainval", "nuScenes version folder BEVDepth evaluates on"),
    # --- setup and shell entries
    Var("BEVKIT_PROFILE", "user / setup", "detected (npu-smi/CANN: npu, nvidia-smi: cuda, else cpu)",
        "install profile; also the launcher's default device"),
    Var("BEVKIT_VENV", "user", "<repo>/.venv", "the virtual environment setup.sh creates and the tools use"),
    Var("BEVKIT_PYTHON", "user", "<venv>/bin/python", "the Python the tools/* entries run"),
    Var("BEVKIT_TORCH_INDEX", "user", "-", "extra package index for torch (e.g. the PyTorch CPU wheels)"),
    Var("BEVKIT_EMULATE", "user (tests)", "0",
        "1: setup.sh --emulate (the npu pins with the test fakes for torch_npu / mx_driving, never torch_npu)"),
    # --- CI
    Var("BEVKIT_UPSTREAM_SOURCES", "user (CI)", "../shared/upstream",
        ".ci/run: folder holding FB-BEV.git.tar.gz and BEVDepth.git.tar.gz (else setup.sh clones from GitHub)"),
    Var("BEVKIT_CI", "setup (.ci/run)", "-", "1: a skipped test fails unless it is marked 'hardware' (GPU/NPU)"),
    Var("BEVKIT_TEST_TIMINGS", "setup (.ci/run)", "-", "file the test suite writes its time per phase to (JSON)"),
    Var("BEVKIT_PY38", "user (CI)", "python3.8 on PATH, then pyenv's newest 3.8",
        ".ci/py38: the Python 3.8 interpreter of the torch 2.1 lane"),
    Var("BEVKIT_PY38_VENV", "user (CI)", "<repo>/.venv38", ".ci/py38: the lane's virtual environment"),
)

BY_NAME: Dict[str, Var] = {v.name: v for v in VARIABLES}


def get(name: str, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The value of a listed variable (None when unset or empty)."""
    if name not in BY_NAME:
        raise KeyError(f"{name} is not in the environment contract (bevkit/env.py)")
    value = (os.environ if environ is None else environ).get(name, "").strip()
    return value or None


def get_int(name: str, environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """An integer variable (None when unset); a clear error naming it otherwise."""
    value = get(name, environ)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def markdown_table() -> str:
    lines = ["| variable | set by | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{v.name}` | {v.set_by} | {v.default} | {v.meaning} |" for v in VARIABLES]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table(), end="")
