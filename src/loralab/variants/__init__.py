"""Fine-tuning variants. Each is one small module: a config schema and a :class:`Variant` subclass.

A new variant implements `prepare` (init, with training batches available for data-dependent preprocessing),
`delta_weights` (ΔW = W_final − W0 per adapted matrix, for the analyses) and `save`; `param_groups` and
`after_optimizer_step` are there for optimizers with per-group settings (LoRA+) and schedules (AdaLoRA).
"""

from __future__ import annotations

from loralab.config import ConfigError
from loralab.variants.base import PrepareContext, Variant
from loralab.variants.full import FullFinetune
from loralab.variants.lierra import DoraLiera, Liera, PissaLiera
from loralab.variants.lora import Lora
from loralab.variants.loraga import LoraGA
from loralab.variants.peft_baselines import AdaLora, Dora, LoraGAPeft, LoraPlus, Pissa, RsLora

VARIANTS: dict[str, type[Variant]] = {
    cls.name: cls
    for cls in (
        Lora,
        FullFinetune,
        LoraGA,
        LoraGAPeft,
        Pissa,
        Dora,
        RsLora,
        LoraPlus,
        AdaLora,
        Liera,
        PissaLiera,
        DoraLiera,
    )
}
# config names that select another variant's class: the paper's spelling of LieRA, the "+LieRA" rows' names,
# AdaLoRA with static ranks
ALIASES = {"liera": "lierra", "pissa_liera": "pissa_lierra", "dora_liera": "dora_lierra", "adalora_static": "adalora"}


def get_variant(name: str) -> type[Variant]:
    name = ALIASES.get(name, name)
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; known variants: {sorted(VARIANTS)}")
    return VARIANTS[name]


__all__ = ["ALIASES", "VARIANTS", "PrepareContext", "Variant", "get_variant"]
