"""The one place that decides which backend runs an op.

Backend for a call = the forced backend (``force_backend(name)`` block, else env ``BEVKIT_OPS_BACKEND``)
or, when nothing is forced, the device of the op's main input tensor (``bevkit.device.device_type``):

* ``'npu'``  -> ``'npu'``: the mx_driving kernels (imported lazily), called within their documented limits;
* ``'cuda'`` -> ``'cuda'``: the upstream / mmcv compiled kernels when importable, else the portable code;
* ``'cpu'``  -> ``'portable'``: our own PyTorch implementations.

Ops run through :func:`run_op`, which falls back to ``'portable'`` (logging once, via :func:`log_once`) when
the chosen backend cannot run a call: a missing library, or a documented kernel limit that splitting cannot
satisfy.

Compiled kernels are looked up in one place, :func:`kernel`: on a tensor in real accelerator memory it is the
installed module's function; on a CPU tensor standing in for an accelerator (``bevkit.device.emulate_device``)
it is the stand-in registered with :func:`stand_in` for that device and module (a fake that checks the real
kernel's argument contract), else nothing (portable code). mx_driving needs no stand-in registration: it can
only import on an NPU machine, so a module found under that name on a CPU machine is a fake already.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from bevkit.device import device_type

BACKENDS = ("portable", "npu", "cuda")
ENV = "BEVKIT_OPS_BACKEND"

logger = logging.getLogger("bevkit.ops")

_state = threading.local()
_logged: set = set()
_import_failed: dict = {}
#: (device, module name) -> module standing in for that compiled module on emulated devices.
_stand_ins: Dict[Tuple[str, str], Any] = {}
_soc_names: Dict[Tuple[Any, Optional[int]], str] = {}


def _check(name: str, origin: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{origin}={name!r} is not an ops backend; use one of {', '.join(BACKENDS)}")
    return name


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`force_backend` or ``BEVKIT_OPS_BACKEND``, or None."""
    forced = getattr(_state, "forced", None)
    if forced:
        return forced
    env = os.environ.get(ENV, "").strip()
    return _check(env, ENV) if env else None


@contextlib.contextmanager
def force_backend(name: Optional[str]) -> Iterator[None]:
    """Run every bevkit op inside the block on backend ``name`` ('portable', 'npu', 'cuda'; None = automatic)."""
    if name is not None:
        _check(name, "force_backend")
    previous = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = previous


def backend_for(tensor) -> str:
    """'portable', 'npu' or 'cuda' for an op whose main input is ``tensor``."""
    forced = forced_backend()
    if forced:
        return forced
    kind = device_type(tensor)
    if kind in ("npu", "cuda"):
        return kind
    return "portable"


def log_once(op: str, reason: str, level: int = logging.WARNING) -> None:
    """Log ``op: reason`` the first time this (op, reason) pair happens in the process."""
    key = (op, reason)
    if key in _logged:
        return
    _logged.add(key)
    logger.log(level, "bevkit.ops.%s: %s", op, reason)


def reset_log_once() -> None:
    """Forget which messages were logged (tests)."""
    _logged.clear()


def optional_import(module: str):
    """Import ``module`` or return None; a failed import is remembered (unless a test installs it later)."""
    if module in sys.modules and sys.modules[module] is not None:
        return sys.modules[module]
    if module in _import_failed:
        return None
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a compiled extension failing to load
        _import_failed[module] = f"{type(exc).__name__}: {exc}"
        return None


def import_failure(module: str) -> str:
    return _import_failed.get(module, "not importable")


def mx_driving(op: str):
    """The mx_driving module, or None (logged once) when it does not import.

    When the npu backend was forced explicitly and mx_driving is missing, that is a configuration error.
    """
    mod = optional_import("mx_driving")
    if mod is None:
        if forced_backend() == "npu":
            raise RuntimeError(
                f"bevkit.ops.{op}: the npu backend is forced ({ENV}/force_backend) but mx_driving does not import "
                f"({import_failure('mx_driving')}); install DrivingSDK (mx_driving) or unset {ENV}")
        log_once(op, f"mx_driving is not importable ({import_failure('mx_driving')}); using the portable code")
    return mod


def npu_soc_name(tensor) -> Optional[str]:
    """``torch_npu.npu.get_device_name`` of the tensor's NPU (mx_driving gates some kernels on it), or None when
    no torch_npu answers."""
    npu = getattr(sys.modules.get("torch_npu"), "npu", None)
    get = getattr(npu, "get_device_name", None)
    if get is None:
        return None
    key = (get, tensor.device.index)
    if key not in _soc_names:  # a runtime query: once per device
        _soc_names[key] = str(get(tensor.device.index))
    return _soc_names[key]


def real_device(tensor) -> str:
    """The tensor's actual device type, ignoring device emulation (mmcv kernels need real NPU/CUDA memory)."""
    return tensor.device.type


@contextlib.contextmanager
def stand_in(device: str, module: str, fake) -> Iterator[None]:
    """Inside the block, :func:`kernel` answers ``module``'s functions from ``fake`` for CPU tensors standing in
    for ``device`` tensors (tests and emulated-device runs; real accelerator memory always gets the real module)."""
    key = (device, module)
    previous = _stand_ins.get(key)
    _stand_ins[key] = fake
    try:
        yield
    finally:
        if previous is None:
            _stand_ins.pop(key, None)
        else:
            _stand_ins[key] = previous


def kernel(op: str, tensor, device: str, module: str, attribute: str, what: str) -> Optional[Callable]:
    """The compiled ``module.attribute`` that runs ``op`` on ``device`` for ``tensor``, or None (logged once).

    Real ``device`` memory: the installed module's function. A CPU tensor standing in for ``device`` (emulation,
    or a forced backend): the registered :func:`stand_in`, if any. Anything else: None, so the caller runs its
    portable code instead of handing the kernel memory it cannot read.
    """
    where = real_device(tensor)
    if where == device:
        fn = getattr(optional_import(module), attribute, None)
        if fn is None:
            log_once(op, f"{what} ({module}.{attribute}) is not importable; using the portable code")
        return fn
    fake = _stand_ins.get((device, module))
    if fake is not None and where == "cpu":
        return getattr(fake, attribute, None)
    log_once(op, f"{device} backend chosen for a {where} tensor and no stand-in for {what}; using the portable code")
    return None


def run_op(op: str, tensor, portable: Callable[[], Any],
           npu: Optional[Callable[[Any], Any]] = None,
           cuda: Optional[Tuple[str, str, Callable[[Any], Any], str]] = None) -> Any:
    """Run ``op`` on the backend chosen for ``tensor``, falling back to ``portable()``.

    ``npu(mx_driving)`` returns the result, or None when the call cannot run within mx_driving's limits.
    ``cuda = (module, attribute, call, what)``: ``call(kernel)`` runs the compiled kernel found at
    ``module.attribute`` (missing or None: not built here, logged once naming ``what``), or returns None to fall
    back.
    """
    backend = backend_for(tensor)
    if backend == "npu" and npu is not None:
        mx = mx_driving(op)
        if mx is not None:
            out = npu(mx)
            if out is not None:
                return out
    elif backend == "cuda" and cuda is not None:
        module, attribute, call, what = cuda
        fn = kernel(op, tensor, "cuda", module, attribute, what)
        if fn is not None:
            out = call(fn)
            if out is not None:
                return out
    return portable()


def mmcv_compiled(op: str, tensor, module: str, attribute: str, ours: Callable,
                  devices: Tuple[str, ...] = ("cuda", "npu")) -> Optional[Callable]:
    """mmcv's compiled ``module.attribute`` when the backend for ``tensor`` is one of ``devices`` (mmcv builds
    CUDA or NPU kernels), looked up by :func:`kernel`; None (logged once) so the caller runs its portable code.

    ``ours`` is bevkit's own function: a runtime patch may have rebound mmcv's name to it, and calling it back
    would recurse.
    """
    backend = backend_for(tensor)
    if backend not in devices:
        return None
    fn = kernel(op, tensor, backend, module, attribute, f"mmcv's compiled {attribute}")
    if fn is ours:
        log_once(op, f"mmcv's {attribute} is bevkit's own here (a runtime patch); using the portable code")
        return None
    return fn
