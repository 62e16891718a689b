"""torchvision's detection families (Faster R-CNN, RetinaNet, FCOS, SSDlite) behind the contract.

``NETWORKS`` is a plain dict of torchvision detection builders with what Drip needs to know about
each: the family, the tuned learning rate (per image, so it scales with the batch), the COCO and
ImageNet weights, and which sub-module is the class-specific head to re-size for a label map.
Everything that reaches into torchvision's modules (``transform``, ``roi_heads``,
``score_thresh``, ``backbone.body``, ``resize_boxes``) is here and nowhere else.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights
from torchvision.models import detection as tvd
from torchvision.ops.misc import FrozenBatchNorm2d

from ..errors import DownloadError, ModelError
from .base import Family, Published, decay_groups, first_line, load_matching

# Learning rates from torchvision's references/detection (README.md and train.py), expressed per
# image because the reference recipes ran on 8 GPUs: train.py's default --lr 0.02 is "for 8 GPUs
# and 2 images per GPU" (Faster R-CNN recipes); RetinaNet and FCOS use --lr 0.01 at the same
# 16 images; SSDlite uses --lr 0.15 with --batch-size 24 per GPU on 8 GPUs (192 images).
_FASTER_RCNN_LR = 0.02 / 16
_RETINANET_LR = 0.01 / 16
_FCOS_LR = 0.01 / 16
_SSDLITE_LR = 0.15 / (8 * 24)
# AdamW has no torchvision detection recipe. 1.4e-3 at Drip's default batch of 4 is the rate
# Ultralytics' auto optimizer fits for a few classes (0.002 * 5 / (4 + classes)); bench/recipe.py
# measured it against 3e-3 (training collapsed) on the CPU. Scaled by the square root of the
# batch, the usual rule for Adam-type optimizers.
ADAMW_LR_AT_4 = 1.4e-3
# Under AdamW a weight with more inputs than this learns at ADAMW_FAN_IN / fan_in of the rate.
# Adam moves every weight by about the learning rate whatever its gradient, so a layer's output
# moves in proportion to its fan-in: at 1.4e-3 the Faster R-CNN box head's first layer (12,544
# inputs, initialised at about 0.005) changes by a quarter of its size each step, and the FPN's
# and RPN's 3x3 convolutions (2,304 inputs, no norm after them) by about 2%. The 1/fan-in rate is
# muP's rule for Adam (Yang et al., "Tensor Programs V", 2022). Layers up to 1,024 inputs (most
# of the backbones', whose batch norms undo a weight's scale anyway) keep the full rate.
# Measured on the quick start's sample from scratch: eval AP50 0.23 -> 0.38 at 300 steps.
ADAMW_FAN_IN = 1024
_TV_SOURCE = "torchvision model docs (weights' COCO-val2017 box_map, num_params)"


@dataclass(frozen=True)
class NetworkSpec:
    """What Drip knows about one torchvision detector."""

    builder: Callable[..., nn.Module]
    family: str  # "fasterrcnn", "retinanet", "fcos" or "ssd"
    coco: Any  # torchvision weights enum member of the whole detector
    backbone: Any  # torchvision weights enum member of the ImageNet backbone
    lr_per_image: float  # SGD learning rate for one image; lr = lr_per_image * batch_size
    head: str  # dotted path of the class-specific sub-module, replaced for a new class count
    # torchvision swaps the backbone's BatchNorm for FrozenBatchNorm2d when it starts from
    # pretrained weights: batches of a few images would wreck the pretrained statistics.
    freezes_norm: bool
    # Whether the network resizes every image to a fixed square (SSD) rather than keeping the
    # aspect ratio (R-CNN, RetinaNet, FCOS); either way ``image_size`` sets the size.
    fixed_size: bool
    about: str


NETWORKS: dict[str, NetworkSpec] = {
    "fasterrcnn_mobilenet_v3_large_fpn": NetworkSpec(
        tvd.fasterrcnn_mobilenet_v3_large_fpn, "fasterrcnn",
        tvd.FasterRCNN_MobileNet_V3_Large_FPN_Weights.DEFAULT, MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        _FASTER_RCNN_LR, "roi_heads.box_predictor", True, False,
        "Faster R-CNN, MobileNetV3-Large FPN: fast on a CPU, good on a GPU (COCO box AP 32.8)",
    ),
    "fasterrcnn_mobilenet_v3_large_320_fpn": NetworkSpec(
        tvd.fasterrcnn_mobilenet_v3_large_320_fpn, "fasterrcnn",
        tvd.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.DEFAULT, MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        _FASTER_RCNN_LR, "roi_heads.box_predictor", True, False,
        "Faster R-CNN, MobileNetV3-Large FPN tuned for 320 px: the fastest (COCO box AP 22.8)",
    ),
    "fasterrcnn_resnet50_fpn": NetworkSpec(
        tvd.fasterrcnn_resnet50_fpn, "fasterrcnn",
        tvd.FasterRCNN_ResNet50_FPN_Weights.DEFAULT, ResNet50_Weights.IMAGENET1K_V1,
        _FASTER_RCNN_LR, "roi_heads.box_predictor", True, False,
        "Faster R-CNN, ResNet-50 FPN: the classic baseline (COCO box AP 37.0)",
    ),
    "fasterrcnn_resnet50_fpn_v2": NetworkSpec(
        tvd.fasterrcnn_resnet50_fpn_v2, "fasterrcnn",
        tvd.FasterRCNN_ResNet50_FPN_V2_Weights.DEFAULT, ResNet50_Weights.IMAGENET1K_V1,
        _FASTER_RCNN_LR, "roi_heads.box_predictor", False, False,
        "Faster R-CNN v2, ResNet-50 FPN: the most accurate, wants a GPU (COCO box AP 46.7)",
    ),
    "retinanet_resnet50_fpn_v2": NetworkSpec(
        tvd.retinanet_resnet50_fpn_v2, "retinanet",
        tvd.RetinaNet_ResNet50_FPN_V2_Weights.DEFAULT, ResNet50_Weights.IMAGENET1K_V1,
        _RETINANET_LR, "head.classification_head", False, False,
        "RetinaNet v2, ResNet-50 FPN: one-stage (COCO box AP 41.5)",
    ),
    "fcos_resnet50_fpn": NetworkSpec(
        tvd.fcos_resnet50_fpn, "fcos",
        tvd.FCOS_ResNet50_FPN_Weights.DEFAULT, ResNet50_Weights.IMAGENET1K_V1,
        _FCOS_LR, "head.classification_head", True, False,
        "FCOS, ResNet-50 FPN: one-stage, anchor-free (COCO box AP 39.2)",
    ),
    "ssdlite320_mobilenet_v3_large": NetworkSpec(
        tvd.ssdlite320_mobilenet_v3_large, "ssd",
        tvd.SSDLite320_MobileNet_V3_Large_Weights.DEFAULT, MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        _SSDLITE_LR, "head.classification_head", False, True,
        "SSDlite, MobileNetV3-Large: square input, made for 320 px and phones (COCO box AP 21.3)",
    ),
}


class Torchvision(Family):
    """torchvision's detectors. Also the fallback for a model of no known family: any module with
    torchvision's calling convention (tests use small stand-ins) runs through here."""

    name = "torchvision"
    networks = NETWORKS
    start_points = ("coco", "imagenet", "none")

    def param_groups(self, model: nn.Module, optimizer: str) -> list[dict[str, Any]]:
        if optimizer != "adamw":
            return super().param_groups(model, optimizer)
        return decay_groups(model, lambda name, param: adamw_lr_scale(param))

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, tvd.generalized_rcnn.GeneralizedRCNN) or isinstance(
            model, (tvd.RetinaNet, tvd.FCOS, tvd.SSD)
        )

    def about(self, network: str) -> str:
        return NETWORKS[network].about

    def published(self, network: str) -> Published | None:
        meta = NETWORKS[network].coco.meta
        ap = meta.get("_metrics", {}).get("COCO-val2017", {}).get("box_map")
        return Published(ap, "-", round(meta["num_params"] / 1e6, 1), "BSD-3-Clause", _TV_SOURCE)

    # -- building ------------------------------------------------------------------------------
    def skeleton(self, network: str, num_classes: int, classes=None) -> nn.Module:
        return NETWORKS[network].builder(weights=None, weights_backbone=None, num_classes=num_classes)

    def build(self, network: str, num_classes: int, weights: str, cache_dir, classes=None) -> nn.Module:
        if weights == "none":
            return self.skeleton(network, num_classes)
        spec = NETWORKS[network]
        if weights == "imagenet" and spec.family == "ssd":
            # With an ImageNet backbone torchvision builds SSDlite's full MobileNet tail, without it
            # the reduced one; Drip could not rebuild that model offline for inference.
            raise ModelError(
                f"--weights imagenet is not offered for {network}; use --weights coco (recommended) or none"
            )
        if weights == "coco":
            kwargs = {"weights": spec.coco, "weights_backbone": None}
            what = "COCO"
        else:
            kwargs = {"weights": None, "weights_backbone": spec.backbone, "num_classes": num_classes}
            what = "ImageNet"
        try:
            with _hub_dir(cache_dir):
                model = spec.builder(**kwargs)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch a RuntimeError
            raise download_error(what, network, cache_dir, exc) from None
        if weights == "coco":
            self.replace_head(model, network, num_classes)
        return model

    def replace_head(self, model: nn.Module, network: str, num_classes: int, classes=None) -> None:
        """The head comes from the same builder, so it has torchvision's own layout and
        initialisation (e.g. RetinaNet's prior-probability bias) for every family."""
        spec = NETWORKS[network]
        fresh = self.skeleton(network, num_classes)
        parent_path, _, attr = spec.head.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, fresh.get_submodule(spec.head))

    def from_weights_file(self, network: str, num_classes: int, path, cache_dir, source: str, classes=None) -> nn.Module:
        from .files import read_state_file

        state = read_state_file(path, cache_dir)
        model = self.skeleton(network, num_classes)
        if NETWORKS[network].freezes_norm:
            # A state_dict file is pretrained weights: keep its BatchNorm statistics as torchvision
            # does for its own pretrained starting points.
            freeze_norms(model.backbone.body)
        load_matching(model, state, source, network)
        return model

    def structure_of(self, model: nn.Module) -> dict[str, Any]:
        return {
            "frozen_norms": {name: float(m.eps) for name, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)},
            "frozen_params": [name for name, p in model.named_parameters() if not p.requires_grad],
        }

    def apply_structure(self, model: nn.Module, structure: dict[str, Any], source: str) -> None:
        for name, eps in structure.get("frozen_norms", {}).items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ModelError(
                    f"{source}: layer {name!r} does not exist in this torchvision's network; use the "
                    f"torchvision version the model was trained with"
                ) from None
            if isinstance(module, nn.BatchNorm2d):
                parent_path, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_path), attr, _frozen(module, eps))
        super().apply_structure(model, structure, source)

    # -- running -------------------------------------------------------------------------------
    def set_input_size(self, model: nn.Module, image_size: int) -> None:
        """torchvision resizes every input again to ``min_size``/``max_size``; set to the size the
        data is already resized to, that step keeps the image as it is. SSD's fixed square follows
        too: its default boxes are relative to the image, so another size works without retraining
        anchors. A model without torchvision's transform (a stand-in) is left alone."""
        transform = getattr(model, "transform", None)
        if not isinstance(transform, nn.Module):
            return
        transform.min_size = (int(image_size),)
        transform.max_size = int(image_size)
        if getattr(transform, "fixed_size", None) is not None:
            transform.fixed_size = (int(image_size), int(image_size))

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module, image_size: int | None, score_floor: float) -> Iterator[nn.Module]:
        """The floor is where torchvision keeps it: ``roi_heads.score_thresh`` (Faster R-CNN) or
        ``score_thresh`` (RetinaNet, FCOS, SSD). The RPN's own ``score_thresh`` is left alone."""
        holders = [m for m in (model, getattr(model, "roi_heads", None)) if m is not None and hasattr(m, "score_thresh")]
        saved_floors = [(m, m.score_thresh) for m in holders]
        transform = getattr(model, "transform", None)
        saved_sizes = None
        if transform is not None:
            saved_sizes = (transform.min_size, transform.max_size, getattr(transform, "fixed_size", None))
        was_training = model.training
        try:
            for m in holders:
                m.score_thresh = min(float(m.score_thresh), score_floor)
            model.eval()
            if image_size:
                self.set_input_size(model, int(image_size))
            yield model
        finally:
            for m, value in saved_floors:
                m.score_thresh = value
            if saved_sizes is not None:
                transform.min_size, transform.max_size = saved_sizes[0], saved_sizes[1]
                if saved_sizes[2] is not None:
                    transform.fixed_size = saved_sizes[2]
            model.train(was_training)

    # -- training recipe -----------------------------------------------------------------------
    def set_box_sampling(self, model: nn.Module, boxes_per_image: int) -> bool:
        sampler = getattr(getattr(model, "roi_heads", None), "fg_bg_sampler", None)
        if sampler is None:
            return False
        sampler.batch_size_per_image = int(boxes_per_image)
        return True

    def default_learning_rate(self, network: str, batch_size: int, optimizer: str) -> float:
        if optimizer == "adamw":
            return ADAMW_LR_AT_4 * math.sqrt(batch_size / 4)
        return NETWORKS[network].lr_per_image * batch_size

    # -- export --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def onnx_export(self, model: nn.Module) -> Iterator[nn.Module]:
        with _traceable_box_resize():
            yield model


def adamw_lr_scale(param: torch.Tensor) -> float:
    """The learning-rate factor of a weight under AdamW: ``ADAMW_FAN_IN / fan_in``, at most 1."""
    fan_in = param[0].numel() if param.dim() > 1 else 0
    return min(1.0, ADAMW_FAN_IN / fan_in) if fan_in else 1.0


def download_error(what: str, network: str, cache_dir, exc: BaseException, hub: str = "hub") -> DownloadError:
    """The one message for starting weights that could not be fetched (offline, a bad hash...)."""
    where = f" into {Path(cache_dir) / hub}" if cache_dir is not None else ""
    what_failed = f"could not download {what} weights for {network}{where} ({first_line(exc)})"
    return DownloadError(
        f"{what_failed}; check the network, or pass --weights none to train from scratch (or "
        "--weights_fallback none, to do so only when the download fails), or --weights PATH to a state_dict file",
        what_failed,
    )


@contextlib.contextmanager
def _hub_dir(cache_dir) -> Iterator[None]:
    """Point torchvision's downloads at ``cache_dir/hub`` (as TORCH_HOME=cache_dir would), then back."""
    if cache_dir is None:
        yield
        return
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(Path(cache_dir) / "hub"))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


def freeze_norms(module: nn.Module) -> None:
    """Replace every BatchNorm2d under ``module`` by a FrozenBatchNorm2d with the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _frozen(child, child.eps))
        else:
            freeze_norms(child)


def _frozen(bn: nn.BatchNorm2d, eps: float) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(bn.num_features, eps=eps)
    with torch.no_grad():
        if bn.affine:
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
        if bn.running_mean is not None:
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
    return frozen


@contextlib.contextmanager
def _traceable_box_resize():
    """Keep the image sizes in the box rescaling of an ONNX export as values of the graph.

    torchvision's ``resize_boxes`` (used to map boxes from the detector's internal size back
    to its input) passes the sizes through ``torch.tensor``, which the tracer records as
    constants: every image would be rescaled by the example image's ratio. SSD, which stretches
    every image to a square, would misplace the boxes of any other aspect ratio. Same arithmetic,
    kept in the graph.
    """
    from torchvision.models.detection import transform

    original = transform.resize_boxes

    def resize_boxes(boxes: torch.Tensor, original_size, new_size) -> torch.Tensor:
        ratio_height, ratio_width = (
            _as_float(s, boxes) / _as_float(s_orig, boxes) for s, s_orig in zip(new_size, original_size)
        )
        xmin, ymin, xmax, ymax = boxes.unbind(1)
        return torch.stack((xmin * ratio_width, ymin * ratio_height, xmax * ratio_width, ymax * ratio_height), dim=1)

    transform.resize_boxes = resize_boxes
    try:
        yield
    finally:
        transform.resize_boxes = original


def _as_float(value: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):  # a traced size
        return value.to(dtype=torch.float32, device=like.device)
    return torch.tensor(float(value), dtype=torch.float32, device=like.device)
