"""The split stage on real JPEGs: what it writes, what it refuses, and how it divides the images."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from drip.data.dataset import ImageAnnotation
from drip.errors import InputError
from drip.data.labelmap import LabelMap
from drip.session import Session
from drip.stages import split
from drip.stages.split import _quotas
from drip.data.synthetic import make_dataset, write_drip_json


def _manifest(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _files(path: Path) -> list[str]:
    return [entry["file"] for entry in _manifest(path)["images"]]


def _with(config, **values):
    return config.updated(values, "test")


def _rewrite(dataset, annotations: list[ImageAnnotation]) -> None:
    write_drip_json(dataset["metadata"], annotations)


def _problems(session: Session) -> list[dict]:
    return _manifest(session.report_path)["problems"]


def test_split_writes_manifests_label_map_and_report(dataset, session, config):
    original = dataset["metadata"].read_bytes()
    result = split.run(session, config)

    assert (result.n_train, result.n_eval) == (10, 2)  # round(20% of 12)
    assert (result.images_total, result.images_used, result.problems) == (12, 12, 0)
    first_seen = list(dict.fromkeys(label for a in dataset["annotations"] for label in a.labels))
    assert result.classes == first_seen
    assert LabelMap.read(session.label_map_path).names == tuple(first_seen)

    train, eval_ = _manifest(session.train_manifest), _manifest(session.eval_manifest)
    assert train["image_root"] == str(dataset["images"].resolve())
    assert train["classes"] == eval_["classes"] == first_seen
    assert sorted(_files(session.train_manifest) + _files(session.eval_manifest)) == sorted(a.file for a in dataset["annotations"])
    by_file = {a.file: a for a in dataset["annotations"]}
    for entry in train["images"] + eval_["images"]:
        assert (entry["width"], entry["height"]) == (160, 120)
        assert [o["box"] for o in entry["objects"]] == by_file[entry["file"]].boxes
        # The digest of the bytes decoded: what lets the records stage skip decoding again.
        data = (dataset["images"] / entry["file"]).read_bytes()
        assert entry["extra"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert sum(result.train_objects.values()) + sum(result.eval_objects.values()) == sum(len(a.boxes) for a in dataset["annotations"])

    report = _manifest(session.report_path)
    assert (report["format"], report["images_total"], report["images_used"], report["problems"]) == ("drip", 12, 12, [])
    state = session.read_state()["stages"]["split"]
    assert (state["train"], state["eval"], state["classes"]) == (10, 2, first_seen)
    assert dataset["metadata"].read_bytes() == original  # the user's file is only read


def test_split_is_determined_by_seed_and_data_not_file_order(dataset, tmp_path, config):
    def eval_files(name, cfg):
        session = Session(tmp_path / name)
        session.start_new()
        split.run(session, cfg)
        return _files(session.eval_manifest)

    first = eval_files("a", config)
    assert eval_files("b", config) == first
    _rewrite(dataset, list(reversed(dataset["annotations"])))
    assert sorted(eval_files("c", config)) == sorted(first)
    assert sorted(eval_files("d", _with(config, seed=3))) != sorted(first)


def test_split_is_stratified_so_a_rare_class_reaches_both_halves(tmp_path, session, config):
    root = tmp_path / "many"
    annotations = make_dataset(root, 40, size=(96, 72), seed=5)
    rare = ("star", "moon", "heart", "cross")
    for i, name in enumerate(rare):  # each in just two images: a random split would miss some
        for image in annotations[3 + 5 * i], annotations[22 + 4 * i]:
            image.labels[0] = name
    meta = tmp_path / "many.json"
    write_drip_json(meta, annotations)
    result = split.run(session, _with(config, src_json_path=str(meta), image_folder_path=str(root), eval_percentage=25))

    assert (result.n_train, result.n_eval) == (30, 10)
    for name in ("circle", "square", "triangle") + rare:
        assert result.train_objects[name] > 0 and result.eval_objects[name] > 0, name


@pytest.mark.parametrize("sizes, fraction", [([2, 2, 2, 30], 0.2), ([1] * 9, 0.3), ([2] * 10, 0.1), ([5, 1, 40], 0.5), ([3, 3], 0.99)])
def test_quotas_hit_the_total_and_split_groups_when_they_can(sizes, fraction):
    target = math.floor(fraction * sum(sizes) + 0.5)
    quotas = _quotas(sizes, fraction, target)
    assert sum(quotas) == target
    assert all(0 <= q <= s for q, s in zip(quotas, sizes))
    if sum(1 for s in sizes if s >= 2) <= min(target, sum(sizes) - target):
        # room for every splittable group to give one image to each half
        assert all(0 < q < s for q, s in zip(quotas, sizes) if s >= 2)


def test_zero_eval_percentage_trains_on_everything(session, config):
    result = split.run(session, _with(config, eval_percentage=0))
    assert (result.n_train, result.n_eval) == (12, 0)
    assert _manifest(session.eval_manifest)["images"] == []


@pytest.mark.parametrize(
    "percentage, message",
    [
        (1, r"eval_percentage 1 of 12 usable images leaves no image for evaluation; raise it to at least 4\.17, or set it to 0"),
        (97, r"eval_percentage 97 of 12 usable images leaves no image for training; lower it"),
    ],
)
def test_eval_percentage_that_empties_a_half_is_an_error(session, config, percentage, message):
    with pytest.raises(InputError, match=message):
        split.run(session, _with(config, eval_percentage=percentage))
    assert not session.train_manifest.exists()


def test_class_map_fixes_ids_and_refuses_unknown_labels(dataset, tmp_path, session, config):
    class_map = tmp_path / "class map.pbtxt"
    LabelMap.from_names(["triangle", "hexagon", "square", "circle"]).write(class_map)
    split.run(session, _with(config, class_map_path=str(class_map)))
    assert LabelMap.read(session.label_map_path).names == ("triangle", "hexagon", "square", "circle")

    LabelMap.from_names(["circle", "hexagon"]).write(class_map)
    with pytest.raises(InputError) as caught:
        split.run(session, _with(config, class_map_path=str(class_map)))
    message = str(caught.value)
    assert "labels 'square', 'triangle' are not in the class map" in message
    assert str(class_map) in message and "'circle', 'hexagon'" in message
    assert "\n" not in message


def _break_images(dataset) -> list[str]:
    """Truncate one JPEG, add a text file named .jpg and a file that does not exist."""
    root = dataset["images"]
    truncated = dataset["annotations"][3].file
    data = (root / truncated).read_bytes()
    (root / truncated).write_bytes(data[: len(data) // 2])
    (root / "notes.jpg").write_text("this is not an image\n")
    annotations = dataset["annotations"] + [
        ImageAnnotation(file="notes.jpg", boxes=[[1, 1, 5, 5]], labels=["circle"]),
        ImageAnnotation(file="set_a/gone.jpg", boxes=[[1, 1, 5, 5]], labels=["circle"]),
    ]
    _rewrite(dataset, annotations)
    return [truncated, "notes.jpg", "set_a/gone.jpg"]


def test_bad_images_are_skipped_and_reported(dataset, session, config):
    bad = _break_images(dataset)
    result = split.run(session, config)

    assert (result.images_total, result.images_used) == (14, 11)
    used = _files(session.train_manifest) + _files(session.eval_manifest)
    assert not set(bad) & set(used)
    problems = {p["file"]: p for p in _problems(session)}
    assert set(problems) == set(bad)
    assert all(p["action"] == "image left out" for p in problems.values())
    assert "cannot decode image" in problems[bad[0]]["problem"]
    assert "not an image Pillow can read" in problems["notes.jpg"]["problem"]
    assert "image not found" in problems["set_a/gone.jpg"]["problem"]


def test_bad_images_stop_the_split_when_asked_to(dataset, session, config):
    bad = _break_images(dataset)
    with pytest.raises(InputError) as caught:
        split.run(session, _with(config, on_bad_image="fail"))
    message = str(caught.value)
    assert bad[0] in message and "cannot decode image" in message
    assert "2 more images are unusable too" in message and "on_bad_image: skip" in message
    assert "\n" not in message


def test_boxes_are_clipped_or_dropped_and_reported(dataset, session, config):
    annotations = dataset["annotations"]
    target = annotations[0]
    target.boxes = [
        [150.0, 100.0, 200.0, 140.0],  # partly outside: clipped
        [0.0, 0.0, 160.3, 120.0],  # rounding overshoot: clipped without a note
        [float("nan"), 1.0, 5.0, 5.0],
        [50.0, 50.0, 10.0, 10.0],  # inverted
        [5.0, 5.0, 5.0, 20.0],  # zero width
        [200.0, 200.0, 300.0, 300.0],  # entirely outside
    ]
    target.labels = ["circle"] * 6
    background = annotations[1]
    background.boxes, background.labels = [[1.0, 1.0, 1.0, 1.0]], ["square"]
    _rewrite(dataset, annotations)
    result = split.run(session, _with(config, eval_percentage=0))

    entries = {e["file"]: e for e in _manifest(session.train_manifest)["images"]}
    assert [o["box"] for o in entries[target.file]["objects"]] == [[150, 100, 160, 120], [0, 0, 160, 120]]
    assert entries[background.file]["objects"] == []  # kept as a background image
    assert result.images_used == 12
    problems = [(p["file"], p["action"]) for p in _problems(session)]
    assert problems == [
        (target.file, "clipped to [150, 100, 160, 120]"),
        (target.file, "box dropped"),
        (target.file, "box dropped"),
        (target.file, "box dropped"),
        (target.file, "box dropped"),
        (background.file, "box dropped"),
    ]
    assert "non-finite" in _problems(session)[1]["problem"]
    assert "entirely outside the 160x120 image" in _problems(session)[4]["problem"]


def test_exif_rotated_image_gets_its_display_size(dataset, session, config):
    root = dataset["images"]
    rotated = dataset["annotations"][2]
    with Image.open(root / rotated.file) as img:
        exif = img.getexif()
        exif[0x0112] = 6  # displayed turned 90 degrees clockwise
        img.save(root / rotated.file, exif=exif.tobytes(), quality=92)
    rotated.boxes, rotated.labels = [[10.0, 10.0, 50.0, 50.0]], ["circle"]
    _rewrite(dataset, dataset["annotations"])
    split.run(session, _with(config, eval_percentage=0))

    entry = next(e for e in _manifest(session.train_manifest)["images"] if e["file"] == rotated.file)
    assert (entry["width"], entry["height"]) == (120, 160)
    assert entry["objects"] == [{"label": "circle", "box": [10, 10, 50, 50]}]
    (note,) = _problems(session)
    assert note["file"] == rotated.file
    assert note["problem"] == "annotation says 160x120, the image displays as 120x160"


def test_an_image_annotated_twice_is_an_error(dataset, session, config):
    _rewrite(dataset, dataset["annotations"] + [dataset["annotations"][5]])
    with pytest.raises(InputError, match=rf"image '{dataset['annotations'][5].file}' is annotated 2 times; keep one entry"):
        split.run(session, config)


def test_coco_source_keeps_its_category_ids(dataset, tmp_path, session, config):
    names = {"circle": 1, "square": 5, "triangle": 9, "unused": 12}
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in names.items()]}
    for image_id, ann in enumerate(dataset["annotations"], start=1):
        coco["images"].append({"id": image_id, "file_name": ann.file, "width": 160, "height": 120})
        for (x0, y0, x1, y1), label in zip(ann.boxes, ann.labels):
            coco["annotations"].append(
                {"id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": names[label], "bbox": [x0, y0, x1 - x0, y1 - y0]}
            )
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    result = split.run(session, _with(config, src_json_path=str(path)))

    assert result.classes == ["circle", "square", "triangle"]  # 'unused' has no boxes
    train = _manifest(session.train_manifest)
    assert train["coco_category_ids"] == {"circle": 1, "square": 5, "triangle": 9}
    assert all("coco_image_id" in entry["extra"] for entry in train["images"])
    assert _manifest(session.report_path)["format"] == "coco"


def test_missing_image_folder_or_no_images_is_an_error(dataset, session, config, tmp_path):
    with pytest.raises(InputError, match="image folder not found; check --image_folder_path"):
        split.run(session, _with(config, image_folder_path=str(tmp_path / "nope")))
    _rewrite(dataset, [])
    with pytest.raises(InputError, match="metadata.json: lists no images"):
        split.run(session, config)


def test_no_usable_box_is_an_error(dataset, session, config):
    for image in dataset["annotations"]:
        image.boxes, image.labels = [], []
    _rewrite(dataset, dataset["annotations"])
    with pytest.raises(InputError, match="no usable boxes in 12 images; annotate at least one object"):
        split.run(session, config)
