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
# # LieRA vs LoRA: accuracy, parameters and the rank of ΔW
#
# LieRA updates multiplicatively, W = W0 ⊙ (1 + s·B·A): the additive update ΔW = W0 ⊙ s·B·A is full-rank in
# general, where LoRA's is rank ≤ r. Same parameter count; we compare test accuracy (tweets with MiniLM; conv
# kernels on the digits transfer) and the effective ranks of ΔW recorded by every job.

# %%
import os
from pathlib import Path

from loralab import figures
from loralab.results import load_runs

RESULTS = Path(os.environ.get("LORALAB_RESULTS", "../results"))
EXPERIMENT = os.environ.get("LORALAB_EXPERIMENT", "cpu_repro")
runs = figures.runs_frame(RESULTS, EXPERIMENT)

# %%
figures.variant_table(runs)

# %%
figures.spectrum_table(runs)

# %%
digits = load_runs(RESULTS, status="completed", experiment="digits_transfer")
if not digits.empty:
    display(figures.lr_table(digits))

# %%
paper, source = figures.reference(RESULTS, "liera_main")
print(source)
paper
