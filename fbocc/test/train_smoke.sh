#!/usr/bin/env bash
# FB-OCC smoke run on CPU: tiny config, 2 gloo processes, 12 steps (temporal fusion from step 5), then
# evaluation of the last checkpoint. Without --data-root it generates the synthetic dataset first.
#   fbocc/test/train_smoke.sh [--data-root DIR] [--device cpu] [--nproc 2] [launcher options]
set -euo pipefail
kit="$(cd "$(dirname "$0")/../.." && pwd)"
# The kit's Python, as tools/launch picks it: BEVKIT_PYTHON, else the repository's .venv, else python3.
if [ -n "${BEVKIT_PYTHON:-}" ]; then python="$BEVKIT_PYTHON"
elif [ -x "$kit/.venv/bin/python" ]; then python="$kit/.venv/bin/python"
else python="python3"; fi
export PYTHONPATH="$kit${PYTHONPATH:+:$PYTHONPATH}"
data_root=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --data-root) data_root="$2"; shift 2 ;;
        --data-root=*) data_root="${1#*=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
dry_run=0
for a in ${args[@]+"${args[@]}"}; do [ "$a" = "--dry-run" ] && dry_run=1; done
if [ -z "$data_root" ]; then
    data_root="${BEVKIT_SMOKE_DATA:-$kit/runs/synthetic-nuscenes}"
    if [ ! -d "$data_root/v1.0-trainval" ] && [ "$dry_run" = 0 ]; then
        "$python" -m bevkit.data.synthetic --out "$data_root"
    fi
fi
if [ "$dry_run" = 0 ]; then
    "$python" -m bevkit.models.fbocc.prepare "$data_root" --no-checkpoints
fi
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
"$kit/tools/launch" --model fbocc --mode smoke --device cpu --nproc 2 --data-root "$data_root" \
    ${args[@]+"${args[@]}"} | tee "$out"
run_dir="$(dirname "$(sed -n 's/^results: //p' "$out" | tail -n 1)")"
[ "$dry_run" = 1 ] && run_dir="RUN_DIR"  # a dry run trains nothing: show the evaluation command
"$kit/tools/launch" --model fbocc --mode eval --device cpu --nproc 2 --data-root "$data_root" \
    --config "$kit/fbocc/configs/fbocc_tiny_smoke.py" --checkpoint "$run_dir/latest.pth" ${args[@]+"${args[@]}"}
