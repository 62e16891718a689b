"""The split stage: check the user's annotations and images, then divide them into train and eval.

Reads the annotations (``src_json_path``: COCO, Pascal VOC, Drip JSON or YOLO), the optional
eval set (``eval_json_path``, or a YOLO data.yaml's ``val``), every image they name under
``image_folder_path`` (YOLO: under its own images folders), and the optional
``class_map_path``. Writes, in the session:

* ``label_map.pbtxt``: the class ids every later stage uses;
* ``split/train.json`` and ``split/eval.json``: Drip JSON manifests holding only usable images,
  with their decoded (display) size and boxes clipped to it, each with its ``image_root``;
* ``split/train.coco.json`` and ``split/eval.coco.json``: the same as COCO instances JSON, so
  the checked split can be taken to other tools (the source images, before any tiling);
* ``split/report.json``: every problem found and what was done about it, and the byte-identical
  images found;
* the ``split`` entry of ``session.json``;
* with ``tile_size``: ``images_tiled/``, the training images larger than a tile cut into tiles
  (``drip.data.tiling`` has the rules) and the others copied whole; ``split/train.json`` then lists
  these, and the report counts tiles, background tiles and dropped box fragments. The split is
  made per source image before cutting, so no image has tiles in both halves; eval images stay
  whole.

Identical images (same bytes, any names) would put on the eval side what was trained on. The
random split keeps each set of them on one side. A split the user gave is theirs: copies found
across it are reported, with a warning, and left where the user put them.

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
from ..config import Config
from ..data.annotations import load_annotations
from ..data.dataset import Annotations, ImageAnnotation, resolve_image, to_coco_json, to_drip_json
from ..data.images import is_image_file, open_rgb_checked
from ..data.labelmap import LabelMap
from ..data.tiling import tile_training_images
from ..errors import InputError
from ..parallel import cores, ordered_map
from ..session import Session, write_json

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
    identical_copies: int = 0  # images that repeat another image's bytes
    identical_across: int = 0  # of those, eval images with a copy in train (given splits only)
    eval_source: str | None = None  # the user's eval set, or None for the random split


@dataclass
class _Part:
    """One side as the user gave it: the annotations, where they came from, where images start."""

    images: list[ImageAnnotation]
    source: Path
    root: Path


def run(session: Session, config: Config) -> SplitResult:
    src = Path(config.src_json_path)
    folder = Path(config.image_folder_path)
    annotations = load_annotations(src, folder)
    if not annotations.images:
        raise InputError(f"{src}: lists no images; annotate some images, or check --src_json_path")
    notes = list(annotations.notes)
    classes = list(annotations.classes)
    train_part = _Part(annotations.images, src, _root(annotations, folder))
    eval_part = None
    if config.eval_json_path:
        eval_src = Path(config.eval_json_path)
        if annotations.eval is not None:
            raise InputError(
                f"--eval_json_path {eval_src}: {src} names its own eval set (val); "
                f"use one of them: drop --eval_json_path, or 'val' from {src.name}"
            )
        given = load_annotations(eval_src, folder)
        notes += given.notes
        given = given.eval if given.eval is not None else given  # a data.yaml gives its val
        classes += [c for c in given.classes if c not in classes]
        eval_part = _Part(given.images, eval_src, _root(given, folder))
    elif annotations.eval is not None:
        eval_part = _Part(annotations.eval.images, src, _root(annotations.eval, folder))
    parts = [train_part] + ([eval_part] if eval_part else [])
    if eval_part is not None and not eval_part.images:
        raise InputError(f"{eval_part.source}: lists no eval images; annotate some, or leave --eval_json_path out")
    for part in parts:
        _refuse_duplicates(part.images, part.source)
    _note_unlisted(parts, notes)

    class_map = None
    if config.class_map_path:
        class_map = LabelMap.read(Path(config.class_map_path))
        for part in parts:
            _check_labels(part.images, class_map, Path(config.class_map_path), part.source)

    usable = []
    for part in parts:
        kept = _check_images(part.images, part.root, part.source, config.on_bad_image, notes)
        for image in kept:
            _check_boxes(image, notes)
        if not kept:
            raise InputError(
                f"{part.source}: none of its {len(part.images)} images can be used (the first: "
                f"{_first_left_out(notes)}); "
                + (f"check --image_folder_path {part.root}" if part.root == folder else f"check the images in {part.root}")
            )
        usable.append(kept)
    if not any(image.boxes for image in usable[0]):
        raise InputError(
            f"{src}: no usable boxes in {len(usable[0])} images; annotate at least one object "
            "(images without boxes only teach what is not an object)"
        )

    if class_map is None:
        with_boxes = {label for kept in usable for image in kept for label in image.labels}
        names = [c for c in classes if c in with_boxes]
        names += sorted(with_boxes - set(names))  # no reader does this today; never lose a class
        class_map = LabelMap.from_names(names)
    names = list(class_map.names)

    if eval_part is None:
        train, eval_ = split_images(usable[0], names, config.eval_percentage, config.seed, src)
        identical = _identical_sets(train + eval_)
        across = []
    else:
        train, eval_ = usable
        untrained = sorted({label for image in eval_ for label in image.labels} - {label for image in train for label in image.labels})
        if untrained:
            console.warn(
                f"{eval_part.source}: classes {', '.join(map(repr, untrained))} have eval boxes but no "
                "training boxes: the model cannot learn them and scores 0 AP on them; add training images"
            )
        identical = _identical_sets(train + eval_)
        across = _across(identical, set(map(id, eval_)))
        if across:
            first_train, first_eval = across[0]
            console.warn(
                f"{len(across)} eval images have a byte-identical copy among the training images "
                f"(e.g. eval {first_eval!r} = train {first_train!r}): eval scores will read too "
                f"high; remove them from one side (kept as given; listed in {session.report_path})"
            )

    class_map.write(session.label_map_path)
    meta: dict = {"classes": names}
    if annotations.coco_category_ids is not None:
        coco_ids = annotations.coco_category_ids
        meta["coco_category_ids"] = {name: coco_ids[name] for name in names if name in coco_ids}
    eval_root = eval_part.root if eval_part else train_part.root
    train_items, train_root, tiles = train, train_part.root, None
    if config.tile_size:
        train_items, tiles = tile_training_images(
            train, train_part.root, session.images_tiled, config.tile_size, config.tile_overlap, config.seed, notes,
            min(4, cores()),
        )
        train_root = session.images_tiled
    write_json(session.train_manifest, to_drip_json(train_items, image_root=str(train_root.resolve()), **meta))
    write_json(session.eval_manifest, to_drip_json(eval_, image_root=str(eval_root.resolve()), **meta))
    write_json(session.train_coco, to_coco_json(train, names, train_part.root.resolve()))
    write_json(session.eval_coco, to_coco_json(eval_, names, eval_root.resolve()))
    copies = sum(len(group) - 1 for group in identical)
    write_json(
        session.report_path,
        {
            "format": annotations.format,
            "source": str(src),
            "eval_source": str(eval_part.source) if eval_part else "random split (eval_percentage)",
            "images_total": sum(len(part.images) for part in parts),
            "images_used": len(train) + len(eval_),
            "train": len(train),
            "eval": len(eval_),
            **({"tiling": tiles.to_json()} if tiles else {}),
            # Byte-identical images: a random split keeps each set on one side; a given split is
            # kept as given, and the copies found on both sides are listed.
            "identical_images": {
                "copies": copies,
                "sets": [[image.file for image in group] for group in identical[:_LISTED]],
                "across_train_and_eval": [{"train": t, "eval": e} for t, e in across[:_LISTED]],
                "across_count": len(across),
            },
            "problems": notes,
        },
    )

    result = SplitResult(
        n_train=len(train),
        n_eval=len(eval_),
        classes=names,
        images_total=sum(len(part.images) for part in parts),
        images_used=len(train) + len(eval_),
        problems=len(notes),
        train_objects=_count_objects(train, names),
        eval_objects=_count_objects(eval_, names),
        identical_copies=copies,
        identical_across=len(across),
        eval_source=str(eval_part.source) if eval_part else None,
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


_LISTED = 50  # identical sets written out in full in the report; the counts are always whole


def _root(annotations: Annotations, folder: Path) -> Path:
    """Where this set's image paths start: its own root (YOLO), else --image_folder_path."""
    if annotations.image_root is not None:
        return annotations.image_root
    if not folder.is_dir():
        raise InputError(f"{folder}: image folder not found; check --image_folder_path")
    return folder


def _identical_sets(images: list[ImageAnnotation]) -> list[list[ImageAnnotation]]:
    """Images with the same bytes (the digest the check recorded), two or more to a set."""
    by_digest: dict[str, list[ImageAnnotation]] = {}
    for image in images:
        digest = image.extra.get("sha256")
        if digest:
            by_digest.setdefault(digest, []).append(image)
    return [group for group in by_digest.values() if len(group) > 1]


def _across(identical: list[list[ImageAnnotation]], eval_ids: set[int]) -> list[tuple[str, str]]:
    """(train file, eval file) for each eval image with a copy among the training images."""
    pairs = []
    for group in identical:
        train = [image for image in group if id(image) not in eval_ids]
        if train:
            pairs += [(train[0].file, image.file) for image in group if id(image) in eval_ids]
    return pairs


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


def _note_unlisted(parts: list[_Part], notes: list[dict]) -> None:
    """One note per image folder for the image files under it that no annotation names.

    They are not used: an image nobody annotated may well show objects, and training on it as
    background would teach the detector to miss them. An image listed with no boxes is the way
    to say "nothing here".
    """
    listed: dict[Path, set[str]] = {}
    for part in parts:
        listed.setdefault(part.root, set()).update(image.file for image in part.images)
    for root, names in listed.items():
        unlisted = []
        for folder, _, files in os.walk(root):  # does not follow symlinked folders
            for name in files:
                relative = Path(folder, name).relative_to(root).as_posix()
                if is_image_file(Path(name)) and relative not in names:
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


def _check_labels(images: list[ImageAnnotation], class_map: LabelMap, class_map_path: Path, src: Path) -> None:
    known = set(class_map.names)
    unknown = sorted({label for image in images for label in image.labels} - known)
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

    Byte-identical images (the same ``sha256``, whatever their names) are one unit that goes to
    one side whole: a copy on each side would be scored on what it was trained on.
    """
    units = _units(images)
    n = len(units)
    fraction = eval_percentage / 100.0
    target = math.floor(fraction * n + 0.5)
    distinct = "distinct usable images" if n < len(images) else "usable images"
    if fraction > 0 and target == 0:
        raise InputError(
            f"{src}: eval_percentage {eval_percentage:g} of {n} {distinct} leaves no image for "
            f"evaluation; raise it to at least {math.ceil(5000 / n) / 100:g}, "
            "or set it to 0 to train without evaluation"
        )
    if target >= n:
        raise InputError(
            f"{src}: eval_percentage {eval_percentage:g} of {n} {distinct} leaves no image for "
            "training; lower it (20 is usual)"
        )

    present = [{label for i in unit for label in images[i].labels} for unit in units]
    images_per_class = Counter(label for labels in present for label in labels)
    order = {name: i for i, name in enumerate(classes)}
    groups: dict[int, list[int]] = {}
    for u, labels in enumerate(present):
        # Rarest first, ties by class id; background images form their own group at the end.
        key = min((images_per_class[c], order[c]) for c in labels)[1] if labels else len(classes)
        groups.setdefault(key, []).append(u)

    rng = np.random.default_rng(seed)
    keys = sorted(groups)
    members = []
    for key in keys:
        # Sorting by file first makes the split depend on the seed and the data, not on the order
        # of entries in the annotation file.
        indices = sorted(groups[key], key=lambda u: min(images[i].file for i in units[u]))
        members.append([indices[j] for j in rng.permutation(len(indices))])
    quotas = _quotas([len(m) for m in members], fraction, target)

    in_eval = set()
    for group, quota in zip(members, quotas):
        for u in group[:quota]:
            in_eval.update(units[u])
    train = [image for i, image in enumerate(images) if i not in in_eval]
    eval_ = [image for i, image in enumerate(images) if i in in_eval]
    return train, eval_


def _units(images: list[ImageAnnotation]) -> list[list[int]]:
    """Indices of ``images``, those with the same bytes together, in order of first appearance."""
    by_key: dict[object, list[int]] = {}
    for i, image in enumerate(images):
        by_key.setdefault(image.extra.get("sha256") or ("no digest", i), []).append(i)
    return list(by_key.values())


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
        + (f" (eval set from {result.eval_source})" if result.eval_source else "")
    )
    width = max(len(name) for name in result.classes)
    for name in result.classes:
        console.info(
            f"  {name:<{width}}  {result.train_objects[name]:>6} train  {result.eval_objects[name]:>6} eval objects"
        )
    if result.identical_copies:
        where = "kept as given" if result.eval_source else "each set kept on one side of the split"
        console.info(f"{result.identical_copies} images are byte-identical copies of others ({where})")
    console.info(f"COCO JSON of the split: {session.train_coco} and {session.eval_coco}")
    if result.problems:
        console.info(f"{result.problems} problems found and handled; details in {session.report_path}")
