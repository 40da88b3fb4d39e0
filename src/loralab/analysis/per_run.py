"""The analyses every job runs on its own ΔW at the end: spectrum, Table-7 amplification, and the subspace bases
that the cross-run analyses (`python -m loralab.analyze`) compare between runs."""

from __future__ import annotations

import torch

from loralab.analysis.amplification import amplification_table
from loralab.analysis.spectrum import spectrum_table
from loralab.analysis.subspace import as_matrix, delta_bases, left_basis, right_basis

TOP_SINGULAR_VALUES = 16  # kept in the result JSON per matrix (the spectrum figure)
MAX_BASIS = 64  # directions of ΔW kept for φ grids (the LoRA paper's largest rank)


def per_run_analysis(initial: dict, deltas: dict, factors: dict, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-ready tables, bases to save). `initial` holds the pretrained W0 of each adapted matrix."""
    spectrum = spectrum_table(deltas, keep_singular_values=True)
    spectrum["singular_values"] = spectrum["singular_values"].map(lambda s: s[:TOP_SINGULAR_VALUES])
    amplification = amplification_table(initial, deltas, r=rank)
    bases = {}
    for name, dW in deltas.items():
        k = min(max(rank, 1), MAX_BASIS, *as_matrix(dW).shape)
        U, V = delta_bases(dW, k)
        bases[f"{name}|dW_left"], bases[f"{name}|dW_right"] = U, V
        if name in factors:
            A, B = factors[name]
            bases[f"{name}|A_right"], bases[f"{name}|B_left"] = right_basis(A), left_basis(B)
    tables = {"spectrum": spectrum.to_dict("records"), "amplification": amplification.to_dict("records")}
    return tables, {k: v.float().contiguous() for k, v in bases.items()}
