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
# (variant, target set) as the presets run them: PEFT's LoRA / DoRA skip the depthwise convs, PiSSA every conv
RUNS = [("lierra", "conv_linear"), ("lierra", "conv"), ("lierra", "no_dwconv"), ("lora", "no_dwconv"),
        ("dora", "no_dwconv"), ("pissa", "linear")]  # fmt: skip


def preset(name: str, *overrides: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *ARCHITECTURE[name], *overrides])


def count(name: str, variant: str, targets: str | None = None, rank: int = 8, *overrides: str) -> dict[str, int]:
    """Parameters of the preset's model after `variant` prepared it: trainable, total, and the new head's share."""
    cfg = preset(name, f"variant={variant}", f"targets={targets or 'null'}", f"rank={rank}", *overrides)
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
    else:
        model = v.prepare(model, layers, heads)
    return count_parameters(model) | {"head": head, "layers": len(layers)}


def rows(name: str) -> list[tuple]:
    out = [("full", "all", None, count(name, "full"))]
    for rank in RANKS[name]:
        out += [(variant, targets, rank, count(name, variant, targets, rank)) for variant, targets in RUNS]
    return out


def markdown(table: list[tuple]) -> str:
    lines = [
        "| variant | layers adapted | rank | trainable | adapters | new head | total |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, targets, rank, c in table:
        adapters = "-" if variant == "full" else f"{(c['trainable'] - c['head']) / 1e6:.3f}M"
        lines.append(
            f"| {variant} | {targets} ({c['layers']}) | {rank or '-'} | {c['trainable'] / 1e6:.3f}M | {adapters} "
            f"| {c['head'] / 1e6:.3f}M | {c['total'] / 1e6:.3f}M |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print("liera_vtab, CIFAR-100 head (100 classes)\n")
    print(markdown(rows("liera_vtab")))
    print("\nliera_coco, 80 classes\n")
    print(markdown(rows("liera_coco")))
