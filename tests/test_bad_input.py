"""Bad input, end to end through the split stage: files the tests make, the way users make them.

What ``test_split.py`` and ``test_annotations.py`` already cover (truncated JPEG, a text file
named .jpg, EXIF size, boxes out of bounds / zero-area / inverted / NaN, unknown classes against
a class map, malformed JSON and XML, a split that empties a half, COCO paths with ``..``) is not
repeated here. Every case ends either in a usable 8-bit RGB image of its display size, or in a
``split/report.json`` entry (file, problem, action) with ``on_bad_image: skip`` and a one-line
``InputError`` naming the file with ``on_bad_image: fail``.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drip.data.dataset import ImageAnnotation
from drip.errors import InputError
from drip.data.images import encode_for_record, load_rgb, open_rgb
from drip.data.labelmap import LabelMap
from drip.session import Session
from drip.stages import split
from drip.data.synthetic import write_drip_json

ROOT = Path(__file__).resolve().parents[1]


# -- helpers ----------------------------------------------------------------------------------------
def _with(config, **values):
    return config.updated(values, "test")


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _entries(session: Session) -> dict[str, dict]:
    images = _read(session.train_manifest)["images"] + _read(session.eval_manifest)["images"]
    return {entry["file"]: entry for entry in images}


def _problems(session: Session) -> list[dict]:
    return _read(session.report_path)["problems"]


def _add(dataset, *extra: ImageAnnotation) -> None:
    dataset["annotations"].extend(extra)
    write_drip_json(dataset["metadata"], dataset["annotations"])


def _one_line_error(excinfo, *parts: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


def _as_coco(annotations: list[ImageAnnotation]) -> dict:
    classes = sorted({label for a in annotations for label in a.labels})
    data = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in enumerate(classes, 1)]}
    for image_id, a in enumerate(annotations, start=1):
        data["images"].append({"id": image_id, "file_name": a.file})
        for (x0, y0, x1, y1), label in zip(a.boxes, a.labels):
            data["annotations"].append({
                "id": len(data["annotations"]) + 1, "image_id": image_id,
                "category_id": classes.index(label) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
            })
    return data


def _voc_text(a: ImageAnnotation) -> str:
    folder, _, name = a.file.rpartition("/")
    objects = "".join(
        f"<object><name>{label}</name><bndbox><xmin>{x0 + 1:g}</xmin><ymin>{y0 + 1:g}</ymin>"
        f"<xmax>{x1:g}</xmax><ymax>{y1:g}</ymax></bndbox></object>"
        for (x0, y0, x1, y1), label in zip(a.boxes, a.labels)
    )
    return f"<annotation><folder>{folder}</folder><filename>{name}</filename>{objects}</annotation>\n"


def _write_source(fmt: str, annotations: list[ImageAnnotation], where: Path) -> Path:
    """The annotations as COCO, a VOC folder (one XML per image) or Drip JSON, under ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    if fmt == "coco":
        path = where / "instances.json"
        path.write_text(json.dumps(_as_coco(annotations)), encoding="utf-8")
        return path
    if fmt == "voc":
        folder = where / "voc"
        for i, a in enumerate(annotations):
            (folder / f"{i:04d}.xml").parent.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.xml").write_text(_voc_text(a), encoding="utf-8")
        return folder
    path = where / "metadata.json"
    write_drip_json(path, annotations)
    return path


def _png_claiming(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR (and its CRC) is patched to claim ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # signature (8) | length (4) | b"IHDR" (4) | width (4) | height (4) | 5 more bytes | CRC (4)
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# -- files that cannot be used ------------------------------------------------------------------
def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _svg(path: Path) -> None:
    path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="30"><rect width="9" height="9"/></svg>\n')


def _heic(path: Path) -> None:
    # An iPhone photo's first bytes, then noise: Pillow has no HEIF decoder without a plugin.
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(range(256)) * 4)


def _bomb(path: Path) -> None:
    path.write_bytes(_png_claiming(30000, 30000))  # 900 megapixels: Pillow calls it a bomb


def _directory(path: Path) -> None:
    path.mkdir()


UNUSABLE = {
    "zero-byte.jpg": (_zero_bytes, "empty file (0 bytes)"),
    "drawing.svg": (_svg, "not an image Pillow can read"),
    "IMG_0001.heic": (_heic, "not an image Pillow can read"),
    "bomb.png": (_bomb, "decompression bomb"),
    "folder.jpg": (_directory, "image not found"),
}


@pytest.mark.parametrize("name", list(UNUSABLE))
def test_unusable_file_is_skipped_and_reported(dataset, session, config, name):
    make, problem = UNUSABLE[name]
    make(dataset["images"] / name)
    _add(dataset, ImageAnnotation(file=name, boxes=[[1, 1, 5, 5]], labels=["circle"]))
    result = split.run(session, config)

    assert (result.images_total, result.images_used) == (13, 12)
    assert name not in _entries(session)
    (note,) = _problems(session)
    assert note["file"] == name and note["action"] == "image left out"
    assert problem in note["problem"] and "\n" not in note["problem"]


@pytest.mark.parametrize("name", list(UNUSABLE))
def test_unusable_file_is_an_error_when_asked_to_fail(dataset, session, config, name):
    make, problem = UNUSABLE[name]
    make(dataset["images"] / name)
    _add(dataset, ImageAnnotation(file=name, boxes=[[1, 1, 5, 5]], labels=["circle"]))
    with pytest.raises(InputError) as caught:
        split.run(session, _with(config, on_bad_image="fail"))
    _one_line_error(caught, name, problem, "on_bad_image: skip")
    assert not session.train_manifest.exists()


def test_a_name_the_file_system_refuses_is_reported_not_a_crash(dataset, session, config):
    name = "x" * 300 + ".jpg"  # over the 255-byte limit of a file name on Linux and macOS
    _add(dataset, ImageAnnotation(file=name, boxes=[[1, 1, 5, 5]], labels=["circle"]))
    split.run(session, config)
    (note,) = _problems(session)
    assert note["file"] == name and note["action"] == "image left out"


# -- unusual images that are fine ---------------------------------------------------------------
def _cmyk(path: Path) -> None:
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(path, quality=95)  # red, in ink


def _gray(path: Path) -> None:
    Image.new("L", (40, 30), 128).save(path, quality=95)


def _deep(path: Path) -> None:
    arr = np.full((30, 40), 60000, dtype=np.uint16)
    arr[:, :20] = 1000  # dark left half, bright right half, both far above 255
    Image.fromarray(arr).save(path)  # mode I;16


def _rgba(path: Path) -> None:
    arr = np.zeros((30, 40, 4), dtype=np.uint8)
    arr[:, :20] = (255, 255, 255, 0)  # transparent white on the left
    arr[:, 20:] = (255, 0, 0, 255)  # opaque red on the right
    Image.fromarray(arr, "RGBA").save(path)


def _tiny(path: Path) -> None:
    Image.new("RGB", (4, 4), (0, 0, 255)).save(path)


def _one_pixel(path: Path) -> None:
    Image.new("RGB", (1, 1), (0, 255, 0)).save(path)


def _red(px) -> bool:
    return px[0] > 200 and px[1] < 60 and px[2] < 60


ODD = {
    # name: (maker, display size, check of the decoded pixels (HxWx3 uint8))
    "odd/cmyk.jpg": (_cmyk, (40, 30), lambda a: _red(a[15, 20])),
    "odd/gray.jpg": (_gray, (40, 30), lambda a: abs(int(a[15, 20, 0]) - 128) <= 3 and len(set(a[15, 20])) == 1),
    # Scaled to 8 bits, not clipped: clipping would make both halves 255.
    "odd/deep.png": (_deep, (40, 30), lambda a: a[0, 39, 0] == 255 and a[0, 0, 0] < 10),
    # Composited on black: transparent pixels do not become a colour nobody saw.
    "odd/alpha.png": (_rgba, (40, 30), lambda a: a[0, 0].tolist() == [0, 0, 0] and _red(a[0, 39])),
    "odd/tiny.png": (_tiny, (4, 4), lambda a: a[2, 2].tolist() == [0, 0, 255]),
    "odd/one pixel.png": (_one_pixel, (1, 1), lambda a: a[0, 0].tolist() == [0, 255, 0]),
}


@pytest.mark.parametrize("name", list(ODD))
def test_unusual_image_is_used_as_8_bit_rgb_of_its_display_size(dataset, session, config, name):
    make, (width, height), pixels_ok = ODD[name]
    path = dataset["images"] / name
    path.parent.mkdir(exist_ok=True)
    make(path)
    # One box inside, one past the edge: clipped to the decoded size, whatever the mode.
    _add(dataset, ImageAnnotation(file=name, boxes=[[0, 0, 1, 1], [0, 0, 50, 50]], labels=["circle", "square"]))
    split.run(session, _with(config, eval_percentage=0))

    entry = _entries(session)[name]
    assert (entry["width"], entry["height"]) == (width, height)
    assert [o["box"] for o in entry["objects"]] == [[0, 0, 1, 1], [0, 0, width, height]]
    assert [(p["file"], p["action"]) for p in _problems(session)] == [(name, f"clipped to [0, 0, {width}, {height}]")]

    img = open_rgb(path)
    assert (img.mode, img.size) == ("RGB", (width, height))
    pixels = load_rgb(path)
    assert pixels.dtype == np.uint8 and pixels.shape == (height, width, 3)
    assert pixels_ok(pixels), pixels[: min(height, 2), : min(width, 2)].tolist()
    # What the records stage stores decodes, in any reader, to the same RGB picture.
    data, fmt, w, h = encode_for_record(path)
    with Image.open(io.BytesIO(data)) as stored:
        assert (stored.format.lower(), stored.mode, stored.size, (w, h)) == (fmt, "RGB", (width, height), (width, height))


def test_exif_rotated_pixels_match_boxes_given_in_display_coordinates(dataset, session, config):
    # test_split checks the size; this checks the box lands on the object the user saw.
    stored = np.full((20, 40, 3), 90, dtype=np.uint8)  # 40 wide, 20 high as stored
    stored[0:5, 0:5] = (255, 0, 0)  # a red square at the stored top-left
    path = dataset["images"] / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 20 wide, 40 high, red at the top-right
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    _add(dataset, ImageAnnotation(file="phone.jpg", boxes=[[15, 0, 20, 5]], labels=["square"]))
    split.run(session, _with(config, eval_percentage=0))

    entry = _entries(session)["phone.jpg"]
    assert (entry["width"], entry["height"]) == (20, 40)
    assert entry["objects"] == [{"label": "square", "box": [15, 0, 20, 5]}]
    assert _problems(session) == []
    x0, y0, _, _ = (int(v) for v in entry["objects"][0]["box"])
    assert _red(load_rgb(path)[y0 + 2, x0 + 2])
    data, _, w, h = encode_for_record(path)
    with Image.open(io.BytesIO(data)) as record:
        assert (w, h) == record.size == (20, 40)
        assert _red(np.asarray(record.convert("RGB"))[y0 + 2, x0 + 2])


# -- annotation files ---------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_empty_annotation_file_is_an_error(dataset, session, config, content):
    dataset["metadata"].write_text(content)
    with pytest.raises(InputError) as caught:
        split.run(session, config)
    _one_line_error(caught, str(dataset["metadata"]), "is empty")


def test_empty_voc_xml_is_an_error_with_file_and_line(dataset, tmp_path, session, config):
    voc = _write_source("voc", dataset["annotations"][:3], tmp_path / "src")
    (voc / "0001.xml").write_text("")
    with pytest.raises(InputError) as caught:
        split.run(session, _with(config, src_json_path=str(voc)))
    _one_line_error(caught, str(voc / "0001.xml"), "line 1: malformed XML")


@pytest.mark.parametrize("fmt", ["drip", "coco", "voc"])
def test_images_without_boxes_are_kept_as_background(dataset, tmp_path, session, config, fmt):
    annotations = dataset["annotations"]
    annotations[4].boxes, annotations[4].labels = [], []
    src = _write_source(fmt, annotations, tmp_path / "src")
    result = split.run(session, _with(config, src_json_path=str(src), eval_percentage=0))

    assert result.images_used == 12
    assert _entries(session)[annotations[4].file]["objects"] == []
    assert _problems(session) == []


def test_image_files_no_annotation_names_are_not_used_and_reported_once(dataset, session, config):
    root = dataset["images"]
    for name in ("set_a/extra 1.jpg", "set_b/extra 2.png", "new/extra 3.jpg", "new/extra 4.jpg"):
        (root / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (16, 16)).save(root / name)
    (root / "new" / "readme.txt").write_text("not an image, not counted")
    result = split.run(session, config)

    assert result.images_used == 12  # an unlabelled image may show objects: not background
    (note,) = _problems(session)
    assert note["file"] == str(root)
    assert note["problem"].startswith("4 image files in the image folder are in no annotation (new/extra 3.jpg, ")
    assert "list it with no boxes" in note["action"]


@pytest.mark.parametrize("fmt", ["drip", "coco", "voc"])
def test_missing_image_is_skipped_and_reported_in_every_format(dataset, tmp_path, session, config, fmt):
    annotations = dataset["annotations"] + [ImageAnnotation(file="set_a/gone.jpg", boxes=[[1, 1, 5, 5]], labels=["circle"])]
    src = _write_source(fmt, annotations, tmp_path / "src")
    result = split.run(session, _with(config, src_json_path=str(src)))

    assert (result.images_total, result.images_used) == (13, 12)
    (note,) = _problems(session)
    assert note["file"].endswith("gone.jpg") and note["action"] == "image left out"
    assert "image not found" in note["problem"]


@pytest.mark.parametrize("fmt", ["drip", "coco", "voc"])
def test_missing_image_is_an_error_in_every_format_when_asked_to_fail(dataset, tmp_path, session, config, fmt):
    annotations = dataset["annotations"] + [ImageAnnotation(file="set_a/gone.jpg", boxes=[[1, 1, 5, 5]], labels=["circle"])]
    src = _write_source(fmt, annotations, tmp_path / "src")
    with pytest.raises(InputError) as caught:
        split.run(session, _with(config, src_json_path=str(src), on_bad_image="fail"))
    _one_line_error(caught, "gone.jpg: image not found", str(src), "on_bad_image: skip")


@pytest.mark.parametrize("fmt", ["drip", "voc"])
def test_same_file_name_in_different_folders_are_two_images(dataset, tmp_path, session, config, fmt):
    root = dataset["images"]
    for folder, size, colour in (("a", (50, 40), (255, 0, 0)), ("b", (40, 50), (0, 0, 255))):
        (root / "dup" / folder).mkdir(parents=True)
        Image.new("RGB", size, colour).save(root / "dup" / folder / "x.jpg")
    annotations = dataset["annotations"] + [
        ImageAnnotation(file="dup/a/x.jpg", boxes=[[1, 2, 30, 20]], labels=["circle"]),
        ImageAnnotation(file="dup/b/x.jpg", boxes=[[3, 4, 20, 45]], labels=["square"]),
    ]
    src = _write_source(fmt, annotations, tmp_path / "src")
    result = split.run(session, _with(config, src_json_path=str(src), eval_percentage=0))

    assert result.images_used == 14
    entries = _entries(session)
    a, b = entries["dup/a/x.jpg"], entries["dup/b/x.jpg"]
    assert (a["width"], a["height"], a["objects"]) == (50, 40, [{"label": "circle", "box": [1, 2, 30, 20]}])
    assert (b["width"], b["height"], b["objects"]) == (40, 50, [{"label": "square", "box": [3, 4, 20, 45]}])
    assert _problems(session) == []


@pytest.mark.parametrize("fmt", ["drip", "coco", "voc"])
def test_non_ascii_and_spaces_in_every_path(tmp_path, config, fmt):
    root = tmp_path / "Fotos ö 写真"
    names = ["Bilder ä/ü 1.jpg", "Bilder ä/ü 2.jpg", "Ñandú/001 é.png", "Ñandú/002 é.png", "ß.jpg"]
    annotations = []
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), (40 * i, 100, 100)).save(root / name)
        annotations.append(ImageAnnotation(file=name, boxes=[[2, 2, 12, 12]], labels=["Käfer" if i % 2 else "Fliege"]))
    src = _write_source(fmt, annotations, tmp_path / "Anmerkungen é")
    session = Session(tmp_path / "Sitzung ß")
    session.start_new()
    result = split.run(session, _with(config, src_json_path=str(src), image_folder_path=str(root)))

    assert (result.images_used, result.n_train + result.n_eval) == (5, 5)
    assert sorted(_entries(session)) == sorted(names)
    assert sorted(LabelMap.read(session.label_map_path).names) == ["Fliege", "Käfer"]
    assert _problems(session) == []


# -- nothing outside the image folder -----------------------------------------------------------
@pytest.fixture
def outside(tmp_path):
    """A real JPEG outside the image folder, which no annotation may reach."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(folder / "secret.jpg")
    return folder


def _symlink(link: Path, target: Path) -> None:
    try:
        link.symlink_to(target, target_is_directory=target.is_dir())
    except (OSError, NotImplementedError):
        pytest.skip("this file system cannot make symlinks")


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_symlink_out_of_the_image_folder_is_skipped_and_reported(dataset, session, config, outside, kind):
    root = dataset["images"]
    if kind == "file":
        _symlink(root / "set_a" / "link.jpg", outside / "secret.jpg")
        name = "set_a/link.jpg"
    else:
        _symlink(root / "linked", outside)
        name = "linked/secret.jpg"
    _add(dataset, ImageAnnotation(file=name, boxes=[[1, 1, 5, 5]], labels=["circle"]))
    split.run(session, config)

    assert name not in _entries(session)
    (note,) = _problems(session)
    assert (note["file"], note["action"]) == (name, "image left out")
    assert "resolves outside the image folder" in note["problem"]

    with pytest.raises(InputError) as caught:
        split.run(session, _with(config, on_bad_image="fail"))
    _one_line_error(caught, name, "resolves outside the image folder", "copy the file into it")


def test_symlink_within_the_image_folder_is_followed(dataset, session, config):
    root = dataset["images"]
    _symlink(root / "alias.jpg", root / dataset["annotations"][0].file)
    _add(dataset, ImageAnnotation(file="alias.jpg", boxes=[[1, 1, 5, 5]], labels=["circle"]))
    result = split.run(session, config)
    assert result.images_used == 13 and _problems(session) == []


@pytest.mark.parametrize("name", ["../elsewhere/secret.jpg", "..\\elsewhere\\secret.jpg", "set_a/../../elsewhere/secret.jpg", "ABSOLUTE"])
@pytest.mark.parametrize("fmt", ["drip", "voc"])
def test_annotation_paths_cannot_leave_the_image_folder(dataset, tmp_path, session, config, outside, fmt, name):
    # COCO is covered in test_annotations.py; Drip JSON and VOC <filename> share safe_relative.
    name = str(outside / "secret.jpg") if name == "ABSOLUTE" else name
    annotations = dataset["annotations"] + [ImageAnnotation(file=name, boxes=[[1, 1, 5, 5]], labels=["circle"])]
    src = _write_source(fmt, annotations, tmp_path / "src")
    if fmt == "voc":  # put the whole name in <filename>, where the traversal would be tried
        xml = sorted((src).glob("*.xml"))[-1]
        xml.write_text(f"<annotation><filename>{name}</filename></annotation>\n", encoding="utf-8")
    for policy in ("skip", "fail"):  # a path that leaves the folder is refused whatever the policy
        with pytest.raises(InputError) as caught:
            split.run(session, _with(config, src_json_path=str(src), on_bad_image=policy))
        _one_line_error(caught, repr(name), "give it relative to")


def test_voc_folder_pointing_outside_is_not_followed(dataset, tmp_path, session, config, outside):
    src = _write_source("voc", dataset["annotations"], tmp_path / "src")
    (src / "zz.xml").write_text("<annotation><folder>../elsewhere</folder><filename>secret.jpg</filename></annotation>\n")
    split.run(session, _with(config, src_json_path=str(src)))

    assert "secret.jpg" not in _entries(session)
    (note,) = _problems(session)
    assert (note["file"], note["action"]) == ("secret.jpg", "image left out")
    assert f"{dataset['images'] / 'secret.jpg'}: image not found" in note["problem"]


def _digest(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_split_never_changes_or_adds_files_in_the_input(dataset, session, config):
    root = dataset["images"]
    truncated = root / dataset["annotations"][0].file
    truncated.write_bytes(truncated.read_bytes()[:300])
    _zero_bytes(root / "zero.jpg")
    (root / "text.jpg").write_text("not an image")
    _bomb(root / "bomb.png")
    _cmyk(root / "cmyk.jpg")
    _deep(root / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (30, 20)).save(root / "rotated.jpg", exif=exif.tobytes())
    _add(dataset, *(
        ImageAnnotation(file=name, boxes=[[-5, -5, 500, 500], [3, 3, 3, 3]], labels=["circle", "square"])
        for name in ("zero.jpg", "text.jpg", "bomb.png", "cmyk.jpg", "deep.png", "rotated.jpg", "gone.jpg")
    ))
    before = _digest(dataset["metadata"].parent)
    result = split.run(session, config)

    assert result.problems > 0
    # The session lives beside the input here; only it may have changed.
    after = _digest(dataset["metadata"].parent)
    assert {k: v for k, v in after.items() if not k.startswith("pipeline/")} == {
        k: v for k, v in before.items() if not k.startswith("pipeline/")
    }


# -- the command line ---------------------------------------------------------------------------
def _starter(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "training_starter.py"), "--runtime", "local", "--session_folder", "session", *args],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )


# Each run imports torch before it reads the flags (several seconds on a small machine): slow.
@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--eval_percentage", "101"], "--eval_percentage 101 is out of range; expected 0..100"),
        (["--batch_size", "0"], "--batch_size 0 is out of range; expected 1..4096"),
        (["--src_json_path", "BROKEN"], "broken annotations.json line 2 column 12: invalid JSON"),
    ],
)
def test_user_mistake_on_the_command_line_is_one_error_line(dataset, tmp_path, args, expected):
    broken = tmp_path / "broken annotations.json"
    broken.write_text('{"images": [\n  {"file": }\n]}\n')
    args = [str(broken) if a == "BROKEN" else a for a in args]
    out = _starter(tmp_path, "--image_folder_path", str(dataset["images"]), *args)

    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("drip: error:")]
    assert len(errors) == 1, out.stderr
    assert expected in errors[0], out.stderr
    assert out.stderr.rstrip().splitlines()[-1] == errors[0]
