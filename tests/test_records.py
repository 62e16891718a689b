"""The records stage (drip.stages.records): TFRecord shards from the manifests."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from drip.data.dataset import ImageAnnotation, to_drip_json
from drip.errors import InputError, SessionError
from drip.data.images import encode_for_record, open_rgb_checked
from drip.data.labelmap import LabelMap
from drip.session import Session, read_json, write_json
from drip.stages import augment, records
from drip.data.synthetic import CLASSES
from drip.data.tfrecord import decode_example, iter_records


@pytest.fixture
def ready(session, dataset, config, tmp_path, monkeypatch):
    """A session after split and augment: 9 train images (+9 copies), 3 eval images."""
    monkeypatch.chdir(tmp_path)  # no files/augmentations.yaml here: the built-in policy
    annotations = dataset["annotations"]
    train, evaluation = annotations[:9], annotations[9:]
    root = str(dataset["images"])
    write_json(session.train_manifest, to_drip_json(train, image_root=root, classes=list(CLASSES)))
    write_json(session.eval_manifest, to_drip_json(evaluation, image_root=root, classes=list(CLASSES)))
    LabelMap.from_names(CLASSES).write(session.label_map_path)
    augment.run(session, config, workers=1)
    return {"train": train, "eval": evaluation, "config": config.updated({"images_per_shard": 4}, "test")}


def read_split(session: Session, split: str) -> list:
    index = read_json(session.records_dir / "records.json")
    return [
        decode_example(payload)
        for name in index[split]["shards"]
        for payload in iter_records(session.records_dir / name)
    ]


def expected_examples(session: Session, ready) -> dict[str, ImageAnnotation]:
    """Every image the records should hold, by its stored file name."""
    copies = read_json(session.augmented_manifest)["images"]
    out = {a.file: a for a in ready["train"] + ready["eval"]}
    for entry in copies:
        out["images_augmented/" + entry["file"]] = ImageAnnotation(
            file=entry["file"],
            width=entry["width"],
            height=entry["height"],
            boxes=[o["box"] for o in entry["objects"]],
            labels=[o["label"] for o in entry["objects"]],
        )
    return out


def test_shards_are_named_and_counted(session, ready):
    result = records.run(session, ready["config"], workers=1)
    index = read_json(session.records_dir / "records.json")
    assert index["train"]["count"] == result.train == 18
    assert index["train"]["shards"] == [f"train-{i:05d}-of-00005.tfrecord" for i in range(5)]
    assert {k: index["eval"][k] for k in ("shards", "count")} == {"shards": ["eval-00000-of-00001.tfrecord"], "count": 3}
    for split in ("train", "eval"):  # each shard's SHA-256, as training compares them on resume
        assert index[split]["sha256"] == {
            name: hashlib.sha256((session.records_dir / name).read_bytes()).hexdigest() for name in index[split]["shards"]
        }
    assert index["classes"] == list(CLASSES)
    assert [p.name for p in result.train_shards] == index["train"]["shards"]
    assert [sum(1 for _ in iter_records(p)) for p in result.train_shards] == [4, 4, 4, 4, 2]
    stage = session.read_state()["stages"]["records"]
    assert (stage["train"], stage["eval"]) == (18, 3)


def test_every_record_decodes_to_its_manifest_entry(session, ready):
    records.run(session, ready["config"], workers=1)
    expected = expected_examples(session, ready)
    ids = LabelMap.read(session.label_map_path).ids
    train, evaluation = read_split(session, "train"), read_split(session, "eval")
    assert sorted(ex.filename for ex in evaluation) == sorted(a.file for a in ready["eval"])
    assert sorted(ex.filename for ex in train + evaluation) == sorted(expected)
    for ex in train + evaluation:
        ann = expected[ex.filename]
        assert ex.source_id == ex.filename
        with Image.open(io.BytesIO(ex.encoded)) as img:
            assert img.size == (ex.width, ex.height) == (ann.width, ann.height)
            assert img.format.lower() == ex.format
        assert ex.texts == ann.labels
        assert list(ex.labels) == [ids[name] for name in ann.labels] and min(ex.labels, default=1) >= 1
        want = np.array(ann.boxes, dtype=np.float64).reshape(-1, 4) / ([ann.width, ann.height] * 2)
        got = np.array(ex.boxes, dtype=np.float64).reshape(-1, 4)
        assert got.min(initial=0) >= 0 and got.max(initial=1) <= 1
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_train_shards_mix_originals_and_copies_in_a_seeded_order(session, ready):
    records.run(session, ready["config"], workers=1)
    order = [ex.filename for ex in read_split(session, "train")]
    is_copy = [name.startswith("images_augmented/") for name in order]
    assert is_copy.count(True) == 9 and is_copy != sorted(is_copy)
    records.run(session, ready["config"], workers=1)
    assert [ex.filename for ex in read_split(session, "train")] == order
    records.run(session, ready["config"].updated({"seed": 1}, "test"), workers=1)
    assert [ex.filename for ex in read_split(session, "train")] != order


def test_tensorboard_reads_the_same_records(session, ready):
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    result = records.run(session, ready["config"], workers=1)
    for shard in result.train_shards + result.eval_shards:
        assert list(RawEventFileLoader(str(shard)).Load()) == list(iter_records(shard))


def test_worker_processes_write_identical_shards(session, ready):
    single = records.run(session, ready["config"], workers=1)
    first = [p.read_bytes() for p in single.train_shards + single.eval_shards]
    pooled = records.run(session, ready["config"], workers=2)
    assert [p.read_bytes() for p in pooled.train_shards + pooled.eval_shards] == first


def test_rerun_with_another_shard_size_leaves_no_stale_shards(session, ready):
    records.run(session, ready["config"], workers=1)
    leftover = session.records_dir / ".train-00000-of-00005.tfrecord.tmp-99999"
    leftover.write_bytes(b"half a shard")
    notes = session.records_dir / "notes.txt"
    notes.write_text("mine")
    records.run(session, ready["config"].updated({"images_per_shard": 10}, "test"), workers=1)
    assert sorted(p.name for p in session.records_dir.iterdir()) == [
        "eval-00000-of-00001.tfrecord",
        "notes.txt",
        "records.json",
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]


def test_exif_rotated_jpeg_is_stored_upright(session, tmp_path, config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "exif images"
    folder.mkdir()
    stored = np.zeros((120, 160, 3), np.uint8)  # as stored: 160 wide, 120 high
    stored[:, :80] = (255, 0, 0)
    stored[:, 80:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: 120 wide, 160 high
    raw_path = folder / "phone.jpg"
    Image.fromarray(stored).save(raw_path, quality=95, exif=exif)
    with Image.open(raw_path) as img:
        upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=np.int16)
    assert upright.shape == (160, 120, 3)

    box = [10.0, 20.0, 60.0, 100.0]  # display pixels
    ann = ImageAnnotation(file="phone.jpg", width=120, height=160, boxes=[box], labels=["circle"])
    write_json(session.train_manifest, to_drip_json([ann], image_root=str(folder), classes=["circle"]))
    write_json(session.eval_manifest, to_drip_json([], image_root=str(folder), classes=["circle"]))
    LabelMap.from_names(["circle"]).write(session.label_map_path)
    augment.run(session, config.updated({"augmentations": 0}, "test"), workers=1)

    result = records.run(session, config, workers=1)
    assert result.eval_shards == [] and read_json(session.records_dir / "records.json")["eval"]["count"] == 0
    (example,) = read_split(session, "train")
    assert (example.width, example.height) == (120, 160)
    assert example.encoded != raw_path.read_bytes()
    with Image.open(io.BytesIO(example.encoded)) as img:
        assert img.getexif().get(0x0112, 1) == 1
        pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
    assert pixels.shape == upright.shape and np.abs(pixels - upright).mean() < 4
    np.testing.assert_allclose(example.boxes[0], [10 / 120, 20 / 160, 60 / 120, 100 / 160], atol=1e-6)


def test_missing_augment_output_names_the_augment_stage(session, dataset, config):
    root = str(dataset["images"])
    for path in (session.train_manifest, session.eval_manifest):
        write_json(path, to_drip_json(dataset["annotations"][:2], image_root=root, classes=list(CLASSES)))
    LabelMap.from_names(CLASSES).write(session.label_map_path)
    with pytest.raises(SessionError, match="augment"):
        records.run(session, config, workers=1)


def test_label_missing_from_label_map_is_a_session_error(session, ready):
    LabelMap.from_names(["circle", "square"]).write(session.label_map_path)
    with pytest.raises(SessionError, match="triangle"):
        records.run(session, ready["config"], workers=1)


def test_a_file_is_decoded_again_only_when_it_changed_since_it_was_checked(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path, quality=95)
    _, digest = open_rgb_checked(path)
    data, fmt, width, height = encode_for_record(path, digest)
    assert (data, fmt, width, height) == (path.read_bytes(), "jpeg", 64, 48)

    path.write_bytes(path.read_bytes()[:-600])  # cut short after the check: the digest differs
    with pytest.raises(InputError, match=r"photo\.jpg: cannot decode image \(image file is truncated"):
        encode_for_record(path, digest)
    # With the digest of exactly these bytes the file counts as checked: stored, not decoded.
    cut = path.read_bytes()
    assert encode_for_record(path, hashlib.sha256(cut).hexdigest())[0] == cut
