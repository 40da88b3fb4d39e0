"""Paper-style figures and tables from the results on disk only (no training): `make figures`.

    python -m loralab.figures [--results results] [--experiment cpu_repro] [--out figures]

Each item is written as PNG (where it is a plot) + Markdown + LaTeX + CSV under `--out`, and `index.md` shows them
all. Every table stands beside the paper's numbers (results/reference/*.csv) with both setups named. The data-prep
functions (`rank_table`, `subspace_results`, ...) are what the notebooks call too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from loralab.results import load_runs, run_tag  # noqa: E402

OURS = "MiniLM-L6 (22.7M) + LoRA on tweet sentiment, 150 steps of 32, CPU"
TARGET_SETS = {"q": "Wq", "qv": "Wq,Wv", "qkvo": "Wq,Wk,Wv,Wo"}


# --- data --------------------------------------------------------------------------------------------------------
def runs_frame(results: str | Path, experiment: str) -> pd.DataFrame:
    frame = load_runs(results, status="completed", experiment=experiment)
    if frame.empty:
        raise SystemExit(f"no completed runs of experiment {experiment!r} under {results}")
    tags = [run_tag(r["run_dir"]) for r in frame.record]
    frame["targets"] = [tag_value(t, "targets") for t in tags]
    frame["lr_override"] = [tag_value(t, "train.lr") for t in tags]
    return frame


def reference(results: str | Path, name: str) -> tuple[pd.DataFrame, str]:
    path = Path(results) / "reference" / f"{name}.csv"
    source = path.read_text().splitlines()[0].lstrip("# ")
    return pd.read_csv(path, comment="#"), source


def paper_layer(names: list[str]) -> int:
    """The LoRA paper reads GPT-3's layer 48 of 96: the middle block; here the middle of this model's blocks."""
    blocks = sorted({int(p) for n in names for p in n.split(".") if p.isdigit()})
    return blocks[len(blocks) // 2]


def layer_of(name: str) -> int | None:
    digits = [int(p) for p in name.split(".") if p.isdigit()]
    return digits[0] if digits else None


def matrix_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def at_default_lr(frame: pd.DataFrame) -> pd.DataFrame:
    """Runs at their variant's default learning rate (the lr-sweep runs only enter `lr_table`)."""
    return frame[frame.lr_override == ""] if "lr_override" in frame else frame


def rank_table(frame: pd.DataFrame, variant: str = "lora", seed: int = 0) -> pd.DataFrame:
    """Table 6: test accuracy (%) by adapted weight set × rank."""
    frame = at_default_lr(frame)
    sub = frame[(frame.variant == variant) & (frame.seed == seed) & frame.targets.isin(TARGET_SETS)]
    table = sub.pivot_table(index="targets", columns="rank", values="test/accuracy") * 100
    table.index = [TARGET_SETS[t] for t in table.index]
    return table.reindex([v for v in TARGET_SETS.values() if v in table.index]).round(1)


def tag_value(tag: str, key: str) -> str:
    return dict(kv.split("=", 1) for kv in tag.split(",") if "=" in kv).get(key, "")


def subspace_results(results: str | Path, experiment: str, kind: str, variant: str = "lora", targets: str = "qv"):
    """The cross-run φ results (loralab.analyze) of one kind ('rank' or 'seed') for the paper's W_q, W_v setting."""
    files = sorted((Path(results) / experiment / "analysis").glob(f"subspace-*-{variant}-*.json"))
    results = [json.loads(f.read_text()) for f in files]
    return [
        d
        for d in results
        if d["kind"] == kind and d["variant"] == variant and tag_value(d["tag"], "targets") == targets
    ]


def phi(result: dict, layer: str, basis: str = "A_right") -> tuple[np.ndarray, np.ndarray]:
    entry = result["layers"][layer][basis]
    return np.array(entry["phi"]), np.array(result["random"][entry["random"]])


def mean_phi(result: dict, matrix: str, basis: str = "A_right") -> np.ndarray:
    grids = [phi(result, n, basis)[0] for n in result["layers"] if matrix_of(n) == matrix]
    return np.mean(grids, axis=0)


def amplification_rows(frame: pd.DataFrame, ranks=(4, 64), targets: str = "qv", matrix: str = "query") -> pd.DataFrame:
    """Table 7 quantities of W_q at the paper's layer and the mean over layers, per rank."""
    rows, frame = {}, at_default_lr(frame)
    for rank in ranks:
        sub = frame[
            (frame.variant == "lora") & (frame["rank"] == rank) & (frame.seed == 0) & (frame.targets == targets)
        ]
        if sub.empty:
            continue
        amp = pd.DataFrame(sub.iloc[0].record["analysis"]["amplification"])
        amp = amp[amp.name.map(matrix_of) == matrix]
        mid = amp[amp.name.map(layer_of) == paper_layer(list(amp.name))].iloc[0]
        cols = ["proj_dW", "proj_W", "proj_random", "norm_dW", "norm_W", "factor"]
        rows[f"r{rank} (layer {layer_of(mid['name'])})"] = mid[cols]
        rows[f"r{rank} (mean of {len(amp)} layers)"] = amp[cols].mean()
    table = pd.DataFrame(rows).astype(float).round(3)
    table.index = [
        "||U^T W V^T|| (U,V of dW)",
        "||U^T W V^T|| (U,V of W)",
        "||U^T W V^T|| (U,V random)",
        "||dW||_F",
        "||W||_F",
        "amplification ||dW||/proj",
    ]
    return table


def per_run_means(frame: pd.DataFrame, analysis: str, columns: dict[str, str], targets: str = "qv") -> pd.DataFrame:
    """One row per seed-0 run (variant, rank): the mean over adapted matrices of `columns` of a per-run analysis
    table (`analysis` key of the result JSON); {output name: column}."""
    rows, frame = [], at_default_lr(frame)
    for _, run in frame[(frame.seed == 0) & (frame.targets == targets)].iterrows():
        table = pd.DataFrame(run.record.get("analysis", {}).get(analysis, []))
        if not table.empty:
            rows.append(
                {"variant": run.variant, "rank": run["rank"], **{k: table[c].mean() for k, c in columns.items()}}
            )
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).sort_values(["rank", "variant"]).round(4).reset_index(drop=True)


def spectrum_table(frame: pd.DataFrame, targets: str = "qv") -> pd.DataFrame:
    """ΔW's stable rank, 90%-energy rank and numerical rank (means over adapted matrices), per variant × rank."""
    columns = {"stable_rank": "stable_rank", "rank_90%_energy": "rank_energy", "numerical_rank": "numerical_rank"}
    return per_run_means(frame, "spectrum", columns, targets)


def variant_table(frame: pd.DataFrame, targets: str | None = "qv") -> pd.DataFrame:
    """Test accuracy (%) and trainable parameters per variant × rank, at each variant's default lr."""
    sub = at_default_lr(frame)
    sub = sub[sub.seed == 0]
    if targets is not None:
        sub = sub[sub.targets == targets]
    acc = sub.pivot_table(index="variant", columns="rank", values="test/accuracy") * 100
    params = sub.pivot_table(index="variant", columns="rank", values="params/trainable")
    acc.columns = [f"acc r={c}" for c in acc.columns]
    params.columns = [f"params r={c}" for c in params.columns]
    return pd.concat([acc.round(2), params.astype("Int64")], axis=1)


def first_step_table(frame: pd.DataFrame, targets: str = "qv") -> pd.DataFrame:
    """Each variant's first-SGD-step alignment with full fine-tuning on the same batch (means over matrices)."""
    columns = {
        "cosine": "cosine",
        "rel. error (best scale)": "rel_error_best_scale",
        "Eckart-Young optimum (rank 2r)": "eckart_young_2r",
    }
    return per_run_means(frame, "first_step", columns, targets)


def lr_table(frame: pd.DataFrame, targets: str | None = None) -> pd.DataFrame:
    """Test accuracy (%) per variant × (rank, learning rate): methods compared at their own best lr too."""
    if targets is not None:
        frame = frame[frame.targets == targets]
    frame = frame.assign(lr=[r["config"]["train"]["lr"] for r in frame.record])
    table = frame[frame.seed == 0].pivot_table(index="variant", columns=["rank", "lr"], values="test/accuracy") * 100
    table.columns = [f"r={r}, lr={lr:g}" for r, lr in table.columns]
    return table.round(2)


def loss_curves(frame: pd.DataFrame, rank: int = 8, targets: str = "qv", steps: int = 60) -> dict[str, np.ndarray]:
    curves, frame = {}, at_default_lr(frame)
    for _, run in frame[(frame["rank"] == rank) & (frame.seed == 0) & (frame.targets == targets)].iterrows():
        values = np.array([v for _, v in run.record["curves"]["train/loss"][:steps]])
        curves[run.variant] = values
    return dict(sorted(curves.items()))


def early_loss(curve: np.ndarray) -> dict[str, float]:
    """Mean training loss over the first 20 steps, steps 21-60 (where the run has them), and the last step."""
    out = {"mean loss steps 1-20": float(curve[:20].mean())}
    if len(curve) > 20:
        out["mean loss steps 21-60"] = float(curve[20:60].mean())
    out["last step loss"] = float(curve[-1])
    return out


# --- output ------------------------------------------------------------------------------------------------------
class Writer:
    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.index: list[str] = []

    def table(
        self,
        name: str,
        title: str,
        table: pd.DataFrame,
        note: str = "",
        paper: pd.DataFrame | None = None,
        paper_setup: str = "",
    ):
        table.to_csv(self.out / f"{name}.csv")
        (self.out / f"{name}.tex").write_text(table.to_latex(float_format="%.3g", caption=title, label=f"tab:{name}"))
        md = [f"## {title}", "", f"*Ours: {note or OURS}*", "", table.to_markdown()]
        if paper is not None:
            paper.to_csv(self.out / f"{name}_paper.csv", index=False)
            md += ["", f"*Paper: {paper_setup}*", "", paper.to_markdown(index=False)]
        (self.out / f"{name}.md").write_text("\n".join(md) + "\n")
        self.index += md + [""]

    def figure(self, name: str, fig, caption: str):
        fig.savefig(self.out / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        self.index += [f"![{caption}]({name}.png)", "", f"*{caption}*", ""]

    def finish(self, title: str):
        (self.out / "index.md").write_text("\n".join([f"# {title}", "", *self.index]))


def heatmap(ax, grid: np.ndarray, title: str, fig):
    im = ax.imshow(
        grid,
        vmin=0,
        vmax=1,
        cmap="viridis",
        aspect="auto",
        origin="upper",
        extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5),
    )
    ax.set(title=title, xlabel="j", ylabel="i")
    fig.colorbar(im, ax=ax, label="φ(i, j)")


def spectrum_heatmap(spectrum_rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Per-run image: σ_i/σ_1 of ΔW for every adapted matrix (rows) — logged to W&B by each job."""
    spec = pd.DataFrame(spectrum_rows)
    grid = np.array([np.array(s) / s[0] if s and s[0] > 0 else np.zeros(len(s)) for s in spec.singular_values])
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(spec) + 1.5), layout="constrained")
    im = ax.imshow(grid, cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set(
        yticks=range(len(spec)), yticklabels=spec.name, xlabel="singular value index i", title=title or "ΔW spectrum"
    )
    ax.tick_params(axis="y", labelsize=6)
    fig.colorbar(im, ax=ax, label="σ_i / σ_1")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# --- the figures -------------------------------------------------------------------------------------------------
def render(results: str | Path, experiment: str, out: str | Path) -> Path:
    frame = runs_frame(results, experiment)
    w = Writer(out)

    table6, source = reference(results, "lora_table6_rank")
    ours = rank_table(frame)
    if not ours.empty:
        w.table(
            "table6_rank",
            "Table 6: accuracy (%) vs rank and adapted weights",
            ours,
            paper=table6[table6.dataset == "MultiNLI"],
            paper_setup=source,
        )
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, row in ours.iterrows():
            ax.plot(row.index.astype(int), row.values, marker="o", label=label)
        ax.set(xscale="log", xlabel="rank r", ylabel="test accuracy (%)", title="Rank ablation (ours)")
        ax.legend(title="adapted")
        w.figure("table6_rank", fig, "Test accuracy vs rank for each adapted weight set")

    for kind, name, caption in (
        ("rank", "fig3_subspace_ranks", "Fig. 3-style: φ(A_r=8, A_r=64, i, j), same seed"),
        ("seed", "fig4_subspace_seeds", "Fig. 4-style: φ(A seed 1, A seed 2, i, j) at r=64"),
    ):
        for result in subspace_results(results, experiment, kind):
            names = list(result["layers"])
            mid = paper_layer(names)
            fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), layout="constrained")
            for row, matrix in enumerate(("query", "value")):
                layer = next((n for n in names if matrix_of(n) == matrix and layer_of(n) == mid), None)
                if layer is None:
                    continue
                grid, rand = phi(result, layer)
                heatmap(axes[row, 0], grid, f"W_{matrix[0]}, layer {mid} (the paper's: middle)", fig)
                heatmap(axes[row, 1], mean_phi(result, matrix), f"W_{matrix[0]}, mean over layers", fig)
                heatmap(axes[row, 2], rand, "two random Gaussian matrices", fig)
            a, b = result["a"], result["b"]
            adapted = TARGET_SETS.get(tag_value(result["tag"], "targets"), "default targets")
            fig.suptitle(
                f"{caption} — {result['variant']} on {adapted}: r={a['rank']} vs r={b['rank']}, "
                f"seeds {a['seed']} vs {b['seed']}"
            )
            w.figure(name, fig, caption)
            summary = pd.DataFrame(result["summary"])
            summary = summary.groupby(["basis"])[["phi_11", "phi_mean", "random_11", "random_mean"]].mean().round(3)
            w.table(
                name,
                f"{caption}: φ(1,1) and mean φ over all layers (A: right, B: left singular vectors)",
                summary,
                paper=pd.DataFrame(
                    {
                        "finding": [
                            "top direction shared: φ(1,1) > 0.5 (r=8 vs r=64, A_q and A_v, GPT-3 layer 48)",
                            "other directions mostly noise (close to the random baseline)",
                        ]
                    }
                ),
                paper_setup="LoRA §7.2, Fig. 3/4 (GPT-3 175B, layer 48); qualitative",
            )

    table7, source = reference(results, "lora_table7_amplification")
    amp = amplification_rows(frame)
    if not amp.empty:
        w.table(
            "table7_amplification",
            "Table 7: W_q projected on ΔW_q's top-r subspace, amplification",
            amp,
            paper=table7,
            paper_setup=source,
        )

    curves = loss_curves(frame)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, values in curves.items():
            smooth = pd.Series(values).rolling(5, min_periods=1).mean()
            ax.plot(np.arange(1, len(values) + 1), smooth, label=variant)
        ax.set(xlabel="optimizer step", ylabel="training loss (5-step mean)", title="First steps, r=8 (ours)")
        ax.legend()
        w.figure("loraga_loss_curves", fig, "LoRA-GA convergence: training loss over the first steps per variant")
        early = pd.DataFrame({v: early_loss(c) for v, c in curves.items()}).T.round(4)
        t5, source = reference(results, "loraga_t5_glue")
        w.table(
            "loraga_early_loss",
            "LoRA-GA: early training loss per variant (r=8)",
            early,
            paper=t5,
            paper_setup=source + " (final accuracies; the paper's convergence claim is its Fig. 1)",
        )

    first = first_step_table(frame)
    if not first.empty:
        w.table(
            "first_step_alignment",
            "First SGD step vs full fine-tuning's on the same batch (mean over adapted matrices)",
            first,
            paper=pd.DataFrame(
                {
                    "claim": [
                        "LoRA-GA's init makes the first step the best rank-2r approximation of "
                        "full fine-tuning's (error = Eckart-Young optimum); LoRA's (B=0) is not"
                    ]
                }
            ),
            paper_setup="LoRA-GA §3 (Wang et al. 2024), qualitative",
        )

    variants = variant_table(frame)
    if not variants.empty:
        liera, source = reference(results, "liera_main")
        w.table(
            "liera_vs_lora",
            "LoRA vs LoRA-GA vs LieRA: test accuracy (%) and trainable parameters",
            variants,
            paper=liera,
            paper_setup=source,
        )
    by_lr = lr_table(frame[frame.variant.isin(["lora", "lierra"]) & (frame["rank"] == 8)], targets="qv")
    if by_lr.shape[1] > 1:
        w.table("liera_vs_lora_lr", "LoRA vs LieRA at r=8 across learning rates, test accuracy (%)", by_lr)
    digits = load_runs(results, status="completed", experiment="digits_transfer")
    if not digits.empty:
        w.table(
            "liera_vs_lora_digits",
            "Conv adapters: digits 0-4 -> 5-9 transfer, test accuracy (%) by rank and learning rate",
            lr_table(digits),
            note="ConvNeXt-V2 (2 stages, 103k params) pretrained on digits 0-4, 120 steps on 200 images of 5-9",
        )

    spectra = spectrum_table(frame)
    if not spectra.empty:
        w.table(
            "dw_spectra",
            "ΔW effective ranks (mean over adapted matrices)",
            spectra,
            paper=pd.DataFrame({"claim": ["LoRA: rank(ΔW) <= r", "LieRA: ΔW = W0 ⊙ sBA is full-rank in general"]}),
            paper_setup="LoRA §4.1; LieRA §3 (qualitative)",
        )
        fig, ax = plt.subplots(figsize=(6, 4))
        base = at_default_lr(frame)
        for _, run in base[(base["rank"] == 8) & (base.seed == 0) & (base.targets == "qv")].iterrows():
            spec = pd.DataFrame(run.record["analysis"]["spectrum"])
            mid = paper_layer(list(spec.name))
            row = spec[(spec.name.map(layer_of) == mid) & (spec.name.map(matrix_of) == "query")].iloc[0]
            sv = np.array(row.singular_values)
            ax.semilogy(np.arange(1, len(sv) + 1), sv / sv[0], marker=".", label=run.variant)
        ax.axvline(8, color="grey", ls="--", lw=0.8)
        ax.set(xlabel="index i", ylabel="σ_i / σ_1", title="ΔW_q singular values, r=8, middle layer")
        ax.legend()
        w.figure("dw_spectra", fig, "Spectrum of ΔW_q: LoRA and LoRA-GA stop at rank r (2r), LieRA does not")

    w.finish(f"loralab figures — experiment {experiment}")
    return w.out / "index.md"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results")
    parser.add_argument("--experiment", default="cpu_repro")
    parser.add_argument("--out", default="figures")
    args = parser.parse_args(argv)
    print(f"[loralab.figures] wrote {render(args.results, args.experiment, args.out)}")


if __name__ == "__main__":
    main()
