"""The train stage and its data pipeline (drip.data.records), on real TFRecords of synthetic images."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from drip.detectors import models
from drip.data.records import RecordDataset, StepBatchSampler, collate
from drip.errors import Interrupted, SessionError
from drip.data.images import encode_for_record
from drip.data.labelmap import LabelMap
from drip.session import write_json
from drip.stages import train
from drip.data.synthetic import CLASSES, make_dataset
from drip.data.tfrecord import DetectionExample, TFRecordWriter, encode_example


def write_records(session, images_dir: Path, annotations, shards: int = 2) -> list[Path]:
    """What the records stage leaves behind: shards, records.json and the label map."""
    session.records_dir.mkdir(parents=True, exist_ok=True)
    LabelMap.from_names(CLASSES).write(session.label_map_path)
    ids = {name: i for i, name in enumerate(CLASSES, start=1)}
    names = [f"train-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
    writers = [TFRecordWriter(session.records_dir / name) for name in names]
    for i, ann in enumerate(annotations):
        encoded, fmt, width, height = encode_for_record(images_dir / ann.file)
        writers[i % shards].write(encode_example(DetectionExample(
            encoded=encoded, format=fmt, filename=ann.file, source_id=ann.file, width=width, height=height,
            boxes=[[b[0] / width, b[1] / height, b[2] / width, b[3] / height] for b in ann.boxes],
            labels=[ids[label] for label in ann.labels], texts=list(ann.labels),
        )))
    for writer in writers:
        writer.close()
    write_json(session.records_dir / "records.json", {
        "train": {"shards": names, "count": len(annotations)},
        "eval": {"shards": [], "count": 0},
        "classes": list(CLASSES),
    })
    return [session.records_dir / name for name in names]


@pytest.fixture
def records(session, dataset):
    return write_records(session, dataset["images"], dataset["annotations"])


def events(logs_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs_dir))
    acc.Reload()
    return acc


def checkpoint_steps(session) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in train.list_checkpoints(session.checkpoints_dir)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# -- data --------------------------------------------------------------------------------------
def test_sampler_batches_depend_on_the_step_only():
    whole = list(StepBatchSampler(n=5, batch_size=3, seed=7, start_step=0, num_steps=6))
    resumed = list(StepBatchSampler(n=5, batch_size=3, seed=7, start_step=4, num_steps=6))
    assert resumed == whole[4:]
    assert len(StepBatchSampler(5, 3, 7, 4, 6)) == 2
    # Every epoch visits each record once, in an order that changes with the epoch and the seed.
    counters = [g for batch in whole for g, _ in batch]
    assert counters == list(range(18))
    indices = [i for batch in whole for _, i in batch]
    assert sorted(indices[:5]) == sorted(indices[5:10]) == list(range(5))
    assert indices[:5] != indices[5:10]
    other = [i for batch in StepBatchSampler(5, 3, 8, 0, 6) for _, i in batch]
    assert other != indices


def test_dataset_resizes_and_converts_boxes(records, dataset):
    ds = RecordDataset(records, image_size=128, train=False)
    assert len(ds) == 12
    image, target = ds[0]
    # 160x120 images: the longer side becomes 128, the aspect ratio stays.
    assert image.shape == (3, 96, 128) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    first = dataset["annotations"][0]  # record 0 is the first image (round-robin over shards)
    expected = torch.tensor(first.boxes) * 0.8
    assert torch.allclose(target["boxes"], expected, atol=1e-3)
    assert target["labels"].tolist() == [CLASSES.index(label) + 1 for label in first.labels]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64


def test_flip_is_decided_per_sample_not_by_global_rng(records):
    ds = RecordDataset(records, image_size=128, train=True, seed=3)
    plain, plain_target = RecordDataset(records, image_size=128, train=False)[2]
    outcomes = []
    for counter in range(12):
        torch.manual_seed(counter)  # a different global state each time: must not matter
        first = ds[(counter, 2)]
        torch.manual_seed(1000 + counter)
        again = ds[(counter, 2)]
        assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
        flipped = not torch.equal(first[0], plain)
        if flipped:
            assert torch.equal(first[0], plain.flip(-1))
            width = plain.shape[-1]
            boxes = plain_target["boxes"]
            assert torch.allclose(first[1]["boxes"][:, [0, 2]], width - boxes[:, [2, 0]])
        outcomes.append(flipped)
    assert any(outcomes) and not all(outcomes)


def test_dataset_drops_degenerate_boxes_and_keeps_empty_targets(session, tmp_path):
    images = tmp_path / "imgs"
    annotations = make_dataset(images, 1, size=(128, 96), seed=4, folders=())
    ann = annotations[0]
    ann.boxes = [[10, 10, 10.2, 40], [5, 5, 60, 50]]  # the first is 0.2 px wide
    ann.labels = ["circle", "square"]
    shards = write_records(session, images, annotations, shards=1)
    image, target = RecordDataset(shards, image_size=128, train=False)[0]
    assert target["labels"].tolist() == [2]
    ann.boxes, ann.labels = [], []
    shards = write_records(session, images, annotations, shards=1)
    image, target = RecordDataset(shards, image_size=128, train=False)[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    images_, targets_ = collate([(image, target)])
    assert isinstance(images_, list) and isinstance(targets_, list)


def test_dataset_rejects_labels_outside_the_label_map(records):
    ds = RecordDataset(records, image_size=64, train=False, num_classes=1)
    with pytest.raises(SessionError, match="outside the label map"):
        for i in range(len(ds)):
            ds[i]


# -- training ----------------------------------------------------------------------------------
def test_train_writes_checkpoints_logs_and_model(session, config, records):
    result = train.run(session, config)
    assert result.step == 4 and result.model_path == session.model_path
    assert result.images_per_sec > 0
    assert checkpoint_steps(session) == [2, 4]
    for path in train.list_checkpoints(session.checkpoints_dir):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["format"] == "drip-checkpoint" and ckpt["network"] == config.network
        assert ckpt["classes"] == list(CLASSES) and ckpt["config"]["image_size"] == 128
        assert isinstance(ckpt["rng"]["torch"], torch.Tensor)
        assert ckpt["scheduler"]["last_epoch"] == ckpt["step"]
        assert ckpt["optimizer_name"] == "adamw"  # --optimizer auto, a short run

    acc = events(session.logs_dir)
    tags = acc.Tags()["scalars"]
    for tag in ("loss/total", "lr", "throughput/images_per_sec", "loss/classifier", "loss/objectness"):
        assert tag in tags, tags
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4]
    lrs = [e.value for e in acc.Scalars("lr")]
    assert lrs[0] < lrs[1]  # warmup over 2 steps
    peak = models.default_learning_rate(config.network, config.batch_size, "adamw")
    # The rate logged at step 3 is the one step index 2 used: warmup over, cosine at 2/4 of the run.
    assert lrs[2] == pytest.approx(peak * 0.5, rel=1e-6)

    loaded = models.load_model(session.model_path, "cpu")
    assert loaded.classes == list(CLASSES) and loaded.image_size == 128 and loaded.meta["step"] == 4
    final = torch.load(train.list_checkpoints(session.checkpoints_dir)[-1], map_location="cpu", weights_only=True)
    # No eval split here: the model of the last step is exported, its EMA weights (--ema is on).
    assert final["ema"] is not None and final["ema_updates"] == 4
    for key, value in final["ema"].items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert session.read_state()["stages"]["train"]["step"] == 4


def test_resume_continues_at_the_checkpoint_step(session, config, records, capsys):
    config = config.updated({"batch_size": 1}, "test")  # what is tested here does not need more
    train.run(session, config)
    more = config.updated({"number_of_steps": 6, "keep_checkpoints": 2}, "test")
    result = train.run(session, more, resume=True)
    assert result.step == 6
    assert "resuming from step-0000004.pt at step 4" in capsys.readouterr().err
    assert checkpoint_steps(session) == [4, 6]  # keep 2: step 2 removed
    steps = [e.step for e in events(session.logs_dir).Scalars("loss/total")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert models.load_model(session.model_path).meta["step"] == 6


def test_a_resumed_run_keeps_the_optimizer_it_started_with(session, config, records):
    config = config.updated({"batch_size": 1, "number_of_steps": 2, "optimizer": "sgd"}, "test")
    train.run(session, config)
    # auto would pick AdamW for 4 steps; the run started with SGD, and its momentum is kept.
    train.run(session, config.updated({"number_of_steps": 4, "optimizer": "auto"}, "test"), resume=True)
    last = torch.load(train.list_checkpoints(session.checkpoints_dir)[-1], map_location="cpu", weights_only=True)
    assert (last["step"], last["optimizer_name"]) == (4, "sgd")


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, dataset, config):
    from drip.session import Session

    def session_with_records(name):
        s = Session(tmp_path / name)
        s.start_new()
        write_records(s, dataset["images"], dataset["annotations"])
        return s

    # 'constant' keeps the learning rate of steps 0-1 independent of number_of_steps.
    config = config.updated({"lr_schedule": "constant"}, "test")
    whole = session_with_records("whole")
    train.run(whole, config)
    parts = session_with_records("parts")
    train.run(parts, config.updated({"number_of_steps": 2}, "test"))
    torch.manual_seed(12345)  # whatever the caller's random state, the resumed run restores its own
    train.run(parts, config, resume=True)
    a, b = weights(whole.model_path), weights(parts.model_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(session, config, records):
    config = config.updated({"number_of_steps": 6, "checkpoint_every": 100, "batch_size": 1}, "test")
    logs = session.logs_dir

    def interrupt_when_training():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(logs.glob("events.*")):
            time.sleep(0.01)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

    # A stray signal after the run has restored the handlers must not stop pytest.
    def ours(*_):
        pass

    previous = signal.signal(signal.SIGINT, ours)
    term = signal.getsignal(signal.SIGTERM)
    try:
        thread = threading.Thread(target=interrupt_when_training, daemon=True)
        thread.start()
        with pytest.raises(Interrupted, match=r"stopped at step \d+; checkpoint saved to .*resume with --resume_training"):
            train.run(session, config)
        thread.join()
        assert signal.getsignal(signal.SIGINT) is ours and signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGINT, previous)
    stopped_at = checkpoint_steps(session)
    assert len(stopped_at) == 1 and 0 < stopped_at[0] < 6
    assert not session.model_path.exists()
    result = train.run(session, config, resume=True)
    assert result.step == 6


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(session, config, records, capsys):
    config = config.updated({"batch_size": 1}, "test")  # what is tested here does not need more
    train.run(session, config)
    newest = session.checkpoints_dir / "step-0000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    result = train.run(session, config, resume=True)
    err = capsys.readouterr().err
    assert "warning: step-0000004.pt cannot be read" in err
    assert "resuming from step-0000002.pt at step 2" in err
    assert result.step == 4
    assert checkpoint_steps(session) == [2, 4]
    torch.load(newest, map_location="cpu", weights_only=True)  # rewritten, whole


def test_resuming_a_finished_run_says_so(session, config, records, capsys):
    config = config.updated({"batch_size": 1}, "test")  # what is tested here does not need more
    train.run(session, config)
    session.model_path.unlink()
    capsys.readouterr()
    result = train.run(session, config, resume=True)
    assert result.step == 4 and result.images_per_sec is None
    assert "already finished at step 4; raise --number_of_steps" in capsys.readouterr().err
    assert session.model_path.exists()  # exported again
    assert checkpoint_steps(session) == [2, 4]


def test_resume_without_checkpoints_starts_at_zero(session, config, records, capsys):
    config = config.updated({"batch_size": 1}, "test")  # what is tested here does not need more
    result = train.run(session, config.updated({"number_of_steps": 1}, "test"), resume=True)
    assert result.step == 1
    assert "training starts at step 0" in capsys.readouterr().err


def test_resume_with_another_network_is_refused(session, config, records):
    config = config.updated({"batch_size": 1}, "test")  # what is tested here does not need more
    train.run(session, config.updated({"number_of_steps": 2}, "test"))
    other = config.updated({"network": "ssdlite320_mobilenet_v3_large"}, "test")
    with pytest.raises(SessionError, match="set network back to fasterrcnn_mobilenet_v3_large_320_fpn"):
        train.run(session, other, resume=True)


def test_non_finite_loss_stops_with_advice(session, config, records):
    config = config.updated({"batch_size": 1}, "test")  # what is tested here does not need more
    huge = config.updated({"learning_rate": 1e12, "warmup_steps": 0, "grad_clip": 0, "number_of_steps": 6}, "test")
    with pytest.raises(SessionError, match="lower --learning_rate"):
        train.run(session, huge)
    assert not session.model_path.exists()


def test_missing_records_name_the_stage(session, config):
    with pytest.raises(SessionError, match="run the records stage first"):
        train.run(session, config)


def test_training_reads_batches_through_worker_processes(session, config, records):
    config = config.updated({"batch_size": 1}, "test")  # what is tested here does not need more
    result = train.run(session, config.updated({"num_workers": 2, "number_of_steps": 2}, "test"))
    assert result.step == 2 and checkpoint_steps(session) == [2]


def test_network_from_a_model_file_continues_from_its_weights(session, config, records, tmp_path, capsys):
    config = config.updated({"batch_size": 1}, "test")  # what is tested here does not need more
    train.run(session, config.updated({"number_of_steps": 2}, "test"))
    start = tmp_path / "start model.pt"
    start.write_bytes(session.model_path.read_bytes())
    before = weights(start)
    config2 = config.updated({"network": str(start), "number_of_steps": 1, "learning_rate": 0.0, "warmup_steps": 0}, "test")
    result = train.run(session, config2)
    assert result.step == 1
    # The earlier run of this session went to the trash, not into this run's resume path.
    assert "moved the earlier run's checkpoints and logs" in capsys.readouterr().err
    assert checkpoint_steps(session) == [1]
    assert [p.name for p in session.trash.glob("*-train/checkpoints/*.pt")] == ["step-0000002.pt"]
    after = torch.load(session.model_path, map_location="cpu", weights_only=True)
    assert after["network"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
    # learning rate 0: only the BatchNorm running statistics may move.
    for key, value in before.items():
        if "running_" not in key and "num_batches" not in key:
            assert torch.equal(after["state_dict"][key], value), key


def test_trains_on_what_the_records_stage_writes(session, config, tmp_path, monkeypatch):
    from drip.stages import augment, records, split

    monkeypatch.chdir(tmp_path)  # no files/augmentations.yaml here: the built-in policy
    config = config.updated({"batch_size": 1, "number_of_steps": 1, "images_per_shard": 5}, "test")
    split.run(session, config)
    augment.run(session, config, workers=1)
    records.run(session, config, workers=1)
    classes, shards = train.read_records(session)
    assert classes == list(LabelMap.read(session.label_map_path).names) and len(shards) > 1
    assert train.run(session, config).step == 1
