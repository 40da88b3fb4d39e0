"""The papers' baselines through PEFT, each a few lines on top of `Lora`: PiSSA, DoRA, rsLoRA, LoRA+, AdaLoRA and
PEFT's own LoRA-GA (kept as a named comparison point beside the official form in `loraga.py`)."""

from __future__ import annotations

import copy
import math

import torch
from accelerate.utils import extract_model_from_parallel
from peft import AdaLoraConfig
from peft.optimizers import create_loraplus_optimizer
from peft.tuners.lora import LoraGAConfig, preprocess_loraga

from loralab.config import ConfigError
from loralab.variant_configs import (
    AdaLoraSchedule,
    AdaLoraVariantConfig,
    LoraPlusVariantConfig,
    PissaVariantConfig,
    RsLoraVariantConfig,
)
from loralab.variants.base import cpu_copy
from loralab.variants.lora import Lora, lora_layers
from loralab.variants.loraga import GRAD_SAMPLES, LoraGAVariantConfig, gradient_batches, refuse_loralib_convs


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

    def delta_weights(self, model):
        # the magnitude rescaling is not in get_delta_weight: merge a copy of each layer (one at a time) and read its
        # weight; W0 is the layer's frozen base weight, which PEFT's DoRA never changes while unmerged (no copy kept)
        out = {}
        for name, layer in lora_layers(model).items():
            merged = copy.deepcopy(layer)
            merged.merge()
            out[name] = cpu_copy(merged.get_base_layer().weight) - cpu_copy(layer.get_base_layer().weight)
        return out


class RsLora(Lora):
    """rsLoRA: s = α/√r."""

    name = "rslora"
    config_class = RsLoraVariantConfig


class LoraPlus(Lora):
    """LoRA+: B's learning rate = lr_ratio × A's (PEFT's optimizer grouping)."""

    name = "lora_plus"
    config_class = LoraPlusVariantConfig

    def param_groups(self, model, lr, weight_decay):
        optimizer = create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=self.cfg.lr_ratio, weight_decay=weight_decay
        )
        return [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")} for g in optimizer.param_groups]


ADALORA_SCHEDULES = tuple(c.value for c in AdaLoraSchedule)


class AdaLora(Lora):
    """AdaLoRA: SVD-form adapters P·diag(E)·Q with an orthogonality penalty; `schedule` says whether the ranks are
    reallocated during training (PEFT's schedule) or stay at init_r (the LoRA-GA paper's baseline)."""

    name = "adalora"
    config_class = AdaLoraVariantConfig

    def __init__(self, cfg, rank):
        super().__init__(cfg, rank)
        if cfg.schedule not in ADALORA_SCHEDULES:
            raise ConfigError(f"variant.schedule={cfg.schedule!r}; choose one of {list(ADALORA_SCHEDULES)}")

    def peft_config(self, targets, head_modules, ctx):
        total = ctx.total_steps if ctx is not None and ctx.total_steps else 100
        if self.cfg.schedule == "static":  # PEFT's schedule defaults, never used: update_and_allocate is not called
            schedule = {"tinit": 0, "tfinal": 0, "deltaT": 1}
        else:
            tinit, tfinal = int(self.cfg.tinit_ratio * total), int(self.cfg.tfinal_ratio * total)
            schedule = {"tinit": tinit, "tfinal": tfinal, "deltaT": self.cfg.delta_t}
        return AdaLoraConfig(
            init_r=math.ceil(self.cfg.init_rank_ratio * self.rank),
            target_r=self.rank,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=targets,
            modules_to_save=list(head_modules) or None,
            total_step=total,
            orth_reg_weight=self.cfg.orth_reg_weight,
            **schedule,
        )

    def after_optimizer_step(self, model, step):
        if self.cfg.schedule == "static":
            return
        # the PEFT model under a DDP / FSDP wrapper (the wrapper has no base_model); the gradients the allocator
        # scores are already all-reduced, so every process masks the same ranks
        extract_model_from_parallel(model).base_model.update_and_allocate(step)


# PEFT spells the scale options differently
PEFT_LORAGA_SCALES = {"stable": "stable", "gd": "gd_scale", "unit": "unit", "weightS": "weight_svd"}


class LoraGAPeft(Lora):
    """PEFT's `init_lora_weights="lora_ga"` (B0 = U[:, r:2r]·diag(S[r:2r]); `stable` scales B only)."""

    name = "loraga_peft"
    config_class = LoraGAVariantConfig

    def check_targets(self, modules, targets):
        super().check_targets(modules, targets)
        refuse_loralib_convs(self, modules, targets)

    def __init__(self, cfg, rank):
        super().__init__(cfg, rank)
        if cfg.grad_sample not in GRAD_SAMPLES:
            raise ConfigError(f"variant.grad_sample={cfg.grad_sample!r}; choose one of {list(GRAD_SAMPLES)}")

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
        batches = gradient_batches(self.cfg, ctx)

        def train_step():
            for _, batch in zip(range(self.cfg.grad_batches), batches):
                model(**batch).loss.backward()

        # PEFT attaches the averaged gradient to each target module; get_peft_model then initialises from it
        preprocess_loraga(model, config, train_step, cache_file=self.cfg.grad_cache)
        return super().prepare(model, targets, head_modules, ctx)
