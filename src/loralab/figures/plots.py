"""The plots of the figure set, each a function of selected runs that returns a matplotlib Figure (the notebooks
show them inline; `python -m loralab.figures` saves them). No backend is chosen here: the command line does that."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

from loralab.figures.data import TARGET_SETS, display, layer_of, mean_phi, paper_layer, phi


def rank_axis(ax, ranks):
    """Log-scaled rank axis with a tick at each rank that was run (1, 4, 8, 64 — not 10^0, 10^1)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(ranks)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())


def metric_vs_rank(stats: pd.DataFrame, series: str, ylabel: str, title: str):
    """`aggregate` output (columns rank, mean, std, n, `series`): one line per series, error bars = std over seeds."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    for label, part in stats.groupby(series, sort=False):
        part = part.sort_values("rank")
        name = display(label) if series == "variant" else TARGET_SETS.get(label, label)
        n = f"n={part.n.min()}" if part.n.min() == part.n.max() else f"n={part.n.min()}-{part.n.max()}"
        ax.errorbar(
            part["rank"], part["mean"], yerr=part["std"].fillna(0), marker="o", capsize=3, label=f"{name} ({n})"
        )
    rank_axis(ax, stats["rank"].unique())
    ax.set(xlabel="rank r", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return fig


def _heatmap(ax, grid: np.ndarray, title: str, fig):
    im = ax.imshow(
        grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5)
    )
    ax.set(title=title, xlabel="j", ylabel="i")
    fig.colorbar(im, ax=ax, label="φ(i, j)")


def subspace_grids(result: dict, caption: str, basis: str = "A_right"):
    """LoRA Fig. 3/4 style: φ(i, j) of W_q and W_v at the middle layer, the mean over layers, and the random pair."""
    names = list(result["layers"])
    matrices = sorted({n.rsplit(".", 1)[-1] for n in names})[:2]
    mid = paper_layer(names)
    fig, axes = plt.subplots(len(matrices), 3, figsize=(14, 3.6 * len(matrices)), layout="constrained", squeeze=False)
    for row, matrix in enumerate(matrices):
        layer = next((n for n in names if n.endswith("." + matrix) and layer_of(n) == mid), None)
        if layer is None or basis not in result["layers"][layer]:
            continue
        grid, rand = phi(result, layer, basis)
        _heatmap(axes[row, 0], grid, f"{matrix}, layer {mid} (middle, as the paper's 48 of 96)", fig)
        _heatmap(axes[row, 1], mean_phi(result, matrix, basis), f"{matrix}, mean over layers", fig)
        _heatmap(axes[row, 2], rand, "two random Gaussian matrices", fig)
    a, b = result["a"], result["b"]
    fig.suptitle(
        f"{caption} — {display(result['variant'])} on {TARGET_SETS.get(result['targets'], result['targets'])}: "
        f"r={a['rank']} vs r={b['rank']}, seeds {a['seed']} vs {b['seed']} ({basis})"
    )
    return fig


def loss_curves(curves: dict[tuple, np.ndarray], title: str, smooth: int = 5):
    """Mean training loss over seeds (shaded: ± std), one line per (variant, rank, lr)."""
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    for (variant, rank, lr), values in curves.items():
        mean = pd.Series(values.mean(0)).rolling(smooth, min_periods=1).mean().to_numpy()
        std = pd.Series(values.std(0)).rolling(smooth, min_periods=1).mean().to_numpy()
        steps = np.arange(1, len(mean) + 1)
        label = f"{display(variant)}" + ("" if variant == "full" else f" r={rank}") + f", lr={lr:g} (n={len(values)})"
        (line,) = ax.plot(steps, mean, label=label, ls="--" if variant == "full" else "-")
        if len(values) > 1:
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="optimizer step", ylabel=f"training loss ({smooth}-step mean)", title=title)
    ax.legend(fontsize=8)
    return fig


def spectra(rows: pd.DataFrame, rank: int, title: str):
    """σ_i/σ_1 of ΔW of one matrix per variant (mean over seeds), with r and 2r marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    for variant, part in rows.groupby("variant"):
        values = [np.asarray(s) / s[0] for s in part.singular_values if len(s) and s[0] > 0]
        if not values:
            continue
        length = min(map(len, values))
        sv = np.mean([v[:length] for v in values], axis=0)
        ax.semilogy(np.arange(1, length + 1), sv, marker=".", label=f"{display(variant)} (n={part.seed.nunique()})")
    for x, text in ((rank, "r"), (2 * rank, "2r")):
        ax.axvline(x, color="grey", ls="--", lw=0.8)
        ax.text(x, ax.get_ylim()[0], f" {text}", color="grey", va="bottom")
    ax.set(xlabel="index i", ylabel="σ_i / σ_1", title=title)
    ax.legend(fontsize=8)
    return fig


def by_step(series: list[tuple[str, str, pd.DataFrame]], title: str):
    """One panel per quantity, one line per (label) against the optimizer step; `stats` has mean / std / count by
    step (error bars: std over seeds)."""
    panels = list(dict.fromkeys(panel for panel, _, _ in series))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), layout="constrained", squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for _, label, stats in (s for s in series if s[0] == panel):
            n = int(stats["count"].min())
            style = {"ls": ":", "color": "grey"} if label == "random" else {"marker": "o"}
            ax.errorbar(
                stats.index, stats["mean"], yerr=stats["std"].fillna(0), capsize=3, label=f"{label} (n={n})", **style
            )
        ax.set(xlabel="optimizer step", title=panel)
        ax.set_xscale("log")
        if panel == "amplification":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig
