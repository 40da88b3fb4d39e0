"""Result records: one JSON per run with full provenance, and `load_runs` to read them into pandas."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import pandas as pd
import psutil
import torch

RESULT_FILE = "result.json"
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
# overrides that choose the path components themselves, or that do not change what a run computes
PATH_KEYS = ("experiment", "experiment_name", "model", "task", "variant", "rank", "seed")
NON_SEMANTIC = (
    "logger",
    "overwrite",
    "save_weights",
    "analyze",  # the analyses fork the RNG: training is the same with or without them
    "paths",
    "task.data_dir",  # where a copy of the data lives, not which data: the result records its fingerprint
    "task.eval_data",
    "train.progress",
    "train.checkpoint_every",  # checkpointing and resuming do not change the run's result (tested)
    "train.keep_checkpoints",
    "train.resume",
    "train.gradient_checkpointing",
    "train.device",
    "train.num_workers",
    "hydra",
)


def override_tag(overrides: list[str], keep_path_keys: bool = False) -> str:
    """The overrides that change what a run computes, sorted, as one path-safe string. Without `keep_path_keys`
    the keys that are path components already (model, variant, rank, ...) are left out too; their sub-keys
    (task.n_train, model.target_modules, ...) always stay."""
    keep = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if any(key == k or key.startswith(k + ".") for k in NON_SEMANTIC):
            continue
        if not keep_path_keys and key in PATH_KEYS:
            continue
        keep.append(item.lstrip("+"))
    return ",".join(sorted(keep)).replace("/", "_")


def run_dir(cfg, overrides: list[str] = ()) -> Path:
    """results/<experiment>/<model>/<task>/<variant>/r<rank>/seed<seed>[/<other overrides>]"""
    path = (
        Path(cfg.paths.results_dir)
        / cfg.experiment_name
        / cfg.model.name
        / cfg.task.name
        / cfg.variant.name
        / f"r{cfg.rank}"
        / f"seed{cfg.seed}"
    )
    # the effective target set belongs to the run's identity whether a preset or the command line chose it
    chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "targets"]
    tag = override_tag(chosen + ([f"targets={cfg.targets}"] if cfg.get("targets") else []))
    return path / tag if tag else path


def run_tag(run_dir: str | Path) -> str:
    """The `<other overrides>` component of a run directory ('' when there is none)."""
    name = Path(run_dir).name
    return "" if name.startswith("seed") else name


def read_result(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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


def flatten_record(record: dict) -> dict:
    row = {
        k: record.get(k)
        for k in ("experiment", "model", "task", "variant", "rank", "seed", "status", "wall_time_s", "run_dir")
    }
    row.update(record.get("metrics") or {})
    row.update({f"params/{k}": v for k, v in (record.get("params") or {}).items()})
    row.update({f"memory/{k}": v for k, v in (record.get("memory") or {}).items()})
    row["error"] = (record.get("error") or {}).get("message")
    row["record"] = record
    return row


def load_runs(root: str | Path = "results", status: str | None = None, **filters) -> pd.DataFrame:
    """Every result JSON under `root` as one row (metrics, params, memory flattened; the whole record in `record`).

    `filters` select on columns, e.g. ``load_runs(variant="lora", rank=[8, 64])``."""
    rows = [
        flatten_record(r) | {"path": str(p)} for p in sorted(Path(root).rglob(RESULT_FILE)) if (r := read_result(p))
    ]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    if status is not None:
        frame = frame[frame.status == status]
    for key, value in filters.items():
        frame = frame[frame[key].isin(value if isinstance(value, (list, tuple, set)) else [value])]
    return frame.reset_index(drop=True)
