"""Conv2d LoRA in loralib's layout (microsoft/LoRA `loralib/layers.py`, `ConvLoRA`), as a PEFT custom LoRA layer.

For a kernel W0 of shape (out, in/g, kh, kw) the adapter is two matrices over the unrolled kernel,
A ∈ R^{r·kh × (in/g)·kw}, B ∈ R^{out·kh × r·kh}, and ΔW = s·(B·A).view(out, in/g, kh, kw): the product has
out·kh·(in/g)·kw = out·(in/g)·kh·kw entries, so the view is exact for any groups g, depthwise (g = in = out)
included. y = conv(x, W0 + ΔW) with the base layer's stride, padding (mode), dilation and groups. A is
Kaiming-uniform (a = √5), B is zero, so the model starts unchanged. (loralib itself shapes A as r·k × in·k and B as
out/g·k × r·k; for g = 1, and for depthwise convolutions, the parameter count is the same, and the layout here is
the one LieRA's `variants/lierra.py` uses, so LoRA and LieRA adapt a kernel with identical factors.)

Why not PEFT's own Conv2d LoRA (peft 0.21, `tuners/lora/layer.py`, `_ConvNd`): there A is a k×k convolution
in → r (r·in·kh·kw parameters, ungrouped) and B a 1×1 convolution r → out with the base layer's groups
(out·r/g parameters), i.e. another parameter count than the paper's budget; it refuses a grouped convolution unless
r is divisible by its groups ("support is limited to conv layers where the rank is divisible by groups"), so a
7×7 depthwise convolution of 128-1024 channels cannot be adapted at r = 8 or 16, and it raises
NotImplementedError when merging any grouped convolution. The layout is a variant option
(`variant.conv_layout: loralib | peft`); loralib is the default, PEFT's stays available by name.

The layer plugs into PEFT through its custom-module dispatch (`LoraConfig._register_custom_module`), so the rest
of a LoRA run — `get_peft_model`, the trainable-parameter marking, `save_pretrained` — is PEFT's. PEFT does not
store the custom mapping in `adapter_config.json`; `save_adapter_layout` writes it beside the adapter and
`load_lora_adapter` re-registers it before `PeftModel.from_pretrained`.

On the same reshaped kernel (the (out·kh) × ((in/g)·kw) matrix W0.view(out·kh, (in/g)·kw), whose low-rank factors
B, A are):
- DoRA (`use_dora`): W = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_c, the norm per output channel over (in/g, kh, kw) — the kernel
  viewed as out × ((in/g)·kh·kw), as PEFT's DoRA does for convolutions; m starts at ‖W0‖_c and the norm is treated
  as a constant in backward (DoRA §4.3, as PEFT).
- PiSSA (`init_lora_weights="pissa"` / `"pissa_niter_<n>"`): the top-q singular triplets of that matrix,
  q = min(r·kh, rank), B = U_q·√(S_q/s), A = √(S_q/s)·V_qᵀ, frozen weight W0 − s·(B·A).view(kernel). Where the
  matrix has fewer than r·kh singular values (a depthwise kernel: (in/g)·kw = kw columns), the remaining rows of
  A / columns of B start as LoRA's (Kaiming / zero), so they still train.
Merge and unmerge are exact: merging keeps a copy of the original kernel (a kernel is small) and unmerge restores it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from loralab.variant_configs import ConvLayout

CONV_LAYOUTS = tuple(c.value for c in ConvLayout)
LAYOUT_FILE = "loralab_adapter.json"


def _hi(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _Magnitude(nn.Module):
    """DoRA's per-output-channel magnitude, under PEFT's state-dict name (`lora_magnitude_vector.<adapter>.weight`)."""

    def __init__(self, norm: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(norm)


def channel_norm(w: torch.Tensor) -> torch.Tensor:
    """‖w‖ per output channel, shaped to broadcast against w."""
    return w.flatten(1).norm(dim=1).view(-1, *([1] * (w.dim() - 1)))


class LoralibConv2d(nn.Module, LoraLayer):
    """PEFT LoRA layer for nn.Conv2d in loralib's layout (module docstring)."""

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha=1, **kw):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self._originals: dict[str, torch.Tensor] = {}  # the kernel before each merge, for an exact unmerge
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha, config: LoraConfig, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if config.lora_bias:
            raise ValueError("conv_layout=loralib: lora_bias is not supported (loralib's ConvLoRA has no bias)")
        w = self.get_base_layer().weight
        out_c, in_g, kh, kw = w.shape
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name], self.use_dora[adapter_name] = config.use_rslora, config.use_dora
        self.lora_bias[adapter_name] = False
        dropout = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # nn.Linear holds each factor with its (rows, cols) as weight (out_features, in_features), PEFT's convention
        make = lambda rows, cols: nn.Linear(cols, rows, bias=False, device=w.device, dtype=w.dtype)
        self.lora_A[adapter_name] = make(r * kh, in_g * kw)
        self.lora_B[adapter_name] = make(out_c * kh, r * kh)
        nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter_name].weight)
        init = config.init_lora_weights
        if isinstance(init, str) and init.startswith("pissa"):
            self._pissa_init(adapter_name, init)
        elif init is not True and init is not False:
            raise ValueError(f"conv_layout=loralib: init_lora_weights={init!r} is not defined for its conv layers")
        if config.use_dora:  # m0 = ‖W0 + ΔW0‖_c (ΔW0 ≠ 0 after PiSSA's init), so the layer starts unchanged
            start = _hi(w.detach()) + _hi(self.get_delta_weight(adapter_name).detach())
            self.lora_magnitude_vector[adapter_name] = _Magnitude(channel_norm(start).flatten().to(w.dtype))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def _pissa_init(self, adapter_name: str, init: str) -> None:
        w = self.get_base_layer().weight
        a, b, s = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight, self.scaling[adapter_name]
        matrix = _hi(w).reshape(b.shape[0], a.shape[1])
        q = min(a.shape[0], *matrix.shape)
        if init == "pissa":
            u, sv, vh = torch.linalg.svd(matrix, full_matrices=False)
        else:  # PEFT's fast variant: "pissa_niter_<n>"
            u, sv, v = torch.svd_lowrank(matrix, q=q, niter=int(init.split("_niter_")[-1]))
            vh = v.T
        root = (sv[:q] / s).sqrt()
        a[:q] = (root[:, None] * vh[:q]).to(a.dtype)
        b[:, :q] = (u[:, :q] * root).to(b.dtype)
        w.copy_((_hi(w) - s * (_hi(b) @ _hi(a)).view(w.shape)).to(w.dtype))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW = s·(B·A).view(kernel): the additive update of LoRA (DoRA's rescaling is applied in `_adapted_weight`)."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        w = self.get_base_layer().weight
        return (self.scaling[adapter] * (_hi(b) @ _hi(a))).view(w.shape).to(w.dtype)

    def _adapted_weight(self, weight: torch.Tensor, adapter: str) -> torch.Tensor:
        """The kernel the adapter makes of `weight` (W0 + ΔW, or DoRA's m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_c), in fp32+."""
        v = _hi(weight) + _hi(self.get_delta_weight(adapter))
        if adapter in self.lora_magnitude_vector:
            m = _hi(self.lora_magnitude_vector[adapter].weight).view(-1, 1, 1, 1)
            v = m / channel_norm(v).detach() * v
        return v

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge  # noqa: PLC0415

        weight = self.get_base_layer().weight
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            with torch.no_grad():
                merged = self._adapted_weight(weight, adapter).to(weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                self._originals[adapter] = weight.detach().clone()
                weight.copy_(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            with torch.no_grad():
                weight.copy_(self._originals.pop(self.merged_adapters.pop()))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
        result = None
        weight = base.weight
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            dropout = self.lora_dropout[adapter]
            if isinstance(dropout, nn.Identity):  # one convolution with the adapted kernel, as loralib
                kernel = self._adapted_weight(weight, adapter).to(x.dtype)
                result = base._conv_forward(x, kernel, base.bias)
            else:  # dropout on the adapter path's input only: (DoRA-scaled) W0 ⊛ x + ΔW ⊛ drop(x)
                scale = 1.0
                if adapter in self.lora_magnitude_vector:
                    v = _hi(weight) + _hi(self.get_delta_weight(adapter))
                    m = _hi(self.lora_magnitude_vector[adapter].weight)
                    scale = (m / channel_norm(v).detach().flatten()).to(x.dtype).view(1, -1, 1, 1)
                delta = self.get_delta_weight(adapter).to(x.dtype)
                out = base._conv_forward(x, weight.to(x.dtype), None) + base._conv_forward(dropout(x), delta, None)
                out = out * scale
                result = out if base.bias is None else out + base.bias.to(x.dtype).view(1, -1, 1, 1)
            break  # one active adapter: the harness trains one
        return base(x, *args, **kwargs) if result is None else result

    def __repr__(self) -> str:
        return "lora.loralib_" + super().__repr__()


def register_layout(config: LoraConfig, layout: str) -> LoraConfig:
    """Route the config's Conv2d targets to the chosen layout (PEFT's own needs nothing)."""
    if layout == "loralib":
        config._register_custom_module({nn.Conv2d: LoralibConv2d})
    return config


def save_adapter_layout(out_dir, layout: str) -> None:
    (Path(out_dir) / LAYOUT_FILE).write_text(json.dumps({"conv_layout": layout}, indent=2))


def load_lora_adapter(model: nn.Module, directory, **kwargs) -> PeftModel:
    """`PeftModel.from_pretrained` for an adapter saved by `Lora.save`, with the conv layout it was trained with."""
    d = Path(directory)
    config = LoraConfig.from_pretrained(str(d))
    config.init_lora_weights = True  # the saved factors are loaded: an init (PiSSA's SVD) must not move the base again
    layout = json.loads((d / LAYOUT_FILE).read_text())["conv_layout"] if (d / LAYOUT_FILE).is_file() else "peft"
    return PeftModel.from_pretrained(model, str(d), config=register_layout(config, layout), **kwargs)
