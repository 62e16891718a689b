"""drip.deploy.export and drip.deploy.onnx_infer: exported models describe themselves and detect what PyTorch does.

The tolerance between the runtimes, checked on every image of ``images`` (landscape, portrait,
square, larger than the model size): every detection scoring at least ``THRESHOLD`` percent plus
``SCORE_TOL`` in one runtime is found in the other with the same class, every box corner within
``BOX_TOL_PX`` pixels of the original image and the score within ``SCORE_TOL``. Detections closer
than that to the threshold may fall on either side of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from drip import cli
from drip.detectors import models, tv
from drip.deploy import onnx_infer
from drip.config import InferConfig
from drip.errors import ConfigError, ModelError
from drip.deploy.export import SCORE_FLOOR, default_output, export
from drip.stages import infer
from drip.data.synthetic import CLASSES, draw_scene

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]
NETWORK = "fasterrcnn_mobilenet_v3_large_320_fpn"
SIZE = 128
THRESHOLD = 20.0  # percent
BOX_TOL_PX = 1.0
SCORE_TOL = 1e-3


def write_scene(path: Path, size, seed: int) -> None:
    image, _, _ = draw_scene(np.random.default_rng(seed), *size)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A Drip model file of a detector trained a few SGD steps on synthetic scenes.

    A few steps from scratch teach the classifier only "background", so its class layer is
    then redrawn at random, large: the detections get spread-out scores and several classes,
    which is what a comparison of two runtimes needs (ties would make the order arbitrary).
    """
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(4):
        image, boxes, labels = draw_scene(rng, SIZE, SIZE * 3 // 4)
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        target = {"boxes": torch.tensor(boxes), "labels": torch.tensor([CLASSES.index(n) + 1 for n in labels])}
        samples.append((tensor, target))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = models.build_model(NETWORK, len(CLASSES) + 1, "none", SIZE)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        model.train()
        for step in range(2):
            batch = samples[2 * step: 2 * step + 2]
            loss = sum(model([s[0] for s in batch], [s[1] for s in batch]).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            cls = model.roi_heads.box_predictor.cls_score
            cls.weight.copy_(torch.randn(cls.weight.shape, generator=torch.Generator().manual_seed(0)) * 5)
            cls.bias.zero_()
    path = tmp_path_factory.mktemp("export") / "my session" / "dl" / "model.pt"
    models.export_model(path, model, NETWORK, list(CLASSES), SIZE, {"network": NETWORK}, {"step": 2})
    return path


@pytest.fixture(scope="module")
def onnx_path(trained) -> Path:
    """The model exported the way users do it: ``drip export`` with a session folder."""
    session = trained.parents[1]
    out = trained.parent / "exported model" / "model.onnx"
    assert cli.main(["export", "--session_folder", str(session), "--format", "onnx", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images") / "my images"
    write_scene(root / "cam 1" / "wide.jpg", (160, 120), 1)
    write_scene(root / "cam 1" / "tall.png", (90, 200), 2)
    write_scene(root / "cam 2" / "square.jpg", (128, 128), 3)
    write_scene(root / "cam 2" / "big.jpg", (400, 300), 4)
    return root


def config(images: Path, results: Path, model: Path, **values) -> InferConfig:
    return InferConfig().updated(
        {"images_path": str(images), "results_path": str(results), "model": str(model), "device": "cpu",
         "threshold": THRESHOLD, **values},
        "test",
    )


def records(result) -> dict[str, dict]:
    out = {}
    for folder in result.groups.values():
        for entry in json.loads((folder / "detections.json").read_text())["images"]:
            out[entry["image"]] = json.loads((folder / entry["result"]).read_text())
    return out


def unmatched(ours: list[dict], theirs: list[dict], box_px: float = BOX_TOL_PX, score: float = SCORE_TOL) -> list[dict]:
    """Detections of ``ours`` clear of the threshold that ``theirs`` lacks, within the tolerance."""
    left = list(theirs)
    missing = []
    for det in ours:
        if det["score"] < THRESHOLD / 100 + score:
            continue
        match = next(
            (
                other for other in left
                if other["class_id"] == det["class_id"]
                and abs(other["score"] - det["score"]) <= score
                and max(abs(a - b) for a, b in zip(other["box"], det["box"])) <= box_px
            ),
            None,
        )
        if match is None:
            missing.append(det)
        else:
            left.remove(match)
    return missing


# -- ONNX -------------------------------------------------------------------------------------
def test_onnx_file_describes_itself(onnx_path, trained):
    model = onnx.load(str(onnx_path))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}  # every value is JSON
    assert meta["drip.format"] == "drip-onnx" and meta["drip.network"] == NETWORK
    assert meta["drip.classes"] == list(CLASSES) and meta["drip.image_size"] == SIZE
    assert meta["drip.score_floor"] == SCORE_FLOOR and "0..1" in meta["drip.input"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, "height", "width"]  # any image size goes in
    assert sorted(o.name for o in model.graph.output) == ["boxes", "labels", "scores"]
    assert min(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 11
    assert default_output(trained, "onnx") == trained.with_name("model.onnx")


def test_onnx_runtime_finds_what_pytorch_finds(trained, onnx_path, images, tmp_path):
    # Batch 1, as the ONNX graph runs: torchvision pads a batch to its largest image, and the
    # padding moves the anchors and proposals of the smaller images a little.
    torch_result = infer.run(config(images, tmp_path / "torch", trained, batch_size=1), trained.parents[1])
    onnx_result = onnx_infer.run(config(images, tmp_path / "onnx", onnx_path), tmp_path)

    assert (onnx_result.images, onnx_result.failed) == (torch_result.images, 0) == (4, 0)
    by_torch, by_onnx = records(torch_result), records(onnx_result)
    assert by_torch.keys() == by_onnx.keys()
    compared = 0
    for image, expected in by_torch.items():
        got = by_onnx[image]
        assert {k: got[k] for k in ("width", "height")} == {k: expected[k] for k in ("width", "height")}
        assert not unmatched(expected["detections"], got["detections"]), image
        assert not unmatched(got["detections"], expected["detections"]), image
        compared += len(expected["detections"])
    assert compared >= 8, "the model found too little to compare"
    # The same files, named the same way, with the same summary apart from the model.
    for group, folder in torch_result.groups.items():
        ours = json.loads((onnx_result.groups[group] / "detections.json").read_text())
        theirs = json.loads((folder / "detections.json").read_text())
        assert ours["model"] == str(onnx_path)
        assert {k: v for k, v in ours.items() if k not in ("model", "images", "counts")} == {
            k: v for k, v in theirs.items() if k not in ("model", "images", "counts")
        }
        assert sorted(p.name for p in onnx_result.groups[group].iterdir()) == sorted(p.name for p in folder.iterdir())


def test_onnx_results_match_torchvisions_own_output(trained, onnx_path, tmp_path):
    """The whole ONNX path against torchvision's own ``model(images)``, with no Drip code between.

    The other comparisons feed both runtimes through Drip's resize and post-processing
    (``to_detections_np``), so a bug in that shared part would not show. Here the reference is the
    detector's unmodified output for the original image: torchvision's transform resizes it and
    scales the boxes back. Images at the model's size (no resize on either side) must match
    within the tolerance; an image at half the size (Drip resizes it with Pillow, torchvision with
    ``interpolate``) within a pixel's worth of resampling difference.
    """
    from torchvision.transforms.functional import pil_to_tensor

    folder = tmp_path / "images" / "cam"
    cases = {"wide.png": (128, 96), "tall.png": (96, 128), "half.png": (64, 48)}  # PNG: the same pixels back
    for seed, (name, size) in enumerate(cases.items(), start=11):
        write_scene(folder / name, size, seed)
    by_onnx = {Path(k).name: v for k, v in records(onnx_infer.run(config(folder.parent, tmp_path / "onnx", onnx_path), tmp_path)).items()}
    model = models.load_model(trained).model.eval()
    compared = 0
    for name, size in cases.items():
        with Image.open(folder / name) as image:
            tensor = pil_to_tensor(image.convert("RGB")).float() / 255
        with torch.inference_mode():
            out = model([tensor])[0]
        theirs = [
            {"class_id": int(label), "score": float(score), "box": [float(v) for v in box]}
            for box, score, label in zip(out["boxes"], out["scores"], out["labels"])
            if float(score) >= THRESHOLD / 100
        ]
        ours = by_onnx[name]["detections"]
        assert (by_onnx[name]["width"], by_onnx[name]["height"]) == size
        tolerance = {} if size[0] == SIZE or size[1] == SIZE else {"box_px": 1.0, "score": 0.02}
        assert not unmatched(theirs, ours, **tolerance), name
        assert not unmatched(ours, theirs, **tolerance), name
        compared += len(theirs)
    assert compared >= 8, "torchvision found too little to compare"


def test_onnx_infer_scores_against_annotations_like_pytorch(trained, onnx_path, tmp_path):
    from drip.data.synthetic import make_dataset, write_drip_json

    images = tmp_path / "annotated"
    write_drip_json(tmp_path / "truth.json", make_dataset(images, 4, size=(160, 120), folders=("cam",), seed=7))
    values = {"src_json_path": str(tmp_path / "truth.json"), "batch_size": 1}
    theirs = infer.run(config(images, tmp_path / "torch", trained, **values), trained.parents[1])
    ours = onnx_infer.run(config(images, tmp_path / "onnx", onnx_path, **values), tmp_path)
    assert (tmp_path / "onnx" / "metrics.json").is_file()
    assert ours.metrics.AP == pytest.approx(theirs.metrics.AP, abs=1e-3)
    assert ours.metrics.AP50 == pytest.approx(theirs.metrics.AP50, abs=1e-3)


def test_onnx_infer_runs_without_pytorch(onnx_path, images, tmp_path):
    """``inference_starter.py --model x.onnx`` with torch and torchvision unimportable, as on a host without them."""
    results = tmp_path / "results"
    script = (
        "import sys, runpy\n"
        "for m in ('torch', 'torchvision'):\n"
        "    sys.modules[m] = None\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "inference_starter.py"), "--runtime", "local",
         "--model", str(onnx_path), "--images_path", str(images), "--results_path", str(results),
         "--threshold", str(THRESHOLD)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    index = json.loads((results / "cam 1" / "detections.json").read_text())
    assert index["counts"]["images"] == 2 and index["classes"] == list(CLASSES)
    assert (results / "cam 2" / "big.jpg").is_file()


def test_onnx_infer_refuses_what_it_cannot_do(onnx_path, images, tmp_path):
    with pytest.raises(ConfigError, match="--device cuda"):
        onnx_infer.run(config(images, tmp_path / "r", onnx_path, device="cuda"), tmp_path)
    with pytest.raises(ConfigError, match="exported at 128"):
        onnx_infer.run(config(images, tmp_path / "r", onnx_path, image_size=256), tmp_path)
    # An ONNX model made elsewhere lacks the class names: say how to get one that has them.
    plain = onnx.load(str(onnx_path))
    del plain.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(plain, str(foreign))
    with pytest.raises(ModelError, match="not made by drip export"):
        onnx_infer.load_onnx(foreign)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load it"):
        onnx_infer.load_onnx(broken)


def test_export_refuses_bad_requests(trained, tmp_path, capsys):
    with pytest.raises(ConfigError, match="must end in .onnx"):
        export(trained, "onnx", tmp_path / "model.bin")
    with pytest.raises(ConfigError, match="not a format"):
        export(trained, "tflite")
    assert cli.main(["export", "--model", str(trained), "--format", "tflite"]) == 2
    assert "--format tflite is not one of onnx, torchscript" in capsys.readouterr().err
    assert cli.main(["export", "--model", str(tmp_path / "nothing.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp*"))


# -- TorchScript ------------------------------------------------------------------------------
def test_torchscript_export_runs_and_describes_itself(trained, tmp_path):
    path = export(trained, "torchscript", tmp_path / "model.torchscript.pt")
    extra = {"drip.json": ""}
    with pytest.warns(FutureWarning):  # torch.jit.load is deprecated in PyTorch 2.14, still works
        scripted = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["drip.json"])
    assert meta["classes"] == list(CLASSES) and meta["image_size"] == SIZE and meta["score_floor"] == SCORE_FLOOR

    loaded = models.load_model(trained)
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1))
    from drip.evaluation.metrics import evaluation_mode

    with evaluation_mode(loaded.model, score_floor=SCORE_FLOOR), torch.inference_mode():
        expected = loaded.model([image])[0]
    with torch.inference_mode(), pytest.warns(UserWarning, match="always returns"):
        _losses, detections = scripted([image])
    got = detections[0]
    assert len(got["scores"]) == len(expected["scores"]) > 0
    torch.testing.assert_close(got["boxes"], expected["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(got["scores"], expected["scores"], atol=1e-5, rtol=0)
    assert torch.equal(got["labels"], expected["labels"])


# -- every family -----------------------------------------------------------------------------
def untrained_but_lively(network: str) -> torch.nn.Module:
    """``network`` from scratch, made to give distinct scores without training it.

    Untrained, SSDlite's activations vanish (its BatchNorms' running statistics are the identity)
    and every family's scores tie; ties make a comparison of two runtimes meaningless. So the
    BatchNorm statistics are measured on a few scenes, and the class head is drawn again at a
    scale that spreads the scores.
    """
    import math

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = models.build_model(network, len(CLASSES) + 1, "none", SIZE).eval()
    rng = np.random.default_rng(0)
    scenes = [torch.from_numpy(np.asarray(draw_scene(rng, SIZE, SIZE * 3 // 4)[0]).copy()).permute(2, 0, 1).float() / 255
              for _ in range(4)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None  # a cumulative average: one pass sets the statistics
        norm.reset_running_stats()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.backbone.train()
        model.backbone(model.transform(scenes)[0].tensors)
        model.eval()
        for layer in model.get_submodule(tv.NETWORKS[network].head).modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / math.sqrt(fan_in))
                if layer.bias is not None:
                    layer.bias.zero_()
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    "network",
    # The default network too: it is what most users export.
    ["fasterrcnn_mobilenet_v3_large_fpn", "ssdlite320_mobilenet_v3_large", "retinanet_resnet50_fpn_v2",
     "fcos_resnet50_fpn", "fasterrcnn_resnet50_fpn"],
)
def test_every_family_exports_to_onnx_and_matches(network, tmp_path):
    path = tmp_path / "model.pt"
    models.export_model(path, untrained_but_lively(network), network, list(CLASSES), SIZE, {}, {})
    exported = onnx_infer.load_onnx(export(path, "onnx"))
    loaded = models.load_model(path)
    from drip.evaluation.metrics import evaluation_mode
    from drip.data.detections import to_detections_np

    # Landscape like the export's example, portrait, and square: SSD stretches each to a square.
    for seed, size in enumerate([(160, 120), (90, 200), (150, 150)]):
        image, _, _ = draw_scene(np.random.default_rng(seed), *size)
        output, shape = onnx_infer.predict(exported, image, SIZE)
        resized = image.resize(shape, Image.BILINEAR)
        tensor = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255
        with evaluation_mode(loaded.model, score_floor=SCORE_FLOOR), torch.inference_mode():
            expected = loaded.model([tensor])[0]
        ours = to_detections_np(output["boxes"], output["scores"], output["labels"],
                                size=image.size, resized=shape, threshold=THRESHOLD, names=CLASSES)
        theirs = infer.to_detections(expected["boxes"], expected["scores"], expected["labels"],
                                     size=image.size, resized=shape, threshold=THRESHOLD, names=CLASSES)
        assert len(theirs) >= 5, f"{network}: too few detections to compare"
        assert not unmatched(theirs, ours), f"{network} {size}"
        assert not unmatched(ours, theirs), f"{network} {size}"
