"""YOLOX (``pixeltable-yolox``, Apache-2.0: a maintained fork of Megvii's YOLOX) behind the contract.

YOLOX is an anchor-free one-stage detector: a CSPDarknet backbone, a PAFPN neck and a decoupled
head at strides 8, 16 and 32, trained with SimOTA label assignment. The head computes its loss in
``forward`` when given targets, so the network fits the contract as it is; ``YoloxDetector`` only
gives it torchvision's calling convention (``drip.detectors.base``):

* each image (longer side ``image_size``, as Drip resizes it) is padded at the bottom and right
  to a square of ``image_size`` rounded up to a multiple of 32, with YOLOX's grey (114), and fed
  as the authors' checkpoints were trained: BGR pixels in 0..255, no normalisation. Padding at
  the bottom and right leaves box coordinates as they are;
* Drip's targets (xyxy pixels, labels from 1) become YOLOX's (class from 0, cx, cy, w, h pixels);
* the head's decoded predictions become detections as the authors' ``postprocess`` makes them:
  score = objectness x best class probability, class-wise NMS at IoU 0.65, the best 100 kept,
  boxes clipped to the image. Plain tensor arithmetic and ``batched_nms``, so it is all part of
  the exported ONNX graph.

``pixeltable-yolox`` asks for ``opencv-python`` (the GUI build), while Drip has the headless one:
it is installed with ``--no-deps`` (``requirements-nodeps.txt``) and what its modules import is in
``requirements.txt``. The package is imported only when a YOLOX network is built, so listing
networks stays fast.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from .. import console
from ..errors import ModelError
from .base import Family, Published, decay_groups, load_matching

DETECTIONS_PER_IMAGE = 100
DEFAULT_SCORE_FLOOR = 0.05  # torchvision's default, so every family filters alike
NMS_IOU = 0.65  # the authors' test-time nmsthre
PAD_VALUE = 114 / 255  # the authors' letterbox grey
MIN_SIDE = 1e-2  # torchvision's remove_small_boxes
STRIDE = 32  # the coarsest level: the input side must be a multiple of it
# The authors' SGD rate: 0.01 for a batch of 64 images, linear in the batch.
LR_PER_IMAGE = 0.01 / 64
# AdamW, which --optimizer auto picks for runs of up to 10,000 steps (Drip's rule, as Ultralytics'):
# the authors' SGD rate is for 300 epochs and learns next to nothing in a few hundred steps. Measured
# on synthetic shapes from scratch, 200 steps of 4 images at 160 px (bench/recipe.py --set ...): AP50
# 0.005 at 1e-3, 0.068 at 3e-3, 0.200 at 6e-3, 0.096 at 1e-2; SGD at the authors' rate 0.001.
ADAMW_LR_AT_4 = 6e-3
# The published checkpoints (the authors' GitHub release, as pixeltable-yolox downloads them).
WEIGHTS_URL = "https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/{name}.pth"
_SOURCE = ("YOLOX README (Megvii-BaseDetection/YOLOX): COCO val2017 AP at 640 px (nano, tiny at 416), "
           "V100 FP16 batch-1 latency")


@dataclass(frozen=True)
class YoloxSpec:
    depth: float
    width: float
    depthwise: bool
    published: Published
    about: str


def _published(ap: float, latency: str, params: float) -> Published:
    return Published(ap, latency, params, "Apache-2.0", _SOURCE)


NETWORKS: dict[str, YoloxSpec] = {
    "yolox_nano": YoloxSpec(0.33, 0.25, True, _published(25.8, "- (1.08 GFLOPs at 416)", 0.91),
                            "YOLOX-Nano: the smallest YOLO-class network, fast on a CPU, learns from scratch (COCO AP 25.8)"),
    "yolox_tiny": YoloxSpec(0.33, 0.375, False, _published(32.8, "- (6.45 GFLOPs at 416)", 5.06),
                            "YOLOX-Tiny (COCO AP 32.8)"),
    "yolox_s": YoloxSpec(0.33, 0.50, False, _published(40.5, "9.8 ms (V100, FP16)", 9.0), "YOLOX-S (COCO AP 40.5)"),
    "yolox_m": YoloxSpec(0.67, 0.75, False, _published(46.9, "12.3 ms (V100, FP16)", 25.3), "YOLOX-M (COCO AP 46.9)"),
    "yolox_l": YoloxSpec(1.0, 1.0, False, _published(49.7, "14.5 ms (V100, FP16)", 54.2), "YOLOX-L (COCO AP 49.7)"),
    "yolox_x": YoloxSpec(1.33, 1.25, False, _published(51.1, "17.3 ms (V100, FP16)", 99.1), "YOLOX-X (COCO AP 51.1)"),
}

# The family's recipe, from the authors' configs (yolox/config.py): weight decay 5e-4 off norms and
# biases, warmup then cosine decay, an EMA of the weights. Their mosaic (with --plain_fraction 0.15)
# is not the default: measured from scratch at 2-3 minutes on a CPU (BENCHMARKS.md#yolox), the plain
# flip learned more on each dataset tried (AP50 0.949 against 0.781 on 60 images, 0.974 against
# 0.958 on 240 crowded ones, 0.918 against 0.776 in 400 steps at 160 px): a mosaic step costs more,
# and it pays back over the authors' 300 epochs. Values a user set differently stay
# (drip.stages.configure).
RECIPE = {
    "weight_decay": 5e-4,
    "ema_decay": 0.9998,
}


def _modules():
    # The package's loss turns autocast off with the deprecated torch.cuda.amp spelling.
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast", category=FutureWarning)
    try:
        from yolox.models import YoloPafpn, YoloxHead, YoloxModule
    except ImportError as exc:
        raise ModelError(
            f"the YOLOX networks need the pixeltable-yolox package ({exc}); "
            "pip install --no-deps -r requirements-nodeps.txt and pip install -r requirements.txt"
        ) from None
    return YoloPafpn, YoloxHead, YoloxModule


def _coco_classes() -> list[str]:
    from yolox.data.datasets.coco_classes import COCO_CLASSES

    return list(COCO_CLASSES)


class YoloxDetector(nn.Module):
    """A YOLOX network with torchvision's calling convention."""

    def __init__(self, net: nn.Module, network: str, image_size: int = 640):
        super().__init__()
        self.net = net
        self.network = network
        self.image_size = int(image_size)
        self.score_thresh = DEFAULT_SCORE_FLOOR
        self.nms_thresh = NMS_IOU
        self.detections_per_img = DETECTIONS_PER_IMAGE

    def canvas(self, images: list[torch.Tensor]) -> int:
        """The square side the batch is padded to: ``image_size`` (or the largest image) rounded up
        to a multiple of 32."""
        largest = max([self.image_size] + [max(int(im.shape[-2]), int(im.shape[-1])) for im in images])
        return int(math.ceil(largest / STRIDE) * STRIDE)

    def _pixels(self, images: list[torch.Tensor]) -> torch.Tensor:
        side = self.canvas(images)
        padded = []
        for image in images:
            height, width = image.shape[-2:]
            padded.append(F.pad(image, (0, side - width, 0, side - height), value=PAD_VALUE))
        # RGB 0..1 -> BGR 0..255: what the authors' checkpoints were trained on.
        return torch.stack(padded).flip(1) * 255.0

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        pixels = self._pixels(images)
        if self.training:
            if targets is None:
                raise ValueError("YoloxDetector in train mode needs targets")
            features = self.net.backbone(pixels)
            _, loss_iou, loss_obj, loss_cls, loss_l1, _ = self.net.head(features, _to_yolox_targets(targets, pixels), pixels)
            zero = loss_iou.new_zeros(())
            return {"loss_iou": loss_iou, "loss_obj": loss_obj, "loss_cls": loss_cls,
                    "loss_l1": loss_l1 if torch.is_tensor(loss_l1) else zero}
        decoded = self.net.head(self.net.backbone(pixels))
        return [self._detections(decoded[i], image) for i, image in enumerate(images)]

    def _detections(self, prediction: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """One image's decoded rows (cx, cy, w, h, objectness, class probabilities) -> detections."""
        prediction = prediction.float()
        cx, cy, w, h = prediction[:, :4].unbind(-1)
        height_width = torch._shape_as_tensor(image)[-2:].to(torch.float32)
        height, width = height_width[0], height_width[1]
        zero = torch.zeros_like(cx)
        x0, x1 = (torch.minimum(torch.maximum(v, zero), width) for v in (cx - w / 2, cx + w / 2))
        y0, y1 = (torch.minimum(torch.maximum(v, zero), height) for v in (cy - h / 2, cy + h / 2))
        boxes = torch.stack((x0, y0, x1, y1), -1)  # clipped to the image on all four sides
        class_score, class_index = prediction[:, 5:].max(-1)
        scores = prediction[:, 4] * class_score
        # As torchvision's detectors: no box under a hundredth of a pixel (clipping makes them).
        keep = (scores >= self.score_thresh) & (x1 - x0 >= MIN_SIDE) & (y1 - y0 >= MIN_SIDE)
        boxes, scores, labels = boxes[keep], scores[keep], class_index[keep]
        kept = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[kept], "labels": labels[kept] + 1, "scores": scores[kept]}


def _to_yolox_targets(targets: list[dict[str, torch.Tensor]], pixels: torch.Tensor) -> torch.Tensor:
    """Drip's targets -> YOLOX's padded ``[batch, max boxes, 5]`` rows of (class from 0, cx, cy, w, h)
    in pixels; the zero rows after an image's boxes are padding (an image without boxes has only
    those)."""
    most = max([1] + [len(t["boxes"]) for t in targets])
    rows = pixels.new_zeros((len(targets), most, 5))
    for i, target in enumerate(targets):
        boxes = target["boxes"].to(pixels.dtype)
        if not len(boxes):
            continue
        rows[i, : len(boxes), 0] = target["labels"].to(pixels.dtype) - 1
        rows[i, : len(boxes), 1] = (boxes[:, 0] + boxes[:, 2]) / 2
        rows[i, : len(boxes), 2] = (boxes[:, 1] + boxes[:, 3]) / 2
        rows[i, : len(boxes), 3] = boxes[:, 2] - boxes[:, 0]
        rows[i, : len(boxes), 4] = boxes[:, 3] - boxes[:, 1]
    return rows


def _init(net: nn.Module) -> nn.Module:
    """The authors' initialisation (YoloxConfig.get_model): BatchNorm eps 1e-3 and momentum 0.03,
    class and objectness biases at a prior probability of 0.01."""
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps, module.momentum = 1e-3, 0.03
    net.head.initialize_biases(1e-2)
    return net


class Yolox(Family):
    name = "yolox"
    networks = NETWORKS
    start_points = ("coco", "none")
    # The backbone, the neck and the head's layers; the head's box decoding (its own top-level
    # ops) and the wrapper's post-processing stay float.
    int8_body = ("/backbone/", "/head/stems", "/head/cls_convs", "/head/reg_convs", "/head/cls_preds",
                 "/head/reg_preds", "/head/obj_preds")

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, YoloxDetector)

    def about(self, network: str) -> str:
        return NETWORKS[network].about

    def published(self, network: str) -> Published | None:
        return NETWORKS[network].published

    # -- building ------------------------------------------------------------------------------
    def skeleton(self, network: str, num_classes: int, classes=None) -> nn.Module:
        pafpn, head, module = _modules()
        spec = NETWORKS[network]
        channels = [256, 512, 1024]
        net = module(
            pafpn(spec.depth, spec.width, in_channels=channels, depthwise=spec.depthwise, act="silu"),
            head(num_classes - 1, spec.width, in_channels=channels, depthwise=spec.depthwise, act="silu"),
        )
        return YoloxDetector(_init(net), network)

    def build(self, network: str, num_classes: int, weights: str, cache_dir, classes=None) -> nn.Module:
        model = self.skeleton(network, num_classes)
        if weights == "none":
            return model
        where = Path(cache_dir) / "hub" / "checkpoints" if cache_dir is not None else None
        try:
            state = torch.hub.load_state_dict_from_url(
                WEIGHTS_URL.format(name=network), model_dir=str(where) if where else None, map_location="cpu",
                weights_only=True, progress=False,
            )
        except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
            from .tv import download_error

            raise download_error("COCO", network, cache_dir, exc) from None
        from .files import state_dict_in

        self._load(model, state_dict_in(state) or state, f"COCO weights of {network}", network, classes)
        return model

    def _load(self, model: nn.Module, state: dict[str, torch.Tensor], source: str, network: str, classes) -> None:
        """Load ``state`` (YOLOX's own names, or Drip's with ``net.``); the class head only when the
        classes are COCO's, names and order (a head kept by position would mean other objects)."""
        if not any(k.startswith("net.") for k in state):
            state = {f"net.{k}": v for k, v in state.items()}
        coco = classes is not None and [str(c) for c in classes] == _coco_classes()
        head = [k for k in state if ".cls_preds." in k]
        if head and not coco:
            own = model.state_dict()
            state = {**state, **{k: own[k] for k in head if k in own}}  # the fresh head "loads" itself
            console.info(f"{source}: the class head starts fresh (the session's classes are not COCO's 80, "
                          "in COCO's order); the rest of the network is loaded")
        load_matching(model, state, source, network)

    def replace_head(self, model: nn.Module, network: str, num_classes: int, classes=None) -> None:
        fresh = self.skeleton(network, num_classes)
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".cls_preds." not in k}, strict=False)
        model.net = fresh.net

    def from_weights_file(self, network: str, num_classes: int, path, cache_dir, source: str, classes=None) -> nn.Module:
        from .files import read_state_file

        model = self.skeleton(network, num_classes)
        self._load(model, read_state_file(path, cache_dir), source, network, classes)
        return model

    # -- running -------------------------------------------------------------------------------
    def set_input_size(self, model: nn.Module, image_size: int) -> None:
        model.image_size = int(image_size)

    # -- training recipe -----------------------------------------------------------------------
    def default_learning_rate(self, network: str, batch_size: int, optimizer: str) -> float:
        if optimizer == "adamw":
            return ADAMW_LR_AT_4 * math.sqrt(batch_size / 4)
        return LR_PER_IMAGE * batch_size

    def recipe(self, network: str) -> dict[str, Any]:
        return dict(RECIPE)

    def param_groups(self, model: nn.Module, optimizer: str) -> list[dict[str, Any]]:
        groups = decay_groups(model, lambda name, param: 1.0)
        for group in groups:
            group["nesterov"] = optimizer == "sgd"  # the authors' SGD; AdamW ignores the key
        return groups


YOLOX = Yolox()
