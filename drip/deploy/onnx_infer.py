"""``drip infer --model model.onnx``: run a model made by ``drip export`` with ONNX Runtime.

No PyTorch: this module, and everything it imports, needs only NumPy, Pillow and ONNX Runtime,
so a machine that only runs models does not install PyTorch (``drip.cli`` sends ``.onnx``
models here before anything imports it). Scoring against annotations (``--src_json_path``) is
the exception: it is ``drip.evaluation.metrics``'s, which uses PyTorch.

Reads  the ``.onnx`` file (its metadata names the classes, image size and score floor; see
       ``drip.deploy.export``) and every image under ``--images_path``.
Writes the same files as ``drip.stages.infer``, through the same code (``drip.evaluation.results``): each
       image is resized the same way before the model and its detections are scaled back,
       filtered and recorded the same way, so the two runtimes' results differ only by the
       numerical differences of the runtimes (``tests/test_export.py`` states the tolerance).

The graph takes one image at a time (torchvision's detectors take a list of differently sized
images, which ONNX cannot express); ONNX Runtime spreads each image over the cores instead.
``--device`` must be ``auto`` or ``cpu``: this runs on ONNX Runtime's CPU provider.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..config import InferConfig
from ..console import info, warn
from ..data.detections import resize_for_model, scale_boxes_np, to_detections_np
from ..data.tiling import predict_sliced, resolve_slicing
from ..errors import ConfigError, ModelError
from ..evaluation.results import (
    COCO_RESULTS,
    METRICS,
    ImageJob,
    InferResult,
    find_images,
    resolve_model_path,
    run_groups,
    summary,
    trash_earlier_results,
)

ONNX_FORMAT = "drip-onnx"  # drip.deploy.export.ONNX_FORMAT; not imported from there: it imports torch


def is_onnx_model(model: str | Path | None) -> bool:
    """Whether ``--model`` names an ONNX file (by its suffix, as ``drip export`` names them)."""
    return model is not None and str(model).lower().endswith(".onnx")


@dataclass
class OnnxModel:
    """An ONNX Runtime session of a Drip export and what its metadata says."""

    session: Any  # onnxruntime.InferenceSession
    classes: list[str]
    image_size: int
    network: str | None
    score_floor: float
    input_name: str
    output_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """One float32 3xHxW image in 0..1 -> {"boxes", "labels", "scores"} in its pixels."""
        outputs = self.session.run(self.output_names, {self.input_name: image})
        return dict(zip(self.output_names, outputs))


def load_onnx(path: Path, threads: int | None = None) -> OnnxModel:
    """An ONNX Runtime CPU session of ``path``; ``threads`` sets its intra-op threads (default: the cores)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError(
            f"--model {path}: running an ONNX model needs ONNX Runtime; pip install onnxruntime"
        ) from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime reports bad files in its own types
        text = str(exc).strip().splitlines()
        raise ModelError(
            f"--model {path}: ONNX Runtime cannot load it ({text[0] if text else type(exc).__name__}); "
            "export it again with drip export"
        ) from None
    props = session.get_modelmeta().custom_metadata_map
    if props.get("drip.format") != json.dumps(ONNX_FORMAT):
        raise ModelError(
            f"--model {path}: an ONNX model not made by drip export (it lacks Drip's metadata: "
            "class names, image size); export the Drip model file with drip export --format onnx"
        )
    try:
        meta = {key.removeprefix("drip."): json.loads(value) for key, value in props.items() if key.startswith("drip.")}
        classes = [str(name) for name in meta["classes"]]
        image_size = int(meta["image_size"])
        score_floor = float(meta.get("score_floor", 0.0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"--model {path}: damaged Drip metadata ({exc}); export it again") from None
    outputs = [o.name for o in session.get_outputs()]
    if sorted(outputs) != ["boxes", "labels", "scores"]:
        raise ModelError(f"--model {path}: outputs {outputs} are not boxes, labels and scores; export it again")
    return OnnxModel(
        session, classes, image_size, meta.get("network"), score_floor,
        session.get_inputs()[0].name, outputs, meta,
    )


def predict(model: OnnxModel, image: Image.Image, size: int) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """``model``'s raw output for ``image`` resized as ``drip infer`` resizes it, and that size."""
    array, shape = resize_for_model(image, size)
    # The same arithmetic as the PyTorch path: uint8 -> float32, then divided by 255 in float32.
    tensor = np.ascontiguousarray(array.transpose(2, 0, 1)).astype(np.float32) / np.float32(255)
    return model(tensor), shape


def run(config: InferConfig, session_folder: Path) -> InferResult:
    """``drip.stages.infer.run`` for an ONNX model: the same inputs, the same files written."""
    started = time.perf_counter()
    if config.device == "cuda":
        raise ConfigError(
            "--device cuda: ONNX models run on ONNX Runtime's CPU provider; use --device cpu or "
            "auto, or the model.pt file for the GPU"
        )
    model_path = resolve_model_path(config.model, Path(session_folder))
    images_path, results_path = Path(config.images_path), Path(config.results_path)
    # Find the images before loading the model: a typo in --images_path should fail in a blink.
    groups = find_images(images_path, results_path)
    scoring = _scoring(config) if config.src_json_path else None
    model = load_onnx(model_path)
    size = int(config.image_size or model.image_size)
    if config.image_size and config.image_size != model.image_size:
        # The size is also a constant inside the graph (the detector's transform resizes to it).
        raise ConfigError(
            f"--image_size {config.image_size}: {model_path} was exported at {model.image_size}; "
            f"leave --image_size out, or export again with --image_size {config.image_size}"
        )
    if config.threshold / 100.0 < model.score_floor:
        warn(
            f"--threshold {config.threshold:g}: the model keeps detections from "
            f"{model.score_floor * 100:g}% only; lower ones are not in its output"
        )
    names = model.classes
    if scoring is not None:
        scoring = scoring(names)
    slicing = resolve_slicing(config.tile_size, config.tile_overlap, config.tile_full_pass, model.meta)

    def detect(images: Sequence[Image.Image]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Each image's detections in its own pixels (the graph takes one image at a time)."""
        found = []
        for image in images:
            output, shape = predict(model, image, size)
            boxes, scores, labels = _in_image_pixels(output, image.size, shape)
            found.append((boxes, scores, labels))
        return found

    def predict_batch(batch: Sequence[tuple[ImageJob, Image.Image]]) -> list[list[dict[str, Any]]]:
        out = []
        for job, image in batch:
            if slicing is not None:
                boxes, scores, labels = predict_sliced(
                    image, slicing.tile, slicing.overlap, detect, config.batch_size, slicing.full_pass
                )
            else:
                boxes, scores, labels = detect([image])[0]
            if scoring is not None and scoring.wants(job.rel):
                scoring.add(job.rel, image.size, _image_detections(job.rel, boxes, scores, labels))
            out.append(
                to_detections_np(
                    boxes, scores, labels, size=image.size, resized=image.size, threshold=config.threshold, names=names,
                )
            )
        return out

    trash_earlier_results(results_path, list(groups) + [METRICS, COCO_RESULTS])
    index = {
        "images_path": str(images_path),
        "model": str(model_path),
        "network": model.network,
        "classes": names,
        "threshold": config.threshold,
        "image_size": size,
        "tiling": slicing.to_json() if slicing else None,
    }
    out_dirs, n_images, n_detections, n_failed = run_groups(
        groups, results_path, 1 if slicing else config.batch_size, predict_batch, index
    )
    metrics = None
    if scoring is not None:
        from ..evaluation.metrics import write_scores

        metrics = write_scores(scoring, results_path, config, model_path, model, size)
    seconds = time.perf_counter() - started
    info(summary(n_images, n_detections, seconds, results_path, len(out_dirs), n_failed))
    return InferResult(
        groups=out_dirs, images=n_images, detections=n_detections, seconds=seconds, failed=n_failed, metrics=metrics
    )


# -- scoring (needs PyTorch, through drip.evaluation.metrics) --------------------------------------------
def _scoring(config: InferConfig):
    """Read the annotations now (a bad file fails before the model loads); a Scoring maker."""
    from ..data.annotations import load_for_scoring

    annotations = load_for_scoring(Path(config.src_json_path), Path(config.images_path))
    try:
        from ..evaluation.metrics import Scoring
    except ImportError as exc:
        raise ModelError(
            f"--src_json_path with an ONNX model: scoring uses Drip's evaluator, which needs "
            f"PyTorch ({exc.name} is missing); run without --src_json_path, or with the model.pt"
        ) from None
    return lambda names: Scoring(annotations, names, str(config.src_json_path))


def _in_image_pixels(output: dict[str, np.ndarray], size: tuple[int, int], shape: tuple[int, int]):
    """The graph's output for the ``shape`` input -> (boxes, scores, labels) in pixels of the
    ``size`` image, boxes with nothing left inside it dropped (as ``drip.evaluation.metrics`` does)."""
    boxes = scale_boxes_np(output["boxes"], size, shape)
    scores = np.asarray(output["scores"], dtype=np.float32).reshape(-1)
    labels = np.asarray(output["labels"]).reshape(-1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], scores[keep], labels[keep]


def _image_detections(rel: str, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray):
    """``drip.evaluation.metrics.ImageDetections`` of detections already in the image's pixels."""
    from ..evaluation.metrics import ImageDetections

    return ImageDetections(rel, boxes, scores, labels)
