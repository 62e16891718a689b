"""The report: pictures of a training session, and one page that shows them all.

Written at the end of training and again by ``drip report``, from the session's own files:

* ``logs/`` (TensorBoard's event files, read with TensorBoard's reader): every loss and the
  learning rate, as the training loop logged them;
* ``metrics.jsonl``: AP and AP50 of each evaluation;
* ``split/train.json`` and ``split/eval.json``: the dataset as the split stage kept it;
* ``model.pt`` run once more on the eval shards (``records/``): per-class precision-recall
  curves at IoU 0.5, a confusion matrix and the drawn predictions;
* ``pipeline.config`` and ``session.json``: the settings and what the run did.

Writes ``dl/report/``: ``training_curves.png``, ``pr_curves.png``, ``confusion_matrix.png``,
``dataset_classes.png``, ``dataset_boxes.png``, ``eval_predictions.png`` and ``index.html``,
which shows them with relative paths: it opens from the file system, with no server and nothing
fetched from the network. A picture whose inputs are missing (no eval split, no model yet) is
left out and the page says why. An earlier report is moved to the session's trash first.

Plots are matplotlib's (Agg, through ``Figure`` objects: no pyplot state, no display needed).
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import console
from ..config import DEFAULT_THRESHOLD as INFER_THRESHOLD
from ..errors import DripError, SessionError
from ..session import Session, move, read_json, trash_folder

REPORT_DIR = "report"
GRID_IMAGES = 8  # eval images drawn, each as predicted | ground truth
MATCH_IOU = 0.5  # a detection and an object are the same thing from this IoU up (COCO's AP50)
DEFAULT_THRESHOLD = INFER_THRESHOLD / 100  # drip infer's default: what inference keeps
_MAX_DRAWN = 20  # predicted boxes drawn per eval image, the best scores first
_MAX_SCATTER = 4000  # boxes drawn in the size and position plots (a seeded sample beyond)
_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "savefig.dpi": 110,
    "savefig.facecolor": "white",
}
TRAIN_COLOUR, EVAL_COLOUR = "#1f77b4", "#ff7f0e"


@dataclass
class Picture:
    file: str
    title: str
    caption: str


@dataclass
class Report:
    """What went into ``index.html``: the pictures drawn, and why any were not."""

    folder: Path
    pictures: list[Picture] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # title -> why it is not there

    @property
    def index(self) -> Path:
        return self.folder / "index.html"


def write_report(
    session: Session,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    device: str = "auto",
    batch_size: int = 4,
    show_progress: bool = True,
) -> Report:
    """Draw every picture the session's files allow and write ``dl/report/index.html``.

    ``threshold`` (0..1) is the score from which a detection counts in the confusion matrix and
    is drawn on the eval images.
    """
    import matplotlib

    if not session.dl.is_dir():
        raise SessionError(f"{session.dl}: no session here; train one first (drip train --session_folder {session.root})")
    started = time.perf_counter()
    tmp = session.dl / f".{REPORT_DIR}.tmp-{os.getpid()}"
    if tmp.exists():
        move(tmp, trash_folder(session.trash, "report-partial") / tmp.name)
    tmp.mkdir(parents=True)
    report = Report(session.dl / REPORT_DIR)
    facts: dict[str, Any] = {}
    with matplotlib.rc_context(_STYLE):
        _training_curves(session, tmp, report)
        _dataset_pictures(session, tmp, report)
        evaluation = _evaluate_model(session, threshold, device, batch_size, show_progress, report)
        if evaluation is not None:
            facts = _evaluation_pictures(evaluation, threshold, tmp, report)
    (tmp / "index.html").write_text(_page(session, report, evaluation, facts, threshold), encoding="utf-8")
    if report.folder.exists():
        move(report.folder, trash_folder(session.trash, "report") / REPORT_DIR)
    os.replace(tmp, report.folder)
    console.info(
        f"report: {len(report.pictures)} pictures and index.html in {report.folder} "
        f"({time.perf_counter() - started:.1f} s)"
    )
    return report


def write_after_training(session: Session, config) -> Report | None:
    """The train stage's call. The model is saved by then: a report that cannot be drawn costs a
    warning saying how to draw it again, not the run's exit status."""
    if not config.report:
        return None
    try:
        return write_report(session, device=config.device, batch_size=config.batch_size)
    except Exception as exc:  # noqa: BLE001 - pictures must not fail a finished training
        console.warn(
            f"the report could not be drawn ({type(exc).__name__}: {exc}); the model is saved. "
            f"Draw it again with: drip report --session_folder {session.root}"
        )
        return None


# -- the data -------------------------------------------------------------------------------------
def read_scalars(logs_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of ``logs_dir``, by tag, as (step, value).

    TensorBoard's own reader: steps a resumed run trained again (its writer's ``purge_step``)
    appear once, as TensorBoard shows them.
    """
    if not logs_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(logs_dir), size_guidance={"scalars": 0, "images": 1, "tensors": 1, "histograms": 1, "audio": 1}
    )
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        points: dict[int, float] = {}
        for event in acc.Scalars(tag):
            points[int(event.step)] = float(event.value)
        out[tag] = sorted(points.items())
    return out


def read_metrics_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``, one per step (the last written wins), by step."""
    rows: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                rows[int(row["step"])] = row
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
    return [rows[step] for step in sorted(rows)]


def confusion_matrix(
    truths: Sequence[Any], detections: Sequence[Any], num_classes: int, threshold: float, iou: float = MATCH_IOU
) -> np.ndarray:
    """Counts ``(K+1) x (K+1)``: rows the true class, columns the predicted one, index K background.

    Per image, detections scoring ``threshold`` or more are matched one to one to objects of any
    class, highest IoU first, from ``iou`` up. A matched pair counts at (its object's class, its
    detection's class); an object left over is missed (column K), a detection left over is a
    false box (row K). ``truths[i]`` and ``detections[i]`` are the same image (``ImageTruth``
    and ``ImageDetections``, labels 1..K).
    """
    k = num_classes
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    for truth, det in zip(truths, detections):
        gt_boxes = np.asarray(truth.boxes, dtype=np.float64).reshape(-1, 4)
        gt_labels = np.asarray(truth.labels, dtype=np.int64).reshape(-1) - 1
        keep = np.asarray(det.scores).reshape(-1) >= threshold
        dt_boxes = np.asarray(det.boxes, dtype=np.float64).reshape(-1, 4)[keep]
        dt_labels = np.asarray(det.labels, dtype=np.int64).reshape(-1)[keep] - 1
        overlaps = box_iou(gt_boxes, dt_boxes)
        gt_used = np.zeros(len(gt_boxes), dtype=bool)
        dt_used = np.zeros(len(dt_boxes), dtype=bool)
        pairs = np.argwhere(overlaps >= iou)
        for g, d in pairs[np.argsort(-overlaps[pairs[:, 0], pairs[:, 1]], kind="stable")]:
            if not gt_used[g] and not dt_used[d]:
                gt_used[g] = dt_used[d] = True
                matrix[gt_labels[g], dt_labels[d]] += 1
        np.add.at(matrix, (gt_labels[~gt_used], k), 1)
        np.add.at(matrix, (k, dt_labels[~dt_used]), 1)
    return matrix


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), ``xyxy``: (N, M)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# -- training curves ------------------------------------------------------------------------------
def _training_curves(session: Session, folder: Path, report: Report) -> None:
    title = "Training curves"
    scalars = read_scalars(session.logs_dir)
    rows = read_metrics_rows(session.metrics_path)
    losses = sorted((t for t in scalars if t.startswith("loss/")), key=lambda t: (t != "loss/total", t))
    panels: list[tuple[str, list[tuple[str, list[tuple[int, float]]]]]] = [
        (tag.removeprefix("loss/").replace("_", " ") + " loss", [("", scalars[tag])]) for tag in losses
    ]
    if "lr" in scalars:
        panels.append(("learning rate", [("", scalars["lr"])]))
    ap = [(name, [(int(r["step"]), r[name]) for r in rows if r.get(name) is not None]) for name in ("AP", "AP50")]
    if any(points for _, points in ap):
        panels.append(("AP on the eval split", ap))
    if not panels:
        report.missing[title] = f"no TensorBoard events in {session.logs_dir} and no {session.metrics_path.name}: train first"
        return
    from matplotlib.ticker import MaxNLocator

    best = (session.read_state().get("stages", {}).get("train") or {}).get("best_step")
    columns = 3 if len(panels) > 4 else 2
    rows_n = math.ceil(len(panels) / columns)
    fig = _figure(4.2 * columns, 2.9 * rows_n)
    axes = fig.subplots(rows_n, columns, squeeze=False).ravel()
    for ax, (name, series) in zip(axes, panels):
        for label, points in series:
            if not points:
                continue
            steps, values = zip(*points)
            if name.endswith("loss") and len(points) > 20:
                ax.plot(steps, values, color=TRAIN_COLOUR, alpha=0.25, linewidth=1)
                ax.plot(steps, _smooth(values), color=TRAIN_COLOUR, linewidth=1.6, label="smoothed")
            else:
                ax.plot(steps, values, marker="o" if len(points) <= 30 else None, markersize=3, linewidth=1.6,
                        label=label or None)
        if name.startswith("AP"):
            if best is not None:
                ax.axvline(best, color="0.4", linestyle="--", linewidth=1, label=f"best (step {best})")
            ax.set_ylim(bottom=0)
            ax.legend(loc="lower right")
        elif name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    _save(fig, folder, "training_curves.png", report, title,
          "Every loss and the learning rate as training logged them (TensorBoard's logs/), and the "
          "COCO AP and AP50 of each evaluation (metrics.jsonl).")


def _smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


# -- the dataset ----------------------------------------------------------------------------------
def _dataset_pictures(session: Session, folder: Path, report: Report) -> None:
    splits = {}
    for name, path in (("train", session.train_manifest), ("eval", session.eval_manifest)):
        if path.is_file():
            data = read_json(path)
            splits[name] = data.get("images", []) if isinstance(data, dict) else []
    if not splits:
        reason = f"no {session.train_manifest}: run the split stage first"
        report.missing["Objects per class"] = report.missing["Box sizes and positions"] = reason
        return
    classes = _class_names(session, splits)
    counts = {name: {c: 0 for c in classes} for name in splits}
    sizes: dict[str, list[tuple[float, float]]] = {name: [] for name in splits}
    centres: list[tuple[float, float]] = []
    for name, images in splits.items():
        for image in images:
            w, h = image.get("width"), image.get("height")
            for obj in image.get("objects", []):
                counts[name][obj["label"]] = counts[name].get(obj["label"], 0) + 1
                if w and h:
                    x0, y0, x1, y1 = obj["box"]
                    sizes[name].append(((x1 - x0) / w, (y1 - y0) / h))
                    centres.append(((x0 + x1) / 2 / w, (y0 + y1) / 2 / h))

    # Objects per class, train beside eval: horizontal bars so long class names stay readable.
    fig = _figure(7.5, 1.2 + 0.32 * len(classes) * max(1, len(splits) / 1.5))
    ax = fig.subplots()
    y = np.arange(len(classes))
    height = 0.8 / len(splits)
    for i, (name, colour) in enumerate(zip(splits, (TRAIN_COLOUR, EVAL_COLOUR))):
        values = [counts[name].get(c, 0) for c in classes]
        bars = ax.barh(y + (i - (len(splits) - 1) / 2) * height, values, height, color=colour,
                       label=f"{name} ({len(splits[name])} images, {sum(values)} objects)")
        ax.bar_label(bars, padding=2, fontsize=7)
    ax.set_yticks(y, classes)
    ax.invert_yaxis()
    ax.set_xlabel("objects")
    ax.set_title("Objects per class")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="lower right")
    ax.margins(x=0.12)
    _save(fig, folder, "dataset_classes.png", report, "Objects per class",
          "Boxes of each class in the train and eval splits, as the split stage kept them "
          "(before augmentation).")

    fig = _figure(10, 4.4)
    left, right = fig.subplots(1, 2)
    rng = np.random.default_rng(0)
    for name, colour in zip(splits, (TRAIN_COLOUR, EVAL_COLOUR)):
        points = np.asarray(sizes[name], dtype=np.float64).reshape(-1, 2)
        if len(points) > _MAX_SCATTER:
            points = points[rng.choice(len(points), _MAX_SCATTER, replace=False)]
        left.scatter(points[:, 0], points[:, 1], s=8, alpha=0.5, color=colour, edgecolors="none", label=name)
    left.set(xlim=(0, 1), ylim=(0, 1), xlabel="box width / image width", ylabel="box height / image height",
             title="Box sizes")
    left.set_aspect("equal")
    if any(sizes.values()):
        left.legend(loc="upper left", markerscale=2)
    at = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    counts_2d, _, _, image = right.hist2d(at[:, 0], at[:, 1], bins=20, range=[[0, 1], [0, 1]], cmap="Blues")
    fig.colorbar(image, ax=right, label="box centres", shrink=0.85)
    right.set(xlim=(0, 1), ylim=(1, 0), xlabel="centre x / image width", ylabel="centre y / image height",
              title="Box positions (centres, image top at the top)")
    right.set_aspect("equal")
    right.grid(False)
    _save(fig, folder, "dataset_boxes.png", report, "Box sizes and positions",
          "Each box's width and height relative to its image, and where box centres fall in the "
          "frame (train and eval together).")


def _class_names(session: Session, splits: dict[str, list[dict[str, Any]]]) -> list[str]:
    if session.label_map_path.is_file():
        from ..data.labelmap import LabelMap

        return list(LabelMap.read(session.label_map_path).names)
    seen: list[str] = []
    for images in splits.values():
        for image in images:
            for obj in image.get("objects", []):
                if obj["label"] not in seen:
                    seen.append(obj["label"])
    return seen


# -- the model on the eval split ------------------------------------------------------------------
@dataclass
class _Evaluation:
    classes: list[str]
    found: Any  # drip.evaluation.metrics.RecordPredictions
    metrics: Any  # drip.evaluation.metrics.Metrics
    model_meta: dict[str, Any]


def _evaluate_model(session: Session, threshold: float, device: str, batch_size: int, show_progress: bool,
                    report: Report) -> _Evaluation | None:
    titles = ("Precision-recall curves", "Confusion matrix", "Predictions on eval images")
    reason = None
    if not session.model_path.is_file():
        reason = f"no {session.model_path.name} in {session.dl}: training has not exported a model yet"
    else:
        from ..data.records import read_eval_records

        try:
            shards = read_eval_records(session)
        except DripError as exc:
            shards, reason = [], str(exc)
        if not shards and reason is None:
            reason = "the session has no eval split (--eval_percentage 0)"
    if reason is not None:
        for title in titles:
            report.missing[title] = reason
        return None
    from ..data.tiling import resolve_slicing
    from ..detectors.models import load_model, resolve_device
    from .metrics import coco_metrics, predict_records

    resolved = resolve_device(device)
    loaded = load_model(session.model_path, resolved)
    slicing = resolve_slicing(None, None, False, loaded.meta)  # a model trained on tiles: as training scored it
    found = predict_records(loaded.model, shards, resolved, batch_size, loaded.image_size, show_progress,
                            keep_images=GRID_IMAGES, slicing=slicing)
    metrics = coco_metrics(found.truths, found.detections, loaded.classes)
    return _Evaluation(list(loaded.classes), found, metrics, loaded.meta)


def _evaluation_pictures(ev: _Evaluation, threshold: float, folder: Path, report: Report) -> dict[str, Any]:
    classes, metrics = ev.classes, ev.metrics
    colours = _class_colours(len(classes))

    # Per-class precision-recall at IoU 0.5 (COCO's interpolated curve, 101 recall points).
    recall = np.asarray(metrics.recall_thresholds)
    curves = {name: c for name, c in metrics.pr_curves.items() if c is not None}
    many = len(curves) > 8  # the legend goes beside the plot, the class curves fade behind the mean
    fig = _figure(7.5 + (3.5 if many else 0) + (3.0 if len(curves) > 30 else 0), 5.2 + (0.1 * max(0, len(curves) - 30)))
    ax = fig.subplots()
    for i, name in enumerate(classes):
        if name in curves:
            ap50 = metrics.per_class_ap50.get(name)
            ax.plot(recall, np.clip(curves[name], 0, 1), color=colours[i], linewidth=1.0 if many else 1.4,
                    alpha=0.75 if many else 1.0,
                    label=f"{name}  AP50 {_num(ap50)}  ({metrics.per_class_objects.get(name, 0)} objects)")
    if curves:
        mean = np.mean([np.clip(c, 0, 1) for c in curves.values()], axis=0)
        ax.plot(recall, mean, color="black", linewidth=2.6, label=f"all classes  AP50 {_num(metrics.AP50)}")
        if many:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, ncol=1 if len(curves) <= 30 else 2)
        else:
            ax.legend(loc="lower left")
    else:
        ax.text(0.5, 0.5, "no objects in the eval split", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title="Precision-recall at IoU 0.5 on the eval split")
    if not many:
        ax.set_aspect("equal")
    _save(fig, folder, "pr_curves.png", report, "Precision-recall curves",
          "Each class's precision against recall at IoU 0.5, as pycocotools computes it for AP50 "
          "(every detection scoring 0.1% or more counts), for the exported model on the eval split.")

    # The confusion matrix at the threshold, with background for missed objects and false boxes.
    matrix = confusion_matrix(ev.found.truths, ev.found.detections, len(classes), threshold)
    names = [*classes, "background"]
    k = len(classes)
    size = min(14.0, 3.2 + 0.55 * len(names))
    fig = _figure(size + 1.2, size)
    ax = fig.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=np.float64), where=totals > 0)
    shares[k] = matrix[k] / max(1, matrix[k].sum())  # false boxes: where they went, by class
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the row", shrink=0.8)
    if len(names) <= 30:
        for (row, col), count in np.ndenumerate(matrix):
            if count == 0 and len(names) > 6:  # blank cells read faster than a sea of zeros
                continue
            if row == k and col == k:
                continue
            ax.text(col, row, str(count), ha="center", va="center", fontsize=8 if len(names) <= 15 else 6,
                    color="white" if shares[row, col] > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45 if max(map(len, names)) > 6 else 0, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true",
           title=f"Confusion matrix at score {threshold:.0%}, IoU {MATCH_IOU}")
    ax.grid(False)
    ax.spines[:].set_visible(False)
    objects = int(matrix[:k].sum())
    found_right = int(np.trace(matrix[:k, :k]))
    facts = {
        "objects": objects, "found": found_right, "confused": int(matrix[:k, :k].sum()) - found_right,
        "missed": int(matrix[:k, k].sum()), "false_boxes": int(matrix[k, :k].sum()),
        "images": len(ev.found.truths),
        "images_all_found": _images_all_found(ev.found.truths, ev.found.detections, threshold),
    }
    _save(fig, folder, "confusion_matrix.png", report, "Confusion matrix",
          f"Detections scoring {threshold:.0%} or more matched one to one with the objects they "
          f"overlap most (IoU {MATCH_IOU} or more). The background column counts missed objects, "
          "the background row false boxes; colour is the share of each row.")

    # Predictions beside the ground truth on the first eval images.
    shown = ev.found.images
    if shown:
        pairs_per_row = 2 if len(shown) > 1 else 1
        rows_n = math.ceil(len(shown) / pairs_per_row)
        aspect = max(im.height / im.width for im in shown)
        fig = _figure(4.8 * pairs_per_row, 0.4 + 2.6 * rows_n * min(1.5, aspect) * 1.1)
        axes = fig.subplots(rows_n, 2 * pairs_per_row, squeeze=False).ravel()
        for i, image in enumerate(shown):
            truth, det = ev.found.truths[i], ev.found.detections[i]
            keep = np.flatnonzero(det.scores >= threshold)
            drawn = keep[np.argsort(-det.scores[keep], kind="stable")][:_MAX_DRAWN]
            _draw_boxes(axes[2 * i], image, det.boxes[drawn], det.labels[drawn], classes, colours, det.scores[drawn])
            more = f", best {len(drawn)} drawn" if len(drawn) < len(keep) else ""
            axes[2 * i].set_title(f"predicted ({len(keep)}{more})", fontsize=8)
            _draw_boxes(axes[2 * i + 1], image, truth.boxes, truth.labels, classes, colours)
            axes[2 * i + 1].set_title(f"ground truth ({len(truth.labels)})", fontsize=8)
        for ax in axes[2 * len(shown):]:
            ax.set_visible(False)
        fig.suptitle(f"Eval images: predictions scoring {threshold:.0%} or more beside the ground truth",
                     fontweight="bold")
        _save(fig, folder, "eval_predictions.png", report, "Predictions on eval images",
              f"The first {len(shown)} eval images: on the left what the exported model finds "
              f"(score {threshold:.0%} or more), on the right the labelled objects.")
    else:
        report.missing["Predictions on eval images"] = "the eval split holds no images"
    return facts


def _images_all_found(truths, detections, threshold: float) -> int:
    """Images where every object has a detection of its class at IoU 0.5 (score >= threshold)."""
    count = 0
    for truth, det in zip(truths, detections):
        keep = det.scores >= threshold
        overlaps = box_iou(np.asarray(truth.boxes).reshape(-1, 4), det.boxes[keep])
        same = np.asarray(truth.labels).reshape(-1, 1) == det.labels[keep].reshape(1, -1)
        if np.all(np.any((overlaps >= MATCH_IOU) & same, axis=1)):
            count += 1
    return count


def _draw_boxes(ax, image, boxes, labels, classes, colours, scores=None) -> None:
    """``image`` (None: boxes only, over what ``ax`` shows) and its boxes, each in its class's colour."""
    from matplotlib.patches import Rectangle

    if image is not None:
        ax.imshow(image)
    ax.set_axis_off()
    for i, (box, label) in enumerate(zip(np.asarray(boxes).reshape(-1, 4), np.asarray(labels).reshape(-1))):
        label = int(label)
        colour = colours[(label - 1) % len(colours)] if colours else "red"
        x0, y0, x1, y1 = (float(v) for v in box)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.6))
        name = classes[label - 1] if 1 <= label <= len(classes) else f"class {label}"
        text = name if scores is None else f"{name} {float(scores[i]):.0%}"
        ax.text(x0, y0, text, fontsize=6, color="white", va="bottom", ha="left", clip_on=True,
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.0, "alpha": 0.85})


def _class_colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


# -- files ----------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, folder: Path, name: str, report: Report, title: str, caption: str) -> None:
    fig.savefig(folder / name, format="png")
    report.pictures.append(Picture(name, title, caption))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1180px; margin: 2em auto; padding: 0 1.2em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: .6em 0; font-size: 14px; }
th, td { padding: .25em .8em; border-bottom: 1px solid #eee; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; margin: 1em 0; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: .6em 1em; min-width: 7em; }
.card b { display: block; font-size: 1.5em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 14px; }
.missing { color: #8a6d3b; background: #fcf8e3; padding: .4em .8em; border-radius: 4px; }
details { margin: 1em 0; } summary { cursor: pointer; font-weight: 600; }
"""


def _page(session: Session, report: Report, ev: _Evaluation | None, facts: dict[str, Any], threshold: float) -> str:
    from .. import __version__

    e = html.escape
    state = session.read_state()
    trained = (state.get("stages") or {}).get("train") or {}
    settings = _config_items(session, ev)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Drip report: {e(str(session.root))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Drip training report</h1>",
        f'<p class="sub">Session <code>{e(str(session.dl.resolve()))}</code>; written '
        f"{e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} by Drip {e(__version__)}.</p>",
    ]
    cards = []
    if trained:
        early = " (stopped early: --patience)" if trained.get("stopped_early") else ""
        cards.append((f"steps trained{early}", trained.get("step")))
        cards.append(("best step", trained.get("best_step")))
    if ev is not None:
        cards += [("AP", _num(ev.metrics.AP)), ("AP50", _num(ev.metrics.AP50))]
    if facts:
        cards.append((f"objects found at {threshold:.0%}", f"{facts['found']} / {facts['objects']}"))
        cards.append((f"false boxes at {threshold:.0%}", facts["false_boxes"]))
        cards.append(("images with every object found",
                      f"{facts['images_all_found']} / {facts['images']}"))
    if cards:
        parts.append('<div class="cards">' + "".join(
            f'<div class="card"><b>{e(str(v if v is not None else "-"))}</b>{e(k)}</div>' for k, v in cards
        ) + "</div>")
    if ev is not None:
        parts.append("<h2>Final metrics</h2>")
        parts.append(
            f"<p>The exported model (<code>model.pt</code>, step {e(str(ev.model_meta.get('step', '-')))}) "
            f"on the eval split: {ev.metrics.images} images, {ev.metrics.objects} objects; COCO metrics "
            f"as pycocotools computes them, counting up to {ev.metrics.max_detections} detections per image "
            "(COCO's 100, or the most any image had, so an image tiled into hundreds of objects is scored "
            "whole; AR1, AR10 and AR100 keep their limits).</p>"
        )
        stats = ev.metrics.stats()
        parts.append("<table><tr>" + "".join(f"<th>{e(k)}</th>" for k in stats) + "</tr><tr>"
                     + "".join(f'<td class="n">{_num(v)}</td>' for v in stats.values()) + "</tr></table>")
        parts.append("<table><tr><th>class</th><th>objects</th><th>AP</th><th>AP50</th></tr>" + "".join(
            f"<tr><td>{e(name)}</td><td class='n'>{ev.metrics.per_class_objects.get(name, 0)}</td>"
            f"<td class='n'>{_num(ap)}</td><td class='n'>{_num(ev.metrics.per_class_ap50.get(name))}</td></tr>"
            for name, ap in ev.metrics.per_class_ap.items()
        ) + "</table>")
    audit = session.dl / "audit" / "index.html"
    if audit.is_file():
        parts.append('<h2>Label audit</h2><p>The labels this session\'s folds found suspect, ranked, with '
                     'crops and suggestions: <a id="audit" href="../audit/index.html">the audit page</a> '
                     '(<code>audit/label_issues.json</code>, <code>audit/suggested.json</code>).</p>')
    for picture in report.pictures:
        parts.append(f"<h2>{e(picture.title)}</h2>")
        parts.append(f'<figure><img src="{e(picture.file)}" alt="{e(picture.title)}">'
                     f"<figcaption>{e(picture.caption)}</figcaption></figure>")
    for title, why in report.missing.items():
        parts.append(f"<h2>{e(title)}</h2><p class='missing'>Not drawn: {e(why)}.</p>")
    if settings:
        parts.append("<h2>Configuration</h2>")
        parts.append(f"<p>From <code>{e(str(session.config_path.name))}</code>, as the run used it.</p>")
        parts.append("<table>" + "".join(
            f"<tr><th>{e(k)}</th><td><code>{e(json.dumps(v))}</code></td></tr>" for k, v in settings.items()
        ) + "</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _config_items(session: Session, ev: _Evaluation | None) -> dict[str, Any]:
    if session.config_path.is_file():
        from ..config import Config

        try:
            return Config.read(session.config_path).to_dict()
        except DripError as exc:
            console.warn(f"report: {exc}; showing the model file's config instead")
    return dict((ev.model_meta.get("config") or {}) if ev is not None else {})
