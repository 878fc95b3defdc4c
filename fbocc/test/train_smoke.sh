#!/usr/bin/env bash
# FB-OCC smoke run on CPU: synthetic data (generated when no --data-root is given), data preparation, the tiny
# config on 2 gloo processes past the temporal-fusion switch, then tools/test.py on the checkpoint it wrote.
#   fbocc/test/train_smoke.sh [--data-root DIR] [--device cpu] [--nproc 2] [launcher options] [-- train.py args]
exec "$(dirname "$0")/../../tools/launch" --model fbocc --mode smoke --device cpu --nproc 2 "$@"
