"""drip.evaluation.metrics: COCO metrics equal pycocotools' own, on records, on annotations, from the CLI.

The reference numbers are computed here independently, the way a COCO user would: ground
truth and results written as COCO JSON files, ``COCO(gt.json).loadRes(dets.json)`` and
``COCOeval``, with their own image and category ids.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from drip.evaluation import metrics as evaluate
from drip.evaluation.metrics import ImageDetections, ImageTruth, coco_metrics

CLASSES = ["cat", "dog", "bird", "ghost"]  # "ghost" never has ground truth


# -- reference: pycocotools from files ----------------------------------------------------------
def reference(tmp_path: Path, truths, detections, cat_ids=(7, 3, 21, 40), cat_filter=None):
    """COCOeval stats (and the eval object) from COCO files with other ids than drip uses."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    image_ids = {t.image_id: 1000 + 7 * i for i, t in enumerate(truths)}
    gt = {
        "images": [{"id": image_ids[t.image_id], "width": t.width, "height": t.height} for t in truths],
        "categories": [{"id": cid, "name": name} for cid, name in zip(cat_ids, CLASSES)],
        "annotations": [],
    }
    for t in truths:
        for (x0, y0, x1, y1), label in zip(t.boxes, t.labels):
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": image_ids[t.image_id],
                "category_id": cat_ids[label - 1], "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            })
    dets = [
        {"image_id": image_ids[d.image_id], "category_id": cat_ids[int(label) - 1],
         "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": float(score)}
        for d in detections
        for (x0, y0, x1, y1), score, label in zip(d.boxes, d.scores, d.labels)
    ]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        coco_dt = coco_gt.loadRes(str(tmp_path / "dets.json"))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if cat_filter is not None:
            ev.params.catIds = [cat_ids[cat_filter]]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def quarter(values):
    """Round to quarter pixels: exact in binary, so x + w - x == w and both sides see one box."""
    return np.round(np.asarray(values, dtype=np.float64) * 4) / 4


def random_set(seed=0, n_images=8):
    """Boxes of every size over several images and classes, detections near and far from them.

    Image 0 has ground truth and no detections, image 1 detections and no ground truth, "bird"
    is never detected as a bird and "ghost" is only ever a false positive.
    """
    rng = np.random.default_rng(seed)
    truths, detections = [], []
    for i in range(n_images):
        width, height = int(rng.integers(200, 641)), int(rng.integers(150, 481))
        boxes, labels = [], []
        for _ in range(0 if i == 1 else int(rng.integers(1, 7))):
            side = rng.choice([rng.uniform(4, 30), rng.uniform(35, 90), rng.uniform(100, 220)])
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x0, y0 = rng.uniform(0, max(1, width - w)), rng.uniform(0, max(1, height - h))
            box = quarter([x0, y0, min(width, x0 + w), min(height, y0 + h)])
            boxes.append(box.tolist())
            labels.append(int(rng.integers(1, 4)))
        truths.append(ImageTruth(f"image {i}", width, height, boxes, labels))
        if i == 0:
            continue
        d_boxes, d_scores, d_labels = [], [], []
        for box, label in zip(boxes, labels):
            if label == 3 or rng.random() < 0.2:
                continue
            w, h = box[2] - box[0], box[3] - box[1]
            jitter = rng.normal(0, 0.12, size=4) * [w, h, w, h]
            d_boxes.append(quarter(np.array(box) + jitter).tolist())
            d_scores.append(rng.uniform(0.05, 1.0))
            d_labels.append(label if rng.random() < 0.9 else int(rng.choice([1, 2, 4])))
        for _ in range(int(rng.integers(0, 4))):
            x0, y0 = rng.uniform(0, width - 40), rng.uniform(0, height - 40)
            d_boxes.append(quarter([x0, y0, x0 + rng.uniform(5, 40), y0 + rng.uniform(5, 40)]).tolist())
            d_scores.append(rng.uniform(0.0, 0.6))
            d_labels.append(int(rng.choice([1, 2, 4])))
        d_boxes = [b for b in d_boxes if b[2] > b[0] and b[3] > b[1]]
        detections.append(ImageDetections(
            f"image {i}", np.array(d_boxes).reshape(-1, 4), np.array(d_scores[: len(d_boxes)]),
            np.array(d_labels[: len(d_boxes)]),
        ))
    return truths, detections


def as_coco(value):
    return -1.0 if value is None else value


# -- coco_metrics against pycocotools ------------------------------------------------------------
def test_metrics_equal_pycocotools_on_files(tmp_path):
    truths, detections = random_set()
    metrics = coco_metrics(truths, detections, CLASSES)
    ev = reference(tmp_path, truths, detections)

    ours = [as_coco(v) for v in metrics.stats().values()]
    assert ours == pytest.approx(list(ev.stats), abs=1e-12)
    assert list(metrics.stats()) == list(evaluate.STAT_NAMES)
    # The set is built to exercise every branch: sizes present, a class missed, one without GT.
    assert 0 < metrics.AP < 1 and metrics.APs is not None and metrics.APl is not None
    assert metrics.per_class_ap["bird"] == 0.0
    assert metrics.per_class_ap["ghost"] is None and metrics.pr_curves["ghost"] is None
    assert metrics.per_class_objects["ghost"] == 0
    assert metrics.objects == sum(len(t.labels) for t in truths)
    assert metrics.detections == sum(len(d.labels) for d in detections)

    # Per-class AP and AP50 = COCOeval restricted to that one category.
    for k, name in enumerate(CLASSES[:3]):
        alone = reference(tmp_path, truths, detections, cat_filter=k)
        assert metrics.per_class_ap[name] == pytest.approx(alone.stats[0], abs=1e-12), name
        assert metrics.per_class_ap50[name] == pytest.approx(alone.stats[1], abs=1e-12), name
        # The PR curve: precision at IoU .5, all areas, 100 detections, over recThrs; the
        # reference file's category ids are not in class order, its precision array is by id.
        column = sorted(ev.params.catIds).index(ev.cocoGt.getCatIds(catNms=[name])[0])
        curve = ev.eval["precision"][0, :, column, 0, 2]
        assert metrics.pr_curves[name] == pytest.approx(curve.tolist(), abs=1e-12)
    assert metrics.recall_thresholds == pytest.approx(ev.params.recThrs.tolist())


def test_perfect_detections_score_one():
    truths, _ = random_set(seed=3)
    perfect = [
        ImageDetections(t.image_id, np.array(t.boxes).reshape(-1, 4), np.ones(len(t.labels)), np.array(t.labels))
        for t in truths
    ]
    metrics = coco_metrics(truths, perfect, CLASSES)
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert getattr(metrics, name) == pytest.approx(1.0), name
    present = {CLASSES[label - 1] for t in truths for label in t.labels}
    assert all(metrics.per_class_ap[name] == pytest.approx(1.0) for name in present)
    assert all(metrics.per_class_ap[name] is None for name in set(CLASSES) - present)


def test_an_image_with_more_than_100_objects_is_scored_whole():
    # An orthomosaic tiled at inference holds hundreds of one class; pycocotools' default keeps
    # 100 detections per image, which caps recall at 100/150 and AP near 0.66.
    boxes = [[20.0 * col + 2, 20.0 * row + 2, 20.0 * col + 14, 20.0 * row + 14] for row in range(10) for col in range(15)]
    truth = ImageTruth("mosaic", 300, 200, boxes, [1] * len(boxes))
    scores = np.linspace(0.99, 0.5, len(boxes))
    perfect = ImageDetections("mosaic", np.array(boxes), scores, np.ones(len(boxes), dtype=np.int64))
    metrics = coco_metrics([truth], [perfect], CLASSES)
    for name in ("AP", "AP50", "AP75", "APs", "ARs"):
        assert getattr(metrics, name) == pytest.approx(1.0), name
    assert metrics.max_detections == 150 and metrics.to_json()["max_detections"] == 150
    assert metrics.per_class_ap["cat"] == pytest.approx(1.0)
    assert metrics.pr_curves["cat"] == pytest.approx([1.0] * 101)
    # AR100 keeps the meaning of its name: 100 of the 150 objects.
    assert metrics.AR100 == pytest.approx(100 / 150)
    # Up to 100 detections per image, the numbers are pycocotools' own (test above), at maxDets 100.
    assert coco_metrics([truth], [ImageDetections("mosaic", np.array(boxes[:100]), scores[:100], np.ones(100))],
                        CLASSES).max_detections == 100


def test_no_detections_scores_zero_and_no_images_scores_nothing(tmp_path):
    truths, _ = random_set(seed=4, n_images=3)
    metrics = coco_metrics(truths, [], CLASSES)
    assert metrics.AP == 0.0 and metrics.AR100 == 0.0 and metrics.detections == 0
    present = {CLASSES[label - 1] for t in truths for label in t.labels}
    assert all(metrics.per_class_ap[name] == 0.0 for name in present)
    # pycocotools agrees: an empty results list is all misses (loadRes itself refuses []).
    # (The reference gets one "ghost" detection, a class without ground truth: no effect.)
    ghost = ImageDetections(truths[0].image_id, np.array([[1.0, 1.0, 2.0, 2.0]]), np.array([0.01]), np.array([4]))
    ev = reference(tmp_path, truths, [ghost])
    assert [as_coco(v) for v in metrics.stats().values()] == pytest.approx(list(ev.stats), abs=1e-12)

    empty = coco_metrics([], [], CLASSES)
    assert all(v is None for v in empty.stats().values()) and empty.images == 0


def test_metrics_json_row_and_summary():
    truths, detections = random_set(seed=5, n_images=4)
    metrics = coco_metrics(truths, detections, CLASSES)
    row = json.loads(json.dumps(metrics.to_json()))
    assert set(evaluate.STAT_NAMES) <= set(row) and "pr_curves" not in row
    assert set(row["per_class_ap"]) == set(CLASSES) and row["per_class_ap"]["ghost"] is None
    with_curves = metrics.to_json(curves=True)
    assert len(with_curves["pr_curves"]["recall"]) == 101
    lines = evaluate.summary_lines(metrics)
    assert lines[0].startswith("AP ") and any(line.strip().startswith("ghost") for line in lines)


def test_bad_input_is_a_clear_error():
    truth = ImageTruth("a", 10, 10, [[0, 0, 5, 5]], [9])
    with pytest.raises(ValueError, match="label 9 is outside 1..4"):
        coco_metrics([truth], [], CLASSES)
    with pytest.raises(ValueError, match="no ground-truth entry"):
        coco_metrics([], [ImageDetections("x", np.zeros((0, 4)), np.zeros(0), np.zeros(0))], CLASSES)


# -- running a model ----------------------------------------------------------------------------
class OracleDetector(torch.nn.Module):
    """Returns given boxes (normalized, one list per call in order) scaled to the input it gets.

    Records the score floor it ran with, the way a torchvision one-stage detector keeps it.
    """

    def __init__(self, answers):
        super().__init__()
        self.answers = list(answers)
        self.score_thresh = 0.05
        self.floors_seen: list[float] = []

    def forward(self, images):
        self.floors_seen.append(self.score_thresh)
        assert not self.training
        outputs = []
        for image in images:
            boxes, labels = self.answers.pop(0)
            h, w = image.shape[-2:]
            boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * torch.tensor([w, h, w, h])
            outputs.append({"boxes": boxes, "scores": torch.ones(len(labels)), "labels": torch.tensor(labels)})
        return outputs


def write_records(path: Path, n: int, seed: int = 0):
    """A shard of ``n`` synthetic images as the records stage writes them; their normalized GT."""
    from drip.data.images import encode_jpeg
    from drip.data.synthetic import draw_scene
    from drip.data.tfrecord import DetectionExample, TFRecordWriter, encode_example

    rng = np.random.default_rng(seed)
    answers = []
    with TFRecordWriter(path) as writer:
        for i in range(n):
            size = (160, 120) if i % 2 else (90, 200)
            image, boxes, labels = draw_scene(rng, *size, classes=tuple(CLASSES[:3]))
            norm = [[b[0] / size[0], b[1] / size[1], b[2] / size[0], b[3] / size[1]] for b in boxes]
            ids = [CLASSES.index(label) + 1 for label in labels]
            writer.write(encode_example(DetectionExample(
                encode_jpeg(image), "jpeg", f"img{i}.jpg", str(i), size[0], size[1], norm, ids, labels,
            )))
            answers.append((norm, ids))
    return answers


def test_evaluate_records_with_a_perfect_model(tmp_path):
    answers = write_records(tmp_path / "eval-00000.tfrecord", 5)
    model = OracleDetector(answers).train()
    metrics = evaluate.evaluate_records(
        model, [tmp_path / "eval-00000.tfrecord"], CLASSES, "cpu", batch_size=2, image_size=64, show_progress=False
    )
    assert metrics.images == 5 and metrics.objects == sum(len(a[1]) for a in answers)
    assert metrics.AP == pytest.approx(1.0) and metrics.AP50 == pytest.approx(1.0)
    # Lowered while scoring, then the training loop gets its model back as it was.
    assert model.floors_seen == [evaluate.EVAL_SCORE_FLOOR] * 3
    assert model.training and model.score_thresh == 0.05


def test_evaluation_mode_lowers_and_restores_a_torchvision_floor(exported):
    from drip.detectors.models import load_model

    model = load_model(exported).model.train()
    rpn_floor = model.rpn.score_thresh
    with evaluate.evaluation_mode(model, image_size=96):
        assert model.roi_heads.score_thresh == evaluate.EVAL_SCORE_FLOOR
        assert model.rpn.score_thresh == rpn_floor and not model.training
        assert model.transform.max_size == 96
    assert model.roi_heads.score_thresh == 0.05 and model.training
    assert (model.transform.min_size, model.transform.max_size) == ((128,), 128)


# -- drip evaluate --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random-init detector exported as training exports it, in a folder with a space."""
    from drip.detectors import models

    torch.manual_seed(0)
    network = "fasterrcnn_mobilenet_v3_large_320_fpn"
    model = models.build_model(network, num_classes=4, weights="none", image_size=128)
    path = tmp_path_factory.mktemp("models") / "my model" / "model.pt"
    models.export_model(path, model, network, ["circle", "square", "triangle"], 128, {}, {})
    return path


def test_drip_evaluate_writes_the_metrics_json(tmp_path, exported, capsys):
    from drip.cli import main
    from drip.data.synthetic import make_dataset, write_drip_json

    images = tmp_path / "my images"
    annotations = make_dataset(images, 4, seed=2)
    meta = tmp_path / "test set.json"
    write_drip_json(meta, annotations)
    (images / "set_a" / "img_0000.jpg").write_bytes(b"broken")  # reported, the rest scored
    output = tmp_path / "out" / "metrics.json"
    argv = [
        "evaluate", "--model", str(exported), "--images_path", str(images), "--src_json_path", str(meta),
        "--results_path", str(output.parent), "--device", "cpu", "--batch_size", "2",
    ]
    assert main(argv) == 0
    report = json.loads(output.read_text())
    metrics = report["metrics"]
    assert set(evaluate.STAT_NAMES) <= set(metrics)
    assert all(v is None or 0.0 <= v <= 1.0 for v in (metrics[k] for k in evaluate.STAT_NAMES))
    assert set(metrics["per_class_ap"]) == {"circle", "square", "triangle"}
    assert set(metrics["pr_curves"]["precision"]) == {"circle", "square", "triangle"}
    assert metrics["images"] == 3 and report["skipped"][0]["image"] == "set_a/img_0000.jpg"
    assert report["model"] == str(exported) and report["image_size"] == 128
    err = capsys.readouterr().err
    assert "AP50" in err and "circle" in err

    # Again: the first file goes to the trash, not overwritten.
    assert main(argv) == 0
    assert len(list((tmp_path / "out" / "trash").glob("*/metrics.json"))) == 1


def test_drip_evaluate_refuses_classes_the_model_does_not_know(tmp_path, exported, capsys):
    from drip.cli import main
    from drip.data.synthetic import make_dataset, write_drip_json

    images = tmp_path / "images"
    meta = tmp_path / "a.json"
    write_drip_json(meta, make_dataset(images, 2, classes=("hexagon",), seed=1))
    code = main(["evaluate", "--model", str(exported), "--images_path", str(images), "--src_json_path", str(meta),
                 "--output", str(tmp_path / "m.json"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "'hexagon'" in err and "'triangle'" in err
    assert not (tmp_path / "m.json").exists()


def test_an_image_listed_twice_is_scored_once_with_both_lists():
    from drip.data.dataset import Annotations
    from drip.data.dataset import ImageAnnotation

    annotations = Annotations(
        [ImageAnnotation("a.jpg", boxes=[[0, 0, 10, 10]], labels=["cat"]),
         ImageAnnotation("a.jpg", boxes=[[20, 20, 40, 60], [60, 0, 80, 5]], labels=["dog", "dog"])],
        ["cat", "dog"], "drip",
    )
    scoring = evaluate.Scoring(annotations, CLASSES, "x.json")
    # Ground truth is clipped to the 50x50 image (40x60 -> 40x50); a box wholly outside is dropped.
    found = np.array([[0, 0, 10, 10], [20, 20, 40, 50]])
    scoring.add("a.jpg", (50, 50), ImageDetections("a.jpg", found, np.array([0.9, 0.8]), np.array([1, 2])))
    metrics = scoring.metrics()
    assert (metrics.images, metrics.objects, scoring.dropped_boxes) == (1, 2, 1)
    assert metrics.AP == pytest.approx(1.0)
    assert [len(image.boxes) for image in annotations.images] == [1, 2]  # the caller's lists untouched
    assert scoring.missing() == [] and scoring.coco_results() is None  # not COCO: no results file


def test_found_at_threshold_counts_what_the_drawn_results_show():
    truths = [
        ImageTruth("two", 100, 100, [[0, 0, 40, 40], [50, 50, 90, 90]], [1, 2]),
        ImageTruth("one", 100, 100, [[10, 10, 50, 50]], [1]),
        ImageTruth("none found", 100, 100, [[10, 10, 50, 50]], [2]),
        ImageTruth("empty", 100, 100, [], []),
    ]
    dets = [
        # Both objects found; a second box on the first object is a false box (a duplicate), and
        # a box under the threshold is not drawn, so not counted.
        ImageDetections("two", np.array([[1, 1, 40, 40], [50, 50, 90, 90], [0, 0, 41, 41], [60, 0, 99, 30]], float),
                        np.array([0.9, 0.8, 0.7, 0.2]), np.array([1, 2, 1, 1])),
        # The right place but the wrong class: missed, and a false box.
        ImageDetections("one", np.array([[10, 10, 50, 50]], float), np.array([0.9]), np.array([2])),
        # The right class but IoU 0.25 (the box is twice as wide and twice as tall): missed.
        ImageDetections("none found", np.array([[10, 10, 90, 90]], float), np.array([0.9]), np.array([2])),
        # An image without objects: its box is false; and it counts as complete.
        ImageDetections("empty", np.array([[0, 0, 10, 10]], float), np.array([0.6]), np.array([1])),
    ]
    found = evaluate.found_at_threshold(truths, dets, 0.5)
    assert found.to_json() == {"threshold": 0.5, "images": 4, "complete_images": 2, "objects": 4,
                               "found_objects": 2, "false_boxes": 4}
    assert found.line() == "at score >= 0.50: every object found in 2 of 4 images (2 of 4 objects), 4 false boxes"
    # Lower, the box at 0.2 is drawn too; higher, only the 0.9 boxes are.
    assert evaluate.found_at_threshold(truths, dets, 0.1).false_boxes == 5
    high = evaluate.found_at_threshold(truths, dets, 0.85)
    assert (high.complete_images, high.found_objects, high.false_boxes) == (1, 1, 2)
    # An image missing from the detections has found nothing.
    assert evaluate.found_at_threshold(truths[:2], dets[1:2], 0.5).complete_images == 0
