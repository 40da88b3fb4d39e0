"""The effective update ΔW = W_final − W0 of each adapted matrix, one matrix at a time, in its cheapest exact form.

A :class:`MatrixUpdate` holds what ΔW and W0 are made of, not the m x n matrices: low-rank factors (ΔW = left·right:
LoRA, rsLoRA, LoRA+ s·B·A; LoRA-GA, PiSSA, PEFT's LoRA-GA s·(B·A − B0·A0) = [s·B, −s·B0]·[A; A0]; AdaLoRA
s/(ranknum+1e-5)·B·(A ⊙ E)) or, for full-rank updates (LieRA W0 ⊙ s·B·A, DoRA, full fine-tuning), a function
that forms ΔW from the frozen weight and copies of the layer's adapter tensors of this moment. W0 is recomputed
from the model: the frozen weight (LoRA, LieRA, DoRA) plus s·B0·A0 where the init moved it out (LoRA-GA, PiSSA);
only full fine-tuning, which overwrites W, needs the variant's own copy.

:func:`matrix_updates` yields one per adapted matrix; the analyses consume it and drop it, so at most one ΔW is
formed at a time, and holding every update at once (the first-step probe does) costs about one adapter, not every
ΔW. Each form is tested against the variant's `delta_weights` (the reference, all matrices at once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from loralab.analysis.lowrank import factor_svd, working_dtype


def _matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _hi(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class MatrixUpdate:
    """ΔW and W0 of one adapted matrix (conv kernels flattened to out x rest by :meth:`matrix`)."""

    name: str
    shape: torch.Size  # the weight's own shape
    initial: Callable[[], torch.Tensor]  # W0 (weight-shaped), formed on demand
    left: torch.Tensor | None = None  # low rank: ΔW = left @ right as out x rest matrices
    right: torch.Tensor | None = None
    form: Callable[[], torch.Tensor] | None = None  # full rank: forms ΔW (weight-shaped)
    eps: float = float(torch.finfo(torch.float32).eps)  # machine epsilon of the dtype ΔW is stored in
    _svd: tuple | None = field(default=None, repr=False)

    @property
    def low_rank(self) -> bool:
        return self.left is not None

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], self.shape.numel() // self.shape[0]

    def dense(self) -> torch.Tensor:
        """ΔW formed (weight-shaped, at least fp32): for the analyses that need every entry."""
        if self.low_rank:
            return (_hi(self.left) @ _hi(self.right).to(self.left.device)).reshape(self.shape)
        return self.form()

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, S, Vh) of ΔW as an out x rest matrix, cached: from the factors (min(m, n, k) triplets, exact) or one
        full SVD shared by every analysis of this matrix (float64 on CPU, float32 on an accelerator)."""
        if self._svd is None:
            if self.low_rank:
                self._svd = factor_svd(_matrix(self.left), _matrix(self.right))
            else:
                M = _matrix(self.dense())
                self._svd = torch.linalg.svd(M.to(working_dtype(M)), full_matrices=False)
        return self._svd

    def singular_values(self) -> torch.Tensor:
        """All min(m, n) singular values, descending (the factor form's rank-deficit as exact zeros)."""
        S = self.svd()[1]
        missing = min(self.matrix_shape) - S.numel()
        return torch.cat([S, S.new_zeros(missing)]) if missing > 0 else S

    def fro_norm(self) -> float:
        """‖ΔW‖_F: from the singular values when they are known or cheap (factors), else from ΔW formed."""
        if self.low_rank or self._svd is not None:
            return float(torch.linalg.vector_norm(self.svd()[1]))
        return float(self.dense().norm())


def _eps(t: torch.Tensor) -> float:
    return float(torch.finfo(torch.promote_types(t.dtype, torch.float32)).eps)


def _plain_lora(layer) -> bool:
    """A PEFT LoRA layer whose ΔW is s·B·A of its two factor matrices (Linear, or Conv2d with a 1x1 B)."""
    if getattr(layer, "use_dora", {}).get("default") or hasattr(layer, "lora_E"):
        return False
    return _plain_base(layer)


def _plain_base(layer) -> bool:
    """A Linear or ungrouped Conv2d base: PEFT's B·A is then the product of its factor matrices."""
    base = layer.get_base_layer()
    return isinstance(base, nn.Linear) or (isinstance(base, nn.Conv2d) and base.groups == 1)


def _lora_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with s·B·A = left @ right in the base weight's (out x rest) layout."""
    s = layer.scaling["default"]
    # copies (adapter-sized): the factors of this moment, whatever the model's parameters do next
    A, B = (_matrix(_hi(layer.lora_A["default"].weight)).clone(), _matrix(_hi(layer.lora_B["default"].weight)))
    if getattr(layer, "fan_in_fan_out", False):  # GPT-2's Conv1D stores Wᵀ
        return A.transpose(0, 1), s * B.transpose(0, 1)
    return s * B, A


def _peft_initial(base: torch.Tensor, s: float, init=None, dense_init=None) -> Callable[[], torch.Tensor]:
    """W0 of a PEFT layer, formed on demand: the frozen weight plus the init product s·B0·A0 that an init (LoRA-GA,
    PiSSA) moved out of it, kept as factors (or, from older variants, as a matrix)."""

    def initial():
        w0 = _hi(base)
        if init is not None:
            A0, B0 = init
            w0 = w0 + s * (B0.to(w0) @ A0.to(w0)).reshape(w0.shape)
        if dense_init is not None:
            w0 = w0 + dense_init.to(w0)
        return w0

    return initial


class _Call(nn.Module):
    """fn(layer) as a module call, so that `torch.func.functional_call` can run it on other tensors than the layer's."""

    def __init__(self, layer: nn.Module, fn: Callable[[nn.Module], torch.Tensor]):
        super().__init__()
        self.layer, self.fn = layer, fn

    def forward(self) -> torch.Tensor:
        return self.fn(self.layer)


def _lazy(layer: nn.Module, fn: Callable[[nn.Module], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """fn(layer) (the layer's own maths, e.g. its merged weight) formed on demand with copies of its adapter tensors
    of this moment (adapter-sized; the frozen base weight is read, not copied). functional_call swaps the copies in
    without writing to the layer's parameters, which a backward in flight may have saved (the first-step probe)."""
    copies = {f"layer.{n}": p.detach().clone() for n, p in layer.named_parameters() if not n.startswith("base_layer.")}
    call = _Call(layer, fn)

    def form():
        with torch.no_grad():
            return torch.func.functional_call(call, copies, ())

    return form


def _loralib_conv_update(name: str, layer, variant) -> MatrixUpdate:
    """loralib's conv layout: ΔW = s·(B·A).view(kernel) with B·A over the unrolled kernel ((out·k) x (in/g·k)), which
    is not low rank as the out x (in/g·k·k) matrix the analyses read: formed on demand, DoRA's rescaling included
    (the layer's own `_adapted_weight`, as its merge)."""
    base = layer.get_base_layer().weight
    init = getattr(variant, "factors_init", {}).get(name)  # PiSSA's (A0, B0) in the same layout
    initial = _peft_initial(base, layer.scaling["default"], init)
    adapted = _lazy(layer, lambda m: m._adapted_weight(m.get_base_layer().weight, "default"))
    return MatrixUpdate(name, base.shape, initial, form=lambda: adapted() - initial(), eps=_eps(base))


def _peft_update(name: str, layer, variant) -> MatrixUpdate:
    from loralab.variants.conv_lora import LoralibConv2d  # noqa: PLC0415  (variants import the analysis package)

    if isinstance(layer, LoralibConv2d):
        return _loralib_conv_update(name, layer, variant)
    base = layer.get_base_layer().weight
    init = getattr(variant, "factors_init", {}).get(name)  # LoRA-GA's (A0, B0) (CPU, at least fp32)
    dense_init = getattr(variant, "initial_delta", {}).get(name)  # an init product kept as a matrix
    s = layer.scaling["default"]
    initial = _peft_initial(base, s, init, dense_init)
    if _plain_lora(layer) and dense_init is None:
        left, right = _lora_factors(layer)
        if init is not None:
            A0, B0 = (t.to(left) for t in init)
            left, right = torch.cat([left, -s * B0], dim=1), torch.cat([right, A0], dim=0)
        return MatrixUpdate(name, base.shape, initial, left=left, right=right, eps=_eps(base))
    if getattr(layer, "use_dora", {}).get("default") and _plain_base(layer):
        # DoRA (PEFT's merge): W = m / ‖W0 + s·B·A‖_row ⊙ (W0 + s·B·A), a conv kernel as out x rest (its norm is per
        # output channel); m, A, B copied (adapter-sized) so that the form stays the one of this moment
        m = _hi(layer.lora_magnitude_vector["default"].weight).flatten().clone()
        left, right = _lora_factors(layer)

        def form():
            w0 = _matrix(_hi(base))
            w = w0 + left @ right
            return ((m / torch.linalg.norm(w, dim=1)).view(-1, 1) * w - w0).reshape(base.shape)

        return MatrixUpdate(name, base.shape, initial, form=form, eps=_eps(base))
    if hasattr(layer, "lora_E"):  # AdaLoRA: s/(ranknum + 1e-5)·B·(A ⊙ E), PEFT's get_delta_weight as factors
        c = layer.scaling["default"] / (float(layer.ranknum["default"].detach()) + 1e-5)
        left = c * _hi(layer.lora_B["default"])
        right = _hi(layer.lora_A["default"]) * _hi(layer.lora_E["default"])
        if not getattr(layer, "fan_in_fan_out", False) and dense_init is None:
            return MatrixUpdate(name, base.shape, initial, left=left, right=right, eps=_eps(base))
    # any other PEFT layer: PEFT's own ΔW, formed on demand
    peft_delta = _lazy(layer, lambda m: m.get_delta_weight("default"))

    def form():
        delta = _hi(peft_delta()).reshape(base.shape)
        return delta if dense_init is None else delta - dense_init.to(delta)

    return MatrixUpdate(name, base.shape, initial, form=form, eps=_eps(base))


def _liera_update(name: str, layer, variant) -> MatrixUpdate:
    from loralab.variants.lierra import _scaled_delta, _weight, initial_weight  # noqa: PLC0415  (the variant's maths)

    base = layer.base_layer.weight
    w_frozen = base if not layer.merged else layer._w0
    init = getattr(variant, "factors_init", {}).get(name)  # PiSSA+LieRA: W0 = W_frozen ⊙ exp(s·B0·A0)
    if init is None and layer.lora_magnitude is None:
        a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()  # adapter-sized: this moment's factors
        s, exact = layer.scaling, layer.exact_exp

        def form():  # W0 ⊙ s·B·A (or W0 ⊙ expm1(s·B·A)): full rank in general
            return _weight(w_frozen, _scaled_delta(a, b, s, w_frozen.shape), exact, False)

        return MatrixUpdate(name, base.shape, lambda: _hi(w_frozen), form=form, eps=_eps(base))

    def initial():
        return _hi(w_frozen) if init is None else initial_weight(layer, *init)

    # DoRA+LieRA's magnitude, PiSSA+LieRA's moved W0: the layer's own weight, formed on demand
    effective = _lazy(layer, lambda m: m.effective_weight())
    return MatrixUpdate(name, base.shape, initial, form=lambda: effective() - initial(), eps=_eps(base))


def matrix_updates(model: nn.Module, variant) -> Iterator[MatrixUpdate]:
    """One :class:`MatrixUpdate` per adapted matrix of `variant` on `model`, keyed by the base model's layer name
    (the order of `variant.delta_weights`). Nothing m x n is formed until an analysis asks for it."""
    from loralab.variants.full import FullFinetune  # noqa: PLC0415  (variants import the analysis package)
    from loralab.variants.lierra import liera_layers  # noqa: PLC0415
    from loralab.variants.lora import lora_layers  # noqa: PLC0415

    if isinstance(variant, FullFinetune):  # W is overwritten: W0 is the variant's CPU copy
        modules = dict(model.named_modules())
        for name, w0 in variant.initial.items():
            weight = modules[name].weight
            yield MatrixUpdate(
                name,
                weight.shape,
                lambda w0=w0: _hi(w0),
                form=lambda w=weight, w0=w0: _hi(w) - w0.to(_hi(w)),
                eps=_eps(weight),
            )
        return
    peft = lora_layers(model)
    if peft:
        for name, layer in peft.items():
            yield _peft_update(name, layer, variant)
        return
    liera = liera_layers(model)
    if liera:
        for name, layer in liera.items():
            yield _liera_update(name, layer, variant)
        return
    # a variant this module does not know: its own ΔW, all matrices at once (W0 is not recomputable here)
    for name, delta in variant.delta_weights(model).items():
        yield MatrixUpdate(name, delta.shape, lambda: None, form=lambda d=delta: d, eps=_eps(delta))
