"""Reading the user's annotations, whatever tool made them, into Drip's in-memory form.

Four formats are accepted and told apart by their content, not their names:

* a folder of Pascal VOC ``.xml`` files (searched recursively), as written by labelImg, CVAT,
  Roboflow and the VOC datasets themselves;
* a COCO instances ``.json`` (``images``, ``annotations``, ``categories``);
* Drip's own JSON (``{"images": [{"file": ...}]}``, see ``drip.data.dataset``);
* a YOLO dataset: its ``data.yaml`` (or the folder holding it) or a ``labels`` folder of
  ``.txt`` files (see ``drip.data.yolo``). YOLO fixes where its images are, so its ``Annotations``
  carry their own ``image_root``, and a ``data.yaml`` naming ``val`` carries that eval set.

``load_annotations`` only reads: it never opens an image and never judges a box. Whether an image
exists, decodes and whether a box lies inside it is the split stage's business, which has the
decoded image size to judge by and the ``on_bad_image`` policy to apply, so a missing image is
handled alike in all three formats (a VOC image that is not found is returned under its
``<filename>``). What is refused here is what cannot be parsed (wrong types, missing keys,
unknown ids, paths that leave the image folder); what is dropped or changed while reading
(crowd regions) is returned in ``Annotations.notes`` for the split report.

Reads the annotation file or folder named by ``src_json_path`` and, for VOC, lists the image
folder to find images by name. Writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import InputError
from .boxes import voc_to_xyxy, xywh_to_xyxy
from .dataset import Annotations, ImageAnnotation, as_float, encodable, is_number, read_drip_json, safe_relative

ACCEPTED = (
    "a COCO instances .json (with \"images\", \"annotations\", \"categories\"), "
    "Drip JSON ({\"images\": [{\"file\": ...}]}), a folder of Pascal VOC .xml files, "
    "or a YOLO data.yaml or labels folder"
)


def load_annotations(src: Path, image_root: Path) -> Annotations:
    """Read ``src`` (file or folder) with image paths taken relative to ``image_root``."""
    from . import yolo

    src, image_root = Path(src), Path(image_root)
    if src.exists() and yolo.is_yolo_source(src):
        if src.is_dir() and yolo.yaml_in(src) is None:
            return yolo.read_labels_folder(src)
        return yolo.read_yaml_dataset(yolo.yaml_in(src) if src.is_dir() else src)
    if src.is_dir():
        return _read_voc_folder(src, image_root)
    if not src.exists():
        raise InputError(f"{src}: annotations not found; check --src_json_path (expected {ACCEPTED})")
    if src.suffix.lower() != ".json":
        raise InputError(f"{src}: not an annotation format Drip reads; give {ACCEPTED}")
    data = _read_json(src)
    if isinstance(data, dict) and "annotations" in data and "categories" in data:
        return _read_coco(data, str(src))
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        entries = data["images"]
        # Any entry with "file" marks Drip JSON; read_drip_json then names the entry that lacks it.
        if not entries or any(isinstance(e, dict) and "file" in e for e in entries):
            return _read_drip(data, str(src))
        if entries and isinstance(entries[0], dict) and "file_name" in entries[0]:
            raise InputError(
                f"{src}: looks like COCO but lacks \"annotations\" or \"categories\"; "
                "export COCO instances (object detection) JSON"
            )
    shape = f"keys {sorted(data)[:6]}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
    raise InputError(f"{src}: found {shape}, which is no annotation format Drip reads; give {ACCEPTED}")


def load_for_scoring(src: Path, images_path: Path) -> Annotations:
    """``load_annotations`` for scoring images under ``images_path``: one set (a data.yaml's
    splits together), named relative to that folder; images elsewhere are not part of it."""
    annotations = load_annotations(src, images_path)
    if annotations.image_root is None and annotations.eval is None:
        return annotations
    images = annotations.relative_to(images_path)
    return dataclasses.replace(annotations, images=images, image_root=None, eval=None)


def _read_json(src: Path) -> Any:
    """The parsed file; every way it can fail is an InputError naming it (and the line if known)."""
    try:
        raw = src.read_bytes()
    except OSError as exc:
        raise InputError(f"{src}: cannot be read ({exc.strerror or exc}); check --src_json_path") from None
    if not raw.strip():
        raise InputError(f"{src}: the annotation file is empty; export the annotations again")
    try:
        text = raw.decode("utf-8-sig")  # Windows tools often start UTF-8 files with a BOM
    except UnicodeDecodeError as exc:
        raise InputError(f"{src}: not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON") from None
    del raw
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{src} line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}); fix it") from None
    except RecursionError:
        raise InputError(f"{src}: JSON nested too deeply to be annotations; export the annotations again") from None
    except ValueError as exc:  # not a JSONDecodeError: an integer over Python's 4300-digit limit
        raise InputError(f"{src}: invalid JSON ({exc}); export the annotations again") from None
    # "\ud800" is valid JSON but no file name, label or output file can hold a lone surrogate;
    # check the parsed data only when the text has such escapes (emoji are written as pairs).
    if _SURROGATE_ESCAPE.search(text) and not encodable(json.dumps(data, ensure_ascii=False)):
        raise InputError(
            f"{src}: a string holds an unpaired \\uD800-\\uDFFF escape, which is no character; fix the exporter's output"
        )
    return data


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


# -- Drip JSON ------------------------------------------------------------------------------------
def _read_drip(data: dict[str, Any], source: str) -> Annotations:
    images = read_drip_json(data, source)
    # A manifest written by Drip lists its classes, including ones with no box left in it; keep
    # that order so re-reading a manifest gives the same ids.
    declared = data.get("classes")
    declared = declared if isinstance(declared, list) else []
    # Stripped and unique like the labels, or a hand-edited list could give one class two ids.
    classes = list(dict.fromkeys(c.strip() for c in declared if isinstance(c, str) and c.strip()))
    for i, image in enumerate(images):
        for j, label in enumerate(image.labels):
            clean = label.strip()
            if not clean:
                raise InputError(f"{source}: images[{i}].objects[{j}] has an empty label; name the class")
            image.labels[j] = clean
            if clean not in classes:
                classes.append(clean)
    return Annotations(images=images, classes=classes, format="drip")


# -- COCO -----------------------------------------------------------------------------------------
def _read_coco(data: dict[str, Any], source: str) -> Annotations:
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(f"{source}: COCO \"{key}\" must be a list, found {type(data.get(key)).__name__}")

    names_by_id: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        where = f"{source}: categories[{i}]"
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise InputError(f"{where} needs an integer \"id\" and a string \"name\", found {cat!r}")
        name = cat["name"].strip()
        if not name:
            raise InputError(f"{where}: category id {cat['id']} has an empty name; name it")
        if cat["id"] in names_by_id:
            raise InputError(f"{where}: category id {cat['id']} is used twice; ids must be unique")
        if name in names_by_id.values():
            raise InputError(f"{where}: category name {name!r} is used twice; merge or rename the categories")
        names_by_id[cat["id"]] = name
    # Sorted by id, so the class order (and so Drip's 1..K ids) follows the source's numbering
    # even when it has gaps, as COCO's own 1..90 does.
    classes = [names_by_id[i] for i in sorted(names_by_id)]

    by_image_id: dict[Any, ImageAnnotation] = {}
    images = []
    for i, entry in enumerate(data["images"]):
        where = f"{source}: images[{i}]"
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise InputError(f"{where} needs \"id\" and \"file_name\"")
        image_id = entry["id"]
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            raise InputError(f"{where}: id {image_id!r} must be an integer or a string")
        if image_id in by_image_id:
            raise InputError(f"{where}: image id {image_id!r} is used twice; ids must be unique")
        image = ImageAnnotation(
            file=safe_relative(entry["file_name"], where),
            width=_optional_size(entry.get("width"), f"{where}: width"),
            height=_optional_size(entry.get("height"), f"{where}: height"),
            extra={"coco_image_id": image_id},
        )
        by_image_id[image_id] = image
        images.append(image)

    notes = []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise InputError(f"{source}: annotations[{i}] must be an object, found {type(ann).__name__}")
        where = f"{source}: annotation id {ann['id']!r}" if "id" in ann else f"{source}: annotations[{i}]"
        # Ids are looked up in dicts: a list or object as an id is a mistake, not a TypeError.
        image_id = ann.get("image_id")
        image = by_image_id.get(image_id) if isinstance(image_id, (int, float, str)) else None
        if image is None:
            raise InputError(
                f"{where}: image_id {ann.get('image_id')!r} is not in \"images\"; "
                "add the image or remove the annotation"
            )
        category_id = ann.get("category_id")
        if not isinstance(category_id, (int, float, str)) or category_id not in names_by_id:
            raise InputError(
                f"{where}: category_id {ann.get('category_id')!r} is not in \"categories\" "
                f"(ids {sorted(names_by_id)}); add the category or fix the id"
            )
        if ann.get("iscrowd") in (1, True):
            # A crowd region marks many objects as one blob; training on it as a single box would
            # teach the detector wrong extents, which is why COCO's own evaluation ignores them.
            problem = f"annotation {ann.get('id', i)!r} is a crowd region (iscrowd: 1)"
            notes.append({"file": image.file, "problem": problem, "action": "left out"})
            continue
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
            raise InputError(f"{where}: bbox {bbox!r} must be 4 numbers [x, y, width, height] in pixels")
        image.boxes.append(xywh_to_xyxy([as_float(v) for v in bbox]))
        image.labels.append(names_by_id[ann["category_id"]])

    return Annotations(
        images=images,
        classes=classes,
        format="coco",
        notes=notes,
        coco_category_ids={name: cid for cid, name in names_by_id.items()},
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_size(value: Any, where: str) -> int | None:
    """A width or height that may be absent; exporters write ints, some write 640.0."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value) or value < 0:
        raise InputError(f"{where} {value!r} must be a positive integer or left out")
    return value or None  # 0 is how some tools say "unknown"


# -- Pascal VOC -----------------------------------------------------------------------------------
class _NameIndex:
    """Files under the image folder by base name, listed once on first use.

    Most VOC folders name images by file name alone, with ``<folder>`` naming a directory that
    only existed on the annotator's machine, so lookups by name are the common case.
    """

    def __init__(self, root: Path):
        self.root = root
        self._by_name: dict[str, list[str]] | None = None

    def find(self, name: str) -> list[str]:
        if self._by_name is None:
            self._by_name = {}
            for path in sorted(self.root.rglob("*")):
                if path.is_file():
                    self._by_name.setdefault(path.name, []).append(path.relative_to(self.root).as_posix())
        return self._by_name.get(name, [])


def _read_voc_folder(folder: Path, image_root: Path) -> Annotations:
    from lxml import etree

    xml_files = sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".xml" and p.is_file())
    if not xml_files:
        raise InputError(f"{folder}: a folder, but no Pascal VOC .xml files in it; give {ACCEPTED}")
    # Annotation files are untrusted input: no entity expansion, no network fetches.
    parser = etree.XMLParser(resolve_entities=False, no_network=True, remove_comments=True)
    index = _NameIndex(image_root)
    images, classes, notes = [], [], []
    for xml in xml_files:
        try:
            root = etree.parse(str(xml), parser).getroot()
        except etree.XMLSyntaxError as exc:
            line = exc.position[0] if exc.position else exc.lineno
            reason = " ".join(str(exc.msg).split())  # libxml2 messages can hold newlines
            raise InputError(f"{xml} line {line}: malformed XML ({reason}); fix or remove the file") from None
        if root.tag != "annotation":
            problem = f"root element <{root.tag}> is not a Pascal VOC <annotation>"
            notes.append({"file": str(xml), "problem": problem, "action": "file ignored"})
            continue
        image = _read_voc_file(root, xml, folder, image_root, index)
        for label in image.labels:
            if label not in classes:
                classes.append(label)
        images.append(image)
    return Annotations(images=images, classes=classes, format="voc", notes=notes)


def _read_voc_file(root, xml: Path, folder: Path, image_root: Path, index: _NameIndex) -> ImageAnnotation:
    filename = _text(root, "filename")
    if not filename:
        # Some exporters leave <filename> out but write the full original <path>.
        path_text = _text(root, "path")
        filename = PurePosixPath(path_text.replace("\\", "/")).name if path_text else ""
    if not filename:
        raise InputError(f"{xml} line {root.sourceline}: no <filename> (or <path>) naming the image; add one")
    relative = _locate_voc_image(xml, folder, image_root, _text(root, "folder"), filename, index)

    size = root.find("size")
    width = _voc_size(size, "width", xml)
    height = _voc_size(size, "height", xml)
    image = ImageAnnotation(file=relative, width=width, height=height)
    for obj in root.findall("object"):  # direct children: <part> boxes inside objects are not objects
        name = _text(obj, "name")
        if not name:
            raise InputError(f"{xml} line {obj.sourceline}: <object> has no <name>; name its class")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise InputError(
                f"{xml} line {obj.sourceline}: <object> {name!r} has no <bndbox>; give xmin/ymin/xmax/ymax"
            )
        xmin, ymin, xmax, ymax = (_voc_number(bndbox, key, xml) for key in ("xmin", "ymin", "xmax", "ymax"))
        # VOC coordinates are 1-based pixel indices with inclusive ends: (1, W) covers the whole
        # image. In the 0-based continuous coordinates torchvision uses, that image spans 0..W,
        # so the start moves by one and the inclusive end is already the exclusive edge; this is
        # also how detectron2 reads VOC. Fractional values (some exporters write them) keep
        # their fraction.
        image.boxes.append(voc_to_xyxy([xmin, ymin, xmax, ymax]))
        image.labels.append(name)
    return image


def _locate_voc_image(
    xml: Path, folder: Path, image_root: Path, voc_folder: str, filename: str, index: _NameIndex
) -> str:
    """The image's path relative to ``image_root``; tries the likely places before searching."""
    where = f"{xml}: <filename>"
    name = safe_relative(filename, where)
    candidates = []
    if voc_folder:
        try:
            candidates.append(safe_relative(f"{voc_folder}/{name}", f"{xml}: <folder>"))
        except InputError:
            pass  # <folder> is often an absolute path from the annotator's machine: not a clue
    candidates.append(name)
    # Images kept beside their XML files, in a tree mirrored under the image folder.
    beside = xml.parent.relative_to(folder).as_posix()
    if beside != ".":
        candidates.append(f"{beside}/{name}")
    for candidate in candidates:
        if (image_root / candidate).is_file():
            return candidate
    found = index.find(PurePosixPath(name).name)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise InputError(
            f"{xml}: image {filename!r} matches several files under {image_root} "
            f"({', '.join(found[:5])}); set <folder> so '<folder>/<filename>' names one"
        )
    # Not found: returned as named, so the split reports it like a missing image in COCO or Drip
    # JSON (left out and reported, or an error with on_bad_image: fail) instead of refusing here.
    return name


def _text(element, tag: str) -> str:
    child = element.find(tag)
    return (child.text or "").strip() if child is not None else ""


def _voc_number(bndbox, key: str, xml: Path) -> float:
    child = bndbox.find(key)
    line = child.sourceline if child is not None else bndbox.sourceline
    text = (child.text or "").strip() if child is not None else ""
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{xml} line {line}: <{key}> is {text!r}, expected a number of pixels") from None


def _voc_size(size, key: str, xml: Path) -> int | None:
    """Width or height from ``<size>``; absent, empty or 0 means unknown (the split measures it)."""
    if size is None:
        return None
    child = size.find(key)
    text = (child.text or "").strip() if child is not None else ""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or not value.is_integer():
        raise InputError(f"{xml} line {child.sourceline}: <{key}> is {text!r}, expected a whole number of pixels")
    return int(value) or None
