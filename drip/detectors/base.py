"""What every detector family gives Drip: the contract, as a base class each family adapter fills in.

A *family* adapter knows how to build its networks and how to run them. Callers never reach into
a network (``model.transform``, ``roi_heads``, ``score_thresh``, a backbone's layers): they call
``drip.detectors``, which finds the family of a network name or of a built model and asks it.

The model every family builds is an ``nn.Module`` that keeps the calling convention of
torchvision's detectors, so training, EMA, checkpoints and the model file treat all families
alike:

* ``model(images, targets)`` in train mode: a list of 3xHxW float tensors in 0..1 and one
  ``{"boxes" (xyxy pixels), "labels" (1 = first class)}`` dict per image -> a dict of losses;
* ``model(images)`` in eval mode -> one ``{"boxes", "labels", "scores"}`` dict per image, boxes
  in pixels of that input image.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .. import console
from ..errors import ModelError

# Layers whose parameters get no weight decay (with every bias): decaying a norm's scale or a
# bias towards zero only fights the normalisation (torchvision's reference: --norm-weight-decay 0).
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


@dataclass(frozen=True)
class Published:
    """A network's published figures, as ``drip networks`` shows them, and where they come from."""

    coco_ap: float | None  # COCO val2017 box AP (0.5:0.95)
    latency: str  # as the source states it (device and precision)
    params_m: float  # parameters, millions
    licence: str
    source: str


class Family:
    """One family of detectors behind the contract. Subclasses override what differs."""

    name = "family"
    networks: dict[str, Any] = {}  # network name -> the family's own description of it
    refused: dict[str, str] = {}  # names known but not offered (a licence) -> why, in one line
    start_points: tuple[str, ...] = ("coco", "none")
    # drip export --int8: the ONNX node-name prefixes of the network's body, where every operator
    # (activations, sums, concatenations) may run in int8; empty: only convolutions and matrix
    # products are quantized. Box decoding and NMS must stay outside these.
    int8_body: tuple[str, ...] = ()

    # -- building ------------------------------------------------------------------------------
    def owns(self, model: nn.Module) -> bool:
        """Whether ``model`` was built by this family."""
        raise NotImplementedError

    def about(self, network: str) -> str:
        raise NotImplementedError

    def published(self, network: str) -> Published | None:
        return None

    # ``classes`` (names, id 1 first), where given, name the classes inside the network for the
    # families that keep names (transformers' id2label); torchvision's ignore them.
    def build(self, network: str, num_classes: int, weights: str, cache_dir, classes=None) -> nn.Module:
        """``network`` for ``num_classes`` (background included) from a start point it offers."""
        raise NotImplementedError

    def skeleton(self, network: str, num_classes: int, classes=None) -> nn.Module:
        """``network`` with random weights, as it is rebuilt before a state_dict is loaded."""
        raise NotImplementedError

    def rebuild(self, network: str, num_classes: int, structure: dict[str, Any], source: str) -> nn.Module:
        """``network`` as ``structure_of`` described it, random weights, ready for its state_dict."""
        model = self.skeleton(network, num_classes)
        self.apply_structure(model, structure, source)
        return model

    def replace_head(self, model: nn.Module, network: str, num_classes: int, classes=None) -> None:
        """A freshly initialised class head for ``num_classes``; the rest of ``model`` kept."""
        raise NotImplementedError

    def from_weights_file(self, network: str, num_classes: int, path, cache_dir, source: str, classes=None) -> nn.Module:
        """``network`` started from a ``--weights`` file (a state_dict or the family's own format)."""
        raise NotImplementedError

    def structure_of(self, model: nn.Module) -> dict[str, Any]:
        """What rebuilding ``model`` offline needs beyond its weights, as plain types."""
        return {"frozen_params": [name for name, p in model.named_parameters() if not p.requires_grad]}

    def apply_structure(self, model: nn.Module, structure: dict[str, Any], source: str) -> None:
        frozen = set(structure.get("frozen_params", []))
        for name, param in model.named_parameters():
            param.requires_grad_(name not in frozen)

    # -- running -------------------------------------------------------------------------------
    def set_input_size(self, model: nn.Module, image_size: int) -> None:
        """Make ``model`` take images whose longer side is ``image_size`` as they are."""
        raise NotImplementedError

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module, image_size: int | None, score_floor: float) -> Iterator[nn.Module]:
        """``model`` in eval mode, detections kept from ``score_floor``, input at ``image_size``;
        everything put back afterwards. This default serves the wrappers that keep both as plain
        attributes (``score_thresh``, ``image_size``)."""
        saved = (model.score_thresh, model.image_size, model.training)
        try:
            model.score_thresh = min(float(model.score_thresh), score_floor)
            model.eval()
            if image_size:
                model.image_size = int(image_size)
            yield model
        finally:
            model.score_thresh, model.image_size = saved[0], saved[1]
            model.train(saved[2])

    def losses(self, model: nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return model(images, targets)

    def predict(self, model: nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return model(images)

    # -- training recipe -----------------------------------------------------------------------
    def set_box_sampling(self, model: nn.Module, boxes_per_image: int) -> bool:
        """Set the boxes sampled per image for the class loss; False when the family has no such knob."""
        return False

    def default_learning_rate(self, network: str, batch_size: int, optimizer: str) -> float:
        raise NotImplementedError

    def default_optimizer(self, network: str, number_of_steps: int) -> str | None:
        """The optimizer ``--optimizer auto`` picks for this family, or None for Drip's rule."""
        return None

    def recipe(self, network: str) -> dict[str, Any]:
        """Config values the family's recipe wants where the user kept Drip's default."""
        return {}

    def param_groups(self, model: nn.Module, optimizer: str) -> list[dict[str, Any]]:
        """The trainable parameters in groups for ``optimizer`` ('sgd' or 'adamw'): ``decay``
        (weight decay applies) and ``lr_scale`` (a factor on the learning rate, e.g. a slower
        backbone)."""
        return decay_groups(model, lambda name, param: 1.0)

    def mixed_precision(self, device: torch.device) -> torch.dtype:
        """The autocast dtype on a CUDA ``device`` when ``--amp`` is on."""
        return torch.float16

    # -- export --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def onnx_export(self, model: nn.Module) -> Iterator[nn.Module]:
        """The module to trace for ONNX (list of one image in, boxes/labels/scores out)."""
        yield model


def decay_groups(model: nn.Module, lr_scale_of) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (weight decay or not, ``lr_scale_of(qualified name, parameter)``).

    No decay on norm layers and biases; each parameter counted once (shared ones too).
    """
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            decay = not (isinstance(module, NORMS) or name == "bias")
            full = f"{module_name}.{name}" if module_name else name
            groups.setdefault((decay, float(lr_scale_of(full, param))), []).append(param)
    order = sorted(groups, key=lambda key: (-key[1], not key[0]))
    return [{"params": groups[key], "decay": key[0], "lr_scale": key[1]} for key in order]


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str, network: str) -> None:
    """Load the tensors of ``state`` that fit ``model``; report the ones skipped (the class head)."""
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fits:
        raise ModelError(
            f"{source}: none of its {len(state)} tensors fit {network}; is it the state_dict of "
            "another network? pass that network as --network"
        )
    model.load_state_dict(fits, strict=False)
    counter = "num_batches_tracked"  # BatchNorm bookkeeping, absent from frozen norms: not a weight
    skipped = [k for k in state if k in own and k not in fits]
    missing = [k for k in own if k not in state and not k.endswith(counter)]
    unused = [k for k in state if k not in own and not k.endswith(counter)]
    if skipped:
        console.info(
            f"{source}: skipped {len(skipped)} tensors whose shape differs here, so they start "
            f"fresh (the class head when the class count differs): {names(skipped)}"
        )
    if missing:
        console.info(f"{source}: {len(missing)} tensors of {network} are not in the file and start fresh: {names(missing)}")
    if unused:
        console.info(f"{source}: {len(unused)} tensors in the file are not part of {network}: {names(unused)}")


def names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
