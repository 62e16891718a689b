"""Evaluation during training, the best model, EMA and the online augmentation (drip.data.records)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from drip.detectors import models
from drip.data.records import RecordDataset, _zoom
from drip.evaluation.metrics import Metrics
from drip.data.images import encode_for_record
from drip.session import read_json, write_json
from drip.stages import train
from drip.training import hooks
from drip.training.optim import EMA
from drip.data.synthetic import CLASSES, make_dataset
from drip.data.tfrecord import DetectionExample, TFRecordWriter, encode_example

from test_train import write_records


def write_eval_records(session, images_dir, annotations) -> list:
    """An eval shard beside the training ones, listed in records.json as the records stage does."""
    ids = {name: i for i, name in enumerate(CLASSES, start=1)}
    name = "eval-00000-of-00001.tfrecord"
    writer = TFRecordWriter(session.records_dir / name)
    for ann in annotations:
        encoded, fmt, width, height = encode_for_record(images_dir / ann.file)
        writer.write(encode_example(DetectionExample(
            encoded=encoded, format=fmt, filename=ann.file, source_id=ann.file, width=width, height=height,
            boxes=[[b[0] / width, b[1] / height, b[2] / width, b[3] / height] for b in ann.boxes],
            labels=[ids[label] for label in ann.labels], texts=list(ann.labels),
        )))
    writer.close()
    index = read_json(session.records_dir / "records.json")
    index["eval"] = {"shards": [name], "count": len(annotations)}
    write_json(session.records_dir / "records.json", index)
    return [session.records_dir / name]


@pytest.fixture
def records(session, dataset, tmp_path):
    write_records(session, dataset["images"], dataset["annotations"])
    eval_dir = tmp_path / "eval images"
    return write_eval_records(session, eval_dir, make_dataset(eval_dir, 5, seed=7, folders=()))


@pytest.fixture
def config(config):
    # Few sampled RoIs: a CPU step is mostly their RoIAlign backward, and nothing here needs more.
    return config.updated({"eval_every": 2, "box_batch_size_per_image": 32}, "test")


def metrics_rows(session) -> list[dict]:
    return [json.loads(line) for line in session.metrics_path.read_text().splitlines()]


def fake_evaluations(monkeypatch, aps):
    """Make the loop's evaluations return ``aps`` in turn (real pictures are still drawn)."""
    calls = iter(aps)

    def evaluate_records(model, shards, classes, device, batch_size, image_size, show_progress=True, slicing=None):
        ap = next(calls)
        return dataclasses.replace(Metrics.empty(classes, images=5), AP=ap, AP50=ap + 0.2)

    monkeypatch.setattr(hooks, "evaluate_records", evaluate_records)


# -- the run ---------------------------------------------------------------------------------------
def test_training_evaluates_and_tensorboard_shows_it(session, config, records):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.run(session, config)
    rows = metrics_rows(session)
    assert [row["step"] for row in rows] == [2, 4]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "per_class_ap"} <= set(rows[0])
    assert rows[0]["images"] == 5

    # TensorBoard's own reader; size_guidance 0 keeps every event (the default samples images).
    acc = EventAccumulator(str(session.logs_dir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for name in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):
        assert [e.step for e in acc.Scalars(f"metrics/{name}")] == [2, 4], name
    for loss in ("loss/total", "loss/classifier", "loss/box_reg", "loss/objectness", "loss/rpn_box_reg"):
        assert loss in tags["scalars"]
    assert "lr" in tags["scalars"] and "throughput/images_per_sec" in tags["scalars"]
    eval_classes = {name for name, n in rows[0]["per_class_objects"].items() if n}
    for name in eval_classes:
        assert f"metrics_per_class/AP/{name}" in tags["scalars"]
        assert f"metrics_per_class/AP50/{name}" in tags["scalars"]

    # Predictions beside the ground truth for the first four eval images, at each evaluation.
    shown = sorted(t for t in tags["images"] if t.startswith("eval_predictions/"))
    assert shown == [f"eval_predictions/{i}" for i in range(4)]
    first = acc.Images("eval_predictions/0")
    assert [e.step for e in first] == [2, 4] and first[0].width > first[0].height > 0
    # The augmented training samples, once, at the start.
    grid = acc.Images("train/augmented_samples")
    assert len(grid) == 1 and grid[0].step == 0 and grid[0].width > 0

    # One COCO precision-recall curve per class with objects in the eval split.
    curves = set(acc.PluginTagToContent("pr_curves"))
    assert curves == {f"pr_curves/{name}" for name in eval_classes}
    curve = acc.Tensors(f"pr_curves/{sorted(eval_classes)[0]}")
    assert [e.step for e in curve] == [2, 4]
    from tensorboard.util import tensor_util

    values = tensor_util.make_ndarray(curve[-1].tensor_proto)
    assert values.shape == (6, 101)  # TP, FP, TN, FN, precision, recall at COCO's 101 recall points
    assert values[5, 0] == 1.0 and values[5, -1] == 0.0  # recall falls as TensorBoard expects

    # The best checkpoint beside the last; the exported model is it, and the session says so.
    assert session.best_checkpoint_path.is_file()
    assert train.list_checkpoints(session.checkpoints_dir)[-1].name == "step-0000004.pt"
    state = session.read_state()["stages"]["train"]
    best = torch.load(session.best_checkpoint_path, map_location="cpu", weights_only=True)
    assert best["best"]["step"] == state["best_step"] == best["step"]
    loaded = models.load_model(session.model_path)
    assert loaded.meta["step"] == state["best_step"] and loaded.meta["last_step"] == 4
    assert loaded.meta["metrics"]["AP"] == state["best_metrics"]["AP"] == rows[[r["step"] for r in rows].index(best["step"])]["AP"]


def test_the_exported_model_is_the_best_not_the_last(session, config, records, monkeypatch, capsys):
    fake_evaluations(monkeypatch, [0.3, 0.1])
    train.run(session, config)
    assert [(row["step"], row["AP"]) for row in metrics_rows(session)] == [(2, 0.3), (4, 0.1)]
    err = capsys.readouterr().err
    assert "the best is still step 2 (AP 0.300)" in err and "exporting the best model: step 2 of 4" in err

    exported = torch.load(session.model_path, map_location="cpu", weights_only=True)
    assert exported["step"] == 2 and exported["last_step"] == 4 and exported["metrics"]["AP"] == 0.3
    best = torch.load(session.best_checkpoint_path, map_location="cpu", weights_only=True)
    last = torch.load(session.checkpoints_dir / "step-0000004.pt", map_location="cpu", weights_only=True)
    assert best["step"] == 2
    # model.pt holds the best checkpoint's (EMA) weights, not the last step's.
    assert all(torch.equal(exported["state_dict"][k], v) for k, v in best["ema"].items())
    assert not all(torch.equal(exported["state_dict"][k], v) for k, v in last["ema"].items())
    state = session.read_state()["stages"]["train"]
    assert state["step"] == 4 and state["best_step"] == 2 and state["best_metrics"]["AP"] == 0.3


def test_best_pt_is_never_pruned(session, config, records, monkeypatch):
    fake_evaluations(monkeypatch, [0.3, 0.1, 0.2])
    config = config.updated({"number_of_steps": 6, "keep_checkpoints": 1, "batch_size": 1}, "test")
    train.run(session, config)
    assert [p.name for p in train.list_checkpoints(session.checkpoints_dir)] == ["step-0000006.pt"]
    assert torch.load(session.best_checkpoint_path, map_location="cpu", weights_only=True)["step"] == 2


def test_resume_keeps_the_best_so_far(session, config, records, monkeypatch, capsys):
    config = config.updated({"batch_size": 1}, "test")
    fake_evaluations(monkeypatch, [0.3])
    train.run(session, config.updated({"number_of_steps": 2}, "test"))
    # A row of a step after the checkpoint (a run stopped before saving): that step is trained again.
    with open(session.metrics_path, "a") as fh:
        fh.write(json.dumps({"step": 3, "AP": 0.9}) + "\n")
    fake_evaluations(monkeypatch, [0.1])
    capsys.readouterr()
    train.run(session, config, resume=True)
    assert "best model so far: step 2 (AP 0.300)" in capsys.readouterr().err
    assert [(row["step"], row["AP"]) for row in metrics_rows(session)] == [(2, 0.3), (4, 0.1)]
    assert models.load_model(session.model_path).meta["step"] == 2
    assert session.read_state()["stages"]["train"]["best_step"] == 2


# -- --patience ----------------------------------------------------------------------------------
def test_patience_stops_after_that_many_evaluations_without_a_better_ap(session, config, records, monkeypatch,
                                                                          capsys):
    fake_evaluations(monkeypatch, [0.3, 0.1, 0.3, 0.5])
    config = config.updated({"eval_every": 1, "batch_size": 1, "number_of_steps": 8, "patience": 2}, "test")
    assert train.run(session, config).step == 3  # best at 1; 2 and 3 are no better (an equal AP is not)
    assert [(row["step"], row["AP"]) for row in metrics_rows(session)] == [(1, 0.3), (2, 0.1), (3, 0.3)]
    err = capsys.readouterr().err
    assert "no better AP than step 1's in the last 2 evaluations (--patience 2): stopping at step 3 of 8" in err
    assert train.list_checkpoints(session.checkpoints_dir)[-1].name == "step-0000003.pt"
    meta = models.load_model(session.model_path).meta
    assert meta["step"] == 1 and meta["last_step"] == 3
    state = session.read_state()["stages"]["train"]
    assert state["step"] == 3 and state["best_step"] == 1 and state["stopped_early"] is True


def test_resume_counts_the_evaluations_before_it_and_an_early_stop_stays_stopped(session, config, records,
                                                                                 monkeypatch, capsys):
    config = config.updated({"eval_every": 1, "batch_size": 1, "patience": 3}, "test")
    fake_evaluations(monkeypatch, [0.3, 0.1])
    train.run(session, config.updated({"number_of_steps": 2}, "test"))  # best at 1, one evaluation since
    fake_evaluations(monkeypatch, [0.2, 0.25, 0.9])
    # Two more without a better AP make three: it stops at 4, where an unbroken run stops too.
    assert train.run(session, config.updated({"number_of_steps": 8}, "test"), resume=True).step == 4
    assert [row["step"] for row in metrics_rows(session)] == [1, 2, 3, 4]

    fake_evaluations(monkeypatch, [])  # no training and no evaluation may happen now
    capsys.readouterr()
    assert train.run(session, config.updated({"number_of_steps": 8}, "test"), resume=True).step == 4
    assert "stopped early at step 4: 3 evaluations without a better AP (--patience 3)" in capsys.readouterr().err
    assert models.load_model(session.model_path).meta["step"] == 1

    fake_evaluations(monkeypatch, [0.5])  # a larger patience trains on
    assert train.run(session, config.updated({"number_of_steps": 5, "patience": 10}, "test"), resume=True).step == 5
    assert models.load_model(session.model_path).meta["step"] == 5


def test_eval_every_zero_evaluates_at_the_end_only(session, config, records, monkeypatch):
    fake_evaluations(monkeypatch, [0.2])
    train.run(session, config.updated({"eval_every": 0, "batch_size": 1}, "test"))
    assert [row["step"] for row in metrics_rows(session)] == [4]
    assert models.load_model(session.model_path).meta["step"] == 4


def test_without_an_eval_split_the_last_model_is_exported(session, config, dataset, capsys):
    write_records(session, dataset["images"], dataset["annotations"])  # records.json: no eval shards
    train.run(session, config.updated({"number_of_steps": 1, "batch_size": 1}, "test"))
    assert "no eval split" in capsys.readouterr().err
    assert not session.metrics_path.exists() and not session.best_checkpoint_path.exists()
    state = session.read_state()["stages"]["train"]
    assert state["best_step"] == 1 and state["best_metrics"] is None


# -- EMA ------------------------------------------------------------------------------------------
def test_ema_follows_the_weights_with_a_warming_decay():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.999)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked += 3
    ema.update(model)
    decay = 2 / 11  # min(0.999, (1 + n) / (10 + n)) at n = 1
    for key, value in ema.model.state_dict().items():
        live = model.state_dict()[key]
        if value.is_floating_point():
            assert torch.allclose(value, decay * start[key] + (1 - decay) * live), key
        else:
            assert torch.equal(value, live), key
    again = EMA(model, 0.999, ema.model.state_dict(), ema.updates)
    assert again.updates == 1 and all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), ema.model.state_dict().values()))


# -- online augmentation ----------------------------------------------------------------------------
def test_jitter_is_decided_per_sample_and_keeps_images_and_boxes_in_shape(session, dataset):
    shards = write_records(session, dataset["images"], dataset["annotations"])
    jitter = RecordDataset(shards, image_size=128, train=True, seed=3, augmentation="jitter")
    flip = RecordDataset(shards, image_size=128, train=True, seed=3, augmentation="flip")
    plain, _ = RecordDataset(shards, image_size=128, train=False)[2]
    changed_boxes = 0
    for counter in range(16):
        torch.manual_seed(counter)  # the global random state must not matter
        image, target = jitter[(counter, 2)]
        torch.manual_seed(999)
        again, again_target = jitter[(counter, 2)]
        assert torch.equal(image, again) and torch.equal(target["boxes"], again_target["boxes"])
        assert image.shape == plain.shape and 0 <= float(image.min()) and float(image.max()) <= 1
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"])
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()
        assert ((boxes[:, 2] - boxes[:, 0]) >= 1).all() and ((boxes[:, 3] - boxes[:, 1]) >= 1).all()
        flipped_boxes = flip[(counter, 2)][1]["boxes"]
        changed_boxes += not torch.equal(boxes, flipped_boxes)
    assert changed_boxes > 0  # some samples were zoomed


@pytest.mark.parametrize("zoom", [0.75, 1.3])
def test_zoom_moves_boxes_with_the_pixels(zoom):
    image = torch.zeros(3, 60, 80)
    image[:, 20:40, 30:50] = 1.0  # an object at x 30..50, y 20..40
    boxes = torch.tensor([[30.0, 20.0, 50.0, 40.0]])
    out, out_boxes, labels = _zoom(image, boxes, torch.tensor([1]), zoom, 0.3, 0.7)
    assert out.shape == image.shape and labels.tolist() == [1]
    ys, xs = torch.nonzero(out[0] > 0.5, as_tuple=True)
    found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    assert torch.allclose(out_boxes[0], found, atol=1.0), (out_boxes, found)


def test_zoom_in_drops_boxes_mostly_cut_off():
    image = torch.rand(3, 60, 80)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 20.0, 50.0, 40.0]])
    # Zoomed 1.3x with the window at the bottom right: the top-left box is gone.
    _, out_boxes, labels = _zoom(image, boxes, torch.tensor([1, 2]), 1.3, 1.0, 1.0)
    assert labels.tolist() == [2]

