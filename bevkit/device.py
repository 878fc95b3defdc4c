"""Device handling: which accelerators exist, what device a tensor is on, and per-device helpers.

Everything device-specific in the kit asks this module rather than testing ``torch.cuda`` itself,
so that NPU, CUDA and CPU follow one code path, and tests can stand a CPU tensor in for an NPU one
(``emulate_device('npu')`` or ``BEVKIT_EMULATE_DEVICE=npu``).

Importing this module does not import torch; functions that need it import it lazily.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
from typing import Callable, Iterator, Optional

DEVICES = ("npu", "cuda", "cpu")

#: Distributed backend per device type.
DIST_BACKEND = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}

_EMULATE_ENV = "BEVKIT_EMULATE_DEVICE"
_emulated: Optional[str] = None


def emulated_device() -> Optional[str]:
    """The device type CPU tensors are treated as (tests only), or None."""
    return _emulated or os.environ.get(_EMULATE_ENV) or None


@contextlib.contextmanager
def emulate_device(kind: Optional[str]) -> Iterator[None]:
    """Treat CPU tensors as living on ``kind`` inside the block (used with fake NPU modules)."""
    global _emulated
    if kind is not None and kind not in DEVICES:
        raise ValueError(f"unknown device type {kind!r}; expected one of {DEVICES}")
    previous, _emulated = _emulated, kind
    try:
        yield
    finally:
        _emulated = previous


def device_type(tensor) -> str:
    """'npu', 'cuda' or 'cpu' for a tensor (or a torch.device / device string)."""
    dev = getattr(tensor, "device", tensor)
    kind = dev if isinstance(dev, str) else dev.type
    kind = kind.split(":")[0]
    if kind == "cpu":
        return emulated_device() or "cpu"
    return kind


def torch_npu_available() -> bool:
    """True when torch_npu imports and sees at least one NPU (needs CANN and Ascend hardware)."""
    try:
        importlib.import_module("torch_npu")
        import torch

        return bool(torch.npu.is_available())  # type: ignore[attr-defined]
    except Exception:  # ImportError, or the CANN runtime failing to load
        return False


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def available_devices() -> list:
    """Usable device types, best first; 'cpu' is always last."""
    found = []
    if torch_npu_available():
        found.append("npu")
    if cuda_available():
        found.append("cuda")
    return found + ["cpu"]


def default_device() -> str:
    return available_devices()[0]


def detect_profile(which: Callable[[str], Optional[str]] = shutil.which,
                   environ: Optional[dict] = None) -> str:
    """Install profile for this machine, decided without torch (setup.sh runs before torch exists).

    An Ascend machine has ``npu-smi`` or a CANN toolkit (ASCEND_HOME_PATH / the default install
    folder); a CUDA machine has ``nvidia-smi``; anything else is ``cpu``.
    """
    env = os.environ if environ is None else environ
    if env.get("BEVKIT_PROFILE"):
        profile = env["BEVKIT_PROFILE"]
        if profile not in DEVICES:
            raise ValueError(f"BEVKIT_PROFILE={profile!r} is not one of {DEVICES}")
        return profile
    if which("npu-smi") or env.get("ASCEND_HOME_PATH") or env.get("ASCEND_TOOLKIT_HOME"):
        return "npu"
    if which("nvidia-smi"):
        return "cuda"
    return "cpu"


def synchronize(kind: str) -> None:
    """Wait for queued work on the device, so wall-clock step times are real."""
    if kind == "cuda":
        import torch

        torch.cuda.synchronize()
    elif kind == "npu" and emulated_device() != "npu":
        import torch

        torch.npu.synchronize()  # type: ignore[attr-defined]


def autocast(kind: str, enabled: bool = True, dtype=None):
    """torch.autocast for a device type; on CPU the upstream 'fp16' means bfloat16 (CPU has no fp16 autocast)."""
    import torch

    if kind == "cpu" and dtype is None:
        dtype = torch.bfloat16
    if kind == "npu" and emulated_device() == "npu":
        kind = "cpu"
    return torch.autocast(device_type=kind, enabled=enabled, dtype=dtype)


def main() -> None:  # pragma: no cover - tiny CLI used by setup.sh
    import sys

    if sys.argv[1:] == ["profile"]:
        print(detect_profile())
    else:
        print(" ".join(available_devices()))


if __name__ == "__main__":  # pragma: no cover
    main()
