#!/usr/bin/env bash
# BEVDepth demo on CPU: a run that visibly learns the built-in synthetic world. Generates the demo data when no
# --data-root is given, prepares info files and depth ground truth, trains the demo variant on 2 gloo processes,
# evaluates it with the nuScenes devkit (pictures of predictions in its run folder), then judges NDS and car AP
# with the demo gate.
#   bevdepth/test/train_demo.sh [--data-root DIR] [--device cpu] [--nproc 2] [launcher options] [-- exp args]
exec "$(dirname "$0")/../../tools/launch" --model bevdepth --mode demo --device cpu --nproc 2 "$@"
