"""COCO 2017 instance detection + segmentation (Lin et al. 2014): box and mask AP through pycocotools.

Layout under `task.data_dir` (the official release): annotations/instances_<split>.json and the images in <split>/,
for `task.train_split` (train2017) and `task.test_split` (val2017: the split papers report; test-dev's labels are
hidden). "val" is a seeded slice of `n_val` training images (0: none), for curves only.

Pipeline, as mmdet's Mask R-CNN (the LieRA paper's detector): resize keeping the aspect ratio so the shorter side is
`image_size` (800) and the longer at most `max_image_size` (1333); random horizontal flip when training; ImageNet
mean/std; zero padding at the bottom/right to a common size, a multiple of 32 (`pixel_mask` marks the image).
Training drops crowd annotations, annotations without area (mmdet: w or h < 1 px, or area 0) and the images left
without any (mmdet's filter_empty_gt). Classes are the annotation file's categories in id order -> 0..K-1; their
names must equal `task.labels`.

Batches follow `task.detector` (the model's arch): Mask R-CNN trains on `targets` (per image: the annotation boxes,
scaled and flipped with the image and clipped to it, labels 1..K, masks at the resized size), Mask2Former on
`mask_labels` / `class_labels` (masks padded to the batch).

Evaluation, each detector's own inference at the original resolution, masks as RLE, COCOeval over the evaluated
images: Mask R-CNN's boxes from its box head (box AP) and masks from its mask head pasted into them (mask AP);
Mask2Former's top 100 (query, class) pairs, mask AP on the masks and box AP on their bounding boxes (it predicts masks
only). Metrics in [0, 1] (-1: no ground truth in that size range): {box,mask}_{ap,ap50,ap75,ap_s,ap_m,ap_l}.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from loralab.config import DETECTORS, ConfigError, TaskConfig
from loralab.detection import mask2former_instances, maskrcnn_instances
from loralab.models import resolve_path
from loralab.tasks.base import EvalContext, TaskData, fingerprint, holdout_indices
from loralab.tasks.vtab import IMAGENET_MEAN, IMAGENET_STD

TOP_K = 100  # detections per image: Mask2Former's test_topk_per_image, COCO's maxDets (Mask R-CNN: its own 100)
PAD_MULTIPLE = 32  # the backbone's total stride
STATS = ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l")  # COCOeval.stats[:6]


def read_annotations(root: Path, split: str) -> COCO:
    path = root / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        found = sorted(p.name for p in (root / "annotations").glob("*.json")) if (root / "annotations").is_dir() else []
        raise ConfigError(f"COCO split {split!r}: {path} does not exist; annotation files found: {found}")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(str(path))


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray | None:
    """Polygons, uncompressed or compressed RLE -> an (h, w) uint8 mask; None for a polygon list too short to fill."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]  # as detectron2: degenerate dropped
        if not polygons:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def trainable_annotation(ann: dict) -> bool:
    """mmdet's rule (CocoDataset.parse_data_info): no crowd regions, no boxes under a pixel wide or tall."""
    _, _, w, h = ann["bbox"]
    return not ann.get("iscrowd", 0) and w >= 1 and h >= 1 and ann.get("area", 1) > 0


def image_examples(coco: COCO, image_dir: Path, cat_index: dict[int, int], training: bool) -> list[dict]:
    """One dict per image, by id; training keeps each image's instances (class, segmentation, xywh box) and drops
    images without any."""
    examples = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        anns = [a for a in coco.imgToAnns.get(image_id, []) if trainable_annotation(a)]
        if training and not anns:
            continue
        examples.append(
            {
                "image_id": image_id,
                "file": str(image_dir / info["file_name"]),
                "size": (info["height"], info["width"]),
                "anns": [(cat_index[a["category_id"]], a["segmentation"], a["bbox"]) for a in anns] if training else [],
            }
        )
    return examples


def resized_size(height: int, width: int, short: int, long: int) -> tuple[int, int]:
    """mmdet's keep-ratio rescale: the largest scale with shorter side <= short and longer side <= long."""
    scale = min(short / min(height, width), long / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def normalised(image: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def padded_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (bottom/right) to a common size, a multiple of PAD_MULTIPLE; pixel_mask is 1 on the image."""
    h = math.ceil(max(x.shape[1] for x in images) / PAD_MULTIPLE) * PAD_MULTIPLE
    w = math.ceil(max(x.shape[2] for x in images) / PAD_MULTIPLE) * PAD_MULTIPLE
    pixels = torch.zeros(len(images), 3, h, w)
    mask = torch.zeros(len(images), h, w, dtype=torch.long)
    for i, x in enumerate(images):
        pixels[i, :, : x.shape[1], : x.shape[2]] = x
        mask[i, : x.shape[1], : x.shape[2]] = 1
    return pixels, mask


def training_instances(ex: dict, cfg: TaskConfig) -> tuple:
    """One training image resized as mmdet's Resize (keep ratio) and randomly flipped, with its instances transformed
    alike: image (3, h, w), masks (n, h, w) in {0, 1}, classes (n,), boxes (n, 4) xyxy clipped to the image."""
    height, width = ex["size"]
    size = resized_size(height, width, cfg.image_size, cfg.max_image_size)
    with Image.open(ex["file"]) as f:
        image = normalised(f.convert("RGB").resize(size[::-1], Image.BILINEAR))
    decoded = [(c, decode_segmentation(seg, height, width), box) for c, seg, box in ex["anns"]]
    decoded = [(c, mask, box) for c, mask, box in decoded if mask is not None]
    masks = torch.zeros(0, *size)
    if decoded:  # nearest-neighbour resize keeps the masks binary
        stacked = torch.from_numpy(np.stack([mask for _, mask, _ in decoded]))[None].float()
        masks = F.interpolate(stacked, size=size, mode="nearest")[0]
    boxes = torch.tensor([[x, y, x + w, y + h] for _, _, (x, y, w, h) in decoded], dtype=torch.float32).reshape(-1, 4)
    boxes *= torch.tensor([size[1] / width, size[0] / height] * 2)  # mmdet's (w_scale, h_scale, w_scale, h_scale)
    if torch.rand(()) < 0.5:  # horizontal flip (the run seed fixes the draws)
        image, masks = image.flip(-1), masks.flip(-1)
        boxes = torch.stack([size[1] - boxes[:, 2], boxes[:, 1], size[1] - boxes[:, 0], boxes[:, 3]], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
    classes = torch.tensor([c for c, _, _ in decoded], dtype=torch.long)
    # a box outside the image clips to nothing: no instance (its zero width would be log(0) in the box targets)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image, masks[keep], classes[keep], boxes[keep]


def train_collate(cfg: TaskConfig):
    """Batches for the detector's loss: pixel_values and pixel_mask, and per image Mask R-CNN's `targets` (boxes,
    labels 1..K with 0 the background, uint8 masks) or Mask2Former's `mask_labels` (padded) and `class_labels`."""

    def collate(batch: list[dict]) -> dict:
        images, masks, classes, boxes = zip(*(training_instances(ex, cfg) for ex in batch))
        pixels, pixel_mask = padded_batch(list(images))
        if cfg.detector == "maskrcnn":
            targets = [
                {"boxes": b, "labels": c + 1, "masks": m.to(torch.uint8)} for b, c, m in zip(boxes, classes, masks)
            ]
            return {"pixel_values": pixels, "pixel_mask": pixel_mask, "targets": targets}
        padded = [F.pad(m, (0, pixels.shape[3] - m.shape[2], 0, pixels.shape[2] - m.shape[1])) for m in masks]
        return {"pixel_values": pixels, "pixel_mask": pixel_mask, "mask_labels": padded, "class_labels": list(classes)}

    return collate


def eval_collate(cfg: TaskConfig):
    """Inputs plus what post-processing needs: image id and its (resized, original) sizes, under "meta"."""

    def collate(batch: list[dict]) -> dict:
        images, meta = [], []
        for ex in batch:
            size = resized_size(*ex["size"], cfg.image_size, cfg.max_image_size)
            with Image.open(ex["file"]) as f:
                images.append(normalised(f.convert("RGB").resize(size[::-1], Image.BILINEAR)))
            meta.append({"image_id": ex["image_id"], "resized": size, "original": ex["size"]})
        pixels, pixel_mask = padded_batch(images)
        return {"pixel_values": pixels, "pixel_mask": pixel_mask, "meta": meta}

    return collate


def encode_instances(image_id: int, scores, labels, masks, cat_ids: list[int], boxes=None) -> list[dict]:
    """COCO result entries: RLE masks, boxes as xywh (the detector's xyxy boxes; None: the masks' bounding boxes),
    COCO category ids."""
    rles = mask_utils.encode(np.asfortranarray(masks.cpu().numpy().transpose(1, 2, 0).astype(np.uint8)))
    if boxes is None:
        boxes = mask_utils.toBbox(rles)
    else:  # xyxy -> xywh, w = x2 - x1 (continuous coordinates, as mmdet's xyxy2xywh)
        boxes = boxes.cpu().double()
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).numpy()
    out = []
    for rle, box, score, label in zip(rles, boxes, scores.tolist(), labels.tolist()):
        rle["counts"] = rle["counts"].decode("ascii")
        out.append(
            {
                "image_id": image_id,
                "category_id": cat_ids[label],
                "segmentation": rle,
                "bbox": [float(v) for v in box],
                "score": score,
            }
        )
    return out


def coco_metrics(gt: COCO, detections: list[dict], image_ids: list[int]) -> dict[str, float]:
    """COCOeval box and mask AP over `image_ids`. Mask AP ignores the boxes, so instance sizes are mask areas (as
    detectron2 does; with boxes present pycocotools would size instances by box area)."""
    metrics = {}
    for iou_type, name in (("bbox", "box"), ("segm", "mask")):
        if not detections:
            metrics |= {f"{name}_{s}": 0.0 for s in STATS}
            continue
        drop = set() if iou_type == "bbox" else {"bbox"}
        results = [{k: v for k, v in d.items() if k not in drop} for d in detections]  # loadRes edits its input
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(results), iou_type)
            ev.params.imgIds = sorted(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics |= {f"{name}_{s}": float(v) for s, v in zip(STATS, ev.stats[:6])}
    return metrics


def coco_evaluator(cfg: TaskConfig, ground_truth: dict[str, COCO], cat_ids: list[int]):
    collate = eval_collate(cfg)

    @torch.no_grad()
    def evaluate(model, examples: list, ctx: EvalContext) -> dict[str, float]:
        acc = ctx.accelerator
        loader = acc.prepare_data_loader(DataLoader(examples, batch_size=ctx.batch_size, collate_fn=collate))
        model.eval()
        per_image = {}
        for batch in tqdm(loader, desc=ctx.split, leave=False, disable=not (ctx.progress and acc.is_main_process)):
            meta = batch.pop("meta")
            out = model(**batch)
            padded = tuple(batch["pixel_values"].shape[-2:])
            for i, m in enumerate(meta):
                if cfg.detector == "maskrcnn":
                    *found, boxes = maskrcnn_instances(out.detections[i], m["resized"], m["original"])
                else:
                    geometry = (padded, m["resized"], m["original"])
                    logits = (out.class_queries_logits[i], out.masks_queries_logits[i])
                    found, boxes = mask2former_instances(*logits, TOP_K, geometry), None
                per_image[m["image_id"]] = encode_instances(m["image_id"], *found, cat_ids, boxes)
        model.train()
        merged = {}  # every process's images; an image repeated to even out the last batch counts once
        for part in gather_object([per_image]):
            merged |= part
        detections = [d for dets in merged.values() for d in dets]
        return coco_metrics(ground_truth[ctx.split], detections, [e["image_id"] for e in examples])

    return evaluate


def load_coco(cfg: TaskConfig, tokenizer=None) -> TaskData:
    if cfg.detector not in DETECTORS:
        raise ConfigError(f"task {cfg.name!r}: task.detector={cfg.detector!r}; choose one of {sorted(DETECTORS)}")
    if cfg.data_dir is None:
        raise ConfigError(
            f"task {cfg.name!r}: no data: set task.data_dir (with annotations/instances_<split>.json and <split>/)"
        )
    root = Path(resolve_path(cfg.data_dir))
    train_gt, test_gt = read_annotations(root, cfg.train_split), read_annotations(root, cfg.test_split)
    cat_ids = sorted(train_gt.cats)
    if sorted(test_gt.cats) != cat_ids:
        raise ConfigError(f"task {cfg.name!r}: {cfg.train_split} and {cfg.test_split} have different categories")
    names = [train_gt.cats[c]["name"] for c in cat_ids]
    if names != list(cfg.labels):
        raise ConfigError(
            f"task {cfg.name!r}: task.labels must be the annotation categories in id order ({len(names)}: "
            f"{names[:5]}...), got {len(cfg.labels)}: {list(cfg.labels)[:5]}..."
        )
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    train = image_examples(train_gt, root / cfg.train_split, cat_index, training=True)
    test = image_examples(test_gt, root / cfg.test_split, cat_index, training=False)
    for split, examples in ((cfg.train_split, train), (cfg.test_split, test)):
        missing = [e["file"] for e in examples[:20] if not Path(e["file"]).is_file()]  # a sample: 118k files
        if missing:
            raise ConfigError(f"task {cfg.name!r}: images of {split} are missing, e.g. {missing[0]}")
    keep, val_rows = holdout_indices(len(train), cfg.n_val, cfg.split_seed) if cfg.n_val else (range(len(train)), [])
    val = [{**train[i], "anns": []} for i in val_rows]
    train = [train[i] for i in keep]
    if cfg.n_train is not None and cfg.n_train < len(train):  # a seeded subset
        order = np.sort(np.random.default_rng(cfg.split_seed).permutation(len(train))[: cfg.n_train])
        train = [train[i] for i in order]
    if cfg.test_limit is not None:
        test = test[: cfg.test_limit]
    ids = lambda examples: np.array([e["image_id"] for e in examples], dtype=np.int64)
    annotations = [np.array(sorted(gt.anns), dtype=np.int64) for gt in (train_gt, test_gt)]
    digest = fingerprint(cfg.image_size, cfg.max_image_size, cat_ids, ids(train), ids(val), ids(test), *annotations)
    return TaskData(
        train=train,
        val=val,
        test=test,
        collate=train_collate(cfg),
        num_labels=len(cat_ids),
        fingerprint=digest,
        evaluate=coco_evaluator(cfg, {"val": train_gt, "test": test_gt}, cat_ids),
        metric="mask_ap",
    )
