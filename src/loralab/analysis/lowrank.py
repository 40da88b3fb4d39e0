"""Decompositions the analyses need at 7B scale, without a full SVD where the structure allows it.

- :func:`factor_svd`: the exact thin SVD of a low-rank ΔW = L·R from its factors (QR of each, SVD of the k x k
  core), O((m + n)·k²) instead of O(m·n·min(m, n)); LoRA's s·B·A (k = r), LoRA-GA's and PiSSA's s·(B·A − B0·A0)
  written as [s·B, −s·B0]·[A; A0] (k = 2r).
- :func:`top_singular_values`: the top-k singular values of a full matrix (W for LoRA Table 7, a gradient for the
  Eckart–Young optimum) by subspace iteration, stopped at a stated relative tolerance on their energy Σ σ_i².
- :func:`random_orthonormal`: a Haar-random orthonormal basis (QR of a Gaussian m x k), distributed as the top-k
  singular vectors of a Gaussian matrix, for LoRA Table 7's random baseline without an SVD of an m x n matrix.
"""

from __future__ import annotations

import torch


def working_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 on CPU (the analyses' reference precision), float32 on an accelerator (its fast path); float64 input
    stays float64 everywhere."""
    return torch.float64 if t.device.type == "cpu" or t.dtype == torch.float64 else torch.float32


def factor_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh), the thin SVD of M = left @ right (left m x k, right k x n) with min(m, n, k) triplets, exact
    (no truncation): left = Q1·R1 and rightᵀ = Q2·R2 (reduced QR), core C = R1·R2ᵀ = Uc·S·Vchᵀ, so
    M = (Q1·Uc)·S·(Q2·Vc)ᵀ with orthonormal Q1·Uc and Q2·Vc. Computed in :func:`working_dtype`."""
    dtype = working_dtype(left)
    q1, r1 = torch.linalg.qr(left.to(dtype))
    q2, r2 = torch.linalg.qr(right.to(device=left.device, dtype=dtype).transpose(0, 1))
    uc, s, vch = torch.linalg.svd(r1 @ r2.transpose(0, 1), full_matrices=False)
    return q1 @ uc, s, vch @ q2.transpose(0, 1)


def top_singular_values(
    M: torch.Tensor,
    k: int,
    tol: float = 1e-6,
    max_iter: int = 16,
    oversample: int = 30,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, float]:
    """(σ_1..σ_k of M, descending; the achieved relative tolerance on Σ_{i≤k} σ_i²).

    Exact (`torch.linalg.svdvals`, tolerance 0) when k + `oversample` ≥ min(shape). Otherwise subspace iteration
    on a Gaussian start of k + `oversample` columns (Halko, Martinsson & Tropp 2011, Alg. 4.4): Q ← orth(M·orth(Mᵀ·Q)),
    the Ritz values of Qᵀ·M approach M's top singular values from below (interlacing), and the loop stops when the
    top-k energy grows by less than `tol` (relative) in one iteration, or after `max_iter`; the last growth is
    returned as the achieved tolerance. Hand-written because `torch.svd_lowrank` takes a fixed iteration count and
    reports no error. In M's own precision (at least fp32): the products with M dominate the cost, and a stored
    fp32 matrix's energy is not known beyond fp32 anyway. 30 extra columns because pretrained weights decay slowly
    past σ_k: on MiniLM's value matrices (k = 8) 10 reach only 2e-4 in 16 iterations, with a true energy error 3x
    the last growth; 30 reach < 1e-6 on all 12 of the default job's matrices (tests/test_streaming_analyses.py)."""
    m, n = M.shape
    k = min(k, m, n)
    dtype = torch.promote_types(M.dtype, torch.float32)
    M = M.to(dtype)
    if k + oversample >= min(m, n):
        return torch.linalg.svdvals(M)[:k], 0.0
    generator = generator or torch.Generator().manual_seed(0)
    omega = torch.randn(n, k + oversample, generator=generator, dtype=dtype).to(M.device)
    q = torch.linalg.qr(M @ omega).Q
    energy, change = None, float("inf")
    for _ in range(max_iter):
        b = q.transpose(0, 1) @ M  # (k + p) x n: Ritz values of M on span(q)
        s = torch.linalg.svdvals(b)[:k]
        new = float(s.square().sum())
        if energy is not None:
            change = (new - energy) / new if new > 0 else 0.0
            if change <= tol:
                break
        energy = new
        q = torch.linalg.qr(M @ torch.linalg.qr(b.transpose(0, 1)).Q).Q
    return s, max(change, 0.0)


def random_orthonormal(rows: int, k: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """rows x k with orthonormal columns spanning a uniformly (Haar) random k-dimensional subspace: Q of a Gaussian's
    QR. The top-k left (right) singular vectors of a Gaussian m x n matrix span such a subspace, independently of
    its right (left) ones, so LoRA Table 7's random projection has the same distribution either way."""
    return torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=dtype)).Q
