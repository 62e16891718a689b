"""Property tests: Drip's parsers of user files either succeed or raise Drip's own error type.

Whatever bytes a user hands over, the answer is a result or a ``DripError`` (one line, non-zero
exit), never a ``TypeError`` or ``ValueError`` traceback. Where a parser succeeds, what it returns
keeps the promises the later stages rely on (paths inside the image folder, four-number boxes,
string labels, label maps that round-trip).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from xml.sax.saxutils import escape

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from drip.annotations import load_annotations
from drip.dataset import ImageAnnotation, read_drip_json, resolve_image, safe_relative
from drip.errors import DripError
from drip.labelmap import LabelMap

# Modest by default so the file runs in seconds; DRIP_PROPERTY_EXAMPLES=5000 for a deeper search.
FAST = settings(
    max_examples=int(os.environ.get("DRIP_PROPERTY_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An image folder with two real images; readers only look names up, never decode."""
    folder = tmp_path_factory.mktemp("props") / "images"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.jpg"):
        Image.new("RGB", (8, 8)).save(folder / name)
    return folder


# -- strategies -------------------------------------------------------------------------------------
KEYS = ["images", "annotations", "categories", "file", "file_name", "objects", "label", "box", "bbox",
        "width", "height", "extra", "classes", "id", "image_id", "category_id", "name", "iscrowd"]
NAMES = ["a.jpg", "sub/b.jpg", "sub\\b.jpg", "../a.jpg", "/etc/passwd", "C:x.jpg", "", " ", ".", "a\x00.jpg",
         "\ud800.jpg", "x" * 300, "nö pe.jpg"]
scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**400)
    | st.floats() | st.text(max_size=8) | st.sampled_from(NAMES + KEYS)
)
json_like = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)
numbers = st.integers(-10**400, 10**400) | st.floats()
box_like = st.lists(numbers, min_size=4, max_size=4) | json_like
drip_like = st.fixed_dictionaries(
    {"images": st.lists(
        st.fixed_dictionaries(
            {"file": st.sampled_from(NAMES) | json_like},
            optional={
                "objects": st.lists(st.fixed_dictionaries({"label": st.text(max_size=5) | json_like, "box": box_like}) | json_like, max_size=3) | json_like,
                "width": st.integers(-2, 5000) | json_like,
                "height": st.integers(-2, 5000) | json_like,
                "extra": json_like,
            },
        ) | json_like,
        max_size=4,
    )},
    optional={"classes": json_like},
)
ids = st.integers(-1, 4) | json_like
coco_like = st.fixed_dictionaries({
    "images": st.lists(st.fixed_dictionaries({"id": ids, "file_name": st.sampled_from(NAMES) | json_like},
                                              optional={"width": json_like, "height": json_like}) | json_like, max_size=3),
    "annotations": st.lists(st.fixed_dictionaries({"image_id": ids, "category_id": ids, "bbox": box_like},
                                                   optional={"id": ids, "iscrowd": json_like}) | json_like, max_size=4),
    "categories": st.lists(st.fixed_dictionaries({"id": ids, "name": st.text(max_size=4) | json_like}) | json_like, max_size=3),
})


def _check_images(images: list[ImageAnnotation]) -> None:
    """What every stage after the readers relies on."""
    for image in images:
        parts = PurePosixPath(image.file).parts
        assert image.file and not PurePosixPath(image.file).is_absolute() and ".." not in parts, image.file
        assert len(image.boxes) == len(image.labels)
        for box, label in zip(image.boxes, image.labels):
            assert len(box) == 4 and all(isinstance(v, float) for v in box), box
            assert isinstance(label, str), label
        json.dumps(image.to_json(), ensure_ascii=False).encode("utf-8")  # the split can write it


# -- safe_relative --------------------------------------------------------------------------------
@FAST
@given(st.text(max_size=40) | st.sampled_from(NAMES) | st.lists(st.sampled_from(["..", ".", "a", "", "b c", "\\", ":", "/"]), max_size=6).map("/".join) | json_like)
@example("..\\..\\etc\\passwd")
@example("C:\\Windows\\x.jpg")
@example("a/./../b")
def test_safe_relative_stays_inside_or_raises_drip_error(root, name):
    try:
        relative = safe_relative(name, "test")
    except DripError:
        return
    posix = PurePosixPath(relative)
    assert relative == posix.as_posix() and not posix.is_absolute()
    assert not {"..", ".", ""} & set(relative.split("/")), relative
    assert "\\" not in relative and "\x00" not in relative and PureWindowsPath(relative).anchor == ""
    relative.encode("utf-8")
    try:
        path = resolve_image(root, relative)
    except DripError:
        return
    assert path.resolve().is_relative_to(root.resolve())


# -- Drip JSON --------------------------------------------------------------------------------------
@FAST
@given(drip_like | json_like)
@example({"images": [{"file": "a.jpg", "objects": [{"label": "x", "box": [10**400, 0, 1, 1]}]}]})
@example({"images": [{"file": "a.jpg", "objects": [{"label": None, "box": [0, 0, 1, 1]}]}]})
def test_read_drip_json_returns_usable_entries_or_raises_drip_error(data):
    try:
        images = read_drip_json(data, "metadata.json")
    except DripError:
        return
    _check_images(images)


# -- whole annotation files -----------------------------------------------------------------------
def _load(path: Path, root: Path):
    try:
        result = load_annotations(path, root)
    except DripError as exc:
        assert "\n" not in str(exc), str(exc)  # one line on the console
        return None
    _check_images(result.images)
    assert all(isinstance(c, str) and c.strip() == c and c for c in result.classes)
    assert len(set(result.classes)) == len(result.classes)
    assert {label for image in result.images for label in image.labels} <= set(result.classes)
    return result


@FAST
@given(drip_like | coco_like | json_like)
@example({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": [1], "category_id": 1, "bbox": [0, 0, 1, 1]}], "categories": [{"id": 1, "name": "x"}]})
@example({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "category_id": {}, "bbox": [0, 0, 1, 1]}], "categories": [{"id": 1, "name": "x"}]})
@example({"images": [{"file": "a.jpg", "objects": [{"label": "\ud800", "box": [0, 0, 1, 1]}]}]})
@example({"images": [], "classes": ["a", " a", "", "a"]})
def test_load_annotations_on_json_structures(root, data):
    path = root.parent / "structure.json"
    path.write_text(json.dumps(data), encoding="utf-8")  # json.dumps escapes lone surrogates
    _load(path, root)


@FAST
@given(st.binary(max_size=300))
@example(b"")
@example(b"\xef\xbb\xbf{\"images\": []}")
@example(b"[" * 100_000)
@example(b"1" * 5000)
@example(b'{"images": [{"file": "a.jpg", "objects": [{"label": "x", "box": [1' + b"0" * 400 + b", 0, 1, 1]}]}]}")
@example(b'{"images": [{"file": "\\udc80.jpg"}]}')
def test_load_annotations_on_random_json_bytes(root, data):
    path = root.parent / "random.json"
    path.write_bytes(data)
    _load(path, root)


# Pascal VOC: random bytes, and random trees of VOC's own tags with random text.
VOC_TAGS = ["annotation", "folder", "filename", "path", "size", "width", "height", "object", "name", "bndbox",
            "xmin", "ymin", "xmax", "ymax", "part"]
voc_text = st.sampled_from(["a.jpg", "b.jpg", "sub", "..", "/abs", "1", "0", "-3", "2.5", "nan", "1e999", "x", ""]) | st.text(max_size=6)
voc_tree = st.recursive(
    voc_text.map(escape),
    lambda children: st.tuples(st.sampled_from(VOC_TAGS), st.lists(children, max_size=4)).map(
        lambda t: f"<{t[0]}>{''.join(t[1])}</{t[0]}>"
    ),
    max_leaves=25,
)


@FAST
@given(st.binary(max_size=300) | voc_tree.map(lambda x: f"<annotation>{x}</annotation>".encode("utf-8", "surrogatepass")) | voc_tree.map(str.encode))
@example(b"")
@example(b"<\x00")  # libxml2's message for this has a newline in it
@example(b"<annotation><filename>a.jpg</filename><object><name>x</name><bndbox><xmin>1e999</xmin>"
         b"<ymin>nan</ymin><xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>")
@example(b"<?xml version='1.0' encoding='no-such-codec'?><annotation/>")
@example(b"<!DOCTYPE a [<!ENTITY x SYSTEM 'file:///etc/passwd'>]><annotation><filename>&x;</filename></annotation>")
@example(b"<annotation><filename>b.jpg</filename><size><width>1e400</width></size></annotation>")
def test_load_annotations_on_random_voc_xml(root, data):
    folder = root.parent / "voc"
    folder.mkdir(exist_ok=True)
    (folder / "one.xml").write_bytes(data)
    result = _load(folder, root)
    if result is not None:
        assert all(math.isnan(v) or isinstance(v, float) for image in result.images for box in image.boxes for v in box)


# -- label maps -----------------------------------------------------------------------------------
TOKENS = ["item", "{", "}", "id", ":", "id:", "name:", "display_name:", "'cat'", '"dog"', "'it\\'s'", "'a\\nb'",
          "''", "' '", "1", "2", "0", "-1", "99999999999999999999", "# note\n", "\n", " ", "'", '"', "\\", "{{", "3.5"]


@FAST
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map(" ".join) | st.text(max_size=80))
@example("item { id: 1 name: 5 }")
@example("item { id: 1 name: '  ' }")
def test_label_map_parse_returns_a_usable_map_or_raises_drip_error(text):
    try:
        label_map = LabelMap.parse(text, "class_map.pbtxt")
    except DripError:
        return
    assert len(label_map) >= 1
    assert all(isinstance(n, str) and n.strip() for n in label_map.names)
    assert len(set(label_map.names)) == len(label_map.names)
    assert LabelMap.parse(label_map.to_text()) == label_map


@FAST
@given(st.lists(st.text(min_size=1, max_size=12).filter(str.strip), min_size=1, max_size=5, unique=True))
@example(["line\nbreak", "tab\there", "quote's", 'double"', "back\\slash", "back\\n"])
def test_label_map_text_round_trips_any_names(names):
    label_map = LabelMap.from_names(names)
    assert LabelMap.parse(label_map.to_text()) == label_map
