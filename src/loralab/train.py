"""The training loop: AdamW + warmup/decay schedule + gradient accumulation, through accelerate.

A loop of our own rather than HF Trainer: variants need their own optimizer groups (LoRA+),
data-dependent init before training (LoRA-GA), and the loop must stop at the exact step a loss turns
non-finite. accelerate keeps it device-, precision- and multi-GPU-ready (`accelerate launch run.py ...`).

Checkpoints (`train.checkpoint_every`) are accelerate states (model, optimizer, RNG of every process) plus the scheduler
and the loop's own position (step, epoch, batches consumed, the shuffling generator, the curves so far), so a job that
is killed and launched again continues exactly where its newest checkpoint left it.

Best-checkpoint selection (`train.select_best`, as HF Trainer's `load_best_model_at_end`, which the LLM-Adapters /
LieRA commonsense code uses): after every periodic validation the trainable parameters of the best step so far are
copied to CPU memory (only those: for an adapter a few MB; the frozen model is never copied), and restored before the
test evaluation. The record then reports `val/*` and `test/*` of the selected step, the last step's validation as
`final/val/*`, and `best/step`, `best/epoch` (epochs completed by then). With `train.eval_test` the test split is
evaluated at every periodic validation as well; `test_best/*` is each metric's best test value seen, `test_best/step`
where the task's headline metric peaked (the LoRA paper's GLUE numbers are the best epoch on the dev set, which the
harness reports as its test split).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
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
from loralab.host_memory import release_freed_memory
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
    tokens: int = 0  # non-pad input tokens trained on, every process (0: a task without attention masks)


@dataclass
class LoopState:
    """The loop's position, saved with every checkpoint (accelerate saves model, optimizer and RNG states)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this process has taken from the current epoch
    epoch_rng: torch.Tensor | None = None  # the shuffling generator's state when the current epoch began
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    train_time_s: float = 0.0
    tokens: int = 0  # this process's non-pad input tokens so far (tokens/s)
    # the selected checkpoint so far: step, epoch, value, val (its metrics), params (trainable parameters, CPU)
    best: dict = field(default_factory=dict)
    test_best: dict[str, list[float]] = field(default_factory=dict)  # test metric -> [step, best value seen]

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


# optimizer steps between returns of freed host memory (host_memory): each costs a re-fault of one step's buffers.
# Default job, one run each: trims around evaluations only peaked at 2,309 MiB, adding every 10 steps at 2,217 MiB
TRIM_EVERY = 10


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
        raise ConfigError("FSDP: use fsdp_version: 2 in the accelerate config (launch/accelerate_fsdp.yaml)")
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
    hf = check_gradient_checkpointing(model)
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_gradient_checkpointing(model):
    """The HF model under PEFT's wrapper, if it can recompute activations (else a ConfigError naming its class)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(hf).__name__} does not support gradient checkpointing")
    return hf


def check_select_best(cfg: TrainConfig, data: TaskData, model=None, accelerator=None) -> None:
    """`train.select_best` against the task: it needs a validation split, and a metric named by hand must be one that
    validation reports; with `model`, two validation examples tell which, before any training."""
    if cfg.select_best == "none":
        return
    if not data.val:  # MT-bench-style tasks have no validation split
        raise ConfigError(f"train.select_best={cfg.select_best!r}: task has no validation split to select on")
    name = cfg.select_best.removeprefix("val/")
    if model is None or name in ("metric", "loss"):
        return
    training = model.training  # evaluators leave the model in train mode; the init's analyses see it as it was
    reported = data.evaluate(model, data.val[:2], EvalContext(accelerator, 2, "val"))
    model.train(training)
    if name not in reported:
        raise ConfigError(
            f"train.select_best={cfg.select_best!r}: validation of task reports {sorted(reported)}; "
            f"choose one of them, metric (the task's headline: {data.metric!r}), loss or none"
        )


def checkpoints(root: Path | None) -> list[Path]:
    """Complete checkpoints under `root`, oldest first. A save in progress is a hidden temporary directory, never
    listed, so a job killed while saving resumes from the previous checkpoint."""
    if root is None or not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


CHECKPOINT_META = "loralab.json"  # beside accelerate's files: what the job outside the loop needs on resume


def checkpoint_meta(checkpoint: Path) -> dict:
    """The job's notes in a checkpoint (its W&B run id); {} for checkpoints written before they existed."""
    path = Path(checkpoint) / CHECKPOINT_META
    return json.loads(path.read_text()) if path.is_file() else {}


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, keep: int, meta: dict | None = None) -> None:
    """accelerate's state (and `meta`) into <root>/step_<step>, atomically; then only the newest `keep` stay (0:
    all)."""
    main = accelerator.is_main_process
    with atomic_dir(root / f"step_{step}") if main else nullcontext() as tmp:
        # every process writes its own RNG state into the main process's temporary directory
        (tmp,) = broadcast_object_list([str(tmp) if main else None])
        accelerator.save_state(tmp)
        if main and meta:
            (Path(tmp) / CHECKPOINT_META).write_text(json.dumps(meta))
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


def steps_per_epoch(cfg: TrainConfig, n_train: int, world_size: int = 1) -> int:
    """Optimizer steps in one pass of the training loader: it drops a last partial batch (when there is more than
    one batch), each process takes every world_size-th batch, and accelerate steps at the end of an epoch even
    when the accumulation is incomplete."""
    batches = n_train // cfg.batch_size if n_train > cfg.batch_size else 1
    return max(1, math.ceil(math.ceil(batches / world_size) / cfg.grad_accum))


def total_steps(cfg: TrainConfig, n_train: int, world_size: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(cfg, n_train, world_size)))


LOWER_IS_BETTER = ("loss", "perplexity")  # validation metrics that improve downwards; every other one upwards


def improves(metric: str, new: float, old: float | None) -> bool:
    if old is None or math.isnan(old):
        return not math.isnan(new)
    return new < old if metric.rsplit("_", 1)[-1] in LOWER_IS_BETTER else new > old


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param  # FSDP2's DTensor: this process's shard


def trainable_snapshot(model) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters only (this process's shards under FSDP): a best checkpoint."""
    return {n: _local(p.detach()).to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_trainable(model, saved: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        if name in saved:
            _local(param).copy_(saved[name])


def fp32_master_weights(model) -> None:
    """fp16 mixed precision trains fp32 parameters (fp16 compute under autocast): the loss scaler refuses fp16
    gradients. Trainable fp16 parameters (an fp16 model's LieRA factors, full fine-tuning) become fp32 in place, the
    same Parameter objects, as PEFT's autocast_adapter_dtype does for its adapters; frozen weights stay fp16."""
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.float16:
            param.data = param.data.float()


def device_batches(data: TaskData, batch_size: int, seed: int | None, device) -> Iterator[dict]:
    """Training batches on `device`, epoch after epoch (for data-dependent initialisation): shuffled by `seed`, or
    in file order with seed=None."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    while True:
        for batch in DataLoader(
            data.train, batch_size=batch_size, shuffle=gen is not None, collate_fn=data.collate, generator=gen
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
    on_step: Callable[[int], None] | None = None,
    checkpoint_notes: dict | None = None,
) -> TrainResult:
    """Train `model` for the configured steps. With `resume`, continue from the newest checkpoint under
    `checkpoint_dir` (else start afresh and remove old ones); `checkpoint_layers` are the adapted layers whose frozen
    weights the checkpoints keep (see checkpoint_filter). `on_step(step)` runs after every optimizer step, on every
    process, outside the training time (the runner's analyses at `analysis_steps`); `checkpoint_notes` go into every
    checkpoint (checkpoint_meta reads them back)."""
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
    # the validation metric, or "none"
    selected = data.metric if cfg.select_best == "metric" else cfg.select_best.removeprefix("val/")
    check_select_best(cfg, data)

    def evaluate(split: str) -> dict[str, float]:
        ctx = EvalContext(accelerator, cfg.eval_batch_size, split, show, eval_dir)
        release_freed_memory()  # the training batches' freed buffers, before the evaluation's of another shape
        try:
            return data.evaluate(model, getattr(data, split), ctx)
        finally:
            release_freed_memory()

    def validate(step: int) -> tuple[dict[str, float], dict | None]:
        """Validation (and, with eval_test, the test split) at `step`; the best checkpoint so far is kept."""
        val = evaluate("val") if "val" in splits else {}
        if val:
            result.curves[metric].append([step, val[data.metric]])
            result.curves["val/loss"].append([step, val.get("loss", float("nan"))])
        test = evaluate("test") if cfg.eval_test and "test" in splits else None
        if test is not None:
            result.curves.setdefault(f"test/{data.metric}", []).append([step, test[data.metric]])
            for k, v in test.items():
                if isinstance(v, (int, float)) and improves(k, float(v), loop.test_best.get(k, [0, None])[1]):
                    loop.test_best[k] = [step, float(v)]
        if selected != "none":
            if selected not in val:
                raise ConfigError(f"train.select_best={cfg.select_best!r}: validation reports {sorted(val)}")
            if improves(selected, val[selected], loop.best.get("value")):
                params = trainable_snapshot(accelerator.unwrap_model(model))
                loop.best = {"step": step, "epoch": loop.epoch, "value": val[selected], "val": val, "test": test}
                loop.best["params"] = params
        return val, test

    def log_periodic(step: int, extra: dict | None = None) -> None:
        val, test = validate(step)
        logged = {f"val/{k}": v for k, v in val.items()} | (extra or {})
        tracker.log(logged | {f"test/{k}": v for k, v in (test or {}).items()}, step)

    steps = total_steps(cfg, len(data.train), accelerator.num_processes)
    show = cfg.progress and accelerator.is_main_process
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.precision == "fp16":
        fp32_master_weights(model)
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
            result.curves, result.resumed_from = loop.curves, loop.step  # W&B: the checkpoint's run continues

    def checkpoint_due() -> bool:
        return checkpoint_dir is not None and cfg.checkpoint_every > 0 and loop.step % cfg.checkpoint_every == 0

    by_steps = cfg.eval_every > 0 and cfg.eval_unit == "steps"
    by_epochs = cfg.eval_every > 0 and cfg.eval_unit == "epochs"
    periodic = "val" in splits or (cfg.eval_test and "test" in splits)  # something to evaluate along the way
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
                if accelerator.sync_gradients:  # the norm before clipping; max_grad_norm=0: measured, not clipped
                    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
                    grad_norm = float(accelerator.clip_grad_norm_(trainable, max_norm))
                optimizer.step()
                if accelerator.sync_gradients:
                    variant.after_optimizer_step(model, loop.step)
                optimizer.zero_grad(set_to_none=True)
            window.append(losses.float().mean().item())
            if "attention_mask" in batch:
                loop.tokens += int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            loop.step += 1
            step = loop.step
            scheduler.step()
            if step % TRIM_EVERY == 0:
                release_freed_memory()
            loss_value = float(np.mean(window))
            window = []
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            lr = scheduler.get_last_lr()[0]
            result.curves["train/loss"].append([step, loss_value])
            result.curves["train/lr"].append([step, lr])
            if step % cfg.log_every == 0 or step == steps:
                logged = {"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm, "epoch": loop.epoch}
                tracker.log(logged, step)
            if by_steps and step % cfg.eval_every == 0 and step < steps and periodic:
                log_periodic(step)
            if on_step is not None:  # before the checkpoint: a job resumed from it has seen this step's call
                paused = time.perf_counter()
                on_step(step)
                start += time.perf_counter() - paused  # not training time
            if checkpoint_due():
                loop.train_time_s = time.perf_counter() - start
                save_checkpoint(accelerator, checkpoint_dir, step, cfg.keep_checkpoints, checkpoint_notes)
            if step >= steps:
                break
        else:  # the epoch ran out (not the step budget)
            loop.epoch, loop.batches_in_epoch = loop.epoch + 1, 0
            if by_epochs and loop.epoch % cfg.eval_every == 0 and loop.step < steps and periodic:
                log_periodic(loop.step, {"epoch": loop.epoch})
    bar.close()
    result.steps, result.train_time_s = loop.step, time.perf_counter() - start
    result.tokens = int(accelerator.reduce(torch.tensor(loop.tokens, device=accelerator.device), "sum"))
    final, test = validate(loop.step) if periodic else ({}, None)
    result.metrics.update({f"val/{k}": v for k, v in final.items()})
    best = loop.best if selected != "none" else {}
    if best:  # (empty when every validation value was NaN: the last step stays)
        if best["step"] != loop.step:  # the last step is not the best: back to the selected adapter
            restore_trainable(accelerator.unwrap_model(model), best["params"])
        test = best["test"]  # evaluated at that step with eval_test; else None, evaluated below
        result.metrics = {f"val/{k}": v for k, v in best["val"].items()}
        result.metrics |= {f"final/val/{k}": v for k, v in final.items()}
        result.metrics |= {"best/step": best["step"], "best/epoch": best["epoch"]}
    if "test" in splits:
        test = test if test is not None else evaluate("test")
        result.metrics.update({f"test/{k}": v for k, v in test.items()})
    result.metrics |= {f"test_best/{k}": value for k, (_, value) in loop.test_best.items()}
    if data.metric in loop.test_best:  # where the headline metric peaked
        result.metrics["test_best/step"] = loop.test_best[data.metric][0]
    tracker.log(result.metrics, loop.step)
    return result
