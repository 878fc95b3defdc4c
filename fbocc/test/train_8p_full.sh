#!/usr/bin/env bash
# FB-OCC reference training: 8 devices per node, global batch 32, 80,040 iterations, evaluation at the end;
# results.json with step time, FPS and mIoU (per-class IoU in metrics.json).
#   fbocc/test/train_8p_full.sh --data-root DIR [--device npu|cuda|cpu] [--nproc N] [--nnodes N --node-rank R
#       --master-addr A --master-port P] [--dry-run] [-- extra tools/train.py arguments]
exec "$(dirname "$0")/../../tools/launch" --model fbocc --mode full --nproc 8 "$@"
