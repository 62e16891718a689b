"""End to end: a 3000 x 3000 canvas with 40 small objects, trained on its tiles and inferred sliced.

The real commands' code paths (``drip.runtime.local.train`` and ``infer``: split into tiles, augment,
records, train, export, sliced inference and the merge) on a made-up orthomosaic: dark ground,
40 bright shapes of 40-56 px. A model trained on 192 px tiles at ``--image_size 192`` finds them
on a canvas it has not seen, in the canvas's own pixels, one box each; the same model run on the
whole canvas at the same ``--image_size`` (objects shrunk to 3-4 px) finds far fewer. Both
counts are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from tiling import write_canvases  # noqa: E402  (bench/tiling.py: the benchmark's canvases)

from drip.runtime import local  # noqa: E402

TILE = 192


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _found(detections: list[dict], truth: list[list[float]]) -> int:
    """Objects matched one to one by a detection at IoU 0.5 or more."""
    left = [d["box"] for d in detections]
    hits = 0
    for box in truth:
        best = max(left, key=lambda d: _iou(d, box), default=None)
        if best is not None and _iou(best, box) >= 0.5:
            left.remove(best)
            hits += 1
    return hits


@pytest.mark.slow
@pytest.mark.timeout(2400)  # about 4 min on 2 quiet cores; 15 min under the load it was written in
def test_tiles_find_small_objects_that_whole_images_lose(tmp_path):
    train_json = write_canvases(tmp_path / "train", ["a"], 3000, 40, seed=1)
    test_json = write_canvases(tmp_path / "test", ["b"], 3000, 40, seed=2)
    truth = json.loads(test_json.read_text())["images"][0]
    truth_boxes = [o["box"] for o in truth["objects"]]
    session = tmp_path / "pipeline"
    local.train(session, {
        "src_json_path": str(train_json), "image_folder_path": str(tmp_path / "train"),
        "network": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none", "image_size": TILE,
        "tile_size": TILE, "tile_overlap": 0.3, "batch_size": 4, "number_of_steps": 300,
        "eval_percentage": 0, "augmentations": 1, "box_batch_size_per_image": 128, "warmup_steps": 20,
        "device": "cpu", "num_workers": 0, "checkpoint_every": 1000, "log_every": 50,
    })
    report = json.loads((session / "dl" / "split" / "report.json").read_text())["tiling"]
    assert report["images_tiled"] == 1 and report["tiles"] < 120  # not the 484 tiles of the grid

    counts = {}
    for name, tile in (("sliced", None), ("whole", 0)):  # the model's tiles by default; 0 = off
        out = tmp_path / f"results {name}"
        local.infer(session, {"images_path": str(tmp_path / "test"), "results_path": str(out), "threshold": 30,
                                 "tile_size": tile, "batch_size": 8, "device": "cpu"})
        record = json.loads((out / "site" / "b.json").read_text())
        assert (record["width"], record["height"]) == (3000, 3000)
        detections = record["detections"]
        counts[name] = (_found(detections, truth_boxes), len(detections))
        if name == "sliced":
            # So few steps leave the classifier unsure (scores near 0.5) and loose extra boxes
            # around objects; none should be far from every object.
            on_objects = sum(any(_iou(d["box"], t) > 0 for t in truth_boxes) for d in detections)
            # One box per object: no two detections of a class overlap as one object's would.
            boxes = [d["box"] for d in detections]
            doubles = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if _iou(a, b) > 0.4]
            assert not doubles
            index = json.loads((out / "site" / "detections.json").read_text())
            assert index["tiling"]["tile_size"] == TILE
    print(f"\nfound (IoU >= 0.5) of {len(truth_boxes)} objects, detections: sliced {counts['sliced']}, "
          f"whole canvas {counts['whole']}")
    found_sliced, n_sliced = counts["sliced"]
    found_whole, _ = counts["whole"]
    assert found_sliced >= 0.6 * len(truth_boxes)  # in the right places of the original canvas
    assert on_objects >= 0.9 * n_sliced  # and on objects, not on bare ground
    assert found_whole <= 0.25 * found_sliced
