"""``drip export``: a Drip model file as a self-describing ONNX or TorchScript model.

Reads  a Drip model file (``--model``, else ``<session_folder>/dl/model.pt``).
Writes ``--output`` (by default beside the model: ``model.onnx`` or ``model.torchscript.pt``),
       atomically: a failed export leaves no half-written file.

What the exported model takes and gives, in both formats:

* in: one RGB image as a float32 ``3 x H x W`` array in 0..1, already resized so that its longer
  side is the model's image size, exactly as ``drip infer`` resizes it
  (``drip.data.detections.resize_for_model``: Pillow, bilinear). H and W are free (ONNX: dynamic axes).
  The detector's own transform (normalisation with the ImageNet mean and deviation, and a
  resize that keeps that size) is inside the graph.
* out: ``boxes`` (N x 4, ``[xmin, ymin, xmax, ymax]`` in pixels of that input), ``labels``
  (N, class ids, 1 = the first class name) and ``scores`` (N), best first, every score at or
  above ``SCORE_FLOOR`` (0.001, not torchvision's 0.05, so that ``--threshold`` and COCO
  scoring see the detections they need). ONNX names its outputs; their order is the network
  family's (``drip.output_names`` in the metadata). A TorchScript module returns torchvision's
  scripted ``(losses, detections)`` pair: ``detections[0]`` is the dict.

The model describes itself, so an ONNX file is all ``drip infer`` (or any ONNX Runtime user)
needs: ONNX ``metadata_props`` (``drip.classes``, ``drip.image_size``, ... each value JSON;
``onnxruntime.InferenceSession(...).get_modelmeta().custom_metadata_map``), or the ``drip.json``
extra file of a TorchScript archive (``torch.jit.load(path, _extra_files={"drip.json": ""})``),
hold the class names, the image size, the score floor, the network, the input layout and the
versions it was made with.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import detectors
from ..detectors.models import LoadedModel, load_model
from ..errors import ConfigError, ModelError

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
ONNX_FORMAT = "drip-onnx"  # the metadata's drip.format, checked by drip.deploy.onnx_infer
EXPORT_VERSION = 1
# The legacy (TorchScript-based) exporter: the torch.export-based one cannot trace torchvision's
# detectors (data-dependent shapes in the RPN and the box post-processing). 17 is the newest
# opset it writes that every ONNX Runtime from 1.12 on runs; torchvision needs at least 11.
OPSET = 17
# torchvision's detectors drop detections under 0.05; the exported graph keeps everything from
# 0.001 (what COCO scoring uses, drip.evaluation.metrics.EVAL_SCORE_FLOOR). Lowering the floor never
# changes the detections above it: NMS and the best-100 cut only ever drop a box for a
# better-scoring one.
SCORE_FLOOR = 0.001
INPUT_LAYOUT = (
    "one RGB image: float32 3xHxW in 0..1, longer side image_size (resize before the model, "
    "bilinear); the normalisation is inside the model"
)


def default_output(model_path: Path, fmt: str, int8: bool = False) -> Path:
    """Where ``drip export`` writes by default: beside the model file, the format's suffix
    (``model.int8.onnx`` with ``--int8``)."""
    model_path = Path(model_path)
    suffix = ".int8.onnx" if int8 else SUFFIXES[fmt]
    return model_path.with_name(model_path.name.removesuffix(model_path.suffix) + suffix)


def export(
    model_path: Path,
    fmt: str = "onnx",
    output: Path | None = None,
    image_size: int | None = None,
    int8: bool = False,
    calibration_images: str | None = None,
) -> Path:
    """Write the Drip model file ``model_path`` as ``fmt`` to ``output``; return the path written.

    ``int8`` (ONNX only) writes the statically quantized model instead (``drip.deploy.quantize``),
    calibrated on ``calibration_images`` (a folder) or the model's session's eval images."""
    fmt = str(fmt).strip().lower()
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: not a format Drip exports; use one of {', '.join(FORMATS)}")
    if int8 and fmt != "onnx":
        raise ConfigError(f"--int8 applies to --format onnx (ONNX Runtime's quantization), not {fmt}; drop --int8")
    model_path = Path(model_path)
    output = Path(output) if output is not None else default_output(model_path, fmt, int8)
    if fmt == "onnx" and output.suffix.lower() != ".onnx":
        raise ConfigError(
            f"--output {output}: an ONNX model's name must end in .onnx (drip infer tells "
            "ONNX models by it); rename it"
        )
    if output.exists() and output.resolve() == model_path.resolve():
        raise ConfigError(f"--output {output} is the model file itself; pick another name")
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give the file name to write")
    loaded = load_model(model_path, "cpu")
    size = int(image_size or loaded.image_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    with _atomic(output) as tmp:
        if int8:
            from .quantize import calibration_images as read_calibration
            from .quantize import quantize

            images = read_calibration(model_path, calibration_images, size)
            fp32 = output.with_name(f".{output.name}.fp32-{os.getpid()}.onnx")  # only the quantized model is kept
            try:
                _export_onnx(loaded, size, fp32, model_path)
                quantize(fp32, tmp, images, detectors.family(loaded.network).int8_body)
            finally:
                fp32.unlink(missing_ok=True)
        elif fmt == "onnx":
            _export_onnx(loaded, size, tmp, model_path)
        else:
            _export_torchscript(loaded, size, tmp, model_path)
    return output


def description(loaded: LoadedModel, image_size: int, output_names: list[str]) -> dict[str, Any]:
    """What an exported model says about itself, as plain JSON-able values."""
    from .. import __version__
    from ..data.tiling import trained_tiling

    tile_size, tile_overlap = trained_tiling(loaded.meta)
    return {
        "format": ONNX_FORMAT,
        "format_version": EXPORT_VERSION,
        "network": loaded.network,
        "classes": list(loaded.classes),
        "image_size": int(image_size),
        # A model trained on tiles is sliced by default at inference, exported or not.
        "tile_size": tile_size,
        "tile_overlap": tile_overlap,
        "score_floor": SCORE_FLOOR,
        "input": INPUT_LAYOUT,
        "output_names": list(output_names),
        "step": loaded.meta.get("step"),
        "versions": {
            **dict(loaded.meta.get("versions") or {}),
            "drip_export": __version__,
            "torch_export": str(torch.__version__),
        },
    }


# -- ONNX -------------------------------------------------------------------------------------
def _export_onnx(loaded: LoadedModel, size: int, path: Path, source: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise ModelError(
            "--format onnx needs the onnx package to write the model's metadata; "
            "pip install onnx (it is in Drip's requirements.txt)"
        ) from None
    model = loaded.model
    example = _example_input(size)
    with _exporting(model, size), detectors.onnx_export(model) as traced:
        with torch.inference_mode():
            output_names = list(traced([example])[0])
        axes = {"image": {1: "height", 2: "width"}, **{name: {0: "detections"} for name in output_names}}
        try:
            torch.onnx.export(
                traced,
                ([example],),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=["image"],
                output_names=output_names,
                dynamic_axes=axes,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter fails in many types
            raise ModelError(
                f"--model {source}: ONNX export of {loaded.network} failed ({_first_line(exc)}); "
                "try --format torchscript, or report it with the torch version"
            ) from None
    proto = onnx.load(str(path))
    meta = description(loaded, size, output_names)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key = f"drip.{key}"
        entry.value = json.dumps(value)  # every value JSON, strings too: one rule to read them
    proto.doc_string = (
        f"{loaded.network} exported by Drip: {len(loaded.classes)} classes, image size {size}. "
        f"Input: {INPUT_LAYOUT}."
    )
    onnx.save(proto, str(path))


def _example_input(size: int) -> torch.Tensor:
    """A 4:3 landscape image of the model's size: any shape works later (dynamic axes)."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(3, max(1, round(size * 3 / 4)), size, generator=generator)


# -- TorchScript ------------------------------------------------------------------------------
def _export_torchscript(loaded: LoadedModel, size: int, path: Path, source: Path) -> None:
    model = loaded.model
    with _exporting(model, size):
        with torch.inference_mode():
            output_names = list(model([_example_input(size)])[0])
        try:
            # Scripting copies the attributes, so the lowered score floor stays in the module.
            scripted = torch.jit.script(model)
        except Exception as exc:  # noqa: BLE001 - TorchScript's compiler fails in many types
            raise ModelError(
                f"--model {source}: TorchScript cannot compile {loaded.network} "
                f"({_first_line(exc)}); use --format onnx"
            ) from None
        meta = description(loaded, size, output_names)
        meta["format"] = "drip-torchscript"
        # PyTorch 2.14 marks TorchScript deprecated (FutureWarning) but still runs it; ONNX is
        # the format Drip itself reads back.
        torch.jit.save(scripted, str(path), _extra_files={"drip.json": json.dumps(meta)})


# -- plumbing ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _exporting(model: torch.nn.Module, size: int):
    """``model`` in eval mode at ``size`` with the export's score floor, the exporters quiet.

    The legacy exporter and the tracer warn about every Python value they bake into the graph;
    for these models those are the sizes and thresholds meant to be constants.
    """
    with detectors.evaluation_mode(model, image_size=size, score_floor=SCORE_FLOOR), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _atomic(path: Path):
    """A temporary name beside ``path``, renamed over it only when the block succeeds."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
