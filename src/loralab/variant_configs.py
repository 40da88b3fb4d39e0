"""Every variant's config schema, in a module that imports neither torch nor PEFT.

Hydra needs the schemas to compose any config — `--help` and tab completion included — so they live apart from
the variants' code (which imports torch, PEFT and transformers: seconds). Each variant class names its schema in
`config_class`; `VARIANT_CONFIGS` maps every variant name to it (tests/test_config.py checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

from loralab.config import ConfigError, VariantConfig, check_ranges, choice, outside_identity

ConvLayout = choice("ConvLayout", "loralib", "peft")  # Conv2d adapters, see variants/conv_lora.py
Direction = choice("Direction", "ArB2r", "A2rBr", "ArBr")  # LoRA-GA's singular-vector split
Scale = choice("Scale", "stable", "gd", "unit", "weightS")  # LoRA-GA's init scaling
GradSample = choice("GradSample", "first", "shuffled")  # LoRA-GA's gradient-estimate rows
AdaLoraSchedule = choice("AdaLoraSchedule", "reallocate", "static")


@dataclass
class LoraVariantConfig(VariantConfig):
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    conv_layout: ConvLayout = (
        ConvLayout.loralib
    )  # Conv2d adapters: loralib (B·A over the unrolled kernel) | peft (conv A, 1x1 B)


@dataclass
class LoraGAVariantConfig(LoraVariantConfig):
    use_rslora: bool = True  # the paper's LoRA-GA runs: s = α/√r, α = 16
    direction: Direction = Direction.ArB2r
    scale: Scale = Scale.stable
    stable_gamma: float = 16.0
    grad_batches: int = 8  # the paper code: 8 micro-batches of 1 example (their PEFT fork: 64 of 2)
    grad_batch_size: int = 1
    # which training rows: first = the first grad_batches × grad_batch_size in file order, the same for every seed
    # (official: run_exp.py's train_set.select(range(bsz * iters)), unshuffled); shuffled = drawn by the run seed
    grad_sample: GradSample = GradSample.first
    # safetensors file: loaded if it exists, else written after estimation. Where the estimate is kept, not what it
    # is (the same batches give the same estimate), so not part of the run's identity
    grad_cache: str | None = outside_identity(None)


@dataclass
class PissaVariantConfig(LoraVariantConfig):
    init: str = "pissa"  # exact SVD; "pissa_niter_<n>" for PEFT's fast randomized SVD


@dataclass
class RsLoraVariantConfig(LoraVariantConfig):
    use_rslora: bool = True


@dataclass
class LoraPlusVariantConfig(LoraVariantConfig):
    lr_ratio: float = 16.0  # η_B / η_A, the LoRA+ paper's value


@dataclass
class AdaLoraVariantConfig(LoraVariantConfig):
    # reallocate: PEFT's budget schedule (update_and_allocate after every optimizer step, the AdaLoRA paper's method);
    # static: ranks stay at init_r, as the LoRA-GA baseline ran (their run_exp.py builds AdaLoraConfig and trains with
    # the HF Trainer, which never calls update_and_allocate)
    schedule: AdaLoraSchedule = AdaLoraSchedule.reallocate
    init_rank_ratio: float = 1.5  # each layer starts at ceil(1.5·r) (PEFT's default init_r 12 at r=8)
    tinit_ratio: float = 0.1  # warm-up fraction without pruning (reallocate only)
    tfinal_ratio: float = 0.2  # final fraction with the ranks frozen (reallocate only)
    delta_t: int = 10  # steps between reallocations (reallocate only)
    orth_reg_weight: float = 0.5


@dataclass
class LieraVariantConfig(VariantConfig):
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter path's input only: y = W0·x + (W − W0)·drop(x), as in the official code
    use_rslora: bool = False
    exact_exp: bool = False  # W0 ⊙ exp(sΔ) instead of the first-order W0 ⊙ (1 + sΔ)
    eps: float | None = None  # ε-policy for zero weights, see the module docstring
    init: str = "default"  # A Kaiming-uniform, B zero; additive inits (PiSSA, LoRA-GA, ...) do not apply


@dataclass
class PissaLieraVariantConfig(LieraVariantConfig):
    exact_exp: bool = True  # required: s·B0·A0 is O(log|W0|), far outside the first-order form's range
    init: str = "pissa"  # exact SVD; "pissa_niter_<n>": torch.svd_lowrank with n subspace iterations


# variant name -> its schema (the variant classes' `config_class`)
VARIANT_CONFIGS: dict[str, type[VariantConfig]] = {
    "lora": LoraVariantConfig,
    "full": VariantConfig,
    "loraga": LoraGAVariantConfig,
    "loraga_peft": LoraGAVariantConfig,
    "pissa": PissaVariantConfig,
    "dora": LoraVariantConfig,
    "rslora": RsLoraVariantConfig,
    "lora_plus": LoraPlusVariantConfig,
    "adalora": AdaLoraVariantConfig,
    "lierra": LieraVariantConfig,
    "pissa_lierra": PissaLieraVariantConfig,
    "dora_lierra": LieraVariantConfig,
}


# range checks on the variant's numeric options, wherever a schema has them: (option, allowed?, what is allowed)
VARIANT_RANGES = [
    ("alpha", lambda v: v > 0, "must be > 0"),
    ("dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("lr_ratio", lambda v: v > 0, "must be > 0 (η_B / η_A)"),
    ("stable_gamma", lambda v: v > 0, "must be > 0"),
    ("eps", lambda v: v > 0, "must be > 0 (or null)"),
    ("init_rank_ratio", lambda v: v >= 1, "must be >= 1 (AdaLoRA starts at ceil(ratio·rank) >= the target rank)"),
    ("tinit_ratio", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("tfinal_ratio", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("delta_t", lambda v: v >= 1, "must be >= 1 (steps between reallocations)"),
    ("orth_reg_weight", lambda v: v >= 0, "must be >= 0"),
]


def check_variant_ranges(cfg) -> None:
    """Signs and ranges of `cfg` (a variant's config), before any model is built."""
    check_ranges("variant", cfg, VARIANT_RANGES)
    if getattr(cfg, "schedule", None) == "reallocate" and cfg.tinit_ratio + cfg.tfinal_ratio >= 1:
        raise ConfigError(
            f"variant.tinit_ratio={cfg.tinit_ratio} + variant.tfinal_ratio={cfg.tfinal_ratio} must be < 1 "
            f"(AdaLoRA reallocates ranks between them)"
        )
    if cfg.name in ("dora_lierra", "dora_liera") and cfg.dropout > 0:
        raise ConfigError(f"{cfg.name}: variant.dropout={cfg.dropout} is not supported (DoRA+LieRA is defined for 0)")
