"""Box conventions, and the few conversions between them that every stage shares.

Drip's own form, used between stages and in Drip JSON, is ``xyxy``: ``[xmin, ymin, xmax, ymax]``
in pixels of the image as displayed, continuous coordinates (a box covering pixel columns 0..9
is ``[0, .., 10, ..]``). The others:

- COCO ``xywh``: ``[x, y, width, height]``, the same continuous pixel coordinates.
- Pascal VOC: ``[xmin, ymin, xmax, ymax]`` of 1-based pixel indices, both ends included, so the
  same box is ``[1, .., 10, ..]`` (the VOC devkit subtracts 1 from the minimum when loading).
- normalized: ``xyxy`` divided by the image width and height, as TFRecords and ``box_normalized``
  in the inference results store it.

Plain floats in, plain lists out: no NumPy or torch, so the parsers can use them on any input.
"""

from __future__ import annotations

from collections.abc import Sequence

Box = Sequence[float]


def xywh_to_xyxy(box: Box) -> list[float]:
    """COCO ``[x, y, w, h]`` -> ``[xmin, ymin, xmax, ymax]`` in pixels."""
    x, y, w, h = box
    return [x, y, x + w, y + h]


def xyxy_to_xywh(box: Box) -> list[float]:
    """``[xmin, ymin, xmax, ymax]`` in pixels -> COCO ``[x, y, w, h]``."""
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


def voc_to_xyxy(box: Box) -> list[float]:
    """Pascal VOC's 1-based inclusive ``[xmin, ymin, xmax, ymax]`` -> continuous pixels."""
    xmin, ymin, xmax, ymax = box
    return [xmin - 1.0, ymin - 1.0, xmax, ymax]


def xyxy_to_voc(box: Box) -> list[float]:
    """Continuous pixels -> Pascal VOC's 1-based inclusive ``[xmin, ymin, xmax, ymax]``."""
    x0, y0, x1, y1 = box
    return [x0 + 1.0, y0 + 1.0, x1, y1]


def normalize(box: Box, width: float, height: float) -> list[float]:
    """Pixels -> fractions of the image size (not clipped: see ``clip_normalized``)."""
    x0, y0, x1, y1 = box
    return [x0 / width, y0 / height, x1 / width, y1 / height]


def denormalize(box: Box, width: float, height: float) -> list[float]:
    """Fractions of the image size -> pixels."""
    x0, y0, x1, y1 = box
    return [x0 * width, y0 * height, x1 * width, y1 * height]


def clip_normalized(box: Box) -> list[float]:
    """Each coordinate clipped to 0..1: the part of the box inside the image."""
    return [min(max(float(v), 0.0), 1.0) for v in box]


def has_area(box: Box) -> bool:
    """Whether ``xmax > xmin`` and ``ymax > ymin`` (torchvision's detectors reject other boxes)."""
    x0, y0, x1, y1 = box
    return x1 > x0 and y1 > y0
