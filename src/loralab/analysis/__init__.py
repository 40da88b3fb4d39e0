"""Analyses of effective updates ΔW = W_final − W0 (DESIGN.md, "Analyses"): pure float64 math on torch tensors.

- :mod:`.subspace`: LoRA Eq. 4 normalized subspace similarity φ(i, j) between adapters, and its random baseline;
- :mod:`.amplification`: LoRA §7.3 / Table 7, W projected onto ΔW's subspaces and the amplification factor;
- :mod:`.spectrum`: singular values, stable rank, energy rank and numerical rank of ΔW;
- :mod:`.alignment`: first-step alignment with full fine-tuning and the Eckart–Young optimum (LoRA-GA's premise).
"""

from loralab.analysis.alignment import alignment, alignment_table, best_rank_k, eckart_young, truncated_svd
from loralab.analysis.amplification import amplification, amplification_table
from loralab.analysis.spectrum import rank_for_energy, spectrum, spectrum_table
from loralab.analysis.subspace import (
    as_matrix,
    delta_bases,
    expected_random_phi,
    left_basis,
    phi_grid,
    phi_grids_for_layers,
    random_phi_grid,
    right_basis,
)

__all__ = [
    "alignment",
    "alignment_table",
    "amplification",
    "amplification_table",
    "as_matrix",
    "best_rank_k",
    "delta_bases",
    "eckart_young",
    "expected_random_phi",
    "left_basis",
    "phi_grid",
    "phi_grids_for_layers",
    "random_phi_grid",
    "rank_for_energy",
    "right_basis",
    "spectrum",
    "spectrum_table",
    "truncated_svd",
]
