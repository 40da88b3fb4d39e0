"""The sections of a figure set: each turns the selected runs into one paper item (a table and / or a plot) and
writes it, or writes nothing when the runs it needs are absent."""

from __future__ import annotations

import pandas as pd

from loralab.figures import data, plots
from loralab.figures.data import TARGET_SETS, aggregate, display, pm_table
from loralab.figures.output import Writer


def _close(fig):
    import matplotlib.pyplot as plt  # noqa: PLC0415

    plt.close(fig)


def _figure(w: Writer, name: str, fig, caption: str):
    w.figure(name, fig, caption)
    _close(fig)


def describe(frame: pd.DataFrame) -> str:
    """The setup of the selected runs in one line (what 'Ours' means under each table)."""
    run = frame.iloc[0]
    steps = sorted({int(s) for s in frame.record.map(lambda r: r.steps or 0)})
    return (
        f"{run.model} on {run.task}, variants {', '.join(sorted(map(display, frame.variant.unique())))}, "
        f"ranks {sorted(frame['rank'].unique().tolist())}, seeds {sorted(frame.seed.unique().tolist())}, "
        f"{'/'.join(map(str, steps))} steps"
    )


def rank_section(w: Writer, frame: pd.DataFrame, metric: str, results):
    """LoRA Table 6: the metric by adapted weight set × rank (LoRA), and every variant's metric vs rank."""
    base = data.common_setting(frame)
    lora = base[base.variant == "lora"]
    if lora["rank"].nunique() > 1:
        stats = aggregate(lora, ["targets", "rank"], metric, 100)
        table = pm_table(stats, "targets", "rank")
        table.index = [TARGET_SETS.get(t, t) for t in table.index]
        paper, source = data.reference(results, "lora_table6_rank")
        paper = paper[paper.dataset == "MultiNLI"] if paper is not None else None
        w.table(
            "table6_rank",
            f"Table 6: LoRA {metric} (%) vs rank and adapted weights",
            table,
            paper=paper,
            paper_setup=source,
        )
        _figure(
            w,
            "table6_rank",
            plots.metric_vs_rank(stats, "targets", f"{metric} (%)", "LoRA: rank ablation"),
            "LoRA: metric vs rank per adapted weight set (error bars: std over seeds)",
        )
    targets = data.main_targets(base)
    multi = base[(base.targets == targets) & (base.variant != "full")]
    if multi["rank"].nunique() > 1:
        stats = aggregate(multi, ["variant", "rank"], metric, 100)
        _figure(
            w,
            "metric_vs_rank",
            plots.metric_vs_rank(
                stats, "variant", f"{metric} (%)", f"{metric} vs rank, {TARGET_SETS.get(targets, targets)}"
            ),
            "Each variant's metric vs rank at its main setting (error bars: std over seeds)",
        )


MEDIAN_SEEDS = 5  # the LoRA paper's RoBERTa GLUE numbers: the median over 5 seeds, each run at its best epoch


def best_epoch_section(w: Writer, frame: pd.DataFrame, metric: str):
    """The best evaluation (`test_best/*`, e.g. the best epoch) beside the final one, per variant × targets × rank;
    with the median over seeds where a cell has the LoRA paper's 5 seeds. Nothing where no run recorded a best."""
    stats = data.best_epoch_stats(frame, metric)
    if stats.empty:
        return
    name = metric.split("/", 1)[1]
    final, best = f"test/{name} (final)", f"test_best/{name} (best)"
    medians = bool((stats.n >= MEDIAN_SEEDS).any())
    rows = {}
    for s in stats.itertuples():
        row = {final: data.pm(s.final_mean, s.final_std, s.n), best: data.pm(s.best_mean, s.best_std, s.n)}
        if medians:  # fewer seeds than the paper's: no median ("--")
            enough = s.n >= MEDIAN_SEEDS
            row[f"{final} median"] = f"{s.final_median:.1f} (n={s.n})" if enough else "--"
            row[f"{best} median"] = f"{s.best_median:.1f} (n={s.n})" if enough else "--"
        rows[(display(s.variant), TARGET_SETS.get(s.targets, s.targets), f"r={s.rank}")] = row
    table = pd.DataFrame(rows).T
    median = f"; median over seeds where a cell has {MEDIAN_SEEDS} (the LoRA paper's RoBERTa protocol)"
    w.table(
        "best_epoch",
        f"Best evaluation beside the final one: {name} (%), mean ± std over seeds{median if medians else ''}",
        table,
    )


def subspace_section(w: Writer, frame: pd.DataFrame):
    """LoRA Fig. 3 (r vs r', same seed) and Fig. 4 (seed vs seed, same r): φ grids and a summary of every pair."""
    results = data.subspace_results(frame)
    if not results:
        return
    rows = []
    for r in results:
        summary = pd.DataFrame(r["summary"]).groupby("basis")[["phi_11", "phi_mean", "random_11"]].mean()
        for basis, s in summary.iterrows():
            rows.append(
                {
                    "kind": r["kind"],
                    "variant": display(r["variant"]),
                    "targets": r["targets"],
                    "pair": f"r{r['a']['rank']} vs r{r['b']['rank']}"
                    if r["kind"] == "rank"
                    else f"seeds at r{r['a']['rank']}",
                    "basis": basis,
                    **s.to_dict(),
                }
            )
    table = pd.DataFrame(rows)
    table = (
        table.groupby(["kind", "variant", "targets", "pair", "basis"])
        .agg(
            phi_11=("phi_11", "mean"),
            phi_11_std=("phi_11", "std"),
            n=("phi_11", "size"),
            phi_mean=("phi_mean", "mean"),
            random_11=("random_11", "mean"),
        )
        .round(3)
    )
    paper = pd.DataFrame(
        {
            "finding": [
                "top direction shared: φ(1,1) > 0.5 (r=8 vs r=64, A_q and A_v, GPT-3 layer 48)",
                "other directions mostly noise (close to the random baseline)",
            ]
        }
    )
    w.table(
        "subspace_similarity",
        "Fig. 3/4: φ(1,1) and mean φ over layers, every pair (mean over seeds / pairs)",
        table,
        paper=paper,
        paper_setup="LoRA §7.2, Fig. 3/4 (GPT-3 175B, layer 48); qualitative",
    )
    for kind, name, caption in (
        ("rank", "fig3_subspace_ranks", "Fig. 3-style: φ(A_r, A_r', i, j), same seed"),
        ("seed", "fig4_subspace_seeds", "Fig. 4-style: φ(A seed s, A seed s', i, j)"),
    ):
        chosen = [r for r in results if r["kind"] == kind]
        lora = [r for r in chosen if r["variant"] == "lora"] or chosen
        if lora:
            first = sorted(lora, key=lambda r: (r["targets"] != "qv", r["a"]["seed"], -r["b"]["rank"]))[0]
            _figure(w, name, plots.subspace_grids(first, caption), caption)


def amplification_section(w: Writer, frame: pd.DataFrame, results):
    """LoRA Table 7: W_q projected on ΔW_q's top-r subspace vs W's own and a random one, per rank."""
    base = data.common_setting(frame)
    base = base[(base.variant == "lora") & (base.targets == data.main_targets(base))]
    rows = data.analysis_rows(base, "amplification")
    if rows.empty:
        return
    rows = rows[rows.name.map(data.matrix_of) == rows.name.map(data.matrix_of).iloc[0]]  # W_q (the first matrix)
    mid = data.paper_layer(rows.name)
    quantities = ["proj_dW", "proj_W", "proj_random", "norm_dW", "norm_W", "factor"]
    at_mid = rows[rows.name.map(data.layer_of) == mid].groupby(["rank", "seed"])[quantities].mean()
    over_layers = rows.groupby(["rank", "seed"])[quantities].mean()
    table = {}
    for label, part in ((f"layer {mid}", at_mid), ("mean over layers", over_layers)):
        stats = part.groupby("rank").agg(["mean", "std", "count"])
        for rank in stats.index:
            for q in quantities:
                m, s, n = stats.loc[rank, (q, "mean")], stats.loc[rank, (q, "std")], stats.loc[rank, (q, "count")]
                table.setdefault(f"{q} ({label})", {})[f"r={rank}"] = data.pm(m, s, int(n), 3)
    paper, source = data.reference(results, "lora_table7_amplification")
    w.table(
        "table7_amplification",
        "Table 7: ||U^T W_q V^T||_F for U, V from ΔW_q / W_q / random; amplification",
        pd.DataFrame(table).T,
        paper=paper,
        paper_setup=source,
    )


def convergence_section(w: Writer, frame: pd.DataFrame, results):
    """LoRA-GA: training loss over the first steps per variant (full fine-tuning beside), early-loss table, and the
    first-step alignment with full fine-tuning."""
    base = data.common_setting(frame)
    base = base[base.targets == data.main_targets(base)]
    ranks = base[base.variant == "loraga"]["rank"].unique()
    if len(ranks):
        rank = 8 if 8 in ranks else int(sorted(ranks)[len(ranks) // 2])
        chosen = base[(base["rank"] == rank) | (base.variant == "full")]
        full = chosen[chosen.variant == "full"]
        chosen = pd.concat([chosen[chosen.variant != "full"], full[full["rank"] == full["rank"].min()]])
        curves = data.loss_curves(chosen)
        _figure(
            w,
            "loraga_loss_curves",
            plots.loss_curves(curves, f"Training loss, r={rank} (mean over seeds)"),
            "LoRA-GA convergence: training loss per variant, full fine-tuning dashed (shaded: ± std over seeds)",
        )
        early = {}
        for (variant, _, lr), values in curves.items():
            for span, (a, b) in {"steps 1-20": (0, 20), "steps 21-60": (20, 60), "last step": (-1, None)}.items():
                per_seed = values[:, a:b].mean(1) if values.shape[1] > max(a, 0) else []
                if len(per_seed):
                    s = pd.Series(per_seed)
                    early.setdefault(f"{display(variant)} (lr={lr:g})", {})[span] = data.pm(
                        s.mean(), s.std(), len(s), 4
                    )
        paper, source = data.reference(results, "loraga_t5_glue")
        w.table(
            "loraga_early_loss",
            f"LoRA-GA: mean training loss over early steps (r={rank})",
            pd.DataFrame(early).T,
            paper=paper,
            paper_setup=source + " (final accuracies; the convergence claim is the paper's Fig. 1)",
        )
    first = data.per_run_means(base, "first_step", ["cosine", "rel_error_best_scale", "eckart_young_2r"])
    if not first.empty:
        table = {}
        for column in ("cosine", "rel_error_best_scale", "eckart_young_2r"):
            stats = aggregate(first, ["variant", "rank"], column)
            for _, s in stats.iterrows():
                table.setdefault((display(s.variant), f"r={s['rank']}"), {})[column] = data.pm(
                    s["mean"], s["std"], int(s.n), 4
                )
        table = pd.DataFrame(table).T.rename(
            columns={
                "rel_error_best_scale": "rel. error (best scale)",
                "eckart_young_2r": "Eckart-Young optimum (rank 2r)",
            }
        )
        claim = (
            "LoRA-GA's init makes the first step the best rank-2r approximation of full fine-tuning's "
            "(error = Eckart-Young optimum); LoRA's (B=0) is not"
        )
        w.table(
            "first_step_alignment",
            "First SGD step vs full fine-tuning's on the same batch (mean over matrices)",
            table,
            paper=pd.DataFrame({"claim": [claim]}),
            paper_setup="LoRA-GA §3 (Wang et al. 2024), qualitative",
        )


def variants_section(w: Writer, frame: pd.DataFrame, metric: str, results):
    """Every variant × rank at its own best setting (chosen on validation), with the lr that is; the lr search."""
    base = frame[frame.targets == data.main_targets(frame)]
    best = data.best_setting(base)
    stats = aggregate(best, ["variant", "rank"], metric, 100)
    table = pm_table(stats, "variant", "rank")
    table.columns = [f"{metric} r={c}" for c in table.columns]
    lrs = best.groupby(["variant", "rank"]).lr.first().unstack()
    lrs.columns = [f"lr r={c}" for c in lrs.columns]
    params = best.groupby(["variant", "rank"])["params/trainable"].first().unstack()
    params.columns = [f"params r={c}" for c in params.columns]
    lrs, params = (
        lrs.map(lambda x: "--" if pd.isna(x) else f"{x:g}"),
        params.map(lambda x: "--" if pd.isna(x) else int(x)),
    )
    table = pd.concat([table, lrs, params], axis=1)
    table.index = [display(v) for v in table.index]
    paper, source = data.reference(results, "liera_main")
    w.table(
        "variants_best_lr",
        f"Variants at their best lr (by validation): {metric} (%), lr, trainable params",
        table,
        paper=paper,
        paper_setup=source,
    )
    if (base.groupby(["variant", "rank"]).lr.nunique() > 1).any():
        stats = aggregate(base, ["variant", "rank", "lr"], metric, 100)
        stats["column"] = [f"r={r}, lr={lr:g}" for r, lr in zip(stats["rank"], stats.lr)]
        table = pm_table(stats, "variant", "column")
        table.index = [display(v) for v in table.index]
        w.table("lr_search", f"{metric} (%) per variant × (rank, learning rate)", table)


def spectrum_section(w: Writer, frame: pd.DataFrame):
    """ΔW's effective ranks per variant × rank, and the singular values of one matrix (≥ 3r of them)."""
    base = data.common_setting(frame)
    base = base[base.targets == data.main_targets(base)]
    columns = ["stable_rank", "rank_energy", "numerical_rank"]
    means = data.per_run_means(base, "spectrum", columns)
    if means.empty:
        return
    table = {}
    for column in columns:
        for _, s in aggregate(means, ["variant", "rank"], column).iterrows():
            table.setdefault((display(s.variant), f"r={s['rank']}"), {})[column] = data.pm(s["mean"], s["std"], s.n, 1)
    paper = pd.DataFrame({"claim": ["LoRA: rank(ΔW) <= r; LoRA-GA: <= 2r", "LieRA: ΔW = W0 ⊙ sBA is full-rank"]})
    w.table(
        "dw_spectra",
        "ΔW effective ranks (mean over adapted matrices)",
        pd.DataFrame(table).T.rename(columns={"rank_energy": "rank (90% energy)"}),
        paper=paper,
        paper_setup="LoRA §4.1; LieRA §3 (qualitative)",
    )
    rows = data.analysis_rows(base, "spectrum")
    ranks = rows.groupby("rank").variant.nunique()
    widest = ranks[ranks == ranks.max()].index
    rank = 8 if 8 in widest else int(widest.max())  # the papers' comparison rank where all variants ran it
    rows = rows[rows["rank"] == rank]
    first = rows.name.iloc[0]
    mid = data.paper_layer(rows.name)
    rows = rows[(rows.name.map(data.layer_of) == mid) & (rows.name.map(data.matrix_of) == data.matrix_of(first))]
    _figure(
        w,
        "dw_spectra",
        plots.spectra(rows, rank, f"ΔW singular values, {data.matrix_of(first)}, layer {mid}, r={rank}"),
        "Spectrum of ΔW: LoRA stops at r, LoRA-GA at 2r, LieRA and full fine-tuning do not",
    )


def training_length_section(w: Writer, frame: pd.DataFrame):
    """How the LoRA paper's findings depend on training length, from the analyses at `analysis_steps` of the same runs:
    φ(1,1) between ranks (A, B, ΔW), the amplification factor per rank and ‖ΔW‖_F/‖W‖_F per variant, step by step."""
    base = data.common_setting(frame)
    base = base[base.targets == data.main_targets(base)]
    amp = data.analysis_rows_by_step(base, "amplification")
    if amp.empty:
        return
    per_run = (
        amp.assign(relative=amp.norm_dW / amp.norm_W)
        .groupby(["variant", "rank", "seed", "step"])[["factor", "relative"]]
        .mean()
        .reset_index()
    )
    phi = data.phi_by_step(base)
    columns, series = {}, []  # table cells {column: {step: text}}; plot lines (panel, label, stats)

    def add(panel: str, label: str, values: pd.DataFrame, column: str, digits: int):
        stats = values.groupby("step")[column].agg(["mean", "std", "count"])
        columns[f"{panel}: {label}"] = {
            s: data.pm(r["mean"], r["std"], int(r["count"]), digits) for s, r in stats.iterrows()
        }
        series.append((panel, label, stats))

    if not phi.empty:
        for (variant, ranks, basis), part in phi.groupby(["variant", "ranks", "basis"]):
            add("φ(1,1)", f"{display(variant)} {basis} r={ranks[0]} vs {ranks[1]}", part, "phi_11", 3)
        # the random pair's φ(1,1) depends only on the shapes: one variant's pairs of one basis give it
        first = phi[(phi.variant == phi.variant.iloc[0]) & (phi.ranks == phi.ranks.iloc[0])]
        add("φ(1,1)", "random", first[first.basis == first.basis.iloc[0]], "random_11", 3)
    lora = per_run[per_run.variant == "lora"]
    for rank, part in lora.groupby("rank"):
        add("amplification", f"LoRA r={rank}", part, "factor", 2)
    for (variant, rank), part in per_run.groupby(["variant", "rank"]):
        label = display(variant) if variant == "full" else f"{display(variant)} r={rank}"
        add("‖ΔW‖/‖W‖", label, part, "relative", 4)
    table = pd.DataFrame(columns).rename_axis("step")
    w.table(
        "training_length",
        "Training length: φ(1,1) between ranks, amplification and ‖ΔW‖_F/‖W‖_F at each analysed step "
        "(mean over adapted matrices; mean ± std over seeds)",
        table,
        paper=pd.DataFrame(
            {"finding": ["φ(1,1) > 0.5 between r=8 and r=64 (A_q, A_v)", "amplification 21.5 at r=4, 1.9 at r=64"]}
        ),
        paper_setup="LoRA §7.2 Fig. 3, §7.3 Table 7 (GPT-3 175B, trained to convergence); no paper reports steps",
    )
    _figure(
        w,
        "training_length",
        plots.by_step(series, "Findings vs training length"),
        "The LoRA paper's quantities at each analysed step of the same runs (error bars: std over seeds)",
    )
