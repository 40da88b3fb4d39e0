"""GLUE's official metrics and plain classification metrics, through `evaluate` modules kept in the package.

`evaluate.load("glue", task)` downloads its metric script from the Hugging Face Hub and therefore fails
offline; `loralab.metric_modules` holds modules with the same configurations and output names
(`matthews_correlation`, `accuracy`, `f1`, `pearson`, `spearmanr`), loaded from their path. This module adds
the task-name aliases, input checks and each paper's headline metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loralab import metric_modules

# Same task → metric-name table as HF `evaluate`'s glue metric. "mnli" is the matched dev set.
GLUE_METRICS: dict[str, list[str]] = {
    "cola": ["matthews_correlation"],
    "sst2": ["accuracy"],
    "mrpc": ["accuracy", "f1"],
    "qqp": ["accuracy", "f1"],
    "stsb": ["pearson", "spearmanr"],
    "mnli": ["accuracy"],
    "mnli_matched": ["accuracy"],
    "mnli_mismatched": ["accuracy"],
    "qnli": ["accuracy"],
    "rte": ["accuracy"],
    "wnli": ["accuracy"],
}

# The single number each paper prints per task.
# "lora": LoRA (Hu et al. 2021) Table 2 caption — Matthews correlation for CoLA, Pearson for STS-B, accuracy for
#   every other task (MRPC and QQP included, not F1). DeBERTaV3 GLUE work (AdaLoRA, which LieRA follows) uses the
#   same convention.
# "loraga": LoRA-GA's T5 runs are text-to-text and score the generated label word, i.e. accuracy on every task,
#   CoLA included (its full-FT CoLA of 80.70 in reference/loraga_t5_glue.csv is on the accuracy scale; a T5-base
#   Matthews correlation is ~60). This is inferred from the numbers, not from a caption.
_PRIMARY = {
    "lora": {"cola": "matthews_correlation", "stsb": "pearson"},
    "loraga": {"stsb": "pearson"},
}


def _task(task: str) -> str:
    key = task.lower().replace("-", "_")
    key = {"mnli_m": "mnli_matched", "mnli_mm": "mnli_mismatched", "sst_2": "sst2", "sts_b": "stsb"}.get(key, key)
    if key not in GLUE_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {sorted(GLUE_METRICS)}")
    return key


def _arrays(predictions: Sequence, references: Sequence) -> tuple[np.ndarray, np.ndarray]:
    preds, refs = np.asarray(predictions), np.asarray(references)
    if preds.shape != refs.shape or preds.ndim != 1:
        raise ValueError(f"predictions {preds.shape} and references {refs.shape} must be equal-length 1-D")
    if preds.size == 0:
        raise ValueError("no predictions to score")
    return preds, refs


def glue_metrics(task: str, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """The metrics HF `evaluate`'s glue metric returns for `task`, as plain floats.

    Classification tasks take integer labels; `f1` is the binary F1 of the positive class 1 (sklearn's default,
    as in the official script). STS-B takes real-valued scores; a constant prediction vector has no correlation
    and yields nan, as scipy does.
    """
    key = _task(task)
    preds, refs = _arrays(predictions, references)
    dtype = float if key == "stsb" else int
    return metric_modules.load("glue", key).compute(predictions=preds.astype(dtype), references=refs.astype(dtype))


def primary_metric(task: str, convention: str = "lora") -> str:
    """Name of the metric a paper reports for `task` (see `_PRIMARY` for the two conventions)."""
    key = _task(task)
    if convention not in _PRIMARY:
        raise ValueError(f"unknown convention {convention!r}; known: {sorted(_PRIMARY)}")
    return _PRIMARY[convention].get(key, "accuracy")


def classification_metrics(predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Accuracy and macro-F1 (unweighted mean of per-class F1 over every label seen in either array)."""
    preds, refs = _arrays(predictions, references)
    return metric_modules.load("classification").compute(predictions=preds, references=refs)
