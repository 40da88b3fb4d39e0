"""Trainable parameters of the LieRA vision presets, measured on the meta device (no download, no memory).

The presets' own configs (targets, heads, variants), with the hub checkpoint replaced by its architecture written
from ConvNeXt-V2-B's known hyperparameters (depths [3, 3, 27, 3], widths [128, 256, 512, 1024]); each variant
wraps the meta-device skeleton as it wraps the real model in a run.

    python experiments/liera_vtab/param_counts.py      # the Markdown tables of experiments/liera_{vtab,coco}/README.md
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from peft import get_peft_model

from loralab.config import register_configs, target_modules
from loralab.models import build_skeleton
from loralab.runner import count_parameters, head_modules
from loralab.targets import find_targets, matches
from loralab.variants import get_variant
from loralab.variants.lierra import Liera, PissaLiera

CONF = Path(__file__).resolve().parents[2] / "conf"
BASE = "hidden_sizes:[128,256,512,1024],depths:[3,3,27,3]"  # ConvNeXt-V2-B
ARCHITECTURE = {  # the preset's model, built from the architecture instead of the checkpoint
    "liera_vtab": ["model.source=config", "model.path=null", "model.arch=convnextv2", f"++model.config={{{BASE}}}"],
    "liera_coco": [
        "model.source=config",
        "model.path=null",
        f"++model.config.backbone_config={{model_type:convnextv2,{BASE},out_features:[stage1,stage2,stage3,stage4]}}",
    ],
}
RANKS = {"liera_vtab": (8, 16), "liera_coco": (16, 32)}
# (variant, target set, extra overrides); target set None: the preset's default (liera_vtab: `conv`, the paper's;
# liera_coco: `conv_linear`)
RUNS = {
    "liera_vtab": [
        ("lora", None, ()), ("lierra", None, ()), ("pissa", None, ()), ("dora", None, ()), ("rslora", None, ()),
        ("lora_plus", None, ()), ("pissa_lierra", None, ()), ("dora_lierra", None, ()),
        ("lora", "conv_linear", ()), ("lierra", "conv_linear", ()),
        ("adalora", "linear", ()), ("loraga", "linear", ()), ("loraga_peft", "linear", ()),  # linear layers only
        ("lora", "no_dwconv", ("variant.conv_layout=peft",)),  # PEFT's own conv layout, which skips the dwconvs
    ],
    "liera_coco": [  # the preset's own target set (conv_linear) for every variant it runs; `conv` beside it
        ("lierra", None, ()), ("lora", None, ()), ("dora", None, ()), ("pissa", None, ()),
        ("pissa_lierra", None, ()), ("dora_lierra", None, ()), ("lierra", "conv", ()), ("lora", "conv", ()),
    ],
}  # fmt: skip


def preset(name: str, *overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *ARCHITECTURE[name], *overrides])


def count(name: str, variant: str, targets: str | None = None, rank: int = 8, *overrides: str) -> dict[str, int]:
    """Parameters of the preset's model after `variant` prepared it: trainable, total, and the new head's share.
    `targets` None keeps the preset's own target set."""
    chosen = () if targets is None else (f"targets={targets}",)
    cfg = preset(name, f"variant={variant}", *chosen, f"rank={rank}", *overrides)
    model = build_skeleton(cfg.model, cfg.task)
    heads = head_modules(cfg)
    head = sum(p.numel() for n, p in model.named_parameters() if any(matches(n, h) or f"{h}." in n for h in heads))
    layers = find_targets(model, target_modules(cfg), exclude=heads)
    v = get_variant(variant)(cfg.variant, rank)
    if variant == "full":  # every parameter trains (its prepare also copies W0, which a meta tensor does not have)
        model.requires_grad_(True)
    elif hasattr(v, "peft_config"):  # its PEFT config alone: LoRA's ΔW record needs real weights
        config = v.peft_config(layers, heads, None)
        config.init_lora_weights = True  # PiSSA's SVD init too (its factors have LoRA's shapes)
        model = get_peft_model(model, config)
    elif isinstance(v, PissaLiera):  # its SVD init needs real weights; the factors have LieRA's shapes
        model = Liera.prepare(v, model, layers, heads)
    else:
        model = v.prepare(model, layers, heads)
    return count_parameters(model) | {"head": head, "layers": len(layers), "targets": cfg.targets}


def rows(name: str) -> list[tuple]:
    out = [("full", "", None, count(name, "full", "conv_linear"))]
    for rank in RANKS[name]:
        for variant, targets, overrides in RUNS[name]:
            c = count(name, variant, targets, rank, *overrides)
            out.append((variant + "".join(f" {o}" for o in overrides), c["targets"], rank, c))
    return out


def markdown(table: list[tuple]) -> str:
    lines = [
        "| variant | layers adapted | rank | trainable | adapters | new head | total |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, targets, rank, c in table:
        adapters = "-" if variant == "full" else f"{(c['trainable'] - c['head']) / 1e6:.3f}M"
        lines.append(
            f"| {variant} | {targets or 'all'} ({c['layers']}) | {rank or '-'} | {c['trainable'] / 1e6:.3f}M "
            f"| {adapters} | {c['head'] / 1e6:.3f}M | {c['total'] / 1e6:.3f}M |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print("liera_vtab, CIFAR-100 head (100 classes)\n")
    print(markdown(rows("liera_vtab")))
    print("\nliera_coco, 80 classes\n")
    print(markdown(rows("liera_coco")))
