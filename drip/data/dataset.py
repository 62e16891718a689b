"""The in-memory form of an annotated image set, and Drip's own JSON format (not the session's
TFRecords as training reads them: ``drip.data.records``).

Every input format (COCO, Pascal VOC, Drip JSON) is read into a list of ``ImageAnnotation``; the
session's manifests (``split/train.json``, ``split/eval.json``) and the augmented boxes
(``images_augmented/annotations.json``) are written in Drip JSON, so every annotation file Drip
writes is also one it reads::

    {
      "images": [
        {"file": "cats/001.jpg", "width": 640, "height": 480,
         "objects": [{"label": "cat", "box": [12, 30, 200, 310]}]}
      ]
    }

``file`` is relative to the image folder (forward slashes); ``box`` is ``[xmin, ymin, xmax,
ymax]`` in pixels of the image as displayed (after EXIF rotation); ``width``/``height`` are
optional on input and always written by Drip.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import InputError


@dataclass
class ImageAnnotation:
    file: str  # posix path relative to the image root
    width: int | None = None
    height: int | None = None
    boxes: list[list[float]] = field(default_factory=list)  # [xmin, ymin, xmax, ymax] pixels
    labels: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific facts (e.g. COCO image id)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file}
        if self.width is not None:
            out["width"], out["height"] = self.width, self.height
        out["objects"] = [
            {"label": label, "box": [round(float(v), 3) for v in box]}
            for box, label in zip(self.boxes, self.labels)
        ]
        if self.extra:
            out["extra"] = self.extra
        return out


@dataclass
class Annotations:
    images: list[ImageAnnotation]
    classes: list[str]  # in the source's own order: COCO by category id, else first appearance
    format: str  # "coco" | "voc" | "drip" | "yolo"
    notes: list[dict[str, str]] = field(default_factory=list)  # {"file", "problem", "action"}
    # COCO only: the source's category id per class name, so results can be written back in the
    # ids the user's COCO tooling expects even though Drip renumbers classes 1..K.
    coco_category_ids: dict[str, int] | None = None
    # Where ``images[].file`` paths start when the format decides it (YOLO: each split's images
    # folder); None means the image folder the caller gave.
    image_root: Path | None = None
    # An eval set the source names itself (a data.yaml's ``val``), with its own image_root.
    eval: Annotations | None = None

    def relative_to(self, root: Path) -> list[ImageAnnotation]:
        """Every image of this set and of its eval set that lies under ``root``, named relative
        to it: what scoring needs, where the image paths are relative to ``--images_path``."""
        root = Path(os.path.abspath(root))
        out = []
        for part in (self, self.eval) if self.eval is not None else (self,):
            if part.image_root is None:
                out += part.images
                continue
            base = Path(os.path.abspath(part.image_root))
            for image in part.images:
                path = base / image.file
                if path.is_relative_to(root):
                    out.append(dataclasses.replace(image, file=path.relative_to(root).as_posix()))
        return out


def safe_relative(name: str, source: str) -> str:
    """``name`` as a clean posix path inside the image folder; an InputError if it would escape.

    Annotation files come from anywhere: ``../../etc/passwd`` or ``/abs/path`` must never make
    Drip read outside the folder the user pointed it at.
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{source}: image file name {name!r} is empty; give a path relative to the image folder")
    # No file system stores these; left in, they fail later as a ValueError deep in os.stat.
    if "\x00" in name or not encodable(name):
        raise InputError(f"{source}: image file name {name!r} has a NUL or an unpaired surrogate; fix the name")
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise InputError(
            f"{source}: image path {name!r} is absolute; give it relative to the image folder"
        )
    parts = [p for p in posix.parts if p not in ("", ".")]
    if ".." in parts or not parts:
        raise InputError(
            f"{source}: image path {name!r} leaves the image folder; give it relative to that folder"
        )
    return "/".join(parts)


def encodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def resolve_image(root: Path, relative: str) -> Path:
    """The image file for a ``safe_relative`` name, refusing symlinks that point outside ``root``."""
    path = root / relative
    try:
        real_root = root.resolve()
        if not path.resolve().is_relative_to(real_root):
            raise InputError(f"{path}: resolves outside the image folder {root}; copy the file into it")
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # NUL or unencodable characters, from a name safe_relative never saw
        raise InputError(f"{path!r}: not a usable file name ({exc}); fix the name") from None
    return path


def as_float(value: int | float) -> float:
    """A JSON number as a float; an integer too large for one is infinite, as the split sees it.

    ``float(10**400)`` raises OverflowError, and JSON allows such integers.
    """
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_drip_json(data: Any, source: str) -> list[ImageAnnotation]:
    """Parse Drip JSON already loaded from ``source``; every problem names the image entry."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{source}: expected {{\"images\": [...]}} (Drip JSON); see files/metadata.json")
    out = []
    for i, entry in enumerate(data["images"]):
        where = f"{source}: images[{i}]"
        if not isinstance(entry, dict) or "file" not in entry:
            raise InputError(f"{where} needs a \"file\" (path relative to the image folder)")
        objects = entry.get("objects", [])
        if not isinstance(objects, list):
            raise InputError(f"{where}: \"objects\" must be a list of {{\"label\", \"box\"}}")
        ann = ImageAnnotation(file=safe_relative(entry["file"], where))
        for key in ("width", "height"):
            value = entry.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise InputError(f"{where}: {key} {value!r} must be a positive integer or left out")
        ann.width, ann.height = entry.get("width"), entry.get("height")
        if isinstance(entry.get("extra"), dict):
            ann.extra = entry["extra"]
        for j, obj in enumerate(objects):
            if not isinstance(obj, dict) or "label" not in obj or "box" not in obj:
                raise InputError(f"{where}.objects[{j}] needs \"label\" and \"box\" [xmin, ymin, xmax, ymax]")
            box = obj["box"]
            if not isinstance(box, list) or len(box) != 4 or not all(is_number(v) for v in box):
                raise InputError(f"{where}.objects[{j}]: box {box!r} must be 4 numbers [xmin, ymin, xmax, ymax] in pixels")
            label = obj["label"]
            # A class id written as a number is a name too; null, a list or an object is a mistake
            # that str() would turn into a class called "None" or "[...]".
            if not isinstance(label, (str, int)) or isinstance(label, bool):
                raise InputError(f"{where}.objects[{j}]: label {label!r} must be a class name (a string)")
            ann.boxes.append([as_float(v) for v in box])
            ann.labels.append(str(label))
        out.append(ann)
    return out


def to_drip_json(annotations: list[ImageAnnotation], **meta: Any) -> dict[str, Any]:
    return {**meta, "images": [a.to_json() for a in annotations]}


def to_coco_json(annotations: list[ImageAnnotation], classes: list[str], image_root: Path) -> dict[str, Any]:
    """A COCO instances JSON of checked annotations, for other tools: category ids are Drip's
    (1..K in ``classes`` order), image ids 1..N, ``file_name`` relative to ``image_root``."""
    category = {name: i for i, name in enumerate(classes, start=1)}
    images, objects = [], []
    for image_id, image in enumerate(annotations, start=1):
        images.append({"id": image_id, "file_name": image.file, "width": image.width, "height": image.height})
        for (x0, y0, x1, y1), label in zip(image.boxes, image.labels):
            w, h = round(x1 - x0, 3), round(y1 - y0, 3)
            objects.append({
                "id": len(objects) + 1, "image_id": image_id, "category_id": category[label],
                "bbox": [round(x0, 3), round(y0, 3), w, h], "area": round(w * h, 3), "iscrowd": 0,
            })
    return {
        "info": {"description": "written by Drip's split stage", "image_root": str(image_root)},
        "licenses": [],
        "images": images,
        "annotations": objects,
        "categories": [{"id": i, "name": name, "supercategory": ""} for name, i in category.items()],
    }
