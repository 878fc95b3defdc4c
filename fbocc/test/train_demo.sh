#!/usr/bin/env bash
# FB-OCC demo on CPU: a run that visibly learns the built-in synthetic world. Generates the demo data when no
# --data-root is given, prepares it, trains the demo config on 2 gloo processes, evaluates the checkpoint with
# tools/test.py (pictures of predictions in its run folder), then judges the mIoU with the demo gate.
#   fbocc/test/train_demo.sh [--data-root DIR] [--device cpu] [--nproc 2] [launcher options] [-- train.py args]
exec "$(dirname "$0")/../../tools/launch" --model fbocc --mode demo --device cpu --nproc 2 "$@"
