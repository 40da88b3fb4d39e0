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
# # LoRA (Hu et al. 2021): rank ablation, subspace similarity, amplification, and the rank of ΔW
#
# The LoRA paper's §7 asks what the low-rank update learns. This notebook checks its findings on the runs under
# `results/`, reading result files only (nothing is trained):
#
# 1. **Table 6** — a very low rank is enough: accuracy barely changes from r=1 to r=64 when W_q and W_v are adapted.
# 2. **Fig. 3 / Fig. 4** — the top singular direction of A is shared between r=8 and r=64 (φ(1, 1) > 0.5) and
#    between two seeds; the remaining directions are close to random.
# 3. **Table 7** — ΔW amplifies directions of W that W itself does not emphasise, strongly at a low rank (factor
#    21.5 at r=4) and weakly at a high one (1.9 at r=64).
# 4. **ΔW's spectrum** — LoRA's update has rank ≤ r by construction (beside the other variants of the runs).
#
# Tables come from the same code as `make figures` (`loralab.figures.sections`), so they match
# `figures/<experiment>/*.md`; the plots are drawn here with `loralab.figures.plots` (change a rank or a layer
# below to look at another); the verdicts at the end come from `loralab.claims`.
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
# ## Table 6: accuracy vs rank and adapted weights
#
# LoRA's runs at the sweep's main setting (the hyperparameters most of its runs share), seeds aggregated as
# mean ± std (n); the paper's rows are GPT-3 175B on MultiNLI and WikiSQL, so compare the *shape* (flat in r),
# not the numbers.

# %%
for name, frame in setups.items():
    display(Markdown(f"### {name}"))
    metric = data.main_metric(frame)
    if metric is None:
        print("no test metric in these runs")
        continue
    Tables(sections.rank_section, frame, metric, RESULTS).show("table6_rank", "it needs LoRA runs at two or more ranks")

# %% [markdown]
# The same as a plot, one line per adapted weight set (error bars: std over seeds), and every variant's metric vs
# rank at its main setting:

# %%
for name, frame in setups.items():
    metric = data.main_metric(frame)
    base = data.common_setting(frame)
    lora = base[base.variant == "lora"]
    if metric is None or lora["rank"].nunique() < 2:
        print(f"{name}: no rank-ablation plot — it needs LoRA runs at two or more ranks")
        continue
    stats = data.aggregate(lora, ["targets", "rank"], metric, 100)
    plots.metric_vs_rank(stats, "targets", f"{metric} (%)", f"{name}: LoRA rank ablation")
    plt.show()
    others = base[(base.targets == data.main_targets(base)) & (base.variant != "full")]
    stats = data.aggregate(others, ["variant", "rank"], metric, 100)
    plots.metric_vs_rank(stats, "variant", f"{metric} (%)", f"{name}: every variant vs rank")
    plt.show()

# %% [markdown]
# ## Fig. 3 and 4: subspace similarity φ
#
# φ(A₁, A₂, i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F / min(i, j) on the right singular vectors of the two A factors (LoRA
# Eq. 4): 1 when the top-i directions of one lie in the top-j of the other, ≈ max(i, j)/d for random subspaces.
# Fig. 3 compares two ranks at the same seed, Fig. 4 two seeds at the same rank. The pairs were computed when the
# sweep ended (or by `python -m loralab.analyze`); the paper's finding is φ(1, 1) > 0.5 for A_q and A_v between
# r=8 and r=64 at GPT-3's layer 48, the other directions close to the random baseline.

# %%
for name, frame in setups.items():
    display(Markdown(f"### {name}"))
    Tables(sections.subspace_section, frame).show(
        "subspace_similarity", "no φ analysis of these runs (python -m loralab.analyze)"
    )

# %%
for name, frame in setups.items():
    pairs = data.subspace_results(frame)
    main = data.main_targets(frame)
    lora = [r for r in pairs if r["variant"] == "lora" and r["targets"] == main]
    if not lora:
        print(f"{name}: no φ grid — it needs the φ analysis of LoRA runs at two ranks or two seeds")
        continue
    for result in lora:
        same = "same seed, two ranks (Fig. 3)" if result["kind"] == "rank" else "same rank, two seeds (Fig. 4)"
        plots.subspace_grids(result, f"{name}: φ, {same}")
        plt.show()

# %% [markdown]
# ## Table 7: does ΔW amplify directions of W?
#
# With U, V the top-r singular vectors of ΔW_q: ‖Uᵀ W_q Vᵀ‖_F measures how much of W_q lies in ΔW's subspace;
# the same with U, V of W_q itself and of a random matrix. Amplification = ‖ΔW_q‖_F / ‖Uᵀ W_q Vᵀ‖_F. The paper reads
# GPT-3's layer 48 of 96; here the middle block of the model, and the mean over layers.

# %%
for name, frame in setups.items():
    display(Markdown(f"### {name}"))
    Tables(sections.amplification_section, frame, RESULTS).show(
        "table7_amplification", "no LoRA runs with the amplification analysis"
    )

# %% [markdown]
# Per layer (a small model's layers differ more than the table's two rows suggest): LoRA's amplification factor of
# each adapted matrix by rank, mean over seeds.

# %%
for name, frame in setups.items():
    base = data.common_setting(frame)
    base = base[(base.variant == "lora") & (base.targets == data.main_targets(base))]
    rows = data.analysis_rows(base, "amplification")
    if rows.empty:
        print(f"{name}: no LoRA runs with the amplification analysis")
        continue
    rows = rows.assign(matrix=rows.name.map(data.matrix_of), layer=rows.name.map(data.layer_of))
    display(Markdown(f"### {name}"))
    display(rows.pivot_table(index=["matrix", "layer"], columns="rank", values="factor", aggfunc="mean").round(2))

# %% [markdown]
# ## The spectrum of ΔW
#
# Effective ranks of ΔW = W − W₀ after training (mean over adapted matrices): LoRA's numerical rank is at most r.
# The plot shows σ_i/σ_1 of one matrix at the middle layer for every variant at the rank most variants were run at
# (LoRA-GA's update may reach 2r, LieRA's and full fine-tuning's are not low-rank; see the other notebooks).

# %%
for name, frame in setups.items():
    display(Markdown(f"### {name}"))
    Tables(sections.spectrum_section, frame).show("dw_spectra", "no runs with the spectrum analysis")

# %%
for name, frame in setups.items():
    base = data.common_setting(frame)
    rows = data.analysis_rows(base[base.targets == data.main_targets(base)], "spectrum")
    if rows.empty:
        print(f"{name}: no runs with the spectrum analysis")
        continue
    rank = int(rows.groupby("rank").variant.nunique().idxmax())
    rows = rows[rows["rank"] == rank]
    matrix, layer = data.matrix_of(rows.name.iloc[0]), data.paper_layer(rows.name)
    one = rows[(rows.name.map(data.layer_of) == layer) & (rows.name.map(data.matrix_of) == matrix)]
    plots.spectra(one, rank, f"{name}: ΔW singular values, {matrix}, layer {layer}, r={rank}")
    plt.show()

# %% [markdown]
# ## Do the findings depend on how long the adapters trained?
#
# No paper reports this: runs with `analysis_steps` also ran the ΔW analyses at those optimizer steps, so the
# same runs give φ(1,1) between ranks (A, B and ΔW), the amplification factor per rank and ‖ΔW‖_F/‖W‖_F step by
# step (the last row is the end of training, the number the sections above use).

# %%
for name, frame in setups.items():
    display(Markdown(f"### {name}"))
    tables = Tables(sections.training_length_section, frame)
    tables.show("training_length", "no runs with analysis_steps")
    tables.plot("training_length", "no runs with analysis_steps")

# %% [markdown]
# ## The LoRA paper's claims, judged on these runs
#
# Per setup, from `loralab.claims.evaluate` (the same verdicts as `figures/claims.md`): the value is the mean over
# seeds, with a 95% t-interval; fewer than three seeds, an interval containing the threshold, or missing runs
# (named) make a claim *inconclusive*.

# %%
notebook.paper_claims(setups, "LoRA")
