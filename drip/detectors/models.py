"""The detectors Drip trains, how they are built from a starting point, and the model file.

The networks and how to run them belong to ``drip.detectors`` (the contract, with one adapter per
family); this module turns the user's choice (``--network``, ``--weights``) into a built network
through it, and reads and writes the model file (the safe reading of any file it is given, and
brought archives, are ``drip.detectors.files``').

``build_model`` makes a network ready to train from ``coco`` (the whole detector pretrained on
COCO, downloaded into the session's cache), ``imagenet`` (backbone only), ``none`` (from scratch)
or a weights file, or continues from a model file exported by Drip.

The model file (``model.pt``) holds plain types and tensors only and is read with
``torch.load(weights_only=True)``: loading a model never runs code from the file. Alongside the
weights it records what is needed to rebuild the network offline: the architecture name, the class
names, the image size, the training config and what the family needs to rebuild it (for
torchvision: which layers it froze for the starting point), so a model trained from COCO weights
is rebuilt without downloading them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from .. import console, detectors
from ..errors import ConfigError, ModelError
from .base import first_line
from .files import MODEL_FORMAT, save_atomic, state_dict_in, torch_load, unpack_if_archive

MODEL_VERSION = 1
START_POINTS = ("coco", "imagenet", "objects365", "none")


@dataclass
class LoadedModel:
    """A model file turned back into a ready detector (in eval mode, on its device)."""

    model: nn.Module
    classes: list[str]  # names, class id 1 first
    image_size: int
    network: str
    meta: dict[str, Any]  # everything else in the file except the weights (config, step, ...)


# -- lookups ----------------------------------------------------------------------------------
def model_file(network: str, cache_dir: Path | None = None) -> Path | None:
    """The model file that ``--network`` names, or None when it names a registry network.

    A ``.zip`` archive holding the model file is unpacked (see ``extract_model_archive``) into
    ``cache_dir/archives/`` (a private temporary folder without one).
    """
    if str(network).strip().lower() in detectors.network_names():
        return None
    path = Path(network).expanduser()
    if path.is_file():
        return unpack_if_archive(path, "--network", cache_dir)
    if "/" in str(network) or "\\" in str(network) or path.suffix.lower() in (".pt", ".pth", ".zip"):
        raise ModelError(
            f"--network {network}: no such model file; check the path, or give a network name "
            f"({', '.join(detectors.network_names())})"
        )
    return None


def network_name(network: str, cache_dir: Path | None = None) -> str:
    """The architecture behind ``--network``: the name itself, or the one a model file records."""
    path = model_file(network, cache_dir)
    if path is None:
        detectors.family(network)
        return str(network).strip().lower()
    return read_model_file(path, "--network")["network"]


# Up to this many steps ``--optimizer auto`` trains with AdamW, beyond it with SGD.
AUTO_ADAMW_MAX_STEPS = 10_000


def resolve_optimizer(name: str, number_of_steps: int, network: str | None = None) -> str:
    """``sgd`` or ``adamw``: ``name`` itself, or what ``auto`` picks for a run this long (and for
    ``network``, whose family may insist on one)."""
    if name != "auto":
        return name
    if network is not None:
        chosen = detectors.default_optimizer(network_name(network), number_of_steps)
        if chosen is not None:
            return chosen
    return "adamw" if number_of_steps <= AUTO_ADAMW_MAX_STEPS else "sgd"


def default_learning_rate(network: str, batch_size: int, optimizer: str = "sgd") -> float:
    """The tuned peak learning rate of ``network`` for ``batch_size`` images a step."""
    return detectors.default_learning_rate(network_name(network), batch_size, optimizer)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when PyTorch sees a GPU, else the CPU; a named device must exist."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "--device cuda: PyTorch sees no GPU here (is the container started with GPU access?); "
                "use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {name}: there are only {torch.cuda.device_count()} GPUs; use cuda or cuda:0"
            )
    elif device.type != "cpu":
        raise ConfigError(f"--device {name!r}: Drip runs on cpu or cuda; use auto, cpu or cuda")
    return device


# -- building ---------------------------------------------------------------------------------
def build_model(
    network: str,
    num_classes: int,
    weights: str = "none",
    image_size: int = 640,
    cache_dir: Path | None = None,
    classes: list[str] | None = None,
) -> nn.Module:
    """A detector for ``num_classes`` classes (background included: label-map size + 1), whose
    names (id 1 first) are ``classes`` where given (the families that keep names use them).

    ``network`` is a registry name or a Drip model file (its architecture and weights are the
    start point; ``weights`` is then ignored). ``weights`` is ``coco``, ``imagenet``,
    ``objects365``, ``none`` (what the network's family offers) or the path of a weights file.
    Pretrained weights are downloaded into ``cache_dir`` (kept between sessions).
    """
    if num_classes < 2:
        raise ModelError(f"num_classes={num_classes}: a detector needs the background and at least one class")
    path = model_file(network, cache_dir)
    if path is not None:
        model = _from_model_file(path, num_classes, classes)
    else:
        name = str(network).strip().lower()
        offered = detectors.family(name).start_points
        start = str(weights).strip()
        if start.lower() in START_POINTS:
            model = detectors.build(name, num_classes, start.lower(), cache_dir, classes)
        else:
            where = Path(start).expanduser()
            if not where.exists():
                raise ModelError(
                    f"--weights {where}: not one of {', '.join(offered)} and no such file; check the path"
                )
            model = detectors.from_weights_file(name, num_classes, where, cache_dir, f"--weights {where}", classes)
    set_image_size(model, image_size)
    return model


def set_image_size(model: nn.Module, image_size: int) -> None:
    """Make the detector take images whose longer side is ``image_size`` as they are
    (``drip.detectors.set_input_size``)."""
    detectors.set_input_size(model, image_size)


def _from_model_file(path: Path, num_classes: int, classes: list[str] | None = None) -> nn.Module:
    meta = read_model_file(path, "--network")
    model = restore(meta["network"], meta["num_classes"], meta["structure"], meta["state_dict"], f"--network {path}")
    if meta["num_classes"] != num_classes:
        detectors.replace_head(model, meta["network"], num_classes, classes)
        console.info(
            f"--network {path}: trained for {meta['num_classes'] - 1} classes, this session has "
            f"{num_classes - 1}: the class head starts fresh, the rest continues"
        )
    elif classes is not None and [str(c) for c in classes] != [str(c) for c in meta["classes"]]:
        # As many classes, other names or another order: the head scores by position, so keeping
        # it would call a user's first class by the model's first. Same names, same order: the
        # retraining loop continues it whole.
        detectors.replace_head(model, meta["network"], num_classes, classes)
        console.info(
            f"--network {path}: trained for the classes {', '.join(map(str, meta['classes']))}, this session "
            f"has {', '.join(map(str, classes))}: the class head starts fresh, the rest continues"
        )
    return model


def structure_of(model: nn.Module) -> dict[str, Any]:
    """What rebuilding ``model`` needs beyond its weights (torchvision: frozen norms and
    parameters), as plain types."""
    return detectors.structure_of(model)


def apply_structure(model: nn.Module, structure: dict[str, Any], source: str) -> None:
    detectors.apply_structure(model, structure, source)


def restore(network: str, num_classes: int, structure: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Rebuild ``network`` exactly as it was trained and load ``state`` into it, offline."""
    # The random initialisation is overwritten at once: don't let it move the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        model = detectors.rebuild(network, num_classes, structure, source)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(
            f"{source}: its weights do not fit {network} as this Drip builds it "
            f"({first_line(exc)}); use the Drip and library versions it was made with"
        ) from None
    return model


# -- the model file ---------------------------------------------------------------------------
def export_model(
    path: Path,
    model: nn.Module,
    network: str,
    label_map_names,
    image_size: int,
    config_dict: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model file atomically: plain types and tensors only, loadable with weights_only."""
    from .. import __version__

    names = [str(n) for n in label_map_names]
    core = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "network": network,
        "num_classes": len(names) + 1,
        "classes": names,
        "image_size": int(image_size),
        "config": dict(config_dict),
        "structure": structure_of(model),
        "versions": {"drip": __version__, "torch": str(torch.__version__), "torchvision": torchvision.__version__},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(core))
    if clash:
        raise ValueError(f"export_model: extra keys {clash} would overwrite the model file's own")
    save_atomic({**core, **extra}, Path(path))
    return Path(path)


def read_model_file(path: Path, what: str = "--model") -> dict[str, Any]:
    """The checked contents of a Drip model file."""
    data = torch_load(Path(path), what)
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        if isinstance(data, dict) and data.get("format") == "drip-checkpoint":
            raise ModelError(
                f"{what} {path}: this is a training checkpoint, not an exported model; use the "
                "session's model.pt (written when training ends or with --resume_training)"
            )
        if state_dict_in(data) is not None:
            raise ModelError(
                f"{what} {path}: a bare state_dict, not a Drip model; to train from it pass it as "
                "--weights PATH with --network NAME (the network it belongs to)"
            )
        raise ModelError(f"{what} {path}: not a model file exported by Drip; use the model.pt of a session")
    if data.get("version", 0) > MODEL_VERSION:
        raise ModelError(
            f"{what} {path}: model file version {data.get('version')} is newer than this Drip "
            f"reads ({MODEL_VERSION}); update Drip"
        )
    missing = [k for k in ("network", "num_classes", "classes", "image_size", "state_dict") if k not in data]
    if missing:
        raise ModelError(f"{what} {path}: damaged model file (missing {', '.join(missing)}); export it again")
    data.setdefault("structure", {})
    return data


def load_model(path: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the detector in a Drip model file, in eval mode on ``device``."""
    path = Path(path)
    data = read_model_file(path)
    model = restore(data["network"], data["num_classes"], data["structure"], data["state_dict"], f"--model {path}")
    set_image_size(model, data["image_size"])
    model.to(torch.device(device)).eval()
    meta = {k: v for k, v in data.items() if k != "state_dict"}
    return LoadedModel(model, list(data["classes"]), int(data["image_size"]), data["network"], meta)


