"""YOLOX (pixeltable-yolox) through Drip: conversions on known values, the mosaic, training with a
time limit, resume, export to ONNX (fp32 and int8) with parity. No download: ``yolox_nano`` from
scratch, or with a checkpoint the test saves itself.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("yolox.models", reason="pixeltable-yolox: pip install --no-deps -r requirements-nodeps.txt")

from drip import cli, detectors  # noqa: E402
from drip.config import Config, InferConfig  # noqa: E402
from drip.data import mosaic  # noqa: E402
from drip.data.records import StepBatchSampler  # noqa: E402
from drip.data.synthetic import make_dataset, write_drip_json  # noqa: E402
from drip.deploy import onnx_infer  # noqa: E402
from drip.detectors import models  # noqa: E402
from drip.detectors.yolox import YoloxDetector, _to_yolox_targets  # noqa: E402
from drip.runtime import local  # noqa: E402
from drip.session import Session  # noqa: E402
from drip.stages import infer, train  # noqa: E402
from drip.training.hooks import TimeLimitHook  # noqa: E402

SIZE = 96


def nano(num_classes: int = 4, seed: int = 0) -> YoloxDetector:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.build_model("yolox_nano", num_classes, "none", SIZE)


def confident(model: YoloxDetector) -> YoloxDetector:
    """A network whose detections score high and distinctly: an untrained one scores everything
    about 1e-4, below any floor, and alike. The head's last layers get random weights, as small
    as it takes for the scores to spread between 0 and 1 on a probe image instead of saturating."""
    head = model.net.head
    probe = torch.rand(3, 72, 96, generator=torch.Generator().manual_seed(9))
    # BatchNorm statistics of real inputs first: with those of no data, an untrained network's
    # features vanish layer by layer and every position scores alike.
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batch below
    background = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 4
    with torch.no_grad():
        model.train()([torch.rand(3, 72, 96, generator=torch.Generator().manual_seed(i)) for i in range(4)], background)
    for scale in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for layer in [*head.obj_preds, *head.cls_preds, *head.reg_preds]:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * scale)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.5)
        with detectors.evaluation_mode(model, SIZE, 0.001) as ready, torch.no_grad():
            scores = ready([probe])[0]["scores"]
        if len(scores) > 20 and scores.max() < 0.99 and (scores * 1000).round().unique().numel() > 30:
            return model.eval()
    raise AssertionError("no weight scale gives spread scores")


# -- conversions on known values --------------------------------------------------------------
def test_targets_become_class_from_zero_and_centre_size_pixels():
    pixels = torch.zeros(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 8.0, 4.0]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    rows = _to_yolox_targets(targets, pixels)
    assert rows.shape == (2, 2, 5)
    assert rows[0, 0].tolist() == [0.0, 20.0, 40.0, 20.0, 40.0]  # class 1 -> 0; cx, cy, w, h in pixels
    assert rows[0, 1].tolist() == [2.0, 4.0, 2.0, 8.0, 4.0]
    assert rows[1].abs().sum() == 0  # an image without boxes is all padding


def test_detections_are_objectness_times_class_in_the_images_pixels():
    model = nano(num_classes=4).eval()  # 3 classes
    # Two decoded rows: (cx, cy, w, h, objectness, p(class 1..3)), the second past the image's edge.
    rows = torch.tensor([[30.0, 20.0, 20.0, 10.0, 0.9, 0.1, 0.8, 0.3],
                         [90.0, 40.0, 30.0, 30.0, 0.5, 0.6, 0.1, 0.1],
                         [10.0, 10.0, 4.0, 4.0, 0.01, 0.5, 0.5, 0.5]])
    image = torch.zeros(3, 50, 96)
    out = model._detections(rows, image)
    assert out["labels"].tolist() == [2, 1]  # ids from 1; the third row scores 0.005, under the floor
    assert torch.allclose(out["scores"], torch.tensor([0.72, 0.30]))
    assert torch.allclose(out["boxes"], torch.tensor([[20.0, 15.0, 40.0, 25.0], [75.0, 25.0, 96.0, 50.0]]))


def test_images_are_padded_bottom_right_and_fed_as_bgr_0_to_255():
    model = nano()
    image = torch.zeros(3, 40, 96)
    image[0] = 1.0  # pure red
    pixels = model._pixels([image])
    assert pixels.shape == (1, 3, 96, 96)  # 96 is a multiple of 32: the canvas is the image size
    assert pixels[0, 2, :40].eq(255).all() and pixels[0, :2, :40].eq(0).all()  # red is channel 2 in BGR
    assert torch.allclose(pixels[0, :, 40:], torch.tensor(114.0))  # the authors' grey below the image


def test_losses_train_a_batch_with_and_without_boxes():
    model = nano().train()
    images = [torch.rand(3, 72, 96), torch.rand(3, 96, 64)]
    with_boxes = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
                  {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    background = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    for targets in (with_boxes, background):
        losses = detectors.losses(model, images, targets)
        assert set(losses) == {"loss_iou", "loss_obj", "loss_cls", "loss_l1"}
        total = sum(losses.values())
        assert torch.isfinite(total) and total > 0
        model.zero_grad()
        total.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert losses["loss_iou"] == 0 and losses["loss_cls"] == 0  # only objectness learns from background


def test_the_recipe_is_the_authors():
    groups = detectors.param_groups(nano(), "sgd")
    assert all(g["nesterov"] for g in groups)
    assert {g["decay"] for g in groups} == {True, False}
    assert models.resolve_optimizer("auto", 100, "yolox_nano") == "adamw"  # short runs: Drip's rule
    assert models.resolve_optimizer("auto", 100_000, "yolox_nano") == "sgd"  # the authors' long schedule
    assert math.isclose(detectors.default_learning_rate("yolox_s", 64, "sgd"), 0.01)
    recipe = detectors.recipe("yolox_nano")
    assert recipe == {"weight_decay": 5e-4, "ema_decay": 0.9998}  # mosaic is opt-in: it lost short runs
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    assert all(g["nesterov"] for g in optimizer.param_groups)


def test_coco_weights_keep_the_class_head_only_for_cocos_classes(tmp_path):
    from drip.detectors.yolox import _coco_classes

    source = nano(num_classes=81, seed=1)
    path = tmp_path / "yolox_nano.pth"
    torch.save({"model": source.net.state_dict(), "start_epoch": 300}, path)  # the authors' checkpoint layout
    cls_key = "net.head.cls_preds.0.weight"
    coco = models.build_model("yolox_nano", 81, str(path), SIZE, classes=_coco_classes())
    assert torch.equal(coco.state_dict()[cls_key], source.state_dict()[cls_key])
    renamed = ["thing_%d" % i for i in range(80)]  # 80 classes, not COCO's: a head kept by position would lie
    other = models.build_model("yolox_nano", 81, str(path), SIZE, classes=renamed)
    assert not torch.equal(other.state_dict()[cls_key], source.state_dict()[cls_key])
    stem = "net.backbone.backbone.stem.conv.conv.weight"
    assert torch.equal(other.state_dict()[stem], source.state_dict()[stem])


def test_coco_download_failure_says_what_to_do(tmp_path, monkeypatch):
    from drip.detectors import yolox

    monkeypatch.setattr(yolox, "WEIGHTS_URL", "http://127.0.0.1:9/{name}.pth")  # a port nothing answers on
    with pytest.raises(models.ModelError, match="could not download COCO weights for yolox_nano.*--weights none"):
        models.build_model("yolox_nano", 4, "coco", SIZE, cache_dir=tmp_path)


# -- the mosaic --------------------------------------------------------------------------------
def test_mosaic_keeps_boxes_on_their_objects_and_repeats_from_its_seed():
    size = 64
    samples = []
    for i in range(4):  # each a grey image with one white square, its box exact
        image = torch.full((3, 48, 64), 0.3)
        x0, y0 = 8 + 4 * i, 10 + 2 * i
        image[:, y0:y0 + 16, x0:x0 + 16] = 1.0
        samples.append((image, torch.tensor([[float(x0), float(y0), x0 + 16.0, y0 + 16.0]]), torch.tensor([i + 1])))
    found = 0
    for seed in range(12):
        image, boxes, labels = mosaic.augment(samples[0], lambda i: samples[i], 4, size, torch.Generator().manual_seed(seed))
        again = mosaic.augment(samples[0], lambda i: samples[i], 4, size, torch.Generator().manual_seed(seed))
        assert torch.equal(image, again[0]) and torch.equal(boxes, again[1])
        assert image.shape == (3, size, size) and len(boxes) == len(labels)
        assert (boxes >= 0).all() and (boxes <= size).all()
        for box in boxes:  # the middle of each box is on a white square (brightness changes, grey stays darker)
            cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
            centre = image[:, min(cy, size - 1), min(cx, size - 1)].mean()
            corner_grey = image[:, 0, 0].mean()
            assert centre > corner_grey or (box[2] - box[0]) < 4, (seed, box.tolist())
            found += 1
    assert found >= 12  # the squares survive the cut and the affine map in most draws


def test_the_sampler_switches_to_the_plain_phase_for_the_last_steps():
    sampler = StepBatchSampler(10, 2, seed=0, start_step=0, num_steps=20, plain_fraction=0.25)
    assert sampler.plain_from == 15
    assert all(len(item) == 2 for item in sampler.batch(14))
    assert all(item[2] == "flip" for item in sampler.batch(15))
    sampler.num_steps = 40  # --time_limit fixes the count later: the phase follows it
    assert sampler.plain_from == 30 and len(list(iter(sampler))) == 40


def test_time_limit_arithmetic_leaves_room_for_the_evaluations_and_the_report():
    hook = TimeLimitHook(limit_s=600, started=1000.0, eval_images=40, decide=lambda n: n, relayout=None)
    # 100 s gone at step 10, 2 s a step of 4 images: an eval pass is 40 / 4 * 2 / 3 = 6.67 s.
    steps = hook.steps_that_fit(per_step=2.0, batch_size=4, step=10, now=1100.0)
    reserve = 4 * (6.67 + hook.EVAL_OVERHEAD_S) + 6.67 + hook.REPORT_S + hook.MARGIN_S + 0.02 * 600
    assert steps == 10 + int((500 - reserve) / 2.0)
    assert hook.steps_that_fit(per_step=2.0, batch_size=4, step=10, now=2000.0) == 11  # over time: one more step


def unmatched(ours: list[dict], theirs: list[dict], box_px: float = 1.5, score: float = 1e-3) -> list[dict]:
    """Our detections with no counterpart of the same class, score and box (each used once):
    detections that tie on score may come in either order."""
    left, missing = list(theirs), []
    for det in ours:
        match = next((o for o in left if o["class_id"] == det["class_id"] and abs(o["score"] - det["score"]) <= score
                      and max(abs(a - b) for a, b in zip(o["box"], det["box"])) <= box_px), None)
        if match is None:
            missing.append(det)
        else:
            left.remove(match)
    return missing


def test_onnx_gives_pytorchs_detections_at_any_aspect(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from drip.data.detections import detection_records  # noqa: F401 - the records ONNX inference writes

    model = confident(nano()).eval()
    path = tmp_path / "model.pt"
    models.export_model(path, model, "yolox_nano", ["a", "b", "c"], SIZE, {})
    assert cli.main(["export", "--model", str(path), "--output", str(tmp_path / "m.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    names = [o.name for o in session.get_outputs()]
    for i, shape in enumerate([(72, 96), (96, 64), (40, 96)]):  # landscape, portrait, panorama: padding differs
        image = torch.rand(3, *shape, generator=torch.Generator().manual_seed(i))
        image[:, : shape[0] // 2] *= 0.2  # not uniform noise: positions must score apart
        with detectors.evaluation_mode(model, SIZE, 0.001) as ready, torch.no_grad():
            ours = ready([image])[0]
        theirs = dict(zip(names, session.run(None, {"image": image.numpy()})))
        as_records = lambda o: [{"class_id": int(c), "score": float(s), "box": [float(v) for v in b]}  # noqa: E731
                                for b, c, s in zip(o["boxes"], o["labels"], o["scores"])]
        a, b = as_records({k: v.numpy() for k, v in ours.items()}), as_records(theirs)
        # The padding is uniform grey, so its positions score alike and which of them make the best
        # 100 is arbitrary: compare the detections whose score no other shares.
        distinct = [d for d in a if sum(abs(d["score"] - o["score"]) < 2e-3 for o in a) == 1]
        assert len(a) == len(b) and len(distinct) >= 10 and not unmatched(distinct, b), shape


# -- the whole path ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("yolox data")
    write_drip_json(data / "metadata.json", make_dataset(data / "images", 10, size=(96, 72), seed=4))
    return data


def overrides(data: Path, **more) -> dict:
    return {"src_json_path": str(data / "metadata.json"), "image_folder_path": str(data / "images"),
            "network": "yolox_nano", "weights": "none", "image_size": SIZE, "batch_size": 2, "augmentations": 0,
            "num_workers": 0, "device": "cpu", "report": False, "checkpoint_every": 2, "eval_percentage": 30, **more}


@pytest.mark.slow
def test_time_limit_ends_on_time_with_a_model_and_records_the_step_count(dataset, tmp_path):
    limit_min = 0.5
    started = time.time()
    local.train(tmp_path / "session", overrides(dataset, time_limit=limit_min))
    took = time.time() - started
    session = Session(tmp_path / "session")
    written = Config.read(session.config_path)
    checkpoint = torch.load(sorted(session.checkpoints_dir.glob("step-*.pt"))[-1], map_location="cpu", weights_only=True)
    assert checkpoint["fixed_steps"] == written.number_of_steps == checkpoint["step"] > TimeLimitHook.PROBE
    assert session.model_path.is_file()
    assert took < limit_min * 60 + 15, f"--time_limit {limit_min} min took {took:.0f} s"
    assert written.eval_every == max(1, written.number_of_steps // TimeLimitHook.EVALUATIONS)


@pytest.mark.slow
def test_train_resume_export_int8_and_onnx_parity(dataset, tmp_path):
    # Mosaic and the plain phase both run in 6 steps; resumed from step 3's checkpoint, the run ends
    # where the uninterrupted one did, to the bit.
    local.train(tmp_path / "whole", overrides(dataset, number_of_steps=6, plain_fraction=0.5, checkpoint_every=1,
                                              keep_checkpoints=10))
    shutil.copytree(tmp_path / "whole", tmp_path / "parts")
    parts = Session(tmp_path / "parts")
    for later in (4, 5, 6):
        (parts.checkpoints_dir / f"step-{later:07d}.pt").unlink()
    train.run(parts, Config.read(parts.config_path), resume=True)
    a, b = (torch.load(Session(tmp_path / s).checkpoints_dir / "step-0000006.pt", map_location="cpu",
                       weights_only=True)["model"] for s in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A model whose detections score distinctly, exported to ONNX and to int8 ONNX.
    loaded = models.load_model(Session(tmp_path / "whole").model_path)
    model = confident(loaded.model)
    model_path = tmp_path / "confident.pt"
    models.export_model(model_path, model, "yolox_nano", loaded.classes, SIZE, loaded.meta["config"])
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    assert cli.main(["export", "--model", str(model_path), "--output", str(fp32)]) == 0
    assert cli.main(["export", "--model", str(model_path), "--output", str(int8), "--int8",
                     "--calibration_images", str(dataset / "images")]) == 0
    onnx = pytest.importorskip("onnx")
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    meta = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    assert json.loads(meta["drip.int8"]) is True and json.loads(meta["drip.classes"]) == loaded.classes

    images = dataset / "images"
    cfg = lambda results, model: InferConfig().updated(  # noqa: E731
        {"images_path": str(images), "results_path": str(results), "model": str(model), "device": "cpu",
         "threshold": 30.0, "batch_size": 1}, "test")
    session = tmp_path / "whole"
    by_torch = infer.run(cfg(tmp_path / "torch", model_path), session)
    by_onnx = onnx_infer.run(cfg(tmp_path / "onnx", fp32), session)
    by_int8 = onnx_infer.run(cfg(tmp_path / "int8", int8), session)
    compared = 0
    for group, folder in by_torch.groups.items():
        for entry in json.loads((folder / "detections.json").read_text())["images"]:
            ours = json.loads((folder / entry["result"]).read_text())["detections"]
            theirs = json.loads((by_onnx.groups[group] / entry["result"]).read_text())["detections"]
            quantized = json.loads((by_int8.groups[group] / entry["result"]).read_text())["detections"]
            assert len(ours) == len(theirs) and not unmatched(ours, theirs), entry["image"]
            compared += len(ours)
            assert quantized, entry["image"]  # int8 runs and still finds what the confident model scores high
    assert compared >= 10, "the model found too little to compare"


@pytest.mark.slow
def test_two_processes_train_yolox_under_torchrun_with_background_only_images(tmp_path_factory, tmp_path):
    """Real torchrun, gloo, two CPU processes: mosaic and the plain phase, a batch slice that may
    hold only background images (two of the ten have no box), the same weights on both ranks."""
    from PIL import Image
    from test_distributed import SETTINGS, fresh, prepare, steps_in, train

    from drip.data.dataset import ImageAnnotation

    root = tmp_path_factory.mktemp("yolox ddp")
    annotations = make_dataset(root / "images", 8, size=(96, 72), seed=5, folders=())
    for i in range(2):
        Image.new("RGB", (96, 72), (90 + 40 * i, 120, 60)).save(root / "images" / f"empty_{i}.jpg")
        annotations.append(ImageAnnotation(f"empty_{i}.jpg", 96, 72, [], []))
    settings = {k: v for k, v in SETTINGS.items() if k != "box_batch_size_per_image"}
    prepare(root, annotations, {**settings, "network": "yolox_nano", "online_augmentation": "mosaic", "plain_fraction": 0.5})
    session = fresh(root, tmp_path)
    run = train(session, "--nproc_per_node", "2").finish()
    assert "weights identical on all 2 ranks" in run.stderr
    assert steps_in(session)[-1] == 4 and (session / "dl" / "model.pt").is_file()


def test_the_family_recipe_leaves_what_the_user_chose():
    from drip.stages.configure import _family_recipe

    config = Config().updated({"network": "yolox_nano", "weight_decay": 1e-4}, "test")
    assert _family_recipe(config, set()).weight_decay == 5e-4  # Drip's default: the family's value
    kept = _family_recipe(config, {"weight_decay"})  # given as a flag, though it is Drip's default
    assert kept.weight_decay == 1e-4 and kept.ema_decay == 0.9998
