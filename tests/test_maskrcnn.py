"""Mask R-CNN (loralab.maskrcnn), liera_coco's detector: its losses against torchvision's own RoI heads, mmdet's
aligned RoIAlign against torchvision's pooler, the evaluation path on a ground-truth oracle (box AP = mask AP = 1),
mmdet's step schedule against torch's chained schedulers, what each variant trains, and the smoke run."""

import json
import math
from pathlib import Path

import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes
from torchvision.ops import MultiScaleRoIAlign, masks_to_boxes
from transformers import ConvNextV2Config, ConvNextV2ForImageClassification

from loralab.config import ConfigError, TaskConfig, TrainConfig, target_modules
from loralab.detection import backbone_module, maskrcnn_instances
from loralab.maskrcnn import AlignedRoIAlign, MaskRCNNOutput, heads_computing_losses, mask_targets
from loralab.models import build_model, build_skeleton
from loralab.record import RESULT_FILE, Status
from loralab.runner import check_inputs, count_parameters, head_modules
from loralab.schedules import check_schedule, make_scheduler
from loralab.smoke import run_smoke
from loralab.targets import find_targets
from loralab.tasks import EvalContext, load_task
from loralab.tasks.coco import coco_evaluator, decode_segmentation, read_annotations
from loralab.tasks.smoke_data import COCO_LABELS, write_coco
from loralab.train import make_accelerator
from loralab.variants import get_variant


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"))


def coco_task(root, **kw) -> TaskConfig:
    fields = dict(name="coco", kind="detection", loader="coco", data_dir=str(root), labels=COCO_LABELS, n_val=0)
    defaults = dict(
        train_split="train2017", test_split="val2017", detector="maskrcnn", image_size=64, max_image_size=96
    )
    return TaskConfig(**(fields | defaults | dict(max_image_size=96) | kw))


def tiny_detector(compose_cfg, *overrides):
    cfg = compose_cfg("experiment=liera_coco_smoke", *overrides)
    return cfg, build_model(cfg.model, cfg.task, cfg.paths.cache_dir)


# --- the model ------------------------------------------------------------------------------------------------------


def test_training_targets_move_with_the_image(coco_dir):
    """Mask R-CNN's batches: each annotation box scaled and flipped as its image and mask (the mask's bounding box
    within a resized pixel of it), labels 1..K, masks at each image's resized size inside the padded batch."""
    data = load_task(coco_task(coco_dir), None)
    torch.manual_seed(0)
    flipped = []
    for start in (0, 4):
        examples = data.train[start : start + 4]
        batch = data.collate(examples)
        assert set(batch) == {"pixel_values", "pixel_mask", "targets"}
        for example, target, mask in zip(examples, batch["targets"], batch["pixel_mask"]):
            rows, cols = int(mask[:, 0].sum()), int(mask[0].sum())
            assert target["masks"].shape[1:] == (rows, cols) and target["masks"].dtype == torch.uint8
            assert ((target["labels"] >= 1) & (target["labels"] <= len(COCO_LABELS))).all()
            from_masks = masks_to_boxes(target["masks"]) + torch.tensor([0, 0, 1, 1])  # pixel indices -> edges
            torch.testing.assert_close(from_masks, target["boxes"], atol=1.5, rtol=0)
            x, _, w, _ = torch.tensor([box for _, _, box in example["anns"]]).T * cols / example["size"][1]
            flipped.append(not torch.allclose(target["boxes"][:, 0], x))
            if flipped[-1]:
                torch.testing.assert_close(target["boxes"][:, 0], cols - x - w)
    assert 0 < sum(flipped) < len(flipped) == 7  # every training image, flipped and not


def test_losses_equal_torchvision_roi_heads(compose_cfg, coco_dir):
    """roi_aligned=false is torchvision's RoI pipeline: the model's RPN + RoI losses equal torchvision's RPN and
    RoIHeads.forward on the same features and random draws; and its mask targets are torchvision's."""
    torch.manual_seed(0)
    _, model = tiny_detector(compose_cfg, "++model.config.roi_aligned=false")
    data = load_task(coco_task(coco_dir), None)
    batch = data.collate(data.train[:4])
    model.train()
    torch.manual_seed(1)
    ours = model(**batch).losses
    torch.manual_seed(1)
    sizes = [(int(m[:, 0].sum()), int(m[0].sum())) for m in batch["pixel_mask"]]
    features = model.backbone(batch["pixel_values"])
    proposals, reference = model.rpn(ImageList(batch["pixel_values"], sizes), features, batch["targets"])
    reference |= model.roi_heads(features, proposals, sizes, batch["targets"])[1]
    assert set(ours) == set(reference) == {
        "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"
    }  # fmt: skip
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-6, atol=1e-7, msg=name)
    masks, boxes = batch["targets"][0]["masks"], batch["targets"][0]["boxes"]
    matched = torch.arange(len(boxes))
    expected = project_masks_on_boxes(masks, boxes, matched, 28)
    torch.testing.assert_close(mask_targets(masks, boxes, matched, 28, aligned=False), expected, rtol=0, atol=0)
    # mmdet's targets: aligned, binary
    aligned = mask_targets(masks, boxes, matched, 28, aligned=True)
    assert set(aligned.unique().tolist()) <= {0.0, 1.0} and not torch.equal(aligned, (expected >= 0.5).float())


def test_losses_in_eval_mode_and_detections(compose_cfg, coco_dir):
    """Given targets the model returns its losses in eval mode too (the gradient estimates run there), leaving the
    heads' modes as they were; without targets, torchvision's detections; training without targets is an error."""
    torch.manual_seed(0)
    _, model = tiny_detector(compose_cfg)
    data = load_task(coco_task(coco_dir), None)
    batch = data.collate(data.train[:2])
    model.eval()
    out = model(**batch)
    assert out.loss.isfinite() and out.loss.requires_grad and not model.training and not model.rpn.training
    detections = model(batch["pixel_values"], batch["pixel_mask"]).detections
    assert len(detections) == 2 and {"boxes", "labels", "scores", "masks"} <= set(detections[0])
    assert (detections[0]["labels"] >= 1).all() and detections[0]["masks"].shape[1:] == (1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 training: the boxes stay float32
        bf16 = model(batch["pixel_values"], batch["pixel_mask"]).detections[0]
    assert bf16["boxes"].dtype == bf16["scores"].dtype == torch.float32
    model.train()
    with pytest.raises(ValueError, match="needs targets"):
        model(batch["pixel_values"], batch["pixel_mask"])
    with heads_computing_losses(model.rpn):
        assert model.rpn.training
    assert model.rpn.training  # restored to train mode, as it was


def test_aligned_roi_align_is_torchvision_pooler_half_a_pixel_shifted():
    """aligned=True samples box b where torchvision's pooler (aligned=False) samples b - 0.5 / stride: the same
    level per box (FPN eq. 1), the same bins."""
    torch.manual_seed(0)
    names = ["0", "1", "2", "3"]
    features = {n: torch.randn(2, 3, 160 // 2**i, 192 // 2**i) for i, n in enumerate(names)}  # strides 4-32
    xy = torch.rand(2, 24, 2) * torch.tensor([100.0, 80.0])
    wh = torch.exp(torch.rand(2, 24, 1) * 4.2) * 8 * (0.8 + 0.4 * torch.rand(2, 24, 2))  # ~7..640 px: every level
    boxes = [torch.cat([p, p + s], 1).clamp(max=torch.tensor([768.0, 640.0] * 2)) for p, s in zip(xy, wh)]
    shapes = [(640, 768)] * 2
    ours = AlignedRoIAlign(names, 7, 2, aligned=True)
    pooled = ours(features, boxes, shapes)
    levels = ours.map_levels(boxes)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    strides = torch.tensor([1 / s for s in ours.scales])[levels]
    shifted, start = [], 0
    for b in boxes:
        shifted.append(b - 0.5 * strides[start : start + len(b), None])
        start += len(b)
    reference = MultiScaleRoIAlign(names, 7, 2)(features, shifted, shapes)
    torch.testing.assert_close(pooled, reference, rtol=1e-5, atol=1e-6)
    legacy = AlignedRoIAlign(names, 7, 2, aligned=False)(features, boxes, shapes)
    torch.testing.assert_close(legacy, MultiScaleRoIAlign(names, 7, 2)(features, boxes, shapes), rtol=0, atol=0)


def test_pretrained_backbone_and_what_each_variant_trains(compose_cfg, tmp_path):
    """source=hf: the classification checkpoint's weights go into the detector's backbone; the adapters sit on the
    backbone only, and the FPN, RPN and RoI heads (and the backbone's output norms) train fully in every variant."""
    torch.manual_seed(0)
    config = ConvNextV2Config(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=7)
    ConvNextV2ForImageClassification(config).save_pretrained(tmp_path / "ckpt")
    stem = ConvNextV2ForImageClassification.from_pretrained(tmp_path / "ckpt").convnextv2.embeddings
    overrides = ["model=maskrcnn_convnextv2_base", f"model.path={tmp_path}/ckpt", "++model.config.fpn_channels=32"]
    cfg, model = tiny_detector(compose_cfg, *overrides)
    assert torch.equal(backbone_module(model).embeddings.patch_embeddings.weight, stem.patch_embeddings.weight)
    assert model.roi_heads.box_predictor.cls_score.out_features == len(COCO_LABELS) + 1  # + background
    assert next(build_skeleton(cfg.model, cfg.task).parameters()).device.type == "meta"
    _, targets = check_inputs(cfg)
    assert targets and all(t.startswith("backbone.body.") for t in targets)
    assert {t.rsplit(".", 1)[-1] for t in targets} == {"patch_embeddings", "1", "dwconv", "pwconv1", "pwconv2"}
    new = [n for n, _ in model.named_parameters() if not n.startswith("backbone.body.") or "hidden_states_norms" in n]
    assert {n.split(".")[0] for n in new} == {"backbone", "rpn", "roi_heads"}
    new_numel = sum(p.numel() for n, p in model.named_parameters() if n in new)
    for variant in ("lierra", "lora"):
        cfg, model = tiny_detector(compose_cfg, f"variant={variant}", "targets=no_dwconv", *overrides)
        v = get_variant(variant)(cfg.variant, cfg.rank)
        prepared = v.prepare(model, check_inputs(cfg)[1], head_modules(cfg))
        trainable = {n: p.numel() for n, p in prepared.named_parameters() if p.requires_grad}
        adapters = [n for n in trainable if "lora_" in n]
        assert adapters and all(".backbone.body." in f".{n}" for n in adapters), variant  # adapters: backbone only
        # every new parameter trains (PEFT: its copy of each head module), nothing else does
        assert sum(k for n, k in trainable.items() if n not in adapters) == new_numel, variant
        out = tmp_path / f"weights_{variant}"
        out.mkdir()
        v.save(prepared, out)
        assert any(out.iterdir())
    cfg, model = tiny_detector(compose_cfg, "variant=full", *overrides)
    get_variant("full")(cfg.variant, cfg.rank).save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_labels"] == len(COCO_LABELS)
    assert (tmp_path / "model.safetensors").is_file()


def test_detector_and_task_must_agree(compose_cfg):
    from loralab.config import validate

    cfg = compose_cfg("experiment=liera_coco_smoke", "++model.config.min_size=600")
    with pytest.raises(ConfigError, match="min_size would go to torchvision's transform"):
        build_skeleton(cfg.model, cfg.task)

    with pytest.raises(ConfigError, match="task.detector equal to its arch"):
        validate(compose_cfg("experiment=liera_coco_smoke", "task.detector=mask2former"))
    with pytest.raises(ConfigError, match="needs a detector model"):
        validate(compose_cfg("experiment=liera_coco_smoke", "model=tiny_convnextv2"))
    with pytest.raises(ConfigError, match="task.detector=None"):
        load_task(coco_task(Path("."), detector=None), None)


# --- evaluation -----------------------------------------------------------------------------------------------------


class GroundTruthMaskRCNN(torch.nn.Module):
    """A perfect Mask R-CNN for the images it is shown, in order: its box head returns the ground-truth boxes (in the
    resized frame) and its mask head mmdet's mask targets for them (the aligned 28x28 crops it is trained on)."""

    def __init__(self, coco, examples, cat_ids, shift_class=0, roll=False):
        super().__init__()
        self.coco, self.queue, self.cat_ids, self.shift, self.roll = coco, list(examples), cat_ids, shift_class, roll

    def forward(self, pixel_values, pixel_mask):
        detections = []
        for mask in pixel_mask:
            example = self.queue.pop(0)
            rows, cols = int(mask[:, 0].sum()), int(mask[0].sum())
            height, width = example["size"]
            anns = self.coco.imgToAnns.get(example["image_id"], [])
            gt = [torch.from_numpy(decode_segmentation(a["segmentation"], height, width)).float() for a in anns]
            gt = torch.nn.functional.interpolate(torch.stack(gt)[None], size=(rows, cols))[0] if gt else None
            boxes = torch.tensor([a["bbox"] for a in anns]).reshape(-1, 4)
            boxes = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1) * torch.tensor(
                [cols / width, rows / height] * 2
            )
            if self.roll:  # half the image away, into the other half
                centre = (boxes[:, :2] + boxes[:, 2:]) / 2
                shift = (
                    torch.where(centre < torch.tensor([cols / 2, rows / 2]), 1.0, -1.0) * torch.tensor([cols, rows]) / 2
                )
                boxes = boxes + shift.repeat(1, 2)
            crops = mask_targets(gt, boxes, torch.arange(len(boxes)), 28, aligned=True) if len(anns) else boxes[:, :0]
            labels = torch.tensor(
                [(self.cat_ids.index(a["category_id"]) + self.shift) % len(self.cat_ids) for a in anns]
            )
            detections.append(
                {
                    "boxes": boxes,
                    "labels": labels.long() + 1,
                    "scores": torch.ones(len(anns)),
                    "masks": crops.reshape(-1, 1, 28, 28),
                }
            )
        return MaskRCNNOutput(detections=detections)


@pytest.mark.parametrize("scale", [1, 2])
def test_evaluation_scores_the_ground_truth_as_perfect(coco_dir, scale):
    """Through the evaluator (resize back, paste, RLE, the detector's own boxes, COCOeval): box AP = mask AP = 1."""
    task = coco_task(coco_dir, image_size=48 * scale, max_image_size=64 * scale)
    data = load_task(task, None)
    gt = read_annotations(coco_dir, "val2017")
    cat_ids = sorted(gt.cats)
    ctx = EvalContext(make_accelerator(TrainConfig(device="cpu")), batch_size=3, split="test")
    evaluate = coco_evaluator(task, {"test": gt}, cat_ids)
    metrics = evaluate(GroundTruthMaskRCNN(gt, data.test, cat_ids), data.test, ctx)
    assert metrics["box_ap"] == metrics["mask_ap"] == 1.0
    wrong = evaluate(GroundTruthMaskRCNN(gt, data.test, cat_ids, shift_class=1), data.test, ctx)
    assert wrong["box_ap"] == wrong["mask_ap"] == 0.0  # one class per box here (Mask R-CNN's NMS is per class)
    misplaced = evaluate(GroundTruthMaskRCNN(gt, data.test, cat_ids, roll=True), data.test, ctx)
    assert misplaced["box_ap"] < 0.1 and misplaced["mask_ap"] < 0.1


def test_paste_is_exact_where_torchvisions_legacy_paste_is_not(coco_dir):
    """Why the paste is hand-written: on the ground truth's own aligned crops it gives back every mask exactly;
    torchvision's paste_masks_in_image (boxes one pixel wider) misses most of them by a pixel."""
    exact, legacy = [], []
    splits = [read_annotations(coco_dir, split) for split in ("train2017", "val2017")]
    for gt, ann in [(coco, ann) for coco in splits for ann in coco.anns.values()]:
        info = gt.imgs[ann["image_id"]]
        mask = torch.from_numpy(decode_segmentation(ann["segmentation"], info["height"], info["width"])).bool()
        x, y, w, h = ann["bbox"]
        box = torch.tensor([[x, y, x + w, y + h]])
        crop = mask_targets(mask[None].float(), box, torch.zeros(1), 28, aligned=True)
        found = maskrcnn_instances(
            {"boxes": box, "masks": crop[:, None], "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.long)},
            (info["height"], info["width"]),
            (info["height"], info["width"]),
        )[2][0]
        exact.append(torch.equal(found, mask))
        pasted = paste_masks_in_image(crop[:, None], box, (info["height"], info["width"]))[0, 0] >= 0.5
        legacy.append(torch.equal(pasted, mask))
    assert all(exact) and sum(legacy) < len(legacy) / 2


# --- schedule -------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # schedules without optimizer steps
def test_multistep_schedule_is_mmdets_1x():
    """multistep = mmengine's LinearLR (by iteration) x MultiStepLR (by epoch), here against torch's own LinearLR and
    MultiStepLR chained on one optimizer; milestones at the same fraction of a run shortened by max_steps."""
    cfg = TrainConfig(lr=1e-4, max_steps=120, epochs=12, scheduler="multistep", warmup_steps=15)
    cfg.warmup_start_factor, cfg.decay_epochs, cfg.decay_gamma = 0.001, [8, 11], 0.1
    check_schedule(cfg)
    ours = make_scheduler(cfg, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4), 120)
    reference_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    warm = torch.optim.lr_scheduler.LinearLR(reference_opt, start_factor=0.001, total_iters=15)
    steps = torch.optim.lr_scheduler.MultiStepLR(reference_opt, milestones=[80, 110], gamma=0.1)  # 10 steps / epoch
    reference = torch.optim.lr_scheduler.ChainedScheduler([warm, steps])
    lrs = []
    for _ in range(120):
        lrs.append(ours.get_last_lr()[0])
        assert math.isclose(lrs[-1], reference.get_last_lr()[0], rel_tol=1e-9)
        ours.step()
        reference.step()
    assert lrs[0] == pytest.approx(1e-7) and lrs[15] == lrs[79] == pytest.approx(1e-4)
    assert lrs[80] == lrs[109] == pytest.approx(1e-5) and lrs[110] == lrs[119] == pytest.approx(1e-6)
    # transformers' schedules are unchanged; warmup_steps replaces warmup_ratio when set
    for linear in (TrainConfig(warmup_ratio=0.1), TrainConfig(warmup_ratio=0.5, warmup_steps=10)):
        sched = make_scheduler(linear, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 100)
        for _ in range(5):
            sched.step()
        assert sched.get_last_lr()[0] == pytest.approx(0.5)  # 5 of 10 warm-up steps


def test_schedule_fields_are_checked():
    with pytest.raises(ConfigError, match="belong to train.scheduler=multistep"):
        check_schedule(TrainConfig(decay_epochs=[8]))
    with pytest.raises(ConfigError, match="must be increasing epochs"):
        check_schedule(TrainConfig(scheduler="multistep", epochs=12, decay_epochs=[11, 8]))
    with pytest.raises(ConfigError, match="must be increasing epochs"):
        check_schedule(TrainConfig(scheduler="multistep", epochs=12, decay_epochs=[13]))
    with pytest.raises(ConfigError, match="decay_gamma"):
        check_schedule(TrainConfig(scheduler="multistep", decay_gamma=0.0))


# --- end to end -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_liera_coco_smoke_runs_mask_rcnn(tmp_path):
    """`python -m loralab.smoke liera_coco`: Mask R-CNN, LieRA on the backbone, pycocotools AP, with validation."""
    (record,) = run_smoke("liera_coco", tmp_path, ["task.n_val=2", "train.eval_every=1"])
    assert record.status == Status.COMPLETED and record.data["sizes"] == {"train": 5, "val": 2, "test": 4}
    for split in ("val", "test"):
        for kind in ("box", "mask"):
            assert all(0 <= record.metrics[f"{split}/{kind}_{s}"] <= 1 for s in ("ap", "ap50", "ap75", "ap_s"))
    assert [step for step, _ in record.curves["val/mask_ap"]] == [1, 2]
    assert record.adapted_layers and all(n.startswith("backbone.body.") for n in record.adapted_layers)
    dw = [v for k, v in record.delta_fro_norms.items() if k.endswith("dwconv")]
    assert len(dw) == 5 and min(dw) > 0
    result = json.loads((tmp_path / "results" / record.run_dir / RESULT_FILE).read_text())
    assert result["config"]["model"]["arch"] == "maskrcnn" and result["config"]["task"]["detector"] == "maskrcnn"
    lrs = [lr for _, lr in record.curves["train/lr"]]  # warm-up 1 step, x0.1 at 8/12 and 11/12 of 2 steps
    assert lrs == pytest.approx([1e-4, 1e-5])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["pissa_lierra", "dora_lierra", "lora"])
def test_liera_coco_smoke_runs_the_other_variants(tmp_path, variant):
    """PiSSA+LieRA, DoRA+LieRA and LoRA (loralib's conv layout) through the same Mask R-CNN smoke: the preset's
    layers, depthwise convs included, each variant at its own lr from the preset's table, box and mask AP."""
    (record,) = run_smoke("liera_coco", tmp_path, [f"variant={variant}", "analyses=[]"])
    assert record.status == Status.COMPLETED and record.config["variant"]["name"] == variant
    assert all(0 <= record.metrics[f"test/{kind}_ap"] <= 1 for kind in ("box", "mask"))
    assert record.adapted_layers and all(n.startswith("backbone.body.") for n in record.adapted_layers)
    dw = [v for k, v in record.delta_fro_norms.items() if k.endswith("dwconv")]
    assert len(dw) == 5 and min(dw) > 0
    assert record.config["train"]["lr"] == record.config["train"]["lr_table"][variant]


def test_parameter_budget_is_the_backbones(compose_cfg):
    """On the real ConvNeXt-V2-B architecture (meta device): LieRA's conv + linear adapters at r=32 are the paper's
    34.54M COCO count; the rest is the detector's FPN + RPN + RoI heads, trained in full."""
    base = ["experiment=liera_coco", "model.source=config", "model.path=null", "rank=32"]
    arch = "++model.config.backbone_config={model_type:convnextv2,hidden_sizes:[128,256,512,1024],depths:[3,3,27,3]," \
           "out_features:[stage1,stage2,stage3,stage4]}"  # fmt: skip
    cfg = compose_cfg(*base, arch)
    model = build_skeleton(cfg.model, cfg.task)
    heads = head_modules(cfg)
    head = sum(
        p.numel() for n, p in model.named_parameters() if any(n.startswith(f"{h}.") or f".{h}." in n for h in heads)
    )
    targets = find_targets(model, target_modules(cfg), exclude=heads)
    variant = get_variant("lierra")(cfg.variant, 32)
    counts = count_parameters(variant.prepare(model, targets, heads))
    assert abs(counts["trainable"] - head - 34.54e6) < 0.01e6 and len(target_modules(cfg)) == 5
