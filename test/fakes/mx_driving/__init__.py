"""A fake ``mx_driving`` (Ascend DrivingSDK) for tests on machines without an NPU.

It exposes what bevkit calls, with the exact positional signatures: the kernels ``bev_pool_v3``,
``npu_voxel_pooling_train``, ``multi_scale_deformable_attn``, ``grid_sampler3d_v1`` and ``deform_conv2d``, and
the sparse convolution modules (``SparseConvTensor``, ``SparseSequential``, ``SubMConv3d``, ``SparseConv3d``,
``SparseInverseConv3d``), and the fused ops the DrivingSDK FB-OCC port uses (``npu_add_relu``, ``npu_max_pool2d``,
``npu_batch_matmul``). Each kernel call is recorded in ``CALLS`` (name, dict of argument facts) and checked
against what the real package refuses; a breach raises ``ContractError``.

Limit policy (``BEVKIT_NPU_OP_LIMITS``, read at each call like the kit reads it): under ``documented`` (default)
the fake refuses everything the API pages document as unsupported; under ``port`` it accepts, for the three limits
the DrivingSDK ports exceed with their reported results, what the ports pass (grid_sampler3d_v1 with C = 1280,
npu_voxel_pooling_train with N = 473,088 per sample, multi_scale_deformable_attn with 10 dims per head) and still
refuses what mx_driving's code itself checks (csrc TORCH_CHECKs, wrapper raises) and every other documented limit. Results come from simple,
obviously-correct PyTorch (independent of bevkit.ops), so autograd gives the gradients. Install it with
``monkeypatch.setitem(sys.modules, 'mx_driving', module)``.

Sources (cited per check below), all DrivingSDK (gitcode/github Ascend/DrivingSDK) as shipped in the
``mx-driving==26.1.0.post1`` wheel: the API pages ``docs/zh/api/context/<op>.md`` (dtypes, shapes, documented
limits), the Python wrappers ``mx_driving/ops/<op>.py`` / ``mx_driving/modules/sparse_*.py`` (what reaches the
kernel as given: a wrapper that does not call ``.contiguous()`` hands the caller's strided view to the aclnn op,
because ``include/csrc/OpApiCommon.h``'s ``ConvertType`` passes the view's sizes, strides and storage offset
unchanged, and the custom AscendC kernels address their inputs as dense rows), and ``mx_driving/csrc/*.cpp``.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__version__ = "0.0.fake"

CALLS: List[Tuple[str, Dict[str, Any]]] = []

#: SoC name when no (fake) torch_npu answers torch_npu.npu.get_device_name (Atlas 800T A2).
DEFAULT_SOC = "Ascend910B1"


class ContractError(AssertionError):
    """A call broke what the real mx_driving accepts (documented contract or wrapper/kernel check)."""


def reset() -> None:
    CALLS.clear()


def calls(name: str) -> List[Dict[str, Any]]:
    return [facts for n, facts in CALLS if n == name]


def _port_policy() -> bool:
    """BEVKIT_NPU_OP_LIMITS=port: the limits the ports exceed are not enforced (see the module doc)."""
    return os.environ.get("BEVKIT_NPU_OP_LIMITS", "").strip().lower() == "port"


def _require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ContractError(f"mx_driving.{name}: {message}")


def _contiguous(name: str, **tensors) -> None:
    """The tensors reach the custom kernel as given (no .contiguous() in the wrapper): they must be dense."""
    for arg, t in tensors.items():
        if t is not None and not t.is_contiguous():
            _require(False, name, f"{arg} must be contiguous: the wrapper passes it to the kernel as is and the "
                                  f"kernel reads dense rows (got strides {tuple(t.stride())} for shape "
                                  f"{tuple(t.shape)})")


def _is_int_list(v, n: int) -> bool:
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in v) if isinstance(v, (list, tuple)) else False
    return ints and len(v) == n


def _soc_name(index=None) -> str:
    """torch_npu.npu.get_device_name(index), as the wrappers ask it (the fake torch_npu when installed)."""
    npu = getattr(sys.modules.get("torch_npu"), "npu", None)
    if npu is not None and hasattr(npu, "get_device_name"):
        return npu.get_device_name(index)
    return os.environ.get("FAKE_NPU_SOC", DEFAULT_SOC)


def _autocast_on(t: torch.Tensor) -> bool:
    """Is autocast on for t's device? (CPU tensors stand in for NPU ones: the kit's emulated NPU autocast is
    CPU autocast.)"""
    kind = t.device.type
    try:
        return bool(torch.is_autocast_enabled(kind))
    except TypeError:  # torch < 2.4: no device argument
        return bool(torch.is_autocast_cpu_enabled() if kind == "cpu" else torch.is_autocast_enabled())


# --------------------------------------------------------------------------------------------------- bev_pool_v3


def bev_pool_v3(*args, **kwargs):
    """bev_pool_v3(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_feat_shape) -> [B, C, D, H, W]."""
    name = "bev_pool_v3"
    _require(not kwargs and len(args) == 6, name, f"takes 6 positional arguments; got {len(args)} and {list(kwargs)}")
    depth, feat, ranks_depth, ranks_feat, ranks_bev, shape = args
    # docs/zh/api/context/bev_pool_v3.md: bev_feat_shape (B, D, H, W, C); depth/feat float32 [B,N,D,H,W] /
    # [B,N,H,W,C]; ranks int32 [N_RANKS] within their index spaces; C % 8 == 0, C <= 360; B*D*H*W*C <= 2^31.
    _require(_is_int_list(shape, 5), name, f"bev_feat_shape must be a list of 5 ints (B, D, H, W, C); got {shape!r}")
    b, d, h, w, c = shape
    _require(depth is not None, name, "the bev_pool_v2 mode needs depth (depth=None is the v1 mode)")
    _require(depth.dtype == torch.float32 and feat.dtype == torch.float32, name,
             f"depth and feat must be float32; got {depth.dtype}, {feat.dtype}")
    _require(depth.dim() == 5 and feat.dim() == 5, name, "depth must be [B,N,D,H,W] and feat [B,N,H,W,C]")
    _require(feat.shape[-1] == c, name, f"feat has C={feat.shape[-1]} but bev_feat_shape C={c}")
    _require(c % 8 == 0 and c <= 360, name, f"C must be a multiple of 8 and <= 360; got {c}")
    _require(b * d * h * w * c <= 2 ** 31, name, f"B*D*H*W*C={b * d * h * w * c} exceeds 2^31")
    # mx_driving/ops/bev_pool_v3.py (BEVPoolV3.forward) hands all five tensors to _C.npu_bev_pool_v3 unchanged.
    _contiguous(name, depth=depth, feat=feat, ranks_depth=ranks_depth, ranks_feat=ranks_feat, ranks_bev=ranks_bev)
    p = ranks_bev.numel()
    _require(p > 0, name, "empty ranks")
    for rname, r, bound in (("ranks_depth", ranks_depth, depth.numel()),
                            ("ranks_feat", ranks_feat, feat.numel() // c),
                            ("ranks_bev", ranks_bev, b * d * h * w)):
        _require(r.dtype == torch.int32 and r.dim() == 1 and r.numel() == p, name,
                 f"{rname} must be 1-D int32 of length {p}; got {r.dtype} {tuple(r.shape)}")
        _require(int(r.min()) >= 0 and int(r.max()) < bound, name, f"{rname} out of [0, {bound})")
    CALLS.append((name, dict(C=c, P=p, shape=list(shape))))
    # Golden of the DrivingSDK test (tests/torch/test_bev_pool_v3.py): gather, multiply, index_add_ (accumulating).
    vals = depth.reshape(-1)[ranks_depth.long()].unsqueeze(1) * feat.reshape(-1, c)[ranks_feat.long()]
    out = torch.zeros(b * d * h * w, c, dtype=feat.dtype).index_add(0, ranks_bev.long(), vals)
    return out.view(b, d, h, w, c).permute(0, 4, 1, 2, 3).contiguous()


# ------------------------------------------------------------------------------------------------ voxel pooling


def npu_voxel_pooling_train(*args, **kwargs):
    """npu_voxel_pooling_train(geom_xyz [B,N,3] int32, features [B,N,C], voxel_num [nx, ny, nz]) -> [B,C,ny,nx]."""
    name = "npu_voxel_pooling_train"
    # mx_driving/ops/voxel_pooling_train.py: npu_voxel_pooling_train = AdsVoxelPoolingFunction.apply (positional).
    _require(not kwargs and len(args) == 3, name, f"takes 3 positional arguments; got {len(args)} and {list(kwargs)}")
    geom, feats, voxel_num = args
    _require(_is_int_list(voxel_num, 3), name, f"voxel_num must be a list of 3 ints; got {voxel_num!r}")
    nx, ny, nz = voxel_num
    # docs/zh/api/context/npu_voxel_pooling_train.md: int32 geom, float32/float16 features; the wrapper only
    # reshapes (a view), so the tensors reach _C.voxel_pooling_train as given.
    _require(geom.dtype == torch.int32 and geom.dim() == 3 and geom.shape[-1] == 3 and geom.is_contiguous(), name,
             f"geom_xyz must be contiguous int32 [B, N, 3]; got {geom.dtype} {tuple(geom.shape)}")
    _require(feats.dtype in (torch.float32, torch.float16) and feats.dim() == 3 and feats.is_contiguous(), name,
             f"features must be contiguous float32/float16 [B, N, C]; got {feats.dtype} {tuple(feats.shape)}")
    b, n, c = feats.shape
    _require(tuple(geom.shape[:2]) == (b, n), name, "geom_xyz and features disagree on B or N")
    _require(0 < n, name, "Number of points can not be zero")  # the wrapper raises this
    _require(b <= 128, name, f"B={b} > 128")
    _require(c <= 256, name, f"C={c} > 256")
    _require(nx <= 1000 and ny <= 1000 and nz <= 10, name, f"voxel_num {voxel_num} exceeds (1000, 1000, 10)")
    _require(b * ny * nx * c <= 100_000_000, name, f"B*ny*nx*C={b * ny * nx * c} > 1e8")
    if not _port_policy():
        # Documented only (mx_driving/csrc/VoxelPoolingTrain.cpp checks the ranks alone): the BEVDepth port
        # (model_examples/BEVDepth/bevdepth.patch, base_lss_fpn.py) passes N = 6*112*16*44 = 473,088 points per
        # sample and B*N*C ~ 3e8 in one call.
        _require(n <= 100_000, name, f"N={n} > 100000")
        _require(b * n * c <= 100_000_000, name, f"B*N*C={b * n * c} > 1e8")
    CALLS.append((name, dict(B=b, N=n, C=c, voxel_num=list(voxel_num))))
    g = geom.long()
    x, y, z = g[..., 0], g[..., 1], g[..., 2]
    ok = (x >= 0) & (x < nx) & (y >= 0) & (y < ny) & (z >= 0) & (z < nz)
    bi = torch.arange(b).view(b, 1).expand(b, n)
    out = torch.zeros(b, ny, nx, c, dtype=feats.dtype)
    out = out.index_put((bi[ok], y[ok], x[ok]), feats[ok], accumulate=True)
    return out.permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------ deformable attention


def multi_scale_deformable_attn(*args, **kwargs):
    """multi_scale_deformable_attn(value, spatial_shapes, level_start_index, locations, weights) -> [bs,nq,nH*D]."""
    name = "multi_scale_deformable_attn"
    # mx_driving/ops/multi_scale_deformable_attn.py: = MultiScaleDeformableAttnFunction.apply (positional).
    _require(not kwargs and len(args) == 5, name, f"takes 5 positional arguments; got {len(args)} and {list(kwargs)}")
    value, shapes, starts, loc, attn = args
    # The wrapper raises on empty value / spatial_shapes / attention_weights.
    _require(value.numel() > 0 and attn.numel() > 0 and shapes.numel() > 0, name,
             "Input Tensor can not be a empty Tensor")
    autocast = _autocast_on(value)
    if autocast:
        # @custom_fwd(cast_inputs=torch.float32): under autocast every floating input is cast to float32 first
        # (a copy, so contiguous); outside autocast nothing is cast and fp16 stays fp16.
        value, loc, attn = value.float(), loc.float(), attn.float()
    # docs/zh/api/context/multi_scale_deformable_attn.md: value / locations / weights float32 or float16,
    # spatial_shapes / level_start_index int32 or int64.
    _require(value.dtype in (torch.float32, torch.float16), name, f"value must be float32/float16; got {value.dtype}")
    _require(shapes.dtype in (torch.int32, torch.int64) and starts.dtype in (torch.int32, torch.int64), name,
             "spatial_shapes / level_start_index must be int32 or int64")
    # What reaches _C.multi_scale_deformable_attn as given (no .contiguous() in the wrapper): value itself;
    # shapes/starts when already int32 (.int() copies int64 ones); locations/weights when already value's dtype
    # (.type_as(value) copies the others).
    _contiguous(name, value=value,
                value_spatial_shapes=shapes if shapes.dtype == torch.int32 else None,
                value_level_start_index=starts if starts.dtype == torch.int32 else None,
                sampling_locations=loc if loc.dtype == value.dtype else None,
                attention_weights=attn if attn.dtype == value.dtype else None)
    _require(value.dim() == 4, name, "value must be [bs, num_keys, num_heads, embed_dims]")
    bs, nk, nh, dims = value.shape
    _require(loc.dim() == 6 and loc.shape[-1] == 2, name, "sampling_locations must be [bs,nq,nH,L,P,2]")
    _, nq, nh2, nl, npt, _ = loc.shape
    _require(tuple(attn.shape) == (bs, nq, nh, nl, npt) and loc.shape[0] == bs and nh2 == nh, name,
             f"shapes disagree: value {tuple(value.shape)}, locations {tuple(loc.shape)}, weights {tuple(attn.shape)}")
    _require(tuple(shapes.shape) == (nl, 2) and tuple(starts.shape) == (nl,), name, "spatial_shapes must be [L, 2]")
    # Documented limits: embed_dims a multiple of 8 and <= 256, num_heads <= 8, num_points * num_levels <= 64.
    # mx_driving/csrc/MultiScaleDeformableAttn.cpp checks dims <= 256 and levels * points <= 64 itself; the FB-OCC
    # port (model_examples/FBOCC/fbocc.patch, DA-MSDA) passes 10 dims per head, unpadded.
    _require(dims <= 256, name, f"embed_dims must be <= 256; got {dims}")
    _require(dims % 8 == 0 or _port_policy(), name, f"embed_dims must be a multiple of 8; got {dims}")
    _require(nh <= 8, name, f"num_heads={nh} > 8")
    _require(nl * npt <= 64, name, f"num_points*num_levels={nl * npt} > 64")
    hw = [(int(h), int(w)) for h, w in shapes.tolist()]
    _require(sum(h * w for h, w in hw) == nk, name, "spatial_shapes do not cover num_keys")
    CALLS.append((name, dict(bs=bs, nq=nq, heads=nh, dims=dims, levels=nl, points=npt, dtype=str(value.dtype),
                             autocast=autocast)))
    out_dtype = value.dtype  # the kernel computes and returns value's dtype (loc/attn were cast to it)
    v32, loc32, attn32 = value.float(), loc.to(value.dtype).float(), attn.to(value.dtype).float()
    out = 0
    for lvl, (h, w) in enumerate(hw):
        s = int(starts[lvl])
        v = v32[:, s:s + h * w].permute(0, 2, 3, 1).reshape(bs * nh, dims, h, w)
        g = loc32[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(bs * nh, nq, npt, 2) * 2 - 1
        smp = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        a = attn32[:, :, :, lvl].permute(0, 2, 1, 3).reshape(bs * nh, 1, nq, npt)
        out = out + (smp * a).sum(-1)
    return out.view(bs, nh * dims, nq).transpose(1, 2).contiguous().to(out_dtype)


# -------------------------------------------------------------------------------------------------- grid sample


def grid_sampler3d_v1(*args, **kwargs):
    """grid_sampler3d_v1(input, grid, interpolation, padding, align) -> [N, C, Do, Ho, Wo] (positional only)."""
    name = "grid_sampler3d_v1"
    _require(not kwargs and 2 <= len(args) <= 5, name, f"positional only (Function.apply); got kwargs {list(kwargs)}")
    inp, grid = args[:2]
    # mx_driving/ops/grid_sampler3d_v1.py (26.1): torch_npu.npu.get_device_name(features.device.index) picks the
    # custom kernel on "Ascend910*" (A2/A3), plain F.grid_sample on "Ascend950*", and raises NotImplementedError
    # on every other SoC (Ascend310P, Ascend910 without B/C ... : "only supports Ascend910B, Ascend910C and
    # Ascend950").
    soc = _soc_name(inp.device.index)
    if "Ascend910" not in soc and "Ascend950" not in soc:
        raise NotImplementedError("The grid_sampler3d_v1 currently only supports Ascend910B, Ascend910C and "
                                  f"Ascend950 (this SoC: {soc}).")
    mode, padding, align = (list(args[2:]) + ["bilinear", "zeros", True][len(args) - 2:])
    # docs/zh/api/context/grid_sampler3d_v1.md: float32 5-D input/grid with one batch size, grid[..., 3], no empty
    # tensors, no inf/nan, element counts within int32, bilinear/zeros/align_corners=True only, C <= 128 and C % 4.
    _require(inp.dtype == torch.float32 and grid.dtype == torch.float32, name, "input and grid must be float32")
    _require(inp.dim() == 5 and grid.dim() == 5 and grid.shape[-1] == 3 and grid.shape[0] == inp.shape[0], name,
             f"input must be [N,C,D,H,W] and grid [N,Do,Ho,Wo,3]; got {tuple(inp.shape)}, {tuple(grid.shape)}")
    _require(inp.numel() > 0 and grid.numel() > 0, name, "empty tensor")
    _require((mode, padding, align) == ("bilinear", "zeros", True), name,
             f"only bilinear/zeros/align_corners=True; got {mode}/{padding}/{align}")
    c = inp.shape[1]
    _require(c % 4 == 0, name, f"C must be a multiple of 4; got {c}")
    # Documented only: the FB-OCC port (model_examples/FBOCC/fbocc.patch, fbocc.py fuse_history) passes the
    # 16 x 80 = 1280 history channels in one call.
    _require(c <= 128 or _port_policy(), name, f"C must be <= 128; got {c}")
    _require(max(inp.numel(), grid.numel()) <= 2 ** 31 - 1, name, "element count exceeds int32")
    _require(bool(torch.isfinite(inp).all()) and bool(torch.isfinite(grid).all()), name, "inf/nan not supported")
    # The forward is F.grid_sample, but the backward hands the saved input and grid as given to
    # _C.grid_sampler3d_grad_v1 (a custom kernel).
    _contiguous(name, input=inp, grid=grid)
    CALLS.append((name, dict(C=c, shape=tuple(inp.shape), soc=soc)))
    return F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


# ------------------------------------------------------------------------------------------------- deform conv


def deform_conv2d(*args, **kwargs):
    """deform_conv2d(x, offset, weight, stride, padding, dilation, groups, deformable_groups[, bias, im2col_step])
    -> [N, C_out, H_out, W_out] (a permuted view, as the kernel returns it)."""
    name = "deform_conv2d"
    # mx_driving/ops/deform_conv2d.py: deform_conv2d(x, offset, weight, stride=1, padding=0, dilation=1, groups=1,
    # deformable_groups=1, bias=False, im2col_step=32) -> DeformConv2dFunction.apply (positional, bias ignored).
    _require(not kwargs and 3 <= len(args) <= 10, name, f"positional only (Function.apply); got kwargs {list(kwargs)}")
    x, offset, weight = args[:3]
    rest = list(args[3:]) + [1, 0, 1, 1, 1, False, 32][len(args) - 3:]
    stride, padding, dilation, groups, dg = rest[:5]
    pair = (lambda v: (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1])))
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    # docs/zh/api/context/deform_conv2d.md: x, offset, weight float32; offset (n, 2*k*k, h_out, w_out);
    # deformable_groups only 1; c_in a multiple of 64; groups divides c_in and c_out.
    _require(x.dtype == offset.dtype == weight.dtype == torch.float32, name,
             f"x, offset and weight must be float32; got {x.dtype}, {offset.dtype}, {weight.dtype}")
    # mx_driving/csrc/DeformableConv2d.cpp: 4-D inputs, stride / kernel / dilation > 0, groups > 0 dividing both.
    _require(x.dim() == 4 and offset.dim() == 4 and weight.dim() == 4, name, "x, offset and weight must be 4-D")
    n, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    _require(min(sh, sw, dh, dw, kh, kw) > 0, name, "stride, kernel_size and dilation must be greater than 0")
    _require(dg == 1, name, f"deformable_groups must be 1; got {dg}")
    _require(cin % 64 == 0, name, f"c_in must be a multiple of 64; got {cin}")
    _require(groups > 0 and cin % groups == 0 and cout % groups == 0 and cin_g * groups == cin, name,
             f"groups={groups} must divide c_in={cin} and c_out={cout} (weight {tuple(weight.shape)})")
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    _require(tuple(offset.shape) == (n, 2 * kh * kw, ho, wo), name,
             f"offset must be {(n, 2 * kh * kw, ho, wo)}; got {tuple(offset.shape)}")
    # No contiguity requirement: the wrapper makes NHWC copies (permute(...).contiguous()) of all three inputs.
    CALLS.append((name, dict(N=n, C_in=cin, C_out=cout, groups=groups, kernel=(kh, kw))))
    # Reference: bilinear samples of every tap (zeros outside), then a grouped matmul.
    k = kh * kw
    ky = (torch.arange(kh, dtype=x.dtype) * dh).repeat_interleave(kw)
    kx = (torch.arange(kw, dtype=x.dtype) * dw).repeat(kh)
    off = offset.view(n, k, 2, ho, wo)
    py = ky.view(1, k, 1, 1) + (torch.arange(ho, dtype=x.dtype) * sh - ph).view(1, 1, ho, 1) + off[:, :, 0]
    px = kx.view(1, k, 1, 1) + (torch.arange(wo, dtype=x.dtype) * sw - pw).view(1, 1, 1, wo) + off[:, :, 1]
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], -1).view(n, k * ho, wo, 2)
    cols = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # [n, cin, k*ho, wo]
    cols = cols.view(n, groups, cin_g, k, ho * wo).reshape(n, groups, cin_g * k, ho * wo)
    out = torch.einsum("gok,ngkp->ngop", weight.view(groups, cout // groups, cin_g * k), cols)
    out = out.reshape(n, cout, ho, wo)
    # DeformableConv2d.cpp allocates [n, h_out, c_out, w_out] and returns output.permute({0, 2, 1, 3}).
    return out.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------- fused ops
# The three ops the DrivingSDK FB-OCC port adds for speed (model_examples/FBOCC/tools/patch.py: the stock patcher's
# batch_matmul, resnet_add_relu, resnet_maxpool).


class _AddRelu(torch.autograd.Function):
    """mx_driving/ops/npu_add_relu.py (AddReluFunction): from 2,000,000 elements on the kernel aclnnAddRelu writes
    relu(x + y) into x and returns x (csrc/AddRelu.cpp), below that relu(x + y); backward: ReluGrad of the result,
    the same gradient for x and y."""

    @staticmethod
    def forward(ctx, x, y):
        out = torch.relu(x + y)
        if x.numel() >= 2_000_000:
            x.copy_(out)  # in place, like the kernel
            out = x
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        g = grad * (out > 0).to(grad.dtype)
        return g, g


def npu_add_relu(*args, **kwargs):
    """npu_add_relu(x, y) -> relu(x + y), possibly in x's memory."""
    name = "npu_add_relu"
    _require(not kwargs and len(args) == 2, name, f"takes 2 positional arguments; got {len(args)} and {list(kwargs)}")
    x, y = args
    # docs/zh/api/context/npu_add_relu.md: same shape and dtype, no broadcast, element count within int32;
    # kernels/add_relu/op_host/add_relu.cpp registers DT_FLOAT and DT_FLOAT16.
    _require(x.shape == y.shape, name, f"x and y must have one shape (no broadcast); got {tuple(x.shape)}, "
                                       f"{tuple(y.shape)}")
    _require(x.dtype == y.dtype and x.dtype in (torch.float32, torch.float16), name,
             f"x and y must be float32 or float16 of one dtype; got {x.dtype}, {y.dtype}")
    _require(x.numel() <= 2 ** 31 - 1, name, f"{x.numel()} elements exceed int32")
    CALLS.append((name, dict(shape=tuple(x.shape), dtype=str(x.dtype), in_place=x.numel() >= 2_000_000)))
    return _AddRelu.apply(x, y)


class _MaxPool2d(torch.autograd.Function):
    """mx_driving/ops/npu_max_pool2d.py (MaxPool2d): a forward only; a backward through it raises."""

    @staticmethod
    def forward(ctx, x):
        return F.max_pool2d(x, 3, 2, 1)

    @staticmethod
    def backward(ctx, grad):
        raise ContractError("mx_driving.npu_max_pool2d: the op has no backward (MaxPool2d defines only forward)")


def npu_max_pool2d(*args, **kwargs):
    """npu_max_pool2d(x, kernel_size, stride, padding) -> max pooled x (3 / 2 / 1 only)."""
    name = "npu_max_pool2d"
    _require(not kwargs and len(args) == 4, name, f"takes 4 positional arguments; got {len(args)} and {list(kwargs)}")
    x, kernel_size, stride, padding = args
    # mx_driving/csrc/MaxPool2d.cpp: float32/float16, C <= 1024, kernel 3, stride 2, padding 1, 4-D; from C >= 64
    # with H, W > 1 and <= 1e9 elements (the aclnnMaxPool2d path) C % 8 == 0 in float32, C % 16 == 0 in float16.
    _require(x.dtype in (torch.float32, torch.float16), name, f"x must be float32 or float16; got {x.dtype}")
    _require(x.dim() == 4, name, f"x must be 4-D; got {x.dim()}-D")
    n, c, h, w = x.shape
    _require(c <= 1024, name, f"channel must be <= 1024; got {c}")
    _require((kernel_size, stride, padding) == (3, 2, 1), name,
             f"kernel_size 3, stride 2, padding 1 only; got {kernel_size}, {stride}, {padding}")
    fast = not (c < 64 or h == 1 or w == 1 or x.numel() > 1_000_000_000)
    if fast:
        multiple = 8 if x.dtype == torch.float32 else 16
        _require(c % multiple == 0, name, f"channel must be a multiple of {multiple} for {x.dtype}; got {c}")
    CALLS.append((name, dict(shape=tuple(x.shape), dtype=str(x.dtype), fast_path=fast)))
    out = _MaxPool2d.apply(x)
    # the aclnnMaxPool2d path computes NHWC and returns y_trans.permute(0, 3, 1, 2): a strided view
    return out.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if fast else out


def npu_batch_matmul(*args, **kwargs):
    """npu_batch_matmul(projection_mat [..., n, n], pts_extend [..., n, 1]) -> [..., n, 1]."""
    name = "npu_batch_matmul"
    _require(not kwargs and len(args) == 2, name, f"takes 2 positional arguments; got {len(args)} and {list(kwargs)}")
    mat, pts = args
    # docs/zh/api/context/npu_batch_matmul.md: float32, 4-6 dims, last dims 4x4 or 3x3 and 4x1 or 3x1, mutually
    # broadcastable.
    _require(mat.dtype == torch.float32 and pts.dtype == torch.float32, name,
             f"both inputs must be float32; got {mat.dtype}, {pts.dtype}")
    _require(4 <= mat.dim() <= 6 and pts.dim() == mat.dim(), name,
             f"inputs must have 4-6 dims, the same number; got {mat.dim()} and {pts.dim()}")
    k = mat.shape[-1]
    _require(k in (3, 4) and mat.shape[-2] == k and tuple(pts.shape[-2:]) == (k, 1), name,
             f"last dims must be ({k}, {k}) and ({k}, 1) with {k} in (3, 4); got {tuple(mat.shape[-2:])}, "
             f"{tuple(pts.shape[-2:])}")
    _require(all(a == b or a == 1 or b == 1 for a, b in zip(mat.shape[:-2], pts.shape[:-2])), name,
             f"batch dims do not broadcast: {tuple(mat.shape)}, {tuple(pts.shape)}")
    CALLS.append((name, dict(mat=tuple(mat.shape), pts=tuple(pts.shape))))
    # mx_driving/ops/npu_batch_matmul.py: plain torch ops, autograd as usual: both expanded to the broadcast
    # shape, multiplied elementwise with the transposed points, summed over the last dim (keepdim).
    row = pts.transpose(-1, -2)
    shape = [max(a, b) for a, b in zip(mat.shape, row.shape)]
    return (mat.expand(shape) * row.expand(shape)).sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------------ sparse convolution
# mx_driving/modules/sparse_structure.py, sparse_modules.py, sparse_conv.py; docs/zh/api/context/SubMConv3d.md,
# SparseConv3d.md, SparseInverseConv3d.md. Same public surface; the compute is a dense reference (densify,
# nn.functional.conv3d, read the active sites back).


class SparseConvTensor:
    """SparseConvTensor(features [N, C], indices [N, 4] int32 (batch, spatial...), spatial_shape, batch_size)."""

    def __init__(self, features, indices, spatial_shape, batch_size, grid=None):
        self.features = features
        self.indices = indices
        self.spatial_shape = spatial_shape
        self.batch_size = batch_size
        self.indice_dict: dict = {}
        self.grid = grid

    @property
    def spatial_size(self):
        out = 1
        for s in self.spatial_shape:
            out *= int(s)
        return out

    def find_indice_pair(self, key):
        return None if key is None else self.indice_dict.get(key)

    def dense(self, channels_first: bool = True) -> torch.Tensor:
        shape = [self.batch_size] + [int(s) for s in self.spatial_shape] + [self.features.shape[1]]
        res = self.features.new_zeros(shape)
        idx = self.indices.long()
        res = res.index_put(tuple(idx[:, i] for i in range(idx.shape[1])), self.features)
        if not channels_first:
            return res
        ndim = len(self.spatial_shape)
        return res.permute(0, ndim + 1, *range(1, ndim + 1)).contiguous()

    @property
    def sparity(self):
        return self.indices.shape[0] / self.spatial_size / self.batch_size


class SparseModule(nn.Module):
    """Marker base class: SparseSequential feeds a SparseConvTensor to these, and .features to the others."""


class SparseSequential(SparseModule):
    """nn.Sequential for sparse tensors (sparse_modules.py: ordinary modules get ``.features`` unless empty)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], dict):
            for key, module in args[0].items():
                self.add_module(key, module)
        else:
            for idx, module in enumerate(args):
                self.add_module(str(idx), module)
        for key, module in kwargs.items():
            if key in self._modules:
                raise ValueError("name exists.")
            self.add_module(key, module)

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, idx):
        return list(self._modules.values())[idx]

    def forward(self, input_):
        for module in self._modules.values():
            if isinstance(module, SparseModule):
                if not isinstance(input_, SparseConvTensor):
                    raise RuntimeError("input is not SparseConvTensor")
                input_ = module(input_)
            elif isinstance(input_, SparseConvTensor):
                if input_.indices.shape[0] != 0:
                    input_.features = module(input_.features)
            else:
                input_ = module(input_)
        return input_


def _triple(v):
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)] * 3


class SparseConvolution(SparseModule):
    """The 3-D sparse convolutions (weight laid out [*kernel_size, in, out], as mx_driving's)."""

    def __init__(self, ndim, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, subm=False, output_padding=0, transposed=False, inverse=False, indice_key=None,
                 fused_bn=False, mode="mmcv"):
        super().__init__()
        name = type(self).__name__
        # sparse_conv.py: groups != 1 raises RuntimeError (with the message "do not support group == 1").
        if groups != 1:
            raise RuntimeError("do not support group == 1")
        self.kernel_size, self.stride = _triple(kernel_size), _triple(stride)
        self.padding, self.dilation = _triple(padding), _triple(dilation)
        # SparseConv3d.md / SparseInverseConv3d.md: kernel_size values in [1, 3]; dilation and groups only 1.
        # SubMConv3d.md: kernel_size only 1 or 3, stride only 1.
        _require(all(1 <= k <= 3 for k in self.kernel_size), name, f"kernel_size must be in [1, 3]; got {kernel_size}")
        _require(all(d == 1 for d in self.dilation), name, f"dilation must be 1; got {dilation}")
        if subm:
            _require(all(k in (1, 3) for k in self.kernel_size), name,
                     f"kernel_size must be 1 or 3; got {kernel_size}")
            _require(all(s == 1 for s in self.stride), name, f"stride must be 1; got {stride}")
        self.ndim, self.in_channels, self.out_channels = ndim, in_channels, out_channels
        self.subm, self.inverse, self.indice_key, self.groups = subm, inverse, indice_key, groups
        self.weight = nn.Parameter(torch.empty(*self.kernel_size, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -0.1, 0.1)

    def forward(self, input_):
        name = type(self).__name__
        if not isinstance(input_, SparseConvTensor):
            raise RuntimeError("input_ is not SparseConvTensor")
        feats, idx = input_.features, input_.indices
        _require(idx.dtype == torch.int32 and idx.dim() == 2 and idx.shape[1] == 4, name,
                 f"indices must be int32 [N, 4] (batch, spatial...); got {idx.dtype} {tuple(idx.shape)}")
        _require(feats.dtype in (torch.float32, torch.float16) and feats.dim() == 2 and
                 feats.shape[1] == self.in_channels, name,
                 f"features must be float32/float16 [N, {self.in_channels}]; got {feats.dtype} {tuple(feats.shape)}")
        _require(not self.inverse, name, "the fake has no SparseInverseConv3d compute")
        CALLS.append((name, dict(N=int(idx.shape[0]), C_in=self.in_channels, C_out=self.out_channels,
                                 kernel=list(self.kernel_size), stride=list(self.stride))))
        w = self.weight.to(feats.dtype).permute(4, 3, 0, 1, 2)  # [out, in, kd, kh, kw]
        dense = input_.dense()
        if self.subm:  # output sites = input sites, kernel centred on them
            out = F.conv3d(dense, w, padding=[k // 2 for k in self.kernel_size])
            out_idx, shape = idx, list(input_.spatial_shape)
        else:
            out = F.conv3d(dense, w, stride=self.stride, padding=self.padding)
            occupied = torch.zeros(dense.shape[0], 1, *dense.shape[2:], dtype=feats.dtype)
            occupied[(idx[:, 0].long(), 0, *(idx[:, i].long() for i in range(1, 4)))] = 1
            reach = F.conv3d(occupied, torch.ones(1, 1, *self.kernel_size, dtype=feats.dtype), stride=self.stride,
                             padding=self.padding)
            out_idx = torch.nonzero(reach[:, 0] > 0).int()  # sorted by (batch, spatial...)
            shape = list(out.shape[2:])
        li = out_idx.long()
        out_feats = out.permute(0, 2, 3, 4, 1)[li[:, 0], li[:, 1], li[:, 2], li[:, 3]]
        if self.bias is not None:
            out_feats = out_feats + self.bias.to(out_feats.dtype)
        result = SparseConvTensor(out_feats, out_idx, shape, input_.batch_size)
        result.indice_dict = dict(input_.indice_dict)
        return result


class SparseConv3d(SparseConvolution):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 indice_key=None, mode="mmcv"):
        super().__init__(3, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         indice_key=indice_key, mode=mode)


class SubMConv3d(SparseConvolution):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 indice_key=None, mode="mmcv"):
        super().__init__(3, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, True,
                         indice_key=indice_key, mode=mode)


class SparseInverseConv3d(SparseConvolution):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 indice_key=None, mode="mmcv"):
        super().__init__(3, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         inverse=True, indice_key=indice_key, mode=mode)
