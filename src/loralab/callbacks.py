"""Hydra callbacks: the results table printed (and saved as CSV) when a multirun ends."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback

from loralab.analyze import analyze_runs
from loralab.results import flatten_record, read_result, run_tag

COLUMNS = [
    "model",
    "task",
    "variant",
    "rank",
    "seed",
    "status",
    "params/trainable",
    "params/total",
    "wall_time_s",
    "memory/peak_rss_mb",
    "error",
]


def sweep_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job of a sweep (in job order), read from the result files the jobs pointed to."""
    pointers = sorted(
        Path(sweep_dir).glob("*/result_path.txt"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
    )
    return pd.DataFrame([flatten_record(r) for p in pointers if (r := read_result(Path(p.read_text().strip())))])


def sweep_table(sweep_dir: str | Path) -> pd.DataFrame:
    frame = sweep_runs(sweep_dir)
    if not frame.empty:
        frame["other overrides"] = [run_tag(r) for r in frame.run_dir]
    if frame.empty:
        return frame
    # every task's test metrics (accuracy, Matthews, pass@1, box AP, ...), not the losses
    metrics = [c for c in frame.columns if c.startswith("test/") and not c.endswith("loss")]
    columns = [*COLUMNS[:6], *metrics, *COLUMNS[6:], "other overrides"]
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
        table.to_csv(sweep_dir / "summary.csv", index=False)
        failed = int((table.status == "failed").sum())
        with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 60):
            print(f"\n[loralab] sweep {sweep_dir}: {len(table)} jobs, {failed} failed\n{table.to_string(index=False)}")
        # cross-run analyses (φ grids between ranks / seeds) of the runs this sweep holds
        runs = sweep_runs(sweep_dir)
        analyze_runs(runs[runs.status == "completed"], self.rank_pairs, self.seed_pairs, self.seed_pair_rank)
