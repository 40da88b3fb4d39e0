"""Fine-tuning variants. Each is one small module: a config schema and a :class:`Variant` subclass.

A new variant (LoRA-GA, LieRA, a PEFT baseline) implements `prepare` (init, with the task's training batches
available for data-dependent preprocessing), `delta_weights` (ΔW = W_final − W0 per adapted matrix, for the
analyses) and `save`; `param_groups` is there for optimizers with per-group settings (LoRA+).
"""

from __future__ import annotations

from loralab.config import ConfigError
from loralab.variants.base import Variant
from loralab.variants.full import FullFinetune
from loralab.variants.lora import Lora

VARIANTS: dict[str, type[Variant]] = {cls.name: cls for cls in (Lora, FullFinetune)}


def get_variant(name: str) -> type[Variant]:
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; known variants: {sorted(VARIANTS)}")
    return VARIANTS[name]


__all__ = ["VARIANTS", "Variant", "get_variant"]
