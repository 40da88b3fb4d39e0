"""Singular-value spectrum of an effective update ΔW: how many directions it really uses.

LoRA §7 asks for the "intrinsic rank" of ΔW (its Fig. 3-4 show ΔW_q using more directions than ΔW_v); these are
the standard scalar summaries of the spectrum σ_1 ≥ σ_2 ≥ ... of ΔW.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd
import torch

from loralab.analysis.subspace import as_matrix, input_eps


def rank_for_energy(sigma, energy: float = 0.9) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ energy · Σ_i σ_i² (σ sorted descending first): the rank that keeps `energy`
    of ‖ΔW‖²_F, the Eckart–Young optimum's rank for relative error 1 − energy. 0 for an all-zero spectrum."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    s2 = np.sort(np.abs(np.asarray(sigma, dtype=np.float64)).ravel())[::-1] ** 2
    if s2.size == 0 or s2[0] == 0.0:
        return 0
    cum = np.cumsum(s2)
    return int(min(np.searchsorted(cum, energy * cum[-1], side="left") + 1, s2.size))


def _summary(sigma: np.ndarray, shape: tuple[int, int], eps: float, energy: float) -> dict:
    sigma_max = float(sigma[0]) if sigma.size else 0.0
    fro2 = float(np.sum(sigma**2))
    tol = max(shape) * eps * sigma_max
    return {
        "singular_values": [float(s) for s in sigma],
        "fro_norm": fro2**0.5,
        "sigma_max": sigma_max,
        "stable_rank": fro2 / sigma_max**2 if sigma_max > 0 else 0.0,
        "rank_energy": rank_for_energy(sigma, energy),
        "numerical_rank": int(np.sum(sigma > tol)) if sigma_max > 0 else 0,
    }


def spectrum(dW, energy: float = 0.9, eps: float | None = None) -> dict:
    """Spectrum summary of ΔW (conv kernels flattened to out x rest; SVD in float64):

    - ``singular_values``: σ_1 ≥ σ_2 ≥ ... as a list of Python floats;
    - ``fro_norm`` = ‖ΔW‖_F, ``sigma_max`` = σ_1;
    - ``stable_rank`` = ‖ΔW‖²_F / σ_max² (0 for ΔW = 0);
    - ``rank_energy`` = :func:`rank_for_energy` (σ, `energy`), default the 90 % energy rank;
    - ``numerical_rank`` = #{σ_i > max(shape)·eps·σ_max}, the numpy/LAPACK convention, with eps the machine epsilon
      of the dtype ΔW was stored in (so a float32 ΔW's rounding noise does not count) unless `eps` is given.
    """
    M = as_matrix(dW)
    sigma = torch.linalg.svdvals(M).cpu().numpy()
    return _summary(sigma, tuple(M.shape), input_eps(dW) if eps is None else eps, energy)


def spectrum_of_update(update, energy: float = 0.9) -> dict:
    """:func:`spectrum` of a :class:`~loralab.analysis.updates.MatrixUpdate` from its (cached) SVD: exact from the
    factors for a low-rank ΔW (the values beyond its rank are exact zeros), else one full SVD; the numerical-rank
    epsilon is that of the dtype ΔW is stored in, as :func:`spectrum` uses."""
    sigma = update.singular_values().cpu().numpy().astype(np.float64)
    return _summary(sigma, update.matrix_shape, update.eps, energy)


def spectrum_table(
    deltas: dict, energy: float = 0.9, keep_singular_values: bool = False, chunk: int = 16
) -> pd.DataFrame:
    """:func:`spectrum` for every matrix in `deltas`, one row per name (in dict order) with columns ``name, shape,
    fro_norm, sigma_max, stable_rank, rank_energy, numerical_rank`` (+ ``singular_values`` if asked).

    Matrices of the same shape, dtype and device are stacked and decomposed by one batched `svdvals`, `chunk` at a
    time (bounding the float64 copy held at once)."""
    mats = {
        name: dW if isinstance(dW, torch.Tensor) else torch.as_tensor(np.asarray(dW)) for name, dW in deltas.items()
    }
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, t in mats.items():
        groups[(tuple(t.shape), t.dtype, t.device)].append(name)
    rows = {}
    for (shape, _, _), names in groups.items():
        eps = input_eps(mats[names[0]])
        for start in range(0, len(names), chunk):
            part = names[start : start + chunk]
            stack = torch.stack([as_matrix(mats[n]) for n in part])
            sigmas = torch.linalg.svdvals(stack).cpu().numpy()
            matrix_shape = tuple(stack.shape[1:])
            for n, sigma in zip(part, sigmas):
                rows[n] = {"name": n, "shape": shape, **_summary(sigma, matrix_shape, eps, energy)}
    columns = ["name", "shape", "fro_norm", "sigma_max", "stable_rank", "rank_energy", "numerical_rank"]
    if keep_singular_values:
        columns.append("singular_values")
    return pd.DataFrame([rows[n] for n in deltas], columns=columns)
