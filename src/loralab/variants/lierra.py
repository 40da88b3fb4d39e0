"""LieRA (Si et al. 2025): multiplicative update W = W0 ⊙ exp(s·Δ), Δ = B·A, s = α/r (α/√r with rsLoRA).

Default is the official first-order form W = W0 ⊙ (1 + s·Δ) (Chongjie-Si/Subspace-Tuning, layers_LieRA.py);
`exact_exp` uses the elementwise exponential. A is Kaiming-uniform (a=√5), B is zero, so the model starts
unchanged. Conv2d kernels use loralib's layout: A (r·kh × in/g·kw), B (out·kh × r·kh), Δ = (B·A).view(kernel).

ε-policy (`eps`, off by default as in the official code): entries of W0 are never updated multiplicatively
where W0 = 0, so with `eps` set every |W0| < eps is overwritten *in the frozen weight* by ±eps (sign kept,
0 -> +eps) when the layer is wrapped. ΔW (`delta_weights`) is then relative to that clipped W0; the clip itself
(at most eps per entry) is a fixed reparametrisation, re-applied identically by `load_liera_adapter`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from loralab.config import ConfigError, VariantConfig
from loralab.targets import matches
from loralab.variants.base import Variant, cpu_copy

ALLOWED_INITS = ("default",)
WEIGHTS_FILE, CONFIG_FILE = "liera_adapter.safetensors", "liera_config.json"


@dataclass
class LieraVariantConfig(VariantConfig):
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter path's input only: y = W0·x + (W − W0)·drop(x), as in the official code
    use_rslora: bool = False
    exact_exp: bool = False  # W0 ⊙ exp(sΔ) instead of the first-order W0 ⊙ (1 + sΔ)
    eps: float | None = None  # ε-policy for zero weights, see the module docstring
    init: str = "default"  # A Kaiming-uniform, B zero; additive inits (PiSSA, LoRA-GA, ...) do not apply


# Shared maths. Δ and the weight are formed in fp32 (exp included; fp64 stays fp64 for gradcheck); only the
# product with x runs in the compute dtype, as nn.Linear / nn.Conv2d would under autocast.
def _hi(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _scaled_delta(a, b, s, shape):
    return s * (_hi(b) @ _hi(a)).view(shape)


def _weight(w0, sd, exact, plus_base):
    """The effective weight M = W0 ⊙ (1 + sΔ) (or ⊙ exp(sΔ)); with plus_base=False the update M − W0 alone."""
    w = _hi(w0)
    if exact:
        return w * (sd.exp() if plus_base else sd.expm1())
    return w * (1 + sd) if plus_base else w * sd


def _grad_ab(g_w, w0, sd, a, b, s, exact):
    """dL/dA, dL/dB from dL/dM: dM/dΔ = s·W0 (⊙ exp(sΔ) when exact), then back through the reshape and B·A."""
    g = s * _hi(w0) * _hi(g_w)
    if exact:
        g = g * sd.exp()
    g = g.reshape(b.shape[0], a.shape[1])
    return (_hi(b).T @ g).to(a.dtype), (g @ _hi(a).T).to(b.dtype)


def _no_autocast(x):
    return torch.autocast(x.device.type, enabled=False)


# Why custom autograd: plain autograd keeps M = W0 ⊙ (1 + sΔ) (out×in, as much as full fine-tuning) per layer for
# backward. These save only x, W0 (a parameter: no extra memory), A, B and rebuild M in backward.
class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, bias, a, b, s, exact, plus_base):
        ctx.save_for_backward(x, w0, a, b)
        ctx.cfg = (s, exact, plus_base)
        with _no_autocast(x):
            m = _weight(w0, _scaled_delta(a, b, s, w0.shape), exact, plus_base).to(x.dtype)
            return F.linear(x, m, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        x, w0, a, b = ctx.saved_tensors
        s, exact, plus_base = ctx.cfg
        gx = gbias = ga = gb = None
        with _no_autocast(x):
            sd = _scaled_delta(a, b, s, w0.shape)
            if ctx.needs_input_grad[0]:
                gx = gy @ _weight(w0, sd, exact, plus_base).to(gy.dtype)
            if ctx.needs_input_grad[2]:
                gbias = gy.reshape(-1, gy.shape[-1]).sum(0)
            if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
                g_w = gy.reshape(-1, gy.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # summed over all leading dims
                ga, gb = _grad_ab(g_w, w0, sd, a, b, s, exact)
        return gx, None, gbias, ga, gb, None, None, None


class _Conv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, bias, a, b, s, exact, plus_base, conv):  # conv = (stride, padding, dilation, groups)
        ctx.save_for_backward(x, w0, a, b)
        ctx.cfg = (s, exact, plus_base, conv)
        with _no_autocast(x):
            m = _weight(w0, _scaled_delta(a, b, s, w0.shape), exact, plus_base).to(x.dtype)
            return F.conv2d(x, m, None if bias is None else bias.to(x.dtype), *conv)

    @staticmethod
    def backward(ctx, gy):
        x, w0, a, b = ctx.saved_tensors
        s, exact, plus_base, conv = ctx.cfg
        gx = gbias = ga = gb = None
        with _no_autocast(x):
            sd = _scaled_delta(a, b, s, w0.shape)
            if ctx.needs_input_grad[0]:
                m = _weight(w0, sd, exact, plus_base).to(gy.dtype)
                gx = torch.nn.grad.conv2d_input(x.shape, m, gy, *conv)
            if ctx.needs_input_grad[2]:
                gbias = gy.sum((0, 2, 3))
            if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
                g_w = torch.nn.grad.conv2d_weight(x, w0.shape, gy, *conv)
                ga, gb = _grad_ab(g_w, w0, sd, a, b, s, exact)
        return gx, None, gbias, ga, gb, None, None, None, None


class _LieraLayer(nn.Module):
    """Shared part of the wrappers: frozen `base_layer`, factors, ε-policy, merge/unmerge."""

    def __init__(self, base_layer, a_shape, b_shape, scaling, exact_exp=False, dropout=0.0, eps=None):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.scaling, self.exact_exp, self.naive = scaling, exact_exp, False  # naive: plain autograd, for tests
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        w = base_layer.weight
        if eps is not None:
            with torch.no_grad():
                clip = torch.full_like(w, eps)
                w.copy_(torch.where(w.abs() < eps, torch.where(w < 0, -clip, clip), w))
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._w0: torch.Tensor | None = None  # fp32 copy of the original weight while merged

    @property
    def merged(self) -> bool:
        return self._w0 is not None

    def _base_weight(self):
        return self.base_layer.weight if self._w0 is None else self._w0

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.base_layer.weight.shape)

    def effective_update(self) -> torch.Tensor:
        w0 = self._base_weight()
        return _weight(w0, _scaled_delta(self.lora_A, self.lora_B, self.scaling, w0.shape), self.exact_exp, False)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("LieRA layer is already merged; unmerge() first")
        w = self.base_layer.weight
        self._w0 = _hi(w.detach()).clone()  # kept, not divided back out: unmerge must be bitwise exact
        sd = _scaled_delta(self.lora_A, self.lora_B, self.scaling, w.shape)
        w.copy_(_weight(self._w0, sd, self.exact_exp, True).to(w.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("LieRA layer is not merged; nothing to unmerge")
        self.base_layer.weight.copy_(self._w0)  # fp32 holds any lower-precision original exactly
        self._w0 = None

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        dev = x.device.type
        x = x.to(torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype)
        if self.dropout is not None and self.training:  # dropout only on the adapter path, so split the two paths
            return self.base_layer(x) + self._adapt(self.dropout(x), None, plus_base=False)
        return self._adapt(x, self.base_layer.bias, plus_base=True)

    def _adapt(self, x, bias, plus_base):
        w0, a, b, s = self.base_layer.weight, self.lora_A, self.lora_B, self.scaling
        if self.naive:
            with _no_autocast(x):
                m = _weight(w0, _scaled_delta(a, b, s, w0.shape), self.exact_exp, plus_base).to(x.dtype)
                return self._op(x, m, None if bias is None else bias.to(x.dtype))
        return self._fn(x, w0, bias, a, b, s, self.exact_exp, plus_base)


class LieraLinear(_LieraLayer):
    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, **kw):
        super().__init__(base_layer, (r, base_layer.in_features), (base_layer.out_features, r), scaling, **kw)

    _op = staticmethod(F.linear)
    _fn = staticmethod(_LinearFn.apply)


class LieraConv2d(_LieraLayer):
    def __init__(self, base_layer: nn.Conv2d, r: int, scaling: float, **kw):
        out_c, in_g, kh, kw_ = base_layer.weight.shape
        super().__init__(base_layer, (r * kh, in_g * kw_), (out_c * kh, r * kh), scaling, **kw)
        # (out·kh)×(in_g·kw) = out·in_g·kh·kw elements, so (B·A).view(kernel) is exact; torch.nn.grad needs ints
        padding = base_layer.padding
        if padding == "valid" or base_layer.padding_mode != "zeros":
            padding = (0, 0)  # non-zero padding modes: the input is padded explicitly in _pad, like nn.Conv2d
        elif padding == "same":
            total = [d * (k - 1) for d, k in zip(base_layer.dilation, (kh, kw_))]
            if any(t % 2 for t in total):
                raise ConfigError(f"LieRA: conv padding='same' with an even kernel {(kh, kw_)} is not supported")
            padding = tuple(t // 2 for t in total)
        self.conv = (base_layer.stride, padding, base_layer.dilation, base_layer.groups)

    def _pad(self, x):
        c = self.base_layer
        return x if c.padding_mode == "zeros" else F.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode)

    def _op(self, x, m, bias):
        return F.conv2d(self._pad(x), m, bias, *self.conv)

    def _fn(self, x, w0, bias, a, b, s, exact, plus_base):
        return _Conv2dFn.apply(self._pad(x), w0, bias, a, b, s, exact, plus_base, self.conv)


def liera_layers(model: nn.Module) -> dict[str, _LieraLayer]:
    """LieRA layers keyed by the original (base model) layer name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _LieraLayer)}


def apply_liera(model, targets, rank, scaling, exact_exp=False, dropout=0.0, eps=None) -> nn.Module:
    """Replace each target layer (full dotted name) by its LieRA wrapper, in place."""
    modules = dict(model.named_modules())
    for name in targets:
        layer = modules[name]
        wrapper = {nn.Linear: LieraLinear, nn.Conv2d: LieraConv2d}.get(type(layer))
        if wrapper is None:
            raise ConfigError(f"LieRA supports nn.Linear and nn.Conv2d; target {name!r} is {type(layer).__name__}")
        parent, _, child = name.rpartition(".")
        new = wrapper(layer, rank, scaling, exact_exp=exact_exp, dropout=dropout, eps=eps)
        setattr(modules[parent] if parent else model, child, new)
    return model


def merge_liera(model: nn.Module) -> None:
    for m in liera_layers(model).values():
        m.merge()


def unmerge_liera(model: nn.Module) -> None:
    for m in liera_layers(model).values():
        m.unmerge()


def load_liera_adapter(model: nn.Module, directory) -> nn.Module:
    """Inverse of `Liera.save`: wrap the saved targets of a fresh base model and load A, B and the head weights."""
    d = Path(directory)
    c = json.loads((d / CONFIG_FILE).read_text())
    apply_liera(model, c["targets"], c["rank"], c["scaling"], c["exact_exp"], c["dropout"], c["eps"])
    params = dict(model.named_parameters())
    state = load_file(str(d / WEIGHTS_FILE))
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ConfigError(f"{d / WEIGHTS_FILE}: tensors {unknown[:5]} have no parameter in {type(model).__name__}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    return model


class Liera(Variant):
    name = "lierra"
    config_class = LieraVariantConfig

    def __init__(self, cfg: LieraVariantConfig, rank: int):
        super().__init__(cfg, rank)
        if cfg.init not in ALLOWED_INITS:
            raise ConfigError(
                f"variant.init={cfg.init!r}: LieRA's forward is multiplicative, W0 ⊙ (1 + s·B·A), so an additive "
                f"init (one that starts from W0 + B·A, e.g. pissa, loraga, olora, gaussian) is mathematically wrong "
                f"for it; allowed: {list(ALLOWED_INITS)}"
            )
        self.scaling = cfg.alpha / (math.sqrt(rank) if cfg.use_rslora else rank)

    def prepare(self, model, targets, head_modules, ctx=None):
        model.requires_grad_(False)
        self.targets = list(targets)
        self.heads = [n for n, _ in model.named_modules() if any(matches(n, h) for h in head_modules)]
        missing = [h for h in head_modules if not any(matches(n, h) for n in self.heads)]
        if missing:
            raise ConfigError(f"head_modules {missing} do not exist in {type(model).__name__}")
        modules = dict(model.named_modules())
        for n in self.heads:
            modules[n].requires_grad_(True)
        c = self.cfg
        return apply_liera(model, self.targets, self.rank, self.scaling, c.exact_exp, c.dropout, c.eps)

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: cpu_copy(m.effective_update()) for n, m in liera_layers(model).items()}

    def factors(self, model):
        return {n: (cpu_copy(m.lora_A), cpu_copy(m.lora_B)) for n, m in liera_layers(model).items()}

    def save(self, model, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        state = {}
        for n, m in liera_layers(model).items():
            state[f"{n}.lora_A"], state[f"{n}.lora_B"] = m.lora_A, m.lora_B
        modules = dict(model.named_modules())
        for h in self.heads:
            state |= {f"{h}.{p}": t for p, t in modules[h].named_parameters()}
        save_file({k: t.detach().cpu().clone().contiguous() for k, t in state.items()}, str(out_dir / WEIGHTS_FILE))
        c = self.cfg
        meta = dict(rank=self.rank, alpha=c.alpha, scaling=self.scaling, use_rslora=c.use_rslora)
        meta |= dict(exact_exp=c.exact_exp, eps=c.eps, dropout=c.dropout, targets=self.targets, head_modules=self.heads)
        (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
