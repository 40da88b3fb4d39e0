"""The VTAB-1k protocol's two read-outs, from the run records on disk (experiments/liera_vtab/README.md):

1. learning-rate selection (VPT): among the search runs (trained on `train800`, scored on `val200`), each
   variant × task × rank keeps the lr with the best `val/accuracy` (ties: the smaller lr);
2. the table: the final runs (`train800val200` → `test`), each at its chosen lr, averaged over the tasks —
   the last-epoch test accuracy (the headline) and NOAH's best-of-evaluations beside it, labelled.

    python experiments/liera_vtab/vtab_report.py results        # chosen lrs, the final commands, the table
"""

from __future__ import annotations

import math
import sys

import pandas as pd

from loralab.results import load_runs

SEARCH_SPLIT, FINAL_SPLIT = "train800", "train800val200"
GROUP = ["variant", "task", "rank"]


def train_split(runs: pd.DataFrame) -> pd.Series:
    return runs["record"].map(lambda r: r.config["task"]["train_split"])


def chosen_lrs(runs: pd.DataFrame, objective: str = "val/accuracy") -> pd.DataFrame:
    """One row per variant × task × rank: the lr of the search run with the best objective (ties: smaller lr)."""
    search = runs[(train_split(runs) == SEARCH_SPLIT) & runs[objective].notna()]
    ordered = search.sort_values([*GROUP, objective, "lr"], ascending=[True, True, True, False, True])
    best = ordered.groupby(GROUP, as_index=False).first()
    tried = search.groupby(GROUP)["lr"].apply(lambda s: sorted(set(s))).rename("lrs_tried")
    return best[[*GROUP, "lr", objective]].merge(tried.reset_index(), on=GROUP)


def final_commands(chosen: pd.DataFrame, data_dir: str = "$VTAB_DIR") -> list[str]:
    """The train800val200 runs at the chosen lrs, one command per variant × task × rank."""
    return [
        f"python run.py experiment=liera_vtab task.data_dir={data_dir} variant={row.variant} task={row.task} "
        f"rank={row.rank} train.lr={row.lr:g}"
        for row in chosen.itertuples()
    ]


def best_of_evaluations(record, metric: str = "accuracy") -> float:
    """NOAH's number: the best test accuracy over the evaluations during training and the final one. NaN when the run
    recorded no test-set evaluation during training (the loop evaluates the val split periodically; NOAH scores the
    test set every few epochs), so a table never passes the last epoch off as the best."""
    curve = record.curves.get(f"test/{metric}", [])
    if not curve:
        return math.nan
    return max([value for _, value in curve] + [record.metrics[f"test/{metric}"]])


def vtab_table(runs: pd.DataFrame, chosen: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per variant × rank: mean over tasks of the last-epoch test accuracy (headline) and of NOAH's best-of; only the
    final runs at their chosen lr when `chosen` is given."""
    final = runs[train_split(runs) == FINAL_SPLIT].copy()
    if chosen is not None:
        final = final.merge(chosen[[*GROUP, "lr"]], on=[*GROUP, "lr"])
    final["best_of_evaluations"] = final["record"].map(best_of_evaluations)
    table = final.groupby(["variant", "rank"]).agg(
        tasks=("task", "nunique"),
        last_epoch=("test/accuracy", "mean"),
        best_of_evaluations_noah=("best_of_evaluations", "mean"),
    )
    return table.reset_index()


if __name__ == "__main__":
    runs = load_runs(sys.argv[1] if len(sys.argv) > 1 else "results", experiment="liera_vtab", status="completed")
    if runs.empty:
        raise SystemExit("no completed liera_vtab runs")
    chosen = chosen_lrs(runs)
    print(chosen.to_markdown(index=False), "\n")
    print("\n".join(final_commands(chosen)), "\n")
    print(vtab_table(runs, chosen).to_markdown(index=False))
