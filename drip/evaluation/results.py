"""The result files of ``drip infer``, without PyTorch: finding the images, naming, writing and
drawing what a model found, shared by both ways it runs a model.

``drip.stages.infer`` runs a Drip model file (``model.pt``) with PyTorch;
``drip.deploy.onnx_infer`` runs an exported ``.onnx`` file with ONNX Runtime and must not import
PyTorch. Both find the images, name the results and draw them through here, so the two write the
same files (the layout is described in ``drip.stages.infer``). Turning a model's boxes into the
JSON records is ``drip.data.detections``'.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..console import info, progress, warn
from ..data.images import IMAGE_EXTENSIONS, is_image_file, open_rgb
from ..errors import InputError, ModelError, SessionError
from ..session import move, trash_folder, write_json

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
    metrics: Any = None  # drip.evaluation.metrics.Metrics with --src_json_path, else None


@dataclass(frozen=True)
class ImageJob:
    path: Path  # the file to read
    rel: str  # posix path relative to images_path, as written in the JSON
    group: str
    out_stem: str  # posix path inside the group's results folder, without extension


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


def trash_earlier_results(results_path: Path, groups: list[str]) -> None:
    earlier = [results_path / group for group in groups if (results_path / group).exists()]
    if not earlier:
        return
    target = trash_folder(results_path / TRASH)
    for path in earlier:
        move(path, target / path.name)
        info(f"moved earlier results {path} to {target / path.name}")


# -- the run ----------------------------------------------------------------------------------
# Detections of a batch of (job, image) pairs: one list of JSON records per image, in order.
Predict = Callable[[Sequence[tuple[ImageJob, Image.Image]]], list[list[dict[str, Any]]]]


def run_groups(
    groups: dict[str, list[ImageJob]],
    results_path: Path,
    batch_size: int,
    predict: Predict,
    index: dict[str, Any],
    share: Any = None,
) -> tuple[dict[str, Path], int, int, int]:
    """Decode each group's images, ``predict`` them ``batch_size`` at a time, write the results.

    ``index`` holds the model's fields of each group's ``detections.json`` (images_path, model,
    network, classes, threshold, image_size). Returns the results folder of each group and the
    counts of images, detections and images that failed to decode.

    ``share`` (a ``drip.training.distributed.Context`` of several processes) shares the images out: rank
    r does every world-th image of each group from the r-th, writes their files, and rank 0
    gathers the records and writes ``detections.json`` as one process would; the counts are
    then rank 0's of all images (the other ranks count their own).
    """
    rank, world = (share.rank, share.world) if share is not None else (0, 1)
    total = sum(len(jobs[rank::world]) for jobs in groups.values())
    out_dirs: dict[str, Path] = {}
    n_images = n_detections = n_failed = 0
    with progress(total=total, desc="infer", disable=rank != 0) as bar:
        for group, jobs in groups.items():
            out_dir = results_path / group
            out_dir.mkdir(parents=True, exist_ok=True)
            out_dirs[group] = out_dir
            records: list[dict[str, Any]] = []
            errors: list[dict[str, str]] = []
            for batch in _decoded_batches(jobs[rank::world], batch_size, errors, bar):
                for (job, image), detections in zip(batch, predict(batch)):
                    records.append(write_image_result(job, image, detections, out_dir))
                bar.update(len(batch))
            if share is not None:  # every rank's part, in the order one process writes them
                parts = share.gather((records, errors))
                if rank != 0:  # counts its own part; rank 0 writes the group's index
                    n_images += len(records)
                    n_detections += sum(len(r["detections"]) for r in records)
                    n_failed += len(errors)
                    continue
                order = {job.rel: i for i, job in enumerate(jobs)}
                records = sorted((r for rs, _ in parts for r in rs), key=lambda r: order[r["image"]])
                errors = sorted((e for _, es in parts for e in es), key=lambda e: order[e["image"]])

            group_detections = sum(len(r["detections"]) for r in records)
            per_class: dict[str, int] = {}
            for record in records:
                for det in record["detections"]:
                    per_class[det["label"]] = per_class.get(det["label"], 0) + 1
            write_json(
                out_dir / GROUP_INDEX,
                {
                    "group": group,
                    **index,
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
    return out_dirs, n_images, n_detections, n_failed


def _decoded_batches(jobs: list[ImageJob], batch_size: int, errors: list[dict[str, str]], bar):
    """Lists of up to ``batch_size`` (job, decoded image); undecodable files go to ``errors``."""
    pending: list[tuple[ImageJob, Image.Image]] = []
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
        if len(pending) >= batch_size:
            yield pending
            pending = []
    if pending:
        yield pending


def write_image_result(job: ImageJob, image: Image.Image, detections: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Write one image's JSON and drawn JPEG; its entry in the group's ``detections.json``."""
    record = {"image": job.rel, "width": image.width, "height": image.height, "detections": detections}
    write_json(out_dir / f"{job.out_stem}.json", record)
    draw_detections(image, detections).save(out_dir / f"{job.out_stem}.jpg", format="JPEG", quality=90)
    return {**record, "result": f"{job.out_stem}.json", "drawn": f"{job.out_stem}.jpg"}


def summary(n_images: int, n_detections: int, seconds: float, results_path: Path, n_groups: int, n_failed: int) -> str:
    failed = f"; {n_failed} could not be read (see errors in detections.json)" if n_failed else ""
    return (
        f"infer: {n_images} images, {n_detections} detections in {seconds:.1f}s; results in "
        f"{results_path} ({n_groups} group{'s' if n_groups != 1 else ''}){failed}"
    )


# -- drawing ----------------------------------------------------------------------------------
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)


def draw_detections(image: Image.Image, detections: list[dict[str, Any]]) -> Image.Image:
    """A copy of ``image`` with each detection's box and ``label score`` drawn, colour by class.

    A detection whose ``score`` is None (a ground-truth box) is labelled with its name alone.
    """
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
        text = det["label"] if det.get("score") is None else f"{det['label']} {det['score']:.2f}"
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

