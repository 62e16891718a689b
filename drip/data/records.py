"""The training data as PyTorch sees it: a map-style dataset over the session's TFRecord shards
(not the annotations' in-memory form, ``drip.data.dataset``, nor the record format itself,
``drip.data.tfrecord``).

``RecordDataset`` indexes the shards once (offsets only, so memory does not grow with the image
bytes), opens the files lazily in whichever process reads them, and turns one record into what a
torchvision detector takes: a CHW float image in 0..1 whose longer side is ``image_size``, and a
``{"boxes", "labels"}`` target in pixels of that image.

``read_records`` and ``read_eval_records`` turn the session's ``records/records.json`` into the
class names and the shard paths, checked.

``StepBatchSampler`` decides which records make up each training step from the step number
alone, so a run resumed at step N reads exactly what an uninterrupted run would have read, and the
online augmentation (``ONLINE_AUGMENTATIONS``: a horizontal flip, and with ``jitter`` a random zoom
and a colour change) is drawn per sample from ``(seed, sample counter)``, never from a global
random state, so it does not depend on the number of data-loading workers either.
"""

from __future__ import annotations

import io
import math
import os
from array import array
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..errors import SessionError
from ..session import Session, read_json
from . import mosaic
from .labelmap import LabelMap
from .tfrecord import decode_example, index_records, read_record_at

# A sample key is either a plain record index (no augmentation) or, in training, the pair
# (global sample counter, record index) that ``StepBatchSampler`` yields: the counter seeds the
# sample's augmentation.
SampleKey = int | tuple[int, int] | tuple[int, int, str]

# What ``RecordDataset`` draws afresh for every training sample, on top of the augment stage's
# copies on disk. ``jitter`` follows what detection recipes apply online (torchvision's
# references/detection "ssd"/"lsj" presets, YOLO's HSV and scale gains), kept mild because the
# offline policy already moves and recolours the copies:
# - a zoom by a factor from 0.75 to 1.33 (log-uniform) on half the samples: zooming out shrinks the
#   frame onto a canvas of the image's mean colour, zooming in crops a random window, so objects
#   are seen at more sizes and positions while the input keeps its size (the detector's own
#   transform would undo a plain resize);
# - brightness, contrast and saturation each scaled by a factor from 0.75 to 1.25.
ONLINE_AUGMENTATIONS = ("jitter", "mosaic", "flip", "none")
_ZOOM = (0.75, 4 / 3)
_ZOOM_P = 0.5
_COLOUR = 0.25
# A box cut by a zoom-in crop is kept when this much of it is still in the frame (the built-in
# policy's min_visibility), and when it is at least a pixel on each side.
_MIN_VISIBLE = 0.3

_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads (seed, counter) over the seed space
_U64 = 1 << 64


def sample_seed(seed: int, counter: int) -> int:
    """A 64-bit seed for the ``counter``-th training sample of a run seeded with ``seed``."""
    return (seed * _GOLDEN + counter * 0xBF58476D1CE4E5B9 + 1) % _U64


class RecordDataset(Dataset):
    """Detection samples read from TFRecord shards written by the records stage.

    ``train`` turns on the ``augmentation`` done here (one of ``ONLINE_AUGMENTATIONS``; ``flip``
    is a horizontal flip with probability 0.5; ``mosaic`` is ``drip.data.mosaic``'s, drawing three
    more records) for samples keyed ``(counter, index)``; the heavier augmentation was already
    written to disk by the augment stage.
    ``num_classes`` (label-map size, background excluded), when given, makes a label outside
    1..num_classes an error naming the record instead of a crash deep inside the model.
    """

    def __init__(
        self,
        shard_paths: Sequence[Path],
        image_size: int,
        train: bool,
        seed: int = 0,
        num_classes: int | None = None,
        augmentation: str = "flip",
    ):
        if augmentation not in ONLINE_AUGMENTATIONS:
            raise ValueError(f"augmentation {augmentation!r} is not one of {', '.join(ONLINE_AUGMENTATIONS)}")
        self.shard_paths = [Path(p) for p in shard_paths]
        self.image_size = int(image_size)
        self.train = train
        self.seed = int(seed)
        self.num_classes = num_classes
        self.augmentation = augmentation
        # Two flat integer arrays rather than a list of tuples: 16 bytes a record.
        self._shard = array("q")
        self._offset = array("q")
        for shard, path in enumerate(self.shard_paths):
            for offset, _length in index_records(path):
                self._shard.append(shard)
                self._offset.append(offset)
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._offset)

    # Open file handles must not cross a fork or a pickle into a worker: each process opens its own.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def _file(self, shard: int):
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        fh = self._files.get(shard)
        if fh is None:
            fh = self._files[shard] = open(self.shard_paths[shard], "rb")
        return fh

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files = {}

    def __getitem__(self, key: SampleKey):
        """``index``, or ``(counter, index)``, or ``(counter, index, augmentation)``: the sampler
        names the augmentation of the training phase the sample falls in (``plain_fraction``)."""
        augmentation = self.augmentation
        if isinstance(key, tuple) and len(key) == 3:
            counter, index, augmentation = key
        else:
            counter, index = key if isinstance(key, tuple) else (None, key)
        image, boxes, labels = self._read(index)
        if self.train and counter is not None and augmentation != "none":
            seed = sample_seed(self.seed, counter)
            if augmentation == "mosaic":
                generator = torch.Generator().manual_seed(seed)
                image, boxes, labels = mosaic.augment((image, boxes, labels), self._read, len(self), self.image_size,
                                                      generator)
            else:
                image, boxes, labels = augment_sample(image, boxes, labels, seed, augmentation)
        return image, {"boxes": boxes, "labels": labels}

    def _read(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Record ``index`` as it is: the image resized, its boxes in its pixels, its labels."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} is out of range (the dataset has {len(self)})")
        shard = self._shard[index]
        path = self.shard_paths[shard]
        offset = self._offset[index]
        example = decode_example(read_record_at(self._file(shard), path, offset))
        where = f"{path} record at byte {offset} ({example.filename})"

        image = _load_image(example.encoded, self.image_size, where)
        height, width = image.shape[-2:]

        boxes = torch.tensor(example.boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(list(example.labels), dtype=torch.int64)
        if len(labels) != len(boxes):
            raise SessionError(f"{where}: {len(boxes)} boxes but {len(labels)} labels; rerun the records stage")
        if self.num_classes is not None:
            bad = labels[(labels < 1) | (labels > self.num_classes)]
            if len(bad):
                raise SessionError(
                    f"{where}: class id {int(bad[0])} is outside the label map's 1..{self.num_classes}; "
                    "rerun the records stage"
                )
        # Normalized to this image's pixels, clipped to it.
        boxes = boxes * torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        # Boxes under a pixel at this size cannot be learned, and torchvision rejects empty ones.
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        return image, boxes[keep], labels[keep]


def augment_sample(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, seed: int, augmentation: str):
    """The online augmentation of one sample, every random draw from a generator seeded with ``seed``.

    The flip is the generator's first draw, so ``flip`` and ``jitter`` flip the same samples.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    width = image.shape[-1]
    if uniform(0, 1) < 0.5:
        image = image.flip(-1)
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if augmentation != "jitter":
        return image, boxes, labels
    # Every draw is made whether or not it is used, so one sample's draws never shift another's.
    zoom_draw = uniform(0, 1)
    zoom = math.exp(uniform(math.log(_ZOOM[0]), math.log(_ZOOM[1])))
    place_x, place_y = uniform(0, 1), uniform(0, 1)
    brightness, contrast, saturation = (uniform(1 - _COLOUR, 1 + _COLOUR) for _ in range(3))
    if zoom_draw < _ZOOM_P:
        image, boxes, labels = _zoom(image, boxes, labels, zoom, place_x, place_y)
    return _colour(image, brightness, contrast, saturation), boxes, labels


def _zoom(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, zoom: float, place_x: float, place_y: float):
    """Scale the content by ``zoom`` inside a frame of the same size: pad (out) or crop (in)."""
    height, width = image.shape[-2:]
    new_h, new_w = max(1, round(height * zoom)), max(1, round(width * zoom))
    scaled = torch.nn.functional.interpolate(
        image[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=zoom < 1
    )[0].clamp_(0, 1)
    sx, sy = new_w / width, new_h / height
    boxes = boxes * torch.tensor([sx, sy, sx, sy])
    if zoom < 1:
        left, top = round((width - new_w) * place_x), round((height - new_h) * place_y)
        canvas = image.mean(dim=(1, 2), keepdim=True).expand(-1, height, width).clone()
        canvas[:, top:top + new_h, left:left + new_w] = scaled
        boxes = boxes + torch.tensor([left, top, left, top], dtype=boxes.dtype)
        return canvas, boxes, labels
    left, top = round((new_w - width) * place_x), round((new_h - height) * place_y)
    cropped = scaled[:, top:top + height, left:left + width]
    shifted = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    clipped = shifted.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (visible >= _MIN_VISIBLE * area) & ((clipped[:, 2] - clipped[:, 0]) >= 1) & ((clipped[:, 3] - clipped[:, 1]) >= 1)
    return cropped.contiguous(), clipped[keep], labels[keep]


def _colour(image: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """torchvision's ColorJitter arithmetic (brightness, contrast, saturation) on a 0..1 CHW image."""
    gray_weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype).view(3, 1, 1)
    image = (image * brightness).clamp_(0, 1)
    mean = (image * gray_weights).sum(0).mean()
    image = ((image - mean) * contrast + mean).clamp_(0, 1)
    gray = (image * gray_weights).sum(0, keepdim=True)
    return ((image - gray) * saturation + gray).clamp_(0, 1)


def _load_image(encoded: bytes, size: int, where: str) -> torch.Tensor:
    """Decode to RGB and resize so the longer side is ``size``: a float CHW tensor in 0..1.

    Pillow rather than ``torchvision.io.decode_image``, whose decoders torchvision 0.29
    deprecates. Its JPEG ``draft`` mode decodes a large photo at a reduced DCT scale (still no
    smaller than the target), which saves most of the decoding time for big images.
    """
    try:
        with Image.open(io.BytesIO(encoded)) as img:
            width, height = img.size
            scale = size / max(width, height)
            new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
            if img.format == "JPEG" and scale < 1:
                img.draft("RGB", new_size)
            img = img.convert("RGB")
            if img.size != new_size:
                # Pillow's resampling widens its filter when it shrinks: antialiased bilinear.
                img = img.resize(new_size, Image.BILINEAR, reducing_gap=None)
            array = np.asarray(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise SessionError(f"{where}: image bytes do not decode ({exc}); rerun the records stage") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def collate(batch):
    """Detectors take lists (images of different sizes), not stacked tensors."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """The batches of steps ``start_step .. num_steps - 1``, each a function of its step alone.

    Sample ``j`` of step ``s`` is the ``g = s * batch_size + j``-th sample of the run: position
    ``g % n`` of the permutation of epoch ``g // n``, drawn from a generator seeded with
    ``seed * 1000003 + epoch``. Each item is ``(g, record index)``: ``g`` seeds the sample's
    augmentation (see ``RecordDataset``).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, num_steps: int, plain_fraction: float = 0.0,
                 plain: str = "flip"):
        if n < 1:
            raise SessionError("the training set is empty; check the split and records stages")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.start_step, self.num_steps = int(start_step), int(num_steps)
        self.plain_fraction, self.plain = float(plain_fraction), plain
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def plain_from(self) -> int:
        """The first step of the final plain phase (``num_steps`` without one)."""
        return self.num_steps - round(self.plain_fraction * self.num_steps)

    def _permutation(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            perm = torch.randperm(self.n, generator=generator)
            # A batch spans at most a few epochs: keep only the newest permutations.
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def batch(self, step: int) -> list[tuple]:
        """Step ``step``'s samples; in the final plain phase each names its augmentation too."""
        first = step * self.batch_size
        picked = [(g, int(self._permutation(g // self.n)[g % self.n])) for g in range(first, first + self.batch_size)]
        if step >= self.plain_from:
            return [(g, index, self.plain) for g, index in picked]
        return picked

    def __iter__(self) -> Iterator[list[tuple]]:
        # ``num_steps`` is read at every step: --time_limit fixes it once training has measured a few.
        step = self.start_step
        while step < self.num_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        return max(0, self.num_steps - self.start_step)


# -- the session's records --------------------------------------------------------------------
def read_records(session: Session) -> tuple[list[str], list[Path]]:
    """Class names (id 1 first) and the training shards, checked against the label map."""
    index_path = session.require(session.records_dir / "records.json", "records")
    index = read_json(index_path)
    names = list(LabelMap.read(session.require(session.label_map_path, "split")).names)
    if not isinstance(index, dict):
        raise SessionError(f"{index_path}: expected an object with 'train' and 'classes'; rerun the records stage")
    recorded = index.get("classes")
    if recorded is not None and list(recorded) != names:
        raise SessionError(
            f"{index_path}: the records were written for classes {list(recorded)} but "
            f"{session.label_map_path.name} has {names}; rerun the records stage"
        )
    listed = index.get("train") or []
    if isinstance(listed, dict):  # {"shards": [...], "count": N, ...} as the records stage writes it
        listed = listed.get("shards") or []
    shards = [shard_path(session.records_dir, entry, index_path) for entry in listed]
    if not shards:
        raise SessionError(f"{index_path}: no training shards listed; rerun the records stage")
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise SessionError(f"{missing[0]}: training shard missing ({len(missing)} in all); rerun the records stage")
    return names, shards


def read_eval_records(session: Session) -> list[Path]:
    """The eval shards ``records.json`` lists (none when the split held nothing out)."""
    index_path = session.records_dir / "records.json"
    index = read_json(index_path)
    listed = (index.get("eval") or []) if isinstance(index, dict) else []
    if isinstance(listed, dict):
        listed = listed.get("shards") or []
    shards = [shard_path(session.records_dir, entry, index_path) for entry in listed]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise SessionError(f"{missing[0]}: eval shard missing ({len(missing)} in all); rerun the records stage")
    return shards


def shard_path(records_dir: Path, entry: Any, index_path: Path) -> Path:
    if isinstance(entry, dict):
        entry = entry.get("file") or entry.get("path") or entry.get("name")
    if not isinstance(entry, str) or not entry:
        raise SessionError(f"{index_path}: shard entry {entry!r} is not a file name; rerun the records stage")
    return records_dir / entry
