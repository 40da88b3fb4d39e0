"""The interface every fine-tuning variant implements."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from loralab.config import VariantConfig


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy in at least fp32 (fp64 stays fp64, so closed-form tests in double precision stay exact)."""
    return t.detach().to(device="cpu", dtype=torch.promote_types(t.dtype, torch.float32), copy=True)


@dataclass
class PrepareContext:
    """What a variant may use while it initialises (all optional for callers such as tests)."""

    train_batches: Callable[[int], Iterator[dict]] | None = None  # batch_size -> seeded, shuffled training batches
    # batch_size -> training batches in file order, the same for every seed (LoRA-GA's official gradient sample,
    # required by its default grad_sample=first); a caller with one stream (a probe repeating one batch) passes it
    # as both
    first_batches: Callable[[int], Iterator[dict]] | None = None
    total_steps: int | None = None  # optimizer steps the run will take (AdaLoRA's schedule needs it)


class Variant:
    name: ClassVar[str]
    config_class: ClassVar[type[VariantConfig]] = VariantConfig

    def __init__(self, cfg: VariantConfig, rank: int):
        self.cfg = cfg
        self.rank = rank

    def prepare(
        self, model: nn.Module, targets: list[str], head_modules: list[str], ctx: PrepareContext | None = None
    ) -> nn.Module:
        """Make `model` trainable the variant's way; `targets` are full names of the layers to adapt.

        `ctx.train_batches` gives training batches for data-dependent initialisation (LoRA-GA's gradients)."""
        raise NotImplementedError

    def max_rank(self, out_features: int, in_features: int) -> int:
        """The largest rank this variant can use on an out×in matrix."""
        return min(out_features, in_features)

    def check_targets(self, modules: dict[str, nn.Module], targets: list[str]) -> None:
        """Refuse target layers this variant cannot adapt (ConfigError); called on the meta-device skeleton."""

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step, before gradients are cleared (AdaLoRA's rank allocation)."""

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Effective update W_final − W0 of every adapted matrix (fp32, CPU), keyed by the base model's layer name."""
        raise NotImplementedError

    def factors(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(A, B) per adapted matrix where the variant has low-rank factors (the LoRA paper compares A's
        right and B's left singular vectors between runs); empty for full fine-tuning."""
        return {}

    # what prepare() records to report ΔW = W_final − W0 (W0 itself, PiSSA's s·B0·A0, LoRA-GA's A0/B0): part of a
    # checkpoint, so a resumed run measures ΔW against the same start even when its init is not bit-reproducible
    INIT_STATE: ClassVar[tuple[str, ...]] = ("initial", "initial_delta", "factors_init")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.INIT_STATE if hasattr(self, k)}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Write the trained weights (safetensors) into the fresh directory `out_dir`."""
        raise NotImplementedError
