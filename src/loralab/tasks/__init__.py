"""Tasks: real data -> fixed seeded splits, a collate function, an evaluator and a fingerprint.

`task.loader` (default: the task's name) picks the function that builds a task's `TaskData`; loaders are
imported only when used, so a text run never imports the vision stack and vice versa.
"""

from __future__ import annotations

import importlib

from loralab.config import ConfigError, TaskConfig
from loralab.tasks.base import EvalContext, TaskData, check_data_path, classification_evaluator, split_indices

# loader name -> "module:function"
LOADERS = {
    "tweet_sentiment": "loralab.tasks.offline:load_tweet_sentiment",
    "digits_transfer": "loralab.tasks.offline:load_digits_transfer",
    "glue": "loralab.tasks.glue:load_glue",
    "instruct": "loralab.tasks.instruct:load_instruct",
    "vtab": "loralab.tasks.vtab:load_vtab",
    "coco": "loralab.tasks.coco:load_coco",
}


def loader_name(cfg: TaskConfig) -> str:
    name = cfg.loader or cfg.name
    if name not in LOADERS:
        raise ConfigError(f"task {cfg.name!r}: unknown loader {name!r}; known loaders: {sorted(LOADERS)}")
    return name


def load_task(cfg: TaskConfig, tokenizer) -> TaskData:
    module, _, function = LOADERS[loader_name(cfg)].partition(":")
    return getattr(importlib.import_module(module), function)(cfg, tokenizer)


__all__ = [
    "LOADERS",
    "EvalContext",
    "TaskData",
    "check_data_path",
    "classification_evaluator",
    "load_task",
    "loader_name",
    "split_indices",
]
