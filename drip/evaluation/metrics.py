"""COCO box metrics of a detector: during training, for ``drip evaluate`` and for ``drip infer``.

``coco_metrics`` scores detections against ground truth with pycocotools' own ``COCOeval``
(in memory, its prints silenced), so every number is the one the COCO tooling reports: AP over
IoU .50:.95, AP50, AP75, AP and AR by object size, AR at 1/10/100 detections, AP and AP50 per
class and the precision-recall curve of each class at IoU 0.5. Small, medium and large are
judged on the box area in pixels of the *original* image, as COCO does, not the resized one.
One difference: pycocotools keeps at most 100 detections per image (``maxDets``), and an image
predicted tile by tile holds up to 100 per tile, so AP counts as many per image as the image
with the most has (``Metrics.max_detections``, in every metrics file and report).

``predict`` runs a model the way ``drip infer`` does (the same resizing, forward pass and
scaling back: ``drip.detectors.forward_batch`` and ``scale_boxes``) so evaluation and inference cannot drift
apart, with the model's score floor lowered to ``EVAL_SCORE_FLOOR``: AP integrates the whole
precision-recall curve and a floor of 0.05 would cut its low-score tail.

Entry points:

* ``evaluate_records`` -- the training loop: a model on the eval split's TFRecord shards
  (``predict_records`` gives the detections themselves, for the report's pictures).
* ``evaluate_annotations`` -- ``drip evaluate``: an exported model on any annotated image folder.
  Reads the model file (``--model``, else ``<session_folder>/dl/model.pt``), the annotations
  (``--src_json_path``, any format Drip reads) and the images under ``--images_path``.
  Writes the metrics JSON to ``<--results_path>/metrics.json`` (or the ``.json`` file
  ``--results_path`` names; ``--output`` is its older name); an earlier file there is moved to
  ``<output folder>/trash/<timestamp>/`` first, never overwritten.
* ``Scoring`` -- ground truth and detections collected image by image while ``drip infer`` runs
  with ``--src_json_path``, and the COCO results file rows for COCO annotations.

Metrics of a class, size range or curve with no ground truth are ``None`` (pycocotools: -1).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..console import info, progress, warn
from ..detectors import EVAL_SCORE_FLOOR, evaluation_mode, forward_batch, scale_boxes  # noqa: F401
from ..errors import InputError, SessionError

# pycocotools' default detections per image (``maxDets``) for AP; raised where an image has more.
COCO_MAX_DETECTIONS = 100
# pycocotools' ``COCOeval.stats``, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
STAT_HELP = {
    "AP": "AP at IoU .50:.95 (the COCO AP); every AP and ARs/ARm/ARl count max_detections per image",
    "AP50": "AP at IoU .50 (the Pascal VOC AP)",
    "AP75": "AP at IoU .75",
    "APs": "AP of small objects (< 32x32 px)",
    "APm": "AP of medium objects (32x32 to 96x96 px)",
    "APl": "AP of large objects (> 96x96 px)",
    "AR1": "recall with 1 detection per image",
    "AR10": "recall with 10 detections per image",
    "AR100": "recall with 100 detections per image",
    "ARs": "recall of small objects",
    "ARm": "recall of medium objects",
    "ARl": "recall of large objects",
}


# -- the data -----------------------------------------------------------------------------------
@dataclass
class ImageTruth:
    """The annotated objects of one image."""

    image_id: Hashable
    width: int  # of the original image: sizes are judged in its pixels
    height: int
    boxes: Sequence[Sequence[float]]  # [xmin, ymin, xmax, ymax] in original pixels
    labels: Sequence[int]  # class ids, 1 = the first class


@dataclass
class ImageDetections:
    """What a model found in one image, in its original pixels (any score)."""

    image_id: Hashable
    boxes: np.ndarray  # (N, 4) [xmin, ymin, xmax, ymax]
    scores: np.ndarray  # (N,)
    labels: np.ndarray  # (N,) class ids, 1 = the first class


@dataclass
class Metrics:
    """COCO box metrics; each is a fraction in 0..1, or None where there is no ground truth."""

    AP: float | None
    AP50: float | None
    AP75: float | None
    APs: float | None
    APm: float | None
    APl: float | None
    AR1: float | None
    AR10: float | None
    AR100: float | None
    ARs: float | None
    ARm: float | None
    ARl: float | None
    per_class_ap: dict[str, float | None]  # AP at IoU .50:.95 by class name
    per_class_ap50: dict[str, float | None]
    # Precision at each of ``recall_thresholds`` (COCO's 101 points), IoU 0.5, all sizes,
    # ``max_detections`` per image: the per-class PR curve. None for a class with no ground truth.
    pr_curves: dict[str, list[float] | None]
    recall_thresholds: list[float]
    per_class_objects: dict[str, int]  # ground-truth boxes by class
    images: int
    objects: int
    detections: int
    # Detections per image scored (pycocotools' maxDets for AP): 100, or the most any image had.
    max_detections: int = 100

    @classmethod
    def empty(cls, classes: Sequence[str], images: int = 0, detections: int = 0) -> "Metrics":
        none = {name: None for name in classes}
        return cls(
            *([None] * len(STAT_NAMES)),
            per_class_ap=dict(none), per_class_ap50=dict(none), pr_curves=dict(none),
            recall_thresholds=_recall_thresholds(), per_class_objects={name: 0 for name in classes},
            images=images, objects=0, detections=detections,
        )

    def stats(self) -> dict[str, float | None]:
        """The 12 summary numbers by name, in pycocotools' order."""
        return {name: getattr(self, name) for name in STAT_NAMES}

    def to_json(self, curves: bool = False) -> dict[str, Any]:
        """A metrics-file row: the stats, per-class AP and AP50, counts; ``curves`` adds the PR curves."""
        out: dict[str, Any] = {
            **self.stats(),
            "per_class_ap": dict(self.per_class_ap),
            "per_class_ap50": dict(self.per_class_ap50),
            "per_class_objects": dict(self.per_class_objects),
            "images": self.images,
            "objects": self.objects,
            "detections": self.detections,
            "max_detections": self.max_detections,
        }
        if curves:
            out["pr_curves"] = {
                "iou": 0.5,
                "recall": list(self.recall_thresholds),
                "precision": {k: (None if v is None else list(v)) for k, v in self.pr_curves.items()},
            }
        return out


# -- scoring ------------------------------------------------------------------------------------
def coco_metrics(
    ground_truth: Iterable[ImageTruth],
    detections: Iterable[ImageDetections],
    classes: Sequence[str],
) -> Metrics:
    """Score ``detections`` against ``ground_truth`` with pycocotools' COCOeval (bbox).

    Every image to score must be in ``ground_truth``, also those without objects (their
    detections are false positives); an image without an entry in ``detections`` has none.
    ``classes`` names the class ids 1..K.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    classes = [str(c) for c in classes]
    truths = list(ground_truth)
    ids: dict[Hashable, int] = {}  # pycocotools wants int ids; a matched GT id must be > 0
    images, annotations = [], []
    per_class_objects = {name: 0 for name in classes}
    for truth in truths:
        if truth.image_id in ids:
            raise ValueError(f"coco_metrics: image id {truth.image_id!r} appears twice in the ground truth")
        image_id = ids[truth.image_id] = len(ids) + 1
        images.append({"id": image_id, "width": int(truth.width), "height": int(truth.height)})
        boxes = np.asarray(truth.boxes, dtype=np.float64).reshape(-1, 4)
        labels = [int(v) for v in np.asarray(truth.labels).reshape(-1)]
        if len(labels) != len(boxes):
            raise ValueError(f"coco_metrics: image {truth.image_id!r} has {len(boxes)} boxes but {len(labels)} labels")
        for (x0, y0, x1, y1), label in zip(boxes.tolist(), labels):
            if not 1 <= label <= len(classes):
                raise ValueError(f"coco_metrics: image {truth.image_id!r}: label {label} is outside 1..{len(classes)}")
            w, h = x1 - x0, y1 - y0
            # COCO's size ranges read the "area" field: the box area in original pixels here.
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0,
            })
            per_class_objects[classes[label - 1]] += 1

    results: list[dict[str, Any]] = []
    detections_per_image: dict[int, int] = {}
    for det in detections:
        if det.image_id not in ids:
            raise ValueError(f"coco_metrics: detections for image {det.image_id!r}, which has no ground-truth entry")
        rows = coco_result_rows(ids[det.image_id], det, lambda label: label if 1 <= label <= len(classes) else None)
        detections_per_image[ids[det.image_id]] = detections_per_image.get(ids[det.image_id], 0) + len(rows)
        results += rows
    if not images:
        return Metrics.empty(classes)  # COCOeval cannot average over no images

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and a table
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": name} for i, name in enumerate(classes, start=1)],
        }
        gt.createIndex()
        dt = gt.loadRes(results) if results else _no_results(gt)  # loadRes needs at least one
        evaluator = COCOeval(gt, dt, "bbox")
        cap = max_detections_for(detections_per_image.values())
        evaluator.params.maxDets = sorted({1, 10, 100, cap})
        evaluator.evaluate()
        evaluator.accumulate()

    precision = evaluator.eval["precision"]  # [IoU, recall, class, area, maxDets]
    params = evaluator.params
    iou50 = int(np.argmin(np.abs(params.iouThrs - 0.5)))
    all_areas = params.areaRngLbl.index("all")
    top = params.maxDets.index(cap)
    per_ap, per_ap50, curves = {}, {}, {}
    for k, cat_id in enumerate(params.catIds):  # ids 1..K in order, so k is the class index
        name = classes[cat_id - 1]
        per_ap[name] = _mean_valid(precision[:, :, k, all_areas, top])
        per_ap50[name] = _mean_valid(precision[iou50, :, k, all_areas, top])
        curve = precision[iou50, :, k, all_areas, top]
        curves[name] = None if (curve < 0).all() else [float(v) for v in curve]
    return Metrics(
        *_summary(evaluator, cap),
        per_class_ap=per_ap,
        per_class_ap50=per_ap50,
        pr_curves=curves,
        recall_thresholds=[float(r) for r in params.recThrs],
        per_class_objects=per_class_objects,
        images=len(images),
        objects=len(annotations),
        detections=len(results),
        max_detections=cap,
    )


def max_detections_for(counts: Iterable[int]) -> int:
    """The detections per image to score: COCO's 100, or the most any image has if more.

    pycocotools keeps only the ``maxDets`` best-scoring detections of an image and class; at
    its 100, an image tiled into 300 found trees could never recall more than a third of them.
    """
    return max([COCO_MAX_DETECTIONS, *counts])


def _summary(evaluator, cap: int) -> list[float | None]:
    """``COCOeval.summarize``'s 12 numbers, with ``cap`` detections per image where it uses 100.

    ``summarize`` reads AP at a fixed 100 detections; here AP, AP by size and AR by size read
    ``cap`` (at least 100), while AR1, AR10 and AR100 keep the limits their names give.
    """
    params = evaluator.params
    precision, recall = evaluator.eval["precision"], evaluator.eval["recall"]  # [T, R, K, A, M], [T, K, A, M]

    def ap(iou: float | None = None, area: str = "all") -> float | None:
        values = precision[..., params.areaRngLbl.index(area), params.maxDets.index(cap)]
        return _mean_valid(values if iou is None else values[np.isclose(params.iouThrs, iou)])

    def ar(max_dets: int, area: str = "all") -> float | None:
        return _mean_valid(recall[..., params.areaRngLbl.index(area), params.maxDets.index(max_dets)])

    return [
        ap(), ap(0.5), ap(0.75), ap(area="small"), ap(area="medium"), ap(area="large"),
        ar(1), ar(10), ar(100), ar(cap, "small"), ar(cap, "medium"), ar(cap, "large"),
    ]


@dataclass
class Found:
    """What a user sees at a score threshold: which images had every object found, and the false boxes."""

    threshold: float  # score, 0..1
    images: int
    complete_images: int  # images where every object has a box of its class at IoU >= 0.5
    objects: int
    found_objects: int
    false_boxes: int  # boxes at or above the threshold that match no object of their class

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return (
            f"at score >= {self.threshold:.2f}: every object found in {self.complete_images} of {self.images} "
            f"images ({self.found_objects} of {self.objects} objects), {self.false_boxes} false "
            f"box{'' if self.false_boxes == 1 else 'es'}"
        )


def found_at_threshold(
    ground_truth: Sequence[ImageTruth], detections: Sequence[ImageDetections], threshold: float, iou: float = 0.5
) -> Found:
    """Count, as a person reading the drawn results would, at score ``threshold`` (0..1).

    Boxes are matched greedily by score, as COCO matches: each box takes the unmatched object
    of its class it overlaps most (IoU >= ``iou``); a box that takes none is a false box.
    """
    from torchvision.ops import box_iou

    by_id = {det.image_id: det for det in detections}
    complete = found = objects = false = 0
    for truth in ground_truth:
        gt_boxes = torch.as_tensor(np.asarray(truth.boxes, dtype=np.float32).reshape(-1, 4))
        gt_labels = np.asarray(truth.labels, dtype=np.int64).reshape(-1)
        det = by_id.get(truth.image_id)
        if det is None:
            boxes, labels = torch.zeros((0, 4)), np.zeros(0, dtype=np.int64)
        else:
            keep = np.asarray(det.scores) >= threshold
            order = np.argsort(-np.asarray(det.scores)[keep], kind="stable")
            boxes = torch.as_tensor(np.asarray(det.boxes, dtype=np.float32).reshape(-1, 4)[keep][order])
            labels = np.asarray(det.labels).reshape(-1)[keep][order]
        overlaps = box_iou(boxes, gt_boxes).numpy() if len(boxes) and len(gt_boxes) else np.zeros((len(boxes), len(gt_boxes)))
        taken = np.zeros(len(gt_boxes), dtype=bool)
        for i, label in enumerate(labels):
            candidates = np.where((gt_labels == label) & ~taken & (overlaps[i] >= iou))[0]
            if candidates.size:
                taken[candidates[np.argmax(overlaps[i, candidates])]] = True
            else:
                false += 1
        objects += len(gt_boxes)
        found += int(taken.sum())
        complete += bool(taken.all())
    return Found(float(threshold), len(ground_truth), complete, objects, found, false)


def coco_result_rows(
    image_id: Any, det: ImageDetections, category_of: Callable[[int], int | None]
) -> list[dict[str, Any]]:
    """COCO results rows ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.

    ``category_of`` maps a class id to the category id to write, or None to leave it out.
    Used for scoring and for ``coco_results.json`` alike, so both hold the same numbers.
    """
    rows = []
    boxes = np.asarray(det.boxes, dtype=np.float64).reshape(-1, 4).tolist()
    scores = np.asarray(det.scores).reshape(-1).tolist()
    labels = np.asarray(det.labels).reshape(-1).tolist()
    for (x0, y0, x1, y1), score, label in zip(boxes, scores, labels):
        category = category_of(int(label))
        if category is None:
            continue
        rows.append(
            {"image_id": image_id, "category_id": category, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)}
        )
    return rows


def _no_results(gt):
    """The results object ``loadRes`` would make from an empty list (it refuses one)."""
    from pycocotools.coco import COCO

    res = COCO()
    res.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset["categories"]),
        "annotations": [],
    }
    res.createIndex()
    return res


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else None


def _recall_thresholds() -> list[float]:
    # COCOeval's Params: np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1)
    return [float(r) for r in np.linspace(0.0, 1.0, 101)]


# -- running a model ----------------------------------------------------------------------------
def detections_from_output(
    image_id: Hashable, output: dict[str, torch.Tensor], size: tuple[int, int], resized: tuple[int, int]
) -> ImageDetections:
    """A detector's output for the ``resized`` input -> detections in pixels of the ``size`` image.

    Scaled and clipped as ``drip infer`` does (``scale_boxes``); boxes with nothing left inside
    the image are dropped, as there.
    """
    boxes = scale_boxes(output["boxes"], size, resized)
    scores = torch.as_tensor(output["scores"]).detach().float().cpu().reshape(-1)
    labels = torch.as_tensor(output["labels"]).detach().cpu().reshape(-1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return ImageDetections(image_id, boxes[keep].numpy(), scores[keep].numpy(), labels[keep].numpy())


def predict(
    model: torch.nn.Module,
    images: Iterable[tuple[Hashable, Image.Image]],
    *,
    image_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    slicing: Any = None,
) -> list[ImageDetections]:
    """Run ``model`` (on ``device`` already) on ``(image_id, PIL RGB image)`` pairs.

    Inputs are prepared exactly as ``drip infer`` prepares them (longer side ``image_size``);
    detections are in original pixels, every score above ``EVAL_SCORE_FLOOR``, at most the
    model's ``detections_per_img`` (100) per image or per tile. ``images`` is consumed lazily, a batch at
    a time, so a generator keeps only one batch of decoded images in memory. With ``slicing``
    (a ``drip.data.tiling.Slicing``) each image is predicted tile by tile, ``batch_size`` tiles at
    a time, and the boxes are merged across tiles, as ``drip infer`` does.
    """
    device = torch.device(device)
    out: list[ImageDetections] = []
    batch: list[tuple[Hashable, Image.Image]] = []
    if slicing is not None:
        with evaluation_mode(model, image_size):
            for image_id, image in images:
                out.append(predict_sliced(model, image_id, image, int(image_size), device, batch_size, slicing))
        return out

    def flush() -> None:
        results = forward_batch(model, [image for _, image in batch], int(image_size), device, batch_size)
        for (image_id, image), (output, shape) in zip(batch, results):
            out.append(detections_from_output(image_id, output, image.size, shape))
        batch.clear()

    with evaluation_mode(model, image_size):
        for item in images:
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
    return out


def predict_sliced(
    model: torch.nn.Module, image_id: Hashable, image: Image.Image, image_size: int, device: torch.device,
    batch_size: int, slicing: Any,
) -> ImageDetections:
    """``image``'s detections predicted tile by tile (``drip.data.tiling.predict_sliced``), in its pixels.

    The model must be in ``evaluation_mode`` already.
    """
    from ..data.tiling import predict_sliced as sliced

    def detect(crops):
        results = forward_batch(model, crops, image_size, device, batch_size)
        found = [detections_from_output(None, output, crop.size, shape) for crop, (output, shape) in zip(crops, results)]
        return [(d.boxes, d.scores, d.labels) for d in found]

    boxes, scores, labels = sliced(image, slicing.tile, slicing.overlap, detect, batch_size, slicing.full_pass)
    return ImageDetections(image_id, boxes, scores, labels)


# -- the training loop: eval TFRecords ----------------------------------------------------------
def evaluate_records(
    model: torch.nn.Module,
    shard_paths: Sequence[Path],
    classes: Sequence[str],
    device: torch.device | str,
    batch_size: int,
    image_size: int,
    show_progress: bool = True,
    slicing: Any = None,
) -> Metrics:
    """COCO metrics of ``model`` on the records in ``shard_paths`` (the eval split).

    Each record's image is decoded whole (no augmentation, no flip) and goes through
    ``predict`` (tile by tile with ``slicing``, a model trained on tiles); its normalized
    boxes times the decoded width and height are the ground truth in original pixels. The
    model is left in the mode (train/eval) it came in.
    """
    found = predict_records(model, shard_paths, device, batch_size, image_size, show_progress, slicing=slicing)
    return coco_metrics(found.truths, found.detections, classes)


@dataclass
class RecordPredictions:
    """What ``predict_records`` found: per image, in record order."""

    truths: list[ImageTruth]
    detections: list[ImageDetections]
    images: list[Image.Image]  # the first ``keep_images`` decoded images, for pictures


def predict_records(
    model: torch.nn.Module,
    shard_paths: Sequence[Path],
    device: torch.device | str,
    batch_size: int,
    image_size: int,
    show_progress: bool = True,
    keep_images: int = 0,
    slicing: Any = None,
) -> RecordPredictions:
    """Run ``model`` on every record in ``shard_paths``: ground truth and detections per image.

    Image ids are the records' positions (0, 1, ...); the first ``keep_images`` images are kept.
    With ``slicing`` (a model trained on tiles) each image is predicted tile by tile.
    """
    from ..data.tfrecord import decode_example, index_records, iter_records

    paths = [Path(p) for p in shard_paths]
    truths: list[ImageTruth] = []
    kept: list[Image.Image] = []

    def images() -> Iterator[tuple[int, Image.Image]]:
        for path in paths:
            for payload in iter_records(path):
                example = decode_example(payload)
                where = f"{path} ({example.filename})"
                try:
                    with Image.open(io.BytesIO(example.encoded)) as img:
                        image = img.convert("RGB")
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                    raise SessionError(f"{where}: image bytes do not decode ({exc}); rerun the records stage") from None
                width, height = image.size
                boxes = [[b[0] * width, b[1] * height, b[2] * width, b[3] * height] for b in example.boxes]
                image_id = len(truths)
                truths.append(ImageTruth(image_id, width, height, boxes, list(example.labels)))
                if len(kept) < keep_images:
                    kept.append(image)
                yield image_id, image

    source: Iterable[tuple[int, Image.Image]] = images()
    if show_progress:
        total = sum(len(index_records(p)) for p in paths)
        source = progress(source, total=total, desc="evaluate")
    with contextlib.closing(source):  # a generator or a progress bar: both close
        detections = predict(
            model, source, image_size=image_size, device=device, batch_size=batch_size, slicing=slicing
        )
    return RecordPredictions(truths, detections, kept)


# -- annotations against a model's classes -----------------------------------------------------
def match_classes(annotations, model_classes: Sequence[str], source: str) -> dict[str, int]:
    """Class name -> the model's class id, for every class that labels a box in ``annotations``.

    Classes are matched by name, so the annotations may number them in any order; a class the
    model does not know cannot be scored and is an InputError naming both lists.
    """
    ids = {name: i for i, name in enumerate(model_classes, start=1)}
    used: list[str] = []
    for image in annotations.images:
        for label in image.labels:
            if label not in used:
                used.append(label)
    unknown = [name for name in used if name not in ids]
    if unknown:
        raise InputError(
            f"--src_json_path {source}: class{'es' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} not known to the model, which detects "
            f"{', '.join(map(repr, model_classes))}; evaluate with annotations of those classes "
            "(renamed to match) or with a model trained on them"
        )
    return {name: ids[name] for name in used}


class Scoring:
    """Ground truth from ``annotations`` and a model's detections, gathered image by image.

    ``drip infer --src_json_path`` feeds it as it goes and ``drip evaluate`` through
    ``predict``; images are keyed by their path relative to the image folder, as annotations
    name them. Ground-truth boxes are clipped to the image as the split stage clips them for
    training, and boxes with nothing inside it are left out (counted in ``dropped_boxes``).
    """

    def __init__(self, annotations, model_classes: Sequence[str], source: str):
        self.annotations = annotations
        self.classes = [str(c) for c in model_classes]
        self.class_ids = match_classes(annotations, self.classes, source)
        # An image listed twice (two VOC files, two COCO entries) is one image with both lists.
        self.by_file: dict[str, Any] = {}
        for image in annotations.images:
            merged = self.by_file.get(image.file)
            if merged is None:
                self.by_file[image.file] = copy.copy(image)  # shallow: the merge below makes new lists
            else:
                merged.boxes = [*merged.boxes, *image.boxes]
                merged.labels = [*merged.labels, *image.labels]
        self.truths: list[ImageTruth] = []
        self.detections: list[ImageDetections] = []
        self.dropped_boxes = 0

    def wants(self, file: str) -> bool:
        return file in self.by_file

    def add(self, file: str, size: tuple[int, int], detections: ImageDetections) -> None:
        """Record image ``file`` (decoded ``size``) and what the model found in it."""
        width, height = size
        boxes, labels = [], []
        for (x0, y0, x1, y1), label in zip(self.by_file[file].boxes, self.by_file[file].labels):
            x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
            y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
            if x1 <= x0 or y1 <= y0:
                self.dropped_boxes += 1
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.class_ids[label])
        self.truths.append(ImageTruth(file, width, height, boxes, labels))
        self.detections.append(detections)

    def missing(self) -> list[str]:
        """Annotated images that were not scored (not found, or not decodable)."""
        seen = {t.image_id for t in self.truths}
        return [file for file in self.by_file if file not in seen]

    def metrics(self) -> Metrics:
        return coco_metrics(self.truths, self.detections, self.classes)

    def coco_results(self) -> list[dict[str, Any]] | None:
        """COCO results rows in the annotation file's own image and category ids; None unless COCO.

        Detections of a model class with no category in the file are left out.
        """
        category_ids = getattr(self.annotations, "coco_category_ids", None)
        if self.annotations.format != "coco" or not category_ids:
            return None

        def category_of(label: int) -> int | None:
            name = self.classes[label - 1] if 1 <= label <= len(self.classes) else None
            return category_ids.get(name)

        rows: list[dict[str, Any]] = []
        for det in self.detections:
            rows += coco_result_rows(self.by_file[det.image_id].extra["coco_image_id"], det, category_of)
        return rows


# -- drip evaluate ------------------------------------------------------------------------------
@dataclass
class EvaluateResult:
    metrics: Metrics
    output: Path  # the metrics JSON written
    skipped: list[dict[str, str]] = field(default_factory=list)  # images not scored, and why


def evaluate_annotations(config, session_folder: Path) -> EvaluateResult:
    """``drip evaluate``: score the model ``config.model`` on ``config.images_path`` against
    ``config.src_json_path`` and write the metrics JSON to ``config.metrics_path()``."""
    from ..data.annotations import load_for_scoring
    from ..data.images import open_rgb
    from ..detectors.models import load_model, resolve_device
    from .results import resolve_model_path

    started = time.perf_counter()
    model_path = resolve_model_path(config.model, Path(session_folder))
    images_path = Path(config.images_path)
    if not images_path.is_dir():
        what = "is a file" if images_path.exists() else "does not exist"
        raise InputError(
            f"--images_path {images_path} {what}; pass the folder the annotation file's image paths are relative to"
        )
    src = Path(config.src_json_path)
    annotations = load_for_scoring(src, images_path)
    if not annotations.images:
        raise InputError(f"--src_json_path {src}: lists no images under --images_path {images_path}; nothing to evaluate")
    output = config.metrics_path()
    if output.is_dir():
        raise InputError(f"--results_path {config.results_path}: {output} is a folder; give another results folder")

    device = resolve_device(config.device)
    loaded = load_model(model_path, device)
    size = int(config.image_size or loaded.image_size)
    from ..data.tiling import resolve_slicing

    slicing = resolve_slicing(config.tile_size, config.tile_overlap, config.tile_full_pass, loaded.meta)
    scoring = Scoring(annotations, loaded.classes, str(src))  # before any image: a class mismatch fails fast
    skipped: list[dict[str, str]] = []
    sizes: dict[str, tuple[int, int]] = {}

    def images() -> Iterator[tuple[str, Image.Image]]:
        for file in scoring.by_file:
            try:
                image = open_rgb(images_path / file)
            except InputError as exc:
                warn(str(exc))  # one unreadable image must not cost the rest of the run
                skipped.append({"image": file, "error": str(exc)})
                continue
            sizes[file] = image.size
            yield file, image

    bar = progress(images(), total=len(scoring.by_file), desc="evaluate")
    with contextlib.closing(bar):
        detections = predict(
            loaded.model, bar, image_size=size, device=device, batch_size=config.batch_size, slicing=slicing
        )
    if not detections:
        raise InputError(
            f"--images_path {images_path}: none of the {len(scoring.by_file)} images in "
            f"{src} could be read (first: {skipped[0]['error'] if skipped else '?'}); check the folder"
        )
    for det in detections:
        scoring.add(det.image_id, sizes[det.image_id], det)
    metrics = scoring.metrics()

    report = metrics_report(
        metrics,
        model=str(model_path),
        network=loaded.network,
        image_size=size,
        tiling=slicing.to_json() if slicing else None,
        images_path=str(images_path),
        annotations=str(src),
        annotation_format=annotations.format,
        dropped_boxes=scoring.dropped_boxes,
        skipped=skipped,
    )
    moved = set_aside(output)
    if moved:
        info(f"moved the earlier {output.name} to {moved}")
    from ..session import write_json

    write_json(output, report)
    for line in summary_lines(metrics):
        info(line)
    note = f"; {len(skipped)} images could not be read (listed in the file)" if skipped else ""
    info(f"evaluate: {metrics.images} images in {time.perf_counter() - started:.1f}s; metrics in {output}{note}")
    return EvaluateResult(metrics=metrics, output=output, skipped=skipped)


def metrics_report(metrics: Metrics, **facts: Any) -> dict[str, Any]:
    """The metrics JSON of ``drip evaluate`` and ``drip infer --src_json_path``."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **facts,
        "score_floor": EVAL_SCORE_FLOOR,
        "metrics": metrics.to_json(curves=True),
        "about": {**STAT_HELP, "null": "no ground truth for it (pycocotools reports -1)"},
    }


def set_aside(path: Path) -> Path | None:
    """Move an existing ``path`` to ``<its folder>/trash/<timestamp>/``; return where it went."""
    from ..session import move, trash_folder

    path = Path(path)
    if not path.exists():
        return None
    target = trash_folder(path.parent / "trash")
    move(path, target / path.name)
    return target / path.name


def summary_lines(metrics: Metrics) -> list[str]:
    """A short table for the console: the main numbers, then AP and AP50 per class."""

    def show(value: float | None) -> str:
        return "    -" if value is None else f"{value:5.3f}"

    lines = [
        f"AP {show(metrics.AP)}  AP50 {show(metrics.AP50)}  AP75 {show(metrics.AP75)}  "
        f"APs {show(metrics.APs)}  APm {show(metrics.APm)}  APl {show(metrics.APl)}  AR100 {show(metrics.AR100)}"
        f"  ({metrics.images} images, {metrics.objects} objects, {metrics.detections} detections)"
    ]
    if metrics.per_class_ap:
        width = max(5, *(len(name) for name in metrics.per_class_ap))
        lines.append(f"  {'class':<{width}}  objects     AP   AP50")
        for name, ap in metrics.per_class_ap.items():
            objects = metrics.per_class_objects.get(name, 0)
            lines.append(f"  {name:<{width}}  {objects:>7}  {show(ap)}  {show(metrics.per_class_ap50.get(name))}")
    return lines


def write_scores(scoring: "Scoring", results_path: Path, config, model_path: Path, loaded: Any, size: int) -> Metrics | None:
    """Write what ``drip infer --src_json_path`` scored: ``metrics.json`` (and ``coco_results.json``
    for COCO annotations) at the top of ``results_path``; both runtimes' inference call it."""
    from ..session import write_json
    from .results import COCO_RESULTS, METRICS

    missing = scoring.missing()
    if missing:
        warn(
            f"--src_json_path {config.src_json_path}: {len(missing)} annotated images were not "
            f"scored (not under --images_path or unreadable), e.g. {missing[0]!r}"
        )
    if not scoring.truths:
        warn(
            f"--src_json_path {config.src_json_path}: none of its images is under --images_path "
            f"{config.images_path}; no metrics written (its image paths must be relative to that folder)"
        )
        return None
    metrics = scoring.metrics()
    found = found_at_threshold(scoring.truths, scoring.detections, config.threshold / 100.0)
    write_json(
        results_path / METRICS,
        metrics_report(
            metrics,
            model=str(model_path),
            network=getattr(loaded, "network", None),
            image_size=size,
            images_path=str(config.images_path),
            annotations=str(config.src_json_path),
            annotation_format=scoring.annotations.format,
            dropped_boxes=scoring.dropped_boxes,
            not_scored=missing,
            at_threshold=found.to_json(),
        ),
    )
    rows = scoring.coco_results()
    if rows is not None:
        write_json(results_path / COCO_RESULTS, rows)
    for line in summary_lines(metrics):
        info(line)
    also = f" and {results_path / COCO_RESULTS}" if rows is not None else ""
    info(f"infer: metrics against {config.src_json_path} in {results_path / METRICS}{also}")
    info(found.line())
    return metrics
