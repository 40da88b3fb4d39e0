"""LoRA through PEFT: W = W0 + s·B·A, A Kaiming-uniform, B zero, s = α/r (α/√r with rsLoRA).

Conv2d targets use loralib's kernel layout by default (`conv_layout: loralib`, `conv_lora.py`: depthwise and
grouped convolutions included, exact merge); `conv_layout: peft` keeps PEFT's own conv LoRA.

The PEFT baselines (PiSSA, DoRA, rsLoRA, LoRA+, AdaLoRA, PEFT's LoRA-GA) are small subclasses in
`peft_baselines.py`; LoRA-GA's official form in `loraga.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from loralab.config import ConfigError
from loralab.variant_configs import LoraVariantConfig
from loralab.variants.base import Variant, cpu_copy
from loralab.variants.conv_lora import CONV_LAYOUTS, register_layout, save_adapter_layout

PEFT_PREFIX = "base_model.model."


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """PEFT's adapted layers keyed by the base model's layer name."""
    return {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.lora_A
    }


class Lora(Variant):
    name = "lora"
    config_class = LoraVariantConfig

    def __init__(self, cfg: LoraVariantConfig, rank: int):
        super().__init__(cfg, rank)
        layout = getattr(cfg, "conv_layout", "peft")
        if layout not in CONV_LAYOUTS:
            raise ConfigError(f"variant.conv_layout={layout!r} is not supported; choose one of {list(CONV_LAYOUTS)}")

    def peft_config(self, targets: list[str], head_modules: list[str], ctx) -> LoraConfig:
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            use_rslora=self.cfg.use_rslora,
            target_modules=targets,  # full names, already checked against the model
            modules_to_save=list(head_modules) or None,
        )
        return register_layout(config, self.cfg.conv_layout)

    def check_targets(self, modules, targets):
        if self.cfg.conv_layout != "peft":
            return
        # PEFT's own conv LoRA gives A the layer's groups: it refuses a rank the groups do not divide, after loading
        bad = [n for n in targets if isinstance(modules[n], nn.Conv2d) and self.rank % modules[n].groups]
        if bad:
            raise ConfigError(
                f"variant.conv_layout=peft cannot adapt grouped convolutions whose groups do not divide rank="
                f"{self.rank}: {bad[:3]}{' ...' if len(bad) > 3 else ''}; use conv_layout=loralib or other targets"
            )

    def prepare(self, model, targets, head_modules, ctx=None):
        model = get_peft_model(model, self.peft_config(targets, head_modules, ctx))
        # inits such as PiSSA move s·B0·A0 out of the frozen weight: ΔW = W_final − W0 = s·(B·A − B0·A0). Only
        # non-zero initial products are kept, as their factors (adapter-sized; plain LoRA keeps none: B0 = 0)
        self.factors_init = {}
        for name, layer in lora_layers(model).items():
            if layer.get_delta_weight("default").any():
                self.factors_init[name] = (
                    cpu_copy(layer.lora_A["default"].weight),
                    cpu_copy(layer.lora_B["default"].weight),
                )
        return model

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in lora_layers(model).items():
            out[name] = cpu_copy(layer.get_delta_weight("default"))
            if name in self.factors_init:
                A0, B0 = self.factors_init[name]
                out[name] -= ((B0 @ A0) * layer.scaling["default"]).reshape(out[name].shape)
        return out

    def factors(self, model):
        pick = lambda f: cpu_copy(getattr(f["default"], "weight", f["default"]))  # Linear or (AdaLoRA) Parameter
        return {n: (pick(m.lora_A), pick(m.lora_B)) for n, m in lora_layers(model).items()}

    def save(self, model, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir))  # adapter_model.safetensors + adapter_config.json, PEFT's format
        save_adapter_layout(out_dir, self.cfg.conv_layout)  # conv_lora.load_lora_adapter reads it
