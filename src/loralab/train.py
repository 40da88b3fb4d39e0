"""The training loop: AdamW + warmup/decay schedule + gradient accumulation, through accelerate.

A loop of our own (≈100 lines) rather than HF Trainer: variants need their own optimizer groups (LoRA+),
data-dependent init before training (LoRA-GA), and the loop must stop at the exact step a loss turns
non-finite. accelerate keeps it device-, precision- and multi-GPU-ready (`accelerate launch run.py ...`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from loralab.config import TrainConfig
from loralab.tasks import EvalContext, TaskData
from loralab.trackers import Tracker


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite training loss {value} at optimizer step {step}")
        self.step = step


@dataclass
class TrainResult:
    metrics: dict[str, float]
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # name -> [[step, value], ...]
    steps: int = 0
    train_time_s: float = 0.0


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    # AcceleratorState is a process-wide singleton that refuses a second, different mixed_precision; the jobs of a
    # sweep share one process, so each job starts from a fresh state (the distributed PartialState is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=cfg.precision,
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=cfg.device == "cpu",
    )


def total_steps(cfg: TrainConfig, n_train: int, world_size: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(n_train / (cfg.batch_size * world_size)) / cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * per_epoch))


def device_batches(data: TaskData, batch_size: int, seed: int, device) -> Iterator[dict]:
    """Shuffled training batches on `device`, epoch after epoch (for data-dependent initialisation)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        for batch in DataLoader(
            data.train, batch_size=batch_size, shuffle=True, collate_fn=data.collate, generator=gen
        ):
            yield send_to_device(batch, device)


def train(
    model,
    variant,
    data: TaskData,
    cfg: TrainConfig,
    seed: int,
    tracker: Tracker,
    accelerator: Accelerator,
    checkpoint_dir: Path | None = None,
    eval_dir: Path | None = None,
) -> TrainResult:
    gen = torch.Generator().manual_seed(seed)  # the run seed fixes the shuffling order
    train_loader = DataLoader(
        data.train,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=data.collate,
        generator=gen,
        num_workers=cfg.num_workers,
        drop_last=len(data.train) > cfg.batch_size,
    )
    splits = [split for split in ("val", "test") if getattr(data, split)]  # MT-bench-style tasks have no val

    def evaluate(split: str) -> dict[str, float]:
        ctx = EvalContext(accelerator, cfg.eval_batch_size, split, show, eval_dir)
        return data.evaluate(model, getattr(data, split), ctx)

    steps = total_steps(cfg, len(data.train), accelerator.num_processes)
    show = cfg.progress and accelerator.is_main_process
    optimizer = torch.optim.AdamW(variant.param_groups(model, cfg.lr, cfg.weight_decay))
    # stepped by hand once per optimizer step (accelerate would step it once per process)
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=round(cfg.warmup_ratio * steps), num_training_steps=steps
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    trainable = [p for p in model.parameters() if p.requires_grad]

    metric = f"val/{data.metric}"
    result = TrainResult(metrics={}, curves={"train/loss": [], "train/lr": [], metric: [], "val/loss": []})
    bar = tqdm(total=steps, desc="train", disable=not show)
    start, step, epoch, window = time.perf_counter(), 0, 0, []
    model.train()
    while step < steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(step + 1, loss.item())
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    variant.after_optimizer_step(model, step)
                optimizer.zero_grad(set_to_none=True)
            window.append(loss.item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            scheduler.step()
            loss_value = float(np.mean(window))
            window = []
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            result.curves["train/loss"].append([step, loss_value])
            result.curves["train/lr"].append([step, scheduler.get_last_lr()[0]])
            if step % cfg.log_every == 0 or step == steps:
                tracker.log({"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0], "epoch": epoch}, step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < steps and "val" in splits:
                val = evaluate("val")
                result.curves[metric].append([step, val[data.metric]])
                result.curves["val/loss"].append([step, val.get("loss", float("nan"))])
                tracker.log({f"val/{k}": v for k, v in val.items()}, step)
            if checkpoint_dir and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                accelerator.save_state(str(checkpoint_dir / f"step_{step}"))
            if step >= steps:
                break
        epoch += 1
    bar.close()
    result.steps, result.train_time_s = step, time.perf_counter() - start
    for split in splits:
        result.metrics.update({f"{split}/{k}": v for k, v in evaluate(split).items()})
    if "val" in splits:
        result.curves[metric].append([step, result.metrics[metric]])
        result.curves["val/loss"].append([step, result.metrics.get("val/loss", float("nan"))])
    tracker.log(result.metrics, step)
    return result
