"""Large images, small objects: cutting images into overlapping tiles and putting detections back.

A 6000 px orthomosaic resized to a 640 px model input shrinks a 30 px tree to 3 px. Slicing
keeps the pixels: training sees tiles of ``tile_size`` pixels cut from the image, inference
predicts tile by tile and maps every box back to the image (SAHI, arXiv 2202.06934).

The rules, in one place:

* **Grid** (``tile_grid``): tiles of ``tile`` x ``tile`` pixels, neighbours overlapping by at
  least ``overlap`` of a tile; the last tile of a row or column is moved back to end at the
  image's edge, so every tile is whole and the grid covers every pixel (SAHI's
  ``get_slice_bboxes`` does the same). An image no larger than a tile is one tile, itself.
  Any object no larger than the overlap lies whole inside at least one tile.
* **Boxes cut by a tile's border** (``clip_to_tile``): clipped to the tile, and kept when at
  least ``MIN_VISIBLE`` of the box's area is inside it; smaller fragments are dropped and
  counted (SAHI's ``slice_coco`` keeps a fragment above an area ratio, DeepForest drops
  fragments the same way). Half an object still looks like the object; a sliver teaches the
  detector to fire on slivers, which at inference become duplicates at the seams.
* **Background** (``pick_tiles``): every tile with a kept box is used; of the tiles that touch
  no box at all, ``BACKGROUND_FRACTION`` as many as there are tiles with boxes (at least one
  per image) are drawn at random, seeded. A 6000 px image with 20 trees gives about 20 tiles
  with trees and 2 empty ones, not 200 empty ones; Ultralytics advises 0-10 % background
  images.
* **Merge** (``merge``): detections of all tiles (and of the optional whole-image pass) go
  through per-class non-maximum suppression at IoU ``MERGE_IOU``. A seam object is seen whole
  by one tile and as a fragment by its neighbour; the fragment lies inside the whole box, so
  their IoU is the fragment's visible fraction, which training kept at ``MIN_VISIBLE`` or more,
  and one of them goes: the one the tile cut (its box touches a tile border inside the image),
  whatever the scores, since the other box is the whole object; between two boxes alike in
  that, the lower-scored. Objects larger than the overlap can come out as two pieces: raise
  ``--tile_overlap`` until the overlap is at least the largest object, or add the whole-image
  pass.

The merge is OpenCV's ``cv2.dnn.NMSBoxesBatched`` (per-class NMS, NumPy in and out), not
torchvision's ``batched_nms`` nor SAHI's: ONNX inference must run without PyTorch, and one merge
for both runtimes keeps their results alike. SAHI's greedy merging needs its ``ObjectPrediction``
wrapper and pulls ``opencv-python`` (the GUI build, which collides with the headless OpenCV that
albumentations installs) and shapely. This module imports NumPy and Pillow only (OpenCV when
merging): the host side never imports it, the ONNX path does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import ConfigError

MIN_TILE_SIZE = 32  # below this a tile holds too little context for any of Drip's networks
MIN_VISIBLE = 0.5  # a box cut by a tile border is kept when this fraction of its area is inside
BACKGROUND_FRACTION = 0.1  # empty tiles kept per tile with objects (at least one per image)
MERGE_IOU = 0.4  # detections of one class overlapping more than this are one object
DEFAULT_OVERLAP = 0.2  # SAHI's default overlap ratio

Window = tuple[int, int, int, int]  # (x0, y0, x1, y1) in image pixels, x1 and y1 excluded


def check_tiling(tile_size: int | None, overlap: float | None, where: str = "--tile_size") -> None:
    """A ConfigError for a tile below ``MIN_TILE_SIZE`` or an overlap outside [0, 1)."""
    if tile_size is not None and tile_size != 0 and tile_size < MIN_TILE_SIZE:
        raise ConfigError(
            f"{where} {tile_size}: a tile must be at least {MIN_TILE_SIZE} pixels; use 512 or "
            "640 for most detectors (0 or nothing turns tiling off)"
        )
    if overlap is not None and not 0.0 <= overlap < 1.0:
        raise ConfigError(
            f"--tile_overlap {overlap:g}: the overlap is a fraction of a tile, from 0 up to but "
            f"not including 1; {DEFAULT_OVERLAP:g} is usual"
        )


# -- the grid ---------------------------------------------------------------------------------
def axis_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Where the tiles along one axis of ``length`` pixels start (see the module docstring)."""
    if length <= tile:
        return [0]
    step = max(1, tile - int(round(tile * overlap)))
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def tile_grid(width: int, height: int, tile: int, overlap: float) -> list[Window]:
    """The tiles covering a ``width`` x ``height`` image, row by row."""
    xs = axis_starts(width, tile, overlap)
    ys = axis_starts(height, tile, overlap)
    return [(x, y, min(x + tile, width), min(y + tile, height)) for y in ys for x in xs]


def needs_tiling(width: int, height: int, tile: int | None) -> bool:
    """Whether an image is cut into tiles: tiling is on and the image is larger than a tile."""
    return bool(tile) and max(width, height) > int(tile)


# -- boxes on a tile --------------------------------------------------------------------------
def clip_to_tile(
    boxes: np.ndarray, window: Window, min_visible: float = MIN_VISIBLE
) -> tuple[np.ndarray, np.ndarray, int]:
    """The boxes (image pixels, ``[N, 4]`` xyxy) seen on the tile ``window``.

    Returns the kept boxes in the tile's own pixels, their indices in ``boxes``, and how many
    boxes the tile cuts so much that they were dropped (partly inside, less than
    ``min_visible`` of their area visible). Boxes entirely outside the tile are neither.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = window
    clipped = np.stack(
        [boxes[:, 0].clip(x0, x1), boxes[:, 1].clip(y0, y1), boxes[:, 2].clip(x0, x1), boxes[:, 3].clip(y0, y1)],
        axis=1,
    )
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    visible = np.where(inside, (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(area > 0, visible / np.where(area > 0, area, 1.0), 0.0)
    # A hair of tolerance: a box exactly half inside is kept whatever the float rounding.
    keep = inside & (fraction >= min_visible - 1e-9)
    dropped = int(np.count_nonzero(inside & ~keep))
    index = np.flatnonzero(keep)
    return clipped[index] - np.array([x0, y0, x0, y0], dtype=np.float64), index, dropped


@dataclass
class Tile:
    window: Window  # in the source image's pixels
    boxes: np.ndarray  # [N, 4] in the tile's pixels
    indices: np.ndarray  # of those boxes in the source image's box list


@dataclass
class Cut:
    """How one image was cut: the tiles used and what happened to its boxes."""

    tiles: list[Tile]
    grid: int  # tiles in the full grid
    with_objects: int  # tiles used because they hold a box
    background: int  # empty tiles used as background
    empty: int  # tiles of the grid touching no box at all
    fragments_dropped: int  # box pieces dropped by the visibility rule, over all tiles used
    lost: list[int] = field(default_factory=list)  # boxes kept on no tile (should not happen)


def pick_tiles(
    width: int,
    height: int,
    boxes: np.ndarray,
    tile: int,
    overlap: float,
    rng: np.random.Generator,
    background_fraction: float = BACKGROUND_FRACTION,
    min_visible: float = MIN_VISIBLE,
) -> Cut:
    """The tiles of one training image: those with boxes, and a few empty ones as background."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    with_objects: list[Tile] = []
    empty: list[Window] = []
    fragments = touched = 0
    seen: set[int] = set()
    for window in tile_grid(width, height, tile, overlap):
        kept, index, dropped = clip_to_tile(boxes, window, min_visible)
        if len(index):
            with_objects.append(Tile(window, kept, index))
            fragments += dropped
            seen.update(index.tolist())
        elif not dropped:
            empty.append(window)  # touches no box at all: true background
        else:
            touched += 1  # only slivers of boxes: neither an object tile nor clean background
    n_background = min(len(empty), max(1, math.ceil(background_fraction * len(with_objects))))
    chosen = sorted(rng.choice(len(empty), size=n_background, replace=False).tolist()) if n_background else []
    background = [Tile(empty[i], np.zeros((0, 4)), np.zeros(0, dtype=np.int64)) for i in chosen]
    tiles = sorted(with_objects + background, key=lambda t: (t.window[1], t.window[0]))
    lost = sorted(set(range(len(boxes))) - seen)
    grid = len(with_objects) + len(empty) + touched
    return Cut(tiles, grid, len(with_objects), len(background), len(empty), fragments, lost)


# -- sliced prediction ------------------------------------------------------------------------
@dataclass(frozen=True)
class Slicing:
    """How ``drip infer`` and ``drip evaluate`` cut images: tiles, overlap, whole-image pass."""

    tile: int
    overlap: float = DEFAULT_OVERLAP
    full_pass: bool = False

    def to_json(self) -> dict:
        return {"tile_size": self.tile, "tile_overlap": self.overlap, "full_pass": self.full_pass}


def trained_tiling(meta: dict) -> tuple[int | None, float | None]:
    """The tile size and overlap a model was trained with, from its file's metadata.

    A Drip model file keeps its training config (``meta["config"]``); an export copies the two
    values to the top level.
    """
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    tile = meta.get("tile_size", config.get("tile_size"))
    overlap = meta.get("tile_overlap", config.get("tile_overlap"))
    return (int(tile) if tile else None), (float(overlap) if overlap is not None else None)


def training_slicing(config) -> Slicing | None:
    """How evaluation during training slices the (whole) eval images: as inference will."""
    return Slicing(int(config.tile_size), float(config.tile_overlap)) if config.tile_size else None


def resolve_slicing(tile_size: int | None, overlap: float | None, full_pass: bool, meta: dict) -> Slicing | None:
    """What to slice by: the flags where given, else the model's training tiles; None = whole images.

    ``tile_size`` 0 turns slicing off for a model trained on tiles.
    """
    trained_tile, trained_overlap = trained_tiling(meta)
    tile = trained_tile if tile_size is None else tile_size
    check_tiling(tile, overlap)
    if not tile:
        return None
    if overlap is None:
        overlap = trained_overlap if trained_overlap is not None else DEFAULT_OVERLAP
    return Slicing(int(tile), float(overlap), bool(full_pass))


# Detections of a list of images, each (boxes [N, 4] xyxy in that image's pixels, scores [N],
# labels [N]): what a runtime (PyTorch or ONNX) provides to ``predict_sliced``.
Detect = Callable[[Sequence[Image.Image]], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]


def predict_sliced(
    image: Image.Image,
    tile: int,
    overlap: float,
    detect: Detect,
    batch_size: int,
    full_pass: bool = False,
    merge_iou: float = MERGE_IOU,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections of ``image`` predicted tile by tile, in its pixels, merged across the seams.

    Tiles are cropped ``batch_size`` at a time, so the memory the model needs does not grow
    with the image. ``full_pass`` adds one prediction on the whole image (resized as usual),
    for objects larger than a tile (SAHI's standard prediction). An image no larger than a
    tile is predicted whole, as without tiling.
    """
    width, height = image.size
    if not needs_tiling(width, height, tile):
        return _as_arrays(detect([image])[0])
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    windows = tile_grid(width, height, tile, overlap)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        crops = [image.crop(window) for window in batch]
        for window, found in zip(batch, detect(crops)):
            boxes, scores, labels = _as_arrays(found)
            x0, y0 = window[:2]
            boxes = boxes + np.array([x0, y0, x0, y0], dtype=np.float64)
            parts.append((boxes, scores, labels, cut_by_tile(boxes, window, width, height)))
    if full_pass:
        boxes, scores, labels = _as_arrays(detect([image])[0])
        parts.append((boxes, scores, labels, np.zeros(len(boxes), dtype=bool)))
    boxes, scores, labels, cut = (np.concatenate([p[i] for p in parts]) for i in range(4))
    keep = merge(boxes, scores, labels, merge_iou, cut)
    return boxes[keep], scores[keep], labels[keep]


def cut_by_tile(boxes: np.ndarray, window: Window, width: int, height: int, margin: float = 1.0) -> np.ndarray:
    """Which boxes (image pixels) touch a border of ``window`` that is inside the image: the
    tile saw only part of those objects."""
    x0, y0, x1, y1 = window
    return (
        ((x0 > 0) & (boxes[:, 0] <= x0 + margin))
        | ((y0 > 0) & (boxes[:, 1] <= y0 + margin))
        | ((x1 < width) & (boxes[:, 2] >= x1 - margin))
        | ((y1 < height) & (boxes[:, 3] >= y1 - margin))
    )


def _as_arrays(found) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes, scores, labels = found
    return (
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(scores, dtype=np.float32).reshape(-1),
        np.asarray(labels).reshape(-1).astype(np.int64),
    )


def merge(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float = MERGE_IOU, cut: np.ndarray | None = None
) -> np.ndarray:
    """Indices of the detections kept by per-class NMS at ``iou``, best score first.

    ``cut`` marks boxes a tile saw only part of (``cut_by_tile``): where one overlaps a box
    seen whole, the whole one is kept whatever the scores, since its box is the object's.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    import cv2

    priority = np.asarray(scores, dtype=np.float64).reshape(-1)
    if cut is not None:
        priority = priority - np.asarray(cut, dtype=np.float64)  # scores are in [0, 1]
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    # A score threshold below every priority keeps every box (OpenCV drops those not above it).
    keep = cv2.dnn.NMSBoxesBatched(
        xywh.tolist(), priority.tolist(), np.asarray(labels).astype(np.int32).tolist(), -2.0, float(iou),
    )
    keep = np.asarray(keep, dtype=np.int64).reshape(-1)
    order = np.argsort(-np.asarray(scores, dtype=np.float64)[keep], kind="stable")
    return keep[order]


# -- training tiles (the split stage) -----------------------------------------------------------
TILE_QUALITY = 95  # JPEG quality of the tiles written, as the augment stage writes its copies


@dataclass
class TilingReport:
    """What cutting the training images did, for ``split/report.json`` and the console."""

    tile_size: int
    overlap: float
    min_visible: float = MIN_VISIBLE
    background_fraction: float = BACKGROUND_FRACTION
    images_tiled: int = 0  # training images cut into tiles
    images_whole: int = 0  # training images no larger than a tile, kept whole
    tiles: int = 0  # tiles written
    tiles_with_objects: int = 0
    background_tiles: int = 0
    empty_tiles_left_out: int = 0  # grid tiles touching no box that were not drawn as background
    fragments_dropped: int = 0  # box pieces under min_visible on the tiles written
    boxes_lost: int = 0  # boxes that are at least min_visible visible on no tile

    def to_json(self) -> dict:
        return dict(self.__dict__)


def tile_training_images(
    images: list, image_root, out_root, tile: int, overlap: float, seed: int, notes: list[dict], workers: int = 1
) -> tuple[list, TilingReport]:
    """Cut each of ``images`` (``ImageAnnotation``, checked by the split) larger than ``tile``
    into tiles written under ``out_root``; copy the others there whole.

    Returns the tiles and whole images as ``ImageAnnotation`` relative to ``out_root`` (in the
    order of ``images``), and the report. ``out_root`` is Drip's own folder and is emptied
    first; the user's files are only read.
    """
    import shutil
    from pathlib import Path

    from ..errors import InputError
    from ..parallel import ordered_map
    from .dataset import resolve_image

    out_root = Path(out_root)
    if Path(image_root).resolve().is_relative_to(out_root.resolve()):
        # The folder is emptied first: it must not hold what is about to be read.
        raise InputError(
            f"--image_folder_path {image_root} is inside {out_root}, where Drip writes the tiles of "
            "this session; copy the images elsewhere or use another --session_folder"
        )
    if out_root.exists():
        shutil.rmtree(out_root)
    out_root.mkdir(parents=True)
    report = TilingReport(tile, overlap)
    # One generator per image, seeded by its position: the draw does not depend on threads.
    seeds = np.random.SeedSequence(seed).spawn(len(images))

    def cut_one(job):
        image, seed_seq = job
        return _cut_image(image, resolve_image(Path(image_root), image.file), out_root, tile, overlap,
                          np.random.default_rng(seed_seq))

    out = []
    for image, (entries, cut) in zip(images, ordered_map(cut_one, list(zip(images, seeds)), workers)):
        out += entries
        if cut is None:
            report.images_whole += 1
            continue
        report.images_tiled += 1
        report.tiles += len(cut.tiles)
        report.tiles_with_objects += cut.with_objects
        report.background_tiles += cut.background
        report.empty_tiles_left_out += cut.empty - cut.background
        report.fragments_dropped += cut.fragments_dropped
        report.boxes_lost += len(cut.lost)
        for i in cut.lost:
            box = ", ".join(f"{v:g}" for v in image.boxes[i])
            notes.append({
                "file": image.file,
                "problem": f"{image.labels[i]!r} box [{box}] is less than {MIN_VISIBLE:g} visible on every "
                f"{tile} px tile (the object is larger than about a tile)",
                "action": "box left out of training; raise --tile_size",
            })
    return out, report


def _cut_image(image, path, out_root, tile: int, overlap: float, rng: np.random.Generator):
    """(entries, Cut) for one training image; Cut is None when it stays whole."""
    import hashlib
    import shutil

    from .dataset import ImageAnnotation
    from .images import encode_jpeg, open_rgb

    if not needs_tiling(image.width, image.height, tile):
        target = out_root / image.file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)  # the same bytes: the split's SHA-256 still holds
        return [image], None
    boxes = np.asarray(image.boxes, dtype=np.float64).reshape(-1, 4)
    cut = pick_tiles(image.width, image.height, boxes, tile, overlap, rng)
    entries = []
    with open_rgb(path) as pixels:
        for t in cut.tiles:
            x0, y0, x1, y1 = t.window
            name = f"{image.file}.tile_{x0}_{y0}.jpg"
            data = encode_jpeg(pixels.crop(t.window), quality=TILE_QUALITY)
            target = out_root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            entries.append(ImageAnnotation(
                file=name, width=x1 - x0, height=y1 - y0,
                boxes=[[round(float(v), 3) for v in box] for box in t.boxes],
                labels=[image.labels[i] for i in t.indices],
                extra={"sha256": hashlib.sha256(data).hexdigest(), "source": image.file, "window": list(t.window)},
            ))
    return entries, cut
