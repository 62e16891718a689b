"""Inference: run an exported model on a folder of folders of images and write what it found.

Reads   ``<session_folder>/dl/model.pt`` (or ``--model``: a model file or a session folder) and
        every image under ``--images_path``, recursively.
Writes  for each group (below), under ``<results_path>/<group>/``:

        ``<relative stem>.jpg``   the image as displayed, with its detections drawn
        ``<relative stem>.json``  its detections::

            {"image": "cam 1/day/a.jpg", "width": 640, "height": 480,
             "detections": [{"class_id": 1, "label": "cat", "score": 0.9731,
                             "box": [12.0, 30.5, 200.0, 310.0],
                             "box_normalized": [0.01875, 0.063542, 0.3125, 0.645833]}]}

        ``detections.json``       every image's record, the images that failed to decode
                                  (``errors``), the model, threshold and counts

        With ``--src_json_path`` (annotations of these images, any format Drip reads), also
        at the top of ``<results_path>``:

        ``metrics.json``          COCO metrics of the model on the annotated images (as
                                  ``drip evaluate`` writes them; see ``drip.evaluate``)
        ``coco_results.json``     for COCO annotations: every detection of the annotated
                                  images as ``[{"image_id", "category_id", "bbox": [x, y, w, h],
                                  "score"}]`` in the file's own image and category ids, for
                                  COCO tooling (pycocotools' ``loadRes``)

        Both hold all detections down to ``drip.evaluate.EVAL_SCORE_FLOOR``, as AP needs;
        ``--threshold`` still decides what is drawn and listed per image.
Moves   an earlier ``<results_path>/<group>/`` (and ``metrics.json``, ``coco_results.json``)
        to ``<results_path>/trash/<timestamp>/`` first: results are never overwritten.

Groups: an image under ``<images_path>/<folder>/...`` belongs to group ``<folder>`` (deeper
sub-folders are kept inside the group's results); images directly in ``<images_path>`` form a
group named after that folder. Files and folders whose name starts with a dot are skipped: they
are system clutter (``.DS_Store``, macOS ``._x.jpg`` resource forks), not photos.

``box`` is ``[xmin, ymin, xmax, ymax]`` in pixels of the image as displayed (after EXIF
rotation), the same convention as Drip JSON annotations; ``image`` is relative to
``images_path``. Two images whose outputs would share a name (``a.jpg`` and ``a.png`` in one
folder) are told apart by keeping the extension of every one after the first in sorted order:
``a.json`` / ``a.jpg`` and ``a.png.json`` / ``a.png.jpg``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..config import InferConfig
from ..console import info, progress, warn
from ..errors import InputError, ModelError, SessionError
from ..images import IMAGE_EXTENSIONS, is_image_file, open_rgb
from ..session import Session, move, write_json

GROUP_INDEX = "detections.json"
TRASH = "trash"
METRICS = "metrics.json"
COCO_RESULTS = "coco_results.json"


@dataclass
class InferResult:
    groups: dict[str, Path]  # group name -> its results folder
    images: int  # images decoded and run through the model
    detections: int  # detections kept (score >= threshold) over all images
    seconds: float
    failed: int = 0  # images that could not be decoded (listed in their group's detections.json)
    metrics: Any = None  # drip.evaluate.Metrics with --src_json_path, else None


@dataclass(frozen=True)
class ImageJob:
    path: Path  # the file to read
    rel: str  # posix path relative to images_path, as written in the JSON
    group: str
    out_stem: str  # posix path inside the group's results folder, without extension


# -- entry point ------------------------------------------------------------------------------
def run(config: InferConfig, session_folder: Path | Session) -> InferResult:
    """Run the model chosen by ``config`` on every image under ``config.images_path``."""
    root = session_folder.root if isinstance(session_folder, Session) else Path(session_folder)
    model_path = resolve_model_path(config.model, root)
    # Find the images before loading the model: a typo in --images_path should fail in a blink.
    groups = find_images(Path(config.images_path), Path(config.results_path))
    annotations = _read_annotations(config)
    from ..models import load_model, resolve_device

    device = resolve_device(config.device)
    loaded = load_model(model_path, device)
    return run_loaded(config, loaded, model_path, device, groups, annotations)


def run_loaded(
    config: InferConfig,
    loaded: Any,
    model_path: Path,
    device: torch.device | str = "cpu",
    groups: dict[str, list[ImageJob]] | None = None,
    annotations: Any = None,
) -> InferResult:
    """``run`` with the model already loaded (and ``annotations`` already read, if any).

    ``loaded`` needs ``model`` (a torchvision-style detector: a list of CHW float tensors in,
    one ``{"boxes", "scores", "labels"}`` dict per image out, boxes in input pixels),
    ``classes`` (names, id 1 first) and ``image_size``, as ``drip.models.LoadedModel`` has.
    """
    started = time.perf_counter()
    images_path, results_path = Path(config.images_path), Path(config.results_path)
    if groups is None:
        groups = find_images(images_path, results_path)
    size = config.image_size or getattr(loaded, "image_size", None)
    if not size:
        raise ModelError(f"{model_path}: the model does not record its image size; pass --image_size")
    size = int(size)
    names = list(getattr(loaded.classes, "names", loaded.classes))
    model = loaded.model.eval()
    _fit_model_input(model, size)
    device = torch.device(device)
    if annotations is None:
        annotations = _read_annotations(config)
    scoring = None
    if annotations is not None:
        from ..evaluate import Scoring

        scoring = Scoring(annotations, names, str(config.src_json_path))

    _trash_earlier_results(results_path, list(groups) + [METRICS, COCO_RESULTS])
    total = sum(len(jobs) for jobs in groups.values())
    out_dirs: dict[str, Path] = {}
    n_images = n_detections = n_failed = 0
    with progress(total=total, desc="infer") as bar, _score_floor(model, scoring, config.threshold):
        for group, jobs in groups.items():
            out_dir = results_path / group
            out_dir.mkdir(parents=True, exist_ok=True)
            out_dirs[group] = out_dir
            records: list[dict[str, Any]] = []
            errors: list[dict[str, str]] = []
            pending: list[tuple[ImageJob, Image.Image]] = []

            def flush() -> None:
                records.extend(
                    _predict_batch(
                        model, pending, size, device, names, config.threshold, out_dir, config.batch_size, scoring
                    )
                )
                bar.update(len(pending))
                pending.clear()

            for job in jobs:
                try:
                    image = open_rgb(job.path)
                except InputError as exc:
                    # One bad file must not cost the rest of a long run: note it and go on.
                    warn(str(exc))
                    errors.append({"image": job.rel, "error": str(exc)})
                    bar.update(1)
                    continue
                pending.append((job, image))
                if len(pending) >= config.batch_size:
                    flush()
            if pending:
                flush()

            group_detections = sum(len(r["detections"]) for r in records)
            per_class: dict[str, int] = {}
            for record in records:
                for det in record["detections"]:
                    per_class[det["label"]] = per_class.get(det["label"], 0) + 1
            write_json(
                out_dir / GROUP_INDEX,
                {
                    "group": group,
                    "images_path": str(images_path),
                    "model": str(model_path),
                    "network": getattr(loaded, "network", None),
                    "classes": names,
                    "threshold": config.threshold,
                    "image_size": size,
                    "counts": {
                        "images": len(records),
                        "detections": group_detections,
                        "errors": len(errors),
                        "per_class": dict(sorted(per_class.items())),
                    },
                    "images": records,
                    "errors": errors,
                },
            )
            n_images += len(records)
            n_detections += group_detections
            n_failed += len(errors)

    metrics = _write_scores(scoring, results_path, config, model_path, loaded, size) if scoring else None
    seconds = time.perf_counter() - started
    failed = f"; {n_failed} could not be read (see errors in detections.json)" if n_failed else ""
    info(
        f"infer: {n_images} images, {n_detections} detections in {seconds:.1f}s; results in "
        f"{results_path} ({len(out_dirs)} group{'s' if len(out_dirs) != 1 else ''}){failed}"
    )
    return InferResult(
        groups=out_dirs, images=n_images, detections=n_detections, seconds=seconds, failed=n_failed, metrics=metrics
    )


# -- scoring against annotations (--src_json_path) --------------------------------------------
def _read_annotations(config: InferConfig) -> Any:
    if not config.src_json_path:
        return None
    from ..annotations import load_annotations

    # Annotation paths are relative to the image folder, as infer's image paths are.
    return load_annotations(Path(config.src_json_path), Path(config.images_path))


def _score_floor(model: torch.nn.Module, scoring: Any, threshold: float):
    """Lower the model's own score floor (torchvision's is 0.05) to what this run needs.

    ``--threshold`` is the user's filter, so a threshold under 5% must see the boxes torchvision
    would drop; while scoring, AP needs the whole curve.
    """
    from ..evaluate import EVAL_SCORE_FLOOR, evaluation_mode

    return evaluation_mode(model, score_floor=EVAL_SCORE_FLOOR if scoring else threshold / 100.0)


def _write_scores(scoring: Any, results_path: Path, config: InferConfig, model_path: Path, loaded: Any, size: int):
    from ..evaluate import metrics_report, summary_lines

    missing = scoring.missing()
    if missing:
        warn(
            f"--src_json_path {config.src_json_path}: {len(missing)} annotated images were not "
            f"scored (not under --images_path or unreadable), e.g. {missing[0]!r}"
        )
    if not scoring.truths:
        warn(
            f"--src_json_path {config.src_json_path}: none of its images is under --images_path "
            f"{config.images_path}; no metrics written (its image paths must be relative to that folder)"
        )
        return None
    metrics = scoring.metrics()
    write_json(
        results_path / METRICS,
        metrics_report(
            metrics,
            model=str(model_path),
            network=getattr(loaded, "network", None),
            image_size=size,
            images_path=str(config.images_path),
            annotations=str(config.src_json_path),
            annotation_format=scoring.annotations.format,
            dropped_boxes=scoring.dropped_boxes,
            not_scored=missing,
        ),
    )
    rows = scoring.coco_results()
    if rows is not None:
        write_json(results_path / COCO_RESULTS, rows)
    for line in summary_lines(metrics):
        info(line)
    also = f" and {results_path / COCO_RESULTS}" if rows is not None else ""
    info(f"infer: metrics against {config.src_json_path} in {results_path / METRICS}{also}")
    return metrics


# -- inputs -----------------------------------------------------------------------------------
def resolve_model_path(model: str | None, session_folder: Path) -> Path:
    """The model file: ``model`` as a file, a ``dl`` folder or a session folder; else the session's."""
    if model is None:
        path = Path(session_folder) / "dl" / "model.pt"
        if not path.is_file():
            raise SessionError(
                f"{path}: no exported model in this session; train first (drip train "
                f"--session_folder {session_folder}) or pass --model PATH"
            )
        return path
    given = Path(model)
    if given.is_file():
        return given
    if given.is_dir():
        for candidate in (given / "model.pt", given / "dl" / "model.pt"):
            if candidate.is_file():
                return candidate
        raise ModelError(
            f"--model {model}: folder holds neither model.pt nor dl/model.pt; pass a model file "
            "exported by Drip or a session folder that finished training"
        )
    raise ModelError(f"--model {model}: no such file or folder; check the path or train first")


def find_images(images_path: Path, results_path: Path | None = None) -> dict[str, list[ImageJob]]:
    """Every image under ``images_path`` by group, both sorted; the results folder is skipped."""
    images_path = Path(images_path)
    if not images_path.is_dir():
        what = "is a file" if images_path.exists() else "does not exist"
        raise InputError(
            f"--images_path {images_path} {what}; pass a folder holding one sub-folder of images "
            "per group"
        )
    real_images = Path(os.path.realpath(images_path))
    real_results = Path(os.path.realpath(results_path)) if results_path is not None else None
    if real_results is not None and real_images.is_relative_to(real_results):
        # Earlier results are moved to the trash before writing: that would move the input.
        raise InputError(
            f"--images_path {images_path} is inside --results_path {results_path}; pick a "
            "results folder outside the images"
        )
    top_group = real_images.name or "images"
    groups: dict[str, list[ImageJob]] = {}
    for path, rel in _walk_images(images_path, real_results):
        parts = PurePosixPath(rel).parts
        group, inner = (parts[0], "/".join(parts[1:])) if len(parts) > 1 else (top_group, rel)
        groups.setdefault(group, []).append(ImageJob(path, rel, group, inner))
    if not groups:
        raise InputError(
            f"--images_path {images_path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} "
            "in it and its sub-folders); put the images there or pass the right folder"
        )
    _check_group_names(groups, images_path, top_group)
    return {
        group: _name_outputs(sorted(groups[group], key=lambda job: job.rel))
        for group in sorted(groups)
    }


def _walk_images(root: Path, skip: Path | None):
    """(path, posix path relative to root) of every image file, following folder symlinks once."""
    seen: set[tuple[int, int]] = set()

    def unreadable(exc: OSError) -> None:
        warn(f"{exc.filename}: cannot list folder ({exc.strerror}); its images are left out")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        # Users link camera folders in; following links is worth a guard against link loops.
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".")
            and (skip is None or Path(os.path.realpath(os.path.join(dirpath, d))) != skip)
        )
        base = Path(dirpath)
        for name in sorted(filenames):
            path = base / name
            if name.startswith(".") or not is_image_file(path) or not path.is_file():
                continue
            yield path, path.relative_to(root).as_posix()


def _check_group_names(groups: dict[str, list[ImageJob]], images_path: Path, top_group: str) -> None:
    by_folded: dict[str, str] = {}
    for group in groups:
        if group.casefold() == TRASH:
            raise InputError(
                f"{images_path / group}: a group named {group!r} would mix with the results "
                f"trash folder; rename the folder"
            )
        # Case-insensitive file systems (macOS, Windows) would merge two such results folders.
        other = by_folded.setdefault(group.casefold(), group)
        if other != group:
            raise InputError(
                f"{images_path}: groups {other!r} and {group!r} would share a results folder; "
                "rename one of the folders"
            )
    top_level = [job for job in groups.get(top_group, []) if "/" not in job.rel]
    if top_level and len(top_level) != len(groups[top_group]):
        raise InputError(
            f"{images_path}: images directly in it and in its sub-folder {top_group!r} would "
            f"share the results folder {top_group!r}; move the loose images into a sub-folder"
        )


def _name_outputs(jobs: list[ImageJob]) -> list[ImageJob]:
    """Give each job an output stem no other job of the group uses (see the module docstring)."""
    # Folded keys: on a case-insensitive disk A.json and a.json are one file.
    taken = {PurePosixPath(GROUP_INDEX).stem.casefold()}
    out = []
    for job in jobs:
        inner = PurePosixPath(job.out_stem)
        candidates = [str(inner.with_suffix("")), str(inner)]
        stem = next((c for c in candidates if c.casefold() not in taken), None)
        n = 1
        while stem is None:
            n += 1
            if f"{inner}-{n}".casefold() not in taken:
                stem = f"{inner}-{n}"
        taken.add(stem.casefold())
        out.append(ImageJob(job.path, job.rel, job.group, stem))
    return out


def _trash_earlier_results(results_path: Path, groups: list[str]) -> None:
    earlier = [results_path / group for group in groups if (results_path / group).exists()]
    if not earlier:
        return
    target = results_path / TRASH / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while target.exists():  # two runs in one second must not mix
        n += 1
        target = target.with_name(f"{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    target.mkdir(parents=True)
    for path in earlier:
        move(path, target / path.name)
        info(f"moved earlier results {path} to {target / path.name}")


# -- the model --------------------------------------------------------------------------------
def _fit_model_input(model: torch.nn.Module, size: int) -> None:
    """Make a torchvision detector take our resized images as they are.

    Its own transform resizes again to its ``min_size``/``max_size``; left at the trained size,
    an ``--image_size`` override would be undone there.
    """
    if isinstance(getattr(model, "transform", None), torch.nn.Module):
        from ..models import set_image_size

        set_image_size(model, size)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the longer side ``size`` and the aspect ratio kept."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def forward_batch(
    model: torch.nn.Module,
    images: Sequence[Image.Image],
    size: int,
    device: torch.device,
    batch_size: int,
) -> list[tuple[dict[str, torch.Tensor], tuple[int, int]]]:
    """Resize each image so its longer side is ``size``, run ``model`` on them in one pass.

    Returns each image's raw output (boxes in pixels of the resized input) and the resized
    (width, height). ``drip infer`` and ``drip.evaluate`` both go through here, so what is
    measured is what is run.
    """
    tensors, shapes = [], []
    for image in images:
        shape = resized_size(image.width, image.height, size)
        small = image if shape == image.size else image.resize(shape, Image.BILINEAR)
        array = np.asarray(small, dtype=np.uint8)
        tensors.append(torch.from_numpy(array.copy()).permute(2, 0, 1).to(device).float().div_(255))
        shapes.append(shape)
    try:
        with torch.inference_mode():
            outputs = model(tensors)
    except torch.cuda.OutOfMemoryError:
        raise ModelError(
            f"out of GPU memory with --batch_size {batch_size} at --image_size {size}; "
            "lower --batch_size"
        ) from None
    return list(zip(outputs, shapes))


def scale_boxes(boxes: torch.Tensor, size: tuple[int, int], resized: tuple[int, int]) -> torch.Tensor:
    """Boxes in ``resized`` pixels -> float64 boxes in pixels of the ``size`` image, clipped to it."""
    boxes = torch.as_tensor(boxes).detach().cpu().reshape(-1, 4).to(torch.float64)
    width, height = size
    # Per-axis factors: rounding the resized size makes them differ slightly.
    scale = torch.tensor([width / resized[0], height / resized[1]] * 2, dtype=torch.float64)
    boxes = boxes * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0.0, float(width))
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0.0, float(height))
    return boxes


def _predict_batch(
    model: torch.nn.Module,
    batch: Sequence[tuple[ImageJob, Image.Image]],
    size: int,
    device: torch.device,
    names: list[str],
    threshold: float,
    out_dir: Path,
    batch_size: int,
    scoring: Any = None,
) -> list[dict[str, Any]]:
    results = forward_batch(model, [image for _, image in batch], size, device, batch_size)
    records = []
    for (job, image), (output, shape) in zip(batch, results):
        if scoring is not None and scoring.wants(job.rel):
            from ..evaluate import detections_from_output

            scoring.add(job.rel, image.size, detections_from_output(job.rel, output, image.size, shape))
        detections = to_detections(
            output["boxes"], output["scores"], output["labels"],
            size=image.size, resized=shape, threshold=threshold, names=names,
        )
        record = {"image": job.rel, "width": image.width, "height": image.height, "detections": detections}
        json_path = out_dir / f"{job.out_stem}.json"
        write_json(json_path, record)
        drawn_path = out_dir / f"{job.out_stem}.jpg"
        draw_detections(image, detections).save(drawn_path, format="JPEG", quality=90)
        records.append({**record, "result": f"{job.out_stem}.json", "drawn": f"{job.out_stem}.jpg"})
    return records


def to_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    size: tuple[int, int],
    resized: tuple[int, int],
    threshold: float,
    names: Sequence[str],
) -> list[dict[str, Any]]:
    """Detections in ``resized`` pixels -> JSON records in pixels of the ``size`` image.

    Keeps scores >= ``threshold`` percent, best first; boxes are clipped to the image and
    dropped if nothing of them is left inside it.
    """
    boxes = scale_boxes(boxes, size, resized)
    scores = torch.as_tensor(scores).detach().cpu().reshape(-1)
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if not scores.is_floating_point():
        scores = scores.float()
    # Compare in the scores' own precision: float32 0.7 is below the float64 0.7, and a
    # detection scored exactly at the threshold must be kept.
    keep = scores >= torch.tensor(threshold / 100.0, dtype=scores.dtype)
    order = torch.argsort(scores[keep], descending=True, stable=True)
    boxes, scores, labels = boxes[keep][order], scores[keep][order], labels[keep][order]
    width, height = size
    out = []
    for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        if x1 <= x0 or y1 <= y0:
            continue
        class_id = int(label)
        name = names[class_id - 1] if 1 <= class_id <= len(names) else f"class_{class_id}"
        out.append(
            {
                "class_id": class_id,
                "label": name,
                "score": round(float(score), 4),
                "box": [round(v, 2) for v in (x0, y0, x1, y1)],
                "box_normalized": [
                    round(x0 / width, 6), round(y0 / height, 6), round(x1 / width, 6), round(y1 / height, 6)
                ],
            }
        )
    return out


# -- drawing ----------------------------------------------------------------------------------
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)


def draw_detections(image: Image.Image, detections: list[dict[str, Any]]) -> Image.Image:
    """A copy of ``image`` with each detection's box and ``label score`` drawn, colour by class."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    # Scale line and text with the image so they are readable on a phone photo and a thumbnail.
    longer = max(image.size)
    line = max(1, round(longer / 320))
    font = _font(max(10, round(longer / 45)))
    for det in detections:
        colour = _PALETTE[(det["class_id"] - 1) % len(_PALETTE)]
        x0, y0, x1, y1 = det["box"]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y0 - th - 2 * line if y0 - th - 2 * line >= 0 else y0  # above the box, else inside
        draw.rectangle([x0, ty, x0 + tw + 2 * line, ty + th + 2 * line], fill=colour)
        brightness = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((x0 + line - left, ty + line - top), text, font=font,
                  fill=(0, 0, 0) if brightness > 140 else (255, 255, 255))
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()
