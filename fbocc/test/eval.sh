#!/usr/bin/env bash
# FB-OCC evaluation (Occ3D mIoU) of a checkpoint; results.json / metrics.json with mIoU and per-class IoU.
#   fbocc/test/eval.sh CHECKPOINT --data-root DIR [--device D] [--nproc N] [--config F] [--dry-run]
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 CHECKPOINT --data-root DIR [launcher options]" >&2
    exit 2
fi
ckpt="$1"; shift
exec "$(dirname "$0")/../../tools/launch" --model fbocc --mode eval --nproc 8 --checkpoint "$ckpt" "$@"
