#!/usr/bin/env python
"""Run a BEVDepth experiment file through the kit on NPU, CUDA or CPU.

    python bevdepth/run.py bevdepth/exps/nuscenes/mv/bev_depth_lss_r50_256x704_128x128_24e_2key.py \
        --device npu -b 8 --data_root DATA_ROOT [Lightning / upstream arguments]

The experiment path may be relative to the BEVDepth checkout. The kit applies its runtime patches
(``python -m bevkit.patching list bevdepth``) and then runs the experiment unchanged as ``__main__``.
"""
import sys
from pathlib import Path

# The kit this script belongs to (the repository root), also when it runs from a clone without PYTHONPATH.
KIT = str(Path(__file__).resolve().parent.parent)
if KIT not in sys.path:
    sys.path.append(KIT)

from bevkit.models.bevdepth.runtime import run_exp  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_exp(sys.argv[1:]))
