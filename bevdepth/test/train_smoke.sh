#!/usr/bin/env bash
# BEVDepth smoke run on CPU: synthetic data (generated when no --data-root is given), info files and depth
# ground truth, the tiny 2-key-frame variant on 2 gloo processes, then nuScenes evaluation on the val split.
#   bevdepth/test/train_smoke.sh [--data-root DIR] [--device cpu] [--nproc 2] [launcher options] [-- exp args]
exec "$(dirname "$0")/../../tools/launch" --model bevdepth --mode smoke --device cpu --nproc 2 "$@"
