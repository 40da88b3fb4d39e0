"""Selecting and aggregating runs for the figures, tables, claims and notebooks — by identity and config only.

Every table adapts to what the selected runs vary in: seeds are aggregated (mean, std, n), a hyperparameter
setting is chosen per variant (the one most runs share, or the best by validation when comparing variants), and
variants, ranks and target sets become rows / columns where they vary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from loralab.callbacks import sweep_runs
from loralab.results import load_runs

DISPLAY = {
    "lora": "LoRA",
    "loraga": "LoRA-GA",
    "loraga_peft": "LoRA-GA (PEFT)",
    "lierra": "LieRA",
    "liera": "LieRA",
    "full": "Full FT",
    "pissa": "PiSSA",
    "dora": "DoRA",
    "rslora": "rsLoRA",
    "lora_plus": "LoRA+",
    "adalora": "AdaLoRA",
    "adalora_static": "AdaLoRA (static ranks)",
    "pissa_lierra": "PiSSA+LieRA",
    "dora_lierra": "DoRA+LieRA",
}
TARGET_SETS = {"q": "Wq", "qv": "Wq,Wv", "qkvo": "Wq,Wk,Wv,Wo"}
SETUP = ["experiment", "model", "task"]  # one figure set per (model, task) of an experiment
REFERENCE = Path(__file__).resolve().parents[3] / "results" / "reference"


def display(variant: str) -> str:
    return DISPLAY.get(variant, variant)


def runs_frame(results: str | Path, experiment: str | None = None) -> pd.DataFrame:
    """Completed runs under a results root — or of a Hydra sweep directory (its jobs' result pointers)."""
    results = Path(results)
    if any(results.glob("*/result_path.txt")):
        frame = sweep_runs(results)
        frame = frame[frame.status == "completed"] if not frame.empty else frame
    else:
        frame = load_runs(results, status="completed")
    if not frame.empty and experiment is not None:
        frame = frame[frame.experiment == experiment]
    return frame.reset_index(drop=True)


def results_root(row) -> Path:
    """The results root a run's record paths are relative to (from where its result file was read)."""
    path = Path(row["path"]).parent
    return Path(str(path)[: -len(row["run_dir"])]) if str(path).endswith(row["run_dir"]) else path


def main_metric(frame: pd.DataFrame, split: str = "test") -> str | None:
    """The task's headline metric: accuracy where there is one, else the first non-loss metric of `split`."""
    columns = [c for c in frame.columns if c.startswith(f"{split}/") and not c.endswith("loss")]
    columns = [c for c in columns if frame[c].notna().any()]
    preferred = [c for c in columns if c.endswith("/accuracy")]
    return (preferred or columns or [None])[0]


def common_setting(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (experiment, model, task, variant, targets): the runs of the hyperparameter setting (`key`) that most runs
    share — the sweep's main setting, leaving lr-search side runs out of per-rank tables."""
    if frame.empty:
        return frame
    counts = frame.groupby([*SETUP, "variant", "targets", "key"]).size().rename("n").reset_index()
    counts = counts.sort_values("n", ascending=False).drop_duplicates([*SETUP, "variant", "targets"])
    return frame.merge(counts[[*SETUP, "variant", "targets", "key"]], on=[*SETUP, "variant", "targets", "key"])


def best_setting(frame: pd.DataFrame, by=("variant", "targets", "rank")) -> pd.DataFrame:
    """Per group `by`: the runs of the hyperparameter setting with the best mean validation metric over seeds
    (test metric where a task has no validation split). Column `lr` says which learning rate that is.

    Only the settings run with the most seeds compete: an lr search on one seed picks the setting that is then run
    with more seeds, and a lucky single-seed search point must not displace it."""
    if frame.empty:
        return frame
    metric = main_metric(frame, "val") or main_metric(frame, "test")
    keys = [*SETUP, *by]
    means = frame.groupby([*keys, "key"])[metric].agg(score="mean", seeds="count").reset_index()
    best = means.sort_values(["seeds", "score"], ascending=False).drop_duplicates(keys)
    return frame.merge(best[[*keys, "key"]], on=[*keys, "key"])


def main_targets(frame: pd.DataFrame) -> str | None:
    """The target set most runs use (Wq,Wv in the LoRA paper's experiments)."""
    return None if frame.empty else frame.targets.value_counts().index[0]


def aggregate(frame: pd.DataFrame, by: list[str], value: str, scale: float = 1.0) -> pd.DataFrame:
    """mean, std (ddof 1; NaN for one seed) and n of `value` × `scale` over the runs of each group."""
    stats = frame.groupby(by)[value].agg(["mean", "std", "count"]).rename(columns={"count": "n"})
    stats[["mean", "std"]] = stats[["mean", "std"]] * scale
    return stats.reset_index()


def best_epoch_stats(frame: pd.DataFrame, metric: str, scale: float = 100.0) -> pd.DataFrame:
    """Per variant × targets × rank at the main setting: the final `metric` (test/<m>) and the best evaluation's
    (test_best/<m>, recorded with `train.eval_test`) over the runs that have both: mean, std, median, n (× `scale`).
    Empty when no run recorded a best value."""
    best = "test_best/" + metric.split("/", 1)[1]
    if best not in frame or frame[best].isna().all():
        return pd.DataFrame()
    base = common_setting(frame)
    base = base[base[best].notna() & base[metric].notna()]
    stats = base.groupby(["variant", "targets", "rank"]).agg(
        n=(metric, "size"),
        final_mean=(metric, "mean"),
        final_std=(metric, "std"),
        final_median=(metric, "median"),
        best_mean=(best, "mean"),
        best_std=(best, "std"),
        best_median=(best, "median"),
    )
    values = [c for c in stats.columns if c != "n"]
    stats[values] = stats[values] * scale
    return stats.reset_index()


def pm(mean: float, std: float, n: int, digits: int = 1) -> str:
    """'86.5 ± 0.4 (n=3)'; one seed has no spread: '86.5 (n=1)'."""
    if pd.isna(mean):
        return "--"
    spread = f" ± {std:.{digits}f}" if n > 1 and not pd.isna(std) else ""
    return f"{mean:.{digits}f}{spread} (n={n})"


def pm_table(stats: pd.DataFrame, index: str | list[str], columns: str, digits: int = 1) -> pd.DataFrame:
    """Pivot of `aggregate` output as 'mean ± std (n)' strings."""
    cells = stats.assign(cell=[pm(m, s, n, digits) for m, s, n in zip(stats["mean"], stats["std"], stats["n"])])
    return cells.pivot(index=index, columns=columns, values="cell").fillna("--")


def analysis_rows(frame: pd.DataFrame, analysis: str) -> pd.DataFrame:
    """The per-run analysis table `analysis` of every run in `frame`, stacked, with the runs' identity columns."""
    parts = []
    for _, run in frame.iterrows():
        rows = run.record.analysis.get(analysis) or []
        if rows:
            part = pd.DataFrame(rows)
            for column in (*SETUP, "variant", "targets", "rank", "seed", "key", "lr"):
                part[column] = run[column]
            parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def per_run_means(frame: pd.DataFrame, analysis: str, columns: list[str]) -> pd.DataFrame:
    """Per run: the mean over its adapted matrices of `columns` of a per-run analysis table."""
    rows = analysis_rows(frame, analysis)
    if rows.empty:
        return rows
    keys = [*SETUP, "variant", "targets", "rank", "seed", "key", "lr"]
    return rows.groupby(keys)[columns].mean().reset_index()


def layer_of(name: str) -> str | None:
    """The block a matrix belongs to: every index in its name ("3" in encoder.layer.3.attention.self.query,
    "1.0" in encoder.stages.1.layers.0.pwconv1 — a stage alone would merge its blocks)."""
    digits = [p for p in name.split(".") if p.isdigit()]
    return ".".join(digits) if digits else None


def matrix_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def paper_layer(names) -> str | None:
    """The LoRA paper reads GPT-3's layer 48 of 96: the middle block; here the middle of this model's blocks."""
    blocks = sorted({b for n in names if (b := layer_of(n)) is not None}, key=lambda b: tuple(map(int, b.split("."))))
    return blocks[len(blocks) // 2] if blocks else None


def subspace_results(frame: pd.DataFrame) -> list[dict]:
    """The cross-run φ results (loralab.analyze) whose two runs are both in `frame`."""
    if frame.empty:
        return []
    selected, out = set(frame.run_dir), []
    roots = {results_root(row) for _, row in frame.iterrows()}
    for root in roots:
        for experiment in frame.experiment.unique():
            for path in sorted((root / experiment / "analysis").glob("subspace-*.json")):
                result = json.loads(path.read_text())
                if result["a"]["run_dir"] in selected and result["b"]["run_dir"] in selected:
                    out.append(result)
    return out


def phi(result: dict, layer: str, basis: str = "A_right") -> tuple[np.ndarray, np.ndarray]:
    entry = result["layers"][layer][basis]
    return np.array(entry["phi"]), np.array(result["random"][entry["random"]])


def mean_phi(result: dict, matrix: str, basis: str = "A_right") -> np.ndarray:
    return np.mean([phi(result, n, basis)[0] for n in result["layers"] if matrix_of(n) == matrix], axis=0)


def reference(results: str | Path, name: str) -> tuple[pd.DataFrame, str] | tuple[None, str]:
    """A paper's printed numbers (`<results>/reference/<name>.csv`, else the repository's), and its source line."""
    for folder in (Path(results) / "reference", REFERENCE):
        path = folder / f"{name}.csv"
        if path.exists():
            return pd.read_csv(path, comment="#"), path.read_text().splitlines()[0].lstrip("# ")
    return None, ""


def loss_curves(frame: pd.DataFrame, steps: int | None = None) -> dict[tuple, np.ndarray]:
    """Training loss per step, (variant, rank, lr) -> array seeds × steps (runs cut to the shortest)."""
    curves: dict[tuple, list] = {}
    for _, run in frame.iterrows():
        values = [v for _, v in run.record.curves.get("train/loss", [])]
        if values:
            curves.setdefault((run.variant, run["rank"], run.lr), []).append(values[:steps] if steps else values)
    return {k: np.array([c[: min(map(len, v))] for c in v]) for k, v in sorted(curves.items())}


# --- training length: the analyses at `analysis_steps` and at each run's last step ---------------------------------
def analysis_rows_by_step(frame: pd.DataFrame, analysis: str) -> pd.DataFrame:
    """Like :func:`analysis_rows`, at every step a run analysed (its `analysis_steps` and its last step), with a
    `step` column; empty when no run of `frame` has step analyses."""
    parts = []
    for _, run in frame.iterrows():
        record = run.record
        if not record.analysis_by_step:
            continue
        for step, tables in [
            *((e["step"], e["analysis"]) for e in record.analysis_by_step),
            (record.steps, record.analysis),
        ]:
            if tables.get(analysis):
                part = pd.DataFrame(tables[analysis]).assign(step=step)
                for column in (*SETUP, "variant", "targets", "rank", "seed", "key", "lr"):
                    part[column] = run[column]
                parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def phi_by_step(frame: pd.DataFrame) -> pd.DataFrame:
    """φ summaries of the rank pairs (loralab.analyze `by_step`, and the final one at the runs' last step): one row per
    (variant, ranks, seed, step, basis) with φ(1,1) and its random baseline, each a mean over the adapted matrices."""
    steps = dict(zip(frame.run_dir, frame.record.map(lambda r: r.steps)))
    rows = []
    for result in subspace_results(frame):
        if result["kind"] != "rank" or not result.get("by_step"):
            continue
        final = {"step": steps[result["a"]["run_dir"]], "summary": result["summary"]}
        for entry in [*result["by_step"], final]:
            summary = pd.DataFrame(entry["summary"]).groupby("basis")[["phi_11", "random_11"]].mean()
            for basis, s in summary.iterrows():
                rows.append(
                    {
                        "variant": result["variant"],
                        "targets": result["targets"],
                        "ranks": (result["a"]["rank"], result["b"]["rank"]),
                        "seed": result["a"]["seed"],
                        "step": entry["step"],
                        "basis": basis,
                        **s.to_dict(),
                    }
                )
    return pd.DataFrame(rows)
