"""The one typed configuration of a training session.

``Config`` is the schema for three sources, applied in this order: the defaults below, the
session's ``pipeline.config`` (a commented YAML file the user may edit between runs), and the
flags given on the command line. The CLI flags are generated from the same fields, so a flag and
a config key always share a name, a type, a range and a help text.

This module imports only the standard library: the host-side starters build their ``--help`` from
it on machines without PyTorch. PyYAML is imported only when a config file is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# --time_limit counts from the start of the command (``start_clock``), which its processes inherit
# through the environment: torchrun's workers, an audit's fold processes, and Drip's container,
# which gets the host's start under HOST_STARTED_ENV (a command typed later in a --shell does not).
STARTED_ENV = "DRIP_STARTED_AT"
HOST_STARTED_ENV = "DRIP_HOST_STARTED_AT"


def start_clock() -> None:
    """Stamp this command's start for --time_limit: now, or the host's when the command is the
    one Drip's container was started for (the image build and the container start count too)."""
    os.environ[STARTED_ENV] = os.environ.pop(HOST_STARTED_ENV, None) or repr(time.time())

CONFIG_VERSION = 1
CLI = "command line"  # the ``source`` of values given as flags: errors then name the flag
DEFAULT_THRESHOLD = 60.0  # percent: drip infer keeps detections from here, and the report draws them


def _opt(default, help, group, *, choices=None, low=None, high=None, below=None, flag=True, aliases=()):
    """A config field with what the CLI and the commented config file need to know about it.

    ``high`` is an inclusive upper bound, ``below`` an exclusive one.

    ``aliases`` are further flag names for the field (without ``--``): older or other commands'
    names for the same thing, accepted on the command line only.
    """
    meta = {"help": help, "group": group, "choices": choices, "low": low, "high": high, "below": below,
            "flag": flag, "aliases": tuple(aliases)}
    return field(default=default, metadata=meta)


class _Schema:
    """What every config dataclass of ``_opt`` fields can do: check, update, list its fields."""

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str):
        """Build from defaults plus ``values``; ``source`` names where they came from."""
        return cls().updated(values, source)

    def updated(self, values: dict[str, Any], source: str):
        """A copy with ``values`` applied, each checked against the schema."""
        known = self.fields()
        changes = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r}{_suggest(key, known)}")
            where = f"--{key} {value}" if source == CLI else f"{source}: {key}={value!r}"
            changes[key] = _check(known[key], value, where)
        if changes.get("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise ConfigError(
                f"{source}: version {changes['version']} is not supported by this Drip "
                f"(it reads version {CONFIG_VERSION}); start a new session"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Config(_Schema):
    """Everything that decides what a training session does. Paths are as the user gave them."""

    # -- data ---------------------------------------------------------------------------------
    src_json_path: str = _opt(
        "files/metadata.json",
        "Annotations: a COCO instances JSON, Drip's own JSON, a folder of Pascal VOC XML "
        "files, or a YOLO dataset (its data.yaml, or a labels folder beside images/). The "
        "format is detected from the content. A data.yaml's 'val' becomes the eval set.",
        "data",
    )
    eval_json_path: str | None = _opt(
        None,
        "Annotations of your own eval set, in any format --src_json_path takes (image paths "
        "relative to --image_folder_path; a data.yaml gives its 'val'). When given, the random "
        "split is skipped and eval_percentage is not used.",
        "data",
    )
    image_folder_path: str = _opt(
        "files/images/",
        "Folder holding the images; annotation file names are relative to it (sub-folders "
        "allowed). Not used for YOLO, whose images are in images/ beside labels/.",
        "data",
    )
    class_map_path: str | None = _opt(
        None,
        "Label map in TF label-map text format (item { id: 1 name: 'cat' }), e.g. "
        "files/class_map.pbtxt. When given it fixes class ids and names and any other class in "
        "the annotations is an error; when left out the classes come from the annotations.",
        "data",
    )
    eval_percentage: float = _opt(
        20.0,
        "Percent of the images held out for evaluation, split per class so rare classes land "
        "in both halves.",
        "data",
        low=0.0,
        high=100.0,
    )
    seed: int = _opt(
        0,
        "Seed for the split, the augmentation and the training order: the same seed and data "
        "give the same session.",
        "data",
        low=0,
    )
    augmentations: int = _opt(
        1,
        "Augmented copies written per training image (0 = none). Eval images are never augmented.",
        "data",
        low=0,
        high=100,
    )
    augmentation_policy: str = _opt(
        "files/augmentations.yaml",
        "YAML file listing the albumentations transforms and their probabilities. If the "
        "default file is missing, Drip's built-in policy (the same content) is used.",
        "data",
    )
    on_bad_image: str = _opt(
        "skip",
        "What to do with an image that cannot be decoded: 'skip' leaves it out and reports it "
        "in split/report.json, 'fail' stops with an error.",
        "data",
        choices=("skip", "fail"),
    )
    images_per_shard: int = _opt(
        1000,
        "Images per TFRecord shard: small enough to shuffle well, large enough to read fast.",
        "data",
        low=1,
    )
    tile_size: int | None = _opt(
        None,
        "For small objects in large images (aerial, drone, microscope): cut every training image "
        "larger than this many pixels into overlapping square tiles, and train on the tiles. "
        "Images no larger than a tile stay whole; the eval split stays whole images, scored "
        "after predicting tile by tile and merging, as inference then does by default. Usually "
        "--image_size, so tiles are not shrunk. Off when not given.",
        "data",
        low=32,
        high=65536,
    )
    tile_overlap: float = _opt(
        0.2,
        "Overlap of neighbouring tiles, a fraction of a tile: make it at least the size of the "
        "largest object, so every object is whole in some tile.",
        "data",
        low=0.0,
        below=1.0,
    )

    # -- model --------------------------------------------------------------------------------
    network: str = _opt(
        "fasterrcnn_mobilenet_v3_large_fpn",
        "A detector by name (see 'drip networks': torchvision's, YOLOX, D-FINE, RT-DETRv2) or the "
        "path of a model file exported by Drip (or of a .zip holding one). The default trains fast on a laptop CPU "
        "and well on a GPU.",
        "model",
    )
    weights: str = _opt(
        "coco",
        "Starting point: 'coco' (detector pretrained on COCO, downloaded once into the "
        "session folder's cache), 'imagenet' (backbone only, torchvision networks), 'objects365' "
        "(D-FINE S-X), 'none' (from scratch), or the path of a state_dict file for --network (or "
        "of a .zip holding one; for D-FINE/RT-DETRv2 also a save_pretrained folder or .safetensors file).",
        "model",
    )
    weights_fallback: str = _opt(
        "fail",
        "When --weights coco, imagenet or objects365 cannot be downloaded (no internet, a proxy): "
        "'fail' stops with the reason, 'none' trains from scratch instead and says so in one line "
        "(pipeline.config then records --weights none). From scratch needs far more steps to "
        "reach the same accuracy, so 'fail' is the default; the quick start uses 'none'.",
        "model",
        choices=("fail", "none"),
    )
    image_size: int = _opt(
        640,
        "Images are resized so their longer side is this many pixels, for training and "
        "inference alike. Smaller is faster; larger finds small objects.",
        "model",
        low=32,
        high=4096,
    )

    # -- training -----------------------------------------------------------------------------
    batch_size: int = _opt(4, "Images per training step.", "train", low=1, high=4096)
    number_of_steps: int = _opt(
        3000,
        "Training steps in total (also when resuming: training stops at this step).",
        "train",
        low=1,
    )
    time_limit: float | None = _opt(
        None,
        "Train for this many minutes instead of --number_of_steps: after a few measured steps the "
        "number of steps that fits (leaving time for the last evaluation and the model file) is "
        "fixed once and written into pipeline.config, and the schedule (warmup, decay, the final "
        "plain part, evaluations) is laid out over it. A resumed run trains to that recorded count.",
        "train",
        low=0.1,
    )
    learning_rate: float | None = _opt(
        None,
        "Peak learning rate; by default the network family's tuned value, scaled by batch size.",
        "train",
        low=0.0,
    )
    optimizer: str = _opt(
        "auto",
        "Optimizer: 'sgd' (momentum 0.9, the torchvision detection reference), 'adamw', or "
        "'auto': AdamW for runs of up to 10,000 steps, where it learns faster, SGD for longer "
        "ones (the rule Ultralytics uses). A resumed run keeps the optimizer it started with.",
        "train",
        choices=("auto", "sgd", "adamw"),
    )
    weight_decay: float = _opt(1e-4, "Weight decay, not applied to norms and biases.", "train", low=0.0)
    lr_schedule: str = _opt(
        "cosine",
        "Learning-rate schedule after warmup: 'cosine' to zero, 'step' (x0.1 at 70% and 90%), "
        "or 'constant'.",
        "train",
        choices=("cosine", "step", "constant"),
    )
    warmup_steps: int = _opt(
        100,
        "Steps of linear learning-rate warmup: keeps the freshly sized head from wrecking the "
        "pretrained backbone in the first steps.",
        "train",
        low=0,
    )
    grad_clip: float = _opt(
        10.0, "Clip the gradient norm at this value (0 = off).", "train", low=0.0
    )
    amp: bool = _opt(True, "Mixed precision on CUDA (ignored on the CPU).", "train")
    online_augmentation: str = _opt(
        "flip",
        "Augmentation drawn afresh for every training sample, on top of the copies the augment "
        "stage wrote: 'flip' (horizontal flip), 'jitter' (the flip, a random zoom in or out of "
        "the frame and a brightness/contrast/saturation change: for long runs; in short ones it "
        "slows learning), 'mosaic' (the YOLO recipe for long runs: four images tiled around a random centre, a "
        "random scale, rotation, shear and shift, a hue/saturation/brightness change and the flip) "
        "or 'none'. Decided per sample from the seed, so a resumed run sees the same images.",
        "train",
        choices=("jitter", "mosaic", "flip", "none"),
    )
    plain_fraction: float = _opt(
        0.0,
        "The last fraction of the steps trains with only the flip as online augmentation: the "
        "model ends on images as inference sees them (YOLOX's 'no augmentation' epochs: 0.15 with "
        "--online_augmentation mosaic).",
        "train",
        low=0.0,
        high=1.0,
    )
    ema: bool = _opt(
        True,
        "Keep an exponential moving average of the weights and evaluate and export it: "
        "smoother than the last step's weights, usually a few AP points better.",
        "train",
    )
    ema_decay: float = _opt(
        0.999,
        "EMA decay per step (ramped up from 0 over the first steps, so early weights fade "
        "fast); the average spans about 1/(1-decay) steps.",
        "train",
        low=0.0,
        high=0.99999,
    )
    box_batch_size_per_image: int | None = _opt(
        None,
        "Faster R-CNN only: region proposals sampled per image to train the box head "
        "(torchvision's default 512). On a CPU most of a step goes into them; 128 is about "
        "3x faster and enough for images with a handful of objects.",
        "train",
        low=1,
        high=4096,
    )
    device: str = _opt(
        "auto",
        "'auto' picks CUDA when PyTorch sees a GPU, else the CPU.",
        "train",
        choices=("auto", "cpu", "cuda"),
    )
    num_workers: int = _opt(
        -1,
        "Data-loading worker processes; -1 = one per core, at most 8, and none on a 1-core machine.",
        "train",
        low=-1,
        high=64,
    )
    sync_bn: bool = _opt(
        False,
        "With several processes: synchronise batch-norm statistics over all of them (SyncBatchNorm), "
        "for networks trained from scratch (--weights none), whose batch statistics are learned "
        "from per-process batches that may be tiny. Frozen batch norm (pretrained backbones) stays "
        "frozen. Costs a collective per norm layer per step.",
        "train",
    )
    dist_timeout: float = _opt(
        30.0,
        "With several processes: minutes a process waits for the others in a collective before the "
        "run stops with the rank named, so a dead or hung process never hangs the run. It must "
        "exceed the longest pause of rank 0 alone (an evaluation, a checkpoint save).",
        "train",
        low=0.05,
        high=1440.0,
    )
    checkpoint_every: int = _opt(
        500, "Save a checkpoint every this many steps (and always at the end).", "train", low=1
    )
    keep_checkpoints: int = _opt(
        3, "Checkpoints kept in checkpoints/; older ones are removed.", "train", low=1
    )
    allow_changed_data: bool = _opt(
        False,
        "With --resume_training: continue although the records changed since the checkpoint "
        "(the records stage was rerun on other images or another split). Off, Drip refuses and "
        "says what changed, because the run would then mix two data sets. Applies to the run it "
        "is given to; never kept in pipeline.config.",
        "train",
    )
    log_every: int = _opt(
        10,
        "Write losses, learning rate and images/s to TensorBoard every this many steps; "
        "reading them syncs the GPU, so not every step.",
        "train",
        low=1,
    )
    eval_every: int = _opt(
        500,
        "Evaluate on the eval split every this many steps and at the end (0 = only at the "
        "end): COCO metrics to TensorBoard, metrics.jsonl and the console; the checkpoint "
        "with the best AP is kept as checkpoints/best.pt and exported as model.pt.",
        "train",
        low=0,
    )

    patience: int = _opt(
        0,
        "Stop after this many evaluations in a row without a better AP than the best so far, "
        "then export the best model as at the end (0 = off: train all number_of_steps). For "
        "long runs whose AP may level off well before the end; the patience in steps is "
        "patience x eval_every. A resumed run counts the evaluations before it.",
        "train",
        low=0,
    )
    report: bool = _opt(
        True,
        "At the end of training, draw the report into report/: training curves, precision-recall "
        "curves, a confusion matrix, the dataset and eval images with their predictions, shown "
        "by one index.html. It runs the exported model once more on the eval split; 'drip "
        "report' draws it again at any time.",
        "train",
    )

    version: int = _opt(CONFIG_VERSION, "Schema version of this file.", "meta", flag=False)

    # -- the commented file -----------------------------------------------------------------
    def to_text(self) -> str:
        """``pipeline.config``: flat YAML, every field with its meaning as a comment."""
        lines = [
            "# Drip pipeline.config: the training configuration of this session.",
            "# Edit a value, then run the starter again with --resume_training: the edits take",
            "# effect from the next step. Flags given on the command line override this file.",
            "# Data fields were used to build this session's records; changing them now has no",
            "# effect unless you start a new session.",
        ]
        group = None
        for f in dataclasses.fields(self):
            if f.metadata["group"] != group:
                group = f.metadata["group"]
                lines += ["", f"# --- {group} ---"]
            lines += [f"# {chunk}" for chunk in _wrap(_describe(f), 96)]
            lines.append(f"{f.name}: {_yaml_scalar(getattr(self, f.name))}")
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> None:
        """Write ``pipeline.config`` atomically, so an interrupted write never loses the user's edits."""
        # A permission for one resume, not a setting: kept, it would let a later resume on yet
        # other records through without a word.
        text = dataclasses.replace(self, allow_changed_data=False).to_text()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> "Config":
        """Read a ``pipeline.config``; errors name the file and line."""
        import yaml  # not needed on the host side

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(
                f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the line "
                "or move the file away to regenerate it"
            ) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected 'key: value' lines, found {type(data).__name__}")
        return cls.from_mapping(data, str(path))


def _describe(f: dataclasses.Field) -> str:
    meta = f.metadata
    kind = {"str": "str", "int": "int", "float": "float", "bool": "bool"}.get(
        str(f.type).replace(" | None", ""), str(f.type)
    )
    extra = []
    if meta["choices"]:
        extra.append("one of " + ", ".join(meta["choices"]))
    if meta["low"] is not None or meta["high"] is not None or meta.get("below") is not None:
        extra.append(f"range {_range(meta)}")
    suffix = f" [{'; '.join(extra)}]" if extra else ""
    return f"({kind}) {meta['help']}{suffix}"


def _range(meta) -> str:
    low = "" if meta["low"] is None else f"{meta['low']:g}"
    high = "" if meta["high"] is None else f"{meta['high']:g}"
    if meta.get("below") is not None:
        high = f"<{meta['below']:g}"
    return f"{low}..{high}"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid YAML scalar, quotes and all


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"


def _check(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Coerce ``value`` to the field's type and check its range; raise ConfigError if it can't be.

    ``where`` names the value for the error message (a flag, or a file and key).
    """
    meta = f.metadata
    type_name = str(f.type)
    optional = "None" in type_name
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
        if optional:
            return None
        if type_name == "str" and isinstance(value, str) and value.lower() == "none":
            return value  # e.g. --weights none
        raise ConfigError(f"{where} needs a value")
    base = type_name.replace(" | None", "")
    try:
        if base == "bool":
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise ValueError
                value = lowered in ("true", "yes", "1", "on")
            elif not isinstance(value, bool):
                raise ValueError
        elif base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif base == "float":
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
            if not math.isfinite(value):
                raise ValueError
        else:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} is not a valid {base}") from None
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{where} is not one of {', '.join(meta['choices'])}")
    low, high = meta["low"], meta["high"]
    below = meta.get("below")
    if (low is not None and value < low) or (high is not None and value > high) or (below is not None and value >= below):
        raise ConfigError(f"{where} is out of range; expected {_range(meta)}")
    return value


@dataclass
class _ModelRun(_Schema):
    """The settings of running a trained model, shared by ``drip infer`` and ``drip evaluate``."""

    model: str | None = _opt(
        None,
        "The model to run: a model file exported by Drip, or a session folder (its dl/model.pt "
        "is used). By default the current session's exported model, <session_folder>/dl/model.pt.",
        "model",
    )
    image_size: int | None = _opt(
        None,
        "Longer image side, in pixels, fed to the model. By default the size the model was "
        "trained at, which is where it is most accurate.",
        "model",
        low=32,
        high=4096,
    )
    tile_size: int | None = _opt(
        None,
        "Predict images larger than this many pixels tile by tile (tiles overlapping by "
        "--tile_overlap) and merge the boxes across tiles, so small objects keep their pixels. "
        "By default the tile size the model was trained with, if any; 0 predicts whole images.",
        "model",
        low=0,
        high=65536,
    )
    tile_overlap: float | None = _opt(
        None,
        "Overlap of neighbouring tiles, a fraction of a tile. By default the model's (0.2).",
        "model",
        low=0.0,
        below=1.0,
    )
    tile_full_pass: bool = _opt(
        False,
        "With tiles: also predict the whole image once and merge it in, for objects larger "
        "than a tile (SAHI's standard prediction). Costs one more pass per image.",
        "model",
    )
    batch_size: int = _opt(
        4,
        "Images (or tiles) per forward pass: larger is faster on a GPU until memory runs out; "
        "1-4 on a CPU.",
        "infer",
        low=1,
        high=1024,
    )
    device: str = _opt(
        "auto",
        "'auto' picks CUDA when PyTorch sees a GPU, else the CPU.",
        "infer",
        choices=("auto", "cpu", "cuda"),
    )


@dataclass
class InferConfig(_ModelRun):
    """What ``drip infer`` does: which model, on which images, where the results go.

    A separate schema from ``Config`` because inference runs long after training, often with a
    model from another session; the same ``_Schema`` checks generate, range-check and suggest
    its flags.
    """

    images_path: str = _opt(
        "files/images/",
        "A folder of folders: each sub-folder (one camera, one day, one site) gets its own "
        "results folder; images directly in this folder form a group named after it. "
        "Sub-folders deeper down are kept in the results.",
        "data",
    )
    results_path: str = _opt(
        "files/results/",
        "Where each group's results go: <results_path>/<group>/ with one drawn JPEG and one "
        "JSON per image and a detections.json for the group. Earlier results of the same group "
        "are moved to <results_path>/trash/<timestamp>/, never overwritten.",
        "data",
        aliases=("output",),
    )
    threshold: float = _opt(
        DEFAULT_THRESHOLD,
        "Minimum score, in percent, for a detection to be kept. Lower finds more objects and "
        "more false alarms; 60 suits a model trained to convergence.",
        "model",
        low=0.0,
        high=100.0,
    )
    src_json_path: str | None = _opt(
        None,
        "Annotations of these images (COCO JSON, Drip JSON, a VOC folder or a YOLO data.yaml or "
        "labels folder; image paths relative to --images_path, YOLO images those under it). When given, the model is also scored against them: COCO metrics in "
        "<results_path>/metrics.json and, for COCO annotations, every detection in "
        "<results_path>/coco_results.json in the file's own image and category ids.",
        "data",
    )


@dataclass
class EvaluateConfig(_ModelRun):
    """What ``drip evaluate`` does: which model, on which annotated images, where the metrics go.

    Its model, image_size, batch_size and device flags are InferConfig's (``_ModelRun``).
    """

    images_path: str = _opt(
        "files/images/",
        "Folder holding the images; the annotation file's image paths are relative to it.",
        "data",
    )
    src_json_path: str = _opt(
        "files/metadata.json",
        "Annotations to score against: a COCO instances JSON, Drip's own JSON, a folder of "
        "Pascal VOC XML files, or a YOLO data.yaml or labels folder (its images under "
        "--images_path are scored). Classes are matched to the model's by name.",
        "data",
    )
    results_path: str = _opt(
        "files/results/",
        "Where the metrics go: <results_path>/metrics.json (COCO AP, AP50, AP75, AP and AR by "
        "size, AP per class and precision-recall curves), the file drip infer --src_json_path "
        "writes there too; a path ending in .json names the file itself. An earlier file is "
        "moved to <its folder>/trash/<timestamp>/.",
        "data",
        aliases=("output",),
    )

    def metrics_path(self) -> Path:
        """The metrics JSON ``results_path`` names: the file itself, or metrics.json in the folder."""
        path = Path(self.results_path)
        return path if path.suffix.lower() == ".json" else path / "metrics.json"


@dataclass
class AuditConfig(_Schema):
    """What ``drip audit`` adds to training's flags: how the data is folded, and the final model."""

    folds: int = _opt(
        2,
        "Models trained out of fold: each image is predicted by a model that trained on the "
        "other folds, never on its own labels. 2 keeps the audit and its final model within "
        "2.5 training runs (--number_of_steps each fold, half that for the final model); more "
        "folds train each model on more of the data, at one more run each.",
        "audit",
        low=2,
        high=20,
    )
    final_steps: int | None = _opt(
        None,
        "Steps of the final model, which continues from the last fold's model on all the data "
        "(that model has seen all but one fold already). By default half of --number_of_steps.",
        "audit",
        low=1,
    )
    fold_jobs: str = _opt(
        "auto",
        "Folds trained at the same time, each in a process of its own on one GPU: 'auto' = one per "
        "visible GPU when training on CUDA with several (folds side by side exchange nothing, where "
        "one fold on every GPU through torchrun exchanges gradients every step), else 1: one fold "
        "after another, each on every GPU. A number N runs N at once; on the CPU each "
        "then keeps 1/N of the cores. The final model trains on every GPU either way.",
        "audit",
    )

    def updated(self, values: dict[str, Any], source: str):
        new = super().updated(values, source)
        jobs = new.fold_jobs.strip().lower()
        if jobs != "auto" and not (jobs.isdigit() and int(jobs) >= 1):
            where = f"--fold_jobs {new.fold_jobs}" if source == CLI else f"{source}: fold_jobs={new.fold_jobs!r}"
            raise ConfigError(f"{where} is not 'auto' or a number of folds at once (e.g. 2)")
        return dataclasses.replace(new, fold_jobs=jobs)


@dataclass
class SelectConfig(_ModelRun):
    """What ``drip select`` does: which unlabelled images to label next, and where to say so."""

    images_path: str = _opt(
        "files/images/",
        "Folder of unlabelled images (sub-folders included) to choose from.",
        "data",
    )
    count: int = _opt(10, "How many images to choose.", "data", low=1)
    output: str = _opt(
        "files/selected.json",
        "JSON file for the chosen images, best first, each with why; an earlier file is moved to "
        "<its folder>/trash/<timestamp>/ first.",
        "data",
    )


@dataclass
class ReportConfig(_Schema):
    """What ``drip report`` does: draw a session's pictures and its index.html again."""

    threshold: float = _opt(
        DEFAULT_THRESHOLD,
        "Score, in percent, from which a detection counts in the confusion matrix and is drawn on "
        "the eval images: drip infer's default, so the pictures show what inference keeps.",
        "model",
        low=0.0,
        high=100.0,
    )
    batch_size: int = _opt(
        4, "Images per forward pass when the model is run on the eval split.", "infer", low=1, high=1024
    )
    device: str = _opt(
        "auto",
        "'auto' picks CUDA when PyTorch sees a GPU, else the CPU.",
        "infer",
        choices=("auto", "cpu", "cuda"),
    )


@dataclass
class ExportConfig(_Schema):
    """What ``drip export`` does: which model, in which format, to which file."""

    model: str | None = _opt(
        None,
        "The model to export: a model file exported by Drip, or a session folder (its "
        "dl/model.pt is used). By default the current session's, <session_folder>/dl/model.pt.",
        "model",
    )
    format: str = _opt(
        "onnx",
        "'onnx' runs in ONNX Runtime without PyTorch (drip infer --model model.onnx, or any "
        "ONNX runtime); 'torchscript' runs in PyTorch's C++ or Python runtime without Drip.",
        "model",
        choices=("onnx", "torchscript"),
    )
    output: str | None = _opt(
        None,
        "The file to write; an ONNX model's name must end in .onnx. By default beside the "
        "model: model.onnx or model.torchscript.pt.",
        "data",
    )
    image_size: int | None = _opt(
        None,
        "Longer image side, in pixels, the exported model takes: it becomes a constant of the "
        "graph. By default the size the model was trained at.",
        "model",
        low=32,
        high=4096,
    )
    int8: bool = _opt(
        False,
        "With --format onnx: write a statically quantized int8 model (ONNX Runtime's quantization; "
        "by default model.int8.onnx), faster on a CPU, calibrated on the session's eval images or "
        "on --calibration_images. Check its AP against the fp32 model with drip evaluate.",
        "model",
    )
    calibration_images: str | None = _opt(
        None,
        "With --int8: a folder of images like the ones the model will see, to calibrate the int8 "
        "ranges on (at most 64 are used). By default the eval split of the model's session.",
        "data",
    )
