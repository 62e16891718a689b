"""TFRecord files of ``tf.train.Example`` protos, without TensorFlow: the format on disk, not
what training makes of it (``drip.data.records``).

The record framing (length, masked CRC32C of the length, payload, masked CRC32C of the payload)
and the Example schema are TensorFlow's, so the files Drip writes load in ``tf.data`` and in the
TF Object Detection API. The message classes are built at run time from a descriptor that
mirrors ``tensorflow/core/example/{feature,example}.proto``: the real protobuf library does the
encoding, and no generated code has to match the installed protobuf version.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import google_crc32c

from ..errors import SessionError

_MASK_DELTA = 0xA282EAD8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# -- framing -----------------------------------------------------------------------------------
class TFRecordWriter:
    """Writes records to ``path`` atomically: the file appears, complete, only on ``close()``.

    A run killed halfway leaves only a ``.tmp`` file, which a rerun ignores and replaces.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._fh: BinaryIO = open(self._tmp, "wb")
        self.count = 0
        self._digest = hashlib.sha256()  # of the file's bytes, for records.json: cheaper than reading it back

    def write(self, payload: bytes) -> None:
        header = _U64.pack(len(payload))
        for chunk in (header + _U32.pack(masked_crc32c(header)), payload + _U32.pack(masked_crc32c(payload))):
            self._fh.write(chunk)
            self._digest.update(chunk)
        self.count += 1

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of everything written so far: the whole file once closed."""
        return self._digest.hexdigest()

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _read_one(fh: BinaryIO, path: Path, offset: int, verify: bool) -> bytes | None:
    header = fh.read(12)
    if not header:
        return None
    if len(header) < 12:
        raise _corrupt(path, offset, "truncated length header")
    (length,) = _U64.unpack_from(header)
    if verify and _U32.unpack_from(header, 8)[0] != masked_crc32c(header[:8]):
        raise _corrupt(path, offset, "length CRC mismatch")
    body = fh.read(length + 4)
    if len(body) < length + 4:
        raise _corrupt(path, offset, "truncated record")
    payload = body[:length]
    if verify and _U32.unpack_from(body, length)[0] != masked_crc32c(payload):
        raise _corrupt(path, offset, "data CRC mismatch")
    return payload


def _corrupt(path: Path, offset: int, what: str) -> SessionError:
    return SessionError(
        f"{path}: corrupt TFRecord at byte {offset} ({what}); rerun the records stage "
        "(drip stage records) to rewrite it"
    )


def iter_records(path: Path, verify: bool = True) -> Iterator[bytes]:
    """Yield every record payload in ``path``, checking both CRCs unless ``verify`` is False."""
    path = Path(path)
    with open(path, "rb") as fh:
        offset = 0
        while (payload := _read_one(fh, path, offset, verify)) is not None:
            offset += 16 + len(payload)
            yield payload


def index_records(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of each record, read from the headers alone: cheap random access."""
    path = Path(path)
    index = []
    size = path.stat().st_size
    with open(path, "rb") as fh:
        offset = 0
        while offset < size:
            header = fh.read(12)
            if len(header) < 12:
                raise _corrupt(path, offset, "truncated length header")
            (length,) = _U64.unpack_from(header)
            if _U32.unpack_from(header, 8)[0] != masked_crc32c(header[:8]):
                raise _corrupt(path, offset, "length CRC mismatch")
            index.append((offset, length))
            offset += 16 + length
            fh.seek(offset)
        if offset != size:
            raise _corrupt(path, offset, "truncated record")
    return index


def read_record_at(fh: BinaryIO, path: Path, offset: int) -> bytes:
    """The payload of the record starting at ``offset`` (from ``index_records``), CRC-checked."""
    fh.seek(offset)
    payload = _read_one(fh, Path(path), offset, verify=True)
    if payload is None:
        raise _corrupt(Path(path), offset, "no record at this offset")
    return payload


def count_valid(path: Path) -> int | None:
    """Number of records if every CRC checks out, else None (a shard to rewrite)."""
    try:
        return sum(1 for _ in iter_records(path))
    except (SessionError, OSError):
        return None


# -- tf.train.Example --------------------------------------------------------------------------
@lru_cache(maxsize=None)
def example_class():
    """The ``tensorflow.Example`` message class, built from its descriptor."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    FD = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="drip/tensorflow_example.proto", package="tensorflow", syntax="proto3"
    )

    def message(name, *fields):
        msg = fdp.message_type.add(name=name)
        for number, (fname, ftype, label, type_name, packed) in enumerate(fields, start=1):
            f = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
            if packed:
                f.options.packed = True
        return msg

    rep, opt = FD.LABEL_REPEATED, FD.LABEL_OPTIONAL
    message("BytesList", ("value", FD.TYPE_BYTES, rep, None, False))
    message("FloatList", ("value", FD.TYPE_FLOAT, rep, None, True))
    message("Int64List", ("value", FD.TYPE_INT64, rep, None, True))
    feature = message(
        "Feature",
        ("bytes_list", FD.TYPE_MESSAGE, opt, ".tensorflow.BytesList", False),
        ("float_list", FD.TYPE_MESSAGE, opt, ".tensorflow.FloatList", False),
        ("int64_list", FD.TYPE_MESSAGE, opt, ".tensorflow.Int64List", False),
    )
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    features = fdp.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=FD.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=FD.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature")
    features.field.add(
        name="feature", number=1, type=FD.TYPE_MESSAGE, label=rep,
        type_name=".tensorflow.Features.FeatureEntry",
    )
    message("Example", ("features", FD.TYPE_MESSAGE, opt, ".tensorflow.Features", False))

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


@dataclass
class DetectionExample:
    """One image and its boxes, as stored in a record (TF Object Detection API schema)."""

    encoded: bytes
    format: str  # "jpeg" or "png"
    filename: str
    source_id: str
    width: int
    height: int
    boxes: Sequence[Sequence[float]]  # [xmin, ymin, xmax, ymax], normalized to 0..1
    labels: Sequence[int]  # 1-based class ids
    texts: Sequence[str]  # class names


def encode_example(ex: DetectionExample) -> bytes:
    msg = example_class()()
    feat = msg.features.feature

    def put_bytes(key, values):
        feat[key].bytes_list.value.extend(values)

    def put_floats(key, values):
        feat[key].float_list.value.extend(values)

    def put_ints(key, values):
        feat[key].int64_list.value.extend(values)

    put_bytes("image/encoded", [ex.encoded])
    put_bytes("image/format", [ex.format.encode()])
    put_bytes("image/filename", [ex.filename.encode()])
    put_bytes("image/source_id", [ex.source_id.encode()])
    put_ints("image/height", [ex.height])
    put_ints("image/width", [ex.width])
    put_floats("image/object/bbox/xmin", [b[0] for b in ex.boxes])
    put_floats("image/object/bbox/ymin", [b[1] for b in ex.boxes])
    put_floats("image/object/bbox/xmax", [b[2] for b in ex.boxes])
    put_floats("image/object/bbox/ymax", [b[3] for b in ex.boxes])
    put_ints("image/object/class/label", list(ex.labels))
    put_bytes("image/object/class/text", [t.encode() for t in ex.texts])
    return msg.SerializeToString(deterministic=True)


def decode_example(payload: bytes) -> DetectionExample:
    msg = example_class()()
    msg.ParseFromString(payload)
    feat = msg.features.feature

    def values(key, kind):
        return list(getattr(feat[key], kind).value) if key in feat else []

    xmin, ymin = values("image/object/bbox/xmin", "float_list"), values("image/object/bbox/ymin", "float_list")
    xmax, ymax = values("image/object/bbox/xmax", "float_list"), values("image/object/bbox/ymax", "float_list")
    return DetectionExample(
        encoded=values("image/encoded", "bytes_list")[0],
        format=values("image/format", "bytes_list")[0].decode(),
        filename=values("image/filename", "bytes_list")[0].decode(),
        source_id=values("image/source_id", "bytes_list")[0].decode(),
        width=values("image/width", "int64_list")[0],
        height=values("image/height", "int64_list")[0],
        boxes=list(zip(xmin, ymin, xmax, ymax)),
        labels=values("image/object/class/label", "int64_list"),
        texts=[t.decode() for t in values("image/object/class/text", "bytes_list")],
    )
