"""FB-OCC patches for device portability: what upstream hard-codes for CUDA, made to follow the run's device.

Every helper asks :func:`bevkit.device.run_device` (resolved once by the runtime): model placement, the DDP /
DataParallel wrappers, process-group initialization, 'cuda' tensors in seed and result broadcasts, autocast off,
and the SyncBatchNorm policy (:func:`bevkit.models.fbocc.config.sync_bn_policy`).
"""
from __future__ import annotations

import functools

from bevkit.device import run_device
from bevkit.models.fbocc.config import apply_sync_bn_policy


def _with_device(original, param: str = 'device', collective: bool = True):
    """Call ``original`` with its hard-coded 'cuda' default replaced by the run's device."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if param not in kwargs:
            run = run_device()
            kwargs[param] = run.collective_device() if collective else run.torch_device
        return original(*args, **kwargs)

    return wrapper


def _module_cuda(original):
    """``model.cuda()`` in upstream's train/test code means "put the model on the run's device"."""

    def cuda(self, device=None):
        return self.to(run_device().torch_device)

    return cuda


def _current_device(original):
    """upstream passes torch.cuda.current_device() as DDP device_ids; the kit's wrapper ignores it."""

    def current_device():
        return run_device().local_rank

    return current_device


def _init_dist_pytorch(original):
    """mmcv's torchrun initialization binds a CUDA (or real NPU) device first: rank % torch.cuda.device_count()
    divides by zero without CUDA. CPU processes (and emulated devices) only need the process group."""

    @functools.wraps(original)
    def init(backend, **kwargs):
        run = run_device()
        if run.memory != 'cpu':
            return original(backend, **kwargs)
        import torch.distributed as dist

        dist.init_process_group(backend=run.dist_backend, **kwargs)

    return init


_CPU_DDP = {}


def _cpu_ddp_class(base):
    """MMDistributedDataParallel for CPU processes: mmcv only unwraps DataContainers when it has device ids, so
    batches are scattered to the CPU (mmcv's device -1) here first; the DDP gradient sync is unchanged."""
    if base in _CPU_DDP:
        return _CPU_DDP[base]
    from mmcv.parallel.scatter_gather import scatter_kwargs

    class CPUDistributedDataParallel(base):
        def _on_cpu(self, inputs, kwargs):
            inputs, kwargs = scatter_kwargs(inputs, kwargs, [-1], dim=self.dim)
            return inputs[0], kwargs[0]

        def train_step(self, *inputs, **kwargs):
            inputs, kwargs = self._on_cpu(inputs, kwargs)
            return super().train_step(*inputs, **kwargs)

        def val_step(self, *inputs, **kwargs):
            inputs, kwargs = self._on_cpu(inputs, kwargs)
            return super().val_step(*inputs, **kwargs)

        def _run_ddp_forward(self, *inputs, **kwargs):
            inputs, kwargs = self._on_cpu(inputs, kwargs)
            return self.module(*inputs, **kwargs)

    _CPU_DDP[base] = CPUDistributedDataParallel
    return CPUDistributedDataParallel


def _ddp_factory(original):
    """MMDistributedDataParallel(model, device_ids=[cuda idx], ...) -> the wrapper for the run's device.

    NPU: mmcv's NPUDistributedDataParallel; CUDA: MMDistributedDataParallel on the local GPU; CPU (and
    emulated devices): MMDistributedDataParallel with device_ids=None, i.e. torch DDP over gloo on CPU
    tensors (mmcv's scatter keeps CPU batches as they are).
    """

    def make(module, device_ids=None, **kwargs):
        run = run_device()
        module = module.to(run.torch_device)
        if run.memory == 'cpu':
            return _cpu_ddp_class(original)(module, device_ids=None, **kwargs)
        if run.kind == 'npu':
            from mmcv.device.npu import NPUDistributedDataParallel

            return NPUDistributedDataParallel(module, device_ids=[run.local_rank], **kwargs)
        return original(module, device_ids=[run.local_rank], **kwargs)

    return _factory_class(original, make)


def _factory_class(original, make):
    """A subclass of ``original`` whose constructor returns the device's wrapper (an instance of ``original``
    or of one of its subclasses), so the patched name still works with isinstance and as a base class."""

    class DeviceWrapper(original):
        def __new__(cls, module, device_ids=None, **kwargs):
            if cls is not DeviceWrapper:  # a subclass defined after patching: plain construction
                return super().__new__(cls)
            return make(module, device_ids, **kwargs)

    DeviceWrapper.__name__ = DeviceWrapper.__qualname__ = f"Device{original.__name__}"
    DeviceWrapper.__bevkit_original__ = original
    return DeviceWrapper


def _dp_factory(original):
    """MMDataParallel for single-process runs (launcher 'none') on the run's device."""

    def make(module, device_ids=None, **kwargs):
        run = run_device()
        module = module.to(run.torch_device)
        if run.memory == 'cpu':
            return original(module, device_ids=None, **kwargs)  # mmcv: no device ids = CPU
        if run.kind == 'npu':
            from mmcv.device.npu import NPUDataParallel

            return NPUDataParallel(module, device_ids=[run.local_rank], **kwargs)
        return original(module, device_ids=[run.local_rank], **kwargs)

    return _factory_class(original, make)


class _TorchWithRunDevice:
    """The ``torch`` module as seen by one upstream module, with tensor factories' device='cuda' mapped to the
    device collectives use (gloo: CPU; hccl: npu). Everything else is torch itself."""

    _FACTORIES = ("full", "tensor", "zeros", "ones", "empty", "arange")

    def __init__(self, base):
        self._base = base

    def __getattr__(self, name):
        attr = getattr(self._base, name)
        if name not in self._FACTORIES:
            return attr

        @functools.wraps(attr)
        def factory(*args, **kwargs):
            if 'device' in kwargs:
                kwargs['device'] = run_device().cuda_means(kwargs['device'], collective=True)
            return attr(*args, **kwargs)

        return factory


def _torch_with_run_device(original):
    return _TorchWithRunDevice(original)


class _AutocastOff:
    """``autocast(enabled=False)`` for the run's device (upstream disables only CUDA autocast)."""

    def __init__(self, enabled: bool = True, **kwargs):
        self._ctx = run_device().autocast_off() if not enabled else None

    def __enter__(self):
        if self._ctx is not None:
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            return self._ctx.__exit__(*exc)
        return False


def _autocast_for_device(original):
    return _AutocastOff


def _build_model(original):
    """build_model, then apply the SyncBN policy to every SyncBatchNorm (config SyncBN and the hard-coded
    nn.SyncBatchNorm of the history fusion)."""

    @functools.wraps(original)
    def build_model(*args, **kwargs):
        model = original(*args, **kwargs)
        return apply_sync_bn_policy(model)

    return build_model
