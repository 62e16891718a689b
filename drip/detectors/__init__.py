"""Running a detector: the contract every caller goes through, and the one place that knows which
family a network belongs to.

Training, evaluation, inference, export and the ONNX path call these functions; none reaches into
a network or imports a stage. Each function finds the family (``drip.detectors.tv`` for
torchvision's detectors, ``drip.detectors.hf`` for the Hugging Face ``transformers`` ones,
``drip.detectors.yolox`` for YOLOX) of a
network name or of a built model and asks it. The calling convention of a built model is
described in ``drip.detectors.base``.

Also here, because several callers share them: ``forward_batch`` (resize PIL images as
``drip infer`` does, run the model in one pass), ``scale_boxes`` and ``to_detections`` (outputs
back to the original image's pixels and to JSON records).
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.detections import resize_for_model, scale_boxes_np, to_detections_np
from ..errors import ModelError
from .base import Family, Published, decay_groups, load_matching  # noqa: F401
from .tv import Torchvision

# Score floor of evaluation: COCO scoring keeps detections down to this score (pycocotools' own
# examples use 0.001; torchvision's detectors drop everything under 0.05 by default).
EVAL_SCORE_FLOOR = 0.001

TORCHVISION = Torchvision()
FAMILIES: list[Family] = [TORCHVISION]


# The transformers families: their registry is plain data (transformers itself is imported
# when one is built), so listing them costs nothing.
from .hf import TRANSFORMERS  # noqa: E402

FAMILIES.append(TRANSFORMERS)

# YOLOX (pixeltable-yolox): likewise imported only when one of its networks is built.
from .yolox import YOLOX  # noqa: E402

FAMILIES.append(YOLOX)


# -- which family ------------------------------------------------------------------------------
def network_names() -> list[str]:
    """Every network Drip can build, torchvision's first."""
    return [name for family in FAMILIES for name in family.networks]


def family(network: str) -> Family:
    """The family of the registry network ``network``; a ModelError listing the known ones."""
    name = str(network).strip().lower()
    for candidate in FAMILIES:
        if name in candidate.networks:
            return candidate
        if name in candidate.refused:
            raise ModelError(f"--network {network}: {candidate.refused[name]}")
    known = network_names()
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ModelError(
        f"--network {network!r} is not a network Drip knows; {hint}available: "
        f"{', '.join(known)} (or the path of a model file exported by Drip)"
    )


def family_of(model: nn.Module) -> Family:
    """The family that built ``model``; torchvision's calling convention for anything else."""
    for candidate in FAMILIES[1:]:
        if candidate.owns(model):
            return candidate
    return TORCHVISION


def about(network: str) -> str:
    return family(network).about(str(network).strip().lower())


def published(network: str) -> Published | None:
    return family(network).published(str(network).strip().lower())


# -- building ----------------------------------------------------------------------------------
def build(network: str, num_classes: int, weights: str, cache_dir=None, classes=None) -> nn.Module:
    """Registry ``network`` for ``num_classes`` (background included) from a named start point
    (``coco``, ``imagenet``, ``objects365``, ``none``: what ``family.start_points`` offers)."""
    name = str(network).strip().lower()
    fam = family(name)
    start = str(weights).strip().lower()
    if start not in fam.start_points:
        raise ModelError(
            f"--weights {weights} is not offered for {name}; use one of {', '.join(fam.start_points)} "
            "or the path of a weights file"
        )
    return fam.build(name, num_classes, start, cache_dir, classes)


def skeleton(network: str, num_classes: int) -> nn.Module:
    return family(network).skeleton(network, num_classes)


def rebuild(network: str, num_classes: int, structure: dict[str, Any], source: str) -> nn.Module:
    """``network`` as a model file or checkpoint describes it (``structure_of``), random weights."""
    return family(network).rebuild(network, num_classes, structure, source)


def replace_head(model: nn.Module, network: str, num_classes: int, classes=None) -> None:
    family(network).replace_head(model, network, num_classes, classes)


def from_weights_file(network: str, num_classes: int, path, cache_dir, source: str, classes=None) -> nn.Module:
    name = str(network).strip().lower()
    return family(name).from_weights_file(name, num_classes, path, cache_dir, source, classes)


def structure_of(model: nn.Module) -> dict[str, Any]:
    return family_of(model).structure_of(model)


def apply_structure(model: nn.Module, structure: dict[str, Any], source: str) -> None:
    family_of(model).apply_structure(model, structure, source)


# -- running -----------------------------------------------------------------------------------
def set_input_size(model: nn.Module, image_size: int) -> None:
    """Make ``model`` take images whose longer side is ``image_size`` as they are."""
    family_of(model).set_input_size(model, image_size)


@contextlib.contextmanager
def evaluation_mode(
    model: nn.Module, image_size: int | None = None, score_floor: float = EVAL_SCORE_FLOOR
) -> Iterator[nn.Module]:
    """``model`` in eval mode with its score floor at ``score_floor`` (and its input size at
    ``image_size``), everything put back afterwards: the training loop goes on with it."""
    with family_of(model).evaluation(model, image_size, score_floor) as ready:
        yield ready


def losses(model: nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The training forward: images and targets (xyxy pixels, labels from 1) -> named losses."""
    return family_of(model).losses(model, images, targets)


def forward_batch(
    model: nn.Module,
    images: Sequence[Image.Image],
    size: int,
    device: torch.device,
    batch_size: int,
) -> list[tuple[dict[str, torch.Tensor], tuple[int, int]]]:
    """Resize each image so its longer side is ``size``, run ``model`` on them in one pass.

    Returns each image's raw output (boxes in pixels of the resized input) and the resized
    (width, height). ``drip infer`` and ``drip.evaluation.metrics`` both go through here, so what is
    measured is what is run.
    """
    tensors, shapes = [], []
    for image in images:
        array, shape = resize_for_model(image, size)
        tensors.append(torch.from_numpy(array.copy()).permute(2, 0, 1).to(device).float().div_(255))
        shapes.append(shape)
    try:
        with torch.inference_mode():
            outputs = family_of(model).predict(model, tensors)
    except torch.cuda.OutOfMemoryError:
        raise ModelError(
            f"out of GPU memory with --batch_size {batch_size} at --image_size {size}; "
            "lower --batch_size"
        ) from None
    return list(zip(outputs, shapes))


def numpy(values) -> np.ndarray:
    return torch.as_tensor(values).detach().cpu().numpy()


def scale_boxes(boxes: torch.Tensor, size: tuple[int, int], resized: tuple[int, int]) -> torch.Tensor:
    """Boxes in ``resized`` pixels -> float64 boxes in pixels of the ``size`` image, clipped to it
    (``drip.data.detections.scale_boxes_np``, which ONNX inference shares)."""
    return torch.from_numpy(scale_boxes_np(numpy(boxes), size, resized))


def to_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    size: tuple[int, int],
    resized: tuple[int, int],
    threshold: float,
    names: Sequence[str],
) -> list[dict[str, Any]]:
    """A detector's output tensors -> JSON records: ``drip.data.detections.to_detections_np``, the one
    post-processing that PyTorch and ONNX inference share."""
    return to_detections_np(
        numpy(boxes), numpy(scores), numpy(labels), size=size, resized=resized, threshold=threshold, names=names
    )


# -- training recipe ---------------------------------------------------------------------------
def set_box_sampling(model: nn.Module, boxes_per_image: int) -> bool:
    """Boxes sampled per image for the class loss (Faster R-CNN); False where it has no meaning."""
    return family_of(model).set_box_sampling(model, boxes_per_image)


def default_learning_rate(network: str, batch_size: int, optimizer: str) -> float:
    return family(network).default_learning_rate(str(network).strip().lower(), batch_size, optimizer)


def default_optimizer(network: str, number_of_steps: int) -> str | None:
    return family(network).default_optimizer(str(network).strip().lower(), number_of_steps)


def recipe(network: str) -> dict[str, Any]:
    """Config values the network's family wants where the user kept Drip's defaults."""
    return family(network).recipe(str(network).strip().lower())


def param_groups(model: nn.Module, optimizer: str = "sgd") -> list[dict[str, Any]]:
    """Trainable parameters grouped as the family's recipe for ``optimizer`` wants (``decay``,
    ``lr_scale``)."""
    return family_of(model).param_groups(model, optimizer)


def mixed_precision(model: nn.Module, device: torch.device) -> torch.dtype:
    return family_of(model).mixed_precision(device)


# -- export ------------------------------------------------------------------------------------
@contextlib.contextmanager
def onnx_export(model: nn.Module) -> Iterator[nn.Module]:
    """The module to trace into ONNX: ``[image]`` in, boxes/labels/scores of that image out."""
    with family_of(model).onnx_export(model) as traced:
        yield traced
