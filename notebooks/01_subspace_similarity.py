# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Subspace similarity between adapters (LoRA §7.2, Fig. 3 and 4)
#
# φ(A₁, A₂, i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F / min(i, j) on the right singular vectors of the A factors (LoRA Eq. 4),
# between r=8 and r=64 at the same seed (Fig. 3) and between two seeds at r=64 (Fig. 4), beside two random
# Gaussian matrices. The grids were computed by `python -m loralab.analyze` from the runs under `results/`; this
# notebook only reads them (`loralab.figures` helpers), it re-implements nothing.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from loralab import figures

RESULTS = Path(os.environ.get("LORALAB_RESULTS", "../results"))
EXPERIMENT = os.environ.get("LORALAB_EXPERIMENT", "cpu_repro")

# %%
pairs = {kind: figures.subspace_results(RESULTS, EXPERIMENT, kind) for kind in ("rank", "seed")}
for kind, found in pairs.items():
    for result in found:
        print(kind, "pair:", result["a"]["rank"], result["a"]["seed"], "vs", result["b"]["rank"], result["b"]["seed"])
        display(pd.DataFrame(result["summary"]).groupby("basis")[["phi_11", "phi_mean", "random_11"]].mean().round(3))

# %% [markdown]
# The paper's finding: the top direction is shared (φ(1, 1) > 0.5 between r=8 and r=64 for A_q and A_v), the
# remaining directions are close to the random baseline, whose expectation is max(i, j)/d.

# %%
for kind, found in pairs.items():
    for result in found:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.5), layout="constrained")
        for ax, matrix in zip(axes[:2], ("query", "value")):
            figures.heatmap(ax, figures.mean_phi(result, matrix), f"{kind} pair, W_{matrix[0]}, mean over layers", fig)
        layer = next(iter(result["layers"]))
        figures.heatmap(axes[2], figures.phi(result, layer)[1], "random Gaussian baseline", fig)
        plt.show()
