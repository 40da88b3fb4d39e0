"""First-step alignment, measured: one plain-SGD step of a variant vs full fine-tuning's, from the same weights and
the same batch (LoRA-GA's premise; the definitions are in `alignment`). Full fine-tuning's first SGD step on W is
−η·G with G = ∂L/∂W; the variant's is its ΔW after one SGD step on its own parameters (head frozen, dropout off).
"""

from __future__ import annotations

import copy
import itertools

import torch

from loralab.analysis.alignment import alignment, eckart_young


def first_step_alignment(
    model, variant, targets: list[str], batch: dict, lr: float | None = None, relative_step: float = 1e-3
) -> list[dict]:
    """Per adapted matrix: cosine, raw relative error and best-scale relative error (1 − cos²) of the variant's
    first update against −lr·G, beside the Eckart–Young optimum of a rank-2r update. Without `lr`, full
    fine-tuning's step is made `relative_step` of ‖W‖ (ΔW read as a weight difference must stay well above the
    weights' rounding). `model` is left untouched; the RNG state is restored, so the calling run is the same with
    or without this analysis."""
    with torch.random.fork_rng():  # CPU and CUDA generators: the probe must not shift the run
        full = copy.deepcopy(model).eval()
        modules = dict(full.named_modules())
        weights = [modules[n].weight for n in targets]
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            grads = torch.autograd.grad(full(**batch).loss, weights)
        if lr is None:
            w_norm = sum(float(w.detach().norm()) for w in weights)
            lr = relative_step * w_norm / max(sum(float(g.norm()) for g in grads), 1e-30)
        del full
        probe = type(variant)(variant.cfg, variant.rank)
        from loralab.variants import PrepareContext  # noqa: PLC0415  (variants import the analysis package)

        adapted = probe.prepare(
            copy.deepcopy(model), targets, [], PrepareContext(train_batches=lambda size: itertools.repeat(batch))
        )
        adapted.eval()
        params = [p for p in adapted.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr)
        with torch.enable_grad():
            adapted(**batch).loss.backward()
        optimizer.step()
        deltas = probe.delta_weights(adapted)
    rows = []
    for name, G in zip(targets, grads):
        G = G.detach().cpu()
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
    return rows
