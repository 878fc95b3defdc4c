"""Shared runtime compatibility fixes for the OpenMMLab 1.x stack on current torch/numpy (patch set 'common').

Two kinds of fixes live here:

- :func:`prepare_imports` must run *before* torchvision / mmdet3d are imported (it defines missing
  torchvision op schemas; nothing to patch exists yet at that point). Model runtimes call it first.
- :data:`PATCHES` is the 'common' :class:`~bevkit.patching.PatchSet`: named attribute patches applied by
  ``bevkit.models.<model>.runtime.activate()`` for the run's device.

Nothing here edits installed files.
"""
from __future__ import annotations

import builtins
import contextlib
import ctypes
import importlib.util
import os
import sys
from typing import Iterator

from .device import run_device
from .patching import PatchSet, RuntimePatch

# Keeps the torch.library definitions alive: a Library object unregisters its ops when collected.
_TORCHVISION_LIB = None


def torchvision_needs_shim() -> bool:
    """True when torchvision's compiled ops cannot load next to this torch (a CUDA-built wheel on CPU torch)."""
    if "torchvision" in sys.modules:
        return False  # already imported: it either worked or failed before we could help
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = list(spec.submodule_search_locations)[0]
    libs = [f for f in os.listdir(folder) if f.startswith("_C.") and f.endswith((".so", ".pyd"))]
    if not libs:
        return True
    import torch  # noqa: F401  (the extension links against libtorch: load it first)

    try:
        # Loading registers the torchvision ops exactly as torchvision itself would.
        ctypes.CDLL(os.path.join(folder, libs[0]), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return True  # e.g. libc10_cuda.so missing: the CUDA-built wheel on a CPU torch
    return False


def ensure_torchvision_importable() -> bool:
    """Define the torchvision::nms/qnms schemas when torchvision's _C cannot load; returns True if it did.

    torchvision >= 0.16 registers fake kernels for these two ops at import time and raises
    ``operator torchvision::nms does not exist`` when its compiled library did not load. With the
    schemas defined, ``import torchvision``, the model zoo and the Python-fallback ops work;
    ``torchvision.ops.nms`` itself stays unavailable (FB-OCC/BEVDepth training never calls it).
    """
    global _TORCHVISION_LIB
    if _TORCHVISION_LIB is not None or not torchvision_needs_shim():
        return False
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB = lib
    return True


def prepare_imports() -> None:
    """Everything that must happen before upstream code is imported."""
    ensure_torchvision_importable()


@contextlib.contextmanager
def mmcv_version_as(version: str) -> Iterator[None]:
    """Let a package with a hard ``mmcv<=X`` assert import against mmcv 1.7.2 (e.g. PyPI mmdet3d 1.0.0rc4).

    mmcv 1.7.0 cannot be built against torch >= 2 headers (it forces C++14); 1.7.1/1.7.2 are API-compatible
    bug-fix releases. Only the import-time version check sees ``version``; the real value is restored after.
    """
    import mmcv

    real = mmcv.__version__
    mmcv.__version__ = version
    try:
        yield
    finally:
        mmcv.__version__ = real


# --------------------------------------------------------------------------------------------------
# Patch builders

#: numpy >= 1.24 removed these aliases of builtins; mmdet3d 1.0 (vendored by FB-BEV) still uses
#: np.bool/np.int on the training path (ObjectRangeFilter) and in evaluation.
NUMPY_ALIASES = {"bool": builtins.bool, "int": builtins.int, "float": builtins.float,
                 "complex": builtins.complex, "object": builtins.object, "str": builtins.str,
                 "long": builtins.int}


def _numpy_getattr(original):
    def __getattr__(name):
        if name in NUMPY_ALIASES:
            return NUMPY_ALIASES[name]
        return original(name)

    __getattr__.__bevkit_original__ = original
    return __getattr__


def _torch_at_least(major: int, minor: int) -> bool:
    import torch

    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return version >= (major, minor)


def _get_stream(original):
    """torch >= 2.1 takes a torch.device in ``_get_stream``; mmcv 1.x still passes the device index."""
    takes_device = _torch_at_least(2, 1)

    def get_stream(device):
        if isinstance(device, int) and takes_device:
            if device == -1:
                return None
            import torch

            device = torch.device(run_device().kind, device)
        return original(device)

    return get_stream


def _ddp_run_forward(original):
    """mmcv 1.7's MMDistributedDataParallel._run_ddp_forward reads ``_use_replicated_tensor_module``, an attribute
    of torch 1.13-era DDP; without it every DDP forward (evaluation) raises AttributeError."""

    def _run_ddp_forward(self, *inputs, **kwargs):
        module_to_run = self.module
        if getattr(self, "_use_replicated_tensor_module", False):
            module_to_run = self._replicated_tensor_module
        if self.device_ids:
            inputs, kwargs = self.to_kwargs(inputs, kwargs, self.device_ids[0])
            return module_to_run(*inputs[0], **kwargs[0])
        return module_to_run(*inputs, **kwargs)

    return _run_ddp_forward


def _run_device_autocast(original):
    """mmcv's ``autocast(enabled=...)`` (fp16) as the run device's autocast."""

    def autocast(enabled: bool = True, dtype=None, **kwargs):
        import torch

        return run_device().autocast(enabled=enabled, dtype=dtype or torch.float16)

    return autocast


def _run_device_grad_scaler(original):
    """mmcv's ``GradScaler(**loss_scale)`` as the run device's scaler."""

    def grad_scaler(*args, **kwargs):
        return run_device().grad_scaler(*args, **kwargs)

    return grad_scaler


def _fp16_casts_as_bf16(original):
    """mmcv's fp16 casts (auto_fp16: float -> half, force_fp32: half -> float) with bfloat16 for half."""
    import torch

    def cast_tensor_type(inputs, src_type, dst_type):
        src_type = torch.bfloat16 if src_type == torch.half else src_type
        dst_type = torch.bfloat16 if dst_type == torch.half else dst_type
        return original(inputs, src_type, dst_type)

    return cast_tensor_type


def _no_cpu_fp16() -> bool:
    from bevkit import torchcompat

    return not torchcompat.cpu_fp16_amp()


def _torch_safe_load(original):
    from bevkit.torch_load import TorchWithSafeLoad

    return TorchWithSafeLoad(original)


def _load_url(original):
    from bevkit.torch_load import load_url

    def weights_only_load_url(*args, **kwargs):
        return load_url(*args, **kwargs)

    weights_only_load_url.__bevkit_original__ = original
    return weights_only_load_url


PATCHES = PatchSet("common", [
    RuntimePatch(
        name="numpy-removed-aliases",
        target="numpy:__getattr__",
        build=_numpy_getattr,
        why="numpy >= 1.24 removed np.bool/np.int/np.float/...; the vendored mmdet3d 1.0 uses them on the "
            "training path (ObjectRangeFilter) and in evaluation. Resolved lazily, nothing is added to numpy."),
    RuntimePatch(
        name="mmcv-scatter-get-stream",
        target="mmcv.parallel._functions:_get_stream",
        build=_get_stream,
        devices=("npu", "cuda"), on="memory",
        why="torch >= 2.1 changed torch.nn.parallel._functions._get_stream to take a torch.device; mmcv 1.x "
            "Scatter passes an int and fails with \"'int' object has no attribute 'type'\" when copying "
            "batches to the accelerator (CPU runs never copy, so the patch is accelerator-only)."),
    RuntimePatch(
        name="mmcv-ddp-run-forward",
        target="mmcv.parallel.distributed:MMDistributedDataParallel._run_ddp_forward",
        build=_ddp_run_forward,
        why="mmcv 1.7 reads DDP's _use_replicated_tensor_module, which torch 2.13 no longer has (the DrivingSDK "
            "port replaces this method on torch 2.1 too): distributed evaluation (model(return_loss=False) under "
            "DDP) fails with AttributeError. Same behaviour, attribute read only when present."),
    RuntimePatch(
        name="mmcv-fp16-autocast-emulated",
        target="mmcv.runner.fp16_utils:autocast",
        build=_run_device_autocast,
        devices=("cuda",), on="emulation",
        why="emulated cuda only: mmcv's auto_fp16/force_fp32 use torch.cuda.amp.autocast, which turns itself off "
            "without CUDA; the run device's autocast is fp16 autocast on the CPU tensors standing in."),
    RuntimePatch(
        name="mmcv-fp16-grad-scaler-emulated",
        target="mmcv.runner.hooks.optimizer:GradScaler",
        build=_run_device_grad_scaler,
        devices=("cuda",), on="emulation",
        why="emulated cuda only: mmcv's Fp16OptimizerHook builds torch.cuda.amp.GradScaler, which disables itself "
            "without CUDA; the run device's scaler (torch's CPU GradScaler) scales the loss as on the GPU."),
    RuntimePatch(
        name="mmcv-fp16-casts-bf16-emulated",
        target="mmcv.runner.fp16_utils:cast_tensor_type",
        build=_fp16_casts_as_bf16,
        devices=("npu", "cuda"), on="emulation", enabled=_no_cpu_fp16,
        why="emulated devices on torch < 2.3 only (torch 2.1, the npu profile's): CPU autocast there takes "
            "bfloat16 only and refuses to mix it with fp16 inputs, so the emulated autocast runs in bfloat16 "
            "(bevkit.emulation) and mmcv's auto_fp16/force_fp32 cast to and from bfloat16 instead of half."),
    RuntimePatch(
        name="mmcv-checkpoint-weights-only",
        target="mmcv.runner.checkpoint:torch",
        build=_torch_safe_load,
        why="mmcv's checkpoint loader calls torch.load without weights_only (torch 2.1's default is False: a "
            "file could run code): every checkpoint mmcv reads goes through bevkit.torch_load (weights_only "
            "first; full unpickling only for files in trusted places)."),
    RuntimePatch(
        name="mmcv-model-zoo-weights-only",
        target="mmcv.runner.checkpoint:load_url",
        build=_load_url,
        why="mmcv's http:// and torchvision:// weights come from torch.hub.load_state_dict_from_url, whose "
            "weights_only defaults to False: load them with weights_only=True."),
])

