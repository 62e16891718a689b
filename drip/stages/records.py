"""The records stage: the training and evaluation images as TFRecord shards.

Reads  ``dl/split/train.json``, ``dl/split/eval.json``, ``images_augmented/annotations.json``
       (written by the augment stage, empty when augmentations is 0), ``dl/label_map.pbtxt`` and
       every image they name.
Writes ``dl/records/train-00000-of-0000N.tfrecord`` (originals and augmented copies, shuffled
       together with ``config.seed`` so no shard is all copies), ``eval-*-of-*.tfrecord`` (none when
       the eval split is empty), and ``dl/records/records.json`` listing the shards and counts.

Records follow the TF Object Detection API schema (``drip.data.tfrecord.DetectionExample``): boxes
normalized by the image size as displayed, labels 1-based from the label map, and images stored
upright (``drip.data.images.encode_for_record``), so other TFRecord readers see what the user sees.
Each shard is written to a temporary file that is renamed when complete, and ``records.json``
(with each shard's SHA-256) is written last: a run that stops early leaves no ``records.json``,
so training refuses the half-written set, and a rerun removes the temporary files and rewrites
every shard.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import console
from ..config import Config
from ..data.boxes import clip_normalized, has_area, normalize
from ..data.dataset import read_drip_json, resolve_image
from ..data.images import encode_for_record
from ..data.labelmap import LabelMap
from ..data.tfrecord import DetectionExample, TFRecordWriter, encode_example
from ..errors import InputError, SessionError
from ..parallel import cores, ordered_map
from ..session import Session, read_json, write_json

INDEX_NAME = "records.json"
# Everything Drip itself writes in records/; nothing else there is ever deleted.
_OWN_FILES = ("train-*-of-*.tfrecord", "eval-*-of-*.tfrecord", ".*.tmp-*")


@dataclass
class RecordsResult:
    train: int  # records in the train shards (originals + augmented copies)
    eval: int
    train_shards: list[Path]
    eval_shards: list[Path]
    index: Path  # records.json


@dataclass
class _Entry:
    """One image to encode, with its boxes in display pixels."""

    path: Path
    name: str  # image/filename and image/source_id
    manifest: str  # where the entry came from, for messages
    width: int | None  # as the manifest says, checked against the image
    height: int | None
    boxes: list[list[float]]
    labels: list[int]
    texts: list[str]
    sha256: str | None  # of the bytes an earlier stage decoded or wrote, when it recorded them


def run(session: Session, config: Config, *, workers: int | None = None) -> RecordsResult:
    """Write the train and eval shards and ``records.json``.

    ``workers`` is the number of encoding threads (default: one per core); the shards are the
    same for any number.
    """
    label_map = LabelMap.read(session.require(session.label_map_path, "split"))
    train = _entries(session.require(session.train_manifest, "split"), label_map, "")
    copies = _entries(
        session.require(session.augmented_manifest, "augment"), label_map, "images_augmented/"
    )
    evaluation = _entries(session.require(session.eval_manifest, "split"), label_map, "")
    pool = train + copies
    shuffled = [pool[i] for i in np.random.default_rng(config.seed).permutation(len(pool))]

    out = session.records_dir
    out.mkdir(parents=True, exist_ok=True)
    index = out / INDEX_NAME
    earlier = [p for p in out.iterdir() if p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in _OWN_FILES)]
    if earlier and not index.exists():
        partial = sum(1 for p in earlier if ".tmp-" in p.name)
        console.info(
            f"records: an earlier run stopped before it finished ({len(earlier) - partial} shards, "
            f"{partial} half-written, no {INDEX_NAME}); every shard is written again"
        )
    index.unlink(missing_ok=True)
    # Shards of an earlier run with another images_per_shard would not be overwritten by name
    # and would be read as extra data; they are Drip's derived files, so they go.
    for path in earlier:
        path.unlink()

    per_shard = config.images_per_shard
    digests: dict[str, str] = {}
    # Threads: most files are stored as they are, without decoding (``encode_for_record``).
    def encode(entries):
        return ordered_map(_encode_entry, entries, workers or cores())

    train_shards = _write_split("train", shuffled, out, per_shard, encode, digests)
    eval_shards = _write_split("eval", evaluation, out, per_shard, encode, digests)

    # The SHA-256 of each shard lets training tell, on --resume_training, whether the records
    # it resumes on are the ones its checkpoints were trained on.
    write_json(
        index,
        {
            "train": {
                "shards": [p.name for p in train_shards],
                "count": len(shuffled),
                "originals": len(train),
                "copies": len(copies),
                "sha256": {p.name: digests[p.name] for p in train_shards},
            },
            "eval": {
                "shards": [p.name for p in eval_shards],
                "count": len(evaluation),
                "sha256": {p.name: digests[p.name] for p in eval_shards},
            },
            "classes": list(label_map.names),
            "images_per_shard": per_shard,
        },
    )
    session.record_stage(
        "records",
        train=len(shuffled),
        eval=len(evaluation),
        shards={"train": len(train_shards), "eval": len(eval_shards)},
    )
    console.info(
        f"records: {len(shuffled)} training images ({len(copies)} augmented) in "
        f"{len(train_shards)} shards, {len(evaluation)} eval images in {len(eval_shards)} shards"
    )
    return RecordsResult(len(shuffled), len(evaluation), train_shards, eval_shards, index)


def _entries(manifest: Path, label_map: LabelMap, prefix: str) -> list[_Entry]:
    """The images of a Drip JSON manifest; ``prefix`` goes before each stored file name."""
    data = read_json(manifest)
    annotations = read_drip_json(data, str(manifest))
    root = data.get("image_root")
    if not isinstance(root, str) or not Path(root).is_dir():
        raise SessionError(
            f"{manifest}: image_root {root!r} is not a folder; rerun the stage that wrote it"
        )
    ids = label_map.ids
    entries = []
    for ann in annotations:
        for label in ann.labels:
            if label not in ids:
                raise SessionError(
                    f"{manifest}: {ann.file} has label {label!r}, which is not in the label map "
                    f"({', '.join(label_map.names)}); rerun the split stage so they agree"
                )
        entries.append(
            _Entry(
                path=resolve_image(Path(root), ann.file),
                name=prefix + ann.file,
                manifest=str(manifest),
                width=ann.width,
                height=ann.height,
                boxes=ann.boxes,
                labels=[ids[label] for label in ann.labels],
                texts=list(ann.labels),
                sha256=ann.extra.get("sha256"),
            )
        )
    return entries


def _encode_entry(entry: _Entry) -> bytes:
    """The serialized ``tf.train.Example`` of one image. Runs on the pool's threads."""
    encoded, fmt, width, height = encode_for_record(entry.path, entry.sha256)
    if entry.width is not None and (entry.width, entry.height) != (width, height):
        raise InputError(
            f"{entry.path}: is {width}x{height} as displayed but {entry.manifest} says "
            f"{entry.width}x{entry.height}; the image changed after the split, rerun the split stage"
        )
    boxes, labels, texts = [], [], []
    for box, label, text in zip(entry.boxes, entry.labels, entry.texts):
        normalized = clip_normalized(normalize(box, width, height))
        # torchvision's detectors reject boxes without area; after clipping, such a box marks
        # nothing in the image.
        if has_area(normalized):
            boxes.append(tuple(normalized))
            labels.append(label)
            texts.append(text)
    return encode_example(
        DetectionExample(
            encoded=encoded,
            format=fmt,
            filename=entry.name,
            source_id=entry.name,
            width=width,
            height=height,
            boxes=boxes,
            labels=labels,
            texts=texts,
        )
    )


def _write_split(split: str, entries: list[_Entry], out: Path, per_shard: int, encode, digests: dict[str, str]) -> list[Path]:
    count = math.ceil(len(entries) / per_shard)
    paths = [out / f"{split}-{i:05d}-of-{count:05d}.tfrecord" for i in range(count)]
    if not paths:
        return []
    payloads = iter(encode(entries))
    with console.progress(total=len(entries), desc=f"records {split}") as bar:
        for path in paths:
            with TFRecordWriter(path) as writer:
                for payload in itertools.islice(payloads, per_shard):
                    writer.write(payload)
                    bar.update()
            digests[path.name] = writer.sha256
    return paths

