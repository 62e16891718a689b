"""The DETR families of Hugging Face transformers through Drip, on tiny random networks.

No download: each family's network is configured tiny (few channels, two decoder layers, twelve
queries) and saved with ``save_pretrained``, as a user's fine-tuned checkpoint would be; Drip
starts from that folder with ``--weights PATH``. The weights are spread at random first: a fresh
network scores every encoder position the same (a zero-initialised score head), and ties would
make which queries win, and so any comparison of two runtimes, arbitrary.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from drip import cli, detectors  # noqa: E402
from drip.detectors import hf, models  # noqa: E402
from drip.deploy import onnx_infer  # noqa: E402
from drip.config import InferConfig  # noqa: E402
from drip.errors import ModelError  # noqa: E402
from drip.stages import infer, train  # noqa: E402
from drip.data.synthetic import CLASSES, make_dataset, write_drip_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
FAMILIES = {"dfine_n": "d_fine", "rtdetr_v2_r18": "rt_detr_v2", "deimv2_pico": "deimv2", "rfdetr_n": "rf_detr",
            "lwdetr_t": "lw_detr"}
MODEL_CLASSES = {"d_fine": "DFineForObjectDetection", "rt_detr_v2": "RTDetrV2ForObjectDetection",
                 "deimv2": "Deimv2ForObjectDetection", "rf_detr": "RfDetrForObjectDetection",
                 "lw_detr": "LwDetrForObjectDetection"}
BOX_TOL_PX, SCORE_TOL = 1.0, 1e-3


def tiny_config(network: str, num_labels: int, **overrides):
    if FAMILIES[network] in ("rf_detr", "lw_detr"):
        return tiny_vit_config(network, num_labels, **overrides)
    common = dict(
        encoder_hidden_dim=16, encoder_ffn_dim=32, encoder_attention_heads=2, d_model=16, num_queries=12,
        decoder_in_channels=[16, 16, 16], decoder_ffn_dim=32, decoder_layers=2, decoder_attention_heads=2,
        num_denoising=4, hidden_expansion=0.5, num_labels=num_labels,
    )
    common.update(overrides)
    if FAMILIES[network] == "d_fine":
        backbone = transformers.HGNetV2Config(
            stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 32, 64], stage_mid_channels=[8, 8, 16, 16],
            stage_out_channels=[16, 32, 64, 64], stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[1, 1, 1, 1],
            stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
            stage_kernel_size=[3, 3, 5, 5], hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1],
            out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4],
        )
        return transformers.DFineConfig(backbone_config=backbone, encoder_in_channels=[32, 64, 64],
                                        decoder_n_points=[2, 2, 2], depth_mult=0.34, lqe_hidden_dim=8, **common)
    if FAMILIES[network] == "deimv2":
        # DEIMv2-Pico's shape: a three-stage HGNetV2 whose stride-16 map feeds the light encoder,
        # which pools a stride-32 one from it; one bounding-box head shared by the decoder layers.
        backbone = transformers.HGNetV2Config(
            stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 32], stage_mid_channels=[8, 8, 16],
            stage_out_channels=[16, 32, 64], stage_num_blocks=[1, 1, 1], stage_numb_of_layers=[1, 1, 1],
            stage_downsample=[False, True, True], stage_light_block=[False, False, True], stage_kernel_size=[3, 3, 5],
            hidden_sizes=[16, 32, 64], depths=[1, 1, 1], out_indices=[3],
        )
        pico = dict(encoder_type="lite", encoder_layers=0, encoder_in_channels=[64], feat_strides=[16], num_feature_levels=2,
                    decoder_in_channels=[16, 16], decoder_n_points=[2, 2], depth_mult=0.34, lqe_hidden_dim=8,
                    share_bbox_head=True, use_gateway=False)
        return transformers.Deimv2Config(backbone_config=backbone, **{**common, **pico, **overrides})
    backbone = transformers.RTDetrResNetConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic", embedding_size=8,
        out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4],
    )
    return transformers.RTDetrV2Config(backbone_config=backbone, encoder_in_channels=[16, 32, 64],
                                       decoder_n_points=2, **common)


def tiny_vit_config(network: str, num_labels: int, **overrides):
    """RF-DETR and LW-DETR: a ViT of 16 px patches in windows, one feature level, 3 query groups."""
    common = dict(d_model=16, num_queries=12, decoder_layers=2, decoder_self_attention_heads=2, decoder_cross_attention_heads=2,
                  decoder_n_points=2, decoder_ffn_dim=32, num_labels=num_labels, group_detr=3, c2f_num_blocks=1)
    common.update(overrides)
    if FAMILIES[network] == "rf_detr":
        backbone = dict(model_type="rf_detr_dinov2", hidden_size=16, num_hidden_layers=4, num_attention_heads=2, num_windows=2,
                        patch_size=16, image_size=64, out_features=["stage1", "stage2", "stage3", "stage4"])
        return transformers.RfDetrConfig(backbone_config=backbone, **common)
    backbone = dict(model_type="lw_detr_vit", hidden_size=16, num_hidden_layers=3, num_attention_heads=2, window_block_indices=[0, 2],
                    out_indices=[1, 2], image_size=256, pretrain_image_size=64)
    return transformers.LwDetrConfig(backbone_config=backbone, projector_scale_factors=[1.0], **common)


def tiny_network(network: str, num_labels: int = 5, **overrides) -> torch.nn.Module:
    config = tiny_config(network, num_labels, **overrides)
    model_class = getattr(transformers, MODEL_CLASSES[FAMILIES[network]])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = model_class(config)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in net.parameters():
                fan_in = param[0].numel() if param.dim() >= 2 else 1
                param.add_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)
            if FAMILIES[network] in ("rf_detr", "lw_detr"):
                # Their class head starts at a prior probability of 0.01 (a bias of -4.6): every
                # score would bunch near it, under any threshold worth comparing at.
                net.class_embed.bias.zero_()
    return net.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def pretrained(request, tmp_path_factory) -> tuple[str, Path]:
    """A tiny network of the family saved as ``save_pretrained`` does, in a folder with a space."""
    network = request.param
    folder = tmp_path_factory.mktemp("hub") / f"my {network}"
    tiny_network(network).save_pretrained(folder)
    return network, folder


def non_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    head = ("class_embed", "enc_score_head", "denoising_class_embed")
    return {k: v for k, v in state.items() if not any(h in k for h in head)}


# -- weights ----------------------------------------------------------------------------------
def test_weights_folder_resizes_the_head_and_loads_the_rest(pretrained):
    network, folder = pretrained
    model = models.build_model(network, len(CLASSES) + 1, str(folder), SIZE, classes=list(CLASSES))
    config = model.net.config
    assert config.num_labels == len(CLASSES)
    assert config.id2label == dict(enumerate(CLASSES)) and config.label2id == {n: i for i, n in enumerate(CLASSES)}
    head = model.net.class_embed  # one per decoder layer (D-FINE, RT-DETRv2) or one (RF-DETR, LW-DETR)
    assert (head[0] if isinstance(head, torch.nn.ModuleList) else head).out_features == len(CLASSES)
    saved = non_head(tiny_network(network).state_dict())
    loaded = model.net.state_dict()
    assert saved and all(torch.equal(loaded[k], v) for k, v in saved.items())


def test_a_safetensors_file_starts_drips_own_architecture(tmp_path):
    # The published D-FINE-N architecture with COCO's 80 classes, as a bare .safetensors file
    # (its backbone's batch norms frozen, as transformers' conversions of the authors' files are).
    published = hf.TRANSFORMERS.skeleton("dfine_n", 81).net
    published.save_pretrained(tmp_path / "coco")
    model = models.build_model("dfine_n", len(CLASSES) + 1, str(tmp_path / "coco" / "model.safetensors"), SIZE)
    assert model.net.config.num_labels == len(CLASSES)
    loaded, saved = model.net.state_dict(), non_head(published.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())


def backbone_norms(model) -> set[str]:
    backbone = model.net.model.conv_encoder.model if hasattr(model.net.model, "conv_encoder") else model.net.model.backbone
    return {type(m).__name__ for m in backbone.modules() if "BatchNorm" in type(m).__name__}


@pytest.mark.parametrize("network", ["dfine_n", "rtdetr_v2_r18", "deimv2_pico"])
def test_backbone_norms_learn_from_scratch_and_stay_frozen_when_loaded(network, tmp_path):
    """A random backbone's frozen batch norms (mean 0, variance 1) normalise nothing: from
    scratch they learn; started from weights they stay frozen at the loaded statistics."""
    scratch = models.build_model(network, len(CLASSES) + 1, "none", SIZE)
    assert backbone_norms(scratch) == {"BatchNorm2d"}
    assert any(p.requires_grad for n, p in scratch.named_parameters() if hf._in_backbone(n) and "normalization" in n)
    tiny_network(network).save_pretrained(tmp_path / "weights")
    loaded = models.build_model(network, len(CLASSES) + 1, str(tmp_path / "weights"), SIZE)
    assert backbone_norms(loaded) and "BatchNorm2d" not in backbone_norms(loaded)
    # The choice travels with the model: rebuilt from its own structure, it is the same.
    again = detectors.rebuild(network, len(CLASSES) + 1, hf.TRANSFORMERS.structure_of(scratch), "a file")
    assert backbone_norms(again) == {"BatchNorm2d"}


def test_a_checkpoint_with_an_eval_size_keeps_its_position_embeddings_in_eval(tmp_path):
    """transformers' encoder skips its position embeddings in eval mode when ``eval_size`` is set,
    as the DEIMv2 conversion writes it: loaded by Drip, the network evaluates as it trains.
    DEIMv2-N's encoder (with attention) on the tiny Pico's backbone; D-FINE's is the same code."""
    network = "deimv2_pico"
    overrides = {"eval_size": [64, 64], "encoder_type": "hybrid", "encoder_layers": 1, "encode_proj_layers": [0]}
    tiny_network(network, **overrides).save_pretrained(tmp_path / "weights")
    names = list(tiny_network(network).config.id2label.values())  # its class head kept: the same outputs
    model = models.build_model(network, len(names) + 1, str(tmp_path / "weights"), 64, classes=names).eval()
    plain = hf._wrap(tiny_network(network, **{**overrides, "eval_size": None}), network, image_size=64).eval()
    pixels = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.net(pixel_values=pixels).logits, plain.net(pixel_values=pixels).logits, atol=1e-5)


def test_the_head_modules_are_the_tensors_that_follow_the_class_count():
    """hf.HEAD_MODULES names the class head that a start point keeps or starts fresh: exactly the
    tensors whose shape changes with the number of classes, in every family."""
    for network in FAMILIES:
        five, six = (tiny_network(network, n).state_dict() for n in (5, 6))
        follows = {k for k in five if five[k].shape != six[k].shape}
        assert follows and follows == {k for k in five if hf._in_head(k)}, network


def head_and_rest(model) -> tuple[dict, dict]:
    state = model.net.state_dict()
    return ({k: v for k, v in state.items() if hf._in_head(k)}, {k: v for k, v in state.items() if not hf._in_head(k)})


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_class_head_is_kept_only_for_the_same_names_in_the_same_order(pretrained, capsys):
    network, folder = pretrained
    names = list(tiny_network(network).config.id2label.values())  # what the checkpoint's head was trained for
    saved_head, saved_rest = head_and_rest(hf._wrap(tiny_network(network), network))
    kept = models.build_model(network, len(names) + 1, str(folder), SIZE, classes=names)
    assert "its class head is kept" in capsys.readouterr().err
    assert same(head_and_rest(kept)[0], saved_head) and same(head_and_rest(kept)[1], saved_rest)

    reordered = models.build_model(network, len(names) + 1, str(folder), SIZE, classes=names[::-1])
    assert "tensors of the class head start fresh" in capsys.readouterr().err
    head, rest = head_and_rest(reordered)
    assert same(rest, saved_rest) and not any(torch.equal(head[k], saved_head[k]) for k in head if "weight" in k)
    assert list(reordered.net.config.id2label.values()) == names[::-1]


def test_a_drip_model_continues_whole_only_for_the_same_classes(tmp_path, capsys):
    """The retraining loop: --network model.pt keeps its class head for the same names in the
    same order; as many classes under other names start a fresh one."""
    model = hf._wrap(tiny_network("dfine_n", 3), "dfine_n")
    path = models.export_model(tmp_path / "model.pt", model, "dfine_n", list(CLASSES), SIZE, {})
    again = models.build_model(str(path), 4, "none", SIZE, classes=list(CLASSES))
    assert same(again.net.state_dict(), model.net.state_dict())
    other = models.build_model(str(path), 4, "none", SIZE, classes=["cat", "dog", "bird"])
    assert "the class head starts fresh" in capsys.readouterr().err
    head, rest = head_and_rest(other)
    assert same(rest, head_and_rest(model)[1]) and not same(head, head_and_rest(model)[0])
    assert list(other.net.config.id2label.values()) == ["cat", "dog", "bird"]


def test_weights_of_another_network_are_refused_in_one_line(tmp_path):
    """A file that would leave more than half of the network at random init is no start point."""
    other = tiny_network("rtdetr_v2_r18")
    other.save_pretrained(tmp_path / "rtdetr")
    with pytest.raises(ModelError, match=r"only \d+ of dfine_n's \d+ tensors are in it; .* pick the --network") as caught:
        models.build_model("dfine_n", 4, str(tmp_path / "rtdetr" / "model.safetensors"), SIZE)
    assert "\n" not in str(caught.value)
    torch.save(other.state_dict(), tmp_path / "rtdetr.pt")
    with pytest.raises(ModelError, match=r"only \d+ of dfine_n's \d+ tensors are in it"):
        models.build_model("dfine_n", 4, str(tmp_path / "rtdetr.pt"), SIZE)


def test_weights_from_a_folder_of_the_other_family_are_refused(pretrained):
    network, folder = pretrained
    other = next(n for n in FAMILIES if n != network)
    with pytest.raises(ModelError, match="pick the --network it was made for"):
        models.build_model(other, 4, str(folder), SIZE)


def test_a_planted_pickle_is_refused(tmp_path, pretrained):
    network, folder = pretrained

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "config.json").write_text((folder / "config.json").read_text())
    (planted / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(ModelError, match="pickle files, which can run code and are refused"):
        models.build_model(network, 4, str(planted), SIZE)
    torch.save({"w": torch.zeros(1), "x": Boom()}, tmp_path / "weights.pt")
    with pytest.raises(ModelError, match="refused"):
        models.build_model(network, 4, str(tmp_path / "weights.pt"), SIZE)


def test_weights_none_warns_that_detr_models_need_pretraining(capsys):
    model = models.build_model("dfine_n", 4, "none", SIZE)
    assert "generalises from small data far worse than from pretrained weights" in capsys.readouterr().err
    assert sum(p.numel() for p in model.parameters()) > 3_000_000  # the real D-FINE-N, not a toy


@pytest.mark.parametrize("network", FAMILIES)
def test_the_losses_add_up_to_transformers_own_total(network):
    """Drip trains on the sum of the grouped losses: it must be transformers' ``loss`` (LW-DETR's
    and RF-DETR's ``loss_dict`` is unweighted and holds ``cardinality_error``, a count)."""
    model = hf._wrap(tiny_network(network), network, image_size=64).train()
    images = [torch.rand(3, 48, 64), torch.rand(3, 64, 40)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[1.0, 10.0, 30.0, 60.0]]), "labels": torch.tensor([1])}]
    torch.manual_seed(0)
    ours = sum(model(images, targets).values())
    torch.manual_seed(0)
    theirs = model.net(pixel_values=model._pixels(images), labels=[hf._to_hf_target(t, im) for t, im in zip(targets, images)]).loss
    assert torch.allclose(ours, theirs, rtol=1e-5), (float(ours), float(theirs))


def test_every_detr_network_builds_with_its_published_parameter_count():
    """The architectures in hf.NETWORKS are the published ones (built on the meta device: no memory,
    no initialisation): within 10% of the authors' count, which they round (D-FINE-N: 3.7 M as "4")."""
    for name, spec in hf.NETWORKS.items():
        config = hf.TRANSFORMERS._config(name, 81)
        with torch.device("meta"):
            net = hf._classes(spec.kind)[1](config)
        params = sum(p.numel() for p in net.parameters()) / 1e6
        assert abs(params - spec.published.params_m) <= 0.1 * spec.published.params_m, (name, params)


def test_rfdetr_xl_and_2xl_are_refused_for_their_licence():
    for name in ("rfdetr_xl", "rfdetr_2xl"):
        with pytest.raises(ModelError, match=r"Platform Model License .* Drip offers rfdetr_n, rfdetr_s, rfdetr_m and rfdetr_l") as caught:
            models.build_model(name, 4, "coco", SIZE)
        assert "\n" not in str(caught.value)


def test_every_detr_network_is_listed_with_its_published_figures():
    for name in ("rfdetr_n", "rfdetr_s", "rfdetr_m", "rfdetr_l", "lwdetr_t", "lwdetr_s"):
        published = detectors.published(name)
        assert published.coco_ap and published.params_m and "T4" in published.latency and published.licence == "Apache-2.0"
    # DEIMv2's model zoo gives its latency without the device: said so, not guessed.
    for name in ("deimv2_pico", "deimv2_n"):
        published = detectors.published(name)
        assert published.coco_ap and published.params_m and "device not stated" in published.latency
        assert published.licence == "Apache-2.0" and "DEIMv2" in published.source


def test_deimv2_on_dinov3_is_refused_for_its_licence():
    for name in ("deimv2_s", "deimv2_m", "deimv2_l", "deimv2_x"):
        with pytest.raises(ModelError, match=r"DINOv3 License, not Apache-2.0, MIT or BSD: Drip offers deimv2_pico and deimv2_n"):
            models.build_model(name, 4, "coco", SIZE)


def test_the_backbone_learns_at_the_authors_fraction_of_the_rate():
    """DEIMv2 keeps its HGNetV2 at ``conv_encoder.model``, beside the input projections, not at
    ``backbone`` as D-FINE does: the backbone's rate (half, in the authors' configs) reaches it."""
    for network, module in (("dfine_n", "backbone"), ("deimv2_pico", "conv_encoder")):
        model = hf._wrap(tiny_network(network), network)
        scale_of = {id(p): g["lr_scale"] for g in hf.TRANSFORMERS.param_groups(model, "adamw") for p in g["params"]}
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        inside = [n for n in named if f".{module}.model." in n]
        assert inside and {scale_of[id(named[n])] for n in inside} == {0.5}, network
        assert {scale_of[id(p)] for n, p in named.items() if n not in inside} == {1.0}, network


def test_weights_objects365_only_where_published():
    with pytest.raises(ModelError, match="not published for rtdetr_v2_r18; use one of coco, none"):
        models.build_model("rtdetr_v2_r18", 4, "objects365", SIZE)
    with pytest.raises(ModelError, match="not offered for dfine_s"):
        models.build_model("dfine_s", 4, "imagenet", SIZE)


# -- the whole path -----------------------------------------------------------------------------
def starter(name: str, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(ROOT / name), *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, f"{name} {args} failed:\n{out.stderr[-4000:]}"
    return out


def unmatched(ours: list[dict], theirs: list[dict], threshold: float) -> list[dict]:
    left, missing = list(theirs), []
    for det in ours:
        if det["score"] < threshold + SCORE_TOL:
            continue
        match = next((o for o in left if o["class_id"] == det["class_id"] and abs(o["score"] - det["score"]) <= SCORE_TOL
                      and max(abs(a - b) for a, b in zip(o["box"], det["box"])) <= BOX_TOL_PX), None)
        if match is None:
            missing.append(det)
        else:
            left.remove(match)
    return missing


@pytest.mark.slow
def test_train_resume_evaluate_infer_export(pretrained, tmp_path):
    network, _ = pretrained
    data = tmp_path / "data"
    annotations = make_dataset(data / "my images", 8, size=(160, 120), seed=3)
    write_drip_json(data / "metadata.json", annotations)
    # The user's own earlier model of these classes, in the label map's order (first seen first):
    # the retraining loop, whose class head is kept, so its spread scores clear the comparison's
    # threshold (RF-DETR's and LW-DETR's fresh heads score about 0.01).
    order = list(dict.fromkeys(label for a in annotations for label in a.labels))
    folder = tmp_path / f"my {network}"
    named = tiny_network(network, len(order))
    named.config.id2label, named.config.label2id = dict(enumerate(order)), {n: i for i, n in enumerate(order)}
    named.save_pretrained(folder)
    session = tmp_path / "pipe line"
    common = ["--runtime", "local", "--network", network, "--weights", str(folder), "--image_size", str(SIZE),
              "--batch_size", "2", "--checkpoint_every", "2", "--num_workers", "0", "--device", "cpu",
              "--augmentations", "0", "--lr_schedule", "constant",  # step 0-1 rates independent of the run's length
              "--session_folder", str(session), "--src_json_path", str(data / "metadata.json"),
              "--image_folder_path", str(data / "my images")]
    out = starter("training_starter.py", *common, "--number_of_steps", "2")
    assert "grad_clip 0.1" in out.stderr and "optimizer adamw" in out.stderr
    assert "its class head is kept" in out.stderr
    dl = session / "dl"
    first = torch.load(dl / "model.pt", map_location="cpu", weights_only=True)
    hf_config = json.loads(first["structure"]["hf_config"])
    assert first["network"] == network and list(hf_config["id2label"].values()) == first["classes"]
    assert (dl / "metrics.jsonl").read_text().strip()  # evaluated during training

    # Resumed to step 4 in-process, it equals an uninterrupted run of 4 steps (same session config).
    from drip.config import Config
    from drip.session import Session

    config = Config.read(dl / "pipeline.config").updated({"number_of_steps": 4}, "test")
    parts = Session(session)
    train.run(parts, config, resume=True)
    whole = Session(tmp_path / "whole")
    whole.start_new()
    for name in ("label_map.pbtxt", "records"):
        src = dl / name
        if src.is_dir():
            import shutil

            shutil.copytree(src, whole.dl / name)
        else:
            (whole.dl / name).write_bytes(src.read_bytes())
    train.run(whole, config)
    # The step-4 checkpoints, not model.pt: that is the best evaluation's, which may be step 2's.
    a, b = (torch.load(s.checkpoints_dir / "step-0000004.pt", map_location="cpu", weights_only=True)["model"]
            for s in (parts, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # drip evaluate and drip export, as users run them.
    metrics_path = tmp_path / "metrics.json"
    assert cli.main(["evaluate", "--session_folder", str(session), "--images_path", str(data / "my images"),
                     "--src_json_path", str(data / "metadata.json"), "--output", str(metrics_path), "--device", "cpu"]) == 0
    assert "AP" in json.loads(metrics_path.read_text())["metrics"]
    onnx_path = tmp_path / "model.onnx"
    assert cli.main(["export", "--session_folder", str(session), "--format", "onnx", "--output", str(onnx_path)]) == 0
    onnx = pytest.importorskip("onnx")
    assert min(o.version for o in onnx.load(str(onnx_path)).opset_import if o.domain in ("", "ai.onnx")) >= 17

    # Inference to JSON with PyTorch and with ONNX Runtime: the same detections.
    threshold = 20.0
    cfg = lambda results, model: InferConfig().updated(  # noqa: E731
        {"images_path": str(data / "my images"), "results_path": str(results), "model": str(model),
         "device": "cpu", "threshold": threshold, "batch_size": 1}, "test")
    by_torch = infer.run(cfg(tmp_path / "torch", dl / "model.pt"), session)
    by_onnx = onnx_infer.run(cfg(tmp_path / "onnx", onnx_path), session)
    compared = 0
    for group, folder_out in by_torch.groups.items():
        for entry in json.loads((folder_out / "detections.json").read_text())["images"]:
            ours = json.loads((folder_out / entry["result"]).read_text())["detections"]
            theirs = json.loads((by_onnx.groups[group] / entry["result"]).read_text())["detections"]
            assert not unmatched(ours, theirs, threshold / 100), entry["image"]
            assert not unmatched(theirs, ours, threshold / 100), entry["image"]
            compared += len(ours)
    assert compared >= 8, "the model found too little to compare"


# -- several processes ------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_train_on_tiles_with_a_rank_whose_slice_is_background_only(tmp_path):
    """Under torchrun (gloo, two processes), the published D-FINE-N on 128 px tiles (fewer anchors
    than its 300 queries), with steps whose slice on one rank holds no box: transformers then
    skips the denoising queries there, and without the zero gradient Drip adds, DDP stops at the
    next step ("Expected to have finished reduction in the prior iteration")."""
    from dataclasses import replace

    data = tmp_path / "data"
    annotations = make_dataset(data / "images", 8, size=(192, 144), seed=5)
    # Every other image is background only: each step's 2 images are one per rank.
    annotations = [replace(a, boxes=[], labels=[]) if i % 2 else a for i, a in enumerate(annotations)]
    write_drip_json(data / "metadata.json", annotations)
    session = tmp_path / "session"
    out = starter("training_starter.py", "--runtime", "local", "--network", "dfine_n", "--weights", "none",
                  "--image_size", "128", "--tile_size", "128", "--batch_size", "2", "--number_of_steps", "4",
                  "--checkpoint_every", "4", "--eval_every", "0", "--augmentations", "0", "--num_workers", "0",
                  "--device", "cpu", "--nproc_per_node", "2", "--session_folder", str(session),
                  "--src_json_path", str(data / "metadata.json"), "--image_folder_path", str(data / "images"))
    assert "weights identical on all 2 ranks" in out.stderr
    assert torch.load(session / "dl" / "model.pt", map_location="cpu", weights_only=True)["last_step"] == 4


# -- --weights coco, downloaded from a local Hub --------------------------------------------------------
BUILD_FROM_COCO = """
import json, sys, torch
from drip.detectors import models
model = models.build_model("dfine_n", 4, "coco", 64, cache_dir=sys.argv[1], classes=["circle", "square", "triangle"])
print(json.dumps({"id2label": model.net.config.id2label, "head": model.net.class_embed[0].out_features}))
torch.save(model.net.state_dict(), sys.argv[2])
"""


@pytest.mark.slow
def test_weights_coco_downloads_caches_and_resizes_the_head_through_the_hub_api(tmp_path):
    """``--weights coco`` as a user runs it, the Hub replaced by a local server speaking its HTTP API
    (HF_ENDPOINT): the download into the session cache, the head resized for the session's classes,
    and a second build from the cache alone once the server is gone."""
    from hub_server import Hub

    repo = hf.NETWORKS["dfine_n"].hub["coco"]
    published = tiny_network("dfine_n", 80)
    published.config.id2label = {i: f"coco_{i}" for i in range(80)}
    published.config.label2id = {f"coco_{i}": i for i in range(80)}
    published.save_pretrained(tmp_path / "repo")
    cache = tmp_path / "session cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    hub = Hub({repo: tmp_path / "repo"})
    try:
        first = subprocess.run([sys.executable, "-c", BUILD_FROM_COCO, str(cache), str(tmp_path / "first.pt")],
                               capture_output=True, text=True, env={**env, "HF_ENDPOINT": hub.endpoint}, timeout=300)
    finally:
        hub.close()
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"GET /{repo}/resolve/main/model.safetensors" in hub.requests, hub.requests
    assert list((cache / "huggingface").glob("models--*/snapshots/*/model.safetensors"))
    built = json.loads(first.stdout.strip().splitlines()[-1])
    assert built == {"id2label": {"0": "circle", "1": "square", "2": "triangle"}, "head": 3}
    assert "tensors of the class head start fresh" in first.stderr
    state = torch.load(tmp_path / "first.pt", weights_only=True)
    assert same({k: v for k, v in state.items() if not hf._in_head(k)},
                {k: v for k, v in published.state_dict().items() if not hf._in_head(k)})

    # The server is gone (its port refuses): the cache alone serves the same start point.
    second = subprocess.run([sys.executable, "-c", BUILD_FROM_COCO, str(cache), str(tmp_path / "second.pt")],
                            capture_output=True, text=True, env={**env, "HF_ENDPOINT": hub.endpoint}, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    again = torch.load(tmp_path / "second.pt", weights_only=True)
    assert same({k: v for k, v in again.items() if not hf._in_head(k)}, {k: v for k, v in state.items() if not hf._in_head(k)})
