"""Reading COCO, Pascal VOC and Drip JSON annotations written by the tests onto real images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drip.data.annotations import load_annotations
from drip.errors import InputError
from drip.data.synthetic import make_dataset, write_drip_json


@pytest.fixture
def images(tmp_path):
    """Four real JPEGs in two sub-folders, and their annotations (boxes in 0-based pixels)."""
    root = tmp_path / "image root"
    return root, make_dataset(root, 4, seed=3)


# -- COCO -------------------------------------------------------------------------------------------
def _coco(images, categories=((3, "circle"), (17, "square"), (90, "triangle"))):
    ids = {name: cid for cid, name in categories}
    data = {"images": [], "annotations": [], "categories": [{"id": c, "name": n} for c, n in reversed(categories)]}
    for image_id, ann in enumerate(images, start=100):
        data["images"].append({"id": image_id, "file_name": ann.file, "width": ann.width, "height": ann.height})
        for box, label in zip(ann.boxes, ann.labels):
            x0, y0, x1, y1 = box
            data["annotations"].append({
                "id": len(data["annotations"]) + 1,
                "image_id": image_id,
                "category_id": ids[label],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "iscrowd": 0,
            })
    return data


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_coco_maps_gapped_category_ids_and_sub_folder_names(images, tmp_path):
    root, truth = images
    result = load_annotations(_write(tmp_path / "coco.json", _coco(truth)), root)

    assert result.format == "coco"
    # Sorted by category id, although the file lists them in reverse.
    assert result.classes == ["circle", "square", "triangle"]
    assert result.coco_category_ids == {"circle": 3, "square": 17, "triangle": 90}
    assert [a.file for a in result.images] == [a.file for a in truth]
    assert "/" in result.images[0].file  # sub-folder kept
    for got, want in zip(result.images, truth):
        assert got.labels == want.labels
        flat = [v for box in got.boxes for v in box]
        assert flat == pytest.approx([v for box in want.boxes for v in box])  # xywh back to xyxy
        assert (got.width, got.height) == (160, 120)
    assert result.images[0].extra == {"coco_image_id": 100}


def test_coco_leaves_out_crowd_regions_and_keeps_images_without_boxes(images, tmp_path):
    root, truth = images
    data = _coco(truth)
    data["annotations"][0]["iscrowd"] = 1
    data["images"].append({"id": 999, "file_name": truth[0].file})  # no size, no annotations
    result = load_annotations(_write(tmp_path / "coco.json", data), root)

    assert len(result.images[0].boxes) == len(truth[0].boxes) - 1
    assert result.notes == [{"file": truth[0].file, "problem": "annotation 1 is a crowd region (iscrowd: 1)", "action": "left out"}]
    empty = result.images[-1]
    assert (empty.boxes, empty.width, empty.height) == ([], None, None)


def test_coco_unknown_category_names_the_annotation(images, tmp_path):
    root, truth = images
    data = _coco(truth)
    data["annotations"][2]["category_id"] = 4
    with pytest.raises(InputError, match=r"annotation id 3: category_id 4 is not in \"categories\" \(ids \[3, 17, 90\]\)"):
        load_annotations(_write(tmp_path / "coco.json", data), root)


def test_coco_unknown_image_id_names_the_annotation(images, tmp_path):
    root, truth = images
    data = _coco(truth)
    data["annotations"][1]["image_id"] = 5
    with pytest.raises(InputError, match="annotation id 2: image_id 5 is not in"):
        load_annotations(_write(tmp_path / "coco.json", data), root)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "set_a/../../x.jpg"])
def test_coco_refuses_paths_outside_the_image_folder(images, tmp_path, name):
    root, truth = images
    data = _coco(truth)
    data["images"][1]["file_name"] = name
    with pytest.raises(InputError, match=r"images\[1\]: image path .* (leaves the image folder|is absolute)"):
        load_annotations(_write(tmp_path / "coco.json", data), root)


def test_coco_bad_bbox_is_an_error(images, tmp_path):
    root, truth = images
    data = _coco(truth)
    data["annotations"][0]["bbox"] = [1, 2, 3]
    with pytest.raises(InputError, match=r"annotation id 1: bbox \[1, 2, 3\] must be 4 numbers"):
        load_annotations(_write(tmp_path / "coco.json", data), root)


# -- Pascal VOC -------------------------------------------------------------------------------------
def _voc_xml(filename, objects, folder=None, size=(160, 120)):
    parts = ["<annotation>"]
    if folder is not None:
        parts.append(f"  <folder>{folder}</folder>")
    parts.append(f"  <filename>{filename}</filename>")
    parts.append("  <path>C:\\Users\\someone\\Pictures\\" + filename + "</path>")  # exporters write these
    if size:
        parts.append(f"  <size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, (x0, y0, x1, y1) in objects:
        parts.append(
            f"  <object>\n    <name>  {name}\n    </name><pose>Unspecified</pose><difficult>0</difficult>\n"
            f"    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>\n  </object>"
        )
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def test_voc_converts_one_based_corners_and_finds_images(images, tmp_path):
    root, truth = images
    xml_dir = tmp_path / "voc"
    (xml_dir / "nested").mkdir(parents=True)
    # by <folder>/<filename>
    (xml_dir / "a.xml").write_text(_voc_xml("img_0000.jpg", [("circle", (1, 1, 160, 120))], folder="set_a"))
    # by unique name anywhere under the root; <folder> is the annotator's absolute path; no <size>
    (xml_dir / "nested" / "b.xml").write_text(
        _voc_xml("img_0001.jpg", [("square", (10.5, 20, 30, 40.5)), ("circle", (5, 5, 9, 9))], folder="/home/x/pics", size=None)
    )
    (xml_dir / "labels.xml").write_text("<labels><label>circle</label></labels>\n")  # not VOC
    result = load_annotations(xml_dir, root)

    assert result.format == "voc"
    assert [(n["file"], n["action"]) for n in result.notes] == [(str(xml_dir / "labels.xml"), "file ignored")]
    assert result.classes == ["circle", "square"]  # first appearance, names stripped
    a, b = result.images
    assert a.file == "set_a/img_0000.jpg"
    assert a.boxes == [[0.0, 0.0, 160.0, 120.0]]  # the whole image
    assert (a.width, a.height) == (160, 120)
    assert b.file == "set_b/img_0001.jpg"
    assert b.boxes == [[9.5, 19.0, 30.0, 40.5], [4.0, 4.0, 9.0, 9.0]]
    assert b.labels == ["square", "circle"]
    assert (b.width, b.height) == (None, None)


def test_voc_ambiguous_file_name_lists_both_files(images, tmp_path):
    root, truth = images
    (root / "set_b" / "img_0000.jpg").write_bytes((root / "set_a" / "img_0000.jpg").read_bytes())
    xml_dir = tmp_path / "voc"
    xml_dir.mkdir()
    (xml_dir / "a.xml").write_text(_voc_xml("img_0000.jpg", [("circle", (1, 1, 5, 5))], folder="elsewhere"))
    with pytest.raises(InputError, match=r"a\.xml: image 'img_0000\.jpg' matches several files .*\(set_a/img_0000\.jpg, set_b/img_0000\.jpg\)"):
        load_annotations(xml_dir, root)

    # An XML kept in a tree that mirrors the image folder settles it.
    (xml_dir / "a.xml").unlink()
    (xml_dir / "set_b").mkdir()
    (xml_dir / "set_b" / "a.xml").write_text(_voc_xml("img_0000.jpg", [("circle", (1, 1, 5, 5))], folder="elsewhere"))
    assert [a.file for a in load_annotations(xml_dir, root).images] == ["set_b/img_0000.jpg"]


def test_voc_missing_image_is_returned_as_named_for_the_split_to_judge(images, tmp_path):
    # As in COCO and Drip JSON, whether a missing image is skipped or an error is on_bad_image's
    # call, made in the split (tests/test_bad_input.py); the reader only says which file it meant.
    root, _ = images
    xml_dir = tmp_path / "voc"
    xml_dir.mkdir()
    (xml_dir / "a.xml").write_text(_voc_xml("nowhere.jpg", [("circle", (1, 1, 5, 5))], folder="/home/x/pics"))
    (image,) = load_annotations(xml_dir, root).images
    assert (image.file, image.labels) == ("nowhere.jpg", ["circle"])


def test_voc_malformed_xml_names_file_and_line(images, tmp_path):
    root, _ = images
    xml_dir = tmp_path / "voc"
    xml_dir.mkdir()
    text = _voc_xml("img_0000.jpg", [("circle", (1, 1, 5, 5))], folder="set_a").replace("</xmax>", "</xmaxx>")
    (xml_dir / "bad.xml").write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), start=1) if "</xmaxx>" in l)
    with pytest.raises(InputError, match=rf"bad\.xml line {line}: malformed XML"):
        load_annotations(xml_dir, root)


def test_voc_non_numeric_coordinate_names_line(images, tmp_path):
    root, _ = images
    xml_dir = tmp_path / "voc"
    xml_dir.mkdir()
    (xml_dir / "a.xml").write_text(_voc_xml("img_0000.jpg", [("circle", ("one", 1, 5, 5))], folder="set_a"))
    with pytest.raises(InputError, match=r"a\.xml line \d+: <xmin> is 'one', expected a number"):
        load_annotations(xml_dir, root)


def test_folder_without_xml_is_an_error(images, tmp_path):
    root, _ = images
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Pascal VOC .xml files"):
        load_annotations(tmp_path / "empty", root)


# -- Drip JSON and detection ------------------------------------------------------------------------
def test_drip_json_round_trip(images, tmp_path):
    root, truth = images
    path = tmp_path / "metadata.json"
    write_drip_json(path, truth)
    result = load_annotations(path, root)

    assert result.format == "drip"
    assert result.coco_category_ids is None
    assert [(a.file, a.boxes, a.labels) for a in result.images] == [(a.file, a.boxes, a.labels) for a in truth]
    first_seen = list(dict.fromkeys(label for a in truth for label in a.labels))
    assert result.classes == first_seen


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2], "found a JSON list, which is no annotation format.*COCO instances .json.*Drip JSON.*Pascal VOC"),
        ({"boxes": []}, r"found keys \['boxes'\], which is no annotation format.*COCO.*Drip JSON.*Pascal VOC"),
        ({"images": [{"file_name": "a.jpg", "id": 1}]}, r"looks like COCO but lacks \"annotations\" or \"categories\""),
    ],
)
def test_unrecognised_json_says_what_is_accepted(images, tmp_path, content, message):
    root, _ = images
    with pytest.raises(InputError, match=message):
        load_annotations(_write(tmp_path / "odd.json", content), root)


def test_other_files_and_missing_paths_are_errors(images, tmp_path):
    root, _ = images
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\n")
    with pytest.raises(InputError, match=r"labels\.csv: not an annotation format Drip reads"):
        load_annotations(csv, root)
    with pytest.raises(InputError, match=r"nope\.json: annotations not found"):
        load_annotations(tmp_path / "nope.json", root)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [\n  {"file": }\n]}')
    with pytest.raises(InputError, match=r"broken\.json line 2 column \d+: invalid JSON"):
        load_annotations(broken, root)
