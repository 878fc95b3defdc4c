#!/usr/bin/env bash
# FB-OCC performance run: the 8-device recipe for the launcher's performance steps (600, like its config);
# results.json with step time and FPS.
#   fbocc/test/train_8p_performance.sh --data-root DIR [--device D] [--nproc N] [--nnodes N ...] [--dry-run]
exec "$(dirname "$0")/../../tools/launch" --model fbocc --mode performance --nproc 8 "$@"
