"""Decompositions the analyses need at 7B scale, without a full SVD where the structure allows it.

- :func:`factor_svd`: the exact thin SVD of a low-rank ΔW = L·R from its factors (QR of each, SVD of the k x k
  core), O((m + n)·k²) instead of O(m·n·min(m, n)); LoRA's s·B·A (k = r), LoRA-GA's and PiSSA's s·(B·A − B0·A0)
  written as [s·B, −s·B0]·[A; A0] (k = 2r).
- :func:`top_singular_values`: the top-k singular values of a full matrix (W for LoRA Table 7, a gradient for the
  Eckart–Young optimum) by randomized block Krylov iteration, stopped at a stated relative tolerance on their
  energy Σ σ_i².
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
    max_blocks: int = 16,
    oversample: int = 8,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, float]:
    """(σ_1..σ_k of M, descending; the achieved relative tolerance on Σ_{i≤k} σ_i²).

    Exact (`torch.linalg.svdvals`, tolerance 0) when k + `oversample` ≥ min(shape). Otherwise randomized block
    Krylov iteration (Musco & Musco 2015) on a Gaussian start block of b = k + `oversample` columns: the orthonormal
    basis Q of span{M·Ω, (M·Mᵀ)·M·Ω, ...} grows by one block per pass (two products with M of b columns each, one
    block Gram–Schmidt), and the Ritz values of M on span(Q), the singular values of Qᵀ·M, approach M's top ones
    from below (interlacing). Qᵀ·M is the stack of the passes' own Mᵀ·Q_j, so the Ritz values come from its small
    Gram matrix (float64) at no extra product with M. The loop stops when the top-k energy grows by less than `tol`
    (relative) in one pass, after `max_blocks` passes, or when Q spans the whole column space (then exact); the last
    growth is returned as the achieved tolerance. Hand-written because `torch.svd_lowrank` is plain subspace
    iteration with a fixed count and reports no error. Block Krylov rather than subspace iteration because the
    latter's last growth understates its error where the spectrum is flat past σ_k: on a Gaussian 5632 x 2048
    matrix (k = 8, the same products) subspace iteration's true energy error was 5x its last growth (9.6e-3 vs
    1.8e-3), block Krylov's 0.85x (6.7e-5 vs 7.9e-5); on MiniLM's weights both reach < 1e-6
    (tests/test_streaming_analyses.py). Products with M in M's own precision (at least fp32): they dominate the
    cost, and a stored fp32 matrix's energy is not known beyond fp32 anyway."""
    m, n = M.shape
    k = min(k, m, n)
    dtype = torch.promote_types(M.dtype, torch.float32)
    M = M.to(dtype)
    full = min(m, n)
    if k + oversample >= full:
        return torch.linalg.svdvals(M)[:k], 0.0
    generator = generator or torch.Generator().manual_seed(0)
    omega = torch.randn(n, k + oversample, generator=generator, dtype=dtype).to(M.device)
    block = torch.linalg.qr(M @ omega).Q  # m x b, the newest orthonormal block of the basis
    basis, rows = block, None  # Q (m x K) and Qᵀ·M (K x n) so far
    gram = None  # (Qᵀ·M)·(Qᵀ·M)ᵀ in float64: its eigenvalues are the squared Ritz values
    energy, change = None, float("inf")
    for _ in range(max_blocks):
        z = M.transpose(0, 1) @ block  # n x b: this block's rows of Qᵀ·M, transposed
        new_rows = z.transpose(0, 1).to(torch.float64)
        corner = new_rows @ new_rows.transpose(0, 1)
        if gram is None:
            gram = corner
        else:
            side = rows @ new_rows.transpose(0, 1)  # rows: float64 already
            gram = torch.cat([torch.cat([gram, side], 1), torch.cat([side.transpose(0, 1), corner], 1)], 0)
        rows = new_rows if rows is None else torch.cat([rows, new_rows])
        top = torch.linalg.eigvalsh(gram).flip(0)[:k].clamp_min(0)
        new = float(top.sum())
        complete = basis.shape[1] >= full
        if energy is not None or complete:
            change = 0.0 if complete else ((new - energy) / new if new > 0 else 0.0)
            if change <= tol:
                break
        energy = new
        y = M @ z  # m x b: the next Krylov block
        for _ in range(2):  # block Gram–Schmidt, twice (one pass loses orthogonality in floating point)
            y = y - basis @ (basis.transpose(0, 1) @ y)
        y = y[:, : full - basis.shape[1]]  # never more columns than the column space has
        block = torch.linalg.qr(y).Q
        # once more on the normalized block: where little of y lay outside span(Q) (a fast-decaying spectrum), the
        # rounding that Gram–Schmidt left is O(1) of the normalized columns, and Ritz values on a basis that is not
        # orthonormal can exceed σ (an Eckart–Young tail 2.8e-8 came out 0)
        block = torch.linalg.qr(block - basis @ (basis.transpose(0, 1) @ block)).Q
        basis = torch.cat([basis, block], 1)
    return top.sqrt().to(dtype), max(change, 0.0)


def random_orthonormal(rows: int, k: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """rows x k with orthonormal columns spanning a uniformly (Haar) random k-dimensional subspace: Q of a Gaussian's
    QR. The top-k left (right) singular vectors of a Gaussian m x n matrix span such a subspace, independently of
    its right (left) ones, so LoRA Table 7's random projection has the same distribution either way."""
    return torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=dtype)).Q
