"""The DETR families' conversions, proven against ``transformers``' own and against known values.

Drip's wrapper (``drip.detectors.hf``) turns Drip's targets (xyxy pixels, labels from 1) into
``transformers``' (normalised cxcywh, labels from 0) and the query logits back into boxes in the
input image's pixels. The loss treats a class id equal to ``num_labels`` as "no object" without a
word, so a label off by one or a swapped width and height would train quietly on wrong targets:
each conversion here is checked on hand-computed values and against the family's own image
processor and ``post_process_object_detection``, on an image that is not square. The ONNX model
is compared with that post-processing too (not with the Python it was traced from), on a network
whose queries score distinctly, boxes included.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from drip.detectors import hf, models  # noqa: E402
from test_transformers_families import FAMILIES, tiny_network  # noqa: E402

WIDTH, HEIGHT = 200, 100  # not square: a swapped width and height shows
# Drip's targets: xyxy pixels of the 200x100 image, labels from 1 ...
BOXES = [[20.0, 10.0, 60.0, 50.0], [100.0, 40.0, 190.0, 95.0]]
LABELS = [1, 3]
# ... and the same boxes worked out by hand as transformers wants them: normalised cxcywh, labels from 0.
CXCYWH = [[0.2, 0.3, 0.2, 0.4], [0.725, 0.675, 0.45, 0.55]]
HF_LABELS = [0, 2]


PROCESSORS = {  # each family's image processor, as its published checkpoints name it
    "d_fine": "RTDetrImageProcessor", "rt_detr_v2": "RTDetrImageProcessor",  # 0..1, no normalisation
    "deimv2": "RTDetrImageProcessor",  # its HGNetV2 sizes, as transformers' conversion writes them: 0..1
    "rf_detr": "RfDetrImageProcessor", "lw_detr": "DeformableDetrImageProcessor",  # ImageNet mean and deviation
}


def processor(network: str = "dfine_n", size: int = 64):
    """``network``'s image processor, set to stretch to a ``size`` square as Drip does; boxes
    converted for the loss."""
    return getattr(transformers, PROCESSORS[FAMILIES[network]])(size={"height": size, "width": size}, do_convert_annotations=True)


def distinct(network: str) -> torch.nn.Module:
    """A tiny network of ``network``'s family whose queries score apart: its random weights already
    differ, and the class head is steepened (and centred) so that the top scores spread (a fresh DETR scores its
    queries almost alike, and which of two tied queries wins is arbitrary)."""
    net = tiny_network(network)
    heads = net.class_embed if isinstance(net.class_embed, torch.nn.ModuleList) else [net.class_embed]
    with torch.no_grad():
        for layer in heads:
            layer.weight.mul_(2.0)
    return net


def separated(scores: torch.Tensor, top: int = 20, gap: float = 1e-3) -> list[int]:
    """Ranks among the ``top`` scores (highest first) that are at least ``gap`` from both
    neighbours: their place in the order cannot depend on rounding, so they are compared."""
    s = scores[: top + 1].tolist()
    ranks = [i for i in range(min(top, len(s))) if (i == 0 or s[i - 1] - s[i] > gap) and (i + 1 >= len(s) or s[i] - s[i + 1] > gap)]
    assert len(ranks) >= 5, f"the queries score alike ({s}): too little to compare"
    return ranks


def coco_annotation(boxes, labels) -> dict:
    return {"image_id": 0, "annotations": [
        {"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": label - 1, "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
        for (x0, y0, x1, y1), label in zip(boxes, labels)
    ]}


# -- targets ----------------------------------------------------------------------------------------
def test_targets_are_normalised_cxcywh_with_labels_from_zero():
    ours = hf._to_hf_target({"boxes": torch.tensor(BOXES), "labels": torch.tensor(LABELS)}, torch.zeros(3, HEIGHT, WIDTH))
    assert ours["class_labels"].tolist() == HF_LABELS
    assert torch.allclose(ours["boxes"], torch.tensor(CXCYWH), atol=1e-6), ours["boxes"]


@pytest.mark.parametrize("network", FAMILIES)
def test_targets_match_the_image_processor(network):
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    theirs = processor(network)(images=image, annotations=[coco_annotation(BOXES, LABELS)], return_tensors="pt")["labels"][0]
    ours = hf._to_hf_target({"boxes": torch.tensor(BOXES), "labels": torch.tensor(LABELS)}, torch.zeros(3, HEIGHT, WIDTH))
    assert ours["class_labels"].tolist() == theirs["class_labels"].tolist()
    assert torch.allclose(ours["boxes"], theirs["boxes"].float(), atol=1e-5), (ours["boxes"], theirs["boxes"])


# -- detections -------------------------------------------------------------------------------------
@pytest.mark.parametrize("network", FAMILIES)
def test_detections_are_pixels_of_the_input_with_labels_from_one(network):
    # Query 2, class 1 (from 0) scores highest: its box is (80, 20, 120, 30) in the 200x100 image.
    logits = torch.full((1, 4, 3), -6.0)
    logits[0, 2, 1], logits[0, 0, 2] = 3.0, 1.0
    boxes = torch.tensor([[[0.7, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.5, 0.25, 0.2, 0.1], [0.3, 0.3, 0.2, 0.2]]])
    model = hf.HFDetector(SimpleNamespace(config=SimpleNamespace(model_type=FAMILIES[network])), network)
    ours = model._detections(logits[0], boxes[0], torch.zeros(3, HEIGHT, WIDTH))
    assert ours["labels"].tolist() == [2, 3]  # Drip's ids: class 1 from 0 is Drip's 2
    assert torch.allclose(ours["boxes"], torch.tensor([[80.0, 20.0, 120.0, 30.0], [120.0, 40.0, 160.0, 60.0]]))
    assert torch.allclose(ours["scores"], torch.tensor([3.0, 1.0]).sigmoid())

    theirs = processor(network).post_process_object_detection(
        SimpleNamespace(logits=logits, pred_boxes=boxes), threshold=model.score_thresh, target_sizes=[(HEIGHT, WIDTH)])[0]
    assert ours["labels"].tolist() == (theirs["labels"] + 1).tolist()
    assert torch.allclose(ours["boxes"], theirs["boxes"]) and torch.allclose(ours["scores"], theirs["scores"])


@pytest.mark.parametrize("network", FAMILIES)
def test_the_wrapper_detects_what_the_processor_and_post_processing_give(network):
    """The whole eval path of a network (stretch, forward, top-k, boxes back to the image) against
    the family's image processor, the network itself and its post-processing."""
    model = hf._wrap(distinct(network), network, image_size=64).eval()
    model.score_thresh = 0.0
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 32, 64, generator=generator) * 255).round() / 255  # upscaled only: no antialiasing question
    pixels = processor(network, model.side)(images=(image * 255).round().byte(), return_tensors="pt")["pixel_values"]
    # Bilinear resampling differs in the last bits; normalised (RF-DETR, LW-DETR) by up to 1/0.225 as much.
    assert torch.allclose(model._pixels([image]), pixels, atol=1e-2)
    with torch.no_grad():
        ours = model([image])[0]
        out = model.net(pixel_values=model._pixels([image]))  # the same input: resampling differences left out
    theirs = processor(network).post_process_object_detection(out, threshold=0.0, target_sizes=[(32, 64)])[0]
    ranks = separated(theirs["scores"])
    assert ours["labels"][ranks].tolist() == (theirs["labels"][ranks] + 1).tolist()
    assert torch.allclose(ours["scores"][ranks], theirs["scores"][ranks], atol=1e-5)
    assert torch.allclose(ours["boxes"][ranks], theirs["boxes"][ranks], atol=1e-3), (ours["boxes"][ranks], theirs["boxes"][ranks])


# -- ONNX -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("network", FAMILIES)
def test_onnx_detects_what_transformers_post_processing_gives(network, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from drip.deploy import export, onnx_infer

    classes = ["circle", "square", "triangle", "star", "moon"]
    model = hf._wrap(distinct(network), network, image_size=64).eval()
    path = models.export_model(tmp_path / "model.pt", model, network, classes, 64, {})
    onnx_model = onnx_infer.load_onnx(export.export(path, "onnx", tmp_path / "model.onnx"))
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(3, 48, 64, generator=generator)
    ort = onnx_model(image.numpy())
    with torch.no_grad():
        out = model.net(pixel_values=model._pixels([image]))
    theirs = processor(network).post_process_object_detection(out, threshold=0.0, target_sizes=[(48, 64)])[0]
    ranks = separated(theirs["scores"])
    boxes, scores, labels = (torch.from_numpy(ort[name])[ranks] for name in ("boxes", "scores", "labels"))
    assert labels.tolist() == (theirs["labels"][ranks] + 1).tolist()
    assert torch.allclose(scores, theirs["scores"][ranks], atol=1e-4)
    assert torch.allclose(boxes, theirs["boxes"][ranks], atol=0.01), (boxes, theirs["boxes"][ranks])


# -- every size ---------------------------------------------------------------------------------------
def check_trains_and_detects(model: torch.nn.Module, size: int, queries: int) -> None:
    seen = []
    encoder_head = model.net.model.enc_output
    if isinstance(encoder_head, torch.nn.ModuleList):  # RF-DETR, LW-DETR: one per query group, the first always runs
        encoder_head = encoder_head[0]
    encoder_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    images = [torch.rand(3, size * 3 // 4, size), torch.rand(3, size, size // 2)]
    targets = [{"boxes": torch.tensor([[2.0, 2.0, size / 2, size / 3]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    sum(model.train()(images, targets).values()).backward()
    assert seen[:1] == [hf.anchors_at(model.net.config, model.side)]  # counted by the encoder itself
    if hf.geometry(model.net.config)[1]:
        assert seen[0] < queries  # clamped: fewer queries than configured for this forward
    else:
        assert seen[0] >= queries and model.side > size  # enlarged: the input gives enough anchors
    assert model.net.config.num_queries == queries  # put back: the model file keeps the configured count
    with torch.no_grad():
        detections = model.eval()(images)
    assert len(detections) == 2 and all(d["boxes"].shape[1] == 4 and len(d["boxes"]) for d in detections)


def test_dfine_n_trains_and_detects_at_the_quick_starts_224_px():
    """D-FINE-N's 300 queries outnumber its anchors under 256 px (224: 14x14 + 7x7 = 245), where
    ``torch.topk`` stopped with "selected index k out of range": the queries are clamped to the
    anchors (hf.queries_for)."""
    check_trains_and_detects(models.build_model("dfine_n", 4, "none", 224), 224, 300)


@pytest.mark.parametrize(("network", "size"), [("dfine_n", 96), ("dfine_n", 33), ("rtdetr_v2_r18", 80), ("rtdetr_v2_r18", 32),
                                             ("deimv2_pico", 48), ("rfdetr_n", 32), ("rfdetr_n", 224), ("lwdetr_t", 100)])
def test_every_image_size_works_with_fewer_anchors_than_queries(network, size):
    """Sizes down to Drip's smallest (32), with the published 300 queries; one that is no multiple of
    the coarsest stride (32) is rounded up to one (``HFDetector.side``; DEIMv2-Pico's light encoder
    pools a stride-32 map from its stride-16 one and adds it back upsampled: at 48 px a 2x2 map,
    doubled, would not meet the 3x3 one). RF-DETR and LW-DETR keep
    their queries (laid out per Group DETR group): their input grows to enough anchors instead."""
    model = hf._wrap(tiny_network(network, num_queries=300), network, image_size=size)
    check_trains_and_detects(model, size, 300)
