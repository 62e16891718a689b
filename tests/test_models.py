"""drip.detectors.models: the network registry, starting points and the model file."""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

from drip.detectors import models, tv
from drip.errors import ConfigError, ModelError

CLASSES = ["circle", "square", "triangle"]


def class_count(model) -> int:
    """Classes (background included) that the model's head predicts."""
    family = {type(m).__name__ for m in model.modules()}
    if "FastRCNNPredictor" in family:
        return model.roi_heads.box_predictor.cls_score.out_features
    head = model.head.classification_head
    return getattr(head, "num_classes", None) or head.num_columns


def predict(model, image):
    model.eval()
    with torch.no_grad():
        return model([image])[0]


def predict_everything(model, image):
    """Every detection, however low its score: random weights score under the usual floor."""
    from drip.evaluation.metrics import evaluation_mode

    with evaluation_mode(model, score_floor=0.0), torch.no_grad():
        return model([image])[0]


@pytest.mark.parametrize("network", list(tv.NETWORKS))
def test_every_network_builds_and_predicts(network):
    torch.manual_seed(0)
    model = models.build_model(network, len(CLASSES) + 1, "none", 128)
    assert class_count(model) == len(CLASSES) + 1
    assert model.transform.max_size == 128
    out = predict_everything(model, torch.rand(3, 96, 128))
    assert set(out) >= {"boxes", "scores", "labels"}
    assert out["boxes"].shape[-1] == 4
    assert len(out["labels"]) > 0, "no detections to check"
    assert int(out["labels"].max()) <= len(CLASSES)
    # Boxes come back in the pixels of the input image.
    assert float(out["boxes"][:, 2].max()) <= 128 + 1e-3 and float(out["boxes"][:, 3].max()) <= 96 + 1e-3


def test_learning_rates_scale_with_the_batch():
    assert models.default_learning_rate("fasterrcnn_mobilenet_v3_large_fpn", 16) == pytest.approx(0.02)
    assert models.default_learning_rate("retinanet_resnet50_fpn_v2", 4) == pytest.approx(0.0025)
    assert models.default_learning_rate("ssdlite320_mobilenet_v3_large", 192) == pytest.approx(0.15)
    assert models.default_learning_rate("fcos_resnet50_fpn", 4, "adamw") == pytest.approx(1.4e-3)
    assert models.default_learning_rate("fcos_resnet50_fpn", 16, "adamw") == pytest.approx(2.8e-3)


def test_auto_optimizer_is_adamw_for_short_runs_and_sgd_for_long_ones():
    assert models.resolve_optimizer("auto", 3000) == "adamw"
    assert models.resolve_optimizer("auto", models.AUTO_ADAMW_MAX_STEPS) == "adamw"
    assert models.resolve_optimizer("auto", models.AUTO_ADAMW_MAX_STEPS + 1) == "sgd"
    assert models.resolve_optimizer("sgd", 100) == "sgd"
    assert models.resolve_optimizer("adamw", 10**6) == "adamw"


def test_unknown_network_lists_the_known_ones():
    with pytest.raises(ModelError) as err:
        models.build_model("fasterrcnn_mobilenet_v3", 4, "none", 128)
    message = str(err.value)
    assert "did you mean 'fasterrcnn_mobilenet_v3_large_fpn'" in message
    for name in tv.NETWORKS:
        assert name in message
    assert "\n" not in message


def test_missing_model_file_as_network_is_named(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        models.build_model(str(tmp_path / "nope.pt"), 4, "none", 128)


def test_export_then_load_predicts_the_same(tmp_path):
    torch.manual_seed(1)
    network = "fasterrcnn_mobilenet_v3_large_320_fpn"
    model = models.build_model(network, 4, "none", 128)
    # Non-trivial BatchNorm statistics, so a load that dropped buffers would show.
    model.train()
    model([torch.rand(3, 96, 128)], [{"boxes": torch.tensor([[10.0, 10, 60, 50]]), "labels": torch.tensor([2])}])
    model.roi_heads.score_thresh = 0.0  # random weights score low; keep every box to compare
    path = tmp_path / "my model" / "model.pt"
    models.export_model(path, model, network, CLASSES, 128, {"seed": 3}, {"step": 7})
    assert not list(path.parent.glob(".*tmp*"))  # written atomically, nothing left behind

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "drip-model" and raw["num_classes"] == 4 and raw["classes"] == CLASSES
    assert raw["config"] == {"seed": 3} and raw["step"] == 7

    loaded = models.load_model(path, "cpu")
    assert loaded.classes == CLASSES and loaded.image_size == 128 and loaded.network == network
    assert loaded.meta["step"] == 7 and "state_dict" not in loaded.meta
    assert not loaded.model.training
    loaded.model.roi_heads.score_thresh = 0.0
    image = torch.rand(3, 80, 128)
    expected, got = predict(model, image), predict(loaded.model, image)
    assert len(expected["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(expected[key], got[key]), key


def test_frozen_layers_survive_export(tmp_path):
    """A model from pretrained weights has frozen BatchNorm and layers: rebuilt the same, offline."""
    network = "fasterrcnn_mobilenet_v3_large_320_fpn"
    model = models.build_model(network, 4, "none", 128)
    tv.freeze_norms(model.backbone.body)
    frozen_param = next(name for name, _ in model.named_parameters())
    model.get_parameter(frozen_param).requires_grad_(False)
    path = tmp_path / "model.pt"
    models.export_model(path, model, network, CLASSES, 128, {})
    rebuilt = models.build_model(str(path), 4, "coco", 128)  # a model file: no download
    assert models.structure_of(rebuilt) == models.structure_of(model)
    assert not rebuilt.get_parameter(frozen_param).requires_grad


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch '{marker}'",))

    path = tmp_path / "model.pt"
    torch.save({"format": "drip-model", "payload": Payload()}, path)
    with pytest.raises(ModelError, match="refused") as err:
        models.load_model(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    with pytest.raises(ModelError, match="refused"):
        models.build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 4, str(path), 128)
    assert not marker.exists()


def test_other_files_are_explained(tmp_path):
    state = tmp_path / "state.pth"
    torch.save(models.build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 4, "none", 128).state_dict(), state)
    with pytest.raises(ModelError, match="pass it as --weights PATH with --network NAME"):
        models.load_model(state)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(ModelError, match="not a PyTorch file"):
        models.load_model(junk)
    with pytest.raises(ModelError, match="no such file"):
        models.load_model(tmp_path / "missing.pt")


def test_state_dict_with_another_class_count_skips_the_head(tmp_path, capsys):
    network = "fasterrcnn_mobilenet_v3_large_320_fpn"
    torch.manual_seed(2)
    source = models.build_model(network, 6, "none", 128)
    path = tmp_path / "weights dir" / "coco-like.pth"
    path.parent.mkdir()
    torch.save(source.state_dict(), path)

    model = models.build_model(network, 4, str(path), 128)
    err = capsys.readouterr().err
    assert "skipped 4 tensors" in err and "roi_heads.box_predictor.cls_score.weight" in err
    assert class_count(model) == 4
    theirs, ours = source.state_dict(), model.state_dict()
    backbone = [k for k in ours if k.startswith("backbone.") and "num_batches" not in k]
    assert backbone and all(torch.equal(ours[k], theirs[k]) for k in backbone)
    # Pretrained statistics stay put, as torchvision does for its own pretrained weights.
    assert models.structure_of(model)["frozen_norms"]


def test_state_dict_of_another_network_is_refused(tmp_path):
    path = tmp_path / "retina.pth"
    torch.save({"some.layer.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ModelError, match="none of its 1 tensors fit"):
        models.build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 4, str(path), 128)


def test_model_file_as_network_resizes_the_head(tmp_path, capsys):
    network = "fasterrcnn_mobilenet_v3_large_320_fpn"
    model = models.build_model(network, 4, "none", 128)
    path = tmp_path / "model.pt"
    models.export_model(path, model, network, CLASSES, 128, {})
    bigger = models.build_model(str(path), 6, "none", 128)
    assert class_count(bigger) == 6
    assert "the class head starts fresh" in capsys.readouterr().err
    same = models.build_model(str(path), 4, "none", 128)
    for key, value in model.state_dict().items():
        assert torch.equal(same.state_dict()[key], value)
    assert models.network_name(str(path)) == network


def test_coco_download_failure_says_what_to_do(monkeypatch):
    # The weights' address is a local port that refuses connections (bound, never listening), so
    # the download fails the same way on every machine, online or not.
    network = "fasterrcnn_mobilenet_v3_large_320_fpn"
    for name in ("no_proxy", "NO_PROXY"):  # a proxy would answer in the port's place
        monkeypatch.setenv(name, "127.0.0.1")
    with socket.socket() as closed, tempfile.TemporaryDirectory() as cache:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/fasterrcnn-coco.pth"
        monkeypatch.setattr(tv.NETWORKS[network].coco.value, "url", url)
        with pytest.raises(ModelError) as failed:
            models.build_model(network, 4, "coco", 128, Path(cache))
    message = str(failed.value)
    assert f"could not download COCO weights for {network} into {Path(cache) / 'hub'}" in message
    assert "Connection refused" in message  # the failure is the closed port's, not another
    assert "--weights none" in message and "--weights PATH" in message
    assert torch.hub.get_dir() != str(Path(cache) / "hub")  # the hub dir is restored


def test_weights_value_that_is_not_a_file(tmp_path):
    with pytest.raises(ModelError, match="not one of coco, imagenet, none"):
        models.build_model("fcos_resnet50_fpn", 4, "cocoa", 128)


def test_resolve_device():
    assert models.resolve_device("cpu").type == "cpu"
    assert models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="use --device cpu or auto"):
            models.resolve_device("cuda")
    with pytest.raises(ConfigError):
        models.resolve_device("tpu")


def test_weights_fallback_trains_from_scratch_when_the_download_fails(tmp_path, monkeypatch, capsys):
    """configure with --weights_fallback none: a failed download becomes --weights none, in one line
    and in pipeline.config; with the default 'fail' the same failure stops the run."""
    from drip.config import Config
    from drip.detectors import tv
    from drip.errors import DownloadError
    from drip.data.labelmap import LabelMap
    from drip.session import Session
    from drip.stages import configure

    network = "fasterrcnn_mobilenet_v3_large_320_fpn"
    spec = tv.NETWORKS[network]

    def offline(**kwargs):  # what torchvision's builder raises when the hub cannot be reached
        if kwargs.get("weights") is not None:
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
        return spec.builder(**kwargs)

    monkeypatch.setitem(tv.NETWORKS, network, dataclasses.replace(spec, builder=offline))
    session = Session(tmp_path / "pipeline")
    session.dl.mkdir(parents=True)
    LabelMap.from_names(CLASSES).write(session.label_map_path)
    config = Config(network=network, weights="coco", image_size=128, number_of_steps=10)

    with pytest.raises(DownloadError, match="--weights_fallback none"):
        configure.run(session, config)
    resolved = configure.run(session, dataclasses.replace(config, weights_fallback="none"))
    assert resolved.weights == "none"
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "training from scratch instead" in line]
    assert len(lines) == 1 and f"could not download COCO weights for {network}" in lines[0], err
    assert "Temporary failure in name resolution" in lines[0]
    assert "\nweights: \"none\"\n" in session.config_path.read_text()
