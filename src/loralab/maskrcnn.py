"""Mask R-CNN (He et al. 2017), the LieRA paper's COCO detector: torchvision's implementation on a transformers
backbone (ConvNeXt-V2) through torchvision's FPN, set up as mmdetection's `mask-rcnn_r50_fpn` with a ConvNeXt
backbone (configs/convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py).

- Backbone: a transformers `AutoBackbone` (ConvNextV2Backbone) returning stages 1-4 (strides 4-32), each through its
  own output LayerNorm (as mmdet's ConvNeXt with out_indices [0, 1, 2, 3]); its pretrained weights come from the
  classification checkpoint (`loralab.detection.load_backbone_weights`).
- Neck: torchvision's FeaturePyramidNetwork, 256 channels, P2-P5 plus P6 by stride-2 max pooling (mmdet's FPN with
  num_outs=5 and no extra convs), exposed with `out_channels` as torchvision's BackboneWithFPN is.
- Heads: torchvision's RPN (3 aspect ratios x one size per level, 32-512: mmdet's scales [8] x strides 4-64) and
  RoI heads (2 fc of 1024, class-specific boxes; a 4-conv mask head, 28x28 masks), with mmdet's train/test settings
  where torchvision exposes them (`model.config`: any torchvision MaskRCNN keyword).

The model's own forward replaces GeneralizedRCNN's: the task's pipeline (loralab.tasks.coco) already resizes,
normalises and pads as mmdet does, so batches arrive as the padded `pixel_values` with a `pixel_mask` marking each
image, and torchvision's transform (which would resize and normalise a second time) is not called. Training returns
the summed losses; evaluation returns torchvision's detections in the resized frame, which
`loralab.detection.maskrcnn_instances` maps back to the original image as torchvision's postprocess does.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from transformers import AutoBackbone, AutoConfig, PretrainedConfig

from loralab.config import ConfigError, ModelConfig
from loralab.detection import load_backbone_weights, pretrained_backbone_config

ARCH = "maskrcnn"
LEVELS = ["0", "1", "2", "3"]  # the FPN levels RoIAlign reads (P2-P5); "pool" (P6) feeds the RPN only


class BackboneFPN(nn.Module):
    """A transformers backbone and torchvision's FPN on its feature maps: `body` -> `fpn`, with `out_channels`."""

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.body(pixel_values).feature_maps
        return self.fpn(OrderedDict(zip(LEVELS, maps)))


@contextmanager
def heads_computing_losses(*heads: nn.Module):
    """torchvision's RPN and RoI heads compute their losses only in training mode; they hold no dropout or batch
    norm, so switching them (not the backbone) to it changes nothing else. Their modes are restored afterwards."""
    modes = [h.training for h in heads]
    for h in heads:
        h.train()
    try:
        yield
    finally:
        for h, mode in zip(heads, modes):
            h.train(mode)


@dataclass
class MaskRCNNOutput:
    """Training: `loss` (the sum) and its parts; evaluation: torchvision's per-image detections (boxes xyxy in the
    resized image, labels 1..K, scores, masks (n, 1, 28, 28) probabilities in their boxes) and the images' sizes."""

    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    detections: list[dict[str, torch.Tensor]] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)


class ConvNextMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN, fed the task's padded batches (see the module docstring)."""

    def __init__(self, backbone: BackboneFPN, build_config: dict, **kwargs):
        super().__init__(backbone, **kwargs)
        self.build_config = build_config  # what save_pretrained writes beside the weights

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, targets: list[dict] | None = None):
        """With `targets`: the losses, in either mode (as a transformers model given labels: gradient estimates run in
        eval mode); without: the detections (eval mode)."""
        # each image's (rows, cols) inside the zero padding at its bottom/right
        sizes = [(int(m[:, 0].sum()), int(m[0].sum())) for m in pixel_mask]
        images = ImageList(pixel_values, sizes)
        features = self.backbone(pixel_values)
        if targets is None:
            if self.training:
                raise ValueError("Mask R-CNN in training mode needs targets")
            proposals, _ = self.rpn(images, features)
            detections, _ = self.roi_heads(features, proposals, sizes)
            return MaskRCNNOutput(detections=detections, image_sizes=sizes)
        with heads_computing_losses(self.rpn, self.roi_heads):
            proposals, rpn_losses = self.rpn(images, features, targets)
            _, roi_losses = self.roi_heads(features, proposals, sizes, targets)
        losses = rpn_losses | roi_losses
        return MaskRCNNOutput(loss=sum(losses.values()), losses=losses)

    def save_pretrained(self, out_dir: str) -> None:
        """model.safetensors + config.json (what full fine-tuning saves; adapters go through PEFT / the variant)."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(Path(out_dir) / "model.safetensors"))
        (Path(out_dir) / "config.json").write_text(json.dumps(self.build_config, indent=2))


def backbone_config(cfg: ModelConfig, kwargs: dict) -> PretrainedConfig:
    """The backbone's transformers config: the checkpoint's at `model.path` (source hf / package) or one written in
    `model.config.backbone_config` (source config, with its model_type), updated by `backbone_config`."""
    from loralab.models import resolve_path  # noqa: PLC0415  (loralab.models builds through this module)

    if cfg.source in ("hf", "package"):
        return pretrained_backbone_config(resolve_path(cfg.path), kwargs)
    if cfg.source != "config":
        raise ConfigError(f"model {cfg.name!r}: a Mask R-CNN's backbone comes from source hf, package or config")
    kwargs = dict(kwargs)
    if "model_type" not in kwargs:
        raise ConfigError(f"model {cfg.name!r}: source={cfg.source} needs model.config.backbone_config.model_type")
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def build_mask_rcnn(cfg: ModelConfig, num_labels: int) -> ConvNextMaskRCNN:
    """A new Mask R-CNN for `num_labels` classes (+ background) with a randomly initialised backbone.

    `model.config`: backbone_config, fpn_channels (256), box_head_channels (1024), mask_head_channels ([256] x 4),
    roi_sampling_ratio (0: mmdet's adaptive), and any keyword of torchvision's MaskRCNN."""
    kwargs = OmegaConf.to_container(cfg.config, resolve=True) if OmegaConf.is_config(cfg.config) else dict(cfg.config)
    build_config = {"num_labels": num_labels, **kwargs}
    body = AutoBackbone.from_config(backbone_config(cfg, kwargs.pop("backbone_config", None) or {}))
    if len(body.channels) != len(LEVELS):
        raise ConfigError(f"model {cfg.name!r}: the FPN takes 4 stages (out_features), got {body.out_features}")
    backbone = BackboneFPN(body, kwargs.pop("fpn_channels", 256))
    box_channels = kwargs.pop("box_head_channels", 1024)
    mask_channels = list(kwargs.pop("mask_head_channels", [256] * 4))
    sampling = kwargs.pop("roi_sampling_ratio", 0)
    return ConvNextMaskRCNN(
        backbone,
        build_config=build_config,
        box_roi_pool=MultiScaleRoIAlign(LEVELS, output_size=7, sampling_ratio=sampling),
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, box_channels),
        box_predictor=FastRCNNPredictor(box_channels, num_labels + 1),  # + background (class 0)
        mask_roi_pool=MultiScaleRoIAlign(LEVELS, output_size=14, sampling_ratio=sampling),
        mask_head=MaskRCNNHeads(backbone.out_channels, mask_channels, dilation=1),
        mask_predictor=MaskRCNNPredictor(mask_channels[-1], mask_channels[-1], num_labels + 1),
        **kwargs,
    )


def pretrained_mask_rcnn(cfg: ModelConfig, num_labels: int) -> ConvNextMaskRCNN:
    """The detector to fine-tune: new neck and heads; the backbone pretrained from `model.path` (source hf /
    package), random from its config (source config: the tiny test models)."""
    from loralab.models import resolve_path  # noqa: PLC0415

    dtype = getattr(torch, cfg.dtype) if cfg.dtype else torch.float32
    model = build_mask_rcnn(cfg, num_labels).to(dtype)
    if cfg.source in ("hf", "package"):
        load_backbone_weights(model, resolve_path(cfg.path), dtype)
    return model
