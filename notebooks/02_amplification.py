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
# # W vs ΔW: how much does the update amplify directions of W? (LoRA §7.3, Table 7)
#
# With U, V the top-r singular vectors of ΔW_q, ‖Uᵀ W_q Vᵀ‖_F measures how much of W_q lives in ΔW's subspace;
# the same with U, V of W_q itself and of a random matrix; amplification = ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F (U, V of ΔW).
# Every job computed these per adapted matrix (`loralab.analysis.amplification`); here we read them back.

# %%
import os
from pathlib import Path

import pandas as pd

from loralab import figures

RESULTS = Path(os.environ.get("LORALAB_RESULTS", "../results"))
EXPERIMENT = os.environ.get("LORALAB_EXPERIMENT", "cpu_repro")
runs = figures.runs_frame(RESULTS, EXPERIMENT)

# %%
ours = figures.amplification_rows(runs, ranks=sorted(runs[runs.variant == "lora"]["rank"].unique()))
ours

# %%
paper, source = figures.reference(RESULTS, "lora_table7_amplification")
print(source)
paper

# %% [markdown]
# Per layer, for every rank (the paper reads GPT-3's layer 48; a small model's layers differ more):

# %%
rows = []
for _, run in runs[(runs.variant == "lora") & (runs.seed == 0) & (runs.targets == "qv")].iterrows():
    amp = pd.DataFrame(run.record["analysis"]["amplification"])
    amp["rank"] = run["rank"]
    rows.append(amp)
table = pd.concat(rows)
table[table.name.str.endswith("query")].pivot_table(index="name", columns="rank", values="factor").round(2)
