"""FB-OCC (FB-BEV @6e25469) in the kit: the launcher's model spec.

The launcher (bevkit.launch) runs ``torchrun ... <argv>`` from the upstream checkout with the argv built
here; the patched tools/train.py / tools/test.py call :func:`bevkit.models.fbocc.runtime.activate`.
This module imports neither torch nor upstream code.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

from bevkit.models import LaunchRequest, ModelSpec

CONFIGS = {
    "full": "fbocc/configs/fbocc_r50_8p.py",
    "performance": "fbocc/configs/fbocc_r50_8p_performance.py",
    "eval": "fbocc/configs/fbocc_r50_8p.py",
    "smoke": "fbocc/configs/fbocc_tiny_smoke.py",
}

#: Batch per device of the kit's configs (the tiny smoke config uses 1).
SAMPLES_PER_DEVICE = {"full": 4, "performance": 4, "eval": 1, "smoke": 1}


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def config_for(request: LaunchRequest) -> Path:
    if request.config is not None:
        return Path(request.config)
    return _repo_root() / CONFIGS[request.mode]


def _data_root_option(request: LaunchRequest) -> str:
    # mmcv parses "a=b" values; a trailing slash keeps upstream's `data_root + 'file'` concatenations valid.
    return f"data_root={str(request.data_root).rstrip('/')}/"


def build_entry(request: LaunchRequest) -> List[str]:
    """argv for torchrun on every rank (relative to the FB-BEV checkout)."""
    config = str(config_for(request))
    options = ["--cfg-options", _data_root_option(request)]
    if request.mode == "eval":
        if request.checkpoint is None:
            raise ValueError("fbocc eval needs a checkpoint: fbocc/test/eval.sh CHECKPOINT [options]")
        argv = ["tools/test.py", config, str(request.checkpoint), "--launcher", "pytorch", "--eval", "mIoU"]
    else:
        argv = ["tools/train.py", config, "--launcher", "pytorch", "--work-dir", str(request.run_dir),
                "--seed", "0"]
    extra = list(request.extra_args)
    if "--cfg-options" in extra:  # merge the user's overrides into ours (argparse keeps only the last flag)
        at = extra.index("--cfg-options")
        values = []
        for item in extra[at + 1:]:
            if item.startswith("--"):
                break
            values.append(item)
        del extra[at:at + 1 + len(values)]
        options += values
    return argv + options + extra


def samples_per_device_for(request: LaunchRequest) -> int:
    if request.config is None:
        return SAMPLES_PER_DEVICE[request.mode]
    found = _samples_per_gpu_in(Path(request.config))
    return found if found is not None else SAMPLES_PER_DEVICE[request.mode]


def _samples_per_gpu_in(path: Path, depth: int = 0) -> Optional[int]:
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(r"^samples_per_gpu\s*=\s*(\d+)", text, re.M)
    if match:
        return int(match.group(1))
    base = re.search(r"^_base_\s*=\s*\[\s*'(\./[^']+)'", text, re.M)
    if base and depth < 4:
        return _samples_per_gpu_in(path.parent / base.group(1), depth + 1)
    return None


SPEC = ModelSpec(
    name="fbocc",
    display_name="FBOCC",
    upstream="FB-BEV",
    samples_per_device=4,
    build_entry=build_entry,
    configs=dict(CONFIGS),
    samples_per_device_for=samples_per_device_for,
    smoke_prepare=("bevkit.models.fbocc.prepare", "--no-checkpoints"),  # the tiny config is trained from scratch
    smoke_eval_checkpoint="latest.pth",  # tools/test.py on what the smoke training wrote
)
