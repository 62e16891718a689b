"""Synthetic detection data: coloured shapes on textured backgrounds, written as real JPEGs.

Used for the bundled sample data, the tests and the benchmarks. Every image has several objects
of several classes, so the split, augmentation, training and evaluation have something real to
work on while staying small enough for a CPU.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .dataset import ImageAnnotation, to_drip_json

CLASSES = ("circle", "square", "triangle")


def draw_scene(
    rng: np.random.Generator, width: int, height: int, classes=CLASSES, max_objects: int = 4,
    object_size: tuple[float, float] = (1 / 6, 1 / 3), overlap: bool = True,
):
    """One image (PIL RGB) and its boxes and labels.

    Objects span ``object_size`` (a range) of the image's shorter side. Without ``overlap`` an
    object is placed where it hides no other (an object with no free place is left out).
    """
    base = rng.integers(40, 200, size=3)
    noise = rng.normal(0, 25, size=(height // 8 + 1, width // 8 + 1, 3))
    texture = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(texture).resize((width, height), Image.BILINEAR).filter(ImageFilter.GaussianBlur(2))
    draw = ImageDraw.Draw(img)
    boxes, labels = [], []
    short = min(width, height)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        size = int(rng.integers(max(4, int(short * object_size[0])), max(5, int(short * object_size[1])) + 1))
        for _attempt in range(1 if overlap else 30):
            x0 = int(rng.integers(0, width - size))
            y0 = int(rng.integers(0, height - size))
            x1, y1 = x0 + size, y0 + size
            free = all(x1 + 1 < b[0] or b[2] < x0 or y1 + 1 < b[1] or b[3] < y0 for b in boxes)
            if overlap or free:
                break
        else:
            continue
        label = classes[int(rng.integers(len(classes)))]
        _draw_shape(draw, rng, label, x0, y0, x1, y1)
        boxes.append([float(x0), float(y0), float(x1 + 1), float(y1 + 1)])
        labels.append(label)
    return img, boxes, labels


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, label: str, x0: int, y0: int, x1: int, y1: int):
    """The shape of ``label``'s class in a random colour, filling ``[x0, x1] x [y0, y1]``."""
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    kind = CLASSES.index(label) % 3 if label in CLASSES else int(rng.integers(3))
    if kind == 0:
        draw.ellipse([x0, y0, x1, y1], fill=colour, outline=(255, 255, 255), width=2)
    elif kind == 1:
        draw.rectangle([x0, y0, x1, y1], fill=colour, outline=(0, 0, 0), width=2)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour, outline=(255, 255, 0))


def draw_sparse_scene(
    rng: np.random.Generator, width: int, height: int, n_objects: int, object_px: tuple[int, int] = (24, 40),
    classes=CLASSES,
):
    """A large image with ``n_objects`` small shapes that do not touch: an orthomosaic's trees.

    Sizes are drawn from ``object_px``; the shapes are the classes' shapes of ``draw_scene``.
    """
    base = rng.integers(60, 160, size=3)
    noise = rng.normal(0, 20, size=(height // 16 + 1, width // 16 + 1, 3))
    texture = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(texture).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    boxes: list[list[float]] = []
    labels: list[str] = []
    tries = 0
    while len(boxes) < n_objects and tries < n_objects * 100:
        tries += 1
        size = int(rng.integers(object_px[0], object_px[1] + 1))
        x0, y0 = int(rng.integers(0, width - size - 1)), int(rng.integers(0, height - size - 1))
        box = [float(x0), float(y0), float(x0 + size + 1), float(y0 + size + 1)]
        if any(box[0] < b[2] + 4 and b[0] < box[2] + 4 and box[1] < b[3] + 4 and b[1] < box[3] + 4 for b in boxes):
            continue
        label = classes[int(rng.integers(len(classes)))]
        _draw_shape(draw, rng, label, x0, y0, x0 + size, y0 + size)
        boxes.append(box)
        labels.append(label)
    return img, boxes, labels


def make_dataset(
    root: Path,
    n_images: int,
    size: tuple[int, int] = (160, 120),
    classes=CLASSES,
    folders=("set_a", "set_b"),
    seed: int = 0,
    max_objects: int = 4,
    object_size: tuple[float, float] = (1 / 6, 1 / 3),
    overlap: bool = True,
) -> list[ImageAnnotation]:
    """Write ``n_images`` JPEGs spread over ``folders`` under ``root``; return their annotations."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    out = []
    for i in range(n_images):
        folder = folders[i % len(folders)] if folders else ""
        rel = f"{folder}/img_{i:04d}.jpg" if folder else f"img_{i:04d}.jpg"
        img, boxes, labels = draw_scene(rng, size[0], size[1], classes, max_objects, object_size, overlap)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel, quality=92)
        out.append(ImageAnnotation(file=rel, width=size[0], height=size[1], boxes=boxes, labels=labels))
    return out


def write_drip_json(path: Path, annotations: list[ImageAnnotation]) -> None:
    Path(path).write_text(json.dumps(to_drip_json(annotations), indent=2), encoding="utf-8")


def write_yolo_labels(labels_dir: Path, annotations: list[ImageAnnotation], classes=CLASSES) -> None:
    """One YOLO ``.txt`` per image under ``labels_dir`` (mirroring ``file``): ``class cx cy w h``."""
    for image in annotations:
        lines = []
        for (x0, y0, x1, y1), label in zip(image.boxes, image.labels):
            cx, cy = (x0 + x1) / 2 / image.width, (y0 + y1) / 2 / image.height
            w, h = (x1 - x0) / image.width, (y1 - y0) / image.height
            lines.append(f"{classes.index(label)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        path = (Path(labels_dir) / image.file).with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_roboflow_yolo(root: Path, n_train: int, n_valid: int, n_test: int = 0, size=(160, 120), seed: int = 0) -> dict:
    """A YOLO dataset laid out as Roboflow exports it ("YOLOv8" format): ``data.yaml`` naming
    ``../train/images`` and ``../valid/images``, ``<split>/images`` beside ``<split>/labels``,
    file names with Roboflow's ``_jpg.rf.<hash>`` suffix. Returns the annotations per split."""
    root = Path(root)
    out = {}
    for i, (split, n) in enumerate((("train", n_train), ("valid", n_valid), ("test", n_test))):
        if not n:
            continue
        annotations = make_dataset(root / split / "images", n, size=size, folders=(), seed=seed + i)
        for image in annotations:
            stem = Path(image.file).stem
            renamed = f"{stem}_jpg.rf.{hashlib.md5(f'{split}/{stem}'.encode()).hexdigest()}.jpg"
            (root / split / "images" / image.file).rename(root / split / "images" / renamed)
            image.file = renamed
        write_yolo_labels(root / split / "labels", annotations)
        out[split] = annotations
    (root / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\n"
        + ("test: ../test/images\n" if n_test else "")
        + f"\nnc: {len(CLASSES)}\nnames: {list(CLASSES)!r}\n\n"
        "roboflow:\n  workspace: drip-tests\n  project: shapes\n  version: 1\n  license: CC BY 4.0\n"
        "  url: https://universe.roboflow.com/drip-tests/shapes/dataset/1\n",
        encoding="utf-8",
    )
    (root / "README.roboflow.txt").write_text("Exported via roboflow.com\n", encoding="utf-8")
    return out
