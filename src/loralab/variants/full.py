"""Full fine-tuning: every parameter trains; ΔW is recorded for the same target matrices LoRA would adapt."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loralab.variants.base import Variant, cpu_copy


class FullFinetune(Variant):
    name = "full"

    def prepare(self, model, targets, head_modules, ctx=None):
        modules = dict(model.named_modules())
        # W is overwritten in training: W0 kept on CPU in the model's dtype, one matrix at a time
        self.initial = {n: modules[n].weight.detach().to("cpu", copy=True) for n in targets}
        model.requires_grad_(True)
        return model

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        modules = dict(model.named_modules())
        return {n: cpu_copy(modules[n].weight) - cpu_copy(w0) for n, w0 in self.initial.items()}

    def save(self, model, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir))  # model.safetensors + config.json
