"""The split stage: check the user's annotations and images, then divide them into train and eval.

Reads the annotations (``src_json_path``: COCO, Pascal VOC or Drip JSON), every image they name
under ``image_folder_path``, and the optional ``class_map_path``. Writes, in the session:

* ``label_map.pbtxt``: the class ids every later stage uses;
* ``split/train.json`` and ``split/eval.json``: Drip JSON manifests holding only usable images,
  with their decoded (display) size and boxes clipped to it;
* ``split/report.json``: every problem found and what was done about it;
* the ``split`` entry of ``session.json``;
* with ``tile_size``: ``images_tiled/``, the training images larger than a tile cut into tiles
  (``drip.tiling`` has the rules) and the others copied whole; ``split/train.json`` then lists
  these, and the report counts tiles, background tiles and dropped box fragments. The split is
  made per source image before cutting, so no image has tiles in both halves; eval images stay
  whole.

Nothing the user gave is modified. Images whose boxes were all unusable, and images that had no
boxes to begin with, are kept as background images: they still teach the detector what is not an
object, which is how it learns not to fire on empty scenes. Image files in the folder that no
annotation names are not used (unlabelled is not the same as empty) and are counted in one report
entry.

What goes wrong with the input is handled here, before any other stage runs: every image is
decoded (an unusable one is left out and reported, or is an error with ``on_bad_image: fail``),
every box is checked against the decoded size (clipped or dropped, and reported), and file names
that would lead outside the image folder, symlinks included, are refused.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import console
from ..annotations import Annotations, load_annotations
from ..config import Config
from ..dataset import ImageAnnotation, resolve_image, to_drip_json
from ..errors import InputError
from ..images import is_image_file, open_rgb_checked
from ..labelmap import LabelMap
from ..parallel import cores, ordered_map
from ..session import Session, write_json
from ..tiling import tile_training_images

# Exporters compute x + w in floating point; a box ending a hair past the edge is rounding, not a
# labelling mistake, so it is clipped without filling the report.
_SILENT_CLIP_PX = 0.5


@dataclass
class SplitResult:
    n_train: int
    n_eval: int
    classes: list[str]
    images_total: int  # images named by the annotations
    images_used: int  # images in train + eval
    problems: int  # entries in split/report.json
    train_objects: dict[str, int]  # boxes per class
    eval_objects: dict[str, int]


def run(session: Session, config: Config) -> SplitResult:
    src = Path(config.src_json_path)
    image_root = Path(config.image_folder_path)
    if not image_root.is_dir():
        raise InputError(f"{image_root}: image folder not found; check --image_folder_path")
    annotations = load_annotations(src, image_root)
    if not annotations.images:
        raise InputError(f"{src}: lists no images; annotate some images, or check --src_json_path")
    notes = list(annotations.notes)
    _refuse_duplicates(annotations.images, src)
    _note_unlisted(image_root, annotations.images, notes)

    class_map = None
    if config.class_map_path:
        class_map = LabelMap.read(Path(config.class_map_path))
        _check_labels(annotations, class_map, Path(config.class_map_path), src)

    usable = _check_images(annotations.images, image_root, src, config.on_bad_image, notes)
    for image in usable:
        _check_boxes(image, notes)
    if not usable:
        raise InputError(
            f"{src}: none of its {len(annotations.images)} images can be used (the first: "
            f"{_first_left_out(notes)}); check --image_folder_path {image_root}"
        )
    if not any(image.boxes for image in usable):
        raise InputError(
            f"{src}: no usable boxes in {len(usable)} images; annotate at least one object "
            "(images without boxes only teach what is not an object)"
        )

    if class_map is None:
        with_boxes = {label for image in usable for label in image.labels}
        names = [c for c in annotations.classes if c in with_boxes]
        names += sorted(with_boxes - set(names))  # no reader does this today; never lose a class
        class_map = LabelMap.from_names(names)
    names = list(class_map.names)

    train, eval_ = split_images(usable, names, config.eval_percentage, config.seed, src)

    class_map.write(session.label_map_path)
    meta = {"image_root": str(image_root.resolve()), "classes": names}
    if annotations.coco_category_ids is not None:
        coco_ids = annotations.coco_category_ids
        meta["coco_category_ids"] = {name: coco_ids[name] for name in names if name in coco_ids}
    train_meta, tiles = meta, None
    if config.tile_size:
        train_items, tiles = tile_training_images(
            train, image_root, session.images_tiled, config.tile_size, config.tile_overlap, config.seed, notes,
            min(4, cores()),
        )
        train_meta = {**meta, "image_root": str(session.images_tiled.resolve())}
    else:
        train_items = train
    write_json(session.train_manifest, to_drip_json(train_items, **train_meta))
    write_json(session.eval_manifest, to_drip_json(eval_, **meta))
    write_json(
        session.report_path,
        {
            "format": annotations.format,
            "source": str(src),
            "images_total": len(annotations.images),
            "images_used": len(usable),
            "train": len(train),
            "eval": len(eval_),
            **({"tiling": tiles.to_json()} if tiles else {}),
            "problems": notes,
        },
    )

    result = SplitResult(
        n_train=len(train),
        n_eval=len(eval_),
        classes=names,
        images_total=len(annotations.images),
        images_used=len(usable),
        problems=len(notes),
        train_objects=_count_objects(train, names),
        eval_objects=_count_objects(eval_, names),
    )
    _print_summary(result, annotations.format, src, session)
    if tiles:
        console.info(
            f"tiles of {tiles.tile_size} px: {tiles.images_tiled} training images cut into {tiles.tiles} tiles "
            f"({tiles.tiles_with_objects} with objects, {tiles.background_tiles} background), "
            f"{tiles.images_whole} kept whole; {tiles.fragments_dropped} box fragments under "
            f"{tiles.min_visible:g} visible dropped, {tiles.boxes_lost} boxes on no tile"
        )
    facts = {"tiles": len(train_items)} if tiles else {}
    session.record_stage("split", train=len(train), eval=len(eval_), classes=names, source=str(src), **facts)
    return result


# -- checks -----------------------------------------------------------------------------------
def _refuse_duplicates(images: list[ImageAnnotation], src: Path) -> None:
    # Merging two annotation sets of one image would guess; which one is right is the user's call.
    counts = Counter(image.file for image in images)
    repeated = [name for name, n in counts.items() if n > 1]
    if repeated:
        more = f" (and {len(repeated) - 1} more)" if len(repeated) > 1 else ""
        raise InputError(
            f"{src}: image {repeated[0]!r} is annotated {counts[repeated[0]]} times{more}; "
            "keep one entry per image with all its boxes"
        )


def _note_unlisted(root: Path, images: list[ImageAnnotation], notes: list[dict]) -> None:
    """One note for the image files under ``root`` that no annotation names.

    They are not used: an image nobody annotated may well show objects, and training on it as
    background would teach the detector to miss them. An image listed with no boxes is the way
    to say "nothing here".
    """
    listed = {image.file for image in images}
    unlisted = []
    for folder, _, files in os.walk(root):  # does not follow symlinked folders
        for name in files:
            relative = Path(folder, name).relative_to(root).as_posix()
            if is_image_file(Path(name)) and relative not in listed:
                unlisted.append(relative)
    if unlisted:
        unlisted.sort()
        examples = ", ".join(unlisted[:3]) + (", ..." if len(unlisted) > 3 else "")
        notes.append({
            "file": str(root),
            "problem": f"{len(unlisted)} image files in the image folder are in no annotation ({examples})",
            "action": "not used; to train on one as background (nothing to detect), list it with no boxes",
        })


def _first_left_out(notes: list[dict]) -> str:
    left_out = [note["problem"] for note in notes if note["action"] == "image left out"]
    return left_out[0] if left_out else "no images listed"


def _check_labels(annotations: Annotations, class_map: LabelMap, class_map_path: Path, src: Path) -> None:
    known = set(class_map.names)
    unknown = sorted({label for image in annotations.images for label in image.labels} - known)
    if unknown:
        raise InputError(
            f"{src}: labels {', '.join(map(repr, unknown))} are not in the class map {class_map_path} "
            f"(it has {', '.join(map(repr, class_map.names))}); add them to the class map or fix the labels"
        )


def _measure(root: Path, image: ImageAnnotation) -> tuple[int, int, str] | InputError:
    """The display size of one image and the SHA-256 of the bytes decoded, or the error that
    makes it unusable (returned, not raised, so one bad file does not stop the other threads)."""
    try:
        path = resolve_image(root, image.file)
        if not path.is_file():
            return InputError(f"{path}: image not found; check --image_folder_path and the file name")
        img, digest = open_rgb_checked(path)
        with img:
            return img.width, img.height, digest
    except InputError as exc:
        return exc
    except OSError as exc:  # is_file() on a name the OS refuses (too long, say)
        return InputError(f"{root / image.file}: cannot be read ({exc.strerror or exc}); check the file name")


def _check_images(
    images: list[ImageAnnotation], root: Path, src: Path, on_bad_image: str, notes: list[dict]
) -> list[ImageAnnotation]:
    """Decode every image once; keep the usable ones with their display size."""
    # Pillow releases the GIL while decoding, so threads use every core without pickling images.
    measured = ordered_map(lambda image: _measure(root, image), images, min(8, cores()))
    sizes = list(console.progress(measured, total=len(images), desc="checking images"))
    bad = [(image, size) for image, size in zip(images, sizes) if isinstance(size, InputError)]
    if bad and on_bad_image == "fail":
        image, error = bad[0]
        others = f" ({len(bad) - 1} more images are unusable too)" if len(bad) > 1 else ""
        raise InputError(
            f"{error} (named in {src}{others}); or set on_bad_image: skip to leave unusable images out"
        )
    usable = []
    for image, size in zip(images, sizes):
        if isinstance(size, InputError):
            notes.append({"file": image.file, "problem": str(size), "action": "image left out"})
            continue
        width, height, digest = size
        # The records stage stores the file without decoding it again while it has this digest.
        image.extra["sha256"] = digest
        if image.width is not None and (image.width, image.height) != (width, height):
            # Boxes are taken to be in display coordinates, the convention of labelImg and CVAT
            # exports; a swapped size usually means the annotation stored the pre-EXIF size.
            notes.append({
                "file": image.file,
                "problem": f"annotation says {image.width}x{image.height}, the image displays as {width}x{height}",
                "action": f"used {width}x{height}; boxes taken as display coordinates",
            })
        image.width, image.height = width, height
        usable.append(image)
    return usable


def _check_boxes(image: ImageAnnotation, notes: list[dict]) -> None:
    """Drop boxes that cannot be trained on and clip the rest to the image, noting each change."""
    width, height = image.width, image.height
    boxes, labels = [], []
    for box, label in zip(image.boxes, image.labels):
        what = f"{label!r} box {_show(box)}"

        def note(problem: str, action: str = "box dropped") -> None:
            notes.append({"file": image.file, "problem": f"{what} {problem}", "action": action})

        xmin, ymin, xmax, ymax = box
        if not all(math.isfinite(v) for v in box):
            note("has a non-finite coordinate")
        elif xmax <= xmin or ymax <= ymin:
            note("has zero area or is inverted (xmax <= xmin or ymax <= ymin)")
        elif xmax <= 0 or ymax <= 0 or xmin >= width or ymin >= height:
            note(f"lies entirely outside the {width}x{height} image")
        else:
            clipped = [max(0.0, xmin), max(0.0, ymin), min(float(width), xmax), min(float(height), ymax)]
            if max(abs(a - b) for a, b in zip(clipped, box)) > _SILENT_CLIP_PX:
                note(f"extends past the {width}x{height} image", f"clipped to {_show(clipped)}")
            boxes.append(clipped)
            labels.append(label)
    image.boxes, image.labels = boxes, labels


def _show(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


# -- the split ------------------------------------------------------------------------------------
def split_images(
    images: list[ImageAnnotation], classes: list[str], eval_percentage: float, seed: int, src: Path
) -> tuple[list[ImageAnnotation], list[ImageAnnotation]]:
    """(train, eval): seeded, stratified by each image's rarest class, both in input order.

    Grouping by the rarest class puts the images that carry a rare class in a group of their own,
    so a class seen in only a few images still reaches both halves; each group gives its share
    to eval and the shares are balanced so the eval total is ``eval_percentage`` of all images.
    """
    n = len(images)
    fraction = eval_percentage / 100.0
    target = math.floor(fraction * n + 0.5)
    if fraction > 0 and target == 0:
        raise InputError(
            f"{src}: eval_percentage {eval_percentage:g} of {n} usable images leaves no image for "
            f"evaluation; raise it to at least {math.ceil(5000 / n) / 100:g}, "
            "or set it to 0 to train without evaluation"
        )
    if target >= n:
        raise InputError(
            f"{src}: eval_percentage {eval_percentage:g} of {n} usable images leaves no image for "
            "training; lower it (20 is usual)"
        )

    images_per_class = Counter(label for image in images for label in set(image.labels))
    order = {name: i for i, name in enumerate(classes)}
    groups: dict[int, list[int]] = {}
    for i, image in enumerate(images):
        present = set(image.labels)
        # Rarest first, ties by class id; background images form their own group at the end.
        key = min((images_per_class[c], order[c]) for c in present)[1] if present else len(classes)
        groups.setdefault(key, []).append(i)

    rng = np.random.default_rng(seed)
    keys = sorted(groups)
    members = []
    for key in keys:
        # Sorting by file first makes the split depend on the seed and the data, not on the order
        # of entries in the annotation file.
        indices = sorted(groups[key], key=lambda i: images[i].file)
        members.append([indices[j] for j in rng.permutation(len(indices))])
    quotas = _quotas([len(m) for m in members], fraction, target)

    in_eval = set()
    for group, quota in zip(members, quotas):
        in_eval.update(group[:quota])
    train = [image for i, image in enumerate(images) if i not in in_eval]
    eval_ = [image for i, image in enumerate(images) if i in in_eval]
    return train, eval_


def _quotas(sizes: list[int], fraction: float, target: int) -> list[int]:
    """Eval images per group: each near ``fraction`` of the group, summing to ``target``.

    A group of two or more gives at least one image to each half while the total allows; the
    total wins over that preference, since the eval size is what the user asked for.
    """
    if target == 0:
        return [0] * len(sizes)
    ideal = [fraction * s for s in sizes]
    low = [1 if s >= 2 else 0 for s in sizes]
    high = [s - 1 if s >= 2 else s for s in sizes]
    quotas = [min(max(math.floor(x + 0.5), lo), hi) for x, lo, hi in zip(ideal, low, high)]
    for relaxed in (False, True):
        if relaxed:
            low, high = [0] * len(sizes), list(sizes)
        while sum(quotas) < target:
            can = [g for g in range(len(sizes)) if quotas[g] < high[g]]
            if not can:
                break
            # The group furthest below its ideal share gets the next image.
            g = max(can, key=lambda g: (ideal[g] - quotas[g], sizes[g], -g))
            quotas[g] += 1
        while sum(quotas) > target:
            can = [g for g in range(len(sizes)) if quotas[g] > low[g]]
            if not can:
                break
            g = min(can, key=lambda g: (ideal[g] - quotas[g], -sizes[g], g))
            quotas[g] -= 1
    return quotas


# -- reporting ------------------------------------------------------------------------------------
def _count_objects(images: list[ImageAnnotation], names: list[str]) -> dict[str, int]:
    counts = Counter(label for image in images for label in image.labels)
    return {name: counts.get(name, 0) for name in names}


def _print_summary(result: SplitResult, fmt: str, src: Path, session: Session) -> None:
    console.info(
        f"split {result.images_used} of {result.images_total} images from {src} ({fmt}): "
        f"{result.n_train} train, {result.n_eval} eval"
    )
    width = max(len(name) for name in result.classes)
    for name in result.classes:
        console.info(
            f"  {name:<{width}}  {result.train_objects[name]:>6} train  {result.eval_objects[name]:>6} eval objects"
        )
    if result.problems:
        console.info(f"{result.problems} problems found and handled; details in {session.report_path}")
