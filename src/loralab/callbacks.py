"""Hydra callbacks: the results table printed (and saved as CSV) when a multirun ends, then the cross-run analyses."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback

from loralab.analyze import analyze_runs
from loralab.record import read_record
from loralab.results import record_row
from loralab.sweep_report import log_sweep_analysis

COLUMNS = ["model", "task", "variant", "targets", "rank", "seed", "status"]
TRAILING = ["params/trainable", "params/total", "wall_time_s", "memory/peak_rss_mb", "error"]


def _job_number(path: Path) -> int:
    return int(path.parent.name) if path.parent.name.isdigit() else 0


def sweep_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job of a sweep (in job order), from the result files the jobs pointed to; a job refused at
    validation (config_error.txt) is a failed row with its message."""
    rows = []
    for pointer in sorted(Path(sweep_dir).glob("*/result_path.txt"), key=_job_number):
        path = Path(pointer.read_text().strip())
        if record := read_record(path):
            rows.append(record_row(record, path) | {"job": _job_number(pointer)})
    for refused in Path(sweep_dir).glob("*/config_error.txt"):
        rows.append({"job": _job_number(refused), "status": "failed", "error": refused.read_text()})
    frame = pd.DataFrame(rows)
    return frame.sort_values("job").reset_index(drop=True) if not frame.empty else frame


def sweep_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The printed table of a sweep's jobs (`sweep_runs` rows)."""
    if frame.empty:
        return frame
    # every task's validation and test metrics (accuracy, Matthews, pass@1, box AP, ...), not the losses; the settings
    # that vary across the sweep's jobs
    metrics = [c for c in frame.columns if c.startswith(("val/", "test/")) and not c.endswith("loss")]
    varying = [c for c in frame.columns if "." in c and c not in metrics and frame[c].astype(str).nunique() > 1]
    columns = ["job", *COLUMNS, *varying, *metrics, *TRAILING]
    frame = frame.assign(error=frame.error.map(_trim)) if "error" in frame else frame  # its last line, trimmed
    return frame[[c for c in columns if c in frame.columns]]


def seed_table(table: pd.DataFrame) -> pd.DataFrame:
    """The completed jobs' metrics as mean ± std (n) over seeds, one row per setting, where some setting has several
    seeds."""
    from loralab.figures.data import pm  # noqa: PLC0415  (figures import this module)

    done = table[table.status == "completed"] if "status" in table else table
    keys = [c for c in COLUMNS[:5] if c in done] + [c for c in done.columns if "." in c and done[c].notna().all()]
    if done.empty or "seed" not in done or done.groupby(keys).size().max() < 2:
        return pd.DataFrame()
    metrics = [c for c in done.columns if c.startswith(("val/", "test/"))]
    grouped = done.groupby(keys)[metrics]
    stats = grouped.agg(["mean", "std", "count"])
    return pd.DataFrame(
        {m: [pm(r[(m, "mean")], r[(m, "std")], int(r[(m, "count")]), 4) for _, r in stats.iterrows()] for m in metrics},
        index=stats.index,
    )


def _trim(message) -> str:
    return "" if not isinstance(message, str) else message.strip().splitlines()[-1][:100]


class SweepSummary(Callback):
    """Prints the sweep's results table and runs the cross-run analyses on its runs (pairs configurable:
    hydra.callbacks.sweep_summary.rank_pairs=[[8,64]] seed_pairs=[[1,2]] seed_pair_rank=64)."""

    def __init__(self, rank_pairs=((8, 64),), seed_pairs=((1, 2),), seed_pair_rank: int = 64, fail_on_error=False):
        self.fail_on_error = fail_on_error  # a sweep with failed jobs exits non-zero (after its report)
        self.rank_pairs = [tuple(p) for p in rank_pairs]
        self.seed_pairs = [tuple(p) for p in seed_pairs]
        self.seed_pair_rank = seed_pair_rank

    def on_multirun_end(self, config, **kwargs) -> None:
        from loralab.runner import is_main_process  # noqa: PLC0415  (heavy; only when a sweep ends)

        if not is_main_process():  # a sweep run under torchrun / accelerate launch: rank 0 reports
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = sweep_runs(sweep_dir)  # read once: the table, the analyses and the W&B report share it
        table = sweep_table(runs)
        if table.empty:
            print(f"[loralab] sweep {sweep_dir}: no results")
            return
        table.drop(columns=["job"]).to_csv(sweep_dir / "summary.csv", index=False)
        failed = int((table.status == "failed").sum())
        with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 60):
            print(f"\n[loralab] sweep {sweep_dir}: {len(table)} jobs, {failed} failed\n{table.to_string(index=False)}")
        over_seeds = seed_table(table)
        if not over_seeds.empty:
            print(f"\n[loralab] over seeds (mean ± std (n)):\n{over_seeds.to_string()}")
        if "record" in runs:  # cross-run analyses (φ grids between ranks / seeds) of the runs this sweep holds
            root, completed = Path(config.paths.results_dir), runs[runs.status == "completed"]
            pairs = analyze_runs(root, completed, self.rank_pairs, self.seed_pairs, self.seed_pair_rank)
            if location := log_sweep_analysis(config, sweep_dir, completed.reset_index(drop=True), pairs):
                print(f"[loralab] sweep analysis W&B run: {location}")
        if failed and self.fail_on_error:
            raise SystemExit(f"[loralab] sweep {sweep_dir}: {failed} of {len(table)} jobs failed")
