"""LieRA (Si et al. 2025): multiplicative update W = W0 ⊙ exp(s·Δ), Δ = B·A, s = α/r (α/√r with rsLoRA).

Default is the official first-order form W = W0 ⊙ (1 + s·Δ) (Chongjie-Si/Subspace-Tuning, layers_LieRA.py);
`exact_exp` uses the elementwise exponential. A is Kaiming-uniform (a=√5), B is zero, so the model starts
unchanged. Conv2d kernels use loralib's layout: A (r·kh × in/g·kw), B (out·kh × r·kh), Δ = (B·A).view(kernel).

ε-policy (`eps`, off by default as in the official code): entries of W0 are never updated multiplicatively
where W0 = 0, so with `eps` set every |W0| < eps is overwritten *in the frozen weight* by ±eps (sign kept,
0 -> +eps) when the layer is wrapped. ΔW (`delta_weights`) is then relative to that clipped W0; the clip itself
(at most eps per entry) is a fixed reparametrisation, re-applied identically by `load_liera_adapter`.

The paper's "+LieRA" rows, defined in the Lie algebra (a linear space, where Δ can be PiSSA- or DoRA-style at an
unchanged parameter budget). Weights with no zero entry form a group under ⊙; W0 = sign(W0) ⊙ exp(L0) with the
Lie-algebra coordinate L0 = log|W0|, and the exponential moves only within sign(W0)'s component.

- PiSSA+LieRA (`pissa_lierra`, alias `pissa_liera`). L0 is reshaped to the factors' matrix (out × in for a linear
  layer; (out·kh) × ((in/g)·kw) for a kernel, the view B·A has) and its top-q singular triplets U_q, S_q, V_q,
  q = min(r, rank) (r·kh for a kernel), give B0 = U_q·√(S_q/s), A0 = √(S_q/s)·V_qᵀ, so s·B0·A0 is L0's best rank-q
  approximation (factor rows/columns beyond q start as LieRA's: A Kaiming, B zero). The frozen weight becomes
  W_frozen = W0 ⊙ exp(−s·B0·A0) = sign(W0) ⊙ exp(L0 − s·B0·A0) — the residual in the algebra — and the layer
  computes W = W_frozen ⊙ exp(s·B·A), which is W0 at init (up to fp32 rounding of exp(−x)·exp(x)). Always with the
  exponential: s·B0·A0 has entries of order log|W0| (≈ −4), where 1 + s·Δ is no approximation of exp and W_frozen
  would not be recovered. Zeros: where W0 = 0 the coordinate is −∞; those entries get, for the SVD only, the mean
  of log|W0| over the layer's non-zero entries (a neutral filler that keeps them out of the spectrum's top), and
  their weight stays 0 whatever B·A does, as in plain LieRA (with the ε-policy they are ±ε first, and log ε is
  their coordinate). ΔW = W_final − W0 (the initial W0 − W_frozen recorded at init is subtracted).
- DoRA+LieRA (`dora_lierra`, alias `dora_liera`). DoRA's magnitude / direction split of the multiplicative weight:
  V = W0 ⊙ exp(s·B·A) (first order W0 ⊙ (1 + s·B·A) by default, as LieRA), W = m ⊙ V / ‖V‖_c with ‖·‖_c the norm
  per output channel (a row of a linear weight; a kernel's (in/g, kh, kw) slice, i.e. the kernel viewed as
  out × ((in/g)·kh·kw), as PEFT's DoRA on convolutions), m ∈ R^out trained, initialised to ‖W0‖_c so W = W0 at
  init; ‖V‖_c is a constant in backward, as DoRA §4.3 and PEFT do. No dropout (DoRA's split of the dropout path
  has no multiplicative counterpart here).

Both use the same custom autograd as LieRA (`_LieraFn`: only x, W0, A, B, m are kept for backward; the weight is
rebuilt there), and merge / unmerge exactly (the original weight is kept while merged).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from loralab.config import ConfigError
from loralab.targets import matches
from loralab.variant_configs import LieraVariantConfig, PissaLieraVariantConfig
from loralab.variants.base import Variant, cpu_copy

ALLOWED_INITS = ("default",)
WEIGHTS_FILE, CONFIG_FILE = "liera_adapter.safetensors", "liera_config.json"


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


def _channel_norm(v):
    """DoRA's column norm, per output channel (a row of a linear weight, a kernel's (in/g, kh, kw) slice)."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def _adapted(w0, a, b, mag, s, exact, plus_base):
    """(M, V, 1/‖V‖_c, sΔ): the weight the layer applies, LieRA's V = W0 ⊙ exp(sΔ) (or its first order) and, with a
    DoRA magnitude m, M = m ⊙ V / ‖V‖_c (the norm a constant in backward, DoRA §4.3); M = V without one."""
    sd = _scaled_delta(a, b, s, w0.shape)
    v = _weight(w0, sd, exact, plus_base)
    if mag is None:
        return v, v, None, sd
    inv_norm = 1 / _channel_norm(v)
    return _hi(mag).view(inv_norm.shape) * inv_norm * v, v, inv_norm, sd


class _LinearOp:
    """y = x·Mᵀ + bias and its three gradients (over every leading dimension of x)."""

    @staticmethod
    def apply(x, m, bias):
        return F.linear(x, m, bias)

    @staticmethod
    def grad_input(x, m, gy):
        return gy @ m

    @staticmethod
    def grad_weight(x, shape, gy):
        return gy.reshape(-1, gy.shape[-1]).T @ x.reshape(-1, x.shape[-1])

    @staticmethod
    def grad_bias(gy):
        return gy.reshape(-1, gy.shape[-1]).sum(0)


class _Conv2dOp:
    """F.conv2d with fixed (stride, padding, dilation, groups) and its gradients through torch.nn.grad."""

    def __init__(self, stride, padding, dilation, groups):
        self.args = (stride, padding, dilation, groups)

    def apply(self, x, m, bias):
        return F.conv2d(x, m, bias, *self.args)

    def grad_input(self, x, m, gy):
        return torch.nn.grad.conv2d_input(x.shape, m, gy, *self.args)

    def grad_weight(self, x, shape, gy):
        return torch.nn.grad.conv2d_weight(x, shape, gy, *self.args)

    @staticmethod
    def grad_bias(gy):
        return gy.sum((0, 2, 3))


# Why custom autograd: plain autograd keeps M = W0 ⊙ (1 + sΔ) (out×in, as much as full fine-tuning) per layer for
# backward. This saves only x, W0 (a parameter: no extra memory), A, B (and DoRA's magnitude) and rebuilds M in
# backward. One function serves every variant: `mag` is None for LieRA and PiSSA+LieRA.
class _LieraFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, bias, a, b, mag, op, s, exact, plus_base):
        ctx.save_for_backward(x, w0, a, b, mag)
        ctx.cfg = (op, s, exact, plus_base)
        with _no_autocast(x):
            m = _adapted(w0, a, b, mag, s, exact, plus_base)[0].to(x.dtype)
            return op.apply(x, m, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        x, w0, a, b, mag = ctx.saved_tensors
        op, s, exact, plus_base = ctx.cfg
        gx = gbias = ga = gb = gmag = None
        with _no_autocast(x):
            m, v, inv_norm, sd = _adapted(w0, a, b, mag, s, exact, plus_base)
            if ctx.needs_input_grad[0]:
                gx = op.grad_input(x, m.to(gy.dtype), gy)
            if ctx.needs_input_grad[2]:
                gbias = op.grad_bias(gy)
            if any(ctx.needs_input_grad[3:6]):
                g_m = _hi(op.grad_weight(x, w0.shape, gy))  # dL/dM, summed over the batch
                if mag is not None:  # M = m ⊙ V/‖V‖_c, norm constant: dL/dm = Σ dL/dM ⊙ V/‖V‖_c, dL/dV = m/‖V‖_c dL/dM
                    gmag = (g_m * v * inv_norm).flatten(1).sum(1).to(mag.dtype)
                    g_m = _hi(mag).view(inv_norm.shape) * inv_norm * g_m
                ga, gb = _grad_ab(g_m, w0, sd, a, b, s, exact)
        return gx, None, gbias, ga, gb, gmag, None, None, None, None


def initial_weight(layer, a0: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
    """PiSSA+LieRA's W0 = W_frozen ⊙ exp(s·B0·A0) of `layer`, recomputed from its init factors (fp32+)."""
    w = _hi(layer._base_weight())
    return w * _scaled_delta(a0.to(w.device), b0.to(w.device), layer.scaling, w.shape).exp()


class _LieraLayer(nn.Module):
    """Shared part of the wrappers: frozen `base_layer`, factors, ε-policy, DoRA magnitude, merge/unmerge."""

    def __init__(self, base_layer, a_shape, b_shape, scaling, exact_exp=False, dropout=0.0, eps=None, dora=False):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.scaling, self.exact_exp, self.naive = scaling, exact_exp, False  # naive: plain autograd, for tests
        if dora and dropout > 0:
            raise ConfigError(f"dora_lierra: variant.dropout={dropout} is not supported (DoRA+LieRA is defined for 0)")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        w = base_layer.weight
        if eps is not None:
            with torch.no_grad():
                clip = torch.full_like(w, eps)
                w.copy_(torch.where(w.abs() < eps, torch.where(w < 0, -clip, clip), w))
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # DoRA+LieRA: m starts at ‖W0‖_c, so m ⊙ V/‖V‖_c = W0 while Δ = 0
        norm = _channel_norm(_hi(w.detach())).flatten().to(w.dtype) if dora else None
        self.lora_magnitude = None if norm is None else nn.Parameter(norm)
        self._w0: torch.Tensor | None = None  # fp32 copy of the original weight while merged

    @property
    def merged(self) -> bool:
        return self._w0 is not None

    def _base_weight(self):
        return self.base_layer.weight if self._w0 is None else self._w0

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        names = ("lora_A", "lora_B") + (() if self.lora_magnitude is None else ("lora_magnitude",))
        return {n: getattr(self, n) for n in names}

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.base_layer.weight.shape)

    def effective_weight(self, w0=None) -> torch.Tensor:
        w0 = self._base_weight() if w0 is None else w0
        return _adapted(w0, self.lora_A, self.lora_B, self.lora_magnitude, self.scaling, self.exact_exp, True)[0]

    def effective_update(self) -> torch.Tensor:
        """W − W_frozen (W_frozen: the wrapped layer's weight, W0 unless PiSSA+LieRA moved its principal part)."""
        w0 = self._base_weight()
        if self.lora_magnitude is not None:
            return self.effective_weight(w0) - _hi(w0)
        return _weight(w0, _scaled_delta(self.lora_A, self.lora_B, self.scaling, w0.shape), self.exact_exp, False)

    @torch.no_grad()
    def pissa_init(self, niter: int | None = None) -> None:
        """PiSSA+LieRA (module docstring): s·B·A = the top-q SVD of L = log|W0| on the layout's (B rows) × (A cols)
        matrix, q = min(rank of the layout, rank of L); frozen weight W0 ⊙ exp(−s·B·A)."""
        w = self.base_layer.weight
        w_hi = _hi(w)
        nonzero = w_hi != 0
        log_abs = w_hi.abs().clamp_min(torch.finfo(w_hi.dtype).tiny).log()
        filler = log_abs[nonzero].mean() if nonzero.any() else log_abs.new_zeros(())
        coord = torch.where(nonzero, log_abs, filler).reshape(self.lora_B.shape[0], self.lora_A.shape[1])
        q = min(self.lora_A.shape[0], *coord.shape)
        if niter is None:
            u, sv, vh = torch.linalg.svd(coord, full_matrices=False)
        else:
            u, sv, v = torch.svd_lowrank(coord, q=q, niter=niter)
            vh = v.T
        root = (sv[:q] / self.scaling).sqrt()
        self.lora_A[:q] = (root[:, None] * vh[:q]).to(self.lora_A.dtype)
        self.lora_B[:, :q] = (u[:, :q] * root).to(self.lora_B.dtype)
        self.reparametrise()

    @torch.no_grad()
    def reparametrise(self, a0=None, b0=None) -> None:
        """W_frozen ← W0 ⊙ exp(−s·B0·A0) (B0, A0: the current factors unless given), so that the layer's output
        W_frozen ⊙ exp(s·B0·A0) is W0's. Entries where W0 = 0 stay 0."""
        w = self.base_layer.weight
        a0 = self.lora_A if a0 is None else a0.to(w.device)
        b0 = self.lora_B if b0 is None else b0.to(w.device)
        w.copy_((_hi(w) * (-_scaled_delta(a0, b0, self.scaling, w.shape)).exp()).to(w.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("LieRA layer is already merged; unmerge() first")
        w = self.base_layer.weight
        self._w0 = _hi(w.detach()).clone()  # kept, not divided back out: unmerge must be bitwise exact
        w.copy_(self.effective_weight(self._w0).to(w.dtype))

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
        w0, a, b, mag, s = self.base_layer.weight, self.lora_A, self.lora_B, self.lora_magnitude, self.scaling
        x = self._pad(x)
        if self.naive:  # plain autograd, DoRA's norm detached as in the custom backward
            with _no_autocast(x):
                v = _weight(w0, _scaled_delta(a, b, s, w0.shape), self.exact_exp, plus_base)
                m = v if mag is None else _hi(mag).view(-1, *([1] * (v.dim() - 1))) * v / _channel_norm(v).detach()
                return self.op.apply(x, m.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return _LieraFn.apply(x, w0, bias, a, b, mag, self.op, s, self.exact_exp, plus_base)

    def _pad(self, x):
        return x


class LieraLinear(_LieraLayer):
    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, **kw):
        super().__init__(base_layer, (r, base_layer.in_features), (base_layer.out_features, r), scaling, **kw)
        self.op = _LinearOp()


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
        self.op = _Conv2dOp(base_layer.stride, padding, base_layer.dilation, base_layer.groups)

    def _pad(self, x):
        c = self.base_layer
        return x if c.padding_mode == "zeros" else F.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode)


def liera_layers(model: nn.Module) -> dict[str, _LieraLayer]:
    """LieRA layers keyed by the original (base model) layer name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _LieraLayer)}


def apply_liera(model, targets, rank, scaling, exact_exp=False, dropout=0.0, eps=None, dora=False) -> nn.Module:
    """Replace each target layer (full dotted name) by its LieRA wrapper, in place."""
    modules = dict(model.named_modules())
    for name in targets:
        layer = modules[name]
        wrapper = {nn.Linear: LieraLinear, nn.Conv2d: LieraConv2d}.get(type(layer))
        if wrapper is None:
            raise ConfigError(f"LieRA supports nn.Linear and nn.Conv2d; target {name!r} is {type(layer).__name__}")
        parent, _, child = name.rpartition(".")
        new = wrapper(layer, rank, scaling, exact_exp=exact_exp, dropout=dropout, eps=eps, dora=dora)
        setattr(modules[parent] if parent else model, child, new)
    return model


def merge_liera(model: nn.Module) -> None:
    for m in liera_layers(model).values():
        m.merge()


def unmerge_liera(model: nn.Module) -> None:
    for m in liera_layers(model).values():
        m.unmerge()


def load_liera_adapter(model: nn.Module, directory) -> nn.Module:
    """Inverse of `Liera.save`: wrap the saved targets of a fresh base model, rebuild PiSSA+LieRA's frozen weight
    W0 ⊙ exp(−s·B0·A0) from the saved initial factors, and load A, B (DoRA's m) and the head weights."""
    d = Path(directory)
    c = json.loads((d / CONFIG_FILE).read_text())
    dora = c.get("dora", False)
    apply_liera(model, c["targets"], c["rank"], c["scaling"], c["exact_exp"], c["dropout"], c["eps"], dora)
    state = load_file(str(d / WEIGHTS_FILE))
    layers = liera_layers(model)
    for name in [k.removesuffix(".lora_A0") for k in state if k.endswith(".lora_A0")]:
        layers[name].reparametrise(state.pop(f"{name}.lora_A0"), state.pop(f"{name}.lora_B0"))
    params = dict(model.named_parameters())
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
    dora: ClassVar[bool] = False

    def __init__(self, cfg: LieraVariantConfig, rank: int):
        super().__init__(cfg, rank)
        self.check_init(cfg)
        self.scaling = cfg.alpha / (math.sqrt(rank) if cfg.use_rslora else rank)

    def check_init(self, cfg) -> None:
        if cfg.init not in ALLOWED_INITS:
            raise ConfigError(
                f"variant.init={cfg.init!r}: LieRA's forward is multiplicative, W0 ⊙ (1 + s·B·A), so an additive "
                f"init (one that starts from W0 + B·A, e.g. pissa, loraga, olora, gaussian) is mathematically wrong "
                f"for it; allowed: {list(ALLOWED_INITS)}. PiSSA in the Lie algebra is variant=pissa_lierra"
            )

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
        return apply_liera(model, self.targets, self.rank, self.scaling, c.exact_exp, c.dropout, c.eps, self.dora)

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for n, m in liera_layers(model).items():
            out[n] = cpu_copy(m.effective_update())
            if n in getattr(self, "factors_init", {}):  # PiSSA+LieRA: relative to W0, not W_frozen
                out[n] -= cpu_copy(initial_weight(m, *self.factors_init[n]) - _hi(m._base_weight()))
        return out

    def factors(self, model):
        return {n: (cpu_copy(m.lora_A), cpu_copy(m.lora_B)) for n, m in liera_layers(model).items()}

    def save(self, model, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        state = {}
        for n, m in liera_layers(model).items():
            state |= {f"{n}.{k}": t for k, t in m.adapter_parameters().items()}
        for n, (a0, b0) in getattr(self, "factors_init", {}).items():  # W_frozen = W0 ⊙ exp(−s·B0·A0) on load
            state[f"{n}.lora_A0"], state[f"{n}.lora_B0"] = a0, b0
        modules = dict(model.named_modules())
        for h in self.heads:
            state |= {f"{h}.{p}": t for p, t in modules[h].named_parameters()}
        save_file({k: t.detach().cpu().clone().contiguous() for k, t in state.items()}, str(out_dir / WEIGHTS_FILE))
        c = self.cfg
        meta = dict(variant=self.name, rank=self.rank, alpha=c.alpha, scaling=self.scaling, use_rslora=c.use_rslora)
        meta |= dict(exact_exp=c.exact_exp, eps=c.eps, dropout=c.dropout, init=c.init, dora=self.dora)
        meta |= dict(targets=self.targets, head_modules=self.heads)
        (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


class PissaLiera(Liera):
    """PiSSA+LieRA (module docstring): B0·A0 from the top-r SVD of log|W0|, frozen weight W0 ⊙ exp(−s·B0·A0)."""

    name = "pissa_lierra"
    config_class = PissaLieraVariantConfig

    def check_init(self, cfg) -> None:
        niter = cfg.init.removeprefix("pissa_niter_")
        if cfg.init != "pissa" and not (cfg.init.startswith("pissa_niter_") and niter.isdigit() and int(niter) >= 0):
            raise ConfigError(f"variant.init={cfg.init!r}: pissa_lierra takes 'pissa' or 'pissa_niter_<n>'")
        if not cfg.exact_exp:
            raise ConfigError(
                "variant.exact_exp=false: PiSSA+LieRA starts at s·B0·A0 = the principal part of log|W0| (entries "
                "of order log|W0|), where the first-order W0 ⊙ (1 + s·B0·A0) does not invert its frozen weight; "
                "it is defined with the exponential (exact_exp=true)"
            )

    def prepare(self, model, targets, head_modules, ctx=None):
        model = super().prepare(model, targets, head_modules, ctx)
        niter = None if self.cfg.init == "pissa" else int(self.cfg.init.removeprefix("pissa_niter_"))
        self.factors_init = {}  # adapter-sized: W0 = W_frozen ⊙ exp(s·B0·A0) is recomputed from them
        for n, layer in liera_layers(model).items():
            layer.pissa_init(niter)
            self.factors_init[n] = (cpu_copy(layer.lora_A), cpu_copy(layer.lora_B))
        return model


class DoraLiera(Liera):
    """DoRA+LieRA (module docstring): W = m ⊙ V / ‖V‖_c, V = W0 ⊙ exp(s·B·A) (or its first order), m from ‖W0‖_c."""

    name = "dora_lierra"
    dora = True
