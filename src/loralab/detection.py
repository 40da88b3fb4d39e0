"""Detectors around a pretrained image backbone (task kind `detection`), and their instance predictions.

The detector is transformers' Mask2Former (instance segmentation; boxes are the predicted masks' bounding boxes)
with a ConvNeXt-V2 backbone passed as `backbone_config`. transformers (>= 5) builds the backbone from that config
with random weights, so `load_backbone_weights` copies the pretrained ones from the backbone's checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.backbone_utils import BackboneMixin

from loralab.config import ConfigError


def backbone_module(model: nn.Module) -> nn.Module:
    found = [m for m in model.modules() if isinstance(m, BackboneMixin)]
    if len(found) != 1:
        raise ConfigError(f"{type(model).__name__}: expected one transformers backbone module, found {len(found)}")
    return found[0]


def detector_config(arch: str, backbone_path: str, num_labels: int, kwargs: dict) -> PretrainedConfig:
    """A new `arch` model whose backbone has the architecture of the checkpoint at `backbone_path`.

    `kwargs["backbone_config"]` overrides the checkpoint's config (e.g. which stages feed the detector)."""
    backbone_kwargs = dict(kwargs.pop("backbone_config", None) or {})
    kind = AutoConfig.from_pretrained(backbone_path).model_type
    if backbone_kwargs.pop("model_type", kind) != kind:
        raise ConfigError(f"backbone_config.model_type differs from the checkpoint's ({kind}) at {backbone_path}")
    backbone = AutoConfig.from_pretrained(backbone_path, **backbone_kwargs)
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


def masks_to_image(masks: torch.Tensor, padded, resized, original) -> torch.Tensor:
    """(k, h, w) mask logits at the output stride -> the original image's pixels: up to the padded input size, crop
    the image's region (images are padded at the bottom/right), resize to the original size."""
    m = F.interpolate(masks[None], size=tuple(padded), mode="bilinear", align_corners=False)
    m = m[..., : resized[0], : resized[1]]
    return F.interpolate(m, size=tuple(original), mode="bilinear", align_corners=False)[0]
