#!/usr/bin/env bash
# BEVDepth smoke run on CPU: tiny 2-key-frame variant, 2 gloo processes, ~180 steps (12 epochs of the 60-sample synthetic train split), then nuScenes evaluation
# of the final weights on the validation split (mAP/NDS in results.json). Without --data-root it generates
# the synthetic dataset; it then prepares the BEVDepth infos and depth ground truth (skipped when present).
#   bevdepth/test/train_smoke.sh [--data-root DIR] [--device cpu] [--nproc 2] [launcher options]
set -euo pipefail
kit="$(cd "$(dirname "$0")/../.." && pwd)"
python="${BEVKIT_PYTHON:-$([ -x "$kit/.venv/bin/python" ] && echo "$kit/.venv/bin/python" || echo python3)}"
data_root=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --data-root) data_root="$2"; shift 2 ;;
        --data-root=*) data_root="${1#*=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ -z "$data_root" ]; then
    data_root="${BEVKIT_SMOKE_DATA:-$kit/runs/synthetic-nuscenes}"
    if [ ! -d "$data_root/v1.0-trainval" ]; then
        PYTHONPATH="$kit${PYTHONPATH:+:$PYTHONPATH}" "$python" -m bevkit.data.synthetic --out "$data_root"
    fi
fi
PYTHONPATH="$kit${PYTHONPATH:+:$PYTHONPATH}" "$python" -m bevkit.models.bevdepth.prepare "$data_root"
exec "$kit/tools/launch" --model bevdepth --mode smoke --device cpu --nproc 2 --data-root "$data_root" ${args[@]+"${args[@]}"}
