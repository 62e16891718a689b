"""The YOLO family's online augmentation: mosaic, random affine, HSV jitter and the flip.

As YOLOX's ``MosaicDetection`` and ``random_affine`` (yolox/data/datasets/mosaicdetection.py,
yolox/data/data_augment.py) do it, in PyTorch on 0..1 CHW tensors:

1. four samples are tiled around a random centre of a canvas twice the output size, filled with
   the authors' grey;
2. a random affine map (scale, rotation, shear, shift) takes the canvas's top-left corner region
   to the ``size`` x ``size`` output: at scale 1 the output shows a quarter of the canvas, at 0.5
   the whole of it;
3. boxes are moved with their corners, clipped, and dropped where too little of them is left
   (YOLOX's ``box_candidates``: under 2 px a side, under a tenth of their scaled area, or thinner
   than 1:20);
4. hue, saturation and brightness change, and half the samples are flipped.

Every draw comes from the generator passed in (seeded per sample by the caller), so a sample's
augmentation is a function of the seed and resumes exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

PAD = 114 / 255  # YOLOX's letterbox grey
SCALE = (0.5, 1.5)  # the authors' mosaic_scale of the nano and tiny networks ((0.1, 2) for S and up)
DEGREES = 10.0
TRANSLATE = 0.1
SHEAR = 2.0
HUE = 0.03  # of the colour circle: YOLOX's hgain 5 of OpenCV's 180
SATURATION = 0.5
BRIGHTNESS = 0.3
MIN_SIDE = 2.0
MIN_AREA = 0.1
MAX_ASPECT = 20.0

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # image (3xHxW, 0..1), boxes (xyxy), labels


def augment(first: Sample, load: Callable[[int], Sample], count: int, size: int, generator: torch.Generator) -> Sample:
    """``first`` and three samples drawn by index from ``load`` (``count`` of them) as one
    ``size`` x ``size`` mosaic, then the affine map, the colour change and the flip."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    others = [int(i) for i in torch.randint(count, (3,), generator=generator)]
    centre = (uniform(0.5 * size, 1.5 * size), uniform(0.5 * size, 1.5 * size))
    scale, angle = uniform(*SCALE), uniform(-DEGREES, DEGREES)
    shear = (uniform(-SHEAR, SHEAR), uniform(-SHEAR, SHEAR))
    shift = (uniform(-TRANSLATE, TRANSLATE) * size, uniform(-TRANSLATE, TRANSLATE) * size)
    hue = uniform(-HUE, HUE)
    saturation, brightness = uniform(1 - SATURATION, 1 + SATURATION), uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)
    flip = uniform(0, 1) < 0.5

    canvas, boxes, labels = tile([first, *(load(i) for i in others)], size, centre)
    matrix = affine_matrix(scale, angle, shear, shift)
    image, boxes, labels = warp(canvas, boxes, labels, matrix, size, scale)
    image = TF.adjust_hue(image, hue)
    image = TF.adjust_saturation(image, saturation)
    image = TF.adjust_brightness(image, brightness).clamp_(0, 1)
    if flip:
        image = image.flip(-1)
        boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], dim=1)
    return image.contiguous(), boxes, labels


def tile(samples: list[Sample], size: int, centre: tuple[float, float]) -> Sample:
    """Four samples around ``centre`` of a ``2 size`` square canvas: top-left, top-right,
    bottom-left, bottom-right, each cut where it leaves the canvas."""
    side = 2 * size
    xc, yc = int(centre[0]), int(centre[1])
    canvas = torch.full((3, side, side), PAD)
    all_boxes, all_labels = [], []
    for i, (image, boxes, labels) in enumerate(samples):
        h, w = image.shape[-2:]
        if i == 0:
            x0, y0, x1, y1 = max(xc - w, 0), max(yc - h, 0), xc, yc
            u0, v0 = w - (x1 - x0), h - (y1 - y0)
        elif i == 1:
            x0, y0, x1, y1 = xc, max(yc - h, 0), min(xc + w, side), yc
            u0, v0 = 0, h - (y1 - y0)
        elif i == 2:
            x0, y0, x1, y1 = max(xc - w, 0), yc, xc, min(side, yc + h)
            u0, v0 = w - (x1 - x0), 0
        else:
            x0, y0, x1, y1 = xc, yc, min(xc + w, side), min(side, yc + h)
            u0, v0 = 0, 0
        canvas[:, y0:y1, x0:x1] = image[:, v0:v0 + (y1 - y0), u0:u0 + (x1 - x0)]
        dx, dy = x0 - u0, y0 - v0
        moved = boxes + torch.tensor([dx, dy, dx, dy], dtype=boxes.dtype)
        # Only what lies inside the pasted part of this sample: the rest of it is not on the canvas.
        moved[:, 0::2] = moved[:, 0::2].clamp(x0, x1)
        moved[:, 1::2] = moved[:, 1::2].clamp(y0, y1)
        all_boxes.append(moved)
        all_labels.append(labels)
    return canvas, torch.cat(all_boxes).reshape(-1, 4), torch.cat(all_labels)


def affine_matrix(scale: float, angle: float, shear: tuple[float, float], shift: tuple[float, float]) -> torch.Tensor:
    """YOLOX's ``get_affine_matrix``: rotation and scale about the origin, shear, then the shift."""
    a = math.radians(angle)
    cos, sin = math.cos(a) * scale, math.sin(a) * scale
    rotation = torch.tensor([[cos, sin], [-sin, cos]], dtype=torch.float64)
    sx, sy = math.tan(math.radians(shear[0])), math.tan(math.radians(shear[1]))
    linear = torch.stack([rotation[0] + sy * rotation[1], rotation[1] + sx * rotation[0]])
    return torch.cat([linear, torch.tensor([[shift[0]], [shift[1]]], dtype=torch.float64)], dim=1)


def warp(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, matrix: torch.Tensor, size: int, scale: float) -> Sample:
    """``image`` mapped by ``matrix`` (input pixels -> output pixels) onto a ``size`` square, and its boxes."""
    inverse = torch.linalg.inv(torch.cat([matrix, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)]))[:2]
    height, width = image.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64) + 0.5, torch.arange(size, dtype=torch.float64) + 0.5,
                            indexing="ij")
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    grid = torch.stack([src_x / width * 2 - 1, src_y / height * 2 - 1], dim=-1).float()[None]
    warped = F.grid_sample((image - PAD)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] + PAD
    if not len(boxes):
        return warped, boxes, labels
    corners = boxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2).double()
    moved = corners @ matrix[:, :2].T + matrix[:, 2]
    new = torch.cat([moved.min(1).values, moved.max(1).values], dim=1)
    new[:, 0::2] = new[:, 0::2].clamp(0, size)
    new[:, 1::2] = new[:, 1::2].clamp(0, size)
    w, h = new[:, 2] - new[:, 0], new[:, 3] - new[:, 1]
    old_area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).double() * scale * scale
    aspect = torch.maximum(w / (h + 1e-16), h / (w + 1e-16))
    keep = (w > MIN_SIDE) & (h > MIN_SIDE) & (w * h / (old_area + 1e-16) > MIN_AREA) & (aspect < MAX_ASPECT)
    return warped, new[keep].float(), labels[keep]
