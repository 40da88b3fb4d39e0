"""The papers' findings that the harness reproduces, each written once as a checkable statement over results.

`evaluate(frame)` gives every claim, for the selected runs, its value, the number of seeds it rests on, a 95%
t-interval over seeds (or over seed pairs for paired claims, with a two-sided sign test), and a verdict:
reproduced / not reproduced / inconclusive (too few seeds, an interval that straddles the threshold, or the runs
it needs are missing — named). A claim is judged only on seeds that have every run it needs.

Each claim uses a statistic that is meaningful for the variant it is about: LoRA-GA's A starts as r orthonormal rows
times one factor (r equal singular values), so its "top" direction is arbitrary and φ(1,1) between ranks says
nothing; its claim compares the whole subspaces, φ(r_low, r_high). (Its B at different ranks spans disjoint singular
directions of G by construction, U[:, r:2r], so φ ≈ 0 there is expected and not claimed.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from loralab.figures import data

MIN_SEEDS = 3


@dataclass
class Claim:
    id: str
    paper: str
    statement: str
    measure: Callable[[pd.DataFrame], tuple[pd.Series, float, str] | str]  # -> (per-seed values, threshold, note)


def _ranks(frame: pd.DataFrame, variant: str, prefer=(8, 64)) -> tuple[int, int] | None:
    ranks = sorted(frame[frame.variant == variant]["rank"].unique())
    if set(prefer) <= set(ranks):
        return prefer
    return (int(ranks[0]), int(ranks[-1])) if len(ranks) > 1 else None


def _phi_values(frame, variant: str, basis: str, whole_subspace: bool):
    base = data.common_setting(frame)
    pair = _ranks(base, variant)
    if pair is None:
        return f"needs {data.display(variant)} runs at two ranks (r=8 and r=64), same seed"
    results = [
        r
        for r in data.subspace_results(base)
        if r["kind"] == "rank" and r["variant"] == variant and (r["a"]["rank"], r["b"]["rank"]) == pair
    ]
    if not results:
        return f"needs the φ analysis of {data.display(variant)} r={pair[0]} vs r={pair[1]} (python -m loralab.analyze)"
    values, randoms = {}, []
    for r in results:
        grids = [data.phi(r, layer, basis) for layer, kinds in r["layers"].items() if basis in kinds]
        i, j = (pair[0], pair[1]) if whole_subspace else (1, 1)
        values[r["a"]["seed"]] = np.mean([g[min(i, g.shape[0]) - 1, min(j, g.shape[1]) - 1] for g, _ in grids])
        randoms += [rand[min(i, rand.shape[0]) - 1, min(j, rand.shape[1]) - 1] for _, rand in grids]
    stat = f"φ({pair[0]},{pair[1]})" if whole_subspace else "φ(1,1)"
    return pd.Series(values), 0.5, f"{stat} of {basis}, r={pair[0]} vs r={pair[1]}, random {np.mean(randoms):.3f}"


def _per_seed_metric(frame, variant, analysis, column, rank=None):
    base = data.common_setting(frame)
    base = base[(base.variant == variant) & (base.targets == data.main_targets(base))]
    if rank is not None:
        base = base[base["rank"] == rank]
    means = data.per_run_means(base, analysis, [column])
    return means.groupby(["rank", "seed"])[column].mean() if not means.empty else pd.Series(dtype=float)


def amplification_low_vs_high(frame):
    pair = _ranks(data.common_setting(frame), "lora", prefer=(4, 64))
    if pair is None:
        return "needs LoRA runs at two ranks (r=4 and r=64)"
    values = _per_seed_metric(frame, "lora", "amplification", "factor")
    low, high = values.xs(pair[0], level="rank"), values.xs(pair[1], level="rank")
    diff = (low - high).dropna()
    return diff, 0.0, f"amplification r={pair[0]} minus r={pair[1]} (mean over W_q, W_v of every layer)"


def amplification_above_one(frame):
    pair = _ranks(data.common_setting(frame), "lora", prefer=(4, 64))
    if pair is None:
        return "needs LoRA runs at a low rank (r=4)"
    values = _per_seed_metric(frame, "lora", "amplification", "factor", rank=pair[0])
    return values.droplevel("rank"), 1.0, f"amplification factor at r={pair[0]}"


def _paired(frame, a: str, b: str, pick: Callable[[pd.DataFrame], pd.Series], what: str, best: bool = False):
    """pick(runs) -> per (rank, seed) value; returns a − b on the ranks / seeds both have."""
    base = frame[frame.targets == data.main_targets(frame)]
    base = data.best_setting(base) if best else data.common_setting(base)
    va, vb = pick(base[base.variant == a]), pick(base[base.variant == b])
    if va.empty or vb.empty:
        return f"needs {data.display(a)} and {data.display(b)} runs at the same rank and seed"
    diff = (va - vb).dropna()
    if diff.empty:
        return f"needs {data.display(a)} and {data.display(b)} runs at the same rank and seed"
    rank = _prefer_rank(diff.index.get_level_values("rank"))
    diff = diff.xs(rank, level="rank")
    return diff, 0.0, f"{what}, {data.display(a)} minus {data.display(b)} at r={rank}"


def _prefer_rank(ranks, prefer: int = 8) -> int:
    """The paper's comparison rank r=8 where it was run, else the largest."""
    ranks = set(int(r) for r in ranks)
    return prefer if prefer in ranks else max(ranks)


def _early_loss(runs, k=20):
    if runs.empty:
        return pd.Series(dtype=float)
    values = {
        (r["rank"], r.seed): np.mean([v for _, v in r.record.curves["train/loss"][:k]]) for _, r in runs.iterrows()
    }
    return pd.Series(values, dtype=float).rename_axis(["rank", "seed"])


def _first_cosine(runs):
    means = data.per_run_means(runs, "first_step", ["cosine"])
    return means.set_index(["rank", "seed"]).cosine if not means.empty else pd.Series(dtype=float)


def _metric(runs):
    metric = data.main_metric(runs) if not runs.empty else None
    return runs.set_index(["rank", "seed"])[metric] * 100 if metric else pd.Series(dtype=float)


def liera_numerical_rank(frame):
    base = data.common_setting(frame)
    base = base[(base.variant == "lierra") & (base.targets == data.main_targets(base))]
    rows = data.analysis_rows(base, "spectrum")
    if rows.empty:
        return "needs LieRA runs with the spectrum analysis"
    rank = _prefer_rank(rows["rank"])
    rows = rows[rows["rank"] == rank]
    ratio = rows.numerical_rank / rank
    return ratio.groupby(rows.seed).mean(), 4.0, f"numerical rank of ΔW / r at r={rank} (mean over matrices)"


CLAIMS = [
    Claim(
        "lora-fig3-top-direction",
        "LoRA Fig. 3",
        "The top direction of A is shared between a low and a high rank: φ(1,1) > 0.5, far above random",
        lambda f: _phi_values(f, "lora", "A_right", False),
    ),
    Claim(
        "loraga-subspace",
        "LoRA-GA (φ over whole subspaces)",
        "LoRA-GA's A subspace at the low rank lies in the high-rank one: φ(r_low, r_high) > 0.5",
        lambda f: _phi_values(f, "loraga", "A_right", True),
    ),
    Claim(
        "lora-table7-amplification-rank",
        "LoRA Table 7",
        "Amplification is larger at a low rank than at a high one (21.5 at r=4 vs 1.9 at r=64)",
        amplification_low_vs_high,
    ),
    Claim(
        "lora-table7-amplification",
        "LoRA Table 7",
        "ΔW amplifies directions of W: factor > 1 at a low rank",
        amplification_above_one,
    ),
    Claim(
        "loraga-early-loss",
        "LoRA-GA Fig. 1",
        "LoRA-GA has a lower mean training loss than LoRA over the first 20 steps",
        lambda f: _paired(f, "lora", "loraga", _early_loss, "mean loss steps 1-20"),
    ),
    Claim(
        "loraga-first-step",
        "LoRA-GA §3",
        "LoRA-GA's first step is closer to full fine-tuning's than LoRA's (higher cosine)",
        lambda f: _paired(f, "loraga", "lora", _first_cosine, "first-step cosine"),
    ),
    Claim(
        "liera-vs-lora",
        "LieRA main tables",
        "LieRA ≥ LoRA at equal rank, each at its best lr (by validation)",
        lambda f: _paired(f, "lierra", "lora", _metric, "test metric (points)", best=True),
    ),
    Claim("liera-full-rank", "LieRA §3", "LieRA's ΔW has numerical rank ≫ r (here: > 4r)", liera_numerical_rank),
]


def verdict(values: pd.Series, threshold: float) -> dict:
    values = values.dropna().astype(float)
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    out = {"value": mean, "n": n, "ci_low": float("nan"), "ci_high": float("nan"), "sign_p": float("nan")}
    if n >= 2:
        sem = float(values.std(ddof=1)) / np.sqrt(n)
        half = float(stats.t.ppf(0.975, n - 1)) * sem
        out["ci_low"], out["ci_high"] = mean - half, mean + half
        above = int((values > threshold).sum())
        out["sign_p"] = float(stats.binomtest(above, n, 0.5).pvalue)
    if n < MIN_SEEDS:
        out["verdict"] = f"inconclusive: too few seeds (n={n}, need {MIN_SEEDS})"
    elif out["ci_low"] > threshold:
        out["verdict"] = "reproduced"
    elif out["ci_high"] < threshold:
        out["verdict"] = "not reproduced"
    else:
        out["verdict"] = "inconclusive: the 95% interval contains the threshold"
    return out


def evaluate(frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for claim in CLAIMS:
        row = {"claim": claim.id, "paper": claim.paper, "statement": claim.statement}
        measured = claim.measure(frame)
        if isinstance(measured, str):
            row |= {"n": 0, "verdict": f"inconclusive: runs missing — {measured}"}
        else:
            values, threshold, note = measured
            row |= {"threshold": threshold, "measured": note, **verdict(values, threshold)}
        rows.append(row)
    return pd.DataFrame(rows)


def claims_markdown(table: pd.DataFrame) -> str:
    lines = [
        "# Paper claims with verdicts",
        "",
        "Each claim is judged per experiment on its completed runs: value = "
        f"mean over seeds, 95% t-interval, sign test over seeds; fewer than {MIN_SEEDS} seeds is inconclusive.",
        "",
    ]
    for experiment, part in table.groupby("experiment", sort=False):
        lines += [
            f"## {experiment}",
            "",
            "| claim | paper | statement | measured | value | n | 95% CI | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for _, r in part.iterrows():
            ci = f"[{r.ci_low:.3g}, {r.ci_high:.3g}]" if pd.notna(r.get("ci_low")) else "--"
            value = f"{r.value:.3g} (threshold {r.threshold:g})" if pd.notna(r.get("value")) else "--"
            measured = r.measured if pd.notna(r.get("measured")) else "--"
            lines.append(
                f"| {r.claim} | {r.paper} | {r.statement} | {measured} | {value} | "
                f"{int(r.n)} | {ci} | **{r.verdict}** |"
            )
        lines.append("")
    return "\n".join(lines)
