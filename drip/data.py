"""The training data as PyTorch sees it: a map-style dataset over TFRecord shards.

``RecordDataset`` indexes the shards once (offsets only, so memory does not grow with the image
bytes), opens the files lazily in whichever process reads them, and turns one record into what a
torchvision detector takes: a CHW float image in 0..1 whose longer side is ``image_size``, and a
``{"boxes", "labels"}`` target in pixels of that image.

``StepBatchSampler`` decides which records make up each training step from the step number
alone, so a run resumed at step N reads exactly what an uninterrupted run would have read, and the
random horizontal flip is decided per sample from ``(seed, sample counter)``, never from a global
random state, so it does not depend on the number of data-loading workers either.
"""

from __future__ import annotations

import io
import os
from array import array
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .errors import SessionError
from .tfrecord import decode_example, index_records, read_record_at

# A sample key is either a plain record index (no augmentation) or, in training, the pair
# (global sample counter, record index) that ``StepBatchSampler`` yields: the counter seeds the
# sample's augmentation.
SampleKey = int | tuple[int, int]

_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: spreads (seed, counter) over the seed space
_U64 = 1 << 64


def sample_seed(seed: int, counter: int) -> int:
    """A 64-bit seed for the ``counter``-th training sample of a run seeded with ``seed``."""
    return (seed * _GOLDEN + counter * 0xBF58476D1CE4E5B9 + 1) % _U64


class RecordDataset(Dataset):
    """Detection samples read from TFRecord shards written by the records stage.

    ``train`` turns on the augmentation done here (a horizontal flip with probability 0.5);
    the heavier augmentation was already written to disk by the augment stage.
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
    ):
        self.shard_paths = [Path(p) for p in shard_paths]
        self.image_size = int(image_size)
        self.train = train
        self.seed = int(seed)
        self.num_classes = num_classes
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
        counter, index = key if isinstance(key, tuple) else (None, key)
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
        boxes, labels = boxes[keep], labels[keep]

        if self.train and counter is not None and _flip(self.seed, counter):
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)

        return image, {"boxes": boxes, "labels": labels}


def _flip(seed: int, counter: int) -> bool:
    generator = torch.Generator().manual_seed(sample_seed(seed, counter))
    return bool(torch.rand((), generator=generator) < 0.5)


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

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, num_steps: int):
        if n < 1:
            raise SessionError("the training set is empty; check the split and records stages")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.start_step, self.num_steps = int(start_step), int(num_steps)
        self._perms: dict[int, torch.Tensor] = {}

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

    def batch(self, step: int) -> list[tuple[int, int]]:
        first = step * self.batch_size
        return [(g, int(self._permutation(g // self.n)[g % self.n])) for g in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.num_steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.num_steps - self.start_step)
