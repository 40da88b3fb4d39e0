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
# # LoRA-GA: does a gradient-aligned init converge faster in the first steps?
#
# LoRA-GA initialises A, B from the SVD of the full-weight gradient so that the first step approximates full
# fine-tuning's (exactly the rank-2r truncation with scale `gd` and SGD; see tests/test_loraga.py). Its paper
# reports a loss curve that drops like full fine-tuning's. Training-loss curves of every run are in the results.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from loralab import figures

RESULTS = Path(os.environ.get("LORALAB_RESULTS", "../results"))
EXPERIMENT = os.environ.get("LORALAB_EXPERIMENT", "cpu_repro")
runs = figures.runs_frame(RESULTS, EXPERIMENT)

# %%
for rank in sorted(runs[runs.variant == "loraga"]["rank"].unique()):
    curves = figures.loss_curves(runs, rank=rank, steps=150)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for variant, values in curves.items():
        ax.plot(pd.Series(values).rolling(5, min_periods=1).mean(), label=variant)
    ax.set(title=f"r={rank}", xlabel="optimizer step", ylabel="training loss (5-step mean)")
    ax.legend()
    plt.show()

# %%
early = {}
for rank in sorted(runs[runs.variant == "loraga"]["rank"].unique()):
    for variant, values in figures.loss_curves(runs, rank=rank, steps=150).items():
        early[(variant, rank)] = figures.early_loss(values)
pd.DataFrame(early).T.round(4)

# %% [markdown]
# The premise, measured by every job before training: one plain-SGD step of the variant vs full fine-tuning's
# −η·G on the same batch. "best scale" is 1 − cos², comparable to the Eckart–Young optimum of a rank-2r update.

# %%
figures.first_step_table(runs)
