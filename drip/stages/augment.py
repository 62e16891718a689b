"""The augment stage: augmented copies of the training images, with their boxes.

Reads  ``dl/split/train.json`` and the images it names (never ``eval.json``: evaluation must
       measure real images only), and the augmentation policy ``config.augmentation_policy``
       (see ``drip.data.augment``).
Writes ``images_augmented/<sub-folders>/<stem>_aug<k>.jpg`` (JPEG quality 95), ``config.augmentations``
       per training image, and ``images_augmented/annotations.json``: Drip JSON whose ``file`` is
       relative to ``images_augmented/`` and whose ``extra.source`` names the training image.

Copy ``k`` of training image ``i`` is drawn from a random stream seeded by ``(seed, i, k)``, so
the output is the same for any number of worker threads and on every rerun. A copy whose boxes
all fell away (cropped or pushed out of the frame) is still written, as a background example:
every training image then has exactly ``augmentations`` copies, and learning what is *not* an
object is useful. Boxes in the output are clipped to the image and at least one pixel wide and
high.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import console
from ..config import Config
from ..data.augment import Policy, load_policy, reseed
from ..data.dataset import ImageAnnotation, read_drip_json, resolve_image, to_drip_json
from ..data.images import encode_jpeg, load_rgb
from ..errors import ConfigError, SessionError
from ..parallel import cores, ordered_map
from ..session import Session, read_json, write_json

JPEG_QUALITY = 95
_COPY_NAME = re.compile(r"_aug\d+\.jpg$")


@dataclass
class AugmentResult:
    images: int  # training images that were augmented
    copies: int  # augmented images written
    manifest: Path
    policy: str | None  # the policy file used; None when augmentations is 0


@dataclass
class _Job:
    """What every worker thread needs."""

    policy: Policy
    image_root: Path
    out_root: Path
    copies: int
    seed: int


@dataclass
class _Task:
    index: int  # position in train.json: part of each copy's seed
    source: str  # file relative to the training image root
    base: str  # output name without "_aug<k>.jpg", relative to images_augmented/
    boxes: list[list[float]]
    labels: list[str]


def run(session: Session, config: Config, *, workers: int | None = None) -> AugmentResult:
    """Write ``config.augmentations`` augmented copies of every training image.

    ``workers`` is the number of threads (default: one per core); it never changes the output.
    """
    manifest_path = session.require(session.train_manifest, "split")
    image_root, classes, train = _read_manifest(manifest_path)
    # Checked before anything is touched; not read at all when no copies are wanted.
    policy = load_policy(Path(config.augmentation_policy)) if config.augmentations else None
    out_root = session.images_augmented
    out_root.mkdir(parents=True, exist_ok=True)
    # Remove the old manifest first: if this run stops halfway, the records stage finds no
    # manifest and says so, instead of pairing old boxes with half-rewritten images.
    session.augmented_manifest.unlink(missing_ok=True)

    copies: list[ImageAnnotation] = []
    if policy is not None and train:
        job = _Job(policy, image_root, out_root, config.augmentations, config.seed)
        tasks = [
            _Task(i, ann.file, base, ann.boxes, ann.labels)
            for i, (ann, base) in enumerate(zip(train, _copy_bases(train)))
        ]
        results = _augment_all(job, tasks, workers or cores())
        for produced in console.progress(results, total=len(tasks), desc="augment"):
            copies.extend(produced)

    write_json(
        session.augmented_manifest,
        to_drip_json(copies, image_root=str(out_root.resolve()), classes=classes),
    )
    _remove_stale(out_root, {c.file for c in copies})
    used = None if policy is None else str(policy.path) if policy.path else policy.source
    session.record_stage(
        "augment",
        images=len(train) if policy else 0,
        copies=config.augmentations,
        written=len(copies),
        policy=used,
        policy_sha256=policy.sha256 if policy else None,
    )
    console.info(f"augment: {len(copies)} augmented images from {len(train)} training images")
    return AugmentResult(len(train) if policy else 0, len(copies), session.augmented_manifest, used)


def _read_manifest(path: Path) -> tuple[Path, list[str], list[ImageAnnotation]]:
    data = read_json(path)
    annotations = read_drip_json(data, str(path))
    root = data.get("image_root")
    if not isinstance(root, str) or not Path(root).is_dir():
        raise SessionError(
            f"{path}: image_root {root!r} is not a folder; rerun the split stage (drip stage split)"
        )
    return Path(root), list(data.get("classes") or []), annotations


def _copy_bases(annotations: list[ImageAnnotation]) -> list[str]:
    """Output name stems, one per image: ``set_a/img`` for ``set_a/img.png``.

    ``img.jpg`` and ``img.png`` in one folder would share a stem; the later one gets ``img-2``.
    Compared case-insensitively because the output may be on a case-insensitive file system.
    """
    taken: set[str] = set()
    bases = []
    for ann in annotations:
        stem = ann.file.rsplit(".", 1)[0] if "." in ann.file.rsplit("/", 1)[-1] else ann.file
        base, n = stem, 1
        while base.lower() in taken:
            n += 1
            base = f"{stem}-{n}"
        taken.add(base.lower())
        bases.append(base)
    return bases


def _augment_all(job: _Job, tasks: list[_Task], workers: int):
    """Augmented annotations per task, in task order, from ``workers`` threads.

    Each thread builds its own transforms (their random streams must not be shared); OpenCV
    runs single-threaded meanwhile, as the threads already use every core.
    """
    local = threading.local()

    def work(task: _Task) -> list[ImageAnnotation]:
        if not hasattr(local, "augmenter"):
            local.augmenter = _Augmenter(job)
        return local.augmenter(task)

    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield from ordered_map(work, tasks, max(1, min(workers, len(tasks))))
    finally:
        cv2.setNumThreads(previous)


class _Augmenter:
    def __init__(self, job: _Job):
        self.job = job
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # load_policy already reported them once
            self.transform = job.policy.build()

    def __call__(self, task: _Task) -> list[ImageAnnotation]:
        job = self.job
        image = load_rgb(resolve_image(job.image_root, task.source))
        height, width = image.shape[:2]
        boxes, ids = _inside(task.boxes, range(len(task.boxes)), width, height)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out = []
        for k in range(job.copies):
            reseed(self.transform, copy_seed(job.seed, task.index, k))
            try:
                result = self.transform(image=image, bboxes=boxes, object_ids=ids)
            except Exception as exc:
                # The image and boxes going in are already checked, so a failure here is a
                # transform that does not suit these images (a crop larger than the image, a
                # transform without box support); albumentations raises plain Exception
                # subclasses for some of these, hence the broad catch around this one call.
                message = " ".join(str(exc).split())
                raise ConfigError(
                    f"{job.policy.source}: the policy fails on {task.source} "
                    f"({type(exc).__name__}: {message}); change or remove that transform"
                ) from None
            picture = result["image"]
            out_h, out_w = picture.shape[:2]
            kept, kept_ids = _inside(result["bboxes"], result["object_ids"], out_w, out_h)
            name = f"{task.base}_aug{k}.jpg"
            encoded = encode_jpeg(np.ascontiguousarray(picture), JPEG_QUALITY)
            _write_atomic(job.out_root / name, encoded)
            out.append(
                ImageAnnotation(
                    file=name,
                    width=out_w,
                    height=out_h,
                    boxes=kept,
                    labels=[task.labels[int(i)] for i in kept_ids],
                    # Drip encoded these bytes: the records stage need not decode them to check.
                    extra={"source": task.source, "copy": k, "sha256": hashlib.sha256(encoded).hexdigest()},
                )
            )
        return out


def copy_seed(seed: int, index: int, k: int) -> int:
    """The seed of copy ``k`` of training image ``index``: independent of order and workers."""
    return int(np.random.SeedSequence([seed, index, k]).generate_state(1)[0])


def _inside(boxes, ids, width: int, height: int) -> tuple[list[list[float]], list[int]]:
    """Boxes clipped to the image, rounded as the manifest stores them, and kept only when at
    least a pixel wide and high: thinner slivers are not objects a detector can learn."""
    kept, kept_ids = [], []
    for box, i in zip(boxes, ids):
        x0, y0, x1, y1 = (float(v) for v in box[:4])
        x0, x1 = round(min(max(x0, 0.0), width), 3), round(min(max(x1, 0.0), width), 3)
        y0, y1 = round(min(max(y0, 0.0), height), 3), round(min(max(y1, 0.0), height), 3)
        if x1 - x0 >= 1.0 and y1 - y0 >= 1.0:
            kept.append([x0, y0, x1, y1])
            kept_ids.append(int(i))
    return kept, kept_ids


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _remove_stale(out_root: Path, keep: set[str]) -> None:
    """Delete augmented images of earlier runs that this run did not write (fewer copies, or
    images no longer in train.json), and temporary files of interrupted runs. Only Drip's own
    ``*_aug<k>.jpg`` and ``.*.tmp-*`` names are touched."""
    for path in out_root.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(out_root).as_posix()
        stale_copy = _COPY_NAME.search(path.name) and rel not in keep
        leftover = path.name.startswith(".") and ".tmp-" in path.name
        if stale_copy or leftover:
            path.unlink()

