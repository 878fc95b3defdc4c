"""Weighted gather-scatter, the kernel behind the pooling ops (portable backend).

    out.row(dst[k]) += vals[k] * dense[src[k], :]        for k in range(P)

(the output is channels-first [B, C, cells]; row r is out[r // cells, :, r % cells]) is a sparse matrix
(P non-zeros) times a dense matrix. Formulating it that way avoids ever holding the P x C product in memory
(P ~ 10^5..10^6 points, C = 80): on CPU the product is computed by torch's CSR sparse-dense matmul (MKL) when
the points are sorted by ``dst`` (or by ``src``), block by block of output rows, with a custom backward:

    grad_dense = A^T @ grad_out                     (gather + index_add_ per block of output rows)
    grad_vals[k] = <grad_out[dst[k]], dense[src[k]]> (a sampled dense-dense matmul, SDDMM)

Elsewhere (or when nothing is sorted) it runs in bounded chunks of gather + multiply + ``index_add_``.
Both are deterministic on CPU (CSR rows are reduced by one thread each; CPU ``index_add_`` is deterministic).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

#: Elements per chunk of the chunked strategy (bounds its temporaries to ~16 MB of float32).
CHUNK_ELEMENTS = 1 << 22
#: Output elements per CSR row block (bounds the CSR path's temporaries to ~2 MB of float32).
BLOCK_ELEMENTS = 1 << 19

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
    return _csr_raw(crow.to(idt), col.to(idt), vals, shape)


def _csr_raw(crow, col, vals, shape):
    with warnings.catch_warnings():
        # torch warns that CSR support is "beta"; we rely only on its stable core (CSR @ dense, sampled_addmm).
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, vals, shape, check_invariants=False)


def _sddmm(a: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Per non-zero k = (i, j) of CSR ``a``: <left[i], right[j]>."""
    global _sddmm_ok
    if _sddmm_ok is not False:
        try:
            out = torch.sparse.sampled_addmm(a, left, right.t(), beta=0.0, alpha=1.0).values()
            _sddmm_ok = True
            return out
        except (RuntimeError, NotImplementedError):  # older torch without CPU SDDMM
            _sddmm_ok = False
    crow = a.crow_indices().long()
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())
    return _chunked_dot(left, right, rows, a.col_indices().long())


def _chunked_dot(left, right, rows, cols):
    p = rows.numel()
    out = left.new_empty(p)
    step = max(1, CHUNK_ELEMENTS // max(1, left.shape[1]))
    for s in range(0, p, step):
        e = min(p, s + step)
        out[s:e] = (left.index_select(0, rows[s:e]) * right.index_select(0, cols[s:e])).sum(1)
    return out


class WeightedScatter(torch.autograd.Function):
    """out[B, C, cells] (channels first; row r = b * cells + cell) with out.row(dst[k]) += vals[k] * dense[src[k]].

    Differentiable in vals and dense. ``order``: 'dst' when dst is non-decreasing, 'src' when src is
    non-decreasing, None otherwise. dst/src are int64; a point whose dst equals B * cells is dropped (trash row).

    With order 'dst' on CPU the output is produced in blocks of rows (CSR row slices), each transposed straight
    into its channels-first place: no [rows, C] buffer of the whole output, and no P x C temporaries.
    """

    @staticmethod
    def forward(ctx, vals, dense, dst, src, batch: int, cells: int, order: Optional[str]):
        # a pooling kernel computes in its inputs' dtype: the caller's autocast must not lower (or, for the sparse
        # CSR product on the CPU, break: no fp16/bf16 kernel) the products inside
        with torch.autocast(dense.device.type, enabled=False):
            return WeightedScatter._forward(ctx, vals, dense, dst, src, batch, cells, order)

    @staticmethod
    def _forward(ctx, vals, dense, dst, src, batch: int, cells: int, order: Optional[str]):
        n_out, n_src, c = batch * cells, dense.shape[0], dense.shape[1]
        use_csr = order in ("dst", "src") and csr_supported(dense) and vals.dtype == dense.dtype
        ctx.shape, ctx.use_csr, ctx.order = (batch, cells, c), use_csr, order
        if use_csr and order == "dst":
            crow = _crow(dst, n_out + 1).to(_index_dtype(max(vals.numel(), n_src)))
            col = src.to(crow.dtype)
            out = dense.new_empty(batch, c, cells)
            for b, c0, c1, a in _row_blocks(crow, col, vals, batch, cells, c, n_src):
                out[b, :, c0:c1] = (a @ dense).t()
            ctx.crow, ctx.col = crow, col
        else:
            if use_csr:
                a = _csr(_crow(src, n_src), dst, vals, (n_src, n_out + 1))
                rows = a.t() @ dense
                ctx.a = a
            else:
                rows = dense.new_zeros(n_out + 1, c)
                step = max(1, CHUNK_ELEMENTS // max(1, c))
                for s in range(0, dst.numel(), step):
                    e = min(dst.numel(), s + step)
                    rows.index_add_(0, dst[s:e], dense.index_select(0, src[s:e]) * vals[s:e, None])
            out = rows[:n_out].view(batch, cells, c).permute(0, 2, 1).contiguous()
        ctx.save_for_backward(vals, dense, dst, src)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return WeightedScatter._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        vals, dense, dst, src = ctx.saved_tensors
        batch, cells, c = ctx.shape
        n_out = batch * cells
        want_vals, want_dense = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_vals = torch.empty_like(vals) if want_vals else None
        grad_dense = torch.zeros_like(dense) if want_dense else None
        if ctx.use_csr and ctx.order == "dst":
            for b, c0, c1, a in _row_blocks(ctx.crow, ctx.col, vals, batch, cells, c, dense.shape[0]):
                g = grad_out[b, :, c0:c1].t().contiguous()
                k0 = int(ctx.crow[b * cells + c0])
                k1 = k0 + a._nnz()
                if want_vals:
                    grad_vals[k0:k1] = _sddmm(a, g, dense)
                if want_dense:
                    # A^T @ g as gather + index_add_: torch would turn the transposed CSR into a new CSR by
                    # sorting (per block), which is slow, and pathologically so with several threads.
                    gk = g.index_select(0, dst[k0:k1] - (b * cells + c0))
                    grad_dense.index_add_(0, src[k0:k1], gk.mul_(vals[k0:k1, None]))
            return grad_vals, grad_dense, None, None, None, None, None
        # Rows layout [n_out + 1, C] with a zero trash row: one copy of the (channels-first) gradient.
        g = grad_out.new_empty(n_out + 1, c)
        g[:n_out].view(batch, cells, c).copy_(grad_out.permute(0, 2, 1))
        g[n_out].zero_()
        if ctx.use_csr:  # order 'src'
            if want_dense:
                grad_dense = ctx.a @ g
            if want_vals:
                grad_vals = _sddmm(ctx.a, dense, g)
        else:
            step = max(1, CHUNK_ELEMENTS // max(1, c))
            for s in range(0, dst.numel(), step):
                e = min(dst.numel(), s + step)
                gk = g.index_select(0, dst[s:e])
                if want_vals:
                    grad_vals[s:e] = (gk * dense.index_select(0, src[s:e])).sum(1)
                if want_dense:
                    grad_dense.index_add_(0, src[s:e], gk * vals[s:e, None])
        return grad_vals, grad_dense, None, None, None, None, None


def _row_blocks(crow, col, vals, batch, cells, c, n_src):
    """(b, cell0, cell1, CSR block of rows b*cells+cell0 .. b*cells+cell1) in blocks of ~CHUNK_ELEMENTS outputs."""
    step = max(1, min(cells, BLOCK_ELEMENTS // max(1, c)))
    starts = [(b, c0) for b in range(batch) for c0 in range(0, cells, step)]
    rows = torch.tensor([b * cells + c0 for b, c0 in starts] + [batch * cells], dtype=torch.int64)
    bounds = crow[rows].tolist()
    for i, (b, c0) in enumerate(starts):
        c1 = min(cells, c0 + step)
        r0 = b * cells + c0
        k0, k1 = bounds[i], bounds[i + 1]  # the next block starts where this one ends
        sub_crow = crow[r0:r0 + (c1 - c0) + 1] - k0
        yield b, c0, c1, _csr_raw(sub_crow, col[k0:k1], vals[k0:k1], (c1 - c0, n_src))


def weighted_scatter(vals: torch.Tensor, dense: torch.Tensor, dst: torch.Tensor, src: torch.Tensor,
                     batch: int, cells: int, order: Optional[str] = None) -> torch.Tensor:
    """out[batch, C, cells]: out.row(dst[k]) += vals[k] * dense[src[k]], row r = (r // cells, :, r % cells);
    dst == batch * cells drops a point. See the module doc."""
    return WeightedScatter.apply(vals, dense, dst, src, batch, cells, order)
