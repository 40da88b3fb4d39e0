"""scikit-learn's bundled 8x8 digits (real, offline) and the cached pretraining of a small ConvNeXt-V2 on 0-4.

The `digits_transfer` task fine-tunes that backbone on digits 5-9, so adapters act on convolution kernels of
a network whose features were really learned, as LieRA's ConvNeXt-V2 experiments do at full scale.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits

from loralab.config import ModelConfig
from loralab.io import atomic_path

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
TRANSFER_CLASSES = (5, 6, 7, 8, 9)


def digits_arrays(classes) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 8, 8) scaled to [0, 1] and labels re-indexed 0..len(classes)-1, in sklearn's order."""
    digits = load_digits()
    keep = np.isin(digits.target, classes)
    images = (digits.images[keep] / 16.0).astype(np.float32)[:, None]
    index = {c: i for i, c in enumerate(classes)}
    return images, np.array([index[t] for t in digits.target[keep]], dtype=np.int64)


def _cache_file(cfg: ModelConfig, cache_dir: str) -> Path:
    spec = {
        "arch": cfg.arch,
        "config": OmegaConf.to_container(OmegaConf.create(dict(cfg.config))),
        "pretrain": OmegaConf.to_container(OmegaConf.structured(cfg.pretrain)),
        "torch": torch.__version__.split("+")[0],
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"digits_0to4-{cfg.name}-{key}.safetensors"


def pretrain_backbone(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Train `model` (a fresh image classifier with 5 labels) on all digits 0-4; return its weights."""
    p = cfg.pretrain
    images, labels = digits_arrays(PRETRAIN_CLASSES)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(p.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=p.steps, pct_start=0.1)
    model.train()
    for _ in range(p.steps):
        idx = torch.randint(len(x), (p.batch_size,), generator=gen)
        loss = model(pixel_values=x[idx], labels=y[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def load_pretrained_backbone(model: torch.nn.Module, cfg: ModelConfig, cache_dir: str) -> None:
    """Load the digits-0-4 backbone into `model` (its classifier head stays as initialised: the task is new).

    Pretraining runs once per (architecture, pretrain settings, torch version) and is cached; it forks the RNG so
    a run's own seeded initialisation is the same whether or not the cache existed.
    """
    path = _cache_file(cfg, cache_dir)
    if not path.exists():
        with torch.random.fork_rng():
            torch.manual_seed(cfg.pretrain.seed)
            source = type(model)(model.config)
            state = pretrain_backbone(source, cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise RuntimeError(f"pretrained digits backbone {path} does not fit: missing={missing} unexpected={unexpected}")
