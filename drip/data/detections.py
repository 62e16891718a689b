"""Detections between a model and the files: the input resized for the model, its boxes scaled
back to the image, and the JSON records ``drip infer`` writes for them.

NumPy and Pillow only, no PyTorch: the detector contract (``drip.detectors``) and ONNX inference
(``drip.deploy.onnx_infer``) both call these, so the two runtimes resize and post-process alike.
Writing the result files and drawing them is ``drip.evaluation.results``'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


# -- the input --------------------------------------------------------------------------------
def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the longer side ``size`` and the aspect ratio kept."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_for_model(image: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``image`` with its longer side ``size`` as an HxWx3 uint8 array, and that (width, height).

    The only resizing before the model, whichever runtime runs it: the detector's own transform
    (normalisation, and a resize that keeps this size) is part of the model and of its export.
    """
    shape = resized_size(image.width, image.height, size)
    small = image if shape == image.size else image.resize(shape, Image.BILINEAR)
    return np.asarray(small, dtype=np.uint8), shape


# -- detections -------------------------------------------------------------------------------
def scale_boxes_np(boxes: np.ndarray, size: tuple[int, int], resized: tuple[int, int]) -> np.ndarray:
    """Boxes in ``resized`` pixels -> float64 boxes in pixels of the ``size`` image, clipped to it.

    Per-axis factors: rounding the resized size makes them differ slightly.
    """
    boxes = np.asarray(boxes).reshape(-1, 4).astype(np.float64)
    width, height = size
    scale = np.array([width / resized[0], height / resized[1]] * 2, dtype=np.float64)
    boxes = boxes * scale
    boxes[:, 0::2] = boxes[:, 0::2].clip(0.0, float(width))
    boxes[:, 1::2] = boxes[:, 1::2].clip(0.0, float(height))
    return boxes


def to_detections_np(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    size: tuple[int, int],
    resized: tuple[int, int],
    threshold: float,
    names: Sequence[str],
) -> list[dict[str, Any]]:
    """Detections in ``resized`` pixels -> JSON records in pixels of the ``size`` image.

    Keeps scores >= ``threshold`` percent, best first; boxes are clipped to the image and
    dropped if nothing of them is left inside it. PyTorch inference calls this too
    (``drip.detectors.to_detections``), so both runtimes post-process alike.
    """
    boxes = scale_boxes_np(boxes, size, resized)
    scores = np.asarray(scores).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float32)
    # Compare in the scores' own precision: float32 0.7 is below the float64 0.7, and a
    # detection scored exactly at the threshold must be kept.
    keep = scores >= scores.dtype.type(threshold / 100.0)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = np.argsort(-scores, kind="stable")  # best first, ties in the model's order
    return detection_records(boxes[order].tolist(), scores[order].tolist(), labels[order].tolist(), size, names)


def detection_records(boxes, scores, labels, size: tuple[int, int], names: Sequence[str]) -> list[dict[str, Any]]:
    """JSON records of detections already scaled, filtered and ordered; empty boxes are dropped."""
    width, height = size
    out = []
    for (x0, y0, x1, y1), score, label in zip(boxes, scores, labels):
        if x1 <= x0 or y1 <= y0:
            continue
        class_id = int(label)
        name = names[class_id - 1] if 1 <= class_id <= len(names) else f"class_{class_id}"
        out.append(
            {
                "class_id": class_id,
                "label": name,
                "score": round(float(score), 4),
                "box": [round(v, 2) for v in (x0, y0, x1, y1)],
                "box_normalized": [
                    round(x0 / width, 6), round(y0 / height, 6), round(x1 / width, 6), round(y1 / height, 6)
                ],
            }
        )
    return out
