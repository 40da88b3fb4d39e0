"""The LieRA vision presets: VTAB-1k and COCO data in their release layouts, the detector, the COCO evaluation, the
parameter budget of the real architectures (meta device) and both smoke runs through the real runner."""

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from transformers import ConvNextV2Config, ConvNextV2ForImageClassification

from conftest import CONF, ROOT
from loralab.config import ConfigError, TaskConfig, TrainConfig
from loralab.detection import backbone_module
from loralab.models import build_model, build_skeleton
from loralab.record import RESULT_FILE, Status
from loralab.runner import run_job
from loralab.tasks import EvalContext, load_task
from loralab.tasks.coco import coco_evaluator, decode_segmentation, read_annotations, resized_size
from loralab.tasks.smoke_data import COCO_LABELS, SHAPES, main, write_coco
from loralab.tasks.vtab import IMAGENET_MEAN, IMAGENET_STD, VTAB_TASKS, image_tensor
from loralab.train import make_accelerator

SMOKE = ["logger=none", "train.progress=false"]


@pytest.fixture(scope="module")
def vtab_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    main(["vtab", str(root)])  # the command users run for the smoke data
    return root


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"))


def vtab_task(root, **kw) -> TaskConfig:
    fields = dict(name="vtab_svhn", kind="image_classification", loader="vtab", subset="svhn", data_dir=str(root))
    defaults = dict(labels=[str(i) for i in range(10)], train_split="train800val200", image_size=16)
    return TaskConfig(**(fields | defaults | kw))


def coco_task(root, **kw) -> TaskConfig:
    fields = dict(name="coco", kind="detection", loader="coco", data_dir=str(root), labels=COCO_LABELS, n_val=0)
    defaults = dict(train_split="train2017", test_split="val2017", image_size=48, detector="mask2former")
    return TaskConfig(**(fields | defaults | kw))  # Mask R-CNN's batches and evaluation: tests/test_maskrcnn.py


# --- VTAB-1k ------------------------------------------------------------------------------------------------------


def test_vtab_tables_configs_and_sweep_agree():
    assert len(VTAB_TASKS) == 19 and sum(n for _, n in VTAB_TASKS.values()) == 940
    assert [g for g, _ in VTAB_TASKS.values()].count("structured") == 8
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for task, (_, n) in VTAB_TASKS.items():
            cfg = compose("config", overrides=[f"task=vtab_{task}"]).task
            assert (cfg.name, cfg.subset, cfg.loader, len(cfg.labels)) == (f"vtab_{task}", task, "vtab", n)
        preset = compose("config", overrides=["experiment=liera_vtab"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    sweep = preset.hydra.sweeper.params
    assert sweep.task.split(",") == [f"vtab_{t}" for t in VTAB_TASKS] and sweep.rank == "8,16"
    assert preset.model.path == "facebook/convnextv2-base-22k-224" and preset.targets == "conv"
    assert (preset.task.train_split, preset.task.image_size, preset.train.epochs) == ("train800val200", 224, 100)


def test_vtab_release_layout_splits_and_pipeline(vtab_dir):
    final = load_task(vtab_task(vtab_dir), None)
    assert final.sizes == {"train": 50, "val": 0, "test": 50}  # train800val200, no validation split
    tuning = load_task(vtab_task(vtab_dir, train_split="train800"), None)
    assert tuning.sizes == {"train": 40, "val": 10, "test": 50}
    lines = (vtab_dir / "svhn" / "test.txt").read_text().split("\n")
    assert [final.test[i]["labels"] for i in range(5)] == [int(line.split()[1]) for line in lines[:5]]
    # data_dir may also be the task's own folder; same data, same fingerprint
    assert load_task(vtab_task(vtab_dir / "svhn"), None).fingerprint == final.fingerprint
    assert load_task(vtab_task(vtab_dir, image_size=32), None).fingerprint != final.fingerprint
    batch = final.collate([final.train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["labels"].dtype == torch.long
    white = image_tensor(Image.new("RGB", (5, 7), (255, 255, 255)), 16)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert white.shape == (3, 16, 16) and torch.allclose(white[:, 3, 9], expected)


def test_vtab_bad_inputs_name_the_problem(vtab_dir, tmp_path):
    with pytest.raises(ConfigError, match="svhn has 10 classes but task.labels has 3"):
        load_task(vtab_task(vtab_dir, labels=["a", "b", "c"]), None)
    with pytest.raises(ConfigError, match="not a VTAB-1k task"):
        load_task(vtab_task(vtab_dir, subset="cifar10"), None)
    with pytest.raises(ConfigError, match="train_split='train'"):
        load_task(vtab_task(vtab_dir, train_split="train"), None)
    broken = tmp_path / "svhn"
    broken.mkdir()
    (broken / "train800val200.txt").write_text("images/a.png\n")
    with pytest.raises(ConfigError, match="expected '<image path> <label index>'"):
        load_task(vtab_task(tmp_path), None)
    with pytest.raises(ConfigError, match="no VTAB-1k folder"):
        load_task(vtab_task(ROOT / "conf"), None)


def test_vtab_from_a_datasets_copy(vtab_dir, tmp_path):
    """The hub route (`task.dataset`) reads `datasets` splits; here a save_to_disk copy of the same images."""
    folder = vtab_dir / "svhn"
    splits = {}
    for split in ("train800val200", "test"):
        rows = [line.split() for line in (folder / f"{split}.txt").read_text().split("\n") if line]
        images = [Image.open(folder / path).convert("RGB") for path, _ in rows]
        features = datasets.Features(image=datasets.Image(), label=datasets.Value("int64"))
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": [int(y) for _, y in rows]}, features)
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hub_copy"))
    from_hub = load_task(vtab_task(tmp_path / "hub_copy", dataset="some/vtab-1k"), None)
    from_lists = load_task(vtab_task(vtab_dir), None)
    assert from_hub.sizes == from_lists.sizes
    first = lambda data: data.collate([data.test[i] for i in range(3)])
    a, b = first(from_hub), first(from_lists)
    assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["pixel_values"], b["pixel_values"])


@pytest.mark.slow
def test_liera_vtab_smoke_through_the_runner(compose_cfg, vtab_dir):
    base = ["experiment=liera_vtab_smoke", f"task.data_dir={vtab_dir}", *SMOKE]
    cfg = compose_cfg(*base)
    record = run_job(cfg)
    assert record.status == Status.COMPLETED and record.steps == 6 and 0 <= record.metrics["test/accuracy"] <= 1
    assert record.data["sizes"] == {"train": 50, "val": 0, "test": 50}
    kinds = {name.rsplit(".", 1)[-1] for name in record.adapted_layers}
    assert kinds == {"patch_embeddings", "1", "dwconv"}  # "1": downsampling_layer.1; the paper's conv set
    dw = [v for k, v in record.delta_fro_norms.items() if k.endswith("dwconv")]
    assert len(dw) == 5 and min(dw) > 0  # LieRA trained every depthwise kernel
    assert (Path(cfg.paths.results_dir) / record.run_dir / RESULT_FILE).is_file()
    parts = Path(record.run_dir).parts  # <experiment>/<model>/<task>/<variant>/<targets>/r<rank>/seed<seed>-<key>
    assert parts[3:6] == ("lierra", "conv", f"r{cfg.rank}") and record.identity.targets == "conv"
    assert parts[6] == f"seed0-{record.identity.key}" and re.fullmatch(r"seed0-[0-9a-f]{8}", parts[6])
    exact = run_job(compose_cfg(*base, "variant.exact_exp=true", "analyses=[]"))
    assert exact.status == Status.COMPLETED and exact.params == record.params
    assert exact.identity.hparams == record.identity.hparams | {"variant.exact_exp": True}
    # LoRA (loralib's layout) and the +LieRA combinations on the same layers, depthwise convs included
    for variant in ("lora", "pissa_lierra", "dora_lierra"):
        other = run_job(compose_cfg(*base, f"variant={variant}", "analyses=[]"))
        assert other.status == Status.COMPLETED and other.adapted_layers == record.adapted_layers
        assert all(v > 0 for k, v in other.delta_fro_norms.items() if k.endswith("dwconv")), variant
        assert Path(other.run_dir).parts[3:5] == (variant, "conv")
    with pytest.raises(ConfigError, match="conv_layout=peft cannot adapt grouped convolutions"):  # PEFT's cannot
        run_job(compose_cfg(*base, "variant=lora", "variant.conv_layout=peft", "analyses=[]"))


# --- model building ----------------------------------------------------------------------------------------------


def test_pretrained_backbone_goes_into_classifier_and_detector(compose_cfg, tmp_path):
    """source=hf: a checkpoint with a 7-class head serves a 10-class task (new head) and a new detector's backbone."""
    torch.manual_seed(0)
    config = ConvNextV2Config(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=7)
    ConvNextV2ForImageClassification(config).save_pretrained(tmp_path / "ckpt")
    stem = ConvNextV2ForImageClassification.from_pretrained(tmp_path / "ckpt").convnextv2.embeddings
    cfg = compose_cfg("model=convnextv2_base", f"model.path={tmp_path}/ckpt", "task=vtab_svhn")
    classifier = build_model(cfg.model, cfg.task, str(tmp_path))
    assert classifier.classifier.out_features == 10
    assert torch.equal(classifier.convnextv2.embeddings.patch_embeddings.weight, stem.patch_embeddings.weight)
    cfg = compose_cfg("experiment=liera_coco_smoke", "model=mask2former_convnextv2_base", f"model.path={tmp_path}/ckpt")
    skeleton = build_skeleton(cfg.model, cfg.task)
    assert next(skeleton.parameters()).device.type == "meta"
    detector = build_model(cfg.model, cfg.task, str(tmp_path))
    backbone = backbone_module(detector)
    assert torch.equal(backbone.embeddings.patch_embeddings.weight, stem.patch_embeddings.weight)
    assert detector.class_predictor.out_features == len(COCO_LABELS) + 1  # + "no object"


def load_param_counts():
    spec = importlib.util.spec_from_file_location("param_counts", ROOT / "experiments/liera_vtab/param_counts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAPER_BUDGET = {8: 7.30e6, 16: 14.48e6}  # LieRA's vision table: LoRA and LieRA at r=8 / 16 on ConvNeXt-V2-B


@pytest.mark.parametrize("variant", ["lora", "lierra"])
def test_parameter_budget_of_the_real_architectures(variant):
    """ConvNeXt-V2-B from its config on the meta device, the preset's defaults (its `conv` target set, LoRA in
    loralib's layout): LoRA and LieRA both count the paper's 7.30M / 14.48M (±0.5 %; with the CIFAR-100 head, as
    the README's table), and on all layers LieRA gives the 34.54M at r=32 of the COCO row (adapters only)."""
    counts = load_param_counts()
    for rank, budget in PAPER_BUDGET.items():
        c = counts.count("liera_vtab", variant, None, rank)
        assert c["targets"] == "conv" and c["layers"] == 40
        assert abs(c["trainable"] - budget) <= 0.005 * budget, (variant, rank, c["trainable"])
        row = f"| {variant} | conv (40) | {rank} | {c['trainable'] / 1e6:.3f}M |"
        assert row in (ROOT / "experiments/liera_vtab/README.md").read_text()  # the README's table is the measurement
    full = counts.count("liera_vtab", "full")
    assert full["total"] + 900 * 1025 == 88_717_800  # ConvNeXt-V2-B with its 1000-class head: 88.7M
    if variant == "lierra":
        coco = counts.count("liera_coco", "lierra", "conv_linear", 32)
        assert abs(coco["trainable"] - coco["head"] - 34.54e6) < 0.01e6


@pytest.mark.slow
def test_coco_parameter_table_is_the_measurement():
    """experiments/liera_coco/README.md's count table is param_counts.py's output: every variant the preset runs
    (each on the preset's conv_linear, LoRA in loralib's layout, so LoRA and LieRA count the same)."""
    counts = load_param_counts()
    table = counts.markdown(counts.rows("liera_coco"))
    readme = (ROOT / "experiments/liera_coco/README.md").read_text()
    assert table in readme
    commands = re.findall(r"run\.py -m? ?experiment=liera_coco task\.data_dir=\$COCO_DIR variant=([\w,]+)", readme)
    preset_runs = {v for found in commands for v in found.split(",")} - {"full"}  # full: the table's first row
    assert preset_runs == {"lierra", "lora", "dora", "pissa", "pissa_lierra", "dora_lierra"}
    assert {v for v, t, _ in counts.RUNS["liera_coco"] if t is None} == preset_runs
    assert "| lora | conv_linear (112) | 32 | 54.947M | 34.542M |" in table  # the paper's 34.54M, as LieRA's


# --- COCO --------------------------------------------------------------------------------------------------------


def test_coco_layout_classes_and_training_batches(coco_dir):
    data = load_task(coco_task(coco_dir, image_size=64, max_image_size=80), None)
    assert data.sizes == {"train": 7, "val": 0, "test": 4}  # the crowd-only training image is dropped
    assert data.num_labels == 3 and data.metric == "mask_ap"
    torch.manual_seed(0)
    batch = data.collate(data.train[:4])
    pixels, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
    assert pixels.shape[2] % 32 == 0 and pixels.shape[3] % 32 == 0 and pixel_mask.shape == pixels[:, 0].shape
    colours = {i: SHAPES[c][1] for i, c in enumerate(sorted(SHAPES))}
    for b, (masks, classes) in enumerate(zip(batch["mask_labels"], batch["class_labels"])):
        assert masks.shape == (len(classes), *pixels.shape[2:]) and set(masks.unique().tolist()) <= {0.0, 1.0}
        assert (masks.sum((1, 2)) > 0).all() and not (masks * (1 - pixel_mask[b])).any()  # on the image only
        image = pixels[b] * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
        for m, c in zip(masks, classes.tolist()):  # each mask covers its shape's colour: resize / flip / pad agree
            inside = image[:, m.bool()].mean(1)  # the background is dark grey noise, each shape red, green or blue
            assert inside.argmax() == int(np.argmax(colours[c])) and inside.max() > 0.45
    with pytest.raises(ConfigError, match="categories in id order"):
        load_task(coco_task(coco_dir, labels=["square", "bar", "triangle"]), None)
    with pytest.raises(ConfigError, match="instances_train2014.json does not exist"):
        load_task(coco_task(coco_dir, train_split="train2014"), None)


class GroundTruthDetector(torch.nn.Module):
    """Mask2Former-shaped outputs that reproduce the ground truth of the images it is shown, in order (a test oracle
    for the evaluation path: resize, padding, crop, RLE, category ids, COCOeval)."""

    def __init__(self, coco, examples, cat_ids, shift_class=0, roll=False):
        super().__init__()
        self.coco, self.queue, self.cat_ids, self.shift, self.roll = coco, list(examples), cat_ids, shift_class, roll

    def forward(self, pixel_values, pixel_mask):
        b, _, h, w = pixel_values.shape
        k, q = len(self.cat_ids), 8
        logits = torch.full((b, q, k + 1), -20.0)
        logits[..., k] = 20.0  # "no object"
        masks = torch.full((b, q, h, w), -20.0)
        for i in range(b):
            example = self.queue.pop(0)
            rows, cols = int(pixel_mask[i, :, 0].sum()), int(pixel_mask[i, 0].sum())
            for j, ann in enumerate(self.coco.imgToAnns.get(example["image_id"], [])):
                m = torch.from_numpy(decode_segmentation(ann["segmentation"], *example["size"])).float()
                m = torch.nn.functional.interpolate(m[None, None], size=(rows, cols))[0, 0]
                if self.roll:  # half the image away
                    m = m.roll((rows // 2, cols // 2), (0, 1))
                masks[i, j, :rows, :cols] = torch.where(m > 0, 20.0, -20.0)
                logits[i, j] = -20.0
                logits[i, j, (self.cat_ids.index(ann["category_id"]) + self.shift) % k] = 20.0
        return SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks)


@pytest.mark.parametrize("scale", [1, 2])
def test_coco_evaluation_scores_the_ground_truth_as_perfect(coco_dir, scale):
    task = coco_task(coco_dir, image_size=48 * scale, max_image_size=64 * scale)
    data = load_task(task, None)
    gt = read_annotations(coco_dir, "val2017")
    cat_ids = sorted(gt.cats)
    ctx = EvalContext(make_accelerator(TrainConfig(device="cpu")), batch_size=3, split="test")
    evaluate = coco_evaluator(task, {"test": gt}, cat_ids)
    metrics = evaluate(GroundTruthDetector(gt, data.test, cat_ids), data.test, ctx)
    if scale == 1:  # the masks go back to the original pixels exactly: boxes too
        assert metrics["mask_ap"] == metrics["box_ap"] == 1.0
    else:  # resized x2 and back: boundaries move by a pixel
        assert metrics["mask_ap50"] == metrics["box_ap50"] == 1.0 and metrics["mask_ap"] > 0.6
    # wrong classes: the right ones still rank, below them (top-100 keeps every class of a query), so AP drops
    wrong = evaluate(GroundTruthDetector(gt, data.test, cat_ids, shift_class=1), data.test, ctx)
    assert wrong["mask_ap"] < 0.5 and wrong["box_ap"] < 0.5
    misplaced = evaluate(GroundTruthDetector(gt, data.test, cat_ids, roll=True), data.test, ctx)
    assert misplaced["mask_ap"] < 0.1 and misplaced["box_ap"] < 0.1


@pytest.mark.slow
def test_liera_coco_mask2former_smoke_through_the_runner(compose_cfg, coco_dir):
    """The Mask2Former option (its smoke model); the preset's Mask R-CNN smoke run is in tests/test_maskrcnn.py."""
    base = ["experiment=liera_coco_smoke", "model=tiny_mask2former", f"task.data_dir={coco_dir}", *SMOKE]
    cfg = compose_cfg(*base, "task.n_val=2", "train.eval_every=2")
    record = run_job(cfg)
    assert record.status == Status.COMPLETED and record.data["sizes"] == {"train": 5, "val": 2, "test": 4}
    metrics = record.metrics
    for split in ("val", "test"):
        assert all(0 <= metrics[f"{split}/{kind}_{s}"] <= 1 for kind in ("box", "mask") for s in ("ap", "ap50"))
    assert [step for step, _ in record.curves["val/mask_ap"]] == [2, 4]
    assert record.adapted_layers and all(".pixel_level_module.encoder." in n for n in record.adapted_layers)
    result = json.loads((Path(cfg.paths.results_dir) / record.run_dir / RESULT_FILE).read_text())
    assert result["config"]["model"]["arch"] == "mask2former" and result["params"] == record.params
    lora = run_job(compose_cfg(*base, "variant=lora", "targets=no_dwconv", "analyses=[]"))
    assert lora.status == Status.COMPLETED and lora.params["trainable"] < record.params["trainable"]


def test_coco_resize_rule():
    assert resized_size(480, 640, 800, 1333) == (800, 1067)  # shorter side to 800
    assert resized_size(400, 1200, 800, 1333) == (444, 1333)  # longer side capped
    assert resized_size(48, 64, 48, 64) == (48, 64)  # scale 1: the smoke data at its own size
