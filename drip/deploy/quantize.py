"""``drip export --format onnx --int8``: a statically quantized ONNX model for the CPU.

ONNX Runtime's own quantizer (``onnxruntime.quantization.quantize_static``) rewrites the fp32
model that ``drip.deploy.export`` writes: the weights of every convolution and matrix product
become int8 (per output channel), and their inputs are quantized with ranges calibrated by
running the fp32 model on real images, the session's eval images unless ``--calibration_images``
names a folder. Only ``Conv``, ``MatMul`` and ``Gemm`` are quantized: the post-processing (box
decoding, NMS, score thresholds) stays in float, so a box is never rounded to a step of int8.
The format is QDQ (QuantizeLinear/DequantizeLinear pairs around each quantized operator), which
ONNX Runtime fuses into int8 kernels on the CPU; activations are uint8 and weights int8, its
recommended pairing for x86.

The quantized model keeps the fp32 model's metadata (classes, image size, ...), with
``drip.int8`` added, so ``drip infer --model model.int8.onnx`` runs it like any exported model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import ConfigError, ModelError

QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]
# Inside a family's int8 body (``Family.int8_body``) the operators between the convolutions too:
# otherwise every activation dequantizes and quantizes again, which cost more than int8 saved
# (YOLOX-Nano at 640 px: 73 ms against fp32's 59, 30 ms with its body in int8).
BODY_OPS = ["Conv", "MatMul", "Gemm", "Sigmoid", "Mul", "Add", "Concat", "MaxPool", "Resize", "Relu"]
CALIBRATION_IMAGES = 64  # at most this many images calibrate the activation ranges
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def quantize(fp32: Path, output: Path, calibration: Iterable[np.ndarray], body: tuple[str, ...] = ()) -> None:
    """Write ``output``, the int8 version of the ONNX model ``fp32``, calibrated on ``calibration``
    (float32 3xHxW images in 0..1, resized as the model takes them). ``body``: the node-name
    prefixes whose every operator may run in int8 (``Family.int8_body``)."""
    import onnx

    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    except ImportError:
        raise ModelError("--int8 needs onnxruntime's quantization tools; pip install -r requirements.txt") from None

    images = list(calibration)
    if not images:
        raise ConfigError("--int8: no calibration images; give --calibration_images DIR (a folder of images)")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._items: Iterator[dict[str, np.ndarray]] = iter([{"image": image} for image in images])

        def get_next(self):
            return next(self._items, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice to the root logger ("consider pre-processing")
    which = {"op_types_to_quantize": QUANTIZED_OPS}
    if body:
        nodes = [n.name for n in onnx.load(str(fp32)).graph.node if n.name.startswith(body) and n.op_type in BODY_OPS]
        which = {"op_types_to_quantize": BODY_OPS, "nodes_to_quantize": nodes}
    try:
        quantize_static(
            str(fp32), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **which,
        )
    except Exception as exc:  # noqa: BLE001 - the quantizer fails in many types
        text = str(exc).strip().splitlines()
        raise ModelError(
            f"--int8: ONNX Runtime cannot quantize this model ({text[0] if text else type(exc).__name__}); "
            "export without --int8"
        ) from None
    finally:
        root.setLevel(level)
    source, quantized = onnx.load(str(fp32)), onnx.load(str(output))
    del quantized.metadata_props[:]
    for entry in source.metadata_props:
        quantized.metadata_props.add(key=entry.key, value=entry.value)
    quantized.metadata_props.add(key="drip.int8", value=json.dumps(True))
    quantized.doc_string = source.doc_string + " Quantized to int8 (static, QDQ)."
    onnx.save(quantized, str(output))


def calibration_images(model_path: Path, folder: str | None, image_size: int) -> list[np.ndarray]:
    """Up to ``CALIBRATION_IMAGES`` images at the model's size: from ``folder``, else the eval split
    of the session the model file belongs to (``<session>/dl/model.pt``)."""
    from PIL import Image

    from ..data.detections import resize_for_model

    if folder is not None:
        root = Path(folder)
        if not root.is_dir():
            raise ConfigError(f"--calibration_images {root}: no such folder; give a folder of images")
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:CALIBRATION_IMAGES]
        if not paths:
            raise ConfigError(f"--calibration_images {root}: no images in it ({', '.join(IMAGE_SUFFIXES)})")
        arrays = []
        for path in paths:
            with Image.open(path) as image:
                array, _ = resize_for_model(image.convert("RGB"), image_size)
            arrays.append(_chw(array))
        return arrays
    return _session_images(Path(model_path), image_size)


def _session_images(model_path: Path, image_size: int) -> list[np.ndarray]:
    from ..data.records import RecordDataset, read_eval_records
    from ..session import Session

    session = Session(model_path.resolve().parent.parent)
    shards = read_eval_records(session) if (session.records_dir / "records.json").is_file() else []
    if not shards:
        raise ConfigError(
            f"--int8: {model_path} is not in a session with an eval split to calibrate on; "
            "give --calibration_images DIR (a folder of images like the ones the model will see)"
        )
    dataset = RecordDataset(shards, image_size, train=False)
    try:
        count = min(len(dataset), CALIBRATION_IMAGES)
        return [dataset[i][0].numpy().astype(np.float32) for i in range(count)]
    finally:
        dataset.close()


def _chw(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)
