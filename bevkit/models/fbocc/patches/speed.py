"""The DrivingSDK FB-OCC port's speed techniques (model_examples/FBOCC/tools/patch.py), each exact in maths and
each a named NPU patch in :mod:`bevkit.models.fbocc.patches` (the dataloader's pinned memory also on CUDA):

- ResNet blocks (mmdet's 2-D image backbone and FB-BEV's 3-D BEV encoder) end with ``bevkit.ops.add_relu``
  (``mx_driving.npu_add_relu``) instead of ``out += shortcut; relu(out)``; activation checkpointing (``with_cp``)
  is kept where upstream has it;
- the image backbone's stem max-pool runs ``bevkit.ops.max_pool2d`` (``mx_driving.npu_max_pool2d`` when no
  gradient is needed, i.e. evaluation: the op has no backward);
- trilinear ``F.interpolate`` of 5-D tensors in the 3-D FPN and the occupancy head runs on the spatial axes in
  reverse order (permute, interpolate, permute back): the same 8 weighted taps per output, which the port found
  faster on the NPU's aclnnUpsampleTrilinear;
- boolean-mask indexing of 1-D tensors and of rows of 2-D tensors becomes ``torch.masked_select`` inside the LSS
  voxel-pooling preparation and the depth loss (bit-identical results; one NPU op instead of nonzero + index);
- the training dataloader pins its batches (``pin_memory=True``; upstream's builder hard-codes False);
- opt-in (``BEVKIT_JPEG_DRAFT=1``, :mod:`bevkit.data.jpeg`): camera JPEGs decoded at the DCT scale the resize
  needs (changes the input pixels slightly, hence off by default).

The replacements are written from the maths of the upstream code they replace; float64 parity tests against the
upstream formulation are in test/fbocc_checks.py.
"""
from __future__ import annotations

import functools

from torch.overrides import TorchFunctionMode

from bevkit.device import run_device


def _ops():
    import bevkit.ops as ops

    return ops


# ------------------------------------------------------------------------------------------ ResNet blocks (2-D)


def _checkpointed(block, inner, x):
    """upstream's activation checkpointing: only with ``with_cp`` and when x needs a gradient."""
    if block.with_cp and x.requires_grad:
        import torch.utils.checkpoint as cp

        return cp.checkpoint(inner, x)
    return inner(x)


def _basic_block_forward(original):
    """mmdet BasicBlock: relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x)), the last add and relu fused."""

    @functools.wraps(original)
    def forward(self, x):
        def inner(x):
            out = self.relu(self.norm1(self.conv1(x)))
            out = self.norm2(self.conv2(out))
            shortcut = x if self.downsample is None else self.downsample(x)
            return _ops().add_relu(out, shortcut)

        return _checkpointed(self, inner, x)

    forward.__bevkit_original__ = original
    return forward


def _bottleneck_forward(original):
    """mmdet Bottleneck: 1x1, 3x3, 1x1 convs with norms and relus, then relu(out + shortcut(x)) fused. Blocks with
    plugins keep upstream's forward (FB-OCC has none)."""

    @functools.wraps(original)
    def forward(self, x):
        if self.with_plugins:
            return original(self, x)

        def inner(x):
            out = self.relu(self.norm1(self.conv1(x)))
            out = self.relu(self.norm2(self.conv2(out)))
            out = self.norm3(self.conv3(out))
            shortcut = x if self.downsample is None else self.downsample(x)
            return _ops().add_relu(out, shortcut)

        return _checkpointed(self, inner, x)

    forward.__bevkit_original__ = original
    return forward


def _stem_max_pool_cls():
    import torch.nn as nn

    class StemMaxPool2d(nn.MaxPool2d):
        """nn.MaxPool2d(3, 2, 1) through bevkit.ops.max_pool2d (mx_driving's kernel on NPU when no gradient is
        needed). No parameters: checkpoints are unchanged."""

        def forward(self, x):
            return _ops().max_pool2d(x, 3, 2, 1)

    return StemMaxPool2d


def _stem_layer(original):
    """ResNet._make_stem_layer, then its MaxPool2d(3, 2, 1) computed by bevkit.ops.max_pool2d."""

    @functools.wraps(original)
    def make_stem_layer(self, in_channels, stem_channels):
        original(self, in_channels, stem_channels)
        pool = getattr(self, "maxpool", None)
        if pool is not None and (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                                 pool.return_indices) in ((3, 2, 1, 1, False, False),):
            pool.__class__ = _stem_max_pool_cls()

    return make_stem_layer


# ------------------------------------------------------------------------------------------ ResNet blocks (3-D)


def _block3d_forward(original, bottleneck: bool):
    """FB-BEV's dense 3-D BasicBlock / Bottleneck with the closing add and relu fused (the sparse branch keeps
    upstream's forward). The layers' own with_cp (CustomResNet3D checkpoints whole layers) is untouched."""
    from mmcv.runner import force_fp32

    def forward(self, x, *args, **kwargs):
        if getattr(self, "use_spase_3dtensor", False):
            return original(self, x, *args, **kwargs)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if bottleneck:
            out = self.bn3(self.conv3(self.relu(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return _ops().add_relu(out, shortcut)

    inner = getattr(original, "__wrapped__", original)
    forward = force_fp32()(functools.wraps(inner)(forward))
    forward.__bevkit_original__ = original
    return forward


def _basic_block3d_forward(original):
    return _block3d_forward(original, bottleneck=False)


def _bottleneck3d_forward(original):
    return _block3d_forward(original, bottleneck=True)


# ------------------------------------------------------------------------------------ trilinear interpolation


def interpolate_axes_reversed(interpolate, input, size):
    """Trilinear ``interpolate(input, size)`` of [N, C, A, B, C'] computed on [N, C, C', B, A] and permuted back:
    the per-axis weights do not depend on the axis order, only the order of the 8-term sums does."""
    sizes = list(size) if isinstance(size, (list, tuple)) else [int(size)] * 3
    out = interpolate(input.permute(0, 1, 4, 3, 2), size=sizes[::-1], mode="trilinear", align_corners=False)
    return out.permute(0, 1, 4, 3, 2)


class _FunctionalTrilinearReversed:
    """torch.nn.functional for one upstream module, with 5-D trilinear resizing to a given size (align_corners
    False, as FPN3D and OccHead call it) done on reversed spatial axes. Everything else is torch's."""

    def __init__(self, base):
        self._base = base

    def __getattr__(self, name):
        return getattr(self._base, name)

    def interpolate(self, input, size=None, scale_factor=None, mode="nearest", align_corners=None, **kwargs):
        if mode == "trilinear" and input.dim() == 5 and size is not None and scale_factor is None \
                and not align_corners and not any(kwargs.values()):
            return interpolate_axes_reversed(self._base.interpolate, input, size)
        return self._base.interpolate(input, size=size, scale_factor=scale_factor, mode=mode,
                                      align_corners=align_corners, **kwargs)


def _functional_trilinear_reversed(original):
    return _FunctionalTrilinearReversed(original)


# ------------------------------------------------------------------------------------- boolean-mask indexing


class MaskedSelectIndexing(TorchFunctionMode):
    """Inside the block, ``t[mask]`` with a 1-D bool mask over a 1-D tensor or over the rows of a 2-D tensor is
    ``torch.masked_select`` (same elements, same order); every other indexing is unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import torch

        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and len(args) == 2 and not kwargs:
            t, mask = args
            if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 1 \
                    and t.dim() in (1, 2) and t.shape[0] == mask.shape[0]:
                if t.dim() == 1:
                    return torch.masked_select(t, mask)
                if t.shape[1] > 0:
                    return torch.masked_select(t, mask.unsqueeze(1).expand(t.shape)).view(-1, t.shape[1])
        return func(*args, **kwargs)


def masked_select_possible() -> bool:
    """The masked-select patches act only where torch hands indexing to function modes (not torch 2.1, the Ascend
    reference stack: there upstream's boolean indexing runs, and the log says so)."""
    from bevkit import log, torchcompat

    if torchcompat.function_modes_see_indexing():
        return True
    log.get("patches").warning("fbocc-masked-select-*: off on this torch (indexing bypasses function modes); "
                               "upstream's boolean-mask indexing runs")
    return False


def _masked_select_indexing(original):
    @functools.wraps(original)
    def with_masked_select(*args, **kwargs):
        with MaskedSelectIndexing():
            return original(*args, **kwargs)

    with_masked_select.__bevkit_original__ = original
    return with_masked_select


# ---------------------------------------------------------------------------------------------- dataloader


def loader_pinning(device=None) -> dict:
    """DataLoader arguments that pin batches for the run's device: page-locked host memory makes the copies to
    the accelerator asynchronous. Nothing for CPU memory (emulated devices included): there is nothing to pin for."""
    run = device or run_device()
    if run.memory == "cpu":
        return {}
    return {"pin_memory": True, "pin_memory_device": "" if run.memory == "cuda" else run.memory}


def _pinned_dataloader(original):
    """The DataLoader class name FB-BEV's build_dataloader calls (with pin_memory=False): pinned on accelerators."""

    @functools.wraps(original, updated=())
    def DataLoader(*args, **kwargs):
        kwargs.update(loader_pinning())
        return original(*args, **kwargs)

    DataLoader.__bevkit_original__ = original
    return DataLoader


def _jpeg_draft(original):
    """PrepareImageInputs.img_transform_core with the camera image decoded at the scale of its resize."""
    from bevkit.data import jpeg

    @functools.wraps(original)
    def img_transform_core(self, img, resize_dims, crop, flip, rotate):
        return original(self, jpeg.draft(img, resize_dims), resize_dims, crop, flip, rotate)

    return img_transform_core
