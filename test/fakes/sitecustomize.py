"""Start-up of every Python process of an emulated device lane (``BEVKIT_EMULATE_DEVICE=npu|cuda``).

Python imports ``sitecustomize`` at start-up from its path; the launcher puts this folder (test/fakes) on the
training processes' PYTHONPATH only when the run's device is emulated (:mod:`bevkit.launch.plan`), never in a real
run. Elsewhere (no emulated device) this module does nothing. In a lane it:

1. installs the profile's package set (:class:`bevkit.package_set.ProfileImportBlocker` for the device's setup
   profile with both models, as setup.sh installs by default): an import of a package the profile does not install
   fails as it would there. The other device's fakes are refused too (torch_npu on a cuda lane would make mmcv take
   its NPU code). Substitutes: the cpu environment's ``spconv`` (CPU build) stands in for the cuda profile's
   ``spconv-cu126`` (same package and version, CUDA kernels);
2. registers the stand-ins for compiled kernels (``bevkit.ops.dispatch.stand_in``) once the kit's dispatch module
   is imported: on npu mmcv's NPU focal loss (mmcv_npu.py; torch_npu and mx_driving are imported by name from this
   folder), on cuda FB-BEV's, BEVDepth's and mmcv's CUDA kernels (cuda_kernels.py);
3. records what the process did with the device's APIs and writes it at exit, per rank, to
   ``$BEVKIT_RUN_DIR/emulation/rank<RANK>.json`` (tests assert on it): the fakes' calls, the optimizer class and
   its fused/foreach flags at each step, the loss scaler's class and scale, autocast entries, gradient clipping,
   the DDP wrapper's class chain and the process group backend, Lightning's accelerator / strategy / precision
   plugin, the runtime patches applied per patch set, and the imports the package set refused.
   Observing only: each recorder calls the original and returns its result.
"""
from __future__ import annotations

import os

DEVICE = os.environ.get("BEVKIT_EMULATE_DEVICE", "")

#: the fakes of each device in this folder; a lane refuses the other device's
FAKES = {"npu": ("torch_npu", "mx_driving", "mmcv_npu"), "cuda": ("cuda_kernels",)}
#: distributions of a profile that the cpu environment replaces with its own build of the same package
SUBSTITUTES = {"cuda": {"spconv-cu126": "spconv"}}
MODELS = ("fbocc", "bevdepth")

RECORD = {"device": DEVICE, "steps": [], "scaler": [], "autocast": {}, "clip": [], "ddp": [], "backend": None}


def _after_import(module_name, callback):
    """Run ``callback(module)`` right after ``module_name`` is first executed in this process."""
    import importlib.abc
    import sys

    class AfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname != module_name:
                return None
            sys.meta_path.remove(self)
            for finder in sys.meta_path:
                spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None:
                    break
            else:
                return None
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                callback(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(1, AfterImport())


def _stand_ins(dispatch):
    import contextlib

    stack = contextlib.ExitStack()  # kept open for the life of the process
    if DEVICE == "cuda":
        import cuda_kernels

        stack.enter_context(cuda_kernels.install())
    elif DEVICE == "npu":
        import mmcv_npu

        stack.enter_context(dispatch.stand_in("npu", "mmcv.ops.focal_loss", mmcv_npu))
    RECORD["_stack"] = stack


def _observe_torch(torch):
    """Wrap (observing only) the torch entry points the device's training path goes through."""
    import functools

    def wrap(owner, name, before=None, after=None):
        original = getattr(owner, name)

        @functools.wraps(original)
        def recorded(*args, **kwargs):
            if before:
                before(*args, **kwargs)
            result = original(*args, **kwargs)
            if after:
                after(result, *args, **kwargs)
            return result

        setattr(owner, name, recorded)

    def step(optimizer, args, kwargs):
        RECORD["steps"].append({"optimizer": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
                                "fused": optimizer.defaults.get("fused"),
                                "foreach": optimizer.defaults.get("foreach")})

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(step)

    def clipped(norm, *args, **kwargs):
        max_norm = kwargs["max_norm"] if "max_norm" in kwargs else args[1]
        RECORD["clip"].append({"max_norm": float(max_norm), "norm": float(norm)})

    import importlib

    clip_grad = importlib.import_module("torch.nn.utils.clip_grad")
    wrap(clip_grad, "clip_grad_norm_", after=clipped)
    torch.nn.utils.clip_grad_norm_ = clip_grad.clip_grad_norm_

    try:
        scaler_cls = importlib.import_module("torch.amp.grad_scaler").GradScaler
    except ImportError:  # torch < 2.3 (2.1 on the Ascend reference stack): GradScaler lives in torch.cuda.amp
        scaler_cls = importlib.import_module("torch.cuda.amp.grad_scaler").GradScaler

    def scaler_step(result, scaler, *args, **kwargs):
        RECORD["scaler"].append({"scaler": f"{type(scaler).__module__}.{type(scaler).__qualname__}",
                                 "enabled": scaler.is_enabled(), "scale": float(scaler.get_scale())
                                 if scaler.is_enabled() else None})

    wrap(scaler_cls, "step", after=scaler_step)

    def entered(result, ctx, *args):
        key = f"{ctx.device}:{str(ctx.fast_dtype).replace('torch.', '')}:{'on' if ctx._enabled else 'off'}"
        RECORD["autocast"][key] = RECORD["autocast"].get(key, 0) + 1

    wrap(importlib.import_module("torch.amp.autocast_mode").autocast, "__enter__", after=entered)

    def ddp_made(result, *args, **kwargs):
        import torch.distributed as dist

        module = args[0]  # the DistributedDataParallel being built

        RECORD["ddp"].append({"classes": [f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__
                                          if c.__module__.split(".")[0] in ("mmcv", "torch", "pytorch_lightning",
                                                                             "lightning_fabric", "bevkit")],
                              "device_ids": module.device_ids})
        RECORD["backend"] = str(dist.get_backend())

    wrap(torch.nn.parallel.DistributedDataParallel, "__init__", after=ddp_made)


def _observe_lightning(pl):
    """Record the accelerator, strategy and precision plugin classes of each pl.Trainer (observing only)."""
    import functools

    original = pl.Trainer.__init__

    @functools.wraps(original)
    def __init__(trainer, *args, **kwargs):
        original(trainer, *args, **kwargs)
        name = lambda obj: f"{type(obj).__module__}.{type(obj).__qualname__}"  # noqa: E731
        plugin = trainer.precision_plugin
        RECORD.setdefault("trainer", []).append({
            "accelerator": name(trainer.accelerator), "strategy": name(trainer.strategy),
            "strategy_classes": [f"{c.__module__}.{c.__qualname__}" for c in type(trainer.strategy).__mro__
                                 if c.__module__.startswith(("pytorch_lightning", "bevkit"))],
            "process_group_backend": getattr(trainer.strategy, "process_group_backend", None),
            "precision_plugin": name(plugin), "plugin_device": getattr(plugin, "device", None),
            "scaler": name(plugin.scaler) if getattr(plugin, "scaler", None) is not None else None,
            "gradient_clip_val": trainer.gradient_clip_val})

    pl.Trainer.__init__ = __init__


def _observe_patching(patching):
    """Record the runtime patches each patch set applied in this process (observing only)."""
    original = patching.PatchSet.apply

    def apply(patch_set, *args, **kwargs):
        applied = original(patch_set, *args, **kwargs)
        RECORD.setdefault("patches", {})[patch_set.name] = list(applied)
        return applied

    patching.PatchSet.apply = apply


def _write(blocker):
    import json
    import sys

    run_dir, rank = os.environ.get("BEVKIT_RUN_DIR"), os.environ.get("RANK")
    if not run_dir or rank is None:
        return  # not a training rank (the launcher, torchrun's agent)
    fakes = {}
    for name in ("torch_npu", "mx_driving", "mmcv_npu", "cuda_kernels"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "CALLS"):
            counts = {}
            for call, _facts in module.CALLS:
                counts[call] = counts.get(call, 0) + 1
            fakes[name] = counts
    record = {k: v for k, v in RECORD.items() if not k.startswith("_")}
    record.update(fakes=fakes, profile=blocker.profile, refused_imports=sorted(set(blocker.refusals)),
                  spconv=getattr(sys.modules.get("spconv"), "__doc__", None),
                  entry=os.path.basename(sys.argv[0]) if sys.argv else None)
    folder = os.path.join(run_dir, "emulation")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)


def _start() -> None:
    import atexit

    from bevkit.package_set import ProfileImportBlocker

    refused = {name: f"it is the {other} lane's fake ({other} is not this lane's device)"
               for other, names in FAKES.items() if other != DEVICE for name in names}
    blocker = ProfileImportBlocker(DEVICE, MODELS, refused=refused, substitutes=SUBSTITUTES.get(DEVICE)).install()
    _after_import("bevkit.ops.dispatch", _stand_ins)
    _after_import("torch", _observe_torch)
    _after_import("pytorch_lightning", _observe_lightning)
    _after_import("bevkit.patching", _observe_patching)
    atexit.register(_write, blocker)


if DEVICE in FAKES:
    _start()
