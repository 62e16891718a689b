"""TFRecord framing and tf.Example encoding, checked against TensorBoard's independent reader."""

import pytest
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

from drip.errors import SessionError
from drip.data.tfrecord import (
    DetectionExample,
    TFRecordWriter,
    count_valid,
    decode_example,
    encode_example,
    index_records,
    iter_records,
    read_record_at,
)


def _example(i):
    return DetectionExample(
        encoded=bytes([i]) * (100 + i),
        format="jpeg",
        filename=f"sub dir/ü{i}.jpg",
        source_id=str(i),
        width=640,
        height=480,
        boxes=[(0.25, 0.5, 0.75, 1.0)] * (i % 3),
        labels=[1 + i % 2] * (i % 3),
        texts=["cat"] * (i % 3),
    )


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "train-00000-of-00001.tfrecord"
    with TFRecordWriter(path) as w:
        for i in range(5):
            w.write(encode_example(_example(i)))
    return path


def test_round_trip(shard):
    decoded = [decode_example(r) for r in iter_records(shard)]
    assert decoded == [_example(i) for i in range(5)]


def test_tensorboard_reader_agrees(shard):
    ours = list(iter_records(shard))
    theirs = [bytes(r) for r in RawEventFileLoader(str(shard)).Load()]
    assert theirs == ours


def test_random_access_by_index(shard):
    index = index_records(shard)
    with open(shard, "rb") as fh:
        assert decode_example(read_record_at(fh, shard, index[3][0])) == _example(3)


def test_corruption_is_detected(shard):
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SessionError, match="corrupt TFRecord.*rerun the records stage"):
        list(iter_records(shard))
    assert count_valid(shard) is None


def test_truncated_shard_is_detected(shard):
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(SessionError, match="truncated"):
        index_records(shard)


def test_aborted_writer_leaves_no_shard(tmp_path):
    path = tmp_path / "x.tfrecord"
    with pytest.raises(RuntimeError):
        with TFRecordWriter(path) as w:
            w.write(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
