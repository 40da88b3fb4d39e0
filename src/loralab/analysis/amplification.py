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

from loralab.analysis.subspace import as_matrix


def _top_r(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r], Vh[:r]


def _proj(W: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(U.transpose(0, 1) @ W @ Vh.transpose(0, 1)))


def amplification(W, dW, r: int, generator: torch.Generator | None = None) -> dict:
    """LoRA §7.3 / Table 7 for one matrix: W (pre-trained) against its effective update ΔW.

    Returns a dict of floats (float64 arithmetic):

    - ``r``: the rank used, min(r, out, in);
    - ``proj_dW`` = ‖Uᵀ W Vᵀ‖_F with U, V (Vh form) the top-r left/right singular vectors of ΔW;
    - ``proj_W``: the same with U, V from W itself (= sqrt of the sum of W's top-r squared singular values);
    - ``proj_random``: the same with U, V from a random Gaussian matrix of W's shape (drawn on CPU with
      `generator`; None means a fresh generator seeded 0, so results are reproducible);
    - ``norm_W`` = ‖W‖_F, ``norm_dW`` = ‖ΔW‖_F;
    - ``factor`` = norm_dW / proj_dW, the amplification factor. ``math.inf`` when proj_dW is numerically zero
      (≤ max(shape)·eps64·‖W‖_F: ΔW's subspaces orthogonal to W's), ``nan`` when ΔW = 0 (no directions).

    Conv kernels (out, in/g, *k) are flattened to out x (in/g·prod k) first. U, V come from exact (full) SVDs.
    """
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    W_m, dW_m = as_matrix(W), as_matrix(dW)
    if W_m.shape != dW_m.shape:
        raise ValueError(f"W and dW shapes differ: {tuple(W_m.shape)} vs {tuple(dW_m.shape)}")
    dW_m = dW_m.to(W_m.device)
    r = min(r, *W_m.shape)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    rand = torch.randn(*W_m.shape, generator=generator, dtype=torch.float64).to(W_m.device)

    proj_dW = _proj(W_m, *_top_r(dW_m, r))
    proj_W = _proj(W_m, *_top_r(W_m, r))
    proj_random = _proj(W_m, *_top_r(rand, r))
    norm_W = float(torch.linalg.matrix_norm(W_m))
    norm_dW = float(torch.linalg.matrix_norm(dW_m))

    if norm_dW == 0.0:
        factor = math.nan
    elif proj_dW <= max(W_m.shape) * torch.finfo(torch.float64).eps * norm_W:
        factor = math.inf
    else:
        factor = norm_dW / proj_dW
    return {
        "r": r,
        "proj_dW": proj_dW,
        "proj_W": proj_W,
        "proj_random": proj_random,
        "norm_W": norm_W,
        "norm_dW": norm_dW,
        "factor": factor,
    }


def amplification_table(weights: dict, deltas: dict, r: int, seed: int = 0) -> pd.DataFrame:
    """:func:`amplification` for every matrix name in both `weights` (W, pre-trained) and `deltas` (ΔW), in the
    order of `deltas`: one row per matrix, columns ``name, r, proj_dW, proj_W, proj_random, norm_W, norm_dW,
    factor`` (LoRA Table 7's quantities). The random baselines come from one generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    rows = [
        {"name": name, **amplification(weights[name], dW, r, generator=generator)}
        for name, dW in deltas.items()
        if name in weights
    ]
    columns = ["name", "r", "proj_dW", "proj_W", "proj_random", "norm_W", "norm_dW", "factor"]
    return pd.DataFrame(rows, columns=columns)
