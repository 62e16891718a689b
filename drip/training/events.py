"""What training reports: TensorBoard events, ``metrics.jsonl`` and the pictures drawn for them.

TensorBoard: ``loss/*``, ``lr`` and ``throughput/images_per_sec`` every ``log_every`` steps;
``metrics/*`` (AP, AP50, ...), ``metrics_per_class/AP/<class>`` and ``.../AP50/<class>``, one
precision-recall curve per class (``pr_curves/<class>``, COCO's, at IoU 0.5) and
``eval_predictions/<n>`` (the first eval images, predicted boxes beside the ground truth) at each
evaluation; ``train/augmented_samples`` once at the start: training samples as the model sees
them, after the online augmentation, with their boxes. ``metrics.jsonl`` gets one row per
evaluation.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import nn

from ..evaluation.metrics import predict

SHOWN_EVAL_IMAGES = 4  # eval images drawn to TensorBoard at each evaluation
_SHOWN_TRAIN_SAMPLES = 8  # augmented training samples in the grid drawn at the start
_SHOWN_SCORE = 0.5  # predictions drawn from this score up
_SHOWN_SIZE = 320  # longer side of a drawn image: thumbnails are enlarged, photos shrunk


def summary_writer(logs_dir: Path, start_step: int):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step hides the events a stopped run logged after its last checkpoint: the resumed run
    # writes those steps again.
    return SummaryWriter(str(logs_dir), purge_step=start_step + 1 if start_step > 0 else None)


def show(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# -- metrics.jsonl ----------------------------------------------------------------------------
def append_metrics_row(path: Path, step: int, metrics) -> None:
    row = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **metrics.to_json()}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep the ``metrics.jsonl`` rows up to ``step``: the steps after it are trained again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


# -- TensorBoard: metrics, curves and pictures --------------------------------------------------
def log_metrics(writer, metrics, step: int) -> None:
    for name, value in metrics.stats().items():
        if value is not None:
            writer.add_scalar(f"metrics/{name}", value, step)
    for kind, values in (("AP", metrics.per_class_ap), ("AP50", metrics.per_class_ap50)):
        for name, value in values.items():
            if value is not None:
                writer.add_scalar(f"metrics_per_class/{kind}/{name}", value, step)
    for name, curve in metrics.pr_curves.items():
        if curve is not None:
            _add_pr_curve(writer, f"pr_curves/{name}", curve, metrics.recall_thresholds,
                          metrics.per_class_objects.get(name, 0), step)


def _add_pr_curve(writer, tag: str, precision: list[float], recall: list[float], objects: int, step: int) -> None:
    """COCO's precision at its 101 recall points (IoU 0.5) as a TensorBoard PR curve.

    TensorBoard's curves are indexed by a rising score threshold (recall falling); COCO's by
    recall, so the points go in reversed. The counts, shown only in TensorBoard's tooltips, are
    reconstructed from precision, recall and the number of objects.
    """
    p = np.asarray(precision[::-1], dtype=np.float64)
    r = np.asarray(recall[::-1], dtype=np.float64)
    tp = np.where(p > 0, r * objects, 0.0)
    fp = np.where(p > 0, tp * (1 - p) / np.maximum(p, 1e-12), 0.0)
    fn = objects - tp
    tn = np.zeros_like(tp)
    writer.add_pr_curve_raw(tag, tp, fp, tn, fn, p, r, step, num_thresholds=len(p))


def log_predictions(writer, model: nn.Module, samples, classes: list[str], step: int, *, image_size: int, device,
                    batch_size: int, slicing=None) -> None:
    """``eval_predictions/<n>``: the model's boxes on ``samples`` beside the ground truth
    (predicted tile by tile with ``slicing``, as the metrics beside them)."""
    if not samples:
        return
    found = predict(model, [(i, image) for i, (image, _, _) in enumerate(samples)],
                    image_size=image_size, device=device, batch_size=batch_size, slicing=slicing)
    for i, ((image, boxes, labels), det) in enumerate(zip(samples, found)):
        keep = det.scores >= _SHOWN_SCORE
        predicted = _drawn(image, det.boxes[keep].tolist(), det.labels[keep].tolist(), classes,
                           det.scores[keep].tolist())
        truth = _drawn(image, boxes, labels, classes)
        panel = _side_by_side([(f"predicted (score >= {_SHOWN_SCORE})", predicted), ("ground truth", truth)])
        writer.add_image(f"eval_predictions/{i}", _hwc(panel), step, dataformats="HWC")


def log_training_samples(writer, dataset, sampler, classes: list[str], start_step: int) -> None:
    """A grid of training samples as the model gets them (online augmentation included)."""
    keys: list = []
    step = start_step
    while len(keys) < _SHOWN_TRAIN_SAMPLES and step < sampler.num_steps:
        keys += sampler.batch(step)
        step += 1
    tiles = []
    for key in keys[:_SHOWN_TRAIN_SAMPLES]:
        image, target = dataset[key]
        pil = Image.fromarray((image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())
        tiles.append(_drawn(pil, target["boxes"].tolist(), target["labels"].tolist(), classes))
    if tiles:
        writer.add_image("train/augmented_samples", _hwc(_grid(tiles, columns=4)), start_step, dataformats="HWC")


def read_eval_samples(shards: list[Path], count: int) -> list[tuple[Any, list[list[float]], list[int]]]:
    """The first ``count`` eval images (PIL), their boxes in its pixels and labels."""
    from ..data.tfrecord import decode_example, iter_records

    samples = []
    for path in shards:
        for payload in iter_records(path):
            if len(samples) >= count:
                return samples
            example = decode_example(payload)
            try:
                with Image.open(io.BytesIO(example.encoded)) as img:
                    image = img.convert("RGB")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                continue  # evaluate_records names the record; a picture can do without it
            w, h = image.size
            boxes = [[b[0] * w, b[1] * h, b[2] * w, b[3] * h] for b in example.boxes]
            samples.append((image, boxes, list(example.labels)))
    return samples


def _drawn(image, boxes, labels, classes, scores=None):
    """``image`` scaled to ``_SHOWN_SIZE`` with its boxes drawn as ``drip infer`` draws them."""
    from ..evaluation.results import draw_detections

    scale = _SHOWN_SIZE / max(image.size)
    shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    detections = []
    for i, (box, label) in enumerate(zip(boxes, labels)):
        label = int(label)
        detections.append({
            "class_id": label,
            "label": classes[label - 1] if 1 <= label <= len(classes) else f"class_{label}",
            "score": None if scores is None else float(scores[i]),
            "box": [float(v) * scale for v in box],
        })
    return draw_detections(shown, detections)


def _side_by_side(panels) -> Any:
    """Images side by side, each with its caption above, on a dark background."""
    from PIL import ImageDraw

    caption, gap = 18, 6
    width = sum(image.width for _, image in panels) + gap * (len(panels) + 1)
    height = max(image.height for _, image in panels) + caption + gap
    out = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(out)
    x = gap
    for title, image in panels:
        draw.text((x, 3), title, fill=(235, 235, 235))
        out.paste(image, (x, caption))
        x += image.width + gap
    return out


def _grid(tiles, columns: int) -> Any:
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    gap = 4
    out = Image.new("RGB", (columns * (cell_w + gap) + gap, rows * (cell_h + gap) + gap), (32, 32, 32))
    for i, tile in enumerate(tiles):
        out.paste(tile, (gap + (i % columns) * (cell_w + gap), gap + (i // columns) * (cell_h + gap)))
    return out


def _hwc(image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)
