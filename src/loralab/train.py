"""The training loop: AdamW + warmup/decay schedule + gradient accumulation, through accelerate.

A loop of our own (≈100 lines) rather than HF Trainer: variants need their own optimizer groups (LoRA+),
data-dependent init before training (LoRA-GA), and the loop must stop at the exact step a loss turns
non-finite. accelerate keeps it device-, precision- and multi-GPU-ready (`accelerate launch run.py ...`).

Checkpoints (`train.checkpoint_every`) are accelerate states (model, optimizer, RNG of every process) plus the scheduler
and the loop's own position (step, epoch, batches consumed, the shuffling generator, the curves so far), so a job that
is killed and launched again continues exactly where its newest checkpoint left it.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, broadcast_object_list, send_to_device
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from loralab.config import ConfigError, TrainConfig
from loralab.io import atomic_dir
from loralab.schedules import make_scheduler
from loralab.tasks import EvalContext, TaskData
from loralab.trackers import Tracker

try:
    from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
except ImportError:  # pragma: no cover
    from torch.distributed._composable.fsdp import FSDPModule


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
    resumed_from: int | None = None  # the checkpoint step this run continued from


@dataclass
class LoopState:
    """The loop's position, saved with every checkpoint (accelerate saves model, optimizer and RNG states)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this process has taken from the current epoch
    epoch_rng: torch.Tensor | None = None  # the shuffling generator's state when the current epoch began
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    train_time_s: float = 0.0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    # AcceleratorState is a process-wide singleton that refuses a second, different mixed_precision; the jobs of a
    # sweep share one process, so each job starts from a fresh state (the distributed PartialState is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=cfg.precision,
        gradient_accumulation_steps=cfg.grad_accum,
        # on a machine without an accelerator, say so: only then do launched processes form a (gloo) group
        cpu=cfg.device == "cpu" or (cfg.device == "auto" and not has_accelerator()),
    )
    if accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        raise ConfigError("FSDP: use fsdp_version: 2 in the accelerate config (conf/accelerate/fsdp.yaml)")
    return accelerator


@contextmanager
def gathered_parameters(model):
    """Inside, every process holds the model's full parameters (FSDP2 shards them across processes otherwise) and
    `model.state_dict()` is the full one on the main process: for the end-of-run ΔW analyses (which read whole
    matrices) and the saved weights (which read the state dict). A no-op without FSDP; with it a collective,
    entered by every process."""
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        yield model
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

    # FSDP2's state_dict() hands out shards (its pre-hook reshards), so the gathered one stands in for it
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for module in sharded:
        module.unshard()
    model.state_dict = lambda *args, **kwargs: full
    try:
        yield model
    finally:
        del model.state_dict
        for module in sharded:
            module.reshard()


def has_accelerator() -> bool:
    api = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, MPS, XPU, ...
    return api.is_available() if api is not None else torch.cuda.is_available()


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in backward (the HF model's own checkpointing). Non-reentrant: it needs no
    input that requires grad (PEFT freezes the embeddings) and replays dropout's RNG, so the numbers do not change."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's wrapper
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(hf).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpoints(root: Path | None) -> list[Path]:
    """Complete checkpoints under `root`, oldest first. A save in progress is a hidden temporary directory, never
    listed, so a job killed while saving resumes from the previous checkpoint."""
    if root is None or not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, keep: int) -> None:
    """accelerate's state into <root>/step_<step>, atomically; then only the newest `keep` stay (0: all)."""
    main = accelerator.is_main_process
    with atomic_dir(root / f"step_{step}") if main else nullcontext() as tmp:
        # every process writes its own RNG state into the main process's temporary directory
        (tmp,) = broadcast_object_list([str(tmp) if main else None])
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
    if main and keep > 0:
        for old in checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def checkpoint_filter(model, frozen_layers: Sequence[str]):
    """The model state a checkpoint holds: what training changes (trainable parameters, buffers) and the frozen
    weights of `frozen_layers` (LoRA-GA and PiSSA rewrite W0 at init), not the rest of the frozen model."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    marks = tuple(f".{layer}." for layer in frozen_layers)

    def slim(state: dict) -> dict:
        named = {key.removeprefix("module."): key for key in state}  # DDP's prefix, where a state dict has it
        kept = {n for n in named if n in trainable or n in buffers or any(m in f".{n}" for m in marks)}
        if lost := trainable - kept:
            raise RuntimeError(f"a checkpoint would miss trainable parameters, e.g. {sorted(lost)[:3]}")
        return {named[n]: state[named[n]] for n in kept}

    return slim


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
    resume: bool = False,
    checkpoint_layers: Sequence[str] = (),
) -> TrainResult:
    """Train `model` for the configured steps. With `resume`, continue from the newest checkpoint under
    `checkpoint_dir` (else start afresh and remove old ones); `checkpoint_layers` are the adapted layers whose frozen
    weights the checkpoints keep (see checkpoint_filter)."""
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
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(variant.param_groups(model, cfg.lr, cfg.weight_decay))
    # stepped by hand once per optimizer step (accelerate would step it once per process)
    scheduler = make_scheduler(cfg, optimizer, steps)  # transformers' schedules, or mmdet's multistep
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    trainable = [p for p in model.parameters() if p.requires_grad]

    metric = f"val/{data.metric}"
    loop = LoopState(curves={"train/loss": [], "train/lr": [], metric: [], "val/loss": []})
    result = TrainResult(metrics={}, curves=loop.curves)
    if checkpoint_dir is not None:
        accelerator.register_for_checkpointing(scheduler, loop, variant)
        slim = checkpoint_filter(accelerator.unwrap_model(model), checkpoint_layers)
        # accelerate's pre-save hook edits the model state dicts in place (FSDP saves its shards itself: none here)
        accelerator.register_save_state_pre_hook(
            lambda models, weights, _dir: weights.__setitem__(slice(None), [slim(w) for w in weights])
        )
        (latest,) = broadcast_object_list([checkpoints(checkpoint_dir)[-1:] if resume else []])  # one for all
        if accelerator.is_main_process:  # leftovers: an interrupted save, or checkpoints of a run started afresh
            for stale in Path(checkpoint_dir).glob(".step_*") if latest else [checkpoint_dir]:
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        if latest:
            # overwrites what the variant's init computed (LoRA-GA's W0 - s*B0*A0 is in the model's state)
            accelerator.load_state(str(latest[0]), strict=False)
            gen.set_state(loop.epoch_rng)
            result.curves, result.resumed_from = loop.curves, loop.step  # W&B: the same run id continues it

    def checkpoint_due() -> bool:
        return checkpoint_dir is not None and cfg.checkpoint_every > 0 and loop.step % cfg.checkpoint_every == 0

    bar = tqdm(total=steps, initial=loop.step, desc="train", disable=not show)
    start, window = time.perf_counter() - loop.train_time_s, []
    model.train()
    while loop.step < steps:
        if loop.batches_in_epoch == 0:
            loop.epoch_rng = gen.get_state()  # before this epoch's shuffle draws from it
        batches = (
            accelerator.skip_first_batches(train_loader, loop.batches_in_epoch)
            if loop.batches_in_epoch
            else train_loader
        )
        for batch in batches:
            loop.batches_in_epoch += 1
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                # every process's loss: the curve is the global batch's, and all processes stop together
                losses = accelerator.gather(loss.detach().reshape(1))
                if not torch.isfinite(losses).all():
                    raise NonFiniteLossError(loop.step + 1, losses[~torch.isfinite(losses)][0].item())
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm))
                optimizer.step()
                if accelerator.sync_gradients:
                    variant.after_optimizer_step(model, loop.step)
                optimizer.zero_grad(set_to_none=True)
            window.append(losses.float().mean().item())
            if not accelerator.sync_gradients:
                continue
            loop.step += 1
            step = loop.step
            scheduler.step()
            loss_value = float(np.mean(window))
            window = []
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            lr = scheduler.get_last_lr()[0]
            result.curves["train/loss"].append([step, loss_value])
            result.curves["train/lr"].append([step, lr])
            if step % cfg.log_every == 0 or step == steps:
                logged = {"train/loss": loss_value, "train/lr": lr, "epoch": loop.epoch}
                if cfg.max_grad_norm > 0:
                    logged["train/grad_norm"] = grad_norm  # before clipping
                tracker.log(logged, step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < steps and "val" in splits:
                val = evaluate("val")
                result.curves[metric].append([step, val[data.metric]])
                result.curves["val/loss"].append([step, val.get("loss", float("nan"))])
                tracker.log({f"val/{k}": v for k, v in val.items()}, step)
            if checkpoint_due():
                loop.train_time_s = time.perf_counter() - start
                save_checkpoint(accelerator, checkpoint_dir, step, cfg.keep_checkpoints)
            if step >= steps:
                break
        else:  # the epoch ran out (not the step budget)
            loop.epoch, loop.batches_in_epoch = loop.epoch + 1, 0
    bar.close()
    result.steps, result.train_time_s = loop.step, time.perf_counter() - start
    for split in splits:
        result.metrics.update({f"{split}/{k}": v for k, v in evaluate(split).items()})
    if "val" in splits:
        result.curves[metric].append([loop.step, result.metrics[metric]])
        result.curves["val/loss"].append([loop.step, result.metrics.get("val/loss", float("nan"))])
    tracker.log(result.metrics, loop.step)
    return result
