#!/usr/bin/env bash
# BEVDepth reference training: R50 256x704 2 key frames, 8 devices per node x batch 8 (global 64), 24 epochs,
# fp16 AMP; results.json with step time and FPS. Evaluate afterwards with bevdepth/test/eval.sh.
#   bevdepth/test/train_8p_full.sh --data-root DIR [--device npu|cuda|cpu] [--nproc N] [--nnodes N --node-rank R
#       --master-addr A --master-port P] [--dry-run] [-- extra experiment/Lightning arguments]
exec "$(dirname "$0")/../../tools/launch" --model bevdepth --mode full --nproc 8 "$@"
