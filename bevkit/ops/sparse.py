"""``spconv.pytorch`` backed by mx_driving's sparse convolution, for machines without spconv (the npu profile).

FB-BEV imports ``spconv.pytorch`` unconditionally (``mmdet3d/models/fbbev/detectors/fbocc.py`` and
``mmdet3d/models/fbbev/modules/resnet3d.py``, reached from ``mmdet3d/models/__init__.py``), although only the
``use_spase_3dtensor=True`` branch of its 3-D ResNet uses it (off in every FB-OCC config). spconv has no NPU
build, and a CUDA/CPU spconv must not be installed on NPU. :func:`install_spconv_shim` makes
``import spconv.pytorch`` give the names upstream uses, backed by mx_driving (the DrivingSDK port replaces these
imports with mx_driving's modules):

* ``SubMConv3d``, ``SparseConv3d``, ``SparseInverseConv3d``, ``SparseSequential``, ``SparseModule``,
  ``SparseConvolution``: mx_driving's classes themselves (same constructor arguments; limits per DrivingSDK
  docs/zh/api/context/SubMConv3d.md and SparseConv3d.md: kernel_size in [1, 3] (1 or 3 and stride 1 for
  SubMConv3d), dilation and groups 1);
* ``SparseConvTensor``: mx_driving's, plus spconv 2.x's ``replace_feature`` (resnet3d calls it);
* ``functional.sparse_add``: spconv 2.x's sum of sparse tensors over the union of their active sites.

The shim is a package ``spconv`` without ``__version__``, so FB-BEV's ``mmdet3d/ops/spconv`` keeps treating
spconv 2 as absent (it registers spconv 2 layers with mmcv only when ``spconv.__version__ >= '2.0.0'``).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Optional

SHIM_ATTR = "__bevkit_spconv_shim__"


def _spconv_error() -> Optional[str]:
    """Why the real ``spconv.pytorch`` does not import (None when it does, or when our shim is already in)."""
    mod = sys.modules.get("spconv")
    if mod is not None and getattr(mod, SHIM_ATTR, False):
        return None
    try:
        importlib.import_module("spconv.pytorch")
    except Exception as exc:  # ImportError, or a spconv build whose compiled part fails to load
        return f"{type(exc).__name__}: {exc}"
    return None


def _build(mx) -> types.ModuleType:
    class SparseConvTensor(mx.SparseConvTensor):
        """mx_driving's SparseConvTensor with spconv 2.x's ``replace_feature``."""

        def replace_feature(self, feature):
            new = SparseConvTensor(feature, self.indices, self.spatial_shape, self.batch_size,
                                   getattr(self, "grid", None))
            new.indice_dict = dict(getattr(self, "indice_dict", {}))
            return new

    def sparse_add(*tensors):
        """Sum of sparse tensors of one spatial shape and batch size over the union of their active sites."""
        if not tensors:
            raise ValueError("spconv.pytorch.functional.sparse_add needs at least one SparseConvTensor")
        first = tensors[0]
        shape = [int(s) for s in first.spatial_shape]
        for t in tensors[1:]:
            if [int(s) for s in t.spatial_shape] != shape or t.batch_size != first.batch_size:
                raise ValueError(f"sparse_add: spatial shapes / batch sizes differ: {shape}/{first.batch_size} vs "
                                 f"{list(t.spatial_shape)}/{t.batch_size}")
        import torch

        if all(t.indices is first.indices or torch.equal(t.indices, first.indices) for t in tensors[1:]):
            feats = first.features
            for t in tensors[1:]:
                feats = feats + t.features
            indices = first.indices
        else:
            strides = [1]
            for s in reversed(shape):
                strides.insert(0, strides[0] * s)  # [B stride, spatial strides...]
            weights = torch.tensor(strides, dtype=torch.long, device=first.indices.device)
            keys = torch.cat([(t.indices.long() * weights).sum(1) for t in tensors])
            uniq, inverse = torch.unique(keys, return_inverse=True)
            all_feats = torch.cat([t.features for t in tensors])
            feats = all_feats.new_zeros(uniq.numel(), all_feats.shape[1]).index_add(0, inverse, all_feats)
            cols, rest = [], uniq
            for w in strides:
                cols.append(torch.div(rest, w, rounding_mode="floor"))
                rest = rest - cols[-1] * w
            indices = torch.stack(cols, 1).to(first.indices.dtype)
        out = SparseConvTensor(feats, indices, first.spatial_shape, first.batch_size)
        out.indice_dict = dict(getattr(first, "indice_dict", {}))
        return out

    functional = types.ModuleType("spconv.pytorch.functional")
    functional.sparse_add = sparse_add
    pytorch = types.ModuleType("spconv.pytorch")
    pytorch.__path__ = []  # a package: 'from spconv.pytorch import functional' and submodule imports work
    for name in ("SubMConv3d", "SparseConv3d", "SparseInverseConv3d", "SparseSequential", "SparseModule",
                 "SparseConvolution"):
        setattr(pytorch, name, getattr(mx, name))
    pytorch.SparseConvTensor = SparseConvTensor
    pytorch.functional = functional
    pytorch.__doc__ = "bevkit's spconv.pytorch on mx_driving (bevkit.ops.sparse)"
    return pytorch


def install_spconv_shim() -> bool:
    """Make ``import spconv.pytorch`` work on machines without spconv, backed by mx_driving.

    Returns False (and changes nothing) when the real spconv imports, True once the shim is installed (again:
    True, idempotent). Raises ImportError with the fix when neither spconv nor mx_driving imports. Call it
    before upstream FB-BEV's ``mmdet3d.models`` is imported.
    """
    existing = sys.modules.get("spconv")
    if existing is not None and getattr(existing, SHIM_ATTR, False):
        return True
    why = _spconv_error()
    if why is None:
        return False
    try:
        mx = importlib.import_module("mx_driving")
    except Exception as exc:  # ImportError, or torch_npu failing to load without CANN
        raise ImportError(f"FB-BEV imports spconv.pytorch, which does not import here ({why}), and mx_driving, "
                          f"whose sparse convolutions would stand in for it, does not either ({type(exc).__name__}: "
                          f"{exc}). On NPU rerun setup.sh --profile npu (it installs mx_driving); on CPU/CUDA the "
                          "fbocc requirements install spconv.") from exc
    pytorch = _build(mx)
    package = types.ModuleType("spconv")
    package.__path__ = []
    package.pytorch = pytorch
    setattr(package, SHIM_ATTR, True)
    package.__doc__ = "bevkit's stand-in for spconv (no __version__: mmdet3d.ops.spconv sees no spconv 2)"
    for name in [n for n in sys.modules if n == "spconv" or n.startswith("spconv.")]:
        del sys.modules[name]  # leftovers of a failed import of the real package
    sys.modules["spconv"] = package
    sys.modules["spconv.pytorch"] = pytorch
    sys.modules["spconv.pytorch.functional"] = pytorch.functional
    return True
