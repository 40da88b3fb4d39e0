"""Reading results into pandas (`load_runs`), and what a job measures about itself (provenance, peak memory).
The record type and the run identity are in `loralab.record`."""

from __future__ import annotations

import platform
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import pandas as pd
import psutil
import torch

from loralab.record import RunRecord, find_records

BASES_FILE = "analysis_bases.safetensors"  # per-run subspace bases for the cross-run φ grids (not committed)
PACKAGES = (
    "loralab",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "hydra-core",
    "omegaconf",
    "wandb",
    "datasets",
    "numpy",
    "scikit-learn",
    "safetensors",
)


def _git(*args: str) -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "packages": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({psutil.cpu_count()} cores)",
        "command": sys.argv,
    }


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on GPU; on CPU the process's peak RSS, sampled every 20 ms
    (ru_maxrss would carry the peak of earlier jobs of a sweep that runs in the same process)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.proc = interval, psutil.Process()

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.peak_rss, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while True:
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        out = {"peak_rss_mb": round(self.peak_rss / 2**20, 1)}
        if self.cuda:
            out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


def record_row(record: RunRecord, path: str | Path | None = None) -> dict:
    """One table row: the identity as columns (readable parts, key, each hyperparameter under its dotted name), the
    effective learning rate, status, metrics, parameter counts, memory; the record itself in `record`."""
    row = record.identity.columns() | {
        "lr": record.config.get("train", {}).get("lr"),
        "status": record.status.value,
        "wall_time_s": record.wall_time_s,
        "run_dir": record.run_dir,
    }
    row.update(record.metrics)
    row.update({f"params/{k}": v for k, v in record.params.items()})
    row.update({f"memory/{k}": v for k, v in record.memory.items()})
    row["error"] = (record.error or {}).get("message")
    row["record"] = record
    if path is not None:
        row["path"] = str(path)
    return row


def load_runs(root: str | Path = "results", status: str | None = None, **filters) -> pd.DataFrame:
    """Every result file under `root` as one row (see `record_row`); older schemas are migrated as they are read.

    `filters` select on columns, e.g. ``load_runs(variant="lora", rank=[8, 64])`` or ``**{"train.lr": 1e-3}``."""
    frame = pd.DataFrame([record_row(r, p) for p, r in find_records(root)])
    if frame.empty:
        return frame
    if status is not None:
        frame = frame[frame.status == str(getattr(status, "value", status))]
    for key, value in filters.items():
        if key not in frame:
            return frame.iloc[0:0]
        frame = frame[frame[key].isin(value if isinstance(value, (list, tuple, set)) else [value])]
    return frame.reset_index(drop=True)
