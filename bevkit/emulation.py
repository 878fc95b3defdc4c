"""What an emulated device does where a CPU cannot do it the device's way (emulated device lanes, README).

Autocast: CUDA and NPU autocast run matmuls and convolutions in fp16 and a list of numerically sensitive ops in
float32 (softmax, norms, exp/log/pow, sums, most losses), promote a few mixed-dtype ops to the widest input, and
refuse ``binary_cross_entropy``; torch_npu registers the same lists for its device as torch does for CUDA
(``AutocastPrivateUse1`` kernels: lower_precision_fp, fp32, fp32_set_opt_dtype, promote, the banned BCE). CPU
autocast, which is what CPU tensors can get, lowers the same matmuls and convolutions but keeps most of the
float32 list in the input's dtype, so fp16 code that works on the device fails on the CPU (a softmax stays fp16
and meets a float32 target). :class:`EmulatedAutocast` is CPU autocast in the device's dtype plus the device's
float32 / promote / banned rules for the ops called from Python (``torch.*``, ``Tensor.*``,
``torch.nn.functional.*``), applied by a TorchFunctionMode while CPU autocast is on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bevkit import log, torchcompat

_said = {"bf16": False}

_LOWER = (torch.float16, torch.bfloat16)

#: ops CUDA/NPU autocast runs in float32 (the 'fp32' and 'fp32_set_opt_dtype' / 'fp32_append_dtype' lists)
_FP32_NAMES = ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
               "rsqrt", "sinh", "tan", "pow", "cdist", "renorm", "logsumexp", "dist", "pdist", "norm",
               "cosine_similarity", "prod", "softmax", "log_softmax", "cumprod", "cumsum", "sum")
_FP32_FUNCTIONAL = ("softplus", "layer_norm", "group_norm", "cosine_similarity", "poisson_nll_loss",
                    "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss",
                    "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
                    "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "softmax",
                    "log_softmax", "pdist")
#: ops promoted to the widest floating input dtype
_PROMOTE_NAMES = ("addcdiv", "addcmul", "atan2", "cross", "dot", "tensordot", "scatter_add", "index_put")


def _functions(names, *owners):
    found = set()
    for owner in owners:
        for name in names:
            fn = getattr(owner, name, None)
            if fn is not None:
                found.add(fn)
    return found


_RULES = {}
for _fn in _functions(_FP32_NAMES, torch, torch.Tensor) | _functions(_FP32_FUNCTIONAL, F) | \
        _functions(("vector_norm", "matrix_norm"), torch.linalg) | {torch.Tensor.__pow__, torch.Tensor.__rpow__}:
    _RULES[_fn] = "fp32"
for _fn in _functions(_PROMOTE_NAMES, torch, torch.Tensor) | {F.bilinear, F.grid_sample, torch.grid_sampler}:
    _RULES[_fn] = "promote"
_RULES[F.binary_cross_entropy] = "banned"


def _cpu_autocast_on() -> bool:
    if hasattr(torch, "is_autocast_cpu_enabled") and not hasattr(torch, "get_autocast_dtype"):
        return torch.is_autocast_cpu_enabled()  # torch < 2.4
    return torch.is_autocast_enabled("cpu")


def _cast(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _float_dtypes(value, found):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        found.append(value.dtype)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _float_dtypes(v, found)
    return found


class _DevicePolicy(TorchFunctionMode):
    """The device's autocast rules for the ops CPU autocast treats differently (only while CPU autocast is on)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None and _cpu_autocast_on():
            if rule == "banned":
                raise RuntimeError("torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to "
                                   "autocast (refused by CUDA and NPU autocast; emulated here). Use "
                                   "binary_cross_entropy_with_logits, or compute it with autocast disabled.")
            dtypes = _float_dtypes([args, list(kwargs.values())], [])
            if rule == "fp32" and any(d in _LOWER for d in dtypes) and kwargs.get("dtype") is None:
                args, kwargs = _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}
            elif rule == "promote" and len(set(dtypes)) > 1:
                widest = torch.float64 if torch.float64 in dtypes else torch.float32
                args, kwargs = _cast(args, widest), {k: _cast(v, widest) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class EmulatedAutocast(torch.autocast):
    """``torch.autocast`` of an NPU or CUDA device for CPU tensors standing in for the device's: CPU autocast in
    ``dtype`` (fp16 by default, as on the devices) with the device's float32 / promote / banned op rules."""

    def __init__(self, enabled: bool = True, dtype: torch.dtype = torch.float16, cache_enabled: bool = True):
        if dtype == torch.float16 and not torchcompat.cpu_fp16_amp():
            # torch 2.1 (the npu profile's): no fp16 CPU autocast. bfloat16 is the nearest the CPU has, so the
            # device's autocast path (its op rules, the scaler, clipping) still runs; the loss scaler of such a
            # torch passes through (torchcompat.cpu_grad_scaler_class), as bf16 needs no scaling.
            if not _said["bf16"]:
                _said["bf16"] = True
                log.get("emulate").info(f"torch {torch.__version__} has no fp16 autocast on CPU tensors: the "
                                        "emulated device's autocast runs in bfloat16 (fp16 on the device)")
            dtype = torch.bfloat16
        super().__init__("cpu", enabled=enabled, dtype=dtype, cache_enabled=cache_enabled)
        self._policy = None

    def __enter__(self):
        result = super().__enter__()
        if self._enabled:
            self._policy = _DevicePolicy()
            self._policy.__enter__()
        return result

    def __exit__(self, *exc):
        if self._policy is not None:
            self._policy.__exit__(*exc)
            self._policy = None
        return super().__exit__(*exc)
