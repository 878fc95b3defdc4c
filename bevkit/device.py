"""Devices: which accelerators exist, what device a tensor is on, and the run's device.

The run's device is one :class:`RunDevice`, decided once: the launcher picks the device type from the
command line (``--device``) or the machine (:func:`detect_profile`, no torch) and hands it to every process
as ``BEVKIT_DEVICE``; a model runtime resolves it there once (``activate()``), and every patch and hook asks
:func:`run_device` for it: the torch device, the distributed backend, autocast on and off, synchronize, and
what upstream's hard-coded ``'cuda'`` means on this run. Nothing writes the device back into the environment.

Tests stand a CPU tensor in for an NPU one (``emulate_device('npu')`` or ``BEVKIT_EMULATE_DEVICE=npu``): the
run then targets ``npu`` with CPU memory (``RunDevice.emulated``), the place where emulated device lanes hang.

Importing this module does not import torch; functions that need it import it lazily.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

from bevkit import torchcompat

DEVICES = ("npu", "cuda", "cpu")

#: Distributed backend per device type (real devices; emulated ones use gloo on CPU tensors).
DIST_BACKEND = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}

DEVICE_ENV = "BEVKIT_DEVICE"
EMULATE_ENV = "BEVKIT_EMULATE_DEVICE"
_emulated: Optional[str] = None
_active: Optional["RunDevice"] = None


def _check(kind: str, origin: str) -> str:
    if kind not in DEVICES:
        raise ValueError(f"{origin}={kind!r} is not a device type; use one of {', '.join(DEVICES)}")
    return kind


def emulated_device(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The device type CPU tensors are treated as (tests only), or None."""
    env = os.environ if environ is None else environ
    return _emulated or env.get(EMULATE_ENV) or None


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
    """Install profile (and the launcher's default device) for this machine, decided without torch.

    An Ascend machine has ``npu-smi`` or a CANN toolkit (ASCEND_HOME_PATH / the default install
    folder); a CUDA machine has ``nvidia-smi``; anything else is ``cpu``. ``BEVKIT_PROFILE`` overrides.
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


@dataclass(frozen=True)
class RunDevice:
    """The device a run targets, and everything the kit derives from it.

    ``kind``: 'npu', 'cuda' or 'cpu'. ``emulated``: CPU tensors stand in for ``kind`` (tests with the fake
    torch_npu / mx_driving). ``local_rank``: the process's device index on its node (torchrun's LOCAL_RANK).
    """

    kind: str
    emulated: bool = False
    local_rank: int = 0

    def __post_init__(self):
        _check(self.kind, "device")

    @classmethod
    def resolve(cls, requested: Optional[str] = None,
                environ: Optional[Mapping[str, str]] = None) -> "RunDevice":
        """The run's device: ``requested`` (a --device option), else ``BEVKIT_DEVICE`` (the launcher's
        decision), else the emulated device (tests), else the best available (npu > cuda > cpu)."""
        env = os.environ if environ is None else environ
        emulated = emulated_device(env)
        if requested:
            kind = _check(requested, "--device")
        elif env.get(DEVICE_ENV):
            kind = _check(env[DEVICE_ENV], DEVICE_ENV)
        else:
            kind = emulated or default_device()
        return cls(kind=kind, emulated=emulated == kind and kind != "cpu",
                   local_rank=int(env.get("LOCAL_RANK", "0") or 0))

    @classmethod
    def of(cls, kind: "str | RunDevice") -> "RunDevice":
        """A RunDevice for a device type (emulation as currently set); RunDevice instances pass through."""
        if isinstance(kind, RunDevice):
            return kind
        _check(kind, "device")
        return cls(kind=kind, emulated=emulated_device() == kind and kind != "cpu",
                   local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0))

    # --- where tensors live ---------------------------------------------------------------------------
    @property
    def memory(self) -> str:
        """The device type tensors are really allocated on ('cpu' when emulated)."""
        return "cpu" if self.emulated else self.kind

    @property
    def torch_device(self):
        """torch.device for the model and batches of this process."""
        import torch

        if self.memory == "cpu":
            return torch.device("cpu")
        return torch.device(self.kind, self.local_rank)

    @property
    def dist_backend(self) -> str:
        """Collective backend: hccl / nccl / gloo; emulated devices use gloo on CPU tensors."""
        return DIST_BACKEND[self.memory]

    def collective_device(self):
        """Device of tensors handed to torch.distributed collectives (gloo needs CPU tensors)."""
        import torch
        import torch.distributed as dist

        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else self.dist_backend
        if str(backend) == "gloo":
            return torch.device("cpu")
        return self.torch_device

    def cuda_means(self, device, collective: bool = False):
        """Upstream hard-codes ``'cuda'``: map a 'cuda' device argument to this run's device (the device of
        collective tensors when ``collective``); anything else is returned unchanged."""
        if device is not None and str(device).split(":")[0] == "cuda":
            return self.collective_device() if collective else self.torch_device
        return device

    # --- execution --------------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for queued work on the device, so wall-clock step times are real."""
        if self.memory == "cuda":
            import torch

            torch.cuda.synchronize()
        elif self.memory == "npu":
            import torch

            torch.npu.synchronize()  # type: ignore[attr-defined]

    def rng_state(self):
        """The device's own random generator state (this process's device), None for CPU memory (the CPU
        generator is torch's default one)."""
        if self.memory == "cpu":
            return None
        import torch

        # torch.cuda / torch.npu (torch_npu.npu.get_rng_state: Ascend op-plugin docs, Random-Number-Generator.md)
        return getattr(torch, self.memory).get_rng_state()

    def set_rng_state(self, state) -> None:
        if state is not None and self.memory != "cpu":
            import torch

            getattr(torch, self.memory).set_rng_state(state.cpu())

    def autocast(self, enabled: bool = True, dtype=None):
        """torch.autocast for this device; on CPU the upstream 'fp16' means bfloat16 (no fp16 CPU autocast). An
        emulated device gets its own autocast on the CPU tensors (:class:`bevkit.emulation.EmulatedAutocast`: fp16
        by default, the device's float32 op rules)."""
        import torch

        if self.emulated:
            from bevkit.emulation import EmulatedAutocast

            return EmulatedAutocast(enabled=enabled, dtype=dtype or torch.float16)
        if self.memory == "cpu" and dtype is None:
            dtype = torch.bfloat16
        return torch.autocast(device_type=self.memory, enabled=enabled, dtype=dtype)

    def grad_scaler(self, *args, **kwargs):
        """The device's dynamic loss scaler for fp16 AMP: torch_npu's on NPU, torch's CUDA one on CUDA, None on CPU
        (bf16 needs none). Emulated devices keep the device's API where it runs on CPU tensors (the fake
        torch_npu's scaler) and otherwise get torch's CPU GradScaler: torch's CUDA scaler disables itself on a
        machine without CUDA, and the point of an emulated run is that the loss is scaled as on the device."""
        import torch

        if self.kind == "npu":
            import torch_npu

            return torch_npu.npu.amp.GradScaler(*args, **kwargs)
        if self.kind == "cuda":
            if not self.emulated:
                if torchcompat.torch_at_least(2, 3):  # torch.amp.GradScaler(device) from 2.3
                    return torch.amp.GradScaler("cuda", *args, **kwargs)
                return torch.cuda.amp.GradScaler(*args, **kwargs)
            if not torchcompat.cpu_fp16_amp():
                raise RuntimeError(f"torch {torch.__version__} cannot emulate cuda's fp16 AMP on CPU tensors (no fp16 "
                                   "CPU autocast, no CPU GradScaler): use torch >= 2.3, or run on a CUDA GPU")
            return torch.amp.GradScaler("cpu", *args, **kwargs)  # the class the device gets, on CPU memory
        return None

    @contextlib.contextmanager
    def autocast_off(self) -> Iterator[None]:
        """Autocast disabled on this device and the CPU: what upstream's ``torch.cuda.amp.autocast(False)``
        means (it switches only CUDA autocast off, so fp32-only code would run in fp16/bf16 elsewhere)."""
        import torch

        with contextlib.ExitStack() as stack:
            for kind in dict.fromkeys(("cpu", self.memory)):
                stack.enter_context(torch.autocast(device_type=kind, enabled=False))
            yield


def run_device() -> RunDevice:
    """The run's device: the one a model runtime activated, else resolved from the environment now."""
    return _active if _active is not None else RunDevice.resolve()


def set_run_device(device: Optional[RunDevice]) -> None:
    """Make ``device`` the process's run device (model runtimes' ``activate``); None forgets it."""
    global _active
    _active = device


def synchronize(kind: str) -> None:
    """:meth:`RunDevice.synchronize` for a device type."""
    RunDevice.of(kind).synchronize()


def autocast(kind: str, enabled: bool = True, dtype=None):
    """:meth:`RunDevice.autocast` for a device type."""
    return RunDevice.of(kind).autocast(enabled=enabled, dtype=dtype)


def main() -> None:  # pragma: no cover - tiny CLI used by setup.sh
    import sys

    if sys.argv[1:] == ["profile"]:
        print(detect_profile())
    else:
        print(" ".join(available_devices()))


if __name__ == "__main__":  # pragma: no cover
    main()
