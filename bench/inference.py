#!/usr/bin/env python3
"""Inference throughput: Drip's infer against a plain torchvision loop, batching, ONNX Runtime.

    .venv/bin/python bench/inference.py             # 40 images of 640x480
    .venv/bin/python bench/inference.py --quick     # 8 images: checks the script works

One model (``--network``, random weights: no download; the speed of a detector does not depend
on what it learnt, except through how many boxes reach NMS, the same for every side here), one
folder of synthetic 640x480 JPEGs, and in one run:

* plain: the loop a user writes from the torchvision docs: open each image, ``to_tensor``,
  ``model([x])`` under ``torch.no_grad()`` (the detector's own transform resizes it), one JSON
  of the detections per image;
* drip b1 / drip bN: ``drip infer`` (``drip.stages.infer.run_loaded``) at batch 1 and batch N:
  Pillow resize before the model, ``torch.inference_mode()``, one JSON and one drawn JPEG per
  image, the group's detections.json;
* drip onnx: ``drip infer --model model.onnx`` (``drip.deploy.onnx_infer``), the same files written;
* forward only, PyTorch vs ONNX Runtime: the model alone on images decoded beforehand, batch 1,
  both on the CPU with the same number of threads (``--threads``, default: the cores).

Prints images/s and the ratios. Drip's end-to-end figures include writing a drawn JPEG per
image, which the plain loop does not do.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, cores, machine, parser, report  # noqa: E402


def plain_loop(model, paths: list[Path], out: Path, device, threshold: float) -> float:
    """Seconds for the torchvision-docs loop over ``paths``."""
    import torch
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    with Timer() as t, torch.no_grad():
        for path in paths:
            image = Image.open(path).convert("RGB")
            prediction = model([to_tensor(image).to(device)])[0]
            detections = [
                {"box": box.tolist(), "score": score.item(), "label": label.item()}
                for box, score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"])
                if score.item() >= threshold
            ]
            (out / f"{path.stem}.json").write_text(json.dumps({"image": path.name, "detections": detections}))
    return t.seconds


def drip_infer(loaded, model_path: Path, images: Path, out: Path, batch: int, device: str, threshold: float) -> float:
    from drip.config import InferConfig
    from drip.stages import infer

    config = InferConfig().updated(
        {"images_path": str(images), "results_path": str(out), "batch_size": batch, "device": device,
         "threshold": threshold},
        "bench",
    )
    with _quiet():
        return infer.run_loaded(config, loaded, model_path, device).seconds


def drip_onnx(onnx_path: Path, images: Path, out: Path, threads: int, threshold: float) -> float:
    from drip.deploy import onnx_infer
    from drip.config import InferConfig

    config = InferConfig().updated(
        {"images_path": str(images), "results_path": str(out), "model": str(onnx_path), "device": "cpu",
         "threshold": threshold},
        "bench",
    )
    original = onnx_infer.load_onnx
    onnx_infer.load_onnx = functools.partial(original, threads=threads)
    try:
        with _quiet():
            return onnx_infer.run(config, out).seconds
    finally:
        onnx_infer.load_onnx = original


def forward_only(loaded_cpu, onnx_model, pil_images, size: int) -> tuple[float, float]:
    """Seconds of PyTorch and of ONNX Runtime for the model alone, batch 1, on the CPU."""
    import torch

    from drip.deploy import onnx_infer
    from drip.evaluation.metrics import evaluation_mode
    from drip.deploy.export import SCORE_FLOOR
    from drip.detectors import forward_batch

    # The exported graph keeps every detection from SCORE_FLOOR: give PyTorch the same floor.
    with evaluation_mode(loaded_cpu.model, image_size=size, score_floor=SCORE_FLOOR):
        with Timer() as torch_t:
            for image in pil_images:
                forward_batch(loaded_cpu.model, [image], size, torch.device("cpu"), 1)
    with Timer() as onnx_t:
        for image in pil_images:
            onnx_infer.predict(onnx_model, image, size)
    return torch_t.seconds, onnx_t.seconds


def _quiet():
    """Drip's progress bars and messages off while timing (stderr, not part of the work)."""
    return contextlib.redirect_stderr(io.StringIO())


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--network", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    p.add_argument("--image_size", type=int, default=320)
    p.add_argument("--images", type=int, default=None, help="images (default 40, quick 8)")
    p.add_argument("--batch_size", type=int, default=None, help="drip's batched run (default 4 on CPU, 16 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and ONNX Runtime (default: the cores)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args()

    import torch
    from PIL import Image

    from drip.detectors import models
    from drip.deploy import onnx_infer
    from drip.deploy.export import export
    from drip.data.synthetic import CLASSES, make_dataset

    threads = args.threads or cores()
    torch.set_num_threads(threads)
    device = models.resolve_device(args.device)
    n = args.images or (8 if args.quick else 40)
    batch = args.batch_size or (16 if device.type == "cuda" else 4)
    threshold = 60.0
    info = machine(str(device))
    info["threads"] = threads
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="drip-bench-infer-"))
    try:
        images = workdir / "images"
        annotations = make_dataset(images, n, size=(640, 480), folders=("cam",), seed=0)
        paths = [images / a.file for a in annotations]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = models.build_model(args.network, len(CLASSES) + 1, "none", args.image_size)
        model_path = workdir / "model.pt"
        models.export_model(model_path, model, args.network, list(CLASSES), args.image_size, {}, {})
        loaded = models.load_model(model_path, device)
        onnx_path = export(model_path, "onnx")

        # Warm-up: the first images pay for allocations and (on a GPU) kernel selection.
        warm = workdir / "warm"
        warm_images = workdir / "warm_images"
        make_dataset(warm_images, 2, size=(640, 480), folders=("cam",), seed=1)
        plain_loop(loaded.model, sorted((warm_images / "cam").iterdir()), warm / "p", device, threshold / 100)
        drip_infer(loaded, model_path, warm_images, warm / "d", batch, str(device.type), threshold)

        # loaded.model's transform is at image_size: the plain loop's detector resizes to it too.
        plain_s = plain_loop(loaded.model, paths, workdir / "out_plain", device, threshold / 100)
        drip1_s = drip_infer(loaded, model_path, images, workdir / "out_b1", 1, str(device.type), threshold)
        dripn_s = drip_infer(loaded, model_path, images, workdir / f"out_b{batch}", batch, str(device.type), threshold)
        onnx_s = drip_onnx(onnx_path, images, workdir / "out_onnx", threads, threshold)

        loaded_cpu = models.load_model(model_path, "cpu")
        onnx_model = onnx_infer.load_onnx(onnx_path, threads=threads)
        decoded = [Image.open(p).convert("RGB") for p in paths]
        forward_only(loaded_cpu, onnx_model, decoded[:2], args.image_size)  # warm-up
        torch_fwd_s, onnx_fwd_s = forward_only(loaded_cpu, onnx_model, decoded, args.image_size)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    rate = lambda seconds: n / seconds  # noqa: E731
    figures = {
        "network": args.network,
        "image_size": args.image_size,
        "images": n,
        "batch_size": batch,
        "images_per_s": {
            "plain_b1": round(rate(plain_s), 2),
            "drip_b1": round(rate(drip1_s), 2),
            f"drip_b{batch}": round(rate(dripn_s), 2),
            "drip_onnx": round(rate(onnx_s), 2),
            "forward_torch_cpu": round(rate(torch_fwd_s), 2),
            "forward_onnxruntime_cpu": round(rate(onnx_fwd_s), 2),
        },
        "ratios": {
            "drip_b1_vs_plain": round(plain_s / drip1_s, 3),
            f"drip_b{batch}_vs_plain": round(plain_s / dripn_s, 3),
            "drip_onnx_vs_drip_b1": round(drip1_s / onnx_s, 3),
            "onnxruntime_vs_torch_forward": round(torch_fwd_s / onnx_fwd_s, 3),
        },
    }
    rows = [
        ("plain torchvision loop, batch 1", plain_s, ""),
        ("drip infer, batch 1", drip1_s, f"{plain_s / drip1_s:.2f}x plain"),
        (f"drip infer, batch {batch}", dripn_s, f"{plain_s / dripn_s:.2f}x plain"),
        ("drip infer, ONNX Runtime (CPU)", onnx_s, f"{drip1_s / onnx_s:.2f}x drip batch 1"),
        (f"forward only, PyTorch, {threads} threads", torch_fwd_s, ""),
        (f"forward only, ONNX Runtime, {threads} threads", onnx_fwd_s, f"{torch_fwd_s / onnx_fwd_s:.2f}x PyTorch"),
    ]
    lines = [
        f"model: {args.network} at {args.image_size} px (random weights), {n} JPEGs of 640x480, "
        f"device {device}, {threads} CPU threads"
    ] + [f"{label + ':':<44}{rate(seconds):8.2f} images/s  {note}".rstrip() for label, seconds, note in rows]
    report("inference", info, figures, lines, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
