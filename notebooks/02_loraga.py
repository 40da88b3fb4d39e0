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
# # LoRA-GA (Wang et al. 2024): does a gradient-aligned init converge like full fine-tuning?
#
# LoRA-GA initialises A and B from the SVD of the full-weight gradient G (averaged over a few batches):
# A₀ = Vᵀ[:r], B₀ = U[:, r:2r], scaled, with s·B₀A₀ subtracted from the frozen weight so the model starts
# unchanged. The first step of the adapter then moves W along the top singular directions of G — the paper's
# premise is that it approximates full fine-tuning's first step as well as any rank-2r update can. Its findings
# checked here, reading result files only:
#
# 1. **Fig. 1** — LoRA-GA's training loss falls faster than LoRA's over the first steps, close to full
#    fine-tuning's (the paper: T5-base on GLUE subsets, Llama-2-7B on MetaMath / Code-Feedback / WizardLM).
# 2. **§3** — measured directly, before training: one plain-SGD step of each variant against full fine-tuning's
#    −η·G on the same batch (cosine; relative error at the best scale, beside the Eckart–Young optimum of a rank-2r
#    update).
# 3. **Subspaces** — LoRA-GA's A at a low rank lies inside its A at a high rank (φ over the whole subspaces; its
#    "top" direction is arbitrary, the r rows of A₀ start with equal singular values).
#
# Tables come from the same code as `make figures` (`loralab.figures.sections`), plots from
# `loralab.figures.plots`, verdicts from `loralab.claims`.
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
# ## Fig. 1: training loss over the first steps
#
# Per LoRA-GA rank: the mean training loss over seeds (shaded: ± std) of every variant at that rank, at its main
# setting, with full fine-tuning dashed where the runs include it (`variant=full`).

# %%
for name, frame in setups.items():
    base = data.common_setting(frame)
    base = base[base.targets == data.main_targets(base)]
    ranks = sorted(base[base.variant == "loraga"]["rank"].unique())
    if not ranks:
        print(f"{name}: no loss curves — no LoRA-GA runs (variant=loraga)")
        continue
    full = base[base.variant == "full"]
    if full.empty:
        print(f"{name}: no full fine-tuning runs (variant=full): the curves are shown without it")
    for rank in ranks:
        chosen = pd.concat(
            [base[(base["rank"] == rank) & (base.variant != "full")], full[full["rank"] == full["rank"].min()]]
        )
        plots.loss_curves(data.loss_curves(chosen), f"{name}: training loss, r={rank} (mean over seeds)")
        plt.show()

# %% [markdown]
# ## Early loss and first-step alignment
#
# The mean training loss over early spans of steps (mean ± std over seeds, n seeds), at the rank `make figures`
# reports (r=8 where it was run); the paper's final accuracies are shown beside for its setup.

# %%
convergence = {name: Tables(sections.convergence_section, frame, RESULTS) for name, frame in setups.items()}
for name, tables in convergence.items():
    display(Markdown(f"### {name}"))
    tables.show("loraga_early_loss", "no LoRA-GA runs")

# %% [markdown]
# One SGD step from the same weights on the same batch, per variant and rank, mean over the adapted matrices:
# cosine with full fine-tuning's step, relative error after the best rescaling (1 − cos²), and the smallest error any
# rank-2r update could reach (Eckart–Young). LoRA-GA's should sit at the optimum; LoRA's (B₀ = 0, so its first step
# only moves B along G·Aᵀ) should not.

# %%
for name, tables in convergence.items():
    display(Markdown(f"### {name}"))
    tables.show("first_step_alignment", "no runs with the first_step analysis")

# %% [markdown]
# ## LoRA-GA's subspaces across ranks
#
# φ(i, j) between LoRA-GA's A at two ranks (same seed): the low-rank subspace should lie in the high-rank one
# (φ(r_low, r_high) close to 1), where two random subspaces give ≈ max(i, j)/d.

# %%
for name, frame in setups.items():
    pairs = [r for r in data.subspace_results(frame) if r["variant"] == "loraga" and r["kind"] == "rank"]
    if not pairs:
        print(f"{name}: no φ grid — it needs the φ analysis of LoRA-GA runs at two ranks")
        continue
    for result in pairs:
        plots.subspace_grids(result, f"{name}: LoRA-GA, same seed, two ranks")
        plt.show()

# %% [markdown]
# ## The LoRA-GA paper's claims, judged on these runs
#
# Per setup, from `loralab.claims.evaluate` (the same verdicts as `figures/claims.md`): paired claims compare LoRA
# and LoRA-GA at the same seed (a difference per seed, with a sign test); fewer than three seeds, an interval
# containing the threshold, or missing runs (named) make a claim *inconclusive*.

# %%
notebook.paper_claims(setups, "LoRA-GA")
