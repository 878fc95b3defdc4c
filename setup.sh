#!/usr/bin/env bash
# One command to set up the kit: virtual environment with pinned dependencies for this machine's
# profile (npu / cuda / cpu), the kit itself, and the upstream checkouts at their pinned commits with
# the kit's patches applied. Safe to run again: finished steps are stamped and skipped.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REQ="$REPO_ROOT/configs/requirements"
MMCV_VERSION="1.7.2"
ALL_MODELS="fbocc,bevdepth"

usage() {
  cat <<EOF
Usage: bash setup.sh [options]

Sets up the FB-OCC / BEVDepth reproduction kit in one go; running it again changes nothing.

Options:
  --profile {npu,cuda,cpu}  dependency profile (default: detected; npu when npu-smi or CANN is
                            present, cuda when nvidia-smi is, else cpu; env BEVKIT_PROFILE)
  --venv DIR                virtual environment to create or reuse (default: .venv in the kit;
                            env BEVKIT_VENV)
  --python PY               interpreter that creates the venv (default: python3; env PYTHON).
                            npu: Python 3.8 is the reference stack
  --models LIST             comma-separated models to set up: fbocc, bevdepth (default: both)
  --no-upstream             environment and kit only: no upstream checkouts (CI, unit tests)
  --fbbev-src PATH          FB-BEV source instead of cloning it from GitHub: a clone, a bare git
                            dir, or a tarball (env FBBEV_SRC)
  --bevdepth-src PATH       BEVDepth source, same forms (env BEVDEPTH_SRC)
  --upstream-dir DIR        where checkouts go (default: upstream/ in the kit; env BEVKIT_UPSTREAM_DIR)
  --cann-env FILE           npu: CANN's set_env.sh (default: \$ASCEND_TOOLKIT_HOME/../set_env.sh,
                            then /usr/local/Ascend/ascend-toolkit/set_env.sh)
  --emulate                 npu without Ascend hardware, for testing (implies --profile npu; env
                            BEVKIT_EMULATE=1): every npu pin, but the kit's fakes (test/fakes) stand
                            in for torch_npu and mx_driving: a .pth file in the venv makes the fake
                            mx_driving importable, and the fake torch_npu where
                            BEVKIT_EMULATE_DEVICE=npu. Never installs torch_npu (without CANN it
                            breaks `import torch`); needs no CANN; mmcv-full gets its CPU ops
  --jobs N                  parallel compile jobs for mmcv-full (default: number of CPUs)
  --system-packages         install tcmalloc with apt-get when it is missing (needs root)
  --force                   ignore the stamps of finished steps and run every step again
  --dry-run                 print the plan (profile, steps, commands) and change nothing
  -h, --help                show this help

Environment:
  BEVKIT_TORCH_INDEX        extra package index for torch, e.g. https://download.pytorch.org/whl/cpu
                            (the cpu profile pins torch 2.13.0+cpu, which PyPI does not carry)
  PIP_*                     any pip option (PIP_INDEX_URL, PIP_FIND_LINKS, ...)

Each step prints one line; pip's own output goes to <venv>/bevkit-setup.log.
Afterwards: <venv>/bin/python -m bevkit.doctor checks the result.
EOF
}

die_usage() { echo "setup.sh: $*" >&2; echo "See: bash setup.sh --help" >&2; exit 2; }

PROFILE="${BEVKIT_PROFILE:-}"
VENV="${BEVKIT_VENV:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
MODELS="$ALL_MODELS"
UPSTREAM=1
FBBEV_SRC_ARG="${FBBEV_SRC:-}"
BEVDEPTH_SRC_ARG="${BEVDEPTH_SRC:-}"
UPSTREAM_DIR="${BEVKIT_UPSTREAM_DIR:-$REPO_ROOT/upstream}"
CANN_ENV=""
JOBS="$(nproc 2>/dev/null || echo 2)"
SYSTEM_PACKAGES=0
FORCE=0
DRY_RUN=0
EMULATE="${BEVKIT_EMULATE:-0}"

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die_usage "option $1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --profile) need_value "$@"; PROFILE="$2"; shift 2 ;;
    --venv) need_value "$@"; VENV="$2"; shift 2 ;;
    --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
    --models) need_value "$@"; MODELS="$2"; shift 2 ;;
    --no-upstream) UPSTREAM=0; shift ;;
    --fbbev-src) need_value "$@"; FBBEV_SRC_ARG="$2"; shift 2 ;;
    --bevdepth-src) need_value "$@"; BEVDEPTH_SRC_ARG="$2"; shift 2 ;;
    --upstream-dir) need_value "$@"; UPSTREAM_DIR="$2"; shift 2 ;;
    --cann-env) need_value "$@"; CANN_ENV="$2"; shift 2 ;;
    --jobs) need_value "$@"; JOBS="$2"; shift 2 ;;
    --system-packages) SYSTEM_PACKAGES=1; shift ;;
    --force) FORCE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --emulate) EMULATE=1; shift ;;
    --*=*) die_usage "write '${1%%=*} ${1#*=}' (a space, not '=')" ;;
    *) die_usage "unknown option '$1'" ;;
  esac
done

[[ "$EMULATE" == 0 || "$EMULATE" == 1 ]] || die_usage "BEVKIT_EMULATE must be 0 or 1, got '$EMULATE'"
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die_usage "--jobs must be a positive number, got '$JOBS'"
IFS=',' read -r -a MODEL_LIST <<< "$MODELS"
[[ ${#MODEL_LIST[@]} -gt 0 ]] || die_usage "--models needs at least one of: $ALL_MODELS"
for m in "${MODEL_LIST[@]}"; do
  case "$m" in fbocc|bevdepth) ;; *) die_usage "unknown model '$m' in --models (choose from: $ALL_MODELS)" ;; esac
done
command -v "$PYTHON" >/dev/null 2>&1 || die_usage "Python interpreter '$PYTHON' not found (set --python)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 8))' \
  || die_usage "$PYTHON is older than Python 3.8; pass --python with 3.8 or newer"

# Profile: decided before torch exists, by the same code the kit uses (bevkit.device.detect_profile).
if [[ $EMULATE == 1 ]]; then
  [[ -z "$PROFILE" || "$PROFILE" == npu ]] || die_usage "--emulate stands in for the npu profile; drop --profile $PROFILE"
  PROFILE=npu
  PROFILE_HOW="emulated"
elif [[ -z "$PROFILE" ]]; then
  PROFILE="$(PYTHONPATH="$REPO_ROOT" "$PYTHON" -m bevkit.device profile)"
  PROFILE_HOW="detected"
else
  PROFILE_HOW="chosen"
fi
case "$PROFILE" in npu|cuda|cpu) ;; *) die_usage "unknown profile '$PROFILE' (choose npu, cuda or cpu)" ;; esac

[[ "$VENV" = /* ]] || VENV="$PWD/$VENV"
[[ "$UPSTREAM_DIR" = /* ]] || UPSTREAM_DIR="$PWD/$UPSTREAM_DIR"
VPY="$VENV/bin/python"
LOG="$VENV/bevkit-setup.log"
STAMPS="$VENV/.bevkit-stamps"
START=$SECONDS
STEP=0

log() { printf '[setup %3ds] %s\n' "$((SECONDS - START))" "$*"; }
fail() {
  echo "setup.sh: error: $*" >&2
  if [[ -f "$LOG" ]]; then echo "--- last lines of $LOG ---" >&2; tail -n 25 "$LOG" >&2; fi
  exit 1
}

# Ctrl-C or a kill: one line instead of tracebacks and pip's log. Steps are stamped only when they finish, so a
# rerun continues from the step that was stopped. The trap may run inside a step whose output goes to the log:
# it writes to setup.sh's own stderr, kept as fd 3.
exec 3>&2
interrupted() {
  trap - INT TERM
  echo "setup.sh: interrupted; nothing finished was lost: run the same command again to continue where it stopped" >&3
  exit "$1"
}
trap 'interrupted 130' INT
trap 'interrupted 143' TERM

# A step runs its command unless the stamp of its inputs matches (a second run skips it).
STEP_FILES=()  # extra files a step depends on without naming them in its command (reset by each step)
STEP_HINT=""   # what to tell the user if the step fails (reset by each step)
inputs_key() {  # profile, python, command words, and the contents of the files named in them
  {
    echo "$PROFILE $("$VPY" -c 'import sys; print(sys.version)' 2>/dev/null || echo none)"
    printf '%s\n' "$@"
    for word in "$@" ${STEP_FILES[@]+"${STEP_FILES[@]}"}; do if [[ -f "$word" ]]; then cat "$word"; fi; done
  } | sha256sum | cut -c1-32
}
step() {  # step NAME DESCRIPTION command...
  local name="$1" desc="$2" hint="$STEP_HINT"; shift 2
  STEP=$((STEP + 1))
  if [[ $DRY_RUN == 1 ]]; then log "$name: would run: $*"; STEP_FILES=(); STEP_HINT=""; return 0; fi
  local key; key="$(inputs_key "$@")"
  if [[ $FORCE == 0 && -f "$STAMPS/$name" && "$(cat "$STAMPS/$name")" == "$key" ]]; then
    log "$name: up to date"
    STEP_FILES=(); STEP_HINT=""
    return 0
  fi
  local t0=$SECONDS
  log "$name: $desc"
  echo "=== $(date '+%F %T') $name: $*" >> "$LOG"
  "$@" >> "$LOG" 2>&1 || fail "step '$name' failed: $*${hint:+
$hint}"
  mkdir -p "$STAMPS"
  printf '%s' "$key" > "$STAMPS/$name"
  STEP_FILES=(); STEP_HINT=""
  log "$name: done ($((SECONDS - t0))s)"
}

CONSTRAINTS=(-c "$REQ/common.txt" -c "$REQ/$PROFILE.txt")
pip_install() { "$VPY" -m pip install "$@"; }
with_env() { env "$@"; }  # step ... with_env VAR=1 cmd: keeps the variables in the stamped command line

log "profile $PROFILE ($PROFILE_HOW), venv $VENV, models ${MODELS}, upstream $([[ $UPSTREAM == 1 ]] && echo "yes ($UPSTREAM_DIR)" || echo no)"
FAKES="$REPO_ROOT/test/fakes"
if [[ $EMULATE == 1 ]]; then
  log "emulate: for tests only: the npu pins without torch_npu (never installed here: without CANN it breaks \`import torch\`) and without mx_driving; $FAKES stands in for both"
fi

# ---------------------------------------------------------------------------------------------- CANN
if [[ "$PROFILE" == npu && $EMULATE == 0 ]]; then
  if [[ -z "$CANN_ENV" ]]; then
    for c in "${ASCEND_TOOLKIT_HOME:+$ASCEND_TOOLKIT_HOME/../set_env.sh}" /usr/local/Ascend/ascend-toolkit/set_env.sh; do
      if [[ -n "$c" && -f "$c" ]]; then CANN_ENV="$c"; break; fi
    done
  fi
  if [[ -z "$CANN_ENV" || ! -f "$CANN_ENV" ]]; then
    [[ $DRY_RUN == 1 ]] && log "cann: would fail: CANN's set_env.sh not found" \
      || fail "npu profile needs the CANN toolkit: install it, then pass --cann-env /path/to/ascend-toolkit/set_env.sh"
  else
    set +u; source "$CANN_ENV"; set -u  # CANN's script reads unset variables
    log "cann: sourced $CANN_ENV"
  fi
fi

# ---------------------------------------------------------------------------------------------- venv
if [[ -x "$VPY" ]]; then
  log "venv: reusing $VENV ($("$VPY" -c 'import platform; print("Python", platform.python_version())'))"
elif [[ $DRY_RUN == 1 ]]; then
  log "venv: would create $VENV with $PYTHON"
else
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV" || fail "could not create a venv with $PYTHON (Debian/Ubuntu: apt-get install python3-venv)"
  log "venv: created $VENV ($("$VPY" -c 'import platform; print("Python", platform.python_version())'))"
fi
if [[ $DRY_RUN == 0 ]]; then
  mkdir -p "$STAMPS"
  if [[ -f "$STAMPS/profile" && "$(cat "$STAMPS/profile")" != "$PROFILE" ]]; then
    fail "$VENV was set up for profile $(cat "$STAMPS/profile"), not $PROFILE: use another --venv, or delete $VENV"
  fi
  echo "$PROFILE" > "$STAMPS/profile"
  # an emulated venv holds fakes where the real one holds torch_npu: never turn one into the other
  if [[ -f "$STAMPS/emulate" && $EMULATE == 0 ]]; then
    fail "$VENV was set up with --emulate (test fakes instead of torch_npu): add --emulate, or use another --venv"
  elif [[ ! -f "$STAMPS/emulate" && $EMULATE == 1 && -f "$STAMPS/torch-npu" ]]; then
    fail "$VENV was set up for a real npu: use another --venv for --emulate"
  fi
  if [[ $EMULATE == 1 ]]; then : > "$STAMPS/emulate"; fi
  echo "$MODELS" > "$STAMPS/models"  # bevkit.doctor checks these models by default
  PYV="$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [[ "$PROFILE" != npu || "$PYV" == 3.8 ]] || log "venv: note: the npu reference stack is Python 3.8; this venv has $PYV"
fi

# ----------------------------------------------------------------------------------------------- torch
# >=64: the kit's pyproject.toml editable install (older ones, like the 56.0 of Python 3.8's venv, install it as
# 'UNKNOWN'); <81: newer ones lack pkg_resources, which mmcv's build needs
step build-tools "setuptools>=64,<81 (the kit's pyproject.toml needs 64; mmcv's build needs pkg_resources, gone in 81), wheel" \
  pip_install "setuptools>=64,<81" wheel

TORCH_INDEX=()
if [[ -n "${BEVKIT_TORCH_INDEX:-}" ]]; then TORCH_INDEX=(--extra-index-url "$BEVKIT_TORCH_INDEX"); fi
STEP_HINT="The pinned torch build was not found. CPU builds ('+cpu') are not on PyPI: rerun with
BEVKIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu (or put the wheel in a folder named by PIP_FIND_LINKS)."
step torch "torch for $PROFILE from $(basename "$REQ/$PROFILE.txt")" \
  pip_install -r "$REQ/$PROFILE.txt" "${CONSTRAINTS[@]}" ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"}
if [[ -f "$REQ/$PROFILE-nodeps.txt" ]]; then
  step torch-extras "$(basename "$REQ/$PROFILE-nodeps.txt") without dependencies" \
    pip_install --no-deps -r "$REQ/$PROFILE-nodeps.txt"
fi
if [[ $DRY_RUN == 0 && "$PROFILE" == cpu ]]; then
  # a CUDA build here would mean pip ignored the '+cpu' pin; stop before building mmcv against it
  "$VPY" -c 'import torch, sys; sys.exit(torch.version.cuda is not None)' 2>>"$LOG" \
    || fail "torch in $VENV is not a CPU build; remove it ($VPY -m pip uninstall -y torch) and rerun with BEVKIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu"
fi

if [[ $DRY_RUN == 0 && "$PROFILE" == npu && $EMULATE == 0 && "$(uname -m)" == x86_64 ]]; then
  # torch_npu's x86_64 wheels require torch==2.1.0+cpu; PyPI's x86_64 torch 2.1.0 is a CUDA build
  "$VPY" -c 'import torch, sys; sys.exit(torch.version.cuda is not None)' 2>>"$LOG" \
    || fail "torch in $VENV is a CUDA build; torch_npu on x86_64 requires the CPU one (+cpu): remove it ($VPY -m pip uninstall -y torch torchvision) and rerun with BEVKIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu"
fi

if [[ "$PROFILE" == npu && $EMULATE == 1 ]]; then
  # The fakes take the real packages' import names, through bevkit-npu-fakes.pth in site-packages:
  # - mx_driving in every process, as on an Ascend host (a library: importing it claims no device; FB-OCC's
  #   spconv stand-in is built from its sparse modules). The .pth names <venv>/bevkit-npu-fakes, which holds
  #   only a link to test/fakes/mx_driving.
  # - torch_npu only where the NPU is emulated (BEVKIT_EMULATE_DEVICE=npu, the kit's switch that makes CPU tensors
  #   stand in for NPU ones): the fake reports 8 NPUs, which other processes could not put a tensor on. Without
  #   the variable the venv sees no NPU, like the machine.
  for pkg in torch-npu mx-driving; do
    if [[ $DRY_RUN == 0 ]] && "$VPY" -m pip show "$pkg" >/dev/null 2>&1; then
      fail "$VENV has the real $pkg installed, which --emulate replaces by a fake: remove it ($VPY -m pip uninstall -y $pkg)"
    fi
  done
  FAKES_DIR="$VENV/bevkit-npu-fakes"
  PTH_TEXT="$FAKES_DIR
import os, sys; os.environ.get('BEVKIT_EMULATE_DEVICE') == 'npu' and sys.path.append('$FAKES')"
  if [[ $DRY_RUN == 1 ]]; then
    log "npu-fakes: would write bevkit-npu-fakes.pth into the venv's site-packages: mx_driving from $FAKES always, torch_npu with BEVKIT_EMULATE_DEVICE=npu"
  else
    [[ "$FAKES" != *[\'\\]* && "$FAKES$FAKES_DIR" != *$'\n'* ]] \
      || fail "the path of the kit or the venv contains a quote, backslash or newline, which a .pth file cannot hold: move it for --emulate"
    SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    if [[ -f "$SITE/bevkit-npu-fakes.pth" && "$(cat "$SITE/bevkit-npu-fakes.pth")" == "$PTH_TEXT" \
          && "$(readlink "$FAKES_DIR/mx_driving")" == "$FAKES/mx_driving" ]]; then
      log "npu-fakes: up to date"
    else
      mkdir -p "$FAKES_DIR"
      ln -sfn "$FAKES/mx_driving" "$FAKES_DIR/mx_driving"
      printf '%s\n' "$PTH_TEXT" > "$SITE/bevkit-npu-fakes.pth"
      log "npu-fakes: wrote $SITE/bevkit-npu-fakes.pth: \`import mx_driving\` gives the fake from $FAKES, \`import torch_npu\` too where BEVKIT_EMULATE_DEVICE=npu"
    fi
  fi
elif [[ "$PROFILE" == npu ]]; then
  NPU_PIN="$(PYTHONPATH="$REPO_ROOT" "$PYTHON" -m bevkit.doctor --torch-npu-pin)"
  step torch-npu "torch_npu==$NPU_PIN (matches the installed CANN; table: npu-cann.tsv)" \
    pip_install "torch-npu==$NPU_PIN" "${CONSTRAINTS[@]}"
  step npu-accel "mx_driving (DrivingSDK ops) from npu-accel.txt" \
    pip_install -r "$REQ/npu-accel.txt" "${CONSTRAINTS[@]}"
fi

# -------------------------------------------------------------------------------------- common + mmcv
step common "OpenMMLab, nuScenes and friends from common.txt" \
  pip_install -r "$REQ/common.txt" "${CONSTRAINTS[@]}"

MMCV_ENV=(MMCV_WITH_OPS=1 "MAX_JOBS=$JOBS")
MMCV_CACHE=()
case "$PROFILE" in
  cuda) MMCV_ENV+=(FORCE_CUDA=1); MMCV_CACHE=(--no-cache-dir) ;;
  # pip's wheel cache does not know which ops a wheel was built with: never reuse one across profiles
  npu) if [[ $EMULATE == 0 ]]; then MMCV_ENV+=(FORCE_NPU=1); MMCV_CACHE=(--no-cache-dir); fi ;;  # emulate: CPU ops
esac
mmcv_ops_check() {
  local pre="import torch"; [[ "$PROFILE" == npu && $EMULATE == 0 ]] && pre="import torch, torch_npu"
  "$VPY" -c "$pre; import mmcv, mmcv._ext; assert mmcv.__version__ == '$MMCV_VERSION', mmcv.__version__"
}
MMCV_OK=0
if [[ $DRY_RUN == 0 ]]; then
  if mmcv_ops_check >>"$LOG" 2>&1; then
    MMCV_OK=1
  elif "$VPY" -m pip show mmcv-full >/dev/null 2>&1; then
    # a build without ops (or another version) satisfies pip and would be kept forever: replace it
    log "mmcv: the installed mmcv-full lacks its compiled ops or is not $MMCV_VERSION; rebuilding"
    "$VPY" -m pip uninstall -y mmcv-full >>"$LOG" 2>&1
    MMCV_CACHE=(--no-cache-dir)
    rm -f "$STAMPS/mmcv"
  fi
fi
MMCV_OPS="$PROFILE"; [[ $EMULATE == 1 ]] && MMCV_OPS="cpu (emulated npu)"
step mmcv "mmcv-full $MMCV_VERSION with $MMCV_OPS ops (a first build takes ~8-10 min on 2 cores; pip caches the wheel)" \
  with_env "${MMCV_ENV[@]}" "$VPY" -m pip install --no-build-isolation ${MMCV_CACHE[@]+"${MMCV_CACHE[@]}"} \
  "mmcv-full==$MMCV_VERSION" "${CONSTRAINTS[@]}"
if [[ $DRY_RUN == 0 && $MMCV_OK == 0 ]]; then
  mmcv_ops_check >>"$LOG" 2>&1 || fail "mmcv-full $MMCV_VERSION does not load its compiled ops (mmcv._ext); see $LOG"
fi

# ------------------------------------------------------------------------------------------- models
for m in "${MODEL_LIST[@]}"; do
  if [[ -f "$REQ/$m.txt" ]]; then
    step "$m-deps" "$m dependencies from $m.txt" pip_install -r "$REQ/$m.txt" "${CONSTRAINTS[@]}"
  fi
  if [[ -f "$REQ/$m-$PROFILE.txt" ]]; then
    step "$m-$PROFILE-deps" "$m dependencies for $PROFILE from $m-$PROFILE.txt" \
      pip_install -r "$REQ/$m-$PROFILE.txt" "${CONSTRAINTS[@]}"
  fi
  if [[ -f "$REQ/$m-nodeps.txt" ]]; then
    step "$m-nodeps" "$m packages installed without their dependencies ($m-nodeps.txt)" \
      pip_install --no-deps --no-build-isolation -r "$REQ/$m-nodeps.txt"
  fi
done

# ------------------------------------------------------------------------------------------------ kit
if [[ $DRY_RUN == 0 && -f "$STAMPS/kit" ]] && ! "$VPY" -m pip show bevkit >/dev/null 2>&1; then
  log "kit: not installed under its name (setuptools < 61 ignores pyproject.toml's [project]); installing again"
  rm -f "$STAMPS/kit"
fi
STEP_FILES=("$REPO_ROOT/pyproject.toml")
step kit "the kit itself (editable: bevkit from $REPO_ROOT)" \
  pip_install -e "$REPO_ROOT" --no-build-isolation --no-deps

# ----------------------------------------------------------------------------------- run environment
find_tcmalloc() {
  local lib
  for lib in libtcmalloc.so.4 libtcmalloc_minimal.so.4; do
    ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l {print $NF; exit}' | grep . && return 0
    for d in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do
      [[ -f "$d/$lib" ]] && { echo "$d/$lib"; return 0; }
    done
  done
  return 1
}
TCMALLOC="$(find_tcmalloc || true)"
if [[ -z "$TCMALLOC" && $SYSTEM_PACKAGES == 1 && $DRY_RUN == 0 ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    log "tcmalloc: installing libgoogle-perftools4 with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libgoogle-perftools4 >>"$LOG" 2>&1 \
      || log "tcmalloc: apt-get install failed (see $LOG); continuing without it"
    TCMALLOC="$(find_tcmalloc || true)"
  else
    log "tcmalloc: --system-packages needs root and apt-get; continuing without it"
  fi
fi
if [[ -n "$TCMALLOC" ]]; then
  log "tcmalloc: $TCMALLOC (preloaded by the venv's environment file)"
else
  log "tcmalloc: not found, skipped (faster host allocation: apt-get install libgoogle-perftools4, or rerun with --system-packages)"
fi

ENV_FILE="$VENV/bevkit-env.sh"
ENV_TEXT="# Written by setup.sh: what every run of the kit needs. Sourced by bin/activate and by tools/launch."
if [[ $EMULATE == 1 ]]; then
  # no NPU here: the machine's own profile (detected at run time) decides where runs go
  ENV_TEXT+="
# --emulate: npu pins with test fakes for torch_npu / mx_driving; no BEVKIT_PROFILE (this machine has no NPU)"
else
  ENV_TEXT+="
export BEVKIT_PROFILE=$PROFILE"
fi
if [[ "$PROFILE" == npu && -n "$CANN_ENV" ]]; then
  ENV_TEXT+="
# CANN toolkit (npu)
. \"$CANN_ENV\""
fi
if [[ -n "$TCMALLOC" ]]; then
  ENV_TEXT+="
case \":\${LD_PRELOAD:-}:\" in *\":$TCMALLOC:\"*) ;; *) export LD_PRELOAD=\"$TCMALLOC\${LD_PRELOAD:+:\$LD_PRELOAD}\" ;; esac"
fi
if [[ $DRY_RUN == 1 ]]; then
  log "env: would write $ENV_FILE"
elif [[ -f "$ENV_FILE" && "$(cat "$ENV_FILE")" == "$ENV_TEXT" ]]; then
  log "env: $ENV_FILE up to date"
else
  printf '%s\n' "$ENV_TEXT" > "$ENV_FILE"
  log "env: wrote $ENV_FILE"
fi
HOOK='[ -f "$VIRTUAL_ENV/bevkit-env.sh" ] && . "$VIRTUAL_ENV/bevkit-env.sh"  # bevkit'
if [[ $DRY_RUN == 0 ]] && ! grep -qF "$HOOK" "$VENV/bin/activate"; then
  printf '\n%s\n' "$HOOK" >> "$VENV/bin/activate"
fi

# -------------------------------------------------------------------------------------------- upstream
if [[ $UPSTREAM == 1 ]]; then
  for m in "${MODEL_LIST[@]}"; do
    case "$m" in
      fbocc) NAME=FB-BEV; SRC="$FBBEV_SRC_ARG" ;;
      bevdepth) NAME=BEVDepth; SRC="$BEVDEPTH_SRC_ARG" ;;
    esac
    SRC_ARGS=(); if [[ -n "$SRC" ]]; then SRC_ARGS=(--src "$SRC"); fi
    if [[ $DRY_RUN == 1 ]]; then
      log "upstream $NAME: would materialize into $UPSTREAM_DIR/$NAME from ${SRC:-its git URL}, check and apply the kit patches"
      continue
    fi
    # materialize is itself idempotent: it verifies an existing checkout instead of fetching again
    "$VPY" -m bevkit.upstream --upstream-dir "$UPSTREAM_DIR" materialize "$NAME" ${SRC_ARGS[@]+"${SRC_ARGS[@]}"} \
      || fail "upstream $NAME could not be set up (the message above says why)"
    "$VPY" -m bevkit.upstream --upstream-dir "$UPSTREAM_DIR" install "$NAME" --profile "$PROFILE" 2>>"$LOG" \
      || fail "upstream $NAME: its build step failed (see $LOG)"
  done
else
  log "upstream: skipped (--no-upstream)"
fi

REL_VENV="$VENV"; [[ "$VENV" == "$PWD"/* ]] && REL_VENV="${VENV#$PWD/}"
if [[ $DRY_RUN == 1 ]]; then
  log "dry run: nothing was changed"
  exit 0
fi
log "setup finished in $((SECONDS - START))s"
if [[ $UPSTREAM == 1 && $EMULATE == 0 ]]; then
  echo "Next: $REL_VENV/bin/python -m bevkit.doctor"
else
  echo "Next: $REL_VENV/bin/python -m pytest -q"
fi
