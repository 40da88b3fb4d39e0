"""Detectors around a pretrained image backbone (task kind `detection`), and their instance predictions.

Two detectors (`model.arch`): torchvision's Mask R-CNN on a transformers backbone (loralab.maskrcnn; its own box and
mask heads), and transformers' Mask2Former (instance masks; its boxes are the masks' bounding boxes) with the
backbone passed as `backbone_config`. Both build the backbone from its config with random weights (transformers >= 5
no longer loads it), so `load_backbone_weights` copies the pretrained ones from the backbone's checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.transform import resize_boxes
from transformers import AutoConfig, PretrainedConfig
from transformers.backbone_utils import BackboneMixin

from loralab.config import ConfigError


def backbone_module(model: nn.Module) -> nn.Module:
    found = [m for m in model.modules() if isinstance(m, BackboneMixin)]
    if len(found) != 1:
        raise ConfigError(f"{type(model).__name__}: expected one transformers backbone module, found {len(found)}")
    return found[0]


def pretrained_backbone_config(backbone_path: str, overrides: dict) -> PretrainedConfig:
    """The config of the checkpoint at `backbone_path`, updated by `overrides` (e.g. which stages feed the detector)."""
    overrides = dict(overrides)
    kind = AutoConfig.from_pretrained(backbone_path).model_type
    if overrides.pop("model_type", kind) != kind:
        raise ConfigError(f"backbone_config.model_type differs from the checkpoint's ({kind}) at {backbone_path}")
    return AutoConfig.from_pretrained(backbone_path, **overrides)


def detector_config(arch: str, backbone_path: str, num_labels: int, kwargs: dict) -> PretrainedConfig:
    """A new transformers `arch` model whose backbone has the architecture of the checkpoint at `backbone_path`.

    `kwargs["backbone_config"]` overrides the checkpoint's config."""
    backbone = pretrained_backbone_config(backbone_path, kwargs.pop("backbone_config", None) or {})
    return AutoConfig.for_model(arch, backbone_config=backbone, num_labels=num_labels, **kwargs)


def load_backbone_weights(model: nn.Module, backbone_path: str, dtype: torch.dtype) -> None:
    """Copy the pretrained backbone (an image-classification checkpoint works: its head is dropped) into `model`."""
    backbone = backbone_module(model)
    # its own class, not AutoBackbone: that one asks the hub whether the repo exists, even for a local directory
    pretrained = type(backbone).from_pretrained(backbone_path, config=backbone.config, dtype=dtype)
    backbone.load_state_dict(pretrained.state_dict())  # same class and config: every key matches


@torch.no_grad()
def mask2former_instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, top_k: int, geometry) -> tuple:
    """Mask2Former's instance inference for one image (its `instance_inference`): the top-k (query, class) pairs by
    class probability, each scored x the mean foreground probability of its mask at the image's resolution.

    class_logits (Q, K+1) with "no object" last; mask_logits (Q, h, w) at the model's output stride; geometry =
    (padded, resized, original) (height, width) pairs, see `masks_to_image`. Returns scores (k,), class indices (k,)
    and binary masks (k, H, W) at the original resolution.
    """
    probs = class_logits.float().softmax(-1)[:, :-1]
    num_classes = probs.shape[1]
    scores, flat = probs.flatten().topk(min(top_k, probs.numel()))
    labels, query = flat % num_classes, flat // num_classes
    masks = masks_to_image(mask_logits[query].float(), *geometry)
    binary = masks > 0
    mask_score = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return scores * mask_score, labels, binary


@torch.no_grad()
def maskrcnn_instances(detections: dict[str, torch.Tensor], resized, original) -> tuple:
    """Mask R-CNN's detections for one image (torchvision's roi_heads output, in the resized frame) -> the original
    image: boxes scaled by original/resized (torchvision's resize_boxes), each mask's 28x28 probabilities pasted into
    its box (`paste_masks`) and thresholded at mmdet's mask_thr_binary, 0.5.

    Returns scores (k,), class indices (k,) (torchvision's labels 1..K -> 0..K-1), binary masks (k, H, W) and boxes
    (k, 4) xyxy at the original resolution."""
    boxes = resize_boxes(detections["boxes"].float(), list(resized), list(original))
    masks = paste_masks(detections["masks"][:, 0].float(), boxes, tuple(original)) >= 0.5
    return detections["scores"].float(), detections["labels"] - 1, masks, boxes


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size) -> torch.Tensor:
    """(k, M, M) mask probabilities, each covering its box (k, 4) xyxy -> (k, H, W) at the image's pixels: pixel (y, x)
    samples its mask bilinearly at its centre (x + 0.5, y + 0.5), zero outside the box (mmdet / detectron2's paste,
    the inverse of an aligned RoIAlign crop). Hand-written: torchvision's paste_masks_in_image keeps the legacy
    convention of boxes one pixel wider (x2 inclusive), which misplaces a mask's border by a pixel. Each mask is
    sampled only on its box's pixels and a one-pixel margin (what the bilinear kernel can reach), for memory."""
    height, width = size
    out = masks.new_zeros(len(masks), height, width)
    for i, (mask, (x0, y0, x1, y1)) in enumerate(zip(masks, boxes.tolist())):
        c0, r0 = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
        c1, r1 = min(math.ceil(x1) + 1, width), min(math.ceil(y1) + 1, height)
        if c1 <= c0 or r1 <= r0:
            continue
        xs = (torch.arange(c0, c1, device=masks.device) + 0.5 - x0) / max(x1 - x0, 1e-6) * 2 - 1
        ys = (torch.arange(r0, r1, device=masks.device) + 0.5 - y0) / max(y1 - y0, 1e-6) * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (rows, cols, (x, y)) in [-1, 1]
        out[i, r0:r1, c0:c1] = F.grid_sample(mask[None, None], grid[None].to(mask), align_corners=False)[0, 0]
    return out


def masks_to_image(masks: torch.Tensor, padded, resized, original) -> torch.Tensor:
    """(k, h, w) mask logits at the output stride -> the original image's pixels: up to the padded input size, crop
    the image's region (images are padded at the bottom/right), resize to the original size."""
    m = F.interpolate(masks[None], size=tuple(padded), mode="bilinear", align_corners=False)
    m = m[..., : resized[0], : resized[1]]
    return F.interpolate(m, size=tuple(original), mode="bilinear", align_corners=False)[0]
