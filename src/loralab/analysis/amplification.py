"""How ΔW relates to W (LoRA, Hu et al. 2021, §7.3 and Table 7).

With U (out x r) and V (r x in, Vh form) the top-r left/right singular vectors of some matrix, LoRA §7.3 projects W
onto ΔW's r-dimensional subspace, ‖Uᵀ W Vᵀ‖_F, and compares it with U, V taken from ΔW, from W itself and from a
random matrix, beside ‖W‖_F and ‖ΔW‖_F. The amplification factor is ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F (U, V from ΔW): how much
LoRA amplifies directions already present (but not emphasized) in W. Paper, GPT-3 W_q layer 48: 21.5 at r=4,
~1.9 at r=64 (reference/lora_table7_amplification.csv).
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from loralab.analysis.lowrank import random_orthonormal, top_singular_values
from loralab.analysis.subspace import as_matrix


def _proj(W: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(U.to(W).transpose(0, 1) @ W @ Vh.to(W).transpose(0, 1)))


def _row(W_m, U, Vh, r, proj_W, proj_W_tol, norm_dW, generator) -> dict:
    """Table 7's quantities from W (as a matrix), ΔW's top-r singular vectors and ‖ΔW‖_F."""
    m, n = W_m.shape
    # the random baseline: Haar-random r-dimensional subspaces on both sides (lowrank.random_orthonormal)
    rand_U = random_orthonormal(m, r, generator, torch.float64).to(W_m)
    rand_V = random_orthonormal(n, r, generator, torch.float64).to(W_m)
    proj_dW = _proj(W_m, U[:, :r], Vh[:r])
    norm_W = float(torch.linalg.matrix_norm(W_m))
    if norm_dW == 0.0:
        factor = math.nan
    elif proj_dW <= max(W_m.shape) * torch.finfo(W_m.dtype).eps * norm_W:
        factor = math.inf
    else:
        factor = norm_dW / proj_dW
    return {
        "r": r,
        "proj_dW": proj_dW,
        "proj_W": proj_W,
        "proj_W_tol": proj_W_tol,
        "proj_random": _proj(W_m, rand_U, rand_V.transpose(0, 1)),
        "norm_W": norm_W,
        "norm_dW": norm_dW,
        "factor": factor,
    }


def amplification(W, dW, r: int, generator: torch.Generator | None = None) -> dict:
    """LoRA §7.3 / Table 7 for one matrix: W (pre-trained) against its effective update ΔW, both dense, with exact
    SVDs (small matrices; a run uses :func:`amplification_of_update`, which takes ΔW's factors).

    Returns a dict of floats (float64 arithmetic):

    - ``r``: the rank used, min(r, out, in);
    - ``proj_dW`` = ‖Uᵀ W Vᵀ‖_F with U, V (Vh form) the top-r left/right singular vectors of ΔW;
    - ``proj_W``: the same with U, V from W itself (= sqrt of the sum of W's top-r squared singular values), and
      ``proj_W_tol``, the relative tolerance it was computed to (0 here: exact);
    - ``proj_random``: the same with U, V spanning independent uniformly random r-dimensional subspaces (the top-r
      singular vectors of a Gaussian matrix are distributed so; drawn on CPU with `generator`, None = seeded 0);
    - ``norm_W`` = ‖W‖_F, ``norm_dW`` = ‖ΔW‖_F;
    - ``factor`` = norm_dW / proj_dW, the amplification factor. ``math.inf`` when proj_dW is numerically zero
      (≤ max(shape)·eps·‖W‖_F, eps of W's dtype: ΔW's subspaces orthogonal to W's), ``nan`` when ΔW = 0 (no directions).

    Conv kernels (out, in/g, *k) are flattened to out x (in/g·prod k) first.
    """
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    W_m, dW_m = as_matrix(W), as_matrix(dW)
    if W_m.shape != dW_m.shape:
        raise ValueError(f"W and dW shapes differ: {tuple(W_m.shape)} vs {tuple(dW_m.shape)}")
    dW_m = dW_m.to(W_m.device)
    r = min(r, *W_m.shape)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    U, _, Vh = torch.linalg.svd(dW_m, full_matrices=False)
    proj_W = float(torch.linalg.svdvals(W_m)[:r].square().sum().sqrt())
    return _row(W_m, U, Vh, r, proj_W, 0.0, float(torch.linalg.matrix_norm(dW_m)), generator)


def amplification_of_update(update, r: int, generator: torch.Generator, tol: float = 1e-6) -> dict:
    """:func:`amplification` for one :class:`~loralab.analysis.updates.MatrixUpdate`, at 7B cost: ΔW's top-r
    singular vectors from its (cached) SVD — exact from the factors for low-rank updates —, W = W0 recomputed,
    W's top-r energy by block Krylov iteration to relative tolerance `tol` (``proj_W_tol``: the achieved one, larger
    where 16 blocks do not reach `tol`, e.g. on a random matrix's flat spectrum). The products with W run in
    W's precision (fp32 for an fp32 or bf16 model, float64 for a float64 one)."""
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    W0 = update.initial()
    W_m = W0.reshape(W0.shape[0], -1)  # W0's own precision (at least fp32): no float64 copy of an m x n matrix
    r = min(r, *W_m.shape)
    U, _, Vh = update.svd()
    top, achieved = top_singular_values(W_m, r, tol=tol)
    proj_W = float(top.square().sum().sqrt())
    return _row(W_m, U, Vh, r, proj_W, achieved, update.fro_norm(), generator)


COLUMNS = ["name", "r", "proj_dW", "proj_W", "proj_W_tol", "proj_random", "norm_W", "norm_dW", "factor"]


def amplification_table(weights: dict, deltas: dict, r: int, seed: int = 0) -> pd.DataFrame:
    """:func:`amplification` for every matrix name in both `weights` (W, pre-trained) and `deltas` (ΔW), in the
    order of `deltas`: one row per matrix, columns ``name, r, proj_dW, proj_W, proj_W_tol, proj_random, norm_W,
    norm_dW, factor`` (LoRA Table 7's quantities). The random baselines come from one generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    rows = [
        {"name": name, **amplification(weights[name], dW, r, generator=generator)}
        for name, dW in deltas.items()
        if name in weights
    ]
    return pd.DataFrame(rows, columns=COLUMNS)
