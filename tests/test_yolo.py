"""YOLO datasets (Ultralytics and Roboflow layouts), user-given eval sets, identical images across
the split, and the split's COCO export, on real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from drip.data.annotations import load_annotations, load_for_scoring
from drip.errors import InputError
from drip.runtime.local import _check_inputs
from drip.stages import split
from drip.data.synthetic import CLASSES, make_dataset, make_roboflow_yolo, write_drip_json, write_yolo_labels


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _with(config, **values):
    return config.updated(values, "test")


def _close(a, b, tol=0.01):
    return len(a) == len(b) and all(abs(x - y) <= tol for box_a, box_b in zip(a, b) for x, y in zip(box_a, box_b))


@pytest.fixture
def ultralytics(tmp_path):
    """images/{train,val} beside labels/{train,val}, names as a dict, one image with no label file."""
    root = tmp_path / "yolo set"
    train = make_dataset(root / "images" / "train", 8, folders=(), seed=2)
    val = make_dataset(root / "images" / "val", 3, folders=(), seed=3)
    write_yolo_labels(root / "labels" / "train", train[:-1])  # the last: no label file
    write_yolo_labels(root / "labels" / "val", val)
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return {"root": root, "yaml": root / "data.yaml", "train": train, "val": val}


def test_ultralytics_yaml_gives_boxes_in_pixels_and_its_val_split(ultralytics, session, config):
    loaded = load_annotations(ultralytics["yaml"], Path("not used"))
    assert (loaded.format, loaded.classes) == ("yolo", list(CLASSES))
    assert loaded.image_root == ultralytics["root"] / "images" / "train"
    by_file = {image.file: image for image in loaded.images}
    for truth in ultralytics["train"][:-1]:
        got = by_file[truth.file]
        assert (got.width, got.height, got.labels) == (160, 120, truth.labels)
        assert _close(got.boxes, truth.boxes), truth.file
    assert by_file[ultralytics["train"][-1].file].boxes == []  # no label file: background
    assert [image.file for image in loaded.eval.images] == [image.file for image in ultralytics["val"]]

    result = split.run(session, _with(config, src_json_path=str(ultralytics["yaml"]), eval_percentage=50))
    assert (result.n_train, result.n_eval) == (8, 3)  # val honoured, eval_percentage not used
    report = _json(session.report_path)
    assert report["format"] == "yolo" and report["eval_source"] == str(ultralytics["yaml"])
    (background,) = [n for n in report["problems"] if "no label file" in n["problem"]]
    assert background["problem"].startswith("1 images have no label file")
    eval_manifest = _json(session.eval_manifest)
    assert eval_manifest["image_root"] == str((ultralytics["root"] / "images" / "val").resolve())


def test_roboflow_export_through_its_yaml_and_through_a_labels_folder(tmp_path, session, config):
    root = tmp_path / "Shapes.v1i.yolov8"
    data = make_roboflow_yolo(root, 10, 4, 2)
    result = split.run(session, _with(config, src_json_path=str(root / "data.yaml")))
    assert (result.n_train, result.n_eval) == (10, 4)  # ../train/images read as train/images
    eval_files = {e["file"] for e in _json(session.eval_manifest)["images"]}
    assert eval_files == {image.file for image in data["valid"]}

    # The folder holding data.yaml stands for it; a labels folder is one pool, split at random,
    # with the class names of the data.yaml two folders up.
    assert load_annotations(root, Path(".")).eval is not None
    loaded = load_annotations(root / "train" / "labels", Path("not used"))
    assert (loaded.classes, loaded.eval, loaded.image_root) == (list(CLASSES), None, root / "train" / "images")
    result = split.run(session, _with(config, src_json_path=str(root / "train" / "labels"), eval_percentage=20))
    assert (result.n_train, result.n_eval) == (8, 2)


def test_labels_folder_without_names_uses_indices_and_says_so(tmp_path):
    images = make_dataset(tmp_path / "d" / "images", 3, folders=(), seed=4)
    write_yolo_labels(tmp_path / "d" / "labels", images)
    loaded = load_annotations(tmp_path / "d" / "labels", tmp_path)
    used = sorted({str(CLASSES.index(label)) for image in images for label in image.labels})
    assert loaded.classes == used
    assert any("classes named by their index" in note["action"] for note in loaded.notes)


def test_polygon_lines_become_their_bounding_box(ultralytics):
    image = ultralytics["val"][0]
    label = (ultralytics["root"] / "labels" / "val" / image.file).with_suffix(".txt")
    label.write_text("2 0.1 0.2 0.5 0.25 0.3 0.75\n")  # a segmentation export's triangle
    loaded = load_annotations(ultralytics["yaml"], Path("."))
    got = next(i for i in loaded.eval.images if i.file == image.file)
    assert got.labels == ["triangle"] and _close(got.boxes, [[16, 24, 80, 90]])


@pytest.mark.parametrize(
    "line, message",
    [
        ("7 0.5 0.5 0.1 0.1", r":1: class 7 is not in the names of .*data\.yaml \(0: circle, 1: square, 2: triangle\)"),
        ("0 0.5 0.5 0.1", r":1: 4 values; expected 'class cx cy w h'"),
        ("cat 0.5 0.5 0.1 0.1", r":1: 'cat 0.5 0.5 0.1 0.1' is not numbers"),
        ("0 50 60 20 20", r":1: coordinate 50 is not within 0-1; YOLO coordinates are fractions"),
        ("1.5 0.5 0.5 0.1 0.1", r":1: class '1.5' is not a class index"),
    ],
)
def test_bad_label_lines_are_one_line_errors_naming_file_and_line(ultralytics, line, message):
    label = (ultralytics["root"] / "labels" / "train" / ultralytics["train"][0].file).with_suffix(".txt")
    label.write_text(line + "\n")
    with pytest.raises(InputError, match=message) as caught:
        load_annotations(ultralytics["yaml"], Path("."))
    assert str(label) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: images/train\n", r"not a YOLO data\.yaml \(it needs 'names' and 'train'\)"),
        ("names: [a, b]\nval: images/val\n", r"no 'train' entry"),
        ("names: [a, b]\ntrain: images/nope\n", r"train: images/nope not found"),
        ("names: [a, a]\ntrain: images/train\n", r"class name 'a' is used twice"),
        ("names: [a, b]\nnc: 3\ntrain: images/train\n", r"nc is 3 but names lists 2 classes"),
        ("names: [a\ntrain: x\n", r"data\.yaml line \d+: .*fix the YAML"),
    ],
)
def test_bad_data_yaml_is_a_one_line_error(ultralytics, text, message):
    ultralytics["yaml"].write_text(text)
    with pytest.raises(InputError, match=message):
        load_annotations(ultralytics["yaml"], Path("."))


def test_yolo_needs_no_image_folder(ultralytics, config):
    _check_inputs(_with(config, src_json_path=str(ultralytics["yaml"]), image_folder_path="/no/such/folder"))
    with pytest.raises(InputError, match="--eval_json_path /no/such.json: not found"):
        _check_inputs(_with(config, eval_json_path="/no/such.json"))


def test_scoring_takes_the_yaml_images_under_the_images_path(ultralytics):
    val = load_for_scoring(ultralytics["yaml"], ultralytics["root"] / "images" / "val")
    assert sorted(image.file for image in val.images) == sorted(image.file for image in ultralytics["val"])
    both = load_for_scoring(ultralytics["yaml"], ultralytics["root"] / "images")
    assert len(both.images) == 11 and all(image.file.startswith(("train/", "val/")) for image in both.images)


# -- identical images, given eval sets, COCO export ------------------------------------------------
def _copy_image(dataset, source_index: int, new_name: str) -> None:
    source = dataset["annotations"][source_index]
    shutil.copyfile(dataset["images"] / source.file, dataset["images"] / new_name)
    copy = type(source)(file=new_name, width=source.width, height=source.height,
                        boxes=list(source.boxes), labels=list(source.labels))
    dataset["annotations"].append(copy)


def test_identical_images_never_straddle_a_random_split(dataset, tmp_path, config):
    for i in range(6):  # six images get a byte-identical copy under another name
        _copy_image(dataset, i, f"copy_{i}.jpg")
    write_drip_json(dataset["metadata"], dataset["annotations"])
    for seed in range(4):
        from drip.session import Session

        session = Session(tmp_path / f"s{seed}")
        session.start_new()
        result = split.run(session, _with(config, seed=seed, eval_percentage=40))
        train = {e["file"] for e in _json(session.train_manifest)["images"]}
        eval_ = {e["file"] for e in _json(session.eval_manifest)["images"]}
        for i in range(6):
            pair = {dataset["annotations"][i].file, f"copy_{i}.jpg"}
            assert pair <= train or pair <= eval_, (seed, pair)
        # 40% of the 12 distinct images: 5 of them go to eval, with their copies.
        assert result.identical_copies == 6
        assert len({e["extra"]["sha256"] for e in _json(session.eval_manifest)["images"]}) == 5
        report = _json(session.report_path)["identical_images"]
        assert report["copies"] == 6 and len(report["sets"]) == 6 and report["across_count"] == 0


def test_a_given_eval_set_skips_the_random_split_and_warns_of_copies_across(dataset, tmp_path, session, config, capsys):
    annotations = dataset["annotations"]
    _copy_image(dataset, 0, "leak.jpg")  # the eval set holds a copy of a training image
    write_drip_json(dataset["metadata"], annotations[:9])
    coco_eval = tmp_path / "val.json"
    _write_coco(coco_eval, annotations[9:])

    result = split.run(session, _with(config, eval_json_path=str(coco_eval), eval_percentage=50))
    assert (result.n_train, result.n_eval, result.identical_across) == (9, 4, 1)
    assert {e["file"] for e in _json(session.eval_manifest)["images"]} == {a.file for a in annotations[9:]}
    assert "1 eval images have a byte-identical copy among the training images" in capsys.readouterr().err
    report = _json(session.report_path)
    assert report["eval_source"] == str(coco_eval)
    assert report["identical_images"]["across_train_and_eval"] == [{"train": annotations[0].file, "eval": "leak.jpg"}]


def test_eval_json_path_beside_a_yaml_with_val_is_an_error(ultralytics, tmp_path, session, config):
    with pytest.raises(InputError, match=r"names its own eval set \(val\); use one of them"):
        split.run(session, _with(config, src_json_path=str(ultralytics["yaml"]), eval_json_path=str(ultralytics["yaml"])))


def test_split_writes_coco_json_that_pycocotools_reads(dataset, session, config):
    from pycocotools.coco import COCO

    result = split.run(session, config)
    for manifest, coco_path, n in ((session.train_manifest, session.train_coco, result.n_train),
                                   (session.eval_manifest, session.eval_coco, result.n_eval)):
        coco = COCO(str(coco_path))
        assert len(coco.getImgIds()) == n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == result.classes
        drip = _json(manifest)
        for image_id, entry in zip(sorted(coco.getImgIds()), drip["images"]):
            (image,) = coco.loadImgs(image_id)
            assert image["file_name"] == entry["file"]
            boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)))]
            assert _close(boxes, [o["box"] for o in entry["objects"]])
        # ... and Drip reads it back as COCO, with the same images.
        again = load_annotations(coco_path, Path(drip["image_root"]))
        assert again.format == "coco" and len(again.images) == n


def _write_coco(path: Path, annotations) -> None:
    cats = {name: i for i, name in enumerate(CLASSES, start=1)}
    images, anns = [], []
    for image_id, a in enumerate(annotations, start=1):
        images.append({"id": image_id, "file_name": a.file, "width": a.width, "height": a.height})
        for (x0, y0, x1, y1), label in zip(a.boxes, a.labels):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cats[label],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": i, "name": n} for n, i in cats.items()]}))


def test_exif_rotated_yolo_image_scales_by_its_display_size(ultralytics):
    image = ultralytics["val"][0]
    path = ultralytics["root"] / "images" / "val" / image.file
    with Image.open(path) as img:
        exif = img.getexif()
        exif[0x0112] = 6  # shown turned a quarter: 120 wide, 160 high
        img.save(path, exif=exif)
    label = (ultralytics["root"] / "labels" / "val" / image.file).with_suffix(".txt")
    label.write_text("0 0.5 0.5 0.5 0.5\n")
    got = next(i for i in load_annotations(ultralytics["yaml"], Path(".")).eval.images if i.file == image.file)
    assert (got.width, got.height) == (120, 160) and _close(got.boxes, [[30, 40, 90, 120]])


def test_val_naming_the_train_images_falls_back_to_the_random_split(ultralytics, session, config):
    ultralytics["yaml"].write_text("names: [circle, square, triangle]\ntrain: images/train\nval: images/train\n")
    result = split.run(session, _with(config, src_json_path=str(ultralytics["yaml"]), eval_percentage=25))
    assert (result.n_train, result.n_eval, result.eval_source) == (6, 2, None)
    assert any(n["problem"] == "'val' names the same images as 'train'" for n in _json(session.report_path)["problems"])


def test_a_class_only_in_the_given_eval_set_is_warned_of(dataset, tmp_path, session, config, capsys):
    annotations = dataset["annotations"]
    for image in annotations[9:]:
        image.labels = ["star" if label == "circle" else label for label in image.labels]
    write_drip_json(dataset["metadata"], annotations[:9])
    given = tmp_path / "eval.json"
    write_drip_json(given, annotations[9:])
    result = split.run(session, _with(config, eval_json_path=str(given)))
    assert "star" in result.classes and result.train_objects["star"] == 0
    assert "classes 'star' have eval boxes but no training boxes" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["voc", "yolo labels", "yolo yaml"])
def test_eval_json_path_takes_every_format(dataset, tmp_path, session, config, fmt):
    annotations = dataset["annotations"]
    write_drip_json(dataset["metadata"], annotations[:8])
    held_out = annotations[8:]
    if fmt == "voc":
        given = tmp_path / "voc"
        given.mkdir()
        for a in held_out:
            objects = "".join(
                f"<object><name>{label}</name><bndbox><xmin>{b[0] + 1:g}</xmin><ymin>{b[1] + 1:g}</ymin>"
                f"<xmax>{b[2]:g}</xmax><ymax>{b[3]:g}</ymax></bndbox></object>"
                for b, label in zip(a.boxes, a.labels)
            )
            (given / f"{Path(a.file).stem}.xml").write_text(
                f"<annotation><folder>{Path(a.file).parent}</folder><filename>{Path(a.file).name}</filename>{objects}</annotation>"
            )
        expected = {a.file for a in held_out}
    else:  # a YOLO eval set elsewhere, with its own images
        root = tmp_path / "yolo eval"
        for a in held_out:
            (root / "images").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dataset["images"] / a.file, root / "images" / Path(a.file).name)
        flat = [type(a)(file=Path(a.file).name, width=a.width, height=a.height, boxes=a.boxes, labels=a.labels) for a in held_out]
        write_yolo_labels(root / "labels", flat)
        (root / "data.yaml").write_text(f"names: {list(CLASSES)}\ntrain: images\n")
        given = root / "labels" if fmt == "yolo labels" else root / "data.yaml"
        expected = {a.file for a in flat}

    result = split.run(session, _with(config, eval_json_path=str(given)))
    assert (result.n_train, result.n_eval, result.eval_source) == (8, 4, str(given))
    eval_manifest = _json(session.eval_manifest)
    assert {e["file"] for e in eval_manifest["images"]} == expected
    for entry in eval_manifest["images"]:
        truth = next(a for a in held_out if a.file.endswith(entry["file"]))
        assert _close([o["box"] for o in entry["objects"]], truth.boxes, tol=1.01 if fmt == "voc" else 0.01)
