"""LoRA-GA (Wang et al. 2024) exactly as the official implementation (Outsider565/LoRA-GA) computes it.

1. G = mean of ∂L/∂W0 over N training micro-batches (loralab.gradients: streamed, fp32), by default the first N
   rows in file order whatever the seed, as their `select(range(bsz * iters))` (`grad_sample`).
2. U, S, V = svd_lowrank(G, q=min(4r, min(G.shape)), niter=4); Vh = Vᵀ.
3. direction ArB2r: A0 = Vh[:r], B0 = U[:, r:2r]; A2rBr: A0 = Vh[r:2r], B0 = U[:, :r];
   ArBr: A0 = Vh[1:2r:2], B0 = U[:, 0:2r:2]. No singular values are multiplied in.
4. scale stable: A0, B0 × out^{1/4}/√γ; gd: ÷ s; unit: none; weightS: × mean(√(S_W[:r]/s)).
5. frozen weight W0 − s·B0·A0 (fp32, cast back), so the model's output is unchanged at init.
PEFT's `init_lora_weights="lora_ga"` differs (B0 carries singular values, `stable` scales only B): it is the
separate variant `loraga_peft`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from loralab.config import ConfigError
from loralab.gradients import estimate_gradients
from loralab.io import atomic_path
from loralab.variant_configs import Direction, GradSample, LoraGAVariantConfig, Scale
from loralab.variants.base import cpu_copy
from loralab.variants.lora import PEFT_PREFIX, Lora, lora_layers

DIRECTIONS, SCALES, GRAD_SAMPLES = (tuple(c.value for c in choice) for choice in (Direction, Scale, GradSample))


def loraga_factors(grad: torch.Tensor, weight: torch.Tensor, rank: int, scaling: float, cfg) -> tuple:
    """(A0, B0) in fp32 from the estimated gradient, following the official code step by step."""
    grad = grad.float()
    U, _, V = torch.svd_lowrank(grad, q=min(4 * rank, min(grad.shape)), niter=4)
    Vh = V.T
    if cfg.direction == "ArB2r":
        A, B = Vh[:rank], U[:, rank : 2 * rank]
    elif cfg.direction == "A2rBr":
        A, B = Vh[rank : 2 * rank], U[:, :rank]
    else:  # ArBr
        A, B = Vh[1 : 2 * rank : 2], U[:, 0 : 2 * rank : 2]
    if cfg.scale == "stable":
        factor = grad.shape[0] ** 0.25 / cfg.stable_gamma**0.5
    elif cfg.scale == "gd":
        factor = 1 / scaling
    elif cfg.scale == "weightS":
        _, S_w, _ = torch.svd_lowrank(weight.float(), q=min(4 * rank, min(weight.shape)), niter=4)
        factor = torch.sqrt(S_w[:rank] / scaling).mean().item()
    else:  # unit
        factor = 1.0
    return (A * factor).contiguous(), (B * factor).contiguous()


def gradient_batches(cfg: LoraGAVariantConfig, ctx) -> Iterator[dict]:
    """The micro-batches of the gradient estimate, as `cfg.grad_sample` says (see LoraGAVariantConfig). The sample
    needs its own stream: no silent fallback from the official first rows to shuffled ones."""
    shuffled = cfg.grad_sample == "shuffled"
    stream = None if ctx is None else ctx.train_batches if shuffled else ctx.first_batches
    if stream is None:
        field, rows = ("train_batches", "seeded shuffled rows") if shuffled else ("first_batches", "first rows")
        other = "" if shuffled else "; variant.grad_sample=shuffled estimates on train_batches instead"
        raise ConfigError(
            f"LoRA-GA's gradient sample variant.grad_sample={cfg.grad_sample} ({rows}) needs "
            f"PrepareContext.{field}, which is missing (the runner passes both streams){other}"
        )
    return stream(cfg.grad_batch_size)


def refuse_loralib_convs(variant, modules, targets) -> None:
    """LoRA-GA's init factors G as out x (in·k·k) into A0 (r x in·k·k, a k x k conv) and B0 (out x r, a 1x1 conv):
    PEFT's conv layout. loralib's (B·A over the unrolled kernel) has no such factorisation of G."""
    convs = [n for n in targets if isinstance(modules[n], torch.nn.Conv2d)]
    if convs and variant.cfg.conv_layout != "peft":
        raise ConfigError(
            f"{variant.name} on Conv2d targets {convs[:3]}{' ...' if len(convs) > 3 else ''} needs "
            f"variant.conv_layout=peft (its init is defined on the kernel as out x (in·k·k)); the official code "
            f"adapts Linear layers only (targets=linear)"
        )


class LoraGA(Lora):
    name = "loraga"
    config_class = LoraGAVariantConfig

    def __init__(self, cfg, rank):
        super().__init__(cfg, rank)
        if cfg.direction not in DIRECTIONS:
            raise ConfigError(f"variant.direction={cfg.direction!r}; choose one of {list(DIRECTIONS)}")
        if cfg.scale not in SCALES:
            raise ConfigError(f"variant.scale={cfg.scale!r}; choose one of {list(SCALES)}")
        if cfg.grad_sample not in GRAD_SAMPLES:
            raise ConfigError(f"variant.grad_sample={cfg.grad_sample!r}; choose one of {list(GRAD_SAMPLES)}")
        if cfg.grad_batches <= 0 or cfg.grad_batch_size <= 0:
            raise ConfigError(f"variant.grad_batches={cfg.grad_batches} and grad_batch_size must be positive")

    def max_rank(self, out_features, in_features):
        return min(out_features, in_features) // 2  # A0 and B0 take 2r distinct singular directions of G

    def check_targets(self, modules, targets):
        super().check_targets(modules, targets)
        refuse_loralib_convs(self, modules, targets)

    def gradients(self, model, targets, ctx) -> dict[str, torch.Tensor]:
        cache = Path(self.cfg.grad_cache) if self.cfg.grad_cache else None
        if cache is not None and cache.exists():
            grads = load_file(str(cache))
            if set(grads) != set(targets):
                raise ConfigError(f"variant.grad_cache={cache} holds gradients of other layers than {targets[:3]}...")
            return grads
        grads = estimate_gradients(model, targets, gradient_batches(self.cfg, ctx), self.cfg.grad_batches)
        if cache is not None:
            with atomic_path(cache, suffix=".safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in grads.items()}, str(tmp))
        return grads

    def prepare(self, model, targets, head_modules, ctx=None):
        grads = self.gradients(model, targets, ctx)
        model = super().prepare(model, targets, head_modules, ctx)  # B = 0 here: no initial product is stored
        self.factors_init = {}
        with torch.no_grad():
            # a bar in a terminal (tqdm turns itself off elsewhere): the SVDs take minutes at 7B
            for name, layer in tqdm(lora_layers(model).items(), desc="LoRA-GA init (SVD)", disable=None):
                weight, s = layer.get_base_layer().weight, layer.scaling["default"]
                A0, B0 = loraga_factors(grads.pop(name).to(weight.device), weight, self.rank, s, self.cfg)
                # fp32 as the official code (fp64 models stay fp64)
                high = torch.promote_types(weight.dtype, torch.float32)
                weight.data = (weight.to(high) - s * (B0.to(high) @ A0.to(high))).to(weight.dtype)
                # the adapter keeps PEFT's dtype (fp32 beside a bf16 / fp16 base: autocast_adapter_dtype), as the
                # official code casts A0, B0 to fp32 (reproduce/conf/init/gradient.yaml: dtype fp32)
                adapter = layer.lora_A["default"].weight.dtype
                layer.lora_A["default"].weight.data = A0.to(adapter)
                layer.lora_B["default"].weight.data = B0.to(adapter)
                # copies of what the adapter holds (it trains in place), for ΔW and the rank-2r export
                self.factors_init[name] = (
                    cpu_copy(layer.lora_A["default"].weight),
                    cpu_copy(layer.lora_B["default"].weight),
                )
        return model

    def delta_weights(self, model):
        """ΔW = s·(B·A − B0·A0), the factor products formed in (at least) fp32."""
        out = {}
        for name, layer in lora_layers(model).items():
            A0, B0 = self.factors_init[name]
            out[name] = cpu_copy(layer.get_delta_weight("default")) - layer.scaling["default"] * (B0 @ A0)
        return out

    def export_state(self, model) -> tuple[dict[str, torch.Tensor], LoraConfig]:
        """A plain rank-2r PEFT LoRA adapter for the *unmodified* base weights: A' = [A; A0], B' = [B, −B0],
        with the same scaling s (α' = 2r·s, rsLoRA off), so W0 + s·B'·A' = (W0 − s·B0·A0) + s·B·A."""
        state = get_peft_model_state_dict(model)
        layers = lora_layers(model)
        for name, (A0, B0) in self.factors_init.items():
            a_key, b_key = f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight"
            state[a_key] = torch.cat([state[a_key], A0.to(state[a_key])], dim=0)
            state[b_key] = torch.cat([state[b_key], -B0.to(state[b_key])], dim=1)
        scaling = next(iter(layers.values())).scaling["default"]
        peft_cfg = model.peft_config["default"]
        config = LoraConfig(
            r=2 * self.rank,
            lora_alpha=2 * self.rank * scaling,
            target_modules=sorted(layers),
            modules_to_save=peft_cfg.modules_to_save,
            lora_dropout=peft_cfg.lora_dropout,
        )
        return {k: v.detach().contiguous() for k, v in state.items()}, config

    def save(self, model, out_dir: Path) -> None:
        state, config = self.export_state(model)
        save_file(state, str(out_dir / "adapter_model.safetensors"))
        config.save_pretrained(str(out_dir))
        init = {f"{n}.A0": A0 for n, (A0, _) in self.factors_init.items()}
        init |= {f"{n}.B0": B0 for n, (_, B0) in self.factors_init.items()}
        save_file({k: v.contiguous() for k, v in init.items()}, str(out_dir / "loraga_init.safetensors"))
        info = {
            "trained_rank": self.rank,
            "exported_rank": 2 * self.rank,
            "direction": self.cfg.direction,
            "scale": self.cfg.scale,
            "use_rslora": self.cfg.use_rslora,
            "alpha": self.cfg.alpha,
            "adapter": "adapter_model.safetensors applies to the unmodified base model (peft.PeftModel)",
            "init": "loraga_init.safetensors: A0, B0 per layer; the trained model's frozen weight is W0 - s*B0@A0",
        }
        (out_dir / "loraga.json").write_text(json.dumps(info, indent=1))
