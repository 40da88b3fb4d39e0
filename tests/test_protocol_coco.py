"""experiments/liera_coco/README.md's protocol table says what the preset runs: each `loralab` cell is rebuilt from
the composed config (and the code's fixed choices), so the table and conf/experiment/liera_coco.yaml cannot drift."""

import re

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import CONF, ROOT
from loralab.models import build_skeleton

README = ROOT / "experiments" / "liera_coco" / "README.md"
COLUMNS = ["setting", "loralab", "paper / official", "source", "deviation and why"]
# the heads' settings are what the table reads off the model: a small backbone of the same type keeps it instant
TINY_BACKBONE = {"model_type": "convnextv2", "hidden_sizes": [8, 8, 8, 8], "depths": [1, 1, 1, 1]}


def protocol_table() -> dict[str, list[str]]:
    lines = README.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| setting | loralab |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert header == COLUMNS
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(COLUMNS) and all(cells), line  # every row names its source and deviation ("-")
        rows[cells[0]] = cells[1:]
    return rows


def preset():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=liera_coco"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


def lrs_by_value(table) -> dict[float, list[str]]:
    """The preset's lr_table as the README writes it: the variants that share an lr, in the table's order."""
    grouped: dict[float, list[str]] = {}
    for name, lr in table.items():
        grouped.setdefault(lr, []).append(name)
    return grouped


def expected_cells(cfg) -> dict[str, str]:
    """The `loralab` column, from the config."""
    m, t, task = cfg.model.config, cfg.train, cfg.task
    heads = set(cfg.model.head_modules)
    new_modules = {"backbone.fpn", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"}
    new_modules |= {"roi_heads.mask_head", "roi_heads.mask_predictor"}
    new_modules |= {f"hidden_states_norms.stage{i}" for i in range(1, 5)}
    # the torchvision defaults the config leaves in place (the skeleton holds the values the model uses)
    small = {"source": "config", "path": None, "config": {"backbone_config": TINY_BACKBONE}}
    model = build_skeleton(OmegaConf.merge(OmegaConf.to_container(cfg.model, resolve=True), small), task)
    rpn, roi = model.rpn, model.roi_heads
    sizes = [s[0] for s in rpn.anchor_generator.sizes]
    ratios = "(" + ", ".join(f"{r:g}" for r in rpn.anchor_generator.aspect_ratios[0]) + ")"
    train, test = rpn._post_nms_top_n["training"], rpn._post_nms_top_n["testing"]
    proposals = f"{train} proposals (train and test)" if train == test else f"{train} / {test} proposals (train / test)"
    epochs = ", ".join(f"{e:g}" for e in t.decay_epochs)
    return {
        "detector": f"`{cfg.model.arch}`",
        "backbone": f"`{cfg.model.path}`, " + ", ".join(m.backbone_config.out_features),
        "drop path": f"{m.backbone_config.drop_path_rate:g}",
        "neck": f"FPN, {m.fpn_channels} channels, P2-P6",
        "RPN": f"anchors {sizes[0]}-{sizes[-1]} x {ratios}, {proposals}",
        "box head": f"2 fc x {m.box_head_channels}",
        "mask head": f"{len(m.mask_head_channels)} conv x {m.mask_head_channels[0]}, 28x28",
        "RoIAlign": f"sampling_ratio {m.roi_sampling_ratio}, " + ("aligned" if m.roi_aligned else "not aligned"),
        "test-time": f"score > {roi.score_thresh:g}, NMS {roi.nms_thresh:g}, {roi.detections_per_img} per image, "
        f"masks >= 0.5",
        "trained modules": "adapters on the backbone; FPN, RPN, RoI heads and output norms fully"
        if heads == new_modules
        else f"head_modules={sorted(heads)}",
        "epochs": f"{t.epochs:g}" if t.max_steps <= 0 else f"max_steps {t.max_steps}",
        "lr schedule": f"linear warm-up {t.warmup_steps} steps from {t.warmup_start_factor:g} x lr, "
        f"x{t.decay_gamma:g} at epochs {epochs}"
        if t.scheduler == "multistep"
        else t.scheduler,
        "optimizer": "AdamW, betas {}".format(
            torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults["betas"]
        ),
        "lr": "; ".join(f"{', '.join(names)} {lr:g}" for lr, names in lrs_by_value(t.lr_table).items()),
        "weight decay": f"{t.weight_decay:g}",
        "gradient clipping": "none" if t.max_grad_norm == 0 else f"norm {t.max_grad_norm:g}",
        "batch": f"{t.batch_size * t.grad_accum} ({t.batch_size} x grad_accum {t.grad_accum})",
        "image size": f"shorter side {task.image_size}, longer <= {task.max_image_size}",
        "augmentation": "horizontal flip 0.5",  # loralab.tasks.coco.training_instances
        "training images": "non-crowd instances of at least 1 px, images with one",  # coco.trainable_annotation
        "precision": t.precision,
        "metric": f"COCOeval box + mask AP on `{task.test_split}`",
        "ranks": ", ".join(str(cfg.hydra.sweeper.params.rank).split(",")),
    }


def test_protocol_table_matches_the_preset():
    cfg = preset()
    rows = protocol_table()
    expected = expected_cells(cfg)
    assert list(rows) == list(expected)  # every setting, in the table's order
    for setting, cell in expected.items():
        assert rows[setting][0] == cell, (setting, rows[setting][0], cell)


def test_protocol_sources_name_files_and_lines():
    """Each source cites the paper or an mmdetection file of the list above the table, with line numbers."""
    files = r"(mask-rcnn_r50_fpn\.py|coco_instance\.py|schedule_1x\.py|convnext config)"
    for setting, (_, _, source, _) in protocol_table().items():
        cited = re.findall(files + r" (?:\(`\w+`\)|L\d+)", source)
        assert source == "paper" or cited, (setting, source)


def test_each_variant_trains_at_its_own_lr_from_the_table(compose_cfg):
    """`variant=<name>` on the preset resolves train.lr to that variant's entry (the aliases to their variant's),
    and the LieRA family is not at LoRA's lr (the failure issue 14 #3 describes)."""
    table = preset().train.lr_table
    for name, lr in {**table, "liera": table.lierra, "pissa_liera": table.pissa_lierra}.items():
        assert compose_cfg("experiment=liera_coco", f"variant={name}").train.lr == lr, name
    assert all(table[v] > table.lora for v in ("lierra", "pissa_lierra", "dora_lierra"))
    assert compose_cfg("experiment=liera_coco", "variant=dora", "train.lr=3e-4").train.lr == 3e-4
