"""Which unlabelled images to label next: uncertain to the model, and unlike each other.

``drip select`` (``drip.runtime.audit.select``) runs a session's model on a folder of
unlabelled images and hands each image's predictions and a thumbnail here.

* **Uncertainty** of an image: the summed binary entropy, in bits, of its predictions' scores
  from ``SCORE_FLOOR`` up. A box at 50% is one bit the model does not know; one at 99% or 1%
  teaches little. An image full of half-sure boxes (a new background, a confusable class) ranks
  above an image with no box at all, which the usual "lowest score first" rule would pick.
* **Diversity**: chosen greedily, each next image the most uncertain after weighting by how far
  it lies from the images already chosen (its thumbnail and its predicted classes), relative to
  the typical distance between images of the folder: ten near-copies of one hard scene teach
  what one of them does.

Plain numpy (and Pillow for the thumbnail), so it is tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

SCORE_FLOOR = 0.05  # boxes below this are the model's noise floor, not its doubts
THUMB = 8  # thumbnail side, pixels: the layout and colours of a scene, not its details


@dataclass
class Candidate:
    image: str  # as written in the output: relative to --images_path
    boxes: list[list[float]]
    labels: list[str]
    scores: list[float]
    size: tuple[int, int]
    feature: np.ndarray  # thumbnail(image)


def thumbnail(image) -> np.ndarray:
    """A PIL image as a small, standardised vector: what makes two scenes look alike."""
    small = np.asarray(image.convert("RGB").resize((THUMB, THUMB)), dtype=np.float64).reshape(-1)
    return (small - small.mean()) / (small.std() + 1e-6)


def entropy_bits(scores: Sequence[float]) -> np.ndarray:
    s = np.clip(np.asarray(scores, dtype=np.float64), 1e-6, 1 - 1e-6)
    return -(s * np.log2(s) + (1 - s) * np.log2(1 - s))


def uncertainty(candidate: Candidate) -> tuple[float, int]:
    """(bits of doubt, boxes counted) of one image."""
    scores = np.asarray(candidate.scores, dtype=np.float64)
    scores = scores[scores >= SCORE_FLOOR]
    return float(entropy_bits(scores).sum()), int(len(scores))


def _features(candidates: Sequence[Candidate]) -> np.ndarray:
    classes = sorted({label for c in candidates for label in c.labels})
    out = []
    for c in candidates:
        hist = np.zeros(len(classes))
        for label, score in zip(c.labels, c.scores):
            if score >= SCORE_FLOOR:
                hist[classes.index(label)] += score
        total = hist.sum()
        # Classes weigh as much as the picture: an image of a class not chosen yet is news.
        hist = hist / total * np.sqrt(len(c.feature)) if total > 0 else hist
        out.append(np.concatenate([np.asarray(c.feature, dtype=np.float64), hist]))
    return np.stack(out) if out else np.zeros((0, 0))


def choose(candidates: Sequence[Candidate], count: int) -> list[dict[str, Any]]:
    """The ``count`` images to label next, best first, each with its reason."""
    if not candidates:
        return []
    doubts = [uncertainty(c) for c in candidates]
    u = np.array([d[0] for d in doubts])
    feats = _features(candidates)
    dist = np.sqrt(np.maximum(((feats[:, None, :] - feats[None, :, :]) ** 2).sum(-1), 0))
    pairs = dist[np.triu_indices(len(candidates), 1)]
    typical = float(np.median(pairs)) if len(pairs) else 1.0
    typical = typical if typical > 0 else 1.0
    chosen: list[int] = []
    out = []
    nearest = np.full(len(candidates), np.inf)
    for _ in range(min(count, len(candidates))):
        novelty = np.minimum(nearest / typical, 1.0)
        value = (u + 1e-9) * novelty  # never an image already chosen: its novelty is 0
        value[chosen] = -1
        i = int(np.argmax(value))
        bits, boxes = doubts[i]
        if chosen:
            why = (f"uncertain: {bits:.2f} bits over {boxes} boxes; as unlike the images chosen before it as "
                   f"{min(nearest[i] / typical, 1.0):.0%} of a typical pair")
        else:
            why = f"the most uncertain: {bits:.2f} bits over {boxes} boxes"
        sure = sum(1 for s in candidates[i].scores if s >= 0.5)
        out.append({"image": candidates[i].image, "rank": len(out) + 1, "uncertainty_bits": round(bits, 3),
                    "boxes_considered": boxes, "boxes_above_50": sure,
                    "novelty": round(float(min(nearest[i] / typical, 1.0)) if chosen else 1.0, 3), "reason": why})
        chosen.append(i)
        nearest = np.minimum(nearest, dist[i])
    return out
