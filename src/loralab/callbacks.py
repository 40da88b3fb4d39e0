"""Hydra callbacks: the results table printed (and saved as CSV) when a multirun ends, then the cross-run analyses."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback

from loralab.analyze import analyze_runs
from loralab.record import read_record
from loralab.results import record_row

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


def sweep_table(sweep_dir: str | Path) -> pd.DataFrame:
    frame = sweep_runs(sweep_dir)
    if frame.empty:
        return frame
    # every task's validation and test metrics (accuracy, Matthews, pass@1, box AP, ...), not the losses; the settings
    # that vary across the sweep's jobs
    metrics = [c for c in frame.columns if c.startswith(("val/", "test/")) and not c.endswith("loss")]
    varying = [c for c in frame.columns if "." in c and c not in metrics and frame[c].astype(str).nunique() > 1]
    columns = ["job", *COLUMNS, *varying, *metrics, *TRAILING]
    return frame[[c for c in columns if c in frame.columns]]


class SweepSummary(Callback):
    """Prints the sweep's results table and runs the cross-run analyses on its runs (pairs configurable:
    hydra.callbacks.sweep_summary.rank_pairs=[[8,64]] seed_pairs=[[1,2]] seed_pair_rank=64)."""

    def __init__(self, rank_pairs=((8, 64),), seed_pairs=((1, 2),), seed_pair_rank: int = 64):
        self.rank_pairs = [tuple(p) for p in rank_pairs]
        self.seed_pairs = [tuple(p) for p in seed_pairs]
        self.seed_pair_rank = seed_pair_rank

    def on_multirun_end(self, config, **kwargs) -> None:
        from loralab.runner import is_main_process  # noqa: PLC0415  (heavy; only when a sweep ends)

        if not is_main_process():  # a sweep run under torchrun / accelerate launch: rank 0 reports
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        table = sweep_table(sweep_dir)
        if table.empty:
            print(f"[loralab] sweep {sweep_dir}: no results")
            return
        table.drop(columns=["job"]).to_csv(sweep_dir / "summary.csv", index=False)
        failed = int((table.status == "failed").sum())
        with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 60):
            print(f"\n[loralab] sweep {sweep_dir}: {len(table)} jobs, {failed} failed\n{table.to_string(index=False)}")
        runs = sweep_runs(sweep_dir)
        if "record" in runs:  # cross-run analyses (φ grids between ranks / seeds) of the runs this sweep holds
            root = Path(config.paths.results_dir)
            analyze_runs(root, runs[runs.status == "completed"], self.rank_pairs, self.seed_pairs, self.seed_pair_rank)
