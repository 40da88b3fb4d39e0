"""What every task hands the runner: splits, a collate function, an evaluator and a data fingerprint.

Classification tasks share one evaluator (logits -> metrics); generation and detection tasks bring their own
(label-word scoring, generate -> extract -> score, pycocotools). An evaluator sees one split's examples and an
`EvalContext`, shards the work over processes itself and returns plain floats.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from loralab.config import ConfigError, TaskConfig
from loralab.evals.metrics import classification_metrics


@dataclass
class EvalContext:
    accelerator: Accelerator
    batch_size: int
    split: str  # val | test
    progress: bool = False
    out_dir: Path | None = None  # where an evaluator may write per-example outputs (generations, judge inputs)


Evaluator = Callable[[torch.nn.Module, list, EvalContext], dict[str, float]]
Metrics = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def classification_evaluator(collate: Callable, metrics: Metrics = classification_metrics) -> Evaluator:
    """Logits of a classification (or, with one output, regression) head -> `metrics` + mean loss."""

    @torch.no_grad()
    def evaluate(model, examples: list, ctx: EvalContext) -> dict[str, float]:
        acc = ctx.accelerator
        loader = acc.prepare_data_loader(DataLoader(examples, batch_size=ctx.batch_size, collate_fn=collate))
        model.eval()
        preds, labels, loss_sum, n = [], [], 0.0, 0
        show = ctx.progress and acc.is_main_process
        for batch in tqdm(loader, desc=ctx.split, leave=False, disable=not show):
            logits, y = acc.gather_for_metrics((model(**batch).logits.float(), batch["labels"]))
            logits = logits.reshape(len(y), -1)  # some regression heads return (batch,) rather than (batch, 1)
            if logits.shape[-1] == 1:  # regression head (STS-B)
                loss_sum += torch.nn.functional.mse_loss(logits.squeeze(-1), y.float(), reduction="sum").item()
                preds.append(logits.squeeze(-1).cpu().numpy())
            else:
                loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
                preds.append(logits.argmax(-1).cpu().numpy())
            labels.append(y.cpu().numpy())
            n += len(y)
        model.train()
        return metrics(np.concatenate(preds), np.concatenate(labels)) | {"loss": loss_sum / n}

    return evaluate


@dataclass
class TaskData:
    train: list
    val: list
    test: list
    collate: Callable
    num_labels: int
    fingerprint: str  # sha256 over every split's examples: equal fingerprints, equal data
    evaluate: Evaluator | None = None  # None: the classification evaluator over `collate`
    metric: str = "accuracy"  # the headline metric: val curves and tables report "<split>/<metric>"

    def __post_init__(self):
        if self.evaluate is None:
            self.evaluate = classification_evaluator(self.collate)

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def by_length(examples: list[dict]) -> list[dict]:
    """Evaluation order does not change a metric; length-sorted batches carry little padding (~2x faster). Longest
    first: the largest batch is allocated first and every later, smaller one fits into the memory it freed (in
    ascending order each batch needs a larger block than any freed before, and the heap grows batch by batch)."""
    return sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)


def check_data_path(cfg: TaskConfig) -> None:
    """Fail before any model is loaded if a file-backed task's data is not where the config says."""
    from loralab.models import resolve_path  # noqa: PLC0415

    if cfg.data_path is not None and not Path(resolve_path(cfg.data_path)).is_file():
        raise ConfigError(
            f"task {cfg.name!r}: data_path={cfg.data_path!r} -> {resolve_path(cfg.data_path)} does not exist"
        )
    if cfg.data_dir is not None and not Path(resolve_path(cfg.data_dir)).is_dir():
        raise ConfigError(
            f"task {cfg.name!r}: data_dir={cfg.data_dir!r} -> {resolve_path(cfg.data_dir)} is not a directory"
        )


def split_indices(labels: np.ndarray, cfg: TaskConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded (task.split_seed, not the run seed) split into train/val/test index arrays."""
    idx = np.arange(len(labels))
    if cfg.n_val + cfg.n_test >= len(idx):
        raise ConfigError(
            f"task {cfg.name!r}: n_val={cfg.n_val} + n_test={cfg.n_test} leaves no training data of {len(idx)}"
        )
    rest, test = train_test_split(idx, test_size=cfg.n_test, stratify=labels, random_state=cfg.split_seed)
    train, val = train_test_split(rest, test_size=cfg.n_val, stratify=labels[rest], random_state=cfg.split_seed)
    if cfg.n_train is not None and cfg.n_train < len(train):
        train, _ = train_test_split(train, train_size=cfg.n_train, stratify=labels[train], random_state=cfg.split_seed)
    return np.sort(train), np.sort(val), np.sort(test)


def holdout_indices(n: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded validation slice of a training set that has no labelled held-out split of its own."""
    if n_val >= n:
        raise ConfigError(f"n_val={n_val} leaves no training data of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode() if not isinstance(part, np.ndarray) else part.tobytes())
    return h.hexdigest()
