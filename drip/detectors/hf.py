"""D-FINE, RT-DETRv2, DEIMv2, RF-DETR and LW-DETR from Hugging Face ``transformers`` behind the contract.

``transformers`` is imported only when a network of these families is built: the registry below
(names, published figures, recipe) is plain data, so ``drip networks`` and everything that never
builds one of them stay as fast as before.

The network is wrapped in ``HFDetector``, which gives it torchvision's calling convention
(``drip.detectors.base``): the wrapper stretches each image to the square ``image_size`` the
authors train at (640 for D-FINE, RT-DETRv2 and DEIMv2, rounded up to what the network's feature
maps need), feeds pixels as their image processor does (0..1 for D-FINE, RT-DETRv2 and DEIMv2's
HGNetV2 sizes, normalised with ImageNet's mean and deviation for RF-DETR and LW-DETR), turns
Drip's targets (xyxy pixels, labels from 1) into the normalised cxcywh boxes and 0-based labels of
``transformers``' losses, and turns the query logits back into the best-scoring (query, class)
pairs as boxes in the input image's pixels, the same top-k over sigmoid scores as the authors'
post-processor. That post-processing is plain tensor arithmetic, so it is part of the exported
ONNX graph.

Weights: ``--weights coco`` (and ``objects365``: the authors' Objects365-pretrained, COCO-trained
``obj2coco`` checkpoints, where published) downloads the
authors' checkpoint through ``transformers``' own Hub client into ``<cache>/huggingface``;
``--weights PATH`` takes a ``save_pretrained`` folder (its ``config.json`` names the architecture)
or a ``.safetensors`` file. Only safetensors are read (no pickle), config classes are the concrete
ones (a Hub ``config.json`` is data; no ``trust_remote_code``), and the class head is resized to
the session's classes, with ``id2label`` and ``label2id`` from its label map.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import console
from ..errors import ModelError
from .base import Family, Published, decay_groups, first_line, load_matching, names

_DFINE_SOURCE = "D-FINE README (Peterande/D-FINE): COCO val2017 AP, T4 TensorRT FP16 latency"
_RTDETR_SOURCE = "RT-DETRv2 README (lyuwenyu/RT-DETR, rtdetrv2_pytorch): COCO val2017 AP, T4 TensorRT FP16 FPS"
DETECTIONS_PER_IMAGE = 100  # as torchvision's detectors and COCO's maxDets
DEFAULT_SCORE_FLOOR = 0.05  # torchvision's default box_score_thresh, so both families filter alike


@dataclass(frozen=True)
class HFSpec:
    kind: str  # transformers' model_type: "d_fine", "rt_detr_v2", "deimv2", "rf_detr" or "lw_detr"
    hub: dict[str, str]  # start point -> Hub repository
    lr: float  # the authors' AdamW learning rate ...
    lr_batch: int  # ... at this total batch
    backbone_lr_scale: float  # backbone learning rate / learning rate in the authors' config
    published: Published
    about: str
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the transformers defaults
    backbone: dict[str, Any] = field(default_factory=dict)


def _hgnet(stem, stage_in, stage_mid, stage_out, blocks, layers, hidden, lab=True, out_indices=(2, 3, 4)):
    return {
        "stem_channels": list(stem), "stage_in_channels": list(stage_in), "stage_mid_channels": list(stage_mid),
        "stage_out_channels": list(stage_out), "stage_num_blocks": list(blocks), "stage_numb_of_layers": list(layers),
        "stage_downsample": [False, True, True, True], "stage_light_block": [False, False, True, True],
        "stage_kernel_size": [3, 3, 5, 5], "hidden_sizes": list(hidden), "use_learnable_affine_block": lab,
        "out_indices": list(out_indices), "layer_type": "basic", "embedding_size": 32,
    }


# Architectures as transformers' conversion scripts set them for the authors' checkpoints
# (convert_d_fine_original_pytorch_checkpoint_to_hf.py, convert_rt_detr_v2_weights_to_hf.py);
# the learning rates and backbone factors from the authors' configs (D-FINE configs/dfine/*.yml,
# total batch 32; RT-DETRv2 configs/rtdetrv2/*.yml, total batch 16).
_DFINE_COMMON = {"decoder_n_points": [3, 6, 3], "hidden_expansion": 1.0, "decoder_layers": 6}
_DFINE_S_BACKBONE = _hgnet((3, 16, 16), (16, 64, 256, 512), (16, 32, 64, 128), (64, 256, 512, 1024), (1, 1, 2, 1),
                           (3, 3, 3, 3), (128, 256, 512, 1024))
NETWORKS: dict[str, HFSpec] = {
    "dfine_n": HFSpec(
        "d_fine", {"coco": "ustc-community/dfine-nano-coco"}, 8e-4, 32, 0.5,
        Published(42.8, "2.12 ms (T4, TensorRT FP16)", 4, "Apache-2.0", _DFINE_SOURCE),
        "D-FINE-N, HGNetV2-B0: the smallest real-time DETR, fast on a CPU (COCO box AP 42.8)",
        {**_DFINE_COMMON, "num_feature_levels": 2, "encoder_ffn_dim": 512, "encode_proj_layers": [1], "d_model": 128,
         "encoder_hidden_dim": 128, "decoder_ffn_dim": 512, "encoder_in_channels": [512, 1024],
         "decoder_n_points": [6, 6], "decoder_in_channels": [128, 128], "feat_strides": [16, 32], "depth_mult": 0.5,
         "decoder_layers": 3, "hidden_expansion": 0.34},
        {**_DFINE_S_BACKBONE, "out_indices": [3, 4]},
    ),
    "dfine_s": HFSpec(
        "d_fine", {"coco": "ustc-community/dfine-small-coco", "objects365": "ustc-community/dfine-small-obj2coco"},
        2e-4, 32, 0.5,
        Published(48.5, "3.49 ms (T4, TensorRT FP16)", 10, "Apache-2.0", _DFINE_SOURCE),
        "D-FINE-S, HGNetV2-B0 (COCO box AP 48.5; 50.7 from Objects365)",
        {**_DFINE_COMMON, "decoder_layers": 3, "hidden_expansion": 0.5, "depth_mult": 0.34,
         "encoder_in_channels": [256, 512, 1024]},
        _DFINE_S_BACKBONE,
    ),
    "dfine_m": HFSpec(
        "d_fine", {"coco": "ustc-community/dfine-medium-coco", "objects365": "ustc-community/dfine-medium-obj2coco"},
        2e-4, 32, 0.1,
        Published(52.3, "5.62 ms (T4, TensorRT FP16)", 19, "Apache-2.0", _DFINE_SOURCE),
        "D-FINE-M, HGNetV2-B2 (COCO box AP 52.3; 55.1 from Objects365)",
        {**_DFINE_COMMON, "decoder_layers": 4, "depth_mult": 0.67, "encoder_in_channels": [384, 768, 1536]},
        _hgnet((3, 24, 32), (32, 96, 384, 768), (32, 64, 128, 256), (96, 384, 768, 1536), (1, 1, 3, 1),
               (4, 4, 4, 4), (192, 384, 768, 1536)),
    ),
    "dfine_l": HFSpec(
        "d_fine", {"coco": "ustc-community/dfine-large-coco", "objects365": "ustc-community/dfine_l_obj2coco_e25"},
        2.5e-4, 32, 0.05,
        Published(54.0, "8.07 ms (T4, TensorRT FP16)", 31, "Apache-2.0", _DFINE_SOURCE),
        "D-FINE-L, HGNetV2-B4 (COCO box AP 54.0; 57.3 from Objects365)",
        {**_DFINE_COMMON, "encoder_ffn_dim": 1024, "encoder_in_channels": [512, 1024, 2048]},
        _hgnet((3, 32, 48), (48, 128, 512, 1024), (48, 96, 192, 384), (128, 512, 1024, 2048), (1, 1, 3, 1),
               (6, 6, 6, 6), (256, 512, 1024, 2048), lab=False),
    ),
    "dfine_x": HFSpec(
        "d_fine", {"coco": "ustc-community/dfine-xlarge-coco", "objects365": "ustc-community/dfine-xlarge-obj2coco"},
        2.5e-4, 32, 0.01,
        Published(55.8, "12.89 ms (T4, TensorRT FP16)", 62, "Apache-2.0", _DFINE_SOURCE),
        "D-FINE-X, HGNetV2-B5 (COCO box AP 55.8; 59.3 from Objects365)",
        {**_DFINE_COMMON, "encoder_in_channels": [512, 1024, 2048], "encoder_hidden_dim": 384, "encoder_ffn_dim": 2048,
         "decoder_in_channels": [384, 384, 384]},
        _hgnet((3, 32, 64), (64, 128, 512, 1024), (64, 128, 256, 512), (128, 512, 1024, 2048), (1, 2, 5, 2),
               (6, 6, 6, 6), (256, 512, 1024, 2048), lab=False),
    ),
    "rtdetr_v2_r18": HFSpec(
        "rt_detr_v2", {"coco": "PekingU/rtdetr_v2_r18vd"}, 1e-4, 16, 0.1,
        Published(48.1, "217 FPS (T4, TensorRT FP16)", 20, "Apache-2.0", _RTDETR_SOURCE),
        "RT-DETRv2-S, ResNet-18-vd (COCO box AP 48.1)",
        {"encoder_in_channels": [128, 256, 512], "hidden_expansion": 0.5, "decoder_layers": 3},
        {"hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 2, 2], "layer_type": "basic"},
    ),
    "rtdetr_v2_r34": HFSpec(
        "rt_detr_v2", {"coco": "PekingU/rtdetr_v2_r34vd"}, 1e-4, 16, 0.1,
        Published(49.9, "161 FPS (T4, TensorRT FP16)", 31, "Apache-2.0", _RTDETR_SOURCE),
        "RT-DETRv2-M*, ResNet-34-vd (COCO box AP 49.9)",
        {"encoder_in_channels": [128, 256, 512], "hidden_expansion": 0.5, "decoder_layers": 4},
        {"hidden_sizes": [64, 128, 256, 512], "depths": [3, 4, 6, 3], "layer_type": "basic"},
    ),
    "rtdetr_v2_r50": HFSpec(
        "rt_detr_v2", {"coco": "PekingU/rtdetr_v2_r50vd"}, 1e-4, 16, 0.1,
        Published(53.4, "108 FPS (T4, TensorRT FP16)", 42, "Apache-2.0", _RTDETR_SOURCE),
        "RT-DETRv2-L, ResNet-50-vd (COCO box AP 53.4)",
        {},
        {},
    ),
    "rtdetr_v2_r101": HFSpec(
        "rt_detr_v2", {"coco": "PekingU/rtdetr_v2_r101vd"}, 1e-4, 16, 0.1,
        Published(54.3, "74 FPS (T4, TensorRT FP16)", 76, "Apache-2.0", _RTDETR_SOURCE),
        "RT-DETRv2-X, ResNet-101-vd (COCO box AP 54.3)",
        {"encoder_ffn_dim": 2048, "encoder_hidden_dim": 384, "decoder_in_channels": [384, 384, 384]},
        {"depths": [3, 4, 23, 3]},
    ),
}

# RF-DETR and LW-DETR: a windowed ViT (RF-DETR's a DINOv2), a C2f projector and a shallow deformable
# decoder trained with Group DETR. Architectures as transformers' conversion scripts set them
# (convert_rf_detr_weights_to_hf.py, convert_lw_detr_to_hf.py); built here they have the published
# parameter counts. Learning rate: RF-DETR's training defaults (AdamW at 1e-4 for a total batch of
# 16, 4 x 4 accumulated; the encoder at 1.5e-4 with a layer-wise decay of 0.8, which Drip does not
# reproduce: the backbone runs at the base rate). LW-DETR, RF-DETR's predecessor, is given the same
# (not checked against its own scripts).
_RFDETR_SOURCE = "RF-DETR docs (rfdetr.roboflow.com, detection): COCO val2017 AP50:95, T4 TensorRT FP16 latency"
_LWDETR_SOURCE = "LW-DETR README (Atten4Vis/LW-DETR, main results): COCO val2017 mAP, T4 TensorRT FP16 latency"
_RFDETR_DECODER = {"d_model": 256, "num_queries": 300, "decoder_self_attention_heads": 8,
                   "decoder_cross_attention_heads": 16, "decoder_n_points": 2}
_RFDETR_BACKBONE = {"model_type": "rf_detr_dinov2", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                    "num_windows": 2, "patch_size": 16, "out_features": ["stage3", "stage6", "stage9", "stage12"]}
_LWDETR_DECODER = {"projector_scale_factors": [1.0], "decoder_layers": 3, "decoder_self_attention_heads": 8,
                   "decoder_cross_attention_heads": 16, "decoder_n_points": 2, "d_model": 256}
_LWDETR_BACKBONE = {"model_type": "lw_detr_vit", "image_size": 1024, "hidden_size": 192, "num_attention_heads": 12}


def _vit_detr(kind: str, repo: str, ap: float, ms: float, params: float, source: str, about: str, config, backbone) -> HFSpec:
    """An RF-DETR or LW-DETR size: Apache-2.0, COCO weights in ``repo``, RF-DETR's learning rate."""
    published = Published(ap, f"{ms} ms (T4, TensorRT FP16)", params, "Apache-2.0", source)
    return HFSpec(kind, {"coco": repo}, 1e-4, 16, 1.0, published, about, config, backbone)


NETWORKS.update({
    f"rfdetr_{size}": _vit_detr(
        "rf_detr", f"Roboflow/rf-detr-{name}", ap, ms, params, _RFDETR_SOURCE,
        f"RF-DETR-{size.upper()}, DINOv2-S windowed ViT at {resolution} px (COCO box AP {ap})",
        {**_RFDETR_DECODER, "decoder_layers": layers}, {**_RFDETR_BACKBONE, "image_size": resolution},
    )
    for size, name, ap, ms, params, resolution, layers in (
        ("n", "nano", 48.4, 2.3, 30.5, 384, 2), ("s", "small", 53.0, 3.5, 32.1, 512, 3),
        ("m", "medium", 54.7, 4.4, 33.7, 576, 4), ("l", "large", 56.5, 6.8, 33.9, 704, 4),
    )
})
NETWORKS.update({
    f"lwdetr_{size}": _vit_detr(
        "lw_detr", f"AnnaZhang/lwdetr_{name}_60e_coco", ap, ms, params, _LWDETR_SOURCE,
        f"LW-DETR-{name}, {layers}-layer ViT-T, Objects365-pretrained (COCO box AP {ap})",
        {**_LWDETR_DECODER, "num_queries": queries},
        {**_LWDETR_BACKBONE, "num_hidden_layers": layers, "window_block_indices": windowed, "out_indices": out},
    )
    for size, name, ap, ms, params, layers, windowed, out, queries in (
        ("t", "tiny", 42.6, 2.0, 12.1, 6, [0, 2, 4], [1, 3, 5], 100),
        ("s", "small", 48.0, 2.9, 14.6, 10, [0, 1, 3, 6, 7, 9], [2, 4, 5, 9], 300),
    )
})

# DEIMv2 (Intellindust, Apache-2.0 code): D-FINE's decoder simplified (SwiGLU, RMSNorm, a gated or
# plain cross-attention merge) and trained with DEIM's dense one-to-one matching and MAL loss.
# Only its HGNetV2 sizes are offered: the S/M/L/X ones are built on DINOv3 (REFUSED below). Of
# those, Pico and N have checkpoints in transformers' format, named by transformers' own DEIMv2
# tests and docstrings (a contributor's conversions, "until official ones are uploaded"); the
# authors' Intellindust/DEIMv2_HGNetv2_*_COCO repositories hold their own format (a
# PyTorchModelHubMixin config and key names), which transformers' conversion script reads and Drip
# does not; Atto and Femto exist only there. Architectures as that script
# (convert_deimv2_original_pytorch_checkpoint_to_hf.py) sets them from the authors' configs;
# learning rates from those configs (configs/deimv2/deimv2_hgnetv2_{pico,n}_coco.yml: AdamW,
# backbone at half the rate). Their model zoo states the latency without its device.
_DEIMV2_SOURCE = "DEIMv2 README (Intellindust-AI-Lab/DEIMv2, model zoo): COCO val2017 AP, latency (device not stated)"
_DEIMV2_PICO_BACKBONE = {
    "model_type": "hgnet_v2", "stem_channels": [3, 16, 16], "stage_in_channels": [16, 64, 256],
    "stage_mid_channels": [16, 32, 64], "stage_out_channels": [64, 256, 512], "stage_num_blocks": [1, 1, 2],
    "stage_numb_of_layers": [3, 3, 3], "depths": [3, 3, 3], "stage_downsample": [False, True, True],
    "stage_light_block": [False, False, True], "stage_kernel_size": [3, 3, 5], "hidden_sizes": [64, 256, 512],
    "use_learnable_affine_block": True, "out_indices": [3],
}
NETWORKS.update({
    "deimv2_pico": HFSpec(
        "deimv2", {"coco": "harshaljanjani/DEIMv2_HGNetv2_PICO_COCO_Transformers"}, 1.6e-3, 128, 0.5,
        Published(38.5, "2.13 ms (device not stated)", 1.5, "Apache-2.0", _DEIMV2_SOURCE),
        "DEIMv2-Pico, pruned HGNetV2 and a light encoder: 1.5 M parameters (COCO box AP 38.5)",
        {"encoder_type": "lite", "encoder_layers": 0, "encoder_hidden_dim": 112, "encoder_in_channels": [512],
         "feat_strides": [16], "depth_mult": 0.5, "hidden_expansion": 0.34, "d_model": 112, "decoder_ffn_dim": 320,
         "decoder_layers": 3, "num_feature_levels": 2, "decoder_n_points": [4, 2], "decoder_in_channels": [112, 112],
         "num_queries": 200, "share_bbox_head": True, "use_gateway": False, "decoder_activation_function": "silu"},
        _DEIMV2_PICO_BACKBONE,
    ),
    "deimv2_n": HFSpec(
        "deimv2", {"coco": "harshaljanjani/DEIMv2_HGNetv2_N_COCO_Transformers"}, 8e-4, 32, 0.5,
        Published(43.0, "2.32 ms (device not stated)", 3.6, "Apache-2.0", _DEIMV2_SOURCE),
        "DEIMv2-N, HGNetV2-B0 (COCO box AP 43.0)",
        {"encoder_hidden_dim": 128, "encoder_in_channels": [512, 1024], "feat_strides": [16, 32], "depth_mult": 0.5,
         "hidden_expansion": 0.34, "encoder_ffn_dim": 512, "encode_proj_layers": [1], "d_model": 128,
         "decoder_ffn_dim": 512, "decoder_layers": 3, "num_feature_levels": 2, "decoder_n_points": [6, 6],
         "decoder_in_channels": [128, 128], "decoder_activation_function": "silu"},
        {**_DFINE_S_BACKBONE, "model_type": "hgnet_v2", "depths": [3, 3, 3, 3], "out_indices": [3, 4]},
    ),
})
# Named so that asking for them says why they are not offered, instead of "not a network".
REFUSED = {
    f"rfdetr_{size}": (
        f"RF-DETR-{size.upper()} is published under Roboflow's Platform Model License (PML 1.0, the rfdetr_plus "
        "package, a Roboflow account), not Apache-2.0: Drip offers rfdetr_n, rfdetr_s, rfdetr_m and rfdetr_l"
    )
    for size in ("xl", "2xl")
}
# DEIMv2-L and X start from Meta's DINOv3 ViT-S/S+ weights, S and M from ViT-Tiny/Tiny+ distilled
# from DINOv3 ViT-S: the DINOv3 License covers the DINO Materials and their derivative works
# (distribution only under that licence, a copy attached, use restrictions), and it is not Apache,
# MIT or BSD.
REFUSED.update({
    f"deimv2_{size}": (
        f"DEIMv2-{size.upper()} is built on Meta's DINOv3 ({backbone}), whose weights and derivatives fall under "
        "the DINOv3 License, not Apache-2.0, MIT or BSD: Drip offers deimv2_pico and deimv2_n (HGNetV2)"
    )
    for size, backbone in (("s", "a distilled ViT-Tiny"), ("m", "a distilled ViT-Tiny+"), ("l", "ViT-S"), ("x", "ViT-S+"))
})
# The families whose pixels the authors normalise with ImageNet's mean and deviation (their image
# processors: RfDetrImageProcessor, DeformableDetrImageProcessor); D-FINE, RT-DETRv2 and DEIMv2's
# HGNetV2 sizes take 0..1 (RTDetrImageProcessor without normalisation, as transformers' DEIMv2
# conversion writes it for them; only its DINOv3 sizes are normalised).
_IMAGENET_NORMALISED = ("rf_detr", "lw_detr")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The authors' gradient clipping (clip_max_norm 0.1 in every family's config).
GRAD_CLIP = 0.1
_SCRATCH_WARNING = (
    "{network} with --weights none starts from random weights: a DETR from scratch generalises "
    "from small data far worse than from pretrained weights (DETR's authors needed 10-15k images "
    "and long schedules); use --weights coco unless you have that much"
)


def _classes(kind: str):
    """The transformers config and model classes of ``kind``: concrete classes, never Auto*."""
    try:
        from transformers.utils import logging as hf_logging

        # Drip says what matters (weights loaded, head resized); transformers' progress bars and
        # loading tables would bury it.
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if kind == "d_fine":
            from transformers import DFineConfig, DFineForObjectDetection

            return DFineConfig, DFineForObjectDetection
        if kind == "deimv2":
            from transformers import Deimv2Config, Deimv2ForObjectDetection

            return Deimv2Config, Deimv2ForObjectDetection
        if kind == "rf_detr":
            from transformers import RfDetrConfig, RfDetrForObjectDetection

            return RfDetrConfig, RfDetrForObjectDetection
        if kind == "lw_detr":
            from transformers import LwDetrConfig, LwDetrForObjectDetection

            return LwDetrConfig, LwDetrForObjectDetection
        from transformers import RTDetrV2Config, RTDetrV2ForObjectDetection

        return RTDetrV2Config, RTDetrV2ForObjectDetection
    except ImportError as exc:
        raise ModelError(
            f"the DETR-family networks need the transformers package ({exc}); "
            "pip install -r requirements.txt"
        ) from None


class HFDetector(nn.Module):
    """A ``transformers`` DETR-family detector with torchvision's calling convention."""

    def __init__(self, net: nn.Module, network: str, image_size: int = 640):
        super().__init__()
        self.net = net
        self.network = network  # the registry name: its recipe (backbone learning rate) follows it
        self.image_size = int(image_size)
        self.score_thresh = DEFAULT_SCORE_FLOOR
        self.detections_per_img = DETECTIONS_PER_IMAGE
        self.normalised = getattr(net.config, "model_type", "") in _IMAGENET_NORMALISED

    @property
    def side(self) -> int:
        """The network's square input: ``image_size`` rounded up to the multiple its feature maps
        need (``geometry``). Each map is then exactly the input over its stride, so D-FINE's
        upsampled coarse map meets the finer one (at 200 px a 7x7 map, doubled, would not meet the
        13x13 one) and a ViT's windows tile it. The stretch to a square already changes the
        aspect, so the few extra pixels change nothing else: boxes come back normalised.

        RF-DETR and LW-DETR lay out their Group DETR queries per group, so their query count
        cannot be clamped (``queries_for``): their input is at least the smallest side whose
        anchors cover their queries (RF-DETR-N: 288 px, 18x18 patches for 300 queries).
        """
        config = self.net.config
        multiple, clamps = geometry(config)
        side = max(1, math.ceil(self.image_size / multiple)) * multiple
        if not clamps:
            while anchors_at(config, side) < config.num_queries:
                side += multiple
        return side

    def _pixels(self, images: list[torch.Tensor]) -> torch.Tensor:
        size = (self.side, self.side)
        pixels = torch.cat([F.interpolate(im[None], size=size, mode="bilinear", align_corners=False) for im in images])
        if self.normalised:
            mean = pixels.new_tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
            std = pixels.new_tensor(_IMAGENET_STD).view(1, 3, 1, 1)
            pixels = (pixels - mean) / std
        return pixels

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        pixels = self._pixels(images)
        if self.training:
            if targets is None:
                raise ValueError("HFDetector in train mode needs targets")
            labels = [_to_hf_target(t, im) for t, im in zip(targets, images)]
            with queries_for(self.net, self.side):
                out = self.net(pixel_values=pixels, labels=labels)
            losses = _grouped_losses(out.loss_dict, _loss_weights(self.net.config))
            first = next(iter(losses))  # the same names on every rank: their mean is reduced by name
            losses[first] = losses[first] + self._touch_every_parameter()
            return losses
        with queries_for(self.net, self.side):
            out = self.net(pixel_values=pixels)
        return [
            self._detections(out.logits[i], out.pred_boxes[i], im)
            for i, im in enumerate(images)
        ]

    def _touch_every_parameter(self) -> torch.Tensor:
        """Zero, reached from every trainable parameter.

        With no box in the batch, transformers skips D-FINE's and RT-DETRv2's denoising queries,
        so their class embedding gets no gradient; RF-DETR's backbone keeps a mask token it never
        uses, LW-DETR-T a ViT block past its last output. Under DDP a parameter without a gradient
        on one rank is never reduced, and DDP stops at the next step (a rank whose slice is
        background only is common: tiling and Drip keep such images on purpose). This gives each
        a zero gradient instead, what ``find_unused_parameters`` would reduce for it, without its
        graph walk on every step.
        """
        return sum((p.sum() for p in self.net.parameters() if p.requires_grad), torch.zeros(())) * 0.0

    def _detections(self, logits: torch.Tensor, boxes: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Top ``detections_per_img`` (query, class) pairs by sigmoid score, as the authors'
        post-processor does; boxes in ``image``'s pixels (traced sizes, so ONNX keeps them)."""
        num_classes = logits.shape[-1]
        scores = logits.float().sigmoid().flatten()
        k = min(self.detections_per_img, scores.shape[0])
        top, index = scores.topk(k)
        query = torch.div(index, num_classes, rounding_mode="floor")
        labels = index - query * num_classes + 1
        cx, cy, w, h = boxes.float()[query].unbind(-1)
        height_width = torch._shape_as_tensor(image)[-2:].to(torch.float32)
        height, width = height_width[0], height_width[1]
        xyxy = torch.stack(((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height), -1)
        keep = top >= self.score_thresh
        return {"boxes": xyxy[keep], "labels": labels[keep], "scores": top[keep]}


def geometry(config) -> tuple[int, bool]:
    """(the multiple the input side must be, whether the queries may be clamped to the anchors).

    D-FINE, RT-DETRv2 and DEIMv2: their coarsest stride; queries clamp. RF-DETR and LW-DETR: a ViT of
    ``patch_size`` patches in windows, ``num_windows`` a side (RF-DETR) or in all (LW-DETR, a
    square); their queries are laid out per Group DETR group and do not clamp.
    """
    if hasattr(config, "feat_strides"):
        return int(max(_strides(config))), True
    backbone = config.backbone_config
    per_side = backbone.num_windows if config.model_type == "rf_detr" else math.isqrt(backbone.num_windows)
    return backbone.patch_size * per_side, False


def _strides(config) -> list[float]:
    if hasattr(config, "feat_strides"):
        strides = list(config.feat_strides)
        if getattr(config, "encoder_type", None) == "lite":
            # DEIMv2's light encoder (Atto to Pico) takes one backbone map and pools a second, twice
            # as coarse, from it: the decoder sees both, and the coarse one, upsampled, must meet the
            # fine one (so the input is a multiple of 32, not of the configured 16).
            strides.append(strides[-1] * 2)
        return strides
    patch = config.backbone_config.patch_size
    scales = getattr(config, "projector_scale_factors", None) or [1.0]  # RF-DETR: one level, at the patches
    return [patch / scale for scale in scales]


def anchors_at(config, side: int) -> int:
    """The encoder positions (anchors) of a square input ``side`` pixels wide (``HFDetector.side``):
    each feature level's map is the input divided by its stride, rounded up (stride-2
    convolutions with padding)."""
    return sum(math.ceil(side / stride) ** 2 for stride in _strides(config))


@contextlib.contextmanager
def queries_for(net: nn.Module, image_size: int) -> Iterator[None]:
    """``net``'s queries no more than the anchors at ``image_size``, for one forward.

    The encoder keeps its ``num_queries`` best-scoring anchors as the decoder's queries
    (``torch.topk``): at 224 px D-FINE-N's two levels give 14x14 + 7x7 = 245 anchors, fewer than
    its 300 queries. The authors' code fixes the anchors to its 640 px and so never meets this;
    with fewer anchors than queries every anchor becomes a query (their ``num_top_queries``
    post-processing is already bounded by the queries, ``_detections``). The configured count is
    put back afterwards: the model file keeps it, and a larger size gets all of them again.
    """
    config = net.config
    wanted = config.num_queries
    if geometry(config)[1]:
        config.num_queries = max(1, min(wanted, anchors_at(config, image_size)))
    try:
        yield
    finally:
        config.num_queries = wanted


def _to_hf_target(target: dict[str, torch.Tensor], image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Drip's target (xyxy pixels of ``image``, labels from 1) -> transformers' (normalised cxcywh,
    labels from 0)."""
    height, width = image.shape[-2:]
    boxes = target["boxes"].float()
    scale = boxes.new_tensor([width, height, width, height])
    x0, y0, x1, y1 = (boxes / scale).clamp(0, 1).unbind(-1)
    cxcywh = torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), -1)
    return {"class_labels": target["labels"].long() - 1, "boxes": cxcywh}


_LOSS_NAME = re.compile(r"^(loss_[a-z]+)")


def _loss_weights(config) -> dict[str, float]:
    """The weights transformers' loss gives each kind. D-FINE's and RT-DETRv2's ``loss_dict`` is
    weighted already; LW-DETR's (RF-DETR's too) is not, and also holds ``cardinality_error``, a
    count that is no loss (transformers' ``loss_lw_detr.py``)."""
    if getattr(config, "model_type", "") in ("rf_detr", "lw_detr"):
        return {"loss_ce": config.class_loss_coefficient, "loss_bbox": config.bbox_loss_coefficient,
                "loss_giou": config.giou_loss_coefficient}
    return {}


def _grouped_losses(loss_dict: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """transformers reports each loss per decoder layer, denoising group and encoder output
    (``loss_vfl_aux_0``, ``loss_bbox_dn_2``, ``loss_ce_enc``, ...); weighted as its own total is
    (``weights``: none where ``loss_dict`` is weighted already) and summed here per kind, so the
    total is transformers' ``loss`` and TensorBoard shows a handful of curves."""
    grouped: dict[str, torch.Tensor] = {}
    for name, value in loss_dict.items():
        match = _LOSS_NAME.match(name)
        if match is None:
            continue  # cardinality_error and the like: reported, not trained on
        key = match.group(1)
        if weights:
            if key not in weights:
                continue  # as transformers' own total: only the weighted kinds count
            value = value * weights[key]
        grouped[key] = grouped[key] + value if key in grouped else value
    return grouped


class Transformers(Family):
    name = "transformers"
    networks = NETWORKS
    refused = REFUSED
    start_points = ("coco", "objects365", "none")

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, HFDetector)

    def about(self, network: str) -> str:
        return NETWORKS[network].about

    def published(self, network: str) -> Published | None:
        return NETWORKS[network].published

    # -- building ------------------------------------------------------------------------------
    def _config(self, network: str, num_classes: int, classes=None, trained_backbone: bool = True):
        """``network``'s config for ``num_classes``. ``trained_backbone``: whether the backbone's
        weights will be loaded (see ``_freeze_norms``)."""
        spec = NETWORKS[network]
        config_class, _ = _classes(spec.kind)
        if spec.kind in _IMAGENET_NORMALISED or "model_type" in spec.backbone:
            # A ViT config derives its windows from its outputs when it is made, and an HGNetV2's
            # stage names from its depths (DEIMv2-Pico has three stages, not four): given whole.
            config = config_class(backbone_config=dict(spec.backbone), **spec.config)
        else:
            config = config_class(**spec.config)
            for key, value in spec.backbone.items():
                setattr(config.backbone_config, key, value)
            if "out_indices" in spec.backbone:
                config.backbone_config.out_features = [f"stage{i}" for i in spec.backbone["out_indices"]]
        _freeze_norms(config, trained_backbone)
        _set_labels(config, num_classes, classes)
        return config

    def skeleton(self, network: str, num_classes: int, classes=None, trained_backbone: bool = True) -> nn.Module:
        spec = NETWORKS[network]
        _, model_class = _classes(spec.kind)
        return _wrap(model_class(self._config(network, num_classes, classes, trained_backbone)), network)

    def build(self, network: str, num_classes: int, weights: str, cache_dir, classes=None) -> nn.Module:
        spec = NETWORKS[network]
        if weights == "none":
            console.warn(_SCRATCH_WARNING.format(network=network))
            return self.skeleton(network, num_classes, classes, trained_backbone=False)
        repo = spec.hub.get(weights)
        if repo is None:
            offered = ", ".join([*spec.hub, "none"])
            raise ModelError(f"--weights {weights} is not published for {network}; use one of {offered}")
        what = {"coco": "COCO", "objects365": "Objects365"}[weights]
        where = Path(cache_dir) / "huggingface" if cache_dir is not None else None
        try:
            return _from_pretrained(network, repo, num_classes, classes, cache_dir=where)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - offline, a missing repo, a bad file: the Hub client raises many types
            from .tv import download_error

            raise download_error(what, network, where and where.parent, exc, hub="huggingface") from None

    def replace_head(self, model: nn.Module, network: str, num_classes: int, classes=None) -> None:
        """A fresh head for ``num_classes``: the network rebuilt from its own config with the new
        class count and names, every weight but the class head's loaded back."""
        config = model.net.config.__class__.from_dict(model.net.config.to_dict())
        _set_labels(config, num_classes, classes)
        model.net = _ready(_fresh_head(model.net, config))

    def from_weights_file(self, network: str, num_classes: int, path, cache_dir, source: str, classes=None) -> nn.Module:
        path = Path(path)
        if path.is_dir():
            return _from_pretrained(network, path, num_classes, classes, source=source)
        if path.suffix.lower() == ".safetensors":
            # A Hub checkpoint's tensors carry transformers' on-disk names, which its loader maps
            # (and re-ties): give it the file beside Drip's own config of the network.
            with tempfile.TemporaryDirectory(prefix="drip-hf-") as folder:
                self._config(network, num_classes, classes).save_pretrained(folder)
                try:
                    os.symlink(path.resolve(), Path(folder) / "model.safetensors")
                except OSError:
                    shutil.copyfile(path, Path(folder) / "model.safetensors")
                return _from_pretrained(network, Path(folder), num_classes, classes, source=source)
        from .files import read_state_file

        state = read_state_file(path, cache_dir)  # a torch state_dict, read without running code
        model = self.skeleton(network, num_classes, classes)
        if not any(k.startswith("net.") for k in state):
            state = {f"net.{k}": v for k, v in state.items()}  # a transformers state_dict, not Drip's
        own = model.state_dict()
        fits = [k for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)]
        _refuse_mostly_fresh(len(own) - len(fits), len(own), source, network)
        load_matching(model, state, source, network)
        return model

    def structure_of(self, model: nn.Module) -> dict[str, Any]:
        # The whole architecture, so a model started from a Hub checkpoint or a folder is rebuilt
        # offline exactly (plain JSON: loading it runs nothing).
        return {"hf_config": model.net.config.to_json_string(), **super().structure_of(model)}

    def rebuild(self, network: str, num_classes: int, structure: dict[str, Any], source: str) -> nn.Module:
        text = structure.get("hf_config")
        if not text:
            return super().rebuild(network, num_classes, structure, source)
        config_class, model_class = _classes(NETWORKS[network].kind)
        try:
            config = config_class.from_dict(json.loads(text))
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign config
            raise ModelError(f"{source}: its network configuration cannot be read ({first_line(exc)}); export it again") from None
        model = _wrap(model_class(config), network)
        self.apply_structure(model, structure, source)
        return model

    # -- running -------------------------------------------------------------------------------
    def set_input_size(self, model: nn.Module, image_size: int) -> None:
        model.image_size = int(image_size)

    # -- training recipe -----------------------------------------------------------------------
    def default_learning_rate(self, network: str, batch_size: int, optimizer: str) -> float:
        spec = NETWORKS[network]
        # The authors' rate at their batch, scaled by the square root of the batch (Adam-type).
        return spec.lr * math.sqrt(batch_size / spec.lr_batch)

    def default_optimizer(self, network: str, number_of_steps: int) -> str | None:
        return "adamw"  # both families are trained with AdamW only

    def recipe(self, network: str) -> dict[str, Any]:
        return {"grad_clip": GRAD_CLIP}

    def param_groups(self, model: nn.Module, optimizer: str) -> list[dict[str, Any]]:
        scale = _backbone_scale(model)
        return decay_groups(model, lambda name, param: scale if _in_backbone(name) else 1.0)

    def mixed_precision(self, device: torch.device) -> torch.dtype:
        with contextlib.suppress(Exception):
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16
        return torch.float16

    @contextlib.contextmanager
    def onnx_export(self, model: nn.Module) -> Iterator[nn.Module]:
        """RF-DETR's DINOv2 resamples its position table to the input on every forward (bicubic
        with antialiasing, which ONNX opset 17 cannot express); the exported model takes one size
        (``side``), so the table is resampled once here and traced as a constant."""
        fixed = []
        side = model.side
        for module in model.net.modules():
            if not (hasattr(module, "interpolate_pos_encoding") and hasattr(module, "position_embeddings")):
                continue
            patch = module.patch_size if isinstance(module.patch_size, int) else module.patch_size[0]
            table = module.position_embeddings
            with torch.no_grad():
                table = module.interpolate_pos_encoding(table.new_zeros(1, (side // patch) ** 2 + 1, table.shape[-1]), side, side)
            module.interpolate_pos_encoding = lambda embeddings, height, width, table=table: table
            fixed.append(module)
        try:
            yield model
        finally:
            for module in fixed:
                del module.interpolate_pos_encoding


def _in_backbone(name: str) -> bool:
    """Whether parameter ``name`` is the backbone's: ``model.backbone.model`` in D-FINE and RT-DETRv2
    (the ViTs' ``backbone`` too), ``model.conv_encoder.model`` in DEIMv2 (its ``conv_encoder`` also
    holds the input projections, which the authors train at the full rate)."""
    name = f".{name}"
    return ".backbone." in name or ".conv_encoder.model." in name


def _backbone_scale(model: HFDetector) -> float:
    spec = NETWORKS.get(getattr(model, "network", ""))
    return spec.backbone_lr_scale if spec is not None else 0.1


def _label_names(num_classes: int, classes=None) -> list[str]:
    """The class names a network for ``num_classes`` carries (id2label, from 0)."""
    if classes is not None and len(classes) == num_classes - 1:
        return [str(name) for name in classes]
    return [f"class_{i}" for i in range(1, num_classes)]


def _names_in(config) -> list[str]:
    """A config's classes in id order (a Hub config.json keys id2label by strings)."""
    return [str(name) for _, name in sorted((int(k), v) for k, v in (config.id2label or {}).items())]


# The modules whose tensors are per class: the decoder's and encoder's class heads (RF-DETR keeps
# one encoder head per query group) and the denoising queries' class embedding. A test checks
# that these are exactly the tensors whose shape follows num_labels, in every family.
HEAD_MODULES = ("class_embed", "enc_score_head", "enc_out_class_embed", "denoising_class_embed")


def _in_head(key: str) -> bool:
    return any(part in HEAD_MODULES for part in key.split("."))


def _fresh_head(net: nn.Module, config) -> nn.Module:
    """``net`` rebuilt from ``config`` (its class head initialised as transformers does), every
    tensor outside the class head loaded back."""
    fresh = type(net)(config)
    own = fresh.state_dict()
    kept = {k: v for k, v in net.state_dict().items() if not _in_head(k) and k in own and own[k].shape == v.shape}
    fresh.load_state_dict(kept, strict=False)
    return fresh


def _refuse_mostly_fresh(unloaded: int, total: int, what: str, network: str) -> None:
    """A weights file that leaves more than half of the network's tensors at random init is not a
    start point of it (another architecture, another size): refused, not trained on quietly."""
    if total and unloaded * 2 > total:
        raise ModelError(
            f"{what}: only {total - unloaded} of {network}'s {total} tensors are in it; it holds the weights of "
            "another network or size: pick the --network it was made for"
        )


def _freeze_norms(config, trained_backbone: bool) -> None:
    """Whether the backbone's batch norms are frozen (D-FINE's, RT-DETRv2's and DEIMv2's
    ``freeze_backbone_batch_norms``; the ViT families have none).

    transformers freezes them by default, which suits a backbone whose weights and statistics are
    loaded (torchvision freezes them likewise for a pretrained backbone, and small batches cannot
    estimate better ones). A random backbone's frozen norms keep their initial mean 0 and variance
    1 and normalise nothing: ``dfine_n`` from scratch overfit 4 images to AP50 0.13 in 300 steps
    with them frozen, 1.00 with them learning (``bench/detr_overfit.py``). So they learn from
    scratch, as the authors' own small sizes train them (``freeze_norm: False``).
    """
    if hasattr(config, "freeze_backbone_batch_norms"):
        config.freeze_backbone_batch_norms = trained_backbone


def _set_labels(config, num_classes: int, classes=None) -> None:
    names = _label_names(num_classes, classes)
    config.num_labels = num_classes - 1
    config.id2label = {i: str(name) for i, name in enumerate(names)}
    config.label2id = {str(name): i for i, name in enumerate(names)}


def _ready(net: nn.Module) -> nn.Module:
    # Anchors from the feature maps of each forward, not fixed at 640 when the checkpoint was
    # saved: --image_size may differ (same values at the same size).
    net.config.anchor_image_size = None
    # With ``eval_size`` set (transformers' DEIMv2 conversion sets 640x640), transformers' encoder
    # drops its position embeddings in eval mode, where the authors' use ones precomputed for that
    # size: the network would be evaluated without what it was trained with. Computed each forward.
    if getattr(net.config, "eval_size", None) is not None:
        net.config.eval_size = None
        for module in net.modules():
            if getattr(module, "eval_size", None) is not None:
                module.eval_size = None
    return net


def _wrap(net: nn.Module, network: str, image_size: int = 640) -> HFDetector:
    return HFDetector(_ready(net), network, image_size)


def _from_pretrained(network: str, where, num_classes: int, classes=None, cache_dir=None, source: str | None = None) -> HFDetector:
    """A Hub repository or a local ``save_pretrained`` folder, head resized to ``num_classes``."""
    config_class, model_class = _classes(NETWORKS[network].kind)
    local = isinstance(where, Path)
    what = source or str(where)
    if local and not (where / "config.json").is_file():
        raise ModelError(f"{what}: no config.json in the folder; give a folder written by save_pretrained, or a .safetensors file")
    if local and not any(where.glob("*.safetensors")):
        pickles = sorted(p.name for p in where.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        found = f" (it holds {', '.join(pickles)}: pickle files, which can run code and are refused)" if pickles else ""
        raise ModelError(f"{what}: no .safetensors weights in the folder{found}; save the model with save_pretrained(safe_serialization=True)")
    if local:
        _check_model_type(where / "config.json", config_class.model_type, what)
    kwargs = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    config = config_class.from_pretrained(str(where), **kwargs)
    _check_model_type(None, config_class.model_type, what, getattr(config, "model_type", None))
    theirs, ours = _names_in(config), _label_names(num_classes, classes)
    _set_labels(config, num_classes, classes)
    net, report = model_class.from_pretrained(
        str(where), config=config, ignore_mismatched_sizes=True, use_safetensors=True, output_loading_info=True, **kwargs
    )
    _reload_shared_box_head(net, where, kwargs)
    fresh = [str(k[0] if isinstance(k, tuple) else k) for k in report.get("mismatched_keys", [])]
    missing = [str(k) for k in report.get("missing_keys", [])]
    _refuse_mostly_fresh(len(set(fresh + missing)), len(net.state_dict()), what, network)
    if theirs == ours:
        console.info(f"{what}: its class head is kept: its {len(theirs)} classes are this session's, in the same order")
    else:
        # Same names in the same order, or a fresh head: COCO's "person" head would otherwise
        # score a user's 80th class by position (the counts alone can agree). Where the counts
        # differ, every head tensor's shape did, and transformers initialised it fresh already.
        if len(theirs) == len(ours):
            net = _fresh_head(net, net.config)
        head = [k for k in net.state_dict() if _in_head(k)]
        differ = f"its {len(theirs)} classes ({names(theirs, 3)}) are not this session's {len(ours)} ({names(ours, 3)})"
        console.info(f"{what}: {len(head)} tensors of the class head start fresh: {differ}")
    if missing:
        console.info(f"{what}: {len(missing)} tensors of {network} are not in the checkpoint and start fresh: {names(missing)}")
    return _wrap(net, network)


def _reload_shared_box_head(net: nn.Module, where, kwargs: dict[str, Any]) -> None:
    """DEIMv2's small sizes share one box head across the decoder layers (``share_bbox_head``).
    ``save_pretrained`` (transformers 5.22) keeps that head under the last layer's name only, and
    ``from_pretrained`` then ties every layer to layer 0's freshly initialised one: the file's box
    head is lost without a word. It is read from the file again here (one module, so every layer
    gets it)."""
    if not getattr(net.config, "share_bbox_head", False):
        return
    from safetensors.torch import load_file

    if isinstance(where, Path):
        files = sorted(where.glob("*.safetensors"))
    else:
        from transformers.utils import cached_file

        files = [Path(cached_file(str(where), "model.safetensors", **kwargs))]
    own = net.state_dict()
    box = {k: v for f in files for k, v in load_file(str(f)).items() if "bbox_embed" in k and k in own}
    net.load_state_dict(box, strict=False)


def _check_model_type(path: Path | None, expected: str, what: str, found: str | None = None) -> None:
    """Refuse a config.json of another model type before transformers tries to read it as ours."""
    if path is not None:
        try:
            found = json.loads(path.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelError(f"{what}: its config.json cannot be read ({first_line(exc)}); copy the folder again") from None
    if found != expected:
        raise ModelError(
            f"{what}: its config.json describes a {found or 'unknown'!r} model, not {expected!r}; "
            "pick the --network it was made for"
        )


os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
TRANSFORMERS = Transformers()
