"""A fake ``mx_driving`` (Ascend DrivingSDK) for tests on machines without an NPU.

It exposes the four kernels bevkit.ops calls, with their exact positional signatures. Each call is recorded
in ``CALLS`` (name, dict of argument facts) and checked against the documented contract (DrivingSDK
docs/zh/api/context/*.md): dtypes, ranks, shapes, positional order and the documented size limits. A breach
raises ``ContractError``. Results come from simple, obviously-correct PyTorch (independent of bevkit.ops), so
autograd gives the gradients. Install it with ``monkeypatch.setitem(sys.modules, 'mx_driving', module)``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

__version__ = "0.0.fake"

CALLS: List[Tuple[str, Dict[str, Any]]] = []


class ContractError(AssertionError):
    """A call broke mx_driving's documented argument contract."""


def reset() -> None:
    CALLS.clear()


def calls(name: str) -> List[Dict[str, Any]]:
    return [facts for n, facts in CALLS if n == name]


def _require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ContractError(f"mx_driving.{name}: {message}")


def _is_int_list(v, n: int) -> bool:
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in v) if isinstance(v, (list, tuple)) else False
    return ints and len(v) == n


def bev_pool_v3(*args, **kwargs):
    """bev_pool_v3(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_feat_shape) -> [B, C, D, H, W]."""
    name = "bev_pool_v3"
    _require(not kwargs and len(args) == 6, name, f"takes 6 positional arguments; got {len(args)} and {list(kwargs)}")
    depth, feat, ranks_depth, ranks_feat, ranks_bev, shape = args
    _require(_is_int_list(shape, 5), name, f"bev_feat_shape must be a list of 5 ints (B, D, H, W, C); got {shape!r}")
    b, d, h, w, c = shape
    _require(depth is not None, name, "the bev_pool_v2 mode needs depth (depth=None is the v1 mode)")
    _require(depth.dtype == torch.float32 and feat.dtype == torch.float32, name,
             f"depth and feat must be float32; got {depth.dtype}, {feat.dtype}")
    _require(depth.dim() == 5 and feat.dim() == 5, name, "depth must be [B,N,D,H,W] and feat [B,N,H,W,C]")
    _require(feat.shape[-1] == c, name, f"feat has C={feat.shape[-1]} but bev_feat_shape C={c}")
    _require(c % 8 == 0 and c <= 360, name, f"C must be a multiple of 8 and <= 360; got {c}")
    _require(b * d * h * w * c <= 2 ** 31, name, f"B*D*H*W*C={b * d * h * w * c} exceeds 2^31")
    p = ranks_bev.numel()
    _require(p > 0, name, "empty ranks")
    for rname, r, bound in (("ranks_depth", ranks_depth, depth.numel()),
                            ("ranks_feat", ranks_feat, feat.numel() // c),
                            ("ranks_bev", ranks_bev, b * d * h * w)):
        _require(r.dtype == torch.int32 and r.dim() == 1 and r.numel() == p, name,
                 f"{rname} must be 1-D int32 of length {p}; got {r.dtype} {tuple(r.shape)}")
        _require(int(r.min()) >= 0 and int(r.max()) < bound, name, f"{rname} out of [0, {bound})")
    CALLS.append((name, dict(C=c, P=p, shape=list(shape))))
    # Golden of the DrivingSDK test: gather, multiply, index_add_ (accumulating).
    vals = depth.reshape(-1)[ranks_depth.long()].unsqueeze(1) * feat.reshape(-1, c)[ranks_feat.long()]
    out = torch.zeros(b * d * h * w, c, dtype=feat.dtype).index_add(0, ranks_bev.long(), vals)
    return out.view(b, d, h, w, c).permute(0, 4, 1, 2, 3).contiguous()


def npu_voxel_pooling_train(*args, **kwargs):
    """npu_voxel_pooling_train(geom_xyz [B,N,3] int32, features [B,N,C], voxel_num [nx, ny, nz]) -> [B,C,ny,nx]."""
    name = "npu_voxel_pooling_train"
    _require(not kwargs and len(args) == 3, name, f"takes 3 positional arguments; got {len(args)} and {list(kwargs)}")
    geom, feats, voxel_num = args
    _require(_is_int_list(voxel_num, 3), name, f"voxel_num must be a list of 3 ints; got {voxel_num!r}")
    nx, ny, nz = voxel_num
    _require(geom.dtype == torch.int32 and geom.dim() == 3 and geom.shape[-1] == 3 and geom.is_contiguous(), name,
             f"geom_xyz must be contiguous int32 [B, N, 3]; got {geom.dtype} {tuple(geom.shape)}")
    _require(feats.dtype in (torch.float32, torch.float16) and feats.dim() == 3 and feats.is_contiguous(), name,
             f"features must be contiguous float32/float16 [B, N, C]; got {feats.dtype} {tuple(feats.shape)}")
    b, n, c = feats.shape
    _require(tuple(geom.shape[:2]) == (b, n), name, "geom_xyz and features disagree on B or N")
    _require(0 < n, name, "Number of points can not be zero")
    _require(b <= 128, name, f"B={b} > 128")
    _require(n <= 100_000, name, f"N={n} > 100000")
    _require(c <= 256, name, f"C={c} > 256")
    _require(nx <= 1000 and ny <= 1000 and nz <= 10, name, f"voxel_num {voxel_num} exceeds (1000, 1000, 10)")
    _require(b * ny * nx * c <= 100_000_000, name, f"B*ny*nx*C={b * ny * nx * c} > 1e8")
    _require(b * n * c <= 100_000_000, name, f"B*N*C={b * n * c} > 1e8")
    CALLS.append((name, dict(B=b, N=n, C=c, voxel_num=list(voxel_num))))
    g = geom.long()
    x, y, z = g[..., 0], g[..., 1], g[..., 2]
    ok = (x >= 0) & (x < nx) & (y >= 0) & (y < ny) & (z >= 0) & (z < nz)
    bi = torch.arange(b).view(b, 1).expand(b, n)
    out = torch.zeros(b, ny, nx, c, dtype=feats.dtype)
    out = out.index_put((bi[ok], y[ok], x[ok]), feats[ok], accumulate=True)
    return out.permute(0, 3, 1, 2)


def multi_scale_deformable_attn(*args, **kwargs):
    """multi_scale_deformable_attn(value, spatial_shapes, level_start_index, locations, weights) -> [bs,nq,nH*D]."""
    name = "multi_scale_deformable_attn"
    _require(not kwargs and len(args) == 5, name, f"takes 5 positional arguments; got {len(args)} and {list(kwargs)}")
    value, shapes, starts, loc, attn = args
    _require(value.dtype in (torch.float32, torch.float16), name, f"value must be float32/float16; got {value.dtype}")
    _require(value.dim() == 4, name, "value must be [bs, num_keys, num_heads, embed_dims]")
    _require(shapes.dtype in (torch.int32, torch.int64) and starts.dtype in (torch.int32, torch.int64), name,
             "spatial_shapes / level_start_index must be int32 or int64")
    bs, nk, nh, dims = value.shape
    _require(value.numel() > 0 and attn.numel() > 0 and shapes.numel() > 0, name, "empty tensor")
    _require(loc.dim() == 6 and loc.shape[-1] == 2, name, "sampling_locations must be [bs,nq,nH,L,P,2]")
    _, nq, nh2, nl, npt, _ = loc.shape
    _require(tuple(attn.shape) == (bs, nq, nh, nl, npt) and loc.shape[0] == bs and nh2 == nh, name,
             f"shapes disagree: value {tuple(value.shape)}, locations {tuple(loc.shape)}, weights {tuple(attn.shape)}")
    _require(tuple(shapes.shape) == (nl, 2) and tuple(starts.shape) == (nl,), name, "spatial_shapes must be [L, 2]")
    _require(dims % 8 == 0 and dims <= 256, name, f"embed_dims must be a multiple of 8 and <= 256; got {dims}")
    _require(nh <= 8, name, f"num_heads={nh} > 8")
    _require(nl * npt <= 64, name, f"num_points*num_levels={nl * npt} > 64")
    hw = [(int(h), int(w)) for h, w in shapes.tolist()]
    _require(sum(h * w for h, w in hw) == nk, name, "spatial_shapes do not cover num_keys")
    CALLS.append((name, dict(bs=bs, nq=nq, heads=nh, dims=dims, levels=nl, points=npt)))
    value, loc, attn = value.float(), loc.float(), attn.float()
    out = 0
    for lvl, (h, w) in enumerate(hw):
        s = int(starts[lvl])
        v = value[:, s:s + h * w].permute(0, 2, 3, 1).reshape(bs * nh, dims, h, w)
        g = loc[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(bs * nh, nq, npt, 2) * 2 - 1
        smp = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        a = attn[:, :, :, lvl].permute(0, 2, 1, 3).reshape(bs * nh, 1, nq, npt)
        out = out + (smp * a).sum(-1)
    return out.view(bs, nh * dims, nq).transpose(1, 2).contiguous()


def grid_sampler3d_v1(*args, **kwargs):
    """grid_sampler3d_v1(input, grid, interpolation, padding, align) -> [N, C, Do, Ho, Wo] (positional only)."""
    name = "grid_sampler3d_v1"
    _require(not kwargs and 2 <= len(args) <= 5, name, f"positional only (Function.apply); got kwargs {list(kwargs)}")
    inp, grid = args[:2]
    mode, padding, align = (list(args[2:]) + ["bilinear", "zeros", True][len(args) - 2:])
    _require(inp.dtype == torch.float32 and grid.dtype == torch.float32, name, "input and grid must be float32")
    _require(inp.dim() == 5 and grid.dim() == 5 and grid.shape[-1] == 3 and grid.shape[0] == inp.shape[0], name,
             f"input must be [N,C,D,H,W] and grid [N,Do,Ho,Wo,3]; got {tuple(inp.shape)}, {tuple(grid.shape)}")
    _require(inp.numel() > 0 and grid.numel() > 0, name, "empty tensor")
    _require((mode, padding, align) == ("bilinear", "zeros", True), name,
             f"only bilinear/zeros/align_corners=True; got {mode}/{padding}/{align}")
    c = inp.shape[1]
    _require(c <= 128 and c % 4 == 0, name, f"C must be <= 128 and a multiple of 4; got {c}")
    _require(max(inp.numel(), grid.numel()) <= 2 ** 31 - 1, name, "element count exceeds int32")
    _require(bool(torch.isfinite(inp).all()) and bool(torch.isfinite(grid).all()), name, "inf/nan not supported")
    CALLS.append((name, dict(C=c, shape=tuple(inp.shape))))
    return F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
