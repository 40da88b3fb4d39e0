"""The interface every fine-tuning variant implements."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from loralab.config import VariantConfig


class Variant:
    name: ClassVar[str]
    config_class: ClassVar[type[VariantConfig]] = VariantConfig

    def __init__(self, cfg: VariantConfig, rank: int):
        self.cfg = cfg
        self.rank = rank

    def prepare(
        self,
        model: nn.Module,
        targets: list[str],
        head_modules: list[str],
        train_batches: Callable[[], Iterable[dict]] | None = None,
    ) -> nn.Module:
        """Make `model` trainable the variant's way; `targets` are full names of the layers to adapt.

        `train_batches()` yields training batches for data-dependent initialisation (LoRA-GA's gradients)."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Effective update W_final − W0 of every adapted matrix (fp32, CPU), keyed by the base model's layer name."""
        raise NotImplementedError

    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Write the trained weights (safetensors) into the fresh directory `out_dir`."""
        raise NotImplementedError
