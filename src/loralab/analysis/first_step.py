"""First-step alignment, measured: one plain-SGD step of a variant vs full fine-tuning's, from the same weights and
the same batch (LoRA-GA's premise; the definitions are in `alignment`). Full fine-tuning's first SGD step on W is
−η·G with G = ∂L/∂W; the variant's is its ΔW after one SGD step on its own parameters (dropout off).

:class:`FirstStepProbe` measures it on the run's own model, around the run's `variant.prepare`, with no copy of the
model, no second `prepare` and never more than one layer's G at a time::

    probe = FirstStepProbe(targets, first_batch)
    probe.before_prepare(model)                    # Σ‖W‖ over the targets (no backward)
    model = variant.prepare(model, targets, heads, ctx)
    rows = probe.after_prepare(model, variant)     # adapter step (snapshot, ΔW factors, restore; its backward also
                                                   # streams ‖G‖, which fixes lr), then G streamed

G is read where it is exact for every variant: at each adapted layer, from its input x and its output's gradient
(Σ_tokens ∂L/∂y·xᵀ, the gradient with respect to the layer's *effective* weight), so it does not matter how the
variant parametrizes the layer. At init every variant computes the pretrained function, so this is full
fine-tuning's G at the pretrained weights (up to the rounding of LoRA-GA's W0 − s·B0·A0 + s·B0·A0).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from loralab.analysis.alignment import alignment_from_sums, fro_sums
from loralab.analysis.lowrank import factor_svd, top_singular_values
from loralab.analysis.updates import matrix_updates

PEFT_PREFIX = "base_model.model."


def _target_modules(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """The module at each target name, in the plain model or under PEFT's wrapper prefix."""
    modules = dict(model.named_modules())
    return {n: modules[n] if n in modules else modules[PEFT_PREFIX + n] for n in targets}


def _base(module: nn.Module) -> nn.Module:
    if hasattr(module, "get_base_layer"):
        return module.get_base_layer()
    return getattr(module, "base_layer", module)


def _conv_padding(conv: nn.Conv2d, x: torch.Tensor):
    """(input as the convolution sees it, integer padding) for torch.nn.grad.conv2d_weight."""
    if conv.padding_mode != "zeros":
        return nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0)
    if conv.padding == "valid":
        return x, (0, 0)
    if conv.padding == "same":
        return x, tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return x, conv.padding


def _weight_grad(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """(G, factors): ∂L/∂W of the layer's effective weight from its input x and output gradient gy (fp32, fp64 stays
    fp64), and for a linear layer its factors G = gyᵀ·x over the T tokens (rank ≤ T: an exact SVD when T is small)."""
    base = _base(module)
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, gy = x.detach().to(dtype), gy.to(dtype)
    if isinstance(base, nn.Linear):
        gy, x = gy.reshape(-1, gy.shape[-1]).transpose(0, 1), x.reshape(-1, x.shape[-1])
        return gy @ x, (gy, x)
    if isinstance(base, nn.Conv2d):
        x, padding = _conv_padding(base, x)
        G = torch.nn.grad.conv2d_weight(x, base.weight.shape, gy, base.stride, padding, base.dilation, base.groups)
        return G, None
    raise TypeError(f"first-step probe: no weight gradient for {type(base).__name__} layers")


def _top_energy(G: torch.Tensor, factors, k: int, tol: float) -> tuple[float, float]:
    """(Σ_{i≤k} σ_i² of G, the achieved relative tolerance): exact from G = gyᵀ·x when the tokens are fewer than
    min(out, in), else by block Krylov iteration (`lowrank.top_singular_values`)."""
    if factors is not None and factors[0].shape[1] < min(G.shape):
        S = factor_svd(*factors)[1]
        return float(S[:k].square().sum()), 0.0
    top, achieved = top_singular_values(G.reshape(G.shape[0], -1), k, tol=tol)
    return float(top.square().sum()), achieved


@contextmanager
def _kept_state(model: nn.Module, params: list):
    """Inside: eval mode, only `params` require grad, every .grad None. On exit the model's requires_grad flags,
    .grad values and training mode are as they were."""
    flags = {p: p.requires_grad for p in model.parameters()}
    previous = {p: p.grad for p in flags}
    was_training = model.training
    try:
        model.eval()
        model.requires_grad_(False)
        for p in flags:
            p.grad = None
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = previous[p]
        model.train(was_training)


def _streamed_backward(model: nn.Module, modules: dict[str, nn.Module], batch: dict, consume, free: list) -> None:
    """One backward on `batch` (the model's requires_grad and mode as they are) calling consume(name, G, factors)
    for each module as soon as its G exists; the parameters in `free` drop their gradient the moment it accumulates."""
    handles = []

    def on_forward(name):
        def hook(module, args, output):
            x = args[0]
            if output.requires_grad:
                output.register_hook(lambda gy: consume(name, *_weight_grad(module, x, gy)))

        return hook

    try:
        handles += [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in free]
        handles += [m.register_forward_hook(on_forward(n)) for n, m in modules.items()]
        with torch.enable_grad():
            model(**batch).loss.backward()
    finally:
        for h in handles:
            h.remove()


def stream_layer_gradients(model: nn.Module, modules: dict[str, nn.Module], params: list, batch: dict, consume):
    """One eval-mode backward on `batch` that calls consume(name, G, factors) for each module as soon as its G exists
    and keeps nothing: G = ∂L/∂W_eff from the module's input and output gradient. Only `params` require grad
    meanwhile (so that the graph reaches every module); their gradients are freed the moment they are accumulated.
    The model's state is restored (`_kept_state`)."""
    with _kept_state(model, params):
        _streamed_backward(model, modules, batch, consume, free=params)


class FirstStepProbe:
    """Per adapted matrix: cosine, raw relative error and best-scale relative error (1 − cos²) of the variant's
    first SGD update against full fine-tuning's −lr·G on `batch`, beside the Eckart–Young optimum of a rank-2r
    update (top-2r singular values of G to relative tolerance `tol`, reported as ``eckart_young_tol``). Without
    `lr`, full fine-tuning's step is made `relative_step` of ‖W‖ (ΔW read as a weight difference must stay well
    above the weights' rounding).

    Both phases leave the model as they found it (parameter values, requires_grad flags, .grad, training mode) and
    the CPU/CUDA RNG state untouched, so the calling run is the same with or without the probe. Extra memory: one
    layer's G (and ΔW) at a time, plus a snapshot of the adapters' parameters."""

    def __init__(self, targets: list[str], batch: dict, lr: float | None = None, relative_step: float = 1e-3, tol=1e-9):
        self.targets = list(targets)
        self.batch = batch
        self.lr = lr
        self.relative_step = relative_step
        self.tol = tol
        self.ready = False

    def before_prepare(self, model) -> None:
        """On the model the variant will then prepare: Σ‖W‖ over the targets, which with Σ‖G‖ (streamed during
        the variant's own step, below) fixes `lr` when it is not given."""
        if self.lr is None:
            modules = _target_modules(model, self.targets)
            self.w_norm = sum(float(_base(m).weight.detach().norm()) for m in modules.values())
        self.ready = True

    def after_prepare(self, model, variant) -> list[dict]:
        """The variant's plain SGD step with `lr` on the adapted layers' trainable parameters (snapshotted and
        restored in place; a target weight that trains itself, as in full fine-tuning, steps by −lr·G exactly), its
        ΔW per matrix kept in factor form, then G streamed layer by layer. Returns one row per target; a probe is
        used once."""
        if not self.ready:
            raise RuntimeError("FirstStepProbe.after_prepare needs before_prepare (on the unprepared model) first")
        self.ready = False
        modules = _target_modules(model, self.targets)
        own = {n for n, m in modules.items() if _base(m).weight.requires_grad}  # full fine-tuning: u = −lr·G
        weights = {id(_base(m).weight) for m in modules.values()}
        adapter = list({id(p): p for m in modules.values() for p in m.parameters() if p.requires_grad}.values())
        stepped = [p for p in adapter if id(p) not in weights]
        with torch.random.fork_rng():
            updates = self._variant_step(model, variant, modules, adapter, stepped, own)
            lr, rows = self.lr, {}

            def consume(name, G, factors):
                # alignment(u, −lr·G) = alignment(−u/lr, G): no second m x n matrix, and full fine-tuning's −u/lr
                # is G itself (rel_error exactly 0)
                v = G if name in own else updates.pop(name).dense().reshape(G.shape).mul_(-1 / lr)
                dot, vv, total, dd = fro_sums(v, G)
                stats = alignment_from_sums(dot, vv, total, dd)
                top, tol = _top_energy(G, factors, 2 * variant.rank, self.tol)
                rows[name] = {
                    "name": name,
                    "lr": lr,
                    **stats,
                    "rel_error_best_scale": 1 - stats["cosine"] ** 2,
                    "eckart_young_2r": max(1 - top / total, 0.0) if total > 0 else float("nan"),
                    "eckart_young_tol": tol,
                }

            stream_layer_gradients(model, modules, adapter, self.batch, consume)
        missing = [n for n in self.targets if n not in rows]
        if missing:
            raise RuntimeError(f"first-step probe: no gradient reached {missing[:3]} (no trainable parameter there?)")
        return [rows[n] for n in self.targets]

    def _variant_step(self, model, variant, modules, adapter, stepped, own) -> dict:
        """ΔW of one SGD step on `stepped` (eval mode), as MatrixUpdates holding copies, with `stepped` restored.
        Without a given lr, the same backward streams ‖G‖ per target (each G dropped at once) and fixes it."""
        norms = []
        measure = self.lr is None
        if not stepped and not measure:
            return {}
        snapshot = [p.detach().clone() for p in stepped]
        keep = {id(p) for p in stepped}
        try:
            with _kept_state(model, adapter):
                targets = modules if measure else {}
                free = [p for p in adapter if id(p) not in keep]
                _streamed_backward(model, targets, self.batch, lambda n, G, _: norms.append(float(G.norm())), free)
                if measure:
                    self.lr = self.relative_step * self.w_norm / max(sum(norms), 1e-30)
                with torch.no_grad():  # torch.optim.SGD without momentum or weight decay: p ← p − lr·∂L/∂p
                    for p in stepped:
                        if p.grad is not None:
                            p.add_(p.grad, alpha=-self.lr)
                    return {u.name: u for u in matrix_updates(model, variant) if u.name not in own}
        finally:
            with torch.no_grad():
                for p, saved in zip(stepped, snapshot):
                    p.copy_(saved)
