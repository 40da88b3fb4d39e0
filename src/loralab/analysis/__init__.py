"""Analyses of effective updates ΔW = W_final − W0 (DESIGN.md, "Analyses"): pure float64 math on torch tensors.

- :mod:`.subspace`: LoRA Eq. 4 normalized subspace similarity φ(i, j) between adapters, and its random baseline;
- :mod:`.amplification`: LoRA §7.3 / Table 7, W projected onto ΔW's subspaces and the amplification factor;
- :mod:`.spectrum`: singular values, stable rank, energy rank and numerical rank of ΔW;
- :mod:`.alignment`: first-step alignment with full fine-tuning and the Eckart–Young optimum (LoRA-GA's premise);
- :mod:`.updates`: each adapted matrix's ΔW and W0 in their cheapest exact form, one matrix at a time;
- :mod:`.lowrank`: exact SVDs from low-rank factors, top singular values to a stated tolerance, Haar bases.
"""

from loralab.analysis.alignment import alignment, alignment_table, best_rank_k, eckart_young, truncated_svd
from loralab.analysis.amplification import amplification, amplification_of_update, amplification_table
from loralab.analysis.lowrank import factor_svd, random_orthonormal, top_singular_values
from loralab.analysis.spectrum import rank_for_energy, spectrum, spectrum_of_update, spectrum_table
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
from loralab.analysis.updates import MatrixUpdate, matrix_updates

__all__ = [
    "MatrixUpdate",
    "alignment",
    "alignment_table",
    "amplification",
    "amplification_of_update",
    "amplification_table",
    "as_matrix",
    "best_rank_k",
    "delta_bases",
    "eckart_young",
    "expected_random_phi",
    "factor_svd",
    "left_basis",
    "matrix_updates",
    "phi_grid",
    "phi_grids_for_layers",
    "random_orthonormal",
    "random_phi_grid",
    "rank_for_energy",
    "right_basis",
    "spectrum",
    "spectrum_of_update",
    "spectrum_table",
    "top_singular_values",
    "truncated_svd",
]
