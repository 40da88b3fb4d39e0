"""The papers' baselines through PEFT, each a few lines on top of `Lora`: PiSSA, DoRA, rsLoRA, LoRA+, AdaLoRA and
PEFT's own LoRA-GA (kept as a named comparison point beside the official form in `loraga.py`)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from peft import AdaLoraConfig
from peft.optimizers import create_loraplus_optimizer
from peft.tuners.lora import LoraGAConfig, preprocess_loraga

from loralab.variants.base import cpu_copy
from loralab.variants.lora import Lora, LoraVariantConfig, lora_layers
from loralab.variants.loraga import LoraGAVariantConfig


@dataclass
class PissaVariantConfig(LoraVariantConfig):
    init: str = "pissa"  # exact SVD; "pissa_niter_<n>" for PEFT's fast randomized SVD


class Pissa(Lora):
    """PiSSA: A, B from the top-r singular triplets of W0; the frozen weight keeps the residual."""

    name = "pissa"
    config_class = PissaVariantConfig

    def peft_config(self, targets, head_modules, ctx):
        config = super().peft_config(targets, head_modules, ctx)
        config.init_lora_weights = self.cfg.init
        return config


class Dora(Lora):
    """DoRA: W = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖ (per output row)."""

    name = "dora"

    def peft_config(self, targets, head_modules, ctx):
        config = super().peft_config(targets, head_modules, ctx)
        config.use_dora = True
        return config

    def prepare(self, model, targets, head_modules, ctx=None):
        model = super().prepare(model, targets, head_modules, ctx)
        # on CPU in the model's dtype (the streaming analyses read W0 from the frozen base weight instead)
        self.initial = {
            n: m.get_base_layer().weight.detach().to("cpu", copy=True) for n, m in lora_layers(model).items()
        }
        return model

    def delta_weights(self, model):
        # the magnitude rescaling is not in get_delta_weight: merge a copy of each layer and read its weight
        out = {}
        for name, layer in lora_layers(model).items():
            merged = copy.deepcopy(layer)
            merged.merge()
            out[name] = cpu_copy(merged.get_base_layer().weight) - cpu_copy(self.initial[name])
        return out


@dataclass
class RsLoraVariantConfig(LoraVariantConfig):
    use_rslora: bool = True


class RsLora(Lora):
    """rsLoRA: s = α/√r."""

    name = "rslora"
    config_class = RsLoraVariantConfig


@dataclass
class LoraPlusVariantConfig(LoraVariantConfig):
    lr_ratio: float = 16.0  # η_B / η_A, the LoRA+ paper's value


class LoraPlus(Lora):
    """LoRA+: B's learning rate = lr_ratio × A's (PEFT's optimizer grouping)."""

    name = "lora_plus"
    config_class = LoraPlusVariantConfig

    def param_groups(self, model, lr, weight_decay):
        optimizer = create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=self.cfg.lr_ratio, weight_decay=weight_decay
        )
        return [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")} for g in optimizer.param_groups]


@dataclass
class AdaLoraVariantConfig(LoraVariantConfig):
    init_rank_ratio: float = 1.5  # each layer starts at ceil(1.5·r) and the budget shrinks to r on average
    tinit_ratio: float = 0.1  # warm-up fraction without pruning
    tfinal_ratio: float = 0.2  # final fraction with the ranks frozen
    delta_t: int = 10
    orth_reg_weight: float = 0.5


class AdaLora(Lora):
    """AdaLoRA: SVD-form adapters whose ranks are reallocated during training (PEFT's schedule)."""

    name = "adalora"
    config_class = AdaLoraVariantConfig

    def peft_config(self, targets, head_modules, ctx):
        total = ctx.total_steps if ctx is not None and ctx.total_steps else 100
        return AdaLoraConfig(
            init_r=math.ceil(self.cfg.init_rank_ratio * self.rank),
            target_r=self.rank,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=targets,
            modules_to_save=list(head_modules) or None,
            total_step=total,
            tinit=int(self.cfg.tinit_ratio * total),
            tfinal=int(self.cfg.tfinal_ratio * total),
            deltaT=self.cfg.delta_t,
            orth_reg_weight=self.cfg.orth_reg_weight,
        )

    def after_optimizer_step(self, model, step):
        model.base_model.update_and_allocate(step)


# PEFT spells the scale options differently
PEFT_LORAGA_SCALES = {"stable": "stable", "gd": "gd_scale", "unit": "unit", "weightS": "weight_svd"}


class LoraGAPeft(Lora):
    """PEFT's `init_lora_weights="lora_ga"` (B0 = U[:, r:2r]·diag(S[r:2r]); `stable` scales B only)."""

    name = "loraga_peft"
    config_class = LoraGAVariantConfig

    def max_rank(self, out_features, in_features):
        return min(out_features, in_features) // 2

    def peft_config(self, targets, head_modules, ctx):
        config = super().peft_config(targets, head_modules, ctx)
        config.init_lora_weights = "lora_ga"
        config.lora_ga_config = LoraGAConfig(
            direction=self.cfg.direction, scale=PEFT_LORAGA_SCALES[self.cfg.scale], stable_gamma=self.cfg.stable_gamma
        )
        return config

    def prepare(self, model, targets, head_modules, ctx=None):
        config = self.peft_config(targets, head_modules, ctx)
        batches = ctx.train_batches(self.cfg.grad_batch_size)

        def train_step():
            for _, batch in zip(range(self.cfg.grad_batches), batches):
                model(**batch).loss.backward()

        # PEFT attaches the averaged gradient to each target module; get_peft_model then initialises from it
        preprocess_loraga(model, config, train_step, cache_file=self.cfg.grad_cache)
        return super().prepare(model, targets, head_modules, ctx)
