"""Tolerances derived from what is compared, for ``torch.testing.assert_close`` (shared by the whole suite).

Two evaluations of the same floating-point sum in a different order (another backend, another chunking, a
reference in float64) differ by rounding only. For a sum of ``n`` terms in a type with unit roundoff
``u = eps / 2``, the probabilistic error bound of Higham & Mary (SIAM J. Sci. Comput. 41(5), 2019, Thm. 2.4)
for recursive summation is

    |computed - exact| <= lam * sqrt(n) * u * sum_i |x_i|

with probability at least ``1 - 2 exp(-lam^2 / 2)`` (rounding errors modelled as independent, mean zero);
blocked or pairwise summation only lowers it. Two such evaluations differ by at most twice that, so with
``sum_i |x_i| <= n * magnitude`` (``magnitude``: a bound on the mean absolute term) the tolerance is

    atol = 2 * lam * sqrt(n) * u * n * magnitude,    lam = 5  (failure probability < 1e-5 per element)

plus ``rtol = eps(result dtype)`` for the final rounding of each result into its own dtype (a float16 output
of a float32 sum, say). A bug (a point in the wrong cell, a chunk dropped, a wrong weight) moves a result by
at least one whole term, which this bound stays far below whenever ``lam * sqrt(n) * u * n`` is much smaller
than 1 (n up to ~10^4 in float32), so these tolerances do not hide real errors. float64 comparisons get the
same formula and stay tight (u = 1.1e-16).

Use: ``torch.testing.assert_close(a, b, **sum_tolerance(torch.float32, n_terms=5000, magnitude=1.0))``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

#: Width of the probabilistic bound (standard deviations); 5 -> failure probability 2 exp(-12.5) < 1e-5.
LAMBDA = 5.0


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (the gap between 1 and the next number)."""
    return float(torch.finfo(dtype).eps)


def sum_atol(dtype: torch.dtype, n_terms: int, magnitude: float) -> float:
    """Absolute difference allowed between two evaluations of a sum of ``n_terms`` terms, each of mean
    absolute size at most ``magnitude``, accumulated in ``dtype`` (the bound in the module doc)."""
    n = max(1, int(n_terms))
    u = eps(dtype) / 2
    return 2 * LAMBDA * math.sqrt(n) * u * n * float(magnitude)


def sum_tolerance(dtype: torch.dtype, n_terms: int, magnitude: float,
                  result_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """``rtol``/``atol`` for ``assert_close`` of two evaluations of sums of ``n_terms`` terms of mean absolute
    size ``magnitude`` accumulated in ``dtype`` and stored in ``result_dtype`` (default: ``dtype``)."""
    out_dtype = result_dtype or dtype
    return dict(rtol=eps(out_dtype), atol=sum_atol(dtype, n_terms, magnitude) + eps(out_dtype) * float(magnitude))
