"""Tiling: the grid covers the image with overlap, cut boxes follow the visibility rule, empty
tiles are few, sliced prediction maps boxes back and a seam object comes out as one box."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from drip.data import tiling
from drip.errors import ConfigError

FAST = settings(
    max_examples=int(os.environ.get("DRIP_PROPERTY_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

lengths = st.integers(min_value=1, max_value=6000)
tiles = st.integers(min_value=tiling.MIN_TILE_SIZE * 4, max_value=2048)
overlaps = st.floats(min_value=0.0, max_value=0.95, allow_nan=False)


@FAST
@given(width=lengths, height=lengths, tile=tiles, overlap=overlaps)
def test_grid_covers_the_image_with_whole_overlapping_tiles(width, height, tile, overlap):
    grid = tiling.tile_grid(width, height, tile, overlap)
    for x0, y0, x1, y1 in grid:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        # Whole tiles wherever the image is large enough for one.
        assert x1 - x0 == min(tile, width) and y1 - y0 == min(tile, height)
    for length in (width, height):
        starts = tiling.axis_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, length) == length  # both edges covered
        want = int(round(tile * overlap))
        for a, b in zip(starts, starts[1:]):
            assert a < b
            assert a + tile - b >= min(want, tile - 1)  # neighbours overlap by at least the overlap
    assert len(grid) == len(tiling.axis_starts(width, tile, overlap)) * len(tiling.axis_starts(height, tile, overlap))


@FAST
@given(length=st.integers(min_value=100, max_value=5000), tile=st.integers(32, 512),
       overlap=st.floats(0.05, 0.6), data=st.data())
def test_an_object_no_larger_than_the_overlap_is_whole_in_some_tile(length, tile, overlap, data):
    size = int(round(tile * overlap))
    if size < 1 or length < tile:
        return
    start = data.draw(st.integers(0, length - size))
    starts = tiling.axis_starts(length, tile, overlap)
    assert any(s <= start and start + size <= s + tile for s in starts)


@st.composite
def box_and_window(draw):
    x0 = draw(st.floats(-50, 500))
    y0 = draw(st.floats(-50, 500))
    w = draw(st.floats(0.01, 300))
    h = draw(st.floats(0.01, 300))
    wx = draw(st.integers(0, 400))
    wy = draw(st.integers(0, 400))
    size = draw(st.integers(32, 300))
    return [x0, y0, x0 + w, y0 + h], (wx, wy, wx + size, wy + size)


@FAST
@given(case=box_and_window(), min_visible=st.floats(0.0, 1.0))
def test_clipping_keeps_a_box_exactly_when_enough_of_it_is_visible(case, min_visible):
    box, window = case
    kept, index, dropped = tiling.clip_to_tile(np.array([box]), window, min_visible)
    x0, y0, x1, y1 = window
    ix = max(0.0, min(box[2], x1) - max(box[0], x0))
    iy = max(0.0, min(box[3], y1) - max(box[1], y0))
    fraction = ix * iy / ((box[2] - box[0]) * (box[3] - box[1]))
    if ix * iy <= 0:
        assert len(index) == 0 and dropped == 0  # outside: neither kept nor a fragment
    elif fraction >= min_visible + 1e-6:
        assert index.tolist() == [0] and dropped == 0
        bx = kept[0]
        # In the tile's own pixels, inside the tile, with a positive size.
        assert 0 <= bx[0] < bx[2] <= x1 - x0 and 0 <= bx[1] < bx[3] <= y1 - y0
        assert np.allclose(bx + [x0, y0, x0, y0], [max(box[0], x0), max(box[1], y0), min(box[2], x1), min(box[3], y1)])
    elif fraction < min_visible - 1e-6:
        assert len(index) == 0 and dropped == 1


def test_half_visible_is_kept_and_a_sliver_is_dropped():
    window = (0, 0, 100, 100)
    boxes = np.array([[80, 10, 120, 30], [95, 50, 135, 70], [10, 10, 20, 20], [200, 200, 210, 210]], float)
    kept, index, dropped = tiling.clip_to_tile(boxes, window)
    assert index.tolist() == [0, 2] and dropped == 1
    assert kept[0].tolist() == [80, 10, 100, 30]


def test_a_large_sparse_image_gives_few_empty_tiles():
    # A 6000 px image with 20 small objects: a few dozen tiles with objects (an object in an
    # overlap is on two or four), and a tenth as many empty ones, not a hundred.
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 5970, size=(20, 2))
    boxes = np.concatenate([xy, xy + 30], axis=1)
    cut = tiling.pick_tiles(6000, 6000, boxes, 640, 0.2, np.random.default_rng(1))
    assert cut.grid == 144
    assert 20 <= cut.with_objects <= 80 and cut.background == -(-cut.with_objects // 10) <= 8
    assert len(cut.tiles) == cut.with_objects + cut.background
    assert not cut.lost
    # Every object is whole (or at least half visible) on some tile used.
    covered = {int(i) for t in cut.tiles for i in t.indices}
    assert covered == set(range(20))
    # The draw is seeded: the same seed picks the same background.
    again = tiling.pick_tiles(6000, 6000, boxes, 640, 0.2, np.random.default_rng(1))
    assert [t.window for t in again.tiles] == [t.window for t in cut.tiles]


def test_an_object_larger_than_a_tile_is_reported_lost():
    cut = tiling.pick_tiles(1000, 1000, np.array([[0, 0, 900, 900]], float), 200, 0.2, np.random.default_rng(0))
    assert cut.lost == [0]


@pytest.mark.parametrize(
    "tile, overlap, message",
    [(31, 0.2, "at least 32 pixels"), (640, 1.0, "not including 1"), (640, -0.1, "not including 1")],
)
def test_bad_tiling_is_one_line_error(tile, overlap, message):
    with pytest.raises(ConfigError, match=message) as info:
        tiling.check_tiling(tile, overlap)
    assert "\n" not in str(info.value)


def test_merge_keeps_one_box_per_object_and_class():
    boxes = np.array([[0, 0, 30, 30], [0, 0, 18, 30], [0, 0, 30, 30], [100, 100, 130, 130]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    labels = np.array([1, 1, 2, 1])
    keep = tiling.merge(boxes, scores, labels)
    # The fragment (IoU 0.6) goes; the same box of another class and the far box stay.
    assert keep.tolist() == [0, 2, 3]
    assert tiling.merge(np.zeros((0, 4)), np.zeros(0), np.zeros(0)).tolist() == []
    # A box a tile cut loses to the whole one even when it scores higher.
    keep = tiling.merge(boxes[:2], np.array([0.5, 0.9], np.float32), labels[:2], cut=np.array([False, True]))
    assert keep.tolist() == [0]


def _square_finder(image):
    """A stand-in detector: the bounding box of the white pixels it sees, score by its size."""
    array = np.asarray(image)[:, :, 0] > 128
    if not array.any():
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0)
    ys, xs = np.nonzero(array)
    box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return np.array([box], float), np.array([array.sum() / 10000.0]), np.array([1])


def test_a_seam_object_comes_out_as_one_box_in_image_pixels():
    # Tiles of 100 px with 30 px overlap start at 0, 70, 140; the object at x 90..110 lies across
    # the seam of the first two tiles: whole in the second, 10 px of it in the first.
    image = Image.new("RGB", (240, 100))
    image.paste((255, 255, 255), (90, 40, 110, 60))
    calls = []

    def detect(images):
        calls.append(len(images))
        return [_square_finder(im) for im in images]

    boxes, scores, labels = tiling.predict_sliced(image, 100, 0.3, detect, batch_size=2)
    assert calls == [2, 1]  # three tiles, two at a time
    assert boxes.tolist() == [[90, 40, 110, 60]]
    assert labels.tolist() == [1]


def test_small_image_is_predicted_whole_and_full_pass_adds_the_whole_image():
    image = Image.new("RGB", (80, 60))
    image.paste((255, 255, 255), (10, 10, 20, 20))
    seen = []

    def detect(images):
        seen.extend(im.size for im in images)
        return [_square_finder(im) for im in images]

    boxes, _, _ = tiling.predict_sliced(image, 100, 0.2, detect, batch_size=4)
    assert seen == [(80, 60)] and boxes.tolist() == [[10, 10, 20, 20]]
    seen.clear()
    big = Image.new("RGB", (300, 100))
    tiling.predict_sliced(big, 100, 0.2, detect, batch_size=8, full_pass=True)
    assert seen[-1] == (300, 100) and seen[:-1] == [(100, 100)] * (len(seen) - 1)


# -- the split stage with --tile_size ------------------------------------------------------------
@pytest.fixture
def large_dataset(tmp_path):
    """Five 600x450 images with 12 small shapes each, and one small image, in Drip JSON."""
    from drip.data.dataset import ImageAnnotation
    from drip.data.synthetic import draw_sparse_scene, write_drip_json

    root = tmp_path / "big images"
    rng = np.random.default_rng(3)
    annotations = []
    for i in range(5):
        img, boxes, labels = draw_sparse_scene(rng, 600, 450, 12, (14, 22))
        (root / "site").mkdir(parents=True, exist_ok=True)
        img.save(root / "site" / f"ortho_{i}.png")
        annotations.append(ImageAnnotation(f"site/ortho_{i}.png", 600, 450, boxes, labels))
    img, boxes, labels = draw_sparse_scene(rng, 100, 90, 2, (14, 22))
    img.save(root / "small.jpg", quality=95)
    annotations.append(ImageAnnotation("small.jpg", 100, 90, boxes, labels))
    meta = tmp_path / "large.json"
    write_drip_json(meta, annotations)
    return root, meta, annotations


def test_split_cuts_training_images_into_tiles_per_source_image(tmp_path, large_dataset, config):
    from drip.session import Session, read_json
    from drip.stages import augment, records, split

    root, meta, annotations = large_dataset
    session = Session(tmp_path / "pipeline with tiles")
    session.start_new()
    cfg = config.updated(
        {"src_json_path": str(meta), "image_folder_path": str(root), "tile_size": 160, "tile_overlap": 0.25,
         "eval_percentage": 34},
        "test",
    )
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    split.run(session, cfg)
    train = read_json(session.train_manifest)
    evaluation = read_json(session.eval_manifest)
    report = read_json(session.report_path)

    # Eval images stay whole, in the user's folder; train entries are tiles in the session.
    assert evaluation["image_root"] == str(root.resolve())
    assert all(not e["file"].count(".tile_") for e in evaluation["images"])
    assert train["image_root"] == str(session.images_tiled.resolve())
    sources = {e.get("extra", {}).get("source", e["file"]) for e in train["images"]}
    assert sources.isdisjoint({e["file"] for e in evaluation["images"]})  # split per source image
    assert len(sources) + len(evaluation["images"]) == len(annotations)

    tiling_report = report["tiling"]
    assert tiling_report["tile_size"] == 160 and tiling_report["tiles"] == sum(
        1 for e in train["images"] if ".tile_" in e["file"]
    )
    assert tiling_report["background_tiles"] <= -(-tiling_report["tiles_with_objects"] // 10) + tiling_report["images_tiled"]
    for entry in train["images"]:
        path = session.images_tiled / entry["file"]
        with Image.open(path) as im:
            assert im.size == (entry["width"], entry["height"])
            assert max(im.size) <= 160 or ".tile_" not in entry["file"]
        for obj in entry["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= entry["width"] and 0 <= y0 < y1 <= entry["height"]
        if ".tile_" in entry["file"]:
            # The tile's pixels are the source's pixels at its window (JPEG aside).
            wx0, wy0, wx1, wy1 = entry["extra"]["window"]
            with Image.open(root / entry["extra"]["source"]) as src, Image.open(path) as tile:
                diff = np.abs(np.asarray(src.convert("RGB").crop((wx0, wy0, wx1, wy1)), float) - np.asarray(tile, float))
            assert diff.mean() < 4
    # Every training object is whole on some tile: the objects are smaller than the overlap.
    on_tiles = {(e["extra"]["source"], tuple(np.round(np.add(o["box"], e["extra"]["window"][:2] * 2), 2)))
                for e in train["images"] if ".tile_" in e["file"] for o in e["objects"]}
    tiled = {e["extra"]["source"] for e in train["images"] if ".tile_" in e["file"]}
    for a in annotations:
        if a.file in tiled:
            for box in a.boxes:
                assert (a.file, tuple(np.round(box, 2))) in on_tiles
    assert tiling_report["boxes_lost"] == 0

    # Augment and records take the tiles as they take any training images.
    augment.run(session, cfg)
    result = records.run(session, cfg)
    assert result.train == len(train["images"]) * (1 + cfg.augmentations)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # input untouched


def test_images_inside_the_tiles_folder_are_refused_not_deleted(tmp_path, config):
    from drip.errors import InputError
    from drip.data.tiling import tile_training_images

    out = tmp_path / "images_tiled"
    (out / "site").mkdir(parents=True)
    (out / "site" / "mine.png").write_bytes(b"user data")
    with pytest.raises(InputError, match="inside"):
        tile_training_images([], out / "site", out, 64, 0.2, 0, [])
    assert (out / "site" / "mine.png").read_bytes() == b"user data"


def test_tile_larger_than_every_image_keeps_them_whole(tmp_path, large_dataset, config):
    from drip.session import Session, read_json
    from drip.stages import split

    root, meta, annotations = large_dataset
    session = Session(tmp_path / "pipeline")
    session.start_new()
    split.run(session, config.updated({"src_json_path": str(meta), "image_folder_path": str(root), "tile_size": 4000}, "test"))
    train = read_json(session.train_manifest)
    assert not any(".tile_" in e["file"] for e in train["images"])
    assert read_json(session.report_path)["tiling"]["images_whole"] == len(train["images"])


# -- sliced inference ---------------------------------------------------------------------------
def test_infer_slices_by_the_models_tiles_and_maps_boxes_back(tmp_path):
    import json
    from types import SimpleNamespace

    from drip.config import InferConfig
    from drip.stages import infer
    from test_infer import BrightSpotDetector

    class Seen(BrightSpotDetector):
        seen: list = []

        def forward(self, images):
            self.seen.append([tuple(im.shape[-2:]) for im in images])
            return super().forward(images)

    images = tmp_path / "in"
    (images / "g").mkdir(parents=True)
    picture = Image.new("RGB", (240, 100))
    picture.paste((255, 255, 255), (90, 40, 110, 60))  # across the seam of the first two tiles
    picture.save(images / "g" / "wide.png")
    detector = Seen()
    # A model trained on 100 px tiles with 0.3 overlap: slicing is its default.
    loaded = SimpleNamespace(model=detector, classes=("spot",), image_size=100, network="scripted",
                             meta={"config": {"tile_size": 100, "tile_overlap": 0.3}})

    def run(out, **values):
        config = InferConfig().updated(
            {"images_path": str(images), "results_path": str(out), "device": "cpu", "batch_size": 2, **values}, "test"
        )
        detector.seen.clear()
        infer.run_loaded(config, loaded, Path("m.pt"))
        return json.loads((out / "g" / "wide.json").read_text()), json.loads((out / "g" / "detections.json").read_text())

    record, index = run(tmp_path / "sliced")
    assert detector.seen == [[(100, 100), (100, 100)], [(100, 100)]]  # three tiles, two per pass
    assert [d["box"] for d in record["detections"]] == [[90, 40, 110, 60]]  # one box, image pixels
    assert (record["width"], record["height"]) == (240, 100)
    assert index["tiling"] == {"tile_size": 100, "tile_overlap": 0.3, "full_pass": False}
    with Image.open(tmp_path / "sliced" / "g" / "wide.jpg") as drawn:
        assert drawn.size == (240, 100)

    record, index = run(tmp_path / "whole", tile_size=0)
    assert detector.seen == [[(42, 100)]] and index["tiling"] is None  # resized whole: 240 -> 100
    record, index = run(tmp_path / "full", tile_full_pass=True)
    assert detector.seen[-1] == [(42, 100)] and len(record["detections"]) == 1


def test_infer_refuses_a_tile_below_the_minimum(tmp_path):
    from drip.config import InferConfig
    from drip.data.tiling import resolve_slicing

    assert InferConfig().updated({"tile_size": 16}, "test").tile_size == 16  # 1..31 pass the schema
    with pytest.raises(ConfigError, match="at least 32"):
        resolve_slicing(16, None, False, {})
    assert resolve_slicing(None, None, False, {}) is None
    assert resolve_slicing(None, None, False, {"tile_size": 64, "tile_overlap": 0.1}) == tiling.Slicing(64, 0.1)
    assert resolve_slicing(0, None, False, {"config": {"tile_size": 64}}) is None


@pytest.mark.slow  # the ONNX export takes about a minute on 2 cores
def test_onnx_slices_like_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    import json

    from drip.detectors import models
    from drip.deploy import onnx_infer
    from drip.config import InferConfig
    from drip.deploy.export import export
    from drip.stages import infer
    from drip.data.synthetic import draw_scene
    from test_export import CLASSES, NETWORK, SIZE, untrained_but_lively, unmatched

    path = tmp_path / "tiled model" / "model.pt"
    models.export_model(path, untrained_but_lively(NETWORK), NETWORK, list(CLASSES), SIZE,
                        {"tile_size": 96, "tile_overlap": 0.25}, {})
    onnx_path = export(path, "onnx")
    images = tmp_path / "images"
    (images / "g").mkdir(parents=True)
    draw_scene(np.random.default_rng(5), 300, 200)[0].save(images / "g" / "big.jpg")

    def config(out, model):
        return InferConfig().updated(
            {"images_path": str(images), "results_path": str(out), "model": str(model), "device": "cpu",
             "threshold": 20.0, "batch_size": 1},
            "test",
        )

    torch_result = infer.run(config(tmp_path / "torch", path), tmp_path)
    onnx_result = onnx_infer.run(config(tmp_path / "onnx", onnx_path), tmp_path)
    theirs = json.loads((torch_result.groups["g"] / "big.json").read_text())["detections"]
    ours = json.loads((onnx_result.groups["g"] / "big.json").read_text())["detections"]
    index = json.loads((onnx_result.groups["g"] / "detections.json").read_text())
    assert index["tiling"] == {"tile_size": 96, "tile_overlap": 0.25, "full_pass": False}
    assert len(theirs) >= 3
    assert not unmatched(theirs, ours) and not unmatched(ours, theirs)


def test_evaluation_scores_whole_images_after_merging_tiles():
    # What evaluation during training and drip evaluate run: drip.evaluation.metrics.predict with a Slicing.
    from drip.evaluation.metrics import ImageTruth, coco_metrics, predict
    from test_infer import BrightSpotDetector

    picture = Image.new("RGB", (240, 100))
    picture.paste((255, 255, 255), (90, 40, 110, 60))  # across a seam
    found = predict(BrightSpotDetector(), [(7, picture)], image_size=100, batch_size=4,
                    slicing=tiling.Slicing(100, 0.3))
    assert [d.image_id for d in found] == [7]
    assert found[0].boxes.tolist() == [[90, 40, 110, 60]]
    metrics = coco_metrics([ImageTruth(7, 240, 100, [[90, 40, 110, 60]], [1])], found, ["spot"])
    assert metrics.stats()["AP50"] == pytest.approx(1.0)
    # Unsliced, the same detector sees the image shrunk to 100 px and the box comes back scaled.
    whole = predict(BrightSpotDetector(), [(7, picture)], image_size=100, batch_size=4)
    assert whole[0].boxes.shape == (1, 4)


def test_a_tiled_canvas_of_more_than_100_objects_scores_every_one():
    # 144 spots, one per 100 px tile: sliced prediction returns all 144, and the score must count
    # all of them, not pycocotools' default 100 per image (AP would be about 100/144).
    from drip.evaluation.metrics import ImageTruth, coco_metrics, predict
    from test_infer import BrightSpotDetector

    canvas = Image.new("RGB", (1200, 1200))
    boxes = [[x + 40, y + 40, x + 60, y + 60] for y in range(0, 1200, 100) for x in range(0, 1200, 100)]
    for box in boxes:
        canvas.paste((255, 255, 255), box)
    found = predict(BrightSpotDetector(), [(0, canvas)], image_size=100, batch_size=16, slicing=tiling.Slicing(100, 0.0))
    assert len(found[0].boxes) == len(boxes) == 144
    metrics = coco_metrics([ImageTruth(0, 1200, 1200, boxes, [1] * len(boxes))], found, ["spot"])
    assert metrics.AP == pytest.approx(1.0) and metrics.AP50 == pytest.approx(1.0)
    assert metrics.max_detections == 144
