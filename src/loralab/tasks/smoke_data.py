"""Tiny datasets in the real on-disk layouts of VTAB-1k and COCO, for smoke runs of the paper presets (seconds, no
download) and for tests: the same loaders read them as the full datasets.

    python -m loralab.tasks.smoke_data vtab /tmp/vtab_smoke   # <dir>/svhn/: scikit-learn's real 8x8 digits
    python -m loralab.tasks.smoke_data coco /tmp/coco_smoke   # coloured polygons with COCO annotations

The VTAB-1k one is real data (digits, 10 classes, under the name of VTAB's digit task, svhn); the COCO one is
synthetic: shapes drawn from their annotation polygons, one category per shape, plus crowd and empty images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from sklearn.datasets import load_digits

VTAB_SPLITS = {"train800": 40, "val200": 10, "test": 50}  # images per split (the real ones: 800 / 200 / thousands)
SHAPES = {2: ("square", (220, 40, 40)), 5: ("triangle", (40, 200, 40)), 9: ("bar", (40, 40, 220))}  # id: name, RGB
COCO_LABELS = [name for _, (name, _) in sorted(SHAPES.items())]


def write_vtab(root: str | Path, task: str = "svhn", seed: int = 0) -> Path:
    """<root>/<task>/images/<split>/*.png and the four "<path> <label>" lists of the VTAB-1k release."""
    folder = Path(root) / task
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    lines, start = {}, 0
    for split, n in VTAB_SPLITS.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lines[split] = []
        for k, i in enumerate(order[start : start + n]):
            rel = f"images/{split}/{k:06d}.png"
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").save(folder / rel)
            lines[split].append(f"{rel} {digits.target[i]}")
        start += n
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return folder


def _shape(cat_id: int, x: float, y: float, s: float) -> list[float]:
    """The polygon of one object, flattened as COCO stores it (x1, y1, x2, y2, ...)."""
    if SHAPES[cat_id][0] == "square":
        points = [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]
    elif SHAPES[cat_id][0] == "triangle":
        points = [(x + s / 2, y), (x + s, y + s), (x, y + s)]
    else:
        points = [(x, y), (x + s, y), (x + s, y + s / 3), (x, y + s / 3)]
    return [float(v) for p in points for v in p]


def _coco_split(folder: Path, split: str, n_images: int, rng: np.random.Generator, first_id: int) -> dict:
    (folder / split).mkdir(parents=True, exist_ok=True)
    images, annotations, ann_id = [], [], first_id
    for k in range(n_images):
        height, width = (48, 64) if k % 2 else (64, 48)
        image = Image.fromarray(rng.integers(0, 60, (height, width, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        image_id = first_id + 7 * k  # ids need not be contiguous
        empty = split.startswith("val") and k == n_images - 1  # an image without objects
        crowd_only = split.startswith("train") and k == n_images - 1  # dropped from training
        cells = rng.permutation(4)[: 0 if empty else int(rng.integers(1, 4))]  # one object per image quadrant:
        for cell in cells:  # no occlusion, so each annotation is exactly its visible shape (COCO masks are modal)
            cat_id = int(rng.choice(list(SHAPES)))
            ch, cw = height // 2, width // 2
            s = float(rng.integers(10, min(ch, cw) - 1))
            x = (cell % 2) * cw + float(rng.integers(0, cw - s))
            y = (cell // 2) * ch + float(rng.integers(0, ch - s))
            polygon = _shape(cat_id, x, y, s)
            draw.polygon(polygon, fill=SHAPES[cat_id][1])
            rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
            segmentation, iscrowd = [polygon], 0
            if crowd_only:  # crowd regions are stored as RLE
                segmentation, iscrowd = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}, 1
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat_id,
                    "segmentation": segmentation,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": iscrowd,
                }
            )
            ann_id += 1
        file_name = f"{image_id:012d}.jpg"
        image.save(folder / split / file_name, quality=95, subsampling=0)  # no chroma blur
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    categories = [{"id": i, "name": name, "supercategory": "shape"} for i, (name, _) in sorted(SHAPES.items())]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(root: str | Path, train: int = 8, val: int = 4, seed: int = 0) -> Path:
    """<root>/annotations/instances_{train2017,val2017}.json and <root>/{train2017,val2017}/*.jpg."""
    folder = Path(root)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n, first_id in (("train2017", train, 1), ("val2017", val, 10_000)):
        data = _coco_split(folder, split, n, rng, first_id)
        (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("layout", choices=["vtab", "coco"])
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    out = write_vtab(args.directory) if args.layout == "vtab" else write_coco(args.directory)
    print(out)


if __name__ == "__main__":
    main()
