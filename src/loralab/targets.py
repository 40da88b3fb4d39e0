"""Which layers a variant adapts: PEFT's name-matching rule, checked up front with useful errors."""

from __future__ import annotations

import math
import re

from torch import nn

from loralab.config import ConfigError

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def matches(name: str, suffix: str) -> bool:
    """PEFT's rule for a list of target names: the full module name, or its last dotted components."""
    return name == suffix or name.endswith("." + suffix)


def layer_patterns(model: nn.Module) -> list[str]:
    """Adaptable layer names with their block index dropped (``encoder.layer.3.attention.self.query`` ->
    ``attention.self.query``): the short list a user chooses target modules from."""
    found = {re.split(r"\.\d+\.", name)[-1] for name, m in model.named_modules() if isinstance(m, ADAPTABLE)}
    return sorted(found)


def find_targets(model: nn.Module, suffixes: list[str], exclude: list[str] = ()) -> list[str]:
    """Full names of the adaptable layers matching `suffixes`; every suffix must match at least one layer."""
    layers = [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE)]
    layers = [n for n in layers if not any(matches(n, e) or n.startswith(e + ".") for e in exclude)]
    unmatched = [s for s in suffixes if not any(matches(n, s) for n in layers)]
    if unmatched:
        raise ConfigError(
            f"target modules {unmatched} match no adaptable layer of {type(model).__name__}; "
            f"layers that exist (block index dropped): {layer_patterns(model)}"
        )
    return [n for n in layers if any(matches(n, s) for s in suffixes)]


def matrix_shape(weight_shape) -> tuple[int, int]:
    """(out, in) of a weight seen as a matrix: a conv kernel (out, in/groups, *k) is out x (in/groups * prod k)."""
    return int(weight_shape[0]), int(math.prod(weight_shape[1:]))


def check_rank(model: nn.Module, targets: list[str], rank: int, max_rank=min) -> None:
    """`max_rank(out, in)`: the variant's bound (min(out, in) for LoRA; LoRA-GA needs 2r <= min(out, in))."""
    modules = dict(model.named_modules())
    for name in targets:
        out_f, in_f = matrix_shape(modules[name].weight.shape)
        bound = max_rank(out_f, in_f)
        if rank > bound:
            raise ConfigError(
                f"rank={rank} exceeds the largest rank {bound} this variant allows on target layer {name!r} "
                f"(weight {tuple(modules[name].weight.shape)} -> matrix {out_f}x{in_f}, "
                f"min(out, in)={min(out_f, in_f)}); "
                f"use rank <= {bound}"
            )
