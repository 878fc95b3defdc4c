#!/usr/bin/env bash
# BEVDepth performance run: the 8-device recipe for 1 epoch (439 steps at global batch 64) or --max-steps N;
# results.json with step time and FPS (FPS = 64 / mean step time).
#   bevdepth/test/train_8p_performance.sh --data-root DIR [--device D] [--nproc N] [--max-steps N] [--dry-run]
exec "$(dirname "$0")/../../tools/launch" --model bevdepth --mode performance --nproc 8 "$@"
