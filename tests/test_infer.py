"""drip.stages.infer: results per group, boxes in original pixels, nothing overwritten.

Most tests run the stage's real file handling and post-processing on detectors whose output is
known (``ScriptedDetector``, ``BrightSpotDetector``); one runs a real exported torchvision model
through ``infer.run`` end to end.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from drip.config import InferConfig
from drip.errors import ConfigError, InputError, ModelError, SessionError
from drip.stages import infer
from drip.data.synthetic import draw_scene

NAMES = ["circle", "square", "triangle"]


# -- detectors with known output ------------------------------------------------------------
class ScriptedDetector(torch.nn.Module):
    """Emits the same detections for every image, given as fractions of the input it receives.

    The fractions make the expected boxes in the *resized* input exact, so the test checks our
    scaling back to original pixels, not the network. It records the input shapes it saw.
    """

    def __init__(self, rel_boxes, scores, labels):
        super().__init__()
        self.rel_boxes = torch.tensor(rel_boxes, dtype=torch.float32).reshape(-1, 4)
        self.scores = torch.tensor(scores, dtype=torch.float32)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, images):
        outputs = []
        for image in images:
            self.seen.append(tuple(image.shape))
            h, w = image.shape[-2:]
            boxes = self.rel_boxes * torch.tensor([w, h, w, h], dtype=torch.float32)
            outputs.append({"boxes": boxes, "scores": self.scores.clone(), "labels": self.labels.clone()})
        return outputs


class BrightSpotDetector(torch.nn.Module):
    """Finds the box around the white pixels of each input (label 1, score 0.95)."""

    def forward(self, images):
        outputs = []
        for image in images:
            ys, xs = torch.nonzero(image.min(dim=0).values > 0.5, as_tuple=True)
            if len(xs) == 0:
                boxes = torch.zeros((0, 4))
            else:
                boxes = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            n = len(boxes)
            outputs.append({"boxes": boxes, "scores": torch.full((n,), 0.95), "labels": torch.ones(n, dtype=torch.int64)})
        return outputs


def loaded(model, image_size=128):
    return SimpleNamespace(model=model, classes=tuple(NAMES), image_size=image_size, network="scripted", meta={})


def cfg(images, results, **values):
    return InferConfig().updated(
        {"images_path": str(images), "results_path": str(results), "device": "cpu", **values}, "test"
    )


def write_scene(path: Path, size=(160, 120), seed=0, fmt=None):
    img, _, _ = draw_scene(np.random.default_rng(seed), *size)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def folders(tmp_path):
    """A folder of folders with spaces and non-ASCII names, a nested folder and loose images."""
    images = tmp_path / "my images"
    write_scene(images / "cam 1" / "a.jpg", seed=1)
    write_scene(images / "cam 1" / "b.png", size=(90, 200), seed=2)
    write_scene(images / "Café ü" / "day 2" / "c.jpg", seed=3)
    write_scene(images / "loose.jpg", seed=4)
    (images / "cam 1" / "notes.txt").write_text("not an image")
    (images / "cam 1" / ".hidden.jpg").write_bytes(b"macOS resource fork junk")
    return images


# -- post-processing ------------------------------------------------------------------------
def test_boxes_are_scaled_back_to_original_pixels_and_threshold_is_inclusive(tmp_path):
    images = tmp_path / "in"
    write_scene(images / "g" / "wide.jpg", size=(400, 200))
    detector = ScriptedDetector(
        rel_boxes=[
            [0.1, 0.1, 0.5, 0.5],  # inside the image
            [0.6, 0.2, 1.3, 1.2],  # runs off the right and bottom edges: clipped
            [0.0, 0.0, 0.2, 0.2],  # just below the threshold: dropped
            [1.1, 0.1, 1.5, 0.5],  # wholly outside the image: dropped
        ],
        scores=[0.9, 0.7, 0.6999, 0.99],
        labels=[1, 2, 3, 3],
    )
    result = infer.run_loaded(cfg(images, tmp_path / "out", threshold=70), loaded(detector, 100), Path("m.pt"))

    # The longer side is resized to the image size before the forward pass.
    assert detector.seen == [(3, 50, 100)]
    record = read(tmp_path / "out" / "g" / "wide.json")
    assert record["image"] == "g/wide.jpg"
    assert (record["width"], record["height"]) == (400, 200)
    dets = record["detections"]
    assert [d["label"] for d in dets] == ["circle", "square"]
    assert [d["class_id"] for d in dets] == [1, 2]
    assert [d["score"] for d in dets] == [0.9, 0.7]
    assert dets[0]["box"] == pytest.approx([40, 20, 200, 100], abs=0.01)
    assert dets[0]["box_normalized"] == pytest.approx([0.1, 0.1, 0.5, 0.5], abs=1e-5)
    assert dets[1]["box"] == pytest.approx([240, 40, 400, 200], abs=0.01)
    assert dets[1]["box_normalized"] == pytest.approx([0.6, 0.2, 1.0, 1.0], abs=1e-5)
    assert (result.images, result.detections, result.failed) == (1, 2, 0)


def test_threshold_zero_keeps_everything_inside_and_100_keeps_only_perfect_scores():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    scores = torch.tensor([0.0, 0.5, 1.0])
    labels = torch.tensor([1, 2, 9])
    every = infer.to_detections(boxes, scores, labels, size=(20, 20), resized=(10, 10), threshold=0, names=NAMES)
    assert [d["score"] for d in every] == [1.0, 0.5, 0.0]  # best first
    assert every[0]["label"] == "class_9"  # an id the label map lacks still gets a name
    assert every[0]["box"] == [0, 0, 20, 20]
    perfect = infer.to_detections(boxes, scores, labels, size=(20, 20), resized=(10, 10), threshold=100, names=NAMES)
    assert [d["score"] for d in perfect] == [1.0]


def test_exif_rotated_image_gets_boxes_in_display_orientation(tmp_path):
    images = tmp_path / "in"
    stored = np.zeros((150, 300, 3), dtype=np.uint8)  # stored landscape, 300x150
    stored[15:45, 30:90] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": shown as portrait 150x300
    (images / "phone").mkdir(parents=True)
    Image.fromarray(stored).save(images / "phone" / "rotated.jpg", quality=100, exif=exif)

    infer.run_loaded(cfg(images, tmp_path / "out"), loaded(BrightSpotDetector(), 300), Path("m.pt"))

    record = read(tmp_path / "out" / "phone" / "rotated.json")
    assert (record["width"], record["height"]) == (150, 300)
    # Stored x 30..90, y 15..45 turned clockwise: x = 150 - y, y = x.
    assert record["detections"][0]["box"] == pytest.approx([105, 30, 135, 90], abs=1.5)
    drawn = Image.open(tmp_path / "out" / "phone" / "rotated.jpg")
    assert drawn.size == (150, 300)


# -- folders, files and JSON ------------------------------------------------------------------
def test_folder_of_folders_gives_one_results_folder_per_group(folders, tmp_path):
    results = tmp_path / "my results"
    detector = ScriptedDetector([[0.25, 0.25, 0.75, 0.75]], [0.8], [3])
    result = infer.run_loaded(cfg(folders, results), loaded(detector), Path("some model.pt"))

    assert set(result.groups) == {"cam 1", "Café ü", "my images"}
    assert result.groups["Café ü"] == results / "Café ü"
    assert (result.images, result.detections, result.failed) == (4, 4, 0)
    expected = {
        "cam 1": {"a": "cam 1/a.jpg", "b": "cam 1/b.png"},
        "Café ü": {"day 2/c": "Café ü/day 2/c.jpg"},
        "my images": {"loose": "loose.jpg"},
    }
    for group, stems in expected.items():
        index = read(results / group / "detections.json")
        assert index["group"] == group
        assert index["threshold"] == 60.0
        assert index["model"] == "some model.pt"
        assert index["errors"] == []
        assert index["counts"] == {"images": len(stems), "detections": len(stems), "errors": 0, "per_class": {"triangle": len(stems)}}
        assert [entry["image"] for entry in index["images"]] == list(stems.values())
        for stem, image in stems.items():
            record = read(results / group / f"{stem}.json")
            assert record["image"] == image
            assert set(record) == {"image", "width", "height", "detections"}
            original = Image.open(folders / image)
            assert (record["width"], record["height"]) == original.size
            det = record["detections"][0]
            assert set(det) == {"class_id", "label", "score", "box", "box_normalized"}
            assert (det["class_id"], det["label"], det["score"]) == (3, "triangle", 0.8)
            w, h = original.size
            assert det["box"] == pytest.approx([w / 4, h / 4, 3 * w / 4, 3 * h / 4], abs=0.6)
            assert {k: v for k, v in index["images"][list(stems).index(stem)].items() if k in record} == record
            with Image.open(results / group / f"{stem}.jpg") as drawn:
                drawn.load()  # decodes: a real JPEG, not a stub
                assert drawn.format == "JPEG" and drawn.size == original.size
    # Hidden files and non-images are not inputs; nothing else was written.
    assert not list(results.rglob("*hidden*")) and not list(results.rglob("notes*"))


def test_drawn_image_shows_the_box(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    Image.new("RGB", (200, 100), (0, 0, 0)).save(images / "black.png")
    detector = ScriptedDetector([[0.25, 0.2, 0.75, 0.8]], [0.9], [1])
    infer.run_loaded(cfg(images, tmp_path / "out"), loaded(detector), Path("m.pt"))
    drawn = np.asarray(Image.open(tmp_path / "out" / "in" / "black.jpg"))
    assert drawn[50, 50].max() > 100  # the left edge of the box at x=50 is coloured
    assert drawn[50, 100].max() < 30  # the middle of the box stays as it was


def test_same_stem_different_extension_keeps_both(tmp_path):
    images = tmp_path / "in"
    write_scene(images / "g" / "a.jpg", seed=1)
    write_scene(images / "g" / "a.png", size=(64, 48), seed=2)
    write_scene(images / "g" / "detections.jpg", seed=3)  # must not replace the group's index
    infer.run_loaded(cfg(images, tmp_path / "out"), loaded(ScriptedDetector([[0, 0, 1, 1]], [0.9], [1])), Path("m.pt"))
    out = tmp_path / "out" / "g"
    assert read(out / "a.json")["image"] == "g/a.jpg"
    assert read(out / "a.png.json")["image"] == "g/a.png"
    assert read(out / "a.png.json")["width"] == 64
    assert read(out / "detections.jpg.json")["image"] == "g/detections.jpg"
    assert {p.name for p in out.iterdir()} == {
        "a.json", "a.jpg", "a.png.json", "a.png.jpg", "detections.jpg.json", "detections.jpg.jpg", "detections.json",
    }
    assert [e["result"] for e in read(out / "detections.json")["images"]] == ["a.json", "a.png.json", "detections.jpg.json"]


def test_second_run_moves_earlier_results_to_trash(folders, tmp_path):
    results = tmp_path / "results"
    first = infer.run_loaded(cfg(folders, results), loaded(ScriptedDetector([[0, 0, 1, 1]], [0.9], [1])), Path("m.pt"))
    before = {p.relative_to(results).as_posix(): p.read_bytes() for p in results.rglob("*") if p.is_file()}
    (results / "other").mkdir()  # a folder this run does not write stays where it is

    second = infer.run_loaded(cfg(folders, results), loaded(ScriptedDetector([[0, 0, 1, 1]], [0.95], [2])), Path("m.pt"))

    assert set(first.groups) == set(second.groups)
    (stamp,) = list((results / "trash").iterdir())
    kept = {p.relative_to(stamp).as_posix(): p.read_bytes() for p in stamp.rglob("*") if p.is_file()}
    assert kept == before  # every earlier file, byte for byte
    assert (results / "other").is_dir()
    assert read(results / "cam 1" / "a.json")["detections"][0]["label"] == "square"

    infer.run_loaded(cfg(folders, results), loaded(ScriptedDetector([[0, 0, 1, 1]], [0.95], [2])), Path("m.pt"))
    assert len(list((results / "trash").iterdir())) == 2  # runs in the same second do not mix


def test_broken_image_is_reported_and_the_rest_processed(folders, tmp_path):
    (folders / "cam 1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (folders / "cam 1" / "empty.png").write_bytes(b"")
    results = tmp_path / "out"
    result = infer.run_loaded(cfg(folders, results, batch_size=2), loaded(ScriptedDetector([[0, 0, 1, 1]], [0.9], [1])), Path("m.pt"))

    assert (result.images, result.failed) == (4, 2)
    index = read(results / "cam 1" / "detections.json")
    assert [e["image"] for e in index["errors"]] == ["cam 1/broken.jpg", "cam 1/empty.png"]
    assert all("broken.jpg" in e["error"] or "empty.png" in e["error"] for e in index["errors"])
    assert index["counts"]["images"] == 2 and index["counts"]["errors"] == 2
    assert (results / "cam 1" / "a.json").exists() and (results / "cam 1" / "b.json").exists()
    assert not (results / "cam 1" / "broken.json").exists()


# -- user mistakes ----------------------------------------------------------------------------
def test_no_images_is_an_error_naming_the_folder_and_extensions(tmp_path):
    empty = tmp_path / "nothing here"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(InputError, match=r"nothing here.*\.jpg"):
        infer.find_images(empty, tmp_path / "out")
    with pytest.raises(InputError, match="does not exist"):
        infer.find_images(tmp_path / "missing", tmp_path / "out")


def test_group_named_trash_or_images_inside_results_is_refused(tmp_path):
    write_scene(tmp_path / "in" / "Trash" / "a.jpg")
    with pytest.raises(InputError, match="rename the folder"):
        infer.find_images(tmp_path / "in", tmp_path / "out")
    write_scene(tmp_path / "out" / "g" / "a.jpg")
    with pytest.raises(InputError, match="inside --results_path"):
        infer.find_images(tmp_path / "out" / "g", tmp_path / "out")


def test_results_folder_inside_images_folder_is_not_read_back(tmp_path):
    images = tmp_path / "files"
    write_scene(images / "cam" / "a.jpg")
    detector = ScriptedDetector([[0, 0, 1, 1]], [0.9], [1])
    infer.run_loaded(cfg(images, images / "results"), loaded(detector), Path("m.pt"))
    groups = infer.find_images(images, images / "results")
    assert list(groups) == ["cam"]


def test_loose_images_clashing_with_a_subfolder_of_the_same_name(tmp_path):
    write_scene(tmp_path / "photos" / "loose.jpg")
    write_scene(tmp_path / "photos" / "photos" / "inner.jpg")
    with pytest.raises(InputError, match="move the loose images"):
        infer.find_images(tmp_path / "photos", tmp_path / "out")


def test_model_path_resolution(tmp_path):
    session = tmp_path / "my session"
    with pytest.raises(SessionError, match="train first.*--model"):
        infer.resolve_model_path(None, session)
    with pytest.raises(ModelError, match="no such file"):
        infer.resolve_model_path(str(tmp_path / "nope.pt"), session)
    (session / "dl").mkdir(parents=True)
    with pytest.raises(ModelError, match="neither model.pt"):
        infer.resolve_model_path(str(session), session)
    model = session / "dl" / "model.pt"
    model.write_bytes(b"x")
    assert infer.resolve_model_path(None, session) == model
    assert infer.resolve_model_path(str(session), tmp_path) == model
    assert infer.resolve_model_path(str(session / "dl"), tmp_path) == model
    assert infer.resolve_model_path(str(model), tmp_path) == model


def test_run_without_a_model_says_to_train_first(folders, tmp_path):
    with pytest.raises(SessionError, match="train first"):
        infer.run(cfg(folders, tmp_path / "out"), tmp_path / "pipeline")
    assert not (tmp_path / "out").exists()


def test_infer_config_is_checked_like_config():
    config = InferConfig()
    assert (config.threshold, config.batch_size, config.model, config.image_size) == (60.0, 4, None, None)
    assert config.updated({"threshold": "75", "image_size": "256"}, "cli").image_size == 256
    with pytest.raises(ConfigError, match="did you mean 'threshold'"):
        config.updated({"treshold": 5}, "cli")
    with pytest.raises(ConfigError, match="out of range"):
        config.updated({"threshold": 101}, "cli")
    assert all(f.metadata["help"] for f in InferConfig.fields().values())


# -- a real exported model, end to end --------------------------------------------------------
@pytest.fixture
def exported_model(tmp_path):
    """A random-init torchvision detector exported the way training exports it."""
    from drip.detectors import models

    torch.manual_seed(0)
    model = models.build_model(
        "fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=len(NAMES) + 1, weights="none", image_size=128
    )
    session = tmp_path / "my session"
    path = session / "dl" / "model.pt"
    path.parent.mkdir(parents=True)
    models.export_model(path, model, "fasterrcnn_mobilenet_v3_large_320_fpn", NAMES, 128, {}, {})
    return session


def test_run_with_an_exported_model(folders, exported_model, tmp_path):
    results = tmp_path / "my results"
    # Threshold 0 keeps whatever the random model proposes, so the drawn path gets exercised too.
    config = cfg(folders, results, threshold=0, batch_size=3)
    result = infer.run(config, exported_model)

    assert result.images == 4 and result.failed == 0
    assert set(result.groups) == {"cam 1", "Café ü", "my images"}
    total = 0
    for group, out in result.groups.items():
        index = read(out / "detections.json")
        assert index["model"] == str(exported_model / "dl" / "model.pt")
        assert index["classes"] == NAMES and index["image_size"] == 128
        for entry in index["images"]:
            record = read(out / entry["result"])
            assert record == {k: entry[k] for k in record}
            for det in record["detections"]:
                assert 1 <= det["class_id"] <= 3 and det["label"] == NAMES[det["class_id"] - 1]
                x0, y0, x1, y1 = det["box"]
                assert 0 <= x0 < x1 <= record["width"] and 0 <= y0 < y1 <= record["height"]
                assert 0 <= det["score"] <= 1
            total += len(record["detections"])
            with Image.open(out / entry["drawn"]) as drawn:
                drawn.load()
    assert total == result.detections and total > 0, "nothing detected: the checks above checked nothing"

    # The session folder given as --model finds the same model.
    again = infer.run(cfg(folders, results, model=str(exported_model)), tmp_path / "elsewhere")
    assert again.images == 4
    assert (results / "trash").is_dir()


def test_image_size_override_reaches_a_torchvision_detector(tmp_path):
    import torchvision

    images = tmp_path / "in"
    write_scene(images / "g" / "a.jpg", size=(160, 120))
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=128, max_size=128
    )
    seen = []
    model.backbone.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    infer.run_loaded(cfg(images, tmp_path / "out", image_size=96), loaded(model, 128), Path("m.pt"))
    # 160x120 -> 96x72, padded to multiples of 32; left to its own transform the detector would
    # have scaled it back up to 128x96.
    assert seen == [(1, 3, 96, 96)]


# -- scoring against annotations (--src_json_path) --------------------------------------------
def test_coco_annotations_give_metrics_and_coco_results(tmp_path):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = tmp_path / "in"
    for name in ("a.jpg", "b.jpg"):
        write_scene(images / "g" / name, size=(400, 200))
    detector = ScriptedDetector(
        rel_boxes=[[0.1, 0.1, 0.5, 0.5], [0.6, 0.2, 0.9, 0.9], [0.0, 0.0, 0.05, 0.05]],
        scores=[0.9, 0.3, 0.2],  # the square is below --threshold; the triangle is no COCO category
        labels=[1, 2, 3],
    )
    # Category ids out of order and with gaps, names in another order than the model's classes.
    coco = {
        "categories": [{"id": 9, "name": "square"}, {"id": 4, "name": "circle"}],
        "images": [
            {"id": 11, "file_name": "g/a.jpg", "width": 400, "height": 200},
            {"id": 12, "file_name": "g/b.jpg", "width": 400, "height": 200},
            {"id": 13, "file_name": "g/gone.jpg", "width": 400, "height": 200},
        ],
        "annotations": [
            {"id": n + 1, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0}
            for n, (image_id, cat, bbox) in enumerate(
                [(11, 4, [40, 20, 160, 80]), (11, 9, [240, 40, 120, 140]), (12, 4, [40, 20, 160, 80])]
            )
        ],
    }
    gt_path = tmp_path / "coco gt.json"
    gt_path.write_text(json.dumps(coco))
    results = tmp_path / "out"
    result = infer.run_loaded(
        cfg(images, results, threshold=50, src_json_path=str(gt_path)), loaded(detector, 100), Path("m.pt")
    )

    # --threshold still decides what each image's JSON lists.
    assert [d["label"] for d in read(results / "g" / "a.json")["detections"]] == ["circle"]
    rows = read(results / "coco_results.json")
    assert all(set(row) == {"image_id", "category_id", "bbox", "score"} for row in rows)
    assert sorted((r["image_id"], r["category_id"]) for r in rows) == [(11, 4), (11, 9), (12, 4), (12, 9)]
    circle = next(r for r in rows if (r["image_id"], r["category_id"]) == (11, 4))
    assert circle["bbox"] == pytest.approx([40, 20, 160, 80]) and circle["score"] == pytest.approx(0.9)

    # metrics.json holds what pycocotools makes of coco_results.json against the user's file.
    report = read(results / "metrics.json")
    assert report["not_scored"] == ["g/gone.jpg"] and report["annotation_format"] == "coco"
    # What the drawn results show at --threshold 50: the square (0.3) is not drawn, so only b.jpg
    # (a circle alone) has every object found; the triangle box (0.2) is not drawn either.
    assert report["at_threshold"] == {"threshold": 0.5, "images": 2, "complete_images": 1, "objects": 3,
                                      "found_objects": 2, "false_boxes": 0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(results / "coco_results.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
    ours = [-1.0 if report["metrics"][k] is None else report["metrics"][k] for k in names]
    assert ours == pytest.approx(list(ev.stats), abs=1e-12)
    assert result.metrics.AP == pytest.approx(1.0)
    assert report["metrics"]["per_class_ap"] == {"circle": pytest.approx(1.0), "square": pytest.approx(1.0), "triangle": None}

    # A later run without annotations moves the now stale scores to the trash with the groups.
    infer.run_loaded(cfg(images, results), loaded(ScriptedDetector([], [], []), 100), Path("m.pt"))
    assert not (results / "metrics.json").exists() and not (results / "coco_results.json").exists()
    assert len(list((results / "trash").glob("*/metrics.json"))) == 1


def test_annotation_classes_unknown_to_the_model_are_refused(tmp_path):
    images = tmp_path / "in"
    write_scene(images / "g" / "a.jpg")
    meta = tmp_path / "a.json"
    meta.write_text(json.dumps({"images": [{"file": "g/a.jpg", "objects": [{"label": "zebra", "box": [1, 1, 9, 9]}]}]}))
    with pytest.raises(InputError, match="'zebra' not known to the model, which detects 'circle'"):
        infer.run_loaded(cfg(images, tmp_path / "out", src_json_path=str(meta)), loaded(ScriptedDetector([], [], [])), Path("m.pt"))
    assert not (tmp_path / "out").exists()
