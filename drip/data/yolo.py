"""Reading YOLO datasets (Ultralytics, Roboflow's most common export) into Drip's in-memory form.

Two ways in, both as ``--src_json_path``:

* the ``data.yaml`` (or the folder holding it): ``names`` (a list, or a dict index -> name) and
  ``train``/``val`` (a folder of images, a list of folders, or a ``.txt`` listing images), taken
  relative to its ``path:`` or else to the yaml's own folder. ``val`` becomes the eval set.
  Roboflow writes ``train: ../train/images`` beside a yaml inside the dataset; when that does
  not exist, ``train/images`` is used, as Ultralytics does.
* a ``labels`` folder: the images are those under the ``images`` folder beside it (the same path
  with ``labels`` replaced by ``images``); the class names come from a ``classes.txt`` or a
  ``data.yaml`` in it or up to two folders above it.

A label file is found as Ultralytics finds it: the image's path with its last ``images`` folder
replaced by ``labels`` and its extension by ``.txt``. An image without one is a background image.
A line is ``class cx cy w h`` in fractions of the image size, or ``class x1 y1 x2 y2 x3 y3 ...``
(a polygon, as segmentation exports write it: its bounding box is used).

Coordinates are fractions, so each labelled image's size is read from its header (display
orientation). Image paths are relative to each split's images folder, ``Annotations.image_root``.
Reads the yaml, the label files and the image headers; writes nothing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError
from .dataset import Annotations, ImageAnnotation
from .images import IMAGE_EXTENSIONS, display_size, is_image_file

YAML_NAMES = ("data.yaml", "data.yml")
CLASSES_TXT = "classes.txt"  # the darknet / labelImg convention: one class name per line
_TOLERANCE = 1e-3  # exporters round fractions; 1.0004 is the edge, not a pixel coordinate


def is_yolo_source(path: Path) -> bool:
    """A data.yaml, a folder holding one, or a folder of label .txt files and no VOC .xml."""
    path = Path(path)
    if path.is_dir():
        if yaml_in(path) is not None:
            return True
        return not any(p.suffix.lower() == ".xml" for p in path.rglob("*")) and has_label_files(path)
    return path.suffix.lower() in (".yaml", ".yml")


def yaml_in(folder: Path) -> Path | None:
    """The data.yaml directly in ``folder``, if any: the folder then stands for it."""
    return next((folder / n for n in YAML_NAMES if (folder / n).is_file()), None)


def has_label_files(folder: Path) -> bool:
    return any(p.suffix.lower() == ".txt" and p.name != CLASSES_TXT for p in folder.rglob("*"))


# -- data.yaml ------------------------------------------------------------------------------------
def read_yaml_dataset(path: Path) -> Annotations:
    data = _read_yaml(path)
    names = _names(data.get("names"), data.get("nc"), path)
    root = _dataset_root(data, path)
    if not data.get("train"):
        raise InputError(f"{path}: no 'train' entry; name the training images folder (train: train/images)")
    notes: list[dict[str, str]] = []
    train_files, train_root = _split_files(data["train"], root, path, "train")
    classes = list(names.values())
    train = _read_images(train_files, train_root, _ultralytics_label, names, str(path), notes)
    eval_set = None
    if data.get("val"):
        val_files, val_root = _split_files(data["val"], root, path, "val")
        if set(val_files) == set(train_files):
            notes.append({
                "file": str(path),
                "problem": "'val' names the same images as 'train'",
                "action": "ignored; split at random (eval_percentage)",
            })
        else:
            val_notes: list[dict[str, str]] = []
            val = _read_images(val_files, val_root, _ultralytics_label, names, str(path), val_notes)
            notes += val_notes
            eval_set = Annotations(images=val, classes=classes, format="yolo", image_root=val_root)
    return Annotations(
        images=train, classes=classes, format="yolo", notes=notes, image_root=train_root, eval=eval_set
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc}); check --src_json_path") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or "invalid YAML"
        raise InputError(f"{path}{where}: {reason}; fix the YAML") from None
    if not isinstance(data, dict) or "names" not in data:
        raise InputError(
            f"{path}: not a YOLO data.yaml (it needs 'names' and 'train'); "
            "see https://docs.ultralytics.com/datasets/detect/"
        )
    return data


def _names(value: Any, nc: Any, source: Path) -> dict[int, str]:
    """Class index -> name, from a list or from a dict with integer keys."""
    if isinstance(value, list):
        pairs = list(enumerate(value))
    elif isinstance(value, dict):
        pairs = []
        for key, name in value.items():
            try:
                pairs.append((int(key), name))
            except (TypeError, ValueError):
                raise InputError(f"{source}: names key {key!r} is not a class index; use 0, 1, 2, ...") from None
    else:
        raise InputError(f"{source}: names must be a list of class names, found {type(value).__name__}")
    if not pairs:
        raise InputError(f"{source}: names is empty; list the class names (names: [cat, dog])")
    names: dict[int, str] = {}
    for index, name in sorted(pairs):
        clean = str(name).strip() if isinstance(name, (str, int, float)) and not isinstance(name, bool) else ""
        if not clean:
            raise InputError(f"{source}: class {index} has no name ({name!r}); name it in names")
        if clean in names.values():
            raise InputError(f"{source}: class name {clean!r} is used twice in names; merge or rename them")
        names[index] = clean
    if nc is not None and nc != len(names):
        raise InputError(f"{source}: nc is {nc!r} but names lists {len(names)} classes; make them agree")
    return names


def _dataset_root(data: dict[str, Any], yaml_path: Path) -> Path:
    here = yaml_path.parent
    value = data.get("path")
    if not value:
        return here
    path = Path(str(value)).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:  # Ultralytics looks under its datasets folder; beside the yaml, then here, is what users mean
        candidates = [here / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise InputError(
        f"{yaml_path}: path: {value} is not a folder (looked at {', '.join(map(str, candidates))}); "
        "fix it, or remove it to take train/val relative to the yaml's folder"
    )


def _split_files(value: Any, root: Path, yaml_path: Path, key: str) -> tuple[list[Path], Path]:
    """The image files one split names, and the folder their paths are relative to."""
    entries = value if isinstance(value, list) else [value]
    files: list[Path] = []
    folders: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise InputError(f"{yaml_path}: {key}: {entry!r} must be a folder of images or a .txt list of them")
        path = root / entry
        if not path.exists() and entry.startswith("../") and (root / entry[3:]).exists():
            path = root / entry[3:]  # Roboflow's layout, read as Ultralytics reads it
        path = Path(os.path.abspath(path))
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_image_file(p) and p.is_file())
            folders.append(str(path))
        elif path.is_file() and path.suffix.lower() == ".txt":
            found = _listed_images(path)
            folders += [str(p.parent) for p in found]
        else:
            raise InputError(f"{yaml_path}: {key}: {entry} not found (looked for {path}); fix the path in {yaml_path.name}")
        if not found:
            raise InputError(f"{yaml_path}: {key}: {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += found
    return sorted(set(files)), Path(os.path.commonpath(folders))


def _listed_images(listing: Path) -> list[Path]:
    try:
        lines = listing.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{listing}: cannot be read as a list of images ({exc}); fix or re-export it") from None
    # Ultralytics takes "./x.jpg" relative to the list's folder; so are other relative lines here.
    return [Path(os.path.abspath(listing.parent / line.strip())) for line in lines if line.strip()]


def _ultralytics_label(image: Path) -> Path:
    """``.../images/.../x.jpg`` -> ``.../labels/.../x.txt`` (the last ``images`` folder)."""
    text = str(image)
    sep_images, sep_labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sep_images in text:
        text = sep_labels.join(text.rsplit(sep_images, 1))
    return Path(text).with_suffix(".txt")


# -- a labels folder ------------------------------------------------------------------------------
def read_labels_folder(folder: Path) -> Annotations:
    folder = Path(os.path.abspath(folder))
    parts = folder.parts
    if "labels" in parts:
        at = len(parts) - 1 - parts[::-1].index("labels")
        images_dir = Path(*parts[:at], "images", *parts[at + 1:])
    else:
        images_dir = folder  # labels kept beside the images
    if not images_dir.is_dir():
        raise InputError(
            f"{folder}: YOLO labels, but no images folder {images_dir} beside it; "
            "keep images/ beside labels/ as YOLO tools do, or give the data.yaml"
        )
    files = sorted(p for p in images_dir.rglob("*") if is_image_file(p) and p.is_file())
    if not files:
        raise InputError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) for the YOLO labels in {folder}")
    notes: list[dict[str, str]] = []
    names, names_from = _names_near(folder)
    if names is None:
        notes.append({
            "file": str(folder),
            "problem": f"no {CLASSES_TXT} or data.yaml found in or above the labels folder",
            "action": f"classes named by their index; put a {CLASSES_TXT} (one name per line) beside the labels",
        })

    def label_of(image: Path) -> Path:
        return (folder / image.relative_to(images_dir)).with_suffix(".txt")

    images = _read_images(files, images_dir, label_of, names, names_from, notes)
    if names is None:
        found = sorted({int(label) for image in images for label in image.labels})
        classes = [str(i) for i in found]
    else:
        classes = list(names.values())
    return Annotations(images=images, classes=classes, format="yolo", notes=notes, image_root=images_dir)


def _names_near(folder: Path) -> tuple[dict[int, str] | None, str]:
    for place in (folder, folder.parent, folder.parent.parent):
        listing = place / CLASSES_TXT
        if listing.is_file():
            try:
                lines = [line.strip() for line in listing.read_text(encoding="utf-8-sig").splitlines()]
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"{listing}: cannot be read ({exc}); save it as UTF-8, one class per line") from None
            return _names([line for line in lines if line], None, listing), str(listing)
        found = yaml_in(place)
        if found is not None:
            data = _read_yaml(found)
            return _names(data.get("names"), data.get("nc"), found), str(found)
    return None, "the labels"


# -- label files ----------------------------------------------------------------------------------
def _read_images(
    files: list[Path],
    root: Path,
    label_of: Callable[[Path], Path],
    names: dict[int, str] | None,
    names_from: str,
    notes: list[dict[str, str]],
) -> list[ImageAnnotation]:
    out, background, used = [], [], set()
    for path in files:
        image = ImageAnnotation(file=path.relative_to(root).as_posix())
        out.append(image)
        label = label_of(path)
        if not label.is_file():
            background.append(image.file)
            continue
        used.add(label)
        rows = _read_label_file(label, names, names_from)
        size = display_size(path) if rows else None
        if size is None:
            continue  # no objects, or an unreadable image that the split reports and leaves out
        width, height = size
        image.width, image.height = width, height
        for index, (x0, y0, x1, y1) in rows:
            image.boxes.append([x0 * width, y0 * height, x1 * width, y1 * height])
            image.labels.append(names[index] if names is not None else str(index))
    if background:
        notes.append({
            "file": str(root),
            "problem": f"{len(background)} images have no label file ({_examples(background)})",
            "action": "used as background images (nothing to detect)",
        })
    labels_dir = label_of(root / "x.jpg").parent
    if labels_dir.is_dir():
        orphans = sorted(
            p.relative_to(labels_dir).as_posix() for p in labels_dir.rglob("*.txt")
            if p.name != CLASSES_TXT and p not in used and p.is_file()
        )
        if orphans:
            notes.append({
                "file": str(labels_dir),
                "problem": f"{len(orphans)} label files have no image ({_examples(orphans)})",
                "action": "not used",
            })
    return out


def _read_label_file(
    path: Path, names: dict[int, str] | None, names_from: str
) -> list[tuple[int, tuple[float, float, float, float]]]:
    """(class index, normalised xmin, ymin, xmax, ymax) per line; every problem names file:line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as a YOLO label file ({exc}); fix or re-export it") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise InputError(
                f"{where}: {line.strip()[:60]!r} is not numbers; expected 'class cx cy w h' (fractions of the image size)"
            ) from None
        n = len(values)
        if n != 5 and (n < 7 or n % 2 == 0):
            raise InputError(
                f"{where}: {n} values; expected 'class cx cy w h' (5) or a polygon 'class x1 y1 x2 y2 x3 y3 ...'"
            )
        index = values[0]
        if not math.isfinite(index) or not index.is_integer() or index < 0:
            raise InputError(f"{where}: class {fields[0]!r} is not a class index (0, 1, 2, ...)")
        index = int(index)
        if names is not None and index not in names:
            raise InputError(
                f"{where}: class {index} is not in the names of {names_from} "
                f"({', '.join(f'{i}: {n}' for i, n in list(names.items())[:6])}{', ...' if len(names) > 6 else ''}); "
                "fix the index or add the class to names"
            )
        coords = values[1:]
        bad = next((v for v in coords if not math.isfinite(v) or v < -_TOLERANCE or v > 1 + _TOLERANCE), None)
        if bad is not None:
            raise InputError(
                f"{where}: coordinate {bad:g} is not within 0-1; YOLO coordinates are fractions of the "
                "image width and height (divide pixel coordinates by them)"
            )
        if n == 5:
            cx, cy, w, h = coords
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        else:
            xs, ys = coords[0::2], coords[1::2]
            box = (min(xs), min(ys), max(xs), max(ys))
        rows.append((index, box))
    return rows



def _examples(items: list[str]) -> str:
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
