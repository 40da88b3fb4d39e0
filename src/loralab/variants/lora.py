"""LoRA through PEFT: W = W0 + s·B·A, A Kaiming-uniform, B zero, s = α/r (α/√r with rsLoRA)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from loralab.config import VariantConfig
from loralab.variants.base import Variant

PEFT_PREFIX = "base_model.model."


@dataclass
class LoraVariantConfig(VariantConfig):
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False


class Lora(Variant):
    name = "lora"
    config_class = LoraVariantConfig

    def peft_config(self, targets: list[str], head_modules: list[str]) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            use_rslora=self.cfg.use_rslora,
            target_modules=targets,  # full names, already checked against the model
            modules_to_save=list(head_modules) or None,
        )

    def prepare(self, model, targets, head_modules, train_batches=None):
        return get_peft_model(model, self.peft_config(targets, head_modules))

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            name.removeprefix(PEFT_PREFIX): module.get_delta_weight("default").detach().float().cpu()
            for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and "default" in module.lora_A
        }

    def save(self, model, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir))  # adapter_model.safetensors + adapter_config.json, PEFT's format
