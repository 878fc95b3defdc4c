#!/usr/bin/env bash
# BEVDepth evaluation on nuScenes val (mAP, NDS, mATE, mASE, mAOE, mAVE, mAAE into results.json).
# CHECKPOINT defaults to the newest checkpoint of the newest full run under runs/bevdepth/full.
#   bevdepth/test/eval.sh [CHECKPOINT] --data-root DIR [--device D] [--nproc N] [--dry-run]
ckpt=()
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    ckpt=(--checkpoint "$1"); shift
fi
exec "$(dirname "$0")/../../tools/launch" --model bevdepth --mode eval --nproc 1 ${ckpt[@]+"${ckpt[@]}"} "$@"
