#!/usr/bin/env bash
# FB-OCC performance run: the 8-device recipe for 600 iterations; results.json with step time and FPS.
#   fbocc/test/train_8p_performance.sh --data-root DIR [--device D] [--nproc N] [--nnodes N ...] [--dry-run]
exec "$(dirname "$0")/../../tools/launch" --model fbocc --mode performance --nproc 8 --max-steps 600 "$@"
