"""Weighted gather-scatter, the kernel behind the pooling ops (portable backend).

    out[dst[k], :] += vals[k] * dense[src[k], :]        for k in range(P)

is a sparse matrix (P non-zeros) times a dense matrix. Formulating it that way avoids ever holding the
P x C product in memory (P ~ 10^5..10^6 points, C = 80): on CPU the product is computed by torch's CSR
sparse-dense matmul (MKL) when the points are sorted by ``dst`` (or by ``src``), with a custom backward:

    grad_dense = A^T @ grad_out                     (a sparse-dense matmul again)
    grad_vals[k] = <grad_out[dst[k]], dense[src[k]]> (a sampled dense-dense matmul, SDDMM)

Elsewhere (or when nothing is sorted) it runs in bounded chunks of gather + multiply + ``index_add_``.
Both are deterministic on CPU (CSR rows are reduced by one thread each; CPU ``index_add_`` is sequential).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

#: Elements per chunk of the chunked strategy (bounds its temporaries to ~16 MB of float32).
CHUNK_ELEMENTS = 1 << 22

_sddmm_ok: Optional[bool] = None



def csr_supported(t: torch.Tensor) -> bool:
    """Use the CSR strategy for tensors on the real CPU (torch's sparse CSR kernels are CPU/CUDA-only)."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _index_dtype(n: int) -> torch.dtype:
    # MKL's sparse BLAS takes 32-bit indices; int64 indices go down a much slower path.
    return torch.int32 if n < 2 ** 31 - 1 else torch.int64


def _crow(keys: torch.Tensor, nrows: int) -> torch.Tensor:
    """CSR row pointers for non-decreasing ``keys`` in [0, nrows)."""
    counts = torch.bincount(keys, minlength=nrows)
    crow = torch.zeros(nrows + 1, dtype=torch.int64, device=keys.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow


def _csr(crow, col, vals, shape):
    idt = _index_dtype(max(vals.numel(), shape[1]))
    with warnings.catch_warnings():
        # torch warns that CSR support is "beta"; we rely only on its stable core (CSR @ dense, sampled_addmm).
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.to(idt), col.to(idt), vals, shape, check_invariants=False)


def _sddmm(a: torch.Tensor, left: torch.Tensor, right: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
    """Per non-zero k of CSR ``a``: <left[rows[k]], right[cols[k]]>."""
    global _sddmm_ok
    if _sddmm_ok is not False:
        try:
            out = torch.sparse.sampled_addmm(a, left, right.t(), beta=0.0, alpha=1.0).values()
            _sddmm_ok = True
            return out
        except (RuntimeError, NotImplementedError):  # older torch without CPU SDDMM
            _sddmm_ok = False
    return _chunked_dot(left, right, rows, cols)


def _chunked_dot(left, right, rows, cols):
    p = rows.numel()
    out = left.new_empty(p)
    step = max(1, CHUNK_ELEMENTS // max(1, left.shape[1]))
    for s in range(0, p, step):
        e = min(p, s + step)
        out[s:e] = (left.index_select(0, rows[s:e]) * right.index_select(0, cols[s:e])).sum(1)
    return out


class WeightedScatter(torch.autograd.Function):
    """out[n_out, C] with out[dst[k]] += vals[k] * dense[src[k]]; differentiable in vals and dense.

    ``order``: 'dst' when dst is non-decreasing, 'src' when src is non-decreasing, None otherwise.
    dst/src are int64. Points whose dst equals n_out are dropped (a trash row, cut off before returning).
    """

    @staticmethod
    def forward(ctx, vals, dense, dst, src, n_out: int, order: Optional[str]):
        n_src = dense.shape[0]
        use_csr = order in ("dst", "src") and csr_supported(dense) and vals.dtype == dense.dtype
        ctx.n_out, ctx.n_src, ctx.use_csr, ctx.order = n_out, n_src, use_csr, order
        if use_csr:
            if order == "dst":
                a = _csr(_crow(dst, n_out + 1), src, vals, (n_out + 1, n_src))
                out = a @ dense
            else:
                a = _csr(_crow(src, n_src), dst, vals, (n_src, n_out + 1))
                out = a.t() @ dense
            ctx.a = a
        else:
            out = dense.new_zeros(n_out + 1, dense.shape[1])
            step = max(1, CHUNK_ELEMENTS // max(1, dense.shape[1]))
            for s in range(0, dst.numel(), step):
                e = min(dst.numel(), s + step)
                out.index_add_(0, dst[s:e], dense.index_select(0, src[s:e]) * vals[s:e, None])
        ctx.save_for_backward(vals, dense, dst, src)
        return out[:n_out]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        vals, dense, dst, src = ctx.saved_tensors
        # One copy into [n_out + 1, C] (the trash row gets zero gradient); grad_out often arrives transposed.
        g = grad_out.new_empty(ctx.n_out + 1, grad_out.shape[1])
        g[:ctx.n_out].copy_(grad_out)
        g[ctx.n_out].zero_()
        grad_vals = grad_dense = None
        if ctx.use_csr:
            a = ctx.a
            if ctx.order == "dst":
                if ctx.needs_input_grad[1]:
                    grad_dense = a.t() @ g
                if ctx.needs_input_grad[0]:
                    grad_vals = _sddmm(a, g, dense, dst, src)
            else:
                if ctx.needs_input_grad[1]:
                    grad_dense = a @ g
                if ctx.needs_input_grad[0]:
                    grad_vals = _sddmm(a, dense, g, src, dst)
        else:
            if ctx.needs_input_grad[1]:
                grad_dense = torch.zeros_like(dense)
            if ctx.needs_input_grad[0]:
                grad_vals = torch.empty_like(vals)
            step = max(1, CHUNK_ELEMENTS // max(1, dense.shape[1]))
            for s in range(0, dst.numel(), step):
                e = min(dst.numel(), s + step)
                gk = g.index_select(0, dst[s:e])
                if grad_vals is not None:
                    grad_vals[s:e] = (gk * dense.index_select(0, src[s:e])).sum(1)
                if grad_dense is not None:
                    grad_dense.index_add_(0, src[s:e], gk * vals[s:e, None])
        return grad_vals, grad_dense, None, None, None, None


def weighted_scatter(vals: torch.Tensor, dense: torch.Tensor, dst: torch.Tensor, src: torch.Tensor,
                     n_out: int, order: Optional[str] = None) -> torch.Tensor:
    """out[n_out, C]: out[dst[k]] += vals[k] * dense[src[k]] (dst == n_out drops a point). See module doc."""
    return WeightedScatter.apply(vals, dense, dst, src, n_out, order)
