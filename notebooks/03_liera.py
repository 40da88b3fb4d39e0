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
# # LieRA (Si et al. 2025): a multiplicative low-rank update, at LoRA's parameter count
#
# LieRA updates each adapted weight multiplicatively, W = W₀ ⊙ (1 + s·BA) (first order of W₀ ⊙ exp(s·BA)), with
# LoRA's A and B and so LoRA's parameter count. The additive update ΔW = W₀ ⊙ s·BA is a Hadamard product of a
# full-rank W₀ with a rank-r matrix: in general it is full-rank, where LoRA's is rank ≤ r. Its findings checked here,
# reading result files only:
#
# 1. **Main tables** — LieRA matches or beats LoRA at equal rank and parameters (the paper: ConvNeXt-V2-B on VTAB-1k
#    and COCO; Llama on commonsense reasoning), each method at its own best learning rate.
# 2. **§3** — LieRA's ΔW has a high numerical rank (here: more than 4r), LoRA's stops at r.
#
# Variants are compared at their best setting per rank, chosen on the validation split (the test metric is only
# reported), so a learning-rate search (`train.lr=...` in the sweep) is part of the comparison. Tables come from the
# same code as `make figures` (`loralab.figures.sections`), plots from `loralab.figures.plots`, verdicts from
# `loralab.claims`.
#
# Settings (environment variables): `LORALAB_RESULTS` — a results root or a Hydra sweep directory (default
# `../results`); `LORALAB_EXPERIMENT` — one experiment (default: every experiment found). Each experiment's
# (model, task) setup is shown separately, as in `make figures`.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from loralab.figures import data, notebook, plots, sections

pd.set_option("display.max_colwidth", None)
RESULTS = Path(os.environ.get("LORALAB_RESULTS", "../results"))
EXPERIMENT = os.environ.get("LORALAB_EXPERIMENT") or None

setups = notebook.setups(RESULTS, EXPERIMENT)
Tables = notebook.Tables


# %% [markdown]
# ## Variants at their best learning rate
#
# Per variant and rank: the test metric (mean ± std over seeds, n) of the setting with the best mean validation
# metric, the learning rate that is, and the trainable parameter count (equal for LoRA and LieRA at equal rank). The
# paper's numbers are for its setups, shown for the shape of the comparison.

# %%
best_tables = {}
for name, frame in setups.items():
    display(Markdown(f"### {name}"))
    metric = data.main_metric(frame)
    if metric is None:
        print("no test metric in these runs")
        continue
    best_tables[name] = Tables(sections.variants_section, frame, metric, RESULTS)
    best_tables[name].show("variants_best_lr")

# %%
for name, frame in setups.items():
    metric = data.main_metric(frame)
    if metric is None:
        print(f"{name}: no plot — no test metric in these runs")
        continue
    base = frame[frame.targets == data.main_targets(frame)]
    best = data.best_setting(base[base.variant != "full"])
    if best.empty:
        print(f"{name}: no plot — no adapter runs")
        continue
    stats = data.aggregate(best, ["variant", "rank"], metric, 100)
    plots.metric_vs_rank(stats, "variant", f"{metric} (%)", f"{name}: each variant at its best lr")
    plt.show()

# %% [markdown]
# The learning-rate search behind that choice: the test metric of every (rank, lr) that was run (present when some
# variant was run at more than one learning rate).

# %%
for name, tables in best_tables.items():
    display(Markdown(f"### {name}"))
    tables.show("lr_search", "no variant was run at more than one learning rate")

# %% [markdown]
# ## Is LieRA's ΔW full-rank?
#
# Effective ranks of ΔW = W − W₀ after training, mean over the adapted matrices: stable rank ‖ΔW‖²_F/σ₁², the number
# of singular values holding 90% of the energy, and the numerical rank (σ_i above the float tolerance). Then, per
# rank, σ_i/σ₁ of one matrix at the middle layer: LoRA's spectrum drops to zero after r, LieRA's does not.

# %%
for name, frame in setups.items():
    display(Markdown(f"### {name}"))
    Tables(sections.spectrum_section, frame).show("dw_spectra", "no runs with the spectrum analysis")

# %%
for name, frame in setups.items():
    base = data.common_setting(frame)
    base = base[(base.targets == data.main_targets(base)) & base.variant.isin(["lierra", "liera", "lora", "full"])]
    rows = data.analysis_rows(base, "spectrum")
    if rows.empty or not rows.variant.isin(["lierra", "liera"]).any():
        print(f"{name}: no ΔW spectrum — no LieRA runs with the spectrum analysis")
        continue
    matrix, layer = data.matrix_of(rows.name.iloc[0]), data.paper_layer(rows.name)
    rows = rows[(rows.name.map(data.layer_of) == layer) & (rows.name.map(data.matrix_of) == matrix)]
    full = rows[rows.variant == "full"]
    for rank in sorted(rows[rows.variant.isin(["lierra", "liera"])]["rank"].unique()):
        one = pd.concat(
            [rows[(rows["rank"] == rank) & (rows.variant != "full")], full[full["rank"] == full["rank"].min()]]
        )
        plots.spectra(one, int(rank), f"{name}: ΔW singular values, {matrix}, layer {layer}, r={rank}")
        plt.show()

# %% [markdown]
# ## The LieRA paper's claims, judged on these runs
#
# Per setup, from `loralab.claims.evaluate` (the same verdicts as `figures/claims.md`): LieRA vs LoRA is a paired
# difference per seed at r=8 (else the highest common rank), each at its best lr; fewer than three seeds, an
# interval containing the threshold, or missing runs (named) make a claim *inconclusive*.

# %%
notebook.paper_claims(setups, "LieRA")
