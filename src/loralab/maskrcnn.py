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

RoI sampling follows mmdet (`model.config.roi_aligned`, default true): RoIAlign with aligned=True (pixel i's centre at
i + 0.5) for the box and mask features and for the mask targets, which are binarised at 0.5 (mmdet's mask_target);
at inference the masks are pasted with the same convention (loralab.detection.paste_masks). torchvision fixes
aligned=False (the legacy half-pixel offset) in its pooler and mask targets; with roi_aligned=false the model is
torchvision's own RoI pipeline, which the tests use as the reference for the losses.

The model's own forward replaces GeneralizedRCNN's: the task's pipeline (loralab.tasks.coco) already resizes,
normalises and pads as mmdet does, so batches arrive as the padded `pixel_values` with a `pixel_mask` marking each
image, and torchvision's transform (which would resize and normalise a second time) is not called. Training returns
the summed losses; evaluation returns torchvision's detections in the resized frame, which
`loralab.detection.maskrcnn_instances` maps back to the original image (boxes scaled, masks pasted).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _setup_scales
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


class AlignedRoIAlign(MultiScaleRoIAlign):
    """torchvision's multi-scale RoIAlign (each box from the FPN level of its size, eq. 1 of the FPN paper, the same
    levels as mmdet's finest_scale=56 rule) with mmdet's aligned sampling. Written here because torchvision's pooler
    always samples with aligned=False; `aligned=False` is torchvision's pooler unchanged."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int, aligned: bool):
        super().__init__(featmap_names, output_size, sampling_ratio)
        self.aligned = aligned

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]):
        if not self.aligned:
            return super().forward(x, boxes, image_shapes)
        maps = [x[name] for name in self.featmap_names]
        if self.scales is None or self.map_levels is None:  # as torchvision: the strides, from the first batch
            self.scales, self.map_levels = _setup_scales(maps, image_shapes, self.canonical_scale, self.canonical_level)
        levels = self.map_levels(boxes)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        out = maps[0].new_zeros(len(rois), maps[0].shape[1], *self.output_size)
        for level, (features, scale) in enumerate(zip(maps, self.scales)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(features, rois[idx], self.output_size, scale, self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)  # autocast may pool levels in different dtypes
        return out


class Float32BoxPredictor(FastRCNNPredictor):
    """torchvision's box predictor with its scores and deltas in float32 under autocast: torchvision decodes the boxes
    in the deltas' dtype, and bf16 (8 mantissa bits) would round a coordinate near 1000 px to a multiple of 4."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, matched: torch.Tensor, size: int, aligned: bool):
    """Each positive box's ground-truth mask cropped and resized to size x size. aligned: mmdet's mask_target
    (aligned RoIAlign, binarised at 0.5); not aligned: torchvision's project_masks_on_boxes (soft, aligned=False)."""
    rois = torch.cat([matched[:, None].to(boxes), boxes], dim=1)  # the gt mask's index as RoIAlign's batch index
    crops = roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0, aligned=aligned)[:, 0]
    return (crops >= 0.5).to(crops) if aligned else crops


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

    def __init__(self, backbone: BackboneFPN, build_config: dict, roi_aligned: bool = True, **kwargs):
        super().__init__(backbone, **kwargs)
        self.build_config = build_config  # what save_pretrained writes beside the weights
        self.roi_aligned = roi_aligned

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
        with heads_computing_losses(self.rpn):
            proposals, losses = self.rpn(images, features, targets)
        losses |= self.roi_losses(features, proposals, sizes, targets)
        return MaskRCNNOutput(loss=sum(losses.values()), losses=losses)

    def roi_losses(self, features: dict, proposals: list, sizes: list, targets: list[dict]) -> dict[str, torch.Tensor]:
        """torchvision's RoIHeads training pass (sampling, box loss, mask branch on the positive boxes) with the mask
        targets of `mask_targets`: RoIHeads computes them inside its forward, with aligned=False only."""
        heads = self.roi_heads
        proposals, matched, labels, regression = heads.select_training_samples(proposals, targets)
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression)
        positive = [torch.where(lab > 0)[0] for lab in labels]
        boxes = [p[i] for p, i in zip(proposals, positive)]
        matched = [m[i] for m, i in zip(matched, positive)]
        logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, boxes, sizes)))
        size = logits.shape[-1]
        goal = [mask_targets(t["masks"], b, m, size, self.roi_aligned) for t, b, m in zip(targets, boxes, matched)]
        classes = torch.cat([t["labels"][m] for t, m in zip(targets, matched)])
        goal = torch.cat(goal)
        if goal.numel() == 0:  # no positive box in the batch (as torchvision: a zero that keeps the graph)
            loss_mask = logits.sum() * 0
        else:
            loss_mask = F.binary_cross_entropy_with_logits(logits[torch.arange(len(classes)), classes], goal)
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}

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
    roi_sampling_ratio (0: mmdet's adaptive), roi_aligned (true: mmdet's), and any keyword of torchvision's
    MaskRCNN."""
    kwargs = OmegaConf.to_container(cfg.config, resolve=True) if OmegaConf.is_config(cfg.config) else dict(cfg.config)
    if resizing := sorted(set(kwargs) & {"min_size", "max_size", "image_mean", "image_std"}):
        raise ConfigError(
            f"model {cfg.name!r}: model.config.{resizing[0]} would go to torchvision's transform, which this model "
            f"does not call: the task resizes and normalises (task.image_size, task.max_image_size)"
        )
    body = AutoBackbone.from_config(backbone_config(cfg, kwargs.pop("backbone_config", None) or {}))
    if len(body.channels) != len(LEVELS):
        raise ConfigError(f"model {cfg.name!r}: the FPN takes 4 stages (out_features), got {body.out_features}")
    build_config = {"arch": ARCH, "num_labels": num_labels, "backbone_config": body.config.to_dict(), **kwargs}
    backbone = BackboneFPN(body, kwargs.pop("fpn_channels", 256))
    box_channels = kwargs.pop("box_head_channels", 1024)
    mask_channels = list(kwargs.pop("mask_head_channels", [256] * 4))
    sampling = kwargs.pop("roi_sampling_ratio", 0)
    aligned = kwargs.pop("roi_aligned", True)
    return ConvNextMaskRCNN(
        backbone,
        build_config=build_config,
        roi_aligned=aligned,
        box_roi_pool=AlignedRoIAlign(LEVELS, 7, sampling, aligned),
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, box_channels),
        box_predictor=Float32BoxPredictor(box_channels, num_labels + 1),  # + background (class 0)
        mask_roi_pool=AlignedRoIAlign(LEVELS, 14, sampling, aligned),
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
