"""A sweep's cross-run results as one W&B run in the sweep's group (`job_type=analysis`), so the dashboard shows the
φ grids, the amplification factors and the claims beside the runs they compare."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from loralab.reporting import sweep_group, wandb_id
from loralab.trackers import make_tracker


def log_sweep_analysis(config, sweep_dir: Path, runs: pd.DataFrame, subspace_files: list[Path]) -> str | None:
    """Log the φ results of `subspace_files` (tables + heatmaps), LoRA Table 7's amplification factor per run and
    the claims' verdicts over the sweep's completed `runs`; returns the W&B run's directory (None without W&B)."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from loralab.claims import evaluate  # noqa: PLC0415
    from loralab.figures import data, plots  # noqa: PLC0415

    logger = config.logger
    if logger.name != "wandb" or os.environ.get("WANDB_MODE", logger.mode) == "disabled" or runs.empty:
        return None
    tracker = make_tracker(
        logger,
        group=sweep_group(config.experiment_name, sweep_dir),
        name="sweep analysis",
        tags=["analysis"],
        config={"sweep_dir": str(sweep_dir), "runs": list(runs.run_dir)},
        run_id=wandb_id(str(Path(sweep_dir).resolve())),
        job_type="analysis",
        system_metrics=False,
    )
    for path in subspace_files:
        result = json.loads(path.read_text())
        tracker.log_table(f"subspace/{path.stem}", result["summary"])
        fig = plots.subspace_grids(result, "φ(i, j)")
        image = Path(sweep_dir) / f"{path.stem}.png"
        fig.savefig(image, dpi=100, bbox_inches="tight")
        plt.close(fig)
        tracker.log_image(f"subspace/{path.stem}_grid", str(image))
    factors = data.per_run_means(runs, "amplification", ["factor", "proj_dW", "norm_dW"])
    if not factors.empty:
        tracker.log_table("amplification", factors.to_dict("records"))
    verdicts = pd.concat([evaluate(part) for _, part in runs.groupby(data.SETUP)], ignore_index=True)
    tracker.log_table("claims", verdicts.astype(str).to_dict("records"))
    location = tracker.location
    tracker.finish()
    return location
