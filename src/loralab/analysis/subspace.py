"""Normalized subspace similarity between adapters (LoRA, Hu et al. 2021, §7.2, Eq. 4).

For two adapters with A-factors A1 (r1 x in), A2 (r2 x in), let U1, U2 be their right-singular unitary matrices
(columns = right singular vectors, i.e. rows of Vh). Eq. 4:

    φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j)  ∈ [0, 1],   1 ≤ i ≤ r1, 1 ≤ j ≤ r2.

Footnote 7 does the same with the B-factors and their left singular vectors. The baseline is two random
Gaussian matrices of the same shapes, for which E φ(i, j) = max(i, j) / dim exactly.
"""

from __future__ import annotations

import numpy as np
import torch


def as_float64(x) -> torch.Tensor:
    """`x` (tensor, array or nested list) as a detached float64 tensor on its own device."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().to(torch.float64)


def as_matrix(x) -> torch.Tensor:
    """`x` as a float64 matrix: a vector becomes one row, a conv kernel (out, in/g, *k) becomes out x (in/g·prod k)."""
    t = as_float64(x)
    if t.ndim == 0:
        raise ValueError("expected a matrix, got a scalar")
    if t.ndim == 1:
        return t.unsqueeze(0)
    return t.reshape(t.shape[0], -1)


def input_eps(x) -> float:
    """Machine epsilon of the dtype `x` was stored in (float64 for non-floating inputs)."""
    dtype = x.dtype if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)).dtype
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else float(torch.finfo(torch.float64).eps)


def phi_grid(U1, U2) -> np.ndarray:
    """All of LoRA Eq. 4 at once: φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j) for 1 ≤ i ≤ r1, 1 ≤ j ≤ r2.

    `U1` (dim x r1) and `U2` (dim x r2) have orthonormal columns in the same ambient space (e.g. from
    :func:`right_basis`); leading batch dimensions (..., dim, r) broadcast. Entry [..., i-1, j-1] is φ(i, j).

    One matmul gives the overlap O = U1ᵀ U2; ‖U1[:, :i]ᵀ U2[:, :j]‖²_F is the sum of O² over the leading i x j
    block, i.e. the 2-D cumulative sum of O², so the whole grid costs O(r1·r2) after the matmul. float64 throughout.
    """
    U1, U2 = as_float64(U1), as_float64(U2)
    if U1.ndim < 2 or U2.ndim < 2:
        raise ValueError(f"bases must be (..., dim, r) matrices, got shapes {tuple(U1.shape)} and {tuple(U2.shape)}")
    if U1.shape[-2] != U2.shape[-2]:
        raise ValueError(f"bases live in different ambient dimensions: {U1.shape[-2]} vs {U2.shape[-2]}")
    U2 = U2.to(U1.device)
    overlap_sq = (U1.transpose(-2, -1) @ U2).square()  # (..., r1, r2)
    cum = overlap_sq.cumsum(-2).cumsum(-1)
    r1, r2 = overlap_sq.shape[-2:]
    i = torch.arange(1, r1 + 1, dtype=torch.float64, device=cum.device)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64, device=cum.device)[None, :]
    return (cum / torch.minimum(i, j)).cpu().numpy()


def right_basis(A, k: int | None = None) -> torch.Tensor:
    """Right singular vectors of an A-factor (r x in) as columns (in x min(r, in)), the first `k` if given.

    This is the paper's choice for Eq. 4 (LoRA §7.2: "U_A = right-singular unitary matrix of A", the rows of Vh
    of A = U S Vh). A conv factor (r, in, *kernel) is first flattened to r x (in·prod kernel). float64.
    """
    _, _, Vh = torch.linalg.svd(as_matrix(A), full_matrices=False)
    return Vh[:k].transpose(0, 1) if k is not None else Vh.transpose(0, 1)


def left_basis(B, k: int | None = None) -> torch.Tensor:
    """Left singular vectors of a B-factor (out x r) as columns (out x min(out, r)), the first `k` if given.

    LoRA footnote 7: Eq. 4 computed from the B-factors with their left-singular unitary matrices. A conv factor
    (out, r, *kernel) is first flattened to out x (r·prod kernel). float64.
    """
    U, _, _ = torch.linalg.svd(as_matrix(B), full_matrices=False)
    return U[:, :k] if k is not None else U


def delta_bases(dW, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right): the top-`k` left (out x k) and right (in x k) singular vectors of an effective update ΔW.

    For variants whose factors do not play the roles of LoRA's B·A (LoRA-GA's offset, LieRA's Hadamard form),
    Eq. 4 is computed on ΔW's own singular subspaces: `right` compares like :func:`right_basis` of A and `left`
    like :func:`left_basis` of B, since for ΔW = B·A with full-rank factors these span the same subspaces.
    Conv kernels are flattened to out x rest. float64.
    """
    U, _, Vh = torch.linalg.svd(as_matrix(dW), full_matrices=False)
    return U[:, :k], Vh[:k].transpose(0, 1)


def random_phi_grid(dim: int, r1: int, r2: int, generator: torch.Generator | None = None) -> np.ndarray:
    """The paper's baseline (LoRA Fig. 4, right): Eq. 4 between two random Gaussian A-like matrices r1 x dim and
    r2 x dim, through :func:`right_basis`. Expectation: :func:`expected_random_phi`."""
    A1 = torch.randn(r1, dim, generator=generator, dtype=torch.float64)
    A2 = torch.randn(r2, dim, generator=generator, dtype=torch.float64)
    return phi_grid(right_basis(A1), right_basis(A2))


def expected_random_phi(dim: int, i, j):
    """max(i, j) / dim: the exact expectation of Eq. 4 for independent, uniformly random subspaces.

    For P (dim x i) and Q (dim x j) with orthonormal columns spanning independent uniformly random subspaces,
    E[QQᵀ] = (j / dim)·I, so E‖Pᵀ Q‖²_F = E trace(PPᵀ QQᵀ) = trace(PPᵀ)·j / dim = i·j / dim; dividing by
    min(i, j) gives max(i, j) / dim. `i`, `j` may be arrays (numpy broadcasting).
    """
    return np.maximum(i, j) / dim


def phi_grids_for_layers(bases1: dict[str, torch.Tensor], bases2: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Eq. 4 grid (:func:`phi_grid`) for every adapted matrix name present in both dicts of bases (dim x r each),
    in the order of `bases1`."""
    return {name: phi_grid(U1, bases2[name]) for name, U1 in bases1.items() if name in bases2}
