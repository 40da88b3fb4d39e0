"""VTAB-1k (Zhai et al. 2019): 19 image-classification tasks with 1,000 training images each, as the PEFT
literature runs them (VPT, NOAH, SSF, Conv-Adapter, ...).

Data: the common VTAB-1k release (NOAH/VPT's "vtab-1k" folder): `<root>/<task>/images/...` and four lists of
"<path relative to the task folder> <label index>" lines — train800.txt, val200.txt, train800val200.txt (the 1k)
and test.txt. `task.data_dir` is that root (the task folder is `task.subset`) or one task's folder. Without such
a folder, `task.dataset` names a hub dataset (subset = the task) whose splits carry those four names and `image` /
`label` columns; `data_dir` may then hold a `save_to_disk` copy of it (see loralab.tasks.hub.load_split).

Protocol (`task.train_split`): `train800val200` trains on the 1k and reports top-1 on test, with no validation split
(the final protocol of the papers); `train800` holds val200 out as the validation split (hyperparameter search).
Images: resized to image_size x image_size (bicubic), scaled to [0, 1], normalised with ImageNet's mean and std,
no augmentation — NOAH's pipeline. Images are decoded when a batch is built (a test set holds up to 73,728).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loralab.config import ConfigError, TaskConfig
from loralab.models import resolve_path
from loralab.tasks.base import TaskData, fingerprint
from loralab.tasks.hub import load_split, require_columns
from loralab.tasks.offline import collate_images

# task folder -> (VTAB group, number of classes); folder names and counts of the VTAB-1k release
VTAB_TASKS: dict[str, tuple[str, int]] = {
    "cifar": ("natural", 100),  # CIFAR-100
    "caltech101": ("natural", 102),
    "dtd": ("natural", 47),
    "oxford_flowers102": ("natural", 102),
    "oxford_iiit_pet": ("natural", 37),
    "svhn": ("natural", 10),
    "sun397": ("natural", 397),
    "patch_camelyon": ("specialized", 2),
    "eurosat": ("specialized", 10),
    "resisc45": ("specialized", 45),
    "diabetic_retinopathy": ("specialized", 5),
    "clevr_count": ("structured", 8),
    "clevr_dist": ("structured", 6),
    "dmlab": ("structured", 6),
    "kitti": ("structured", 4),  # closest-vehicle distance
    "dsprites_loc": ("structured", 16),
    "dsprites_ori": ("structured", 16),
    "smallnorb_azi": ("structured", 18),
    "smallnorb_ele": ("structured", 9),
}
SPLIT_FILES = {
    "train800": "train800.txt",
    "val200": "val200.txt",
    "train800val200": "train800val200.txt",
    "test": "test.txt",
}
VAL_SPLIT = {"train800val200": None, "train800": "val200"}  # training split -> the split held out for validation
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB, resized to size x size (bicubic), [0, 1], ImageNet-normalised: (3, size, size) float32."""
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


@dataclass
class LabelledImages(torch.utils.data.Dataset):
    """The images of one split, decoded on access."""

    images: Sequence  # file paths, or a `datasets` image column (PIL images, decoded per row)
    rows: list[int]  # the rows of `images` this split uses
    labels: list[int]  # one per row
    size: int

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        image = self.images[self.rows[i]]
        if not isinstance(image, Image.Image):
            with Image.open(image) as f:
                image = f.copy()
        return {"pixel_values": image_tensor(image, self.size), "labels": self.labels[i]}


def task_folder(cfg: TaskConfig) -> Path | None:
    """The VTAB-1k folder of the task (the root's `<subset>/`, or data_dir itself), or None if data_dir is not one."""
    if cfg.data_dir is None:
        return None
    root = Path(resolve_path(cfg.data_dir))
    for folder in (root / cfg.subset, root):
        if (folder / SPLIT_FILES["train800val200"]).is_file():
            return folder
    return None


def read_list(folder: Path, split: str) -> tuple[list[str], list[int]]:
    path = folder / SPLIT_FILES[split]
    if not path.is_file():
        raise ConfigError(f"VTAB-1k folder {folder} has no {path.name} (split {split!r})")
    paths, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ConfigError(f"{path}:{n}: expected '<image path> <label index>', got {line!r}")
        paths.append(str(folder / parts[0]))
        labels.append(int(parts[1]))
    return paths, labels


def load_rows(cfg: TaskConfig, split: str) -> tuple[Sequence, list[int], str]:
    """(images, labels, digest) of one split, from a VTAB-1k folder or from `datasets`."""
    folder = task_folder(cfg)
    if folder is not None:
        paths, labels = read_list(folder, split)
        missing = [p for p in paths[:20] if not Path(p).is_file()]  # a sample: a test list names up to 73k files
        if missing:
            raise ConfigError(f"task {cfg.name!r}: {SPLIT_FILES[split]} names missing images, e.g. {missing[0]}")
        rel = [str(Path(p).relative_to(folder)) for p in paths]
        return paths, labels, fingerprint(split, rel, labels)
    try:
        ds = load_split(cfg.dataset, cfg.subset, split, cfg.data_dir, task=cfg.name)
    except ConfigError as exc:
        raise ConfigError(
            f"task {cfg.name!r}: no VTAB-1k folder ({cfg.subset}/{SPLIT_FILES['train800val200']} under data_dir) "
            f"and no `datasets` copy: {exc}"
        ) from exc
    require_columns(ds, ["image", "label"], f"task {cfg.name!r} split {split!r}")
    labels = [int(x) for x in ds["label"]]
    # the image bytes are not hashed (slow); the dataset's own fingerprint covers them where it has one
    return ds["image"], labels, fingerprint(split, getattr(ds, "_fingerprint", None), labels)


def load_vtab(cfg: TaskConfig, tokenizer=None) -> TaskData:
    if cfg.subset not in VTAB_TASKS:
        raise ConfigError(f"task {cfg.name!r}: subset={cfg.subset!r} is not a VTAB-1k task; tasks: {list(VTAB_TASKS)}")
    if cfg.train_split not in VAL_SPLIT:
        raise ConfigError(f"task {cfg.name!r}: train_split={cfg.train_split!r}; choose one of {list(VAL_SPLIT)}")
    if cfg.test_split not in SPLIT_FILES:
        raise ConfigError(f"task {cfg.name!r}: test_split={cfg.test_split!r}; choose one of {list(SPLIT_FILES)}")
    if cfg.data_dir is None and cfg.dataset is None:
        raise ConfigError(
            f"task {cfg.name!r}: no data: set task.data_dir to the VTAB-1k root "
            f"(<task>/{SPLIT_FILES['train800val200']}, ...), or task.dataset to a hub copy"
        )
    num_classes = VTAB_TASKS[cfg.subset][1]
    if len(cfg.labels) != num_classes:
        raise ConfigError(
            f"task {cfg.name!r}: VTAB-1k {cfg.subset} has {num_classes} classes but task.labels has {len(cfg.labels)}"
        )
    splits = {"train": cfg.train_split, "val": VAL_SPLIT[cfg.train_split], "test": cfg.test_split}
    data, digests = {}, []
    for role, split in splits.items():
        if split is None:
            data[role] = []
            continue
        images, labels, digest = load_rows(cfg, split)
        bad = sorted({y for y in labels if not 0 <= y < num_classes})
        if bad:
            raise ConfigError(f"task {cfg.name!r}: split {split!r} has labels {bad[:5]} outside 0..{num_classes - 1}")
        keep = range(len(labels))
        if role == "train" and cfg.n_train is not None and cfg.n_train < len(labels):  # a seeded subset
            keep = np.sort(np.random.default_rng(cfg.split_seed).permutation(len(labels))[: cfg.n_train])
        if role == "test" and cfg.test_limit is not None:
            keep = range(min(cfg.test_limit, len(labels)))
        keep = [int(i) for i in keep]
        data[role] = LabelledImages(images, keep, [labels[i] for i in keep], cfg.image_size)
        digests.append((digest, keep))
    return TaskData(
        train=data["train"],
        val=data["val"],
        test=data["test"],
        collate=collate_images,
        num_labels=num_classes,
        fingerprint=fingerprint(cfg.subset, cfg.image_size, *digests),
    )
