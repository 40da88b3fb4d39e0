"""First-step alignment, measured: one plain-SGD step of a variant vs full fine-tuning's, from the same weights and
the same batch (LoRA-GA's premise; the definitions are in `alignment`). Full fine-tuning's first SGD step on W is
−η·G with G = ∂L/∂W; the variant's is its ΔW after one SGD step on its own parameters (dropout off).

:class:`FirstStepProbe` measures it on the run's own model, in two phases around the run's `variant.prepare`, with
no copy of the model and no second `prepare` (so a data-dependent init such as LoRA-GA's is the run's real one, and
its `grad_cache` only ever holds the real estimate)::

    probe = FirstStepProbe(targets, first_batch)
    probe.before_prepare(model)                    # G per target weight, streamed to CPU; fixes lr
    model = variant.prepare(model, targets, heads, ctx)
    rows = probe.after_prepare(model, variant)     # one SGD step, ΔW, then every parameter restored in place
"""

from __future__ import annotations

import copy
import itertools

import torch

from loralab.analysis.alignment import alignment, eckart_young
from loralab.gradients import estimate_gradients


class FirstStepProbe:
    """Per adapted matrix: cosine, raw relative error and best-scale relative error (1 − cos²) of the variant's
    first SGD update against full fine-tuning's −lr·G on `batch`, beside the Eckart–Young optimum of a rank-2r
    update. Without `lr`, full fine-tuning's step is made `relative_step` of ‖W‖ (ΔW read as a weight difference
    must stay well above the weights' rounding).

    Both phases leave the model as they found it (parameter values, requires_grad flags, .grad, training mode) and
    the CPU/CUDA RNG state untouched, so the calling run is the same with or without the probe."""

    def __init__(self, targets: list[str], batch: dict, lr: float | None = None, relative_step: float = 1e-3):
        self.targets = list(targets)
        self.batch = batch
        self.lr = lr
        self.relative_step = relative_step
        self.grads: dict[str, torch.Tensor] | None = None

    def before_prepare(self, model) -> None:
        """Full fine-tuning's G = ∂L/∂W of every target weight on the batch, in eval mode (dropout off), streamed
        layer by layer to CPU (fp32; fp64 models stay fp64). Call it on the model the variant will then prepare."""
        modules = dict(model.named_modules())
        weights = [modules[n].weight for n in self.targets]
        previous = [w.grad for w in weights]  # None in a run; kept so that the estimate does not add into them
        try:
            for w in weights:
                w.grad = None
            with torch.random.fork_rng(), torch.enable_grad():  # CPU and CUDA generators: the run must not shift
                grads = estimate_gradients(model, self.targets, [self.batch], 1, train_mode=False)
        finally:
            for w, g in zip(weights, previous):
                w.grad = g
        self.grads = {n: grads.pop(n) for n in self.targets}
        if self.lr is None:
            w_norm = sum(float(w.detach().norm()) for w in weights)
            g_norm = sum(float(g.norm()) for g in self.grads.values())
            self.lr = self.relative_step * w_norm / max(g_norm, 1e-30)

    def after_prepare(self, model, variant) -> list[dict]:
        """One plain SGD step with `lr` on every trainable parameter of the prepared `model` (adapters at their
        init), ΔW = `variant.delta_weights`, then the trainable parameters are restored in place from a snapshot
        (adapter-sized for adapter variants; the whole model for full fine-tuning). Returns one row per target;
        G is freed, so a probe is used once."""
        if self.grads is None:
            raise RuntimeError("FirstStepProbe.after_prepare needs before_prepare (on the unprepared model) first")
        lr, was_training = self.lr, model.training
        params = [p for p in model.parameters() if p.requires_grad]
        previous = [p.grad for p in params]
        snapshot = [p.detach().clone() for p in params]
        try:
            with torch.random.fork_rng():
                model.eval()
                for p in params:
                    p.grad = None
                with torch.enable_grad():
                    model(**self.batch).loss.backward()
                with torch.no_grad():  # torch.optim.SGD without momentum or weight decay: p ← p − lr·∂L/∂p
                    for p in params:
                        if p.grad is not None:
                            p.add_(p.grad, alpha=-lr)
                            p.grad = None
                deltas = variant.delta_weights(model)
        finally:
            with torch.no_grad():
                for p, saved in zip(params, snapshot):
                    p.copy_(saved)
            for p, g in zip(params, previous):
                p.grad = g
            model.train(was_training)
            del snapshot
        grads, self.grads = self.grads, None
        rows = []
        for name in self.targets:
            G = grads.pop(name)
            stats = alignment(deltas[name], -lr * G)
            rows.append(
                {
                    "name": name,
                    "lr": lr,
                    **stats,
                    "rel_error_best_scale": 1 - stats["cosine"] ** 2,
                    "eckart_young_2r": eckart_young(G, 2 * variant.rank),
                }
            )
            del G
        return rows


def _without_grad_cache(cfg):
    """The variant config with any gradient cache (LoRA-GA's `grad_cache`) switched off: a probe's estimate must
    never be written to, or read from, the run's cache."""
    if getattr(cfg, "grad_cache", None) is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.grad_cache = None
    return cfg


def first_step_alignment(
    model, variant, targets: list[str], batch: dict, lr: float | None = None, relative_step: float = 1e-3
) -> list[dict]:
    """:class:`FirstStepProbe`'s rows for a *fresh* variant of `variant`'s type and config prepared on one copy of
    `model` (head frozen; data-dependent inits estimated from `batch` repeated; any gradient cache off). `model`,
    `variant` and the RNG state are left untouched. For small models and tests: it costs one model copy, and the
    measured init is the probe's own, not the run's; a run uses :class:`FirstStepProbe` around its own prepare."""
    from loralab.variants import PrepareContext  # noqa: PLC0415  (variants import the analysis package)

    with torch.random.fork_rng():  # the fresh variant's init draws from the RNG
        probe = FirstStepProbe(targets, batch, lr=lr, relative_step=relative_step)
        probe.before_prepare(model)
        fresh = type(variant)(_without_grad_cache(variant.cfg), variant.rank)
        adapted = fresh.prepare(
            copy.deepcopy(model), targets, [], PrepareContext(train_batches=lambda size: itertools.repeat(batch))
        )
        rows = probe.after_prepare(adapted, fresh)
        del adapted
    return rows
