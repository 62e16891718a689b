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

from drip.data.annotations import load_annotations
from drip.data.dataset import ImageAnnotation, read_drip_json, resolve_image, safe_relative
from drip.errors import DripError
from drip.data.labelmap import LabelMap

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


# -- valid inputs: each must parse, and give back exactly what was written ---------------------------
# The tests above accept any DripError, so a parser that refused everything would pass them. These
# write well-formed files in each format the way annotation tools do, and compare what comes back.
label_text = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_categories=("Cs", "Cc", "Zl", "Zp")),
    min_size=1, max_size=8,
).map(str.strip).filter(bool)
# Inner spaces only: VOC's XML text is read stripped, as every VOC reader does.
segment = st.text(alphabet="abcxyz_-09 äö", min_size=1, max_size=6).filter(lambda s: s.strip() == s)
file_names = st.lists(segment, min_size=1, max_size=3).map(lambda parts: "/".join(parts) + ".jpg")
# Whole pixels, as most tools write, and eighths: exact in binary and in JSON's 3-decimal round trip.
coordinate = st.integers(0, 4000) | st.integers(0, 32000).map(lambda v: v / 8)
size = st.none() | st.integers(1, 5000)


@st.composite
def valid_dataset(draw):
    """Images with sizes, boxes [x0, y0, x1, y1] (x0 < x1, y0 < y1) and class names."""
    classes = draw(st.lists(label_text, min_size=1, max_size=4, unique=True))
    images = []
    for _ in range(draw(st.integers(1, 4))):
        width = draw(size)
        objects = []
        for _ in range(draw(st.integers(0, 3))):
            x0, y0 = draw(coordinate), draw(coordinate)
            w, h = draw(st.integers(1, 500)), draw(st.integers(1, 500))
            objects.append((draw(st.sampled_from(classes)), [x0, y0, x0 + w, y0 + h]))
        images.append({"file": draw(file_names), "width": width, "height": None if width is None else draw(st.integers(1, 5000)),
                       "objects": objects})
    return images


def _seen_order(images) -> list[str]:
    return list(dict.fromkeys(label for image in images for label, _ in image["objects"]))


def _assert_same(result, images, boxes_of) -> None:
    assert [i.file for i in result.images] == [i["file"] for i in images]
    assert [(i.width, i.height) for i in result.images] == [(i["width"], i["height"]) for i in images]
    for got, want in zip(result.images, images):
        assert got.labels == [label for label, _ in want["objects"]]
        assert got.boxes == [boxes_of(box) for _, box in want["objects"]]
        assert all(isinstance(v, float) for box in got.boxes for v in box)


@FAST
@given(valid_dataset())
def test_valid_drip_json_parses_to_what_was_written_and_round_trips(root, images):
    data = {"images": [
        {"file": i["file"], **({"width": i["width"], "height": i["height"]} if i["width"] else {}),
         "objects": [{"label": label, "box": box} for label, box in i["objects"]]}
        for i in images
    ]}
    path = root.parent / "valid.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    result = load_annotations(path, root)
    assert result.format == "drip" and result.classes == _seen_order(images)
    _assert_same(result, images, lambda box: [float(v) for v in box])
    # What the split writes (to_json) reads back to the same entries.
    again = read_drip_json({"images": [i.to_json() for i in result.images]}, "again")
    assert again == result.images


@FAST
@given(valid_dataset(), st.lists(st.integers(1, 1000), min_size=4, max_size=4, unique=True))
def test_valid_coco_parses_to_what_was_written(root, images, category_ids):
    names = list(dict.fromkeys(label for i in images for label, _ in i["objects"])) or ["unused"]
    ids = dict(zip(names, category_ids))
    coco_images, annotations = [], []
    for n, image in enumerate(images, start=7):
        coco_images.append({"id": n, "file_name": image["file"], "width": image["width"] or 0, "height": image["height"] or 0})
        for label, (x0, y0, x1, y1) in image["objects"]:
            annotations.append({"id": len(annotations) + 1, "image_id": n, "category_id": ids[label],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
    categories = [{"id": cid, "name": name} for name, cid in reversed(list(ids.items()))]  # file order is not id order
    path = root.parent / "valid coco.json"
    path.write_text(json.dumps({"images": coco_images, "annotations": annotations, "categories": categories}), encoding="utf-8")
    result = load_annotations(path, root)
    assert result.format == "coco"
    assert result.classes == sorted(names, key=ids.get)  # in category id order
    assert result.coco_category_ids == ids
    _assert_same(result, images, lambda box: [float(box[0]), float(box[1]), float(box[0]) + float(box[2] - box[0]),
                                              float(box[1]) + float(box[3] - box[1])])
    assert [i.extra["coco_image_id"] for i in result.images] == list(range(7, 7 + len(images)))


@FAST
@given(valid_dataset())
def test_valid_voc_folder_parses_to_what_was_written(images):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        image_root, folder = Path(tmp) / "images", Path(tmp) / "voc"
        folder.mkdir()
        for n, image in enumerate(images):
            sub, _, name = image["file"].rpartition("/")
            (image_root / sub).mkdir(parents=True, exist_ok=True)
            (image_root / image["file"]).touch()  # looked up by name, never decoded
            size = f"<size><width>{image['width']}</width><height>{image['height']}</height><depth>3</depth></size>" if image["width"] else ""
            objects = "".join(
                f"<object><name>{escape(label)}</name><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
                f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
                for label, box in image["objects"]
            )
            (folder / f"{n:03d}.xml").write_text(
                f"<annotation><folder>{escape(sub)}</folder><filename>{escape(name)}</filename>{size}{objects}</annotation>",
                encoding="utf-8",
            )
        result = load_annotations(folder, image_root)
    assert result.format == "voc" and result.classes == _seen_order(images)
    # VOC counts pixels from 1 with inclusive ends: the start moves by one, the end stays.
    _assert_same(result, images, lambda box: [box[0] - 1.0, box[1] - 1.0, float(box[2]), float(box[3])])


@st.composite
def valid_label_map(draw):
    """Label-map text as TF's tools and people write it: any id order, comments, both quotes."""
    names = draw(st.lists(st.text(min_size=1, max_size=10).filter(str.strip), min_size=1, max_size=5, unique=True))
    order = draw(st.permutations(range(len(names))))
    blocks = []
    for index in order:
        name = names[index]
        quote = draw(st.sampled_from(["'", '"']))
        escaped = name.replace("\\", "\\\\").replace(quote, "\\" + quote).replace("\n", "\\n").replace("\r", "\\r")
        fields = [f"id: {index + 1}", f"name: {quote}{escaped}{quote}"]
        if draw(st.booleans()):
            fields.append(f"display_name: {quote}{escaped}{quote}")
        fields = draw(st.permutations(fields))
        gap = draw(st.sampled_from([" ", "\n  ", "\n"]))
        comment = draw(st.sampled_from(["", "# a class\n"]))
        blocks.append(f"{comment}item {{{gap}{gap.join(fields)}{gap}}}")
    return "\n".join(blocks), tuple(names)


@FAST
@given(valid_label_map())
@example(("item { id: 1 name: 'it\\'s' }", ("it's",)))
def test_valid_label_map_parses_to_its_names_in_id_order(case):
    text, names = case
    assert LabelMap.parse(text, "class_map.pbtxt").names == names
