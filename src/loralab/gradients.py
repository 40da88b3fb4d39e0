"""Full-weight gradients of the target matrices, averaged over N training micro-batches (LoRA-GA's estimate).

Streaming, as the official LoRA-GA code does: only target weights require grad, and each weight's gradient is
moved off the accelerator and added into an fp32 buffer the moment autograd has accumulated it (a
post-accumulate-grad hook), then freed. Peak extra accelerator memory is one layer's gradient, not all of them.

Data parallel, as the official code (a prepared, sharded loader, then an all-reduce): the N micro-batches are split
over the processes, each sums its share, and the all-reduced sum / N is the same mean one process would compute.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm


def estimate_gradients(
    model: nn.Module,
    targets: list[str],
    batches: Iterable[dict],
    n_batches: int,
    offload_device: str | torch.device = "cpu",
    train_mode: bool = True,
) -> dict[str, torch.Tensor]:
    """Mean over `n_batches` of ∂L/∂W for each target layer's weight (fp32, on `offload_device`).

    Runs in train mode (dropout on, as the official code); `train_mode=False` runs it in eval mode (dropout off,
    deterministic: the first-step probe's full fine-tuning gradient). The model's mode is restored either way.
    With several processes (torch.distributed initialised) `batches` must be the same seeded sequence on every
    process: process k takes batches k, k + world, ... and the sums are all-reduced, so the estimate is the
    single-process one over the same N batches."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    modules = dict(model.named_modules())
    was_training, requires = model.training, {p: p.requires_grad for p in model.parameters()}
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def offload(name):
        def hook(param):
            # fp32 accumulation (fp64 stays fp64: closed-form tests run the model in double precision)
            dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
            grad = param.grad.detach().to(device=offload_device, dtype=dtype)
            param.grad = None  # from here on `grad` is only ours: the first one becomes the buffer, no copy
            sums[name] = sums[name].add_(grad) if name in sums else grad

        return hook

    model.train(train_mode)
    model.requires_grad_(False)
    for name in targets:
        weight = modules[name].weight
        weight.requires_grad_(True)
        hooks.append(weight.register_post_accumulate_grad_hook(offload(name)))
    count, share = 0, len(range(rank, n_batches, world))
    try:
        mine = islice(batches, rank, n_batches, world)
        for batch in tqdm(mine, total=share, desc="gradient estimate", disable=None if rank == 0 else True):
            model(**batch).loss.backward()
            count += 1
    finally:
        for hook in hooks:
            hook.remove()
        for param, flag in requires.items():
            param.requires_grad_(flag)
        model.train(was_training)
    if count < share:
        raise ValueError(
            f"gradient estimation needs {n_batches} batches but the training data gave only {count} of this "
            f"process's {share}"
        )
    if world > 1:
        for name in targets:  # in the same order on every process; a process with no batch (N < world) adds zeros
            weight = modules[name].weight
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            buffer = sums[name].to(weight.device) if name in sums else torch.zeros_like(weight, dtype=dtype)
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            sums[name] = buffer.to(offload_device)
    for total in sums.values():
        total.div_(n_batches)  # in place: a divided copy of every gradient would double the peak
    return sums
