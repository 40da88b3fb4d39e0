"""Learning-rate schedules: transformers' (`train.scheduler` = any `get_scheduler` name) plus mmdetection's step
schedule, which transformers does not have.

`multistep` is mmdetection's detection schedule (configs/_base_/schedules/schedule_1x.py): a linear warm-up over
`train.warmup_steps` optimizer steps from `warmup_start_factor`·lr to lr (mmengine's LinearLR, by iteration), times
`decay_gamma` at each of `decay_epochs` (mmengine's MultiStepLR, by epoch); the two factors multiply, as mmengine's
schedulers chained on one optimizer do. Milestones are epochs of the `train.epochs` schedule: step
round(steps·m/epochs), so they stay at the same fraction of training when `train.max_steps` fixes the length.
"""

from __future__ import annotations

import bisect

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from loralab.config import ConfigError, TrainConfig


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    """`train.warmup_steps` when positive (HF Trainer's rule), else the `warmup_ratio` share of the run."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else round(cfg.warmup_ratio * steps)


def milestone_steps(cfg: TrainConfig, steps: int) -> list[int]:
    return [round(steps * epoch / cfg.epochs) for epoch in cfg.decay_epochs]


def multistep_factor(step: int, warmup: int, start_factor: float, milestones: list[int], gamma: float) -> float:
    """The lr multiplier of optimizer step `step` (0-based): linear warm-up x gamma^(milestones passed)."""
    warm = start_factor + (1.0 - start_factor) * step / warmup if step < warmup else 1.0
    return warm * gamma ** bisect.bisect_right(milestones, step)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps: int):
    """The run's scheduler, stepped once per optimizer step."""
    warmup = warmup_steps(cfg, steps)
    if cfg.scheduler != "multistep":
        return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    milestones = milestone_steps(cfg, steps)
    args = (warmup, cfg.warmup_start_factor, milestones, cfg.decay_gamma)
    return LambdaLR(optimizer, lambda step: multistep_factor(step, *args))


def check_schedule(cfg: TrainConfig) -> None:
    """Cheap checks of the schedule fields (called by loralab.config.validate)."""
    if cfg.scheduler != "multistep":
        if cfg.decay_epochs or cfg.warmup_start_factor != 0.0:
            raise ConfigError(
                f"train.decay_epochs={list(cfg.decay_epochs)} / train.warmup_start_factor={cfg.warmup_start_factor} "
                f"belong to train.scheduler=multistep, not {cfg.scheduler!r} (transformers' warm-ups start at 0)"
            )
        return
    if not 0.0 <= cfg.warmup_start_factor <= 1.0:
        raise ConfigError(f"train.warmup_start_factor={cfg.warmup_start_factor} must be in [0, 1]")
    if not 0.0 < cfg.decay_gamma <= 1.0:
        raise ConfigError(f"train.decay_gamma={cfg.decay_gamma} must be in (0, 1]")
    epochs = list(cfg.decay_epochs)
    if epochs != sorted(epochs) or any(not 0 < e <= cfg.epochs for e in epochs):
        raise ConfigError(
            f"train.decay_epochs={epochs} must be increasing epochs in (0, train.epochs={cfg.epochs}] "
            f"(scheduler=multistep places them at the same fraction of train.max_steps when that is set)"
        )
