"""The environment of the training processes: the device's settings file (``configs/env/<device>.env``), CANN
on NPU, thread counts on CPU, PYTHONPATH, and the launcher -> process contract of :mod:`bevkit.env`.

The user's own environment wins over the settings files; launcher settings (``BEVKIT_*`` keys of a settings
file) are not passed on.

An emulated device (an emulated device lane: CPU tensors standing in for NPU / CUDA ones, README "Emulated device
lanes") gets the device's settings file; what differs: no CANN is sourced (the fakes stand in for the Ascend
stack), threads are split as for CPU runs (the work runs on the CPU), and the test fakes folder
(:data:`FAKES`) leads PYTHONPATH: its ``sitecustomize`` sets up the lane in every process (the profile's package
set, stand-ins for the compiled kernels, records of the device API calls).
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

from bevkit import REPO_ROOT
from bevkit.device import RunDevice
from bevkit.launch.request import LaunchError

ENV_DIR = REPO_ROOT / "configs" / "env"
#: the fakes of torch_npu / mx_driving / the compiled kernels and the lanes' sitecustomize (only in emulated runs)
FAKES = REPO_ROOT / "test" / "fakes"

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def expand(value: str, environ: Mapping[str, str]) -> str:
    """Shell-style ${VAR}, ${VAR:-default} and $VAR expansion (no command substitution)."""
    def repl(m: "re.Match[str]") -> str:
        name = m.group(1) or m.group(3)
        current = environ.get(name, "")
        if m.group(2) is not None and not current:
            return expand(m.group(2), environ)
        return current
    return _VAR.sub(repl, value)


def read_env_file(path: Path, environ: Mapping[str, str]) -> Dict[str, str]:
    """KEY=VALUE lines of a configs/env file, expanded against ``environ`` (comments and blanks skipped)."""
    values: Dict[str, str] = {}
    scope = dict(environ)
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"{path}:{lineno}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = expand(value, scope)
        scope.setdefault(key, values[key])
    return values


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / cgroup cpusets
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def find_cann_set_env(environ: Mapping[str, str], file_values: Mapping[str, str]) -> Optional[Path]:
    explicit = environ.get("BEVKIT_CANN_SET_ENV")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise LaunchError(f"BEVKIT_CANN_SET_ENV={explicit}: no such file (point it at CANN's set_env.sh)")
        return path
    for candidate in file_values.get("BEVKIT_CANN_SET_ENV_CANDIDATES", "").split(":"):
        if candidate and Path(candidate).is_file():
            return Path(os.path.normpath(candidate))
    return None


def source_env_script(script: Path, environ: Mapping[str, str]) -> Dict[str, str]:
    """The environment after sourcing a shell script (CANN set_env.sh) in bash."""
    try:
        out = subprocess.run(["bash", "-c", '. "$0" >/dev/null 2>&1; env -0', str(script)],
                             env=dict(environ), capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(f"could not source {script}: {e}") from e
    if out.returncode != 0:
        raise LaunchError(f"sourcing {script} failed (exit {out.returncode}): "
                          f"{out.stderr.decode(errors='replace')[-500:]}")
    env: Dict[str, str] = {}
    for item in out.stdout.split(b"\0"):
        key, sep, value = item.decode(errors="surrogateescape").partition("=")
        if sep and key and key not in ("_", "SHLVL", "PWD", "OLDPWD"):
            env[key] = value
    return env


def _join_paths(*parts: Optional[str]) -> str:
    seen: List[str] = []
    for part in parts:
        for item in (part or "").split(os.pathsep):
            if item and item not in seen:
                seen.append(item)
    return os.pathsep.join(seen)


@dataclass
class Environment:
    env: Dict[str, str]                 # the child's full environment
    env_set: Dict[str, str]             # what the launcher set or changed (printed, recorded)
    env_unset: List[str]                # inherited variables the launcher removed
    env_files: List[str] = field(default_factory=list)
    cann_set_env: Optional[Path] = None


def build(*, environ: Mapping[str, str], device, nproc: int, cores: int, pythonpath: List[Path],
          contract: Mapping[str, Optional[str]], refuse: Callable[[str], None], notes: List[str],
          source: Callable[[Path, Mapping[str, str]], Dict[str, str]] = None,
          defaults: Optional[Mapping[str, str]] = None) -> Environment:
    """The training processes' environment for ``device`` (a RunDevice or a device type): CANN, then the device
    file and the run's ``defaults`` (the user's environment wins over both), then the launcher's ``contract``
    (BEVKIT_* -> value; None removes an inherited value)."""
    source = source or source_env_script
    run = device if isinstance(device, RunDevice) else RunDevice(device)
    env = dict(environ)
    env_files: List[str] = []
    cann: Optional[Path] = None
    env_file = ENV_DIR / f"{run.kind}.env"
    file_values = read_env_file(env_file, env) if env_file.is_file() else {}
    if env_file.is_file():
        env_files.append(str(env_file.relative_to(REPO_ROOT)))
    lane: List[str] = []
    if run.emulated:
        if not (FAKES / "sitecustomize.py").is_file():
            refuse(f"an emulated {run.kind} run needs the test fakes of a kit checkout ({FAKES} is missing)")
        lane = [str(FAKES)]
        notes.append(f"emulated {run.kind}: CPU tensors over gloo, the fakes in {FAKES} stand in for the "
                     f"{run.kind} stack" + (" (CANN not sourced)" if run.kind == "npu" else ""))
    elif run.kind == "npu":
        cann = find_cann_set_env(env, file_values)
        if cann is not None:
            env = source(cann, env)
        elif env.get("ASCEND_TOOLKIT_HOME") or env.get("ASCEND_OPP_PATH"):
            notes.append("CANN set_env.sh not found; using the CANN environment already loaded in this shell")
        else:
            refuse(
                "CANN not found: install the CANN toolkit or point ASCEND_HOME_PATH at it "
                "(e.g. /usr/local/Ascend/ascend-toolkit/latest), or set BEVKIT_CANN_SET_ENV=/path/to/set_env.sh")
    for key, value in file_values.items():
        if key.startswith("BEVKIT_"):
            continue  # launcher settings, not for the training processes
        if key not in environ:
            env[key] = value
    for key, value in (defaults or {}).items():
        if key not in environ:
            env[key] = value
    if run.memory == "cpu" and "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    env.setdefault("PYTHONUNBUFFERED", "1")  # stream rank output into the tee as it happens
    env["PYTHONPATH"] = _join_paths(*lane, *[str(p) for p in pythonpath], str(REPO_ROOT), env.get("PYTHONPATH"))
    for key, value in contract.items():
        if value is None:
            env.pop(key, None)  # e.g. an exported BEVKIT_MAX_STEPS must not cut a full run short
        else:
            env[key] = value
    env_set = {k: v for k, v in sorted(env.items()) if environ.get(k) != v}
    env_unset = sorted(k for k in environ if k not in env)
    return Environment(env=env, env_set=env_set, env_unset=env_unset, env_files=env_files, cann_set_env=cann)
