#!/usr/bin/env python3
"""D-FINE-N and RT-DETRv2-S (transformers) against Faster R-CNN MobileNetV3-FPN: speed, one run.

    .venv/bin/python bench/detectors.py            # 640 px, 8 timed images / 4 timed steps each
    .venv/bin/python bench/detectors.py --quick    # 320 px, 2 of each: checks the script works
    .venv/bin/python bench/detectors.py --device cuda   # on a GPU: PyTorch with AMP (no ONNX)

For each network, built as Drip builds it (random weights: speed does not depend on them, and
nothing is downloaded), on synthetic scenes at ``--image_size`` (640, Drip's default):

* inference, PyTorch: ``drip.detectors.forward_batch`` one image at a time in evaluation mode,
  as ``drip infer --batch_size 1`` runs it;
* inference, ONNX Runtime: the model exported by ``drip export`` (opset 17, post-processing in
  the graph), run by ``drip.deploy.onnx_infer.predict`` as ``drip infer --model x.onnx`` runs it;
* training: images/s of one optimizer step (``drip.detectors.losses``, backward, AdamW over the
  family's parameter groups) at ``--batch_size`` images, as the train loop does one.

The first image or step of each is left out (allocation, lazy initialisation). Detections of a
random network are no measure of anything: only the times are reported.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, parser, report  # noqa: E402

NETWORKS = ["fasterrcnn_mobilenet_v3_large_fpn", "dfine_n", "rtdetr_v2_r18"]


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--image_size", type=int, default=640)
    p.add_argument("--images", type=int, default=8, help="timed images per runtime")
    p.add_argument("--steps", type=int, default=4, help="timed training steps")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--networks", nargs="*", default=NETWORKS)
    args = p.parse_args()
    if args.quick:
        args.image_size, args.images, args.steps = 320, 2, 2
    warnings.simplefilter("ignore")

    import numpy as np
    import torch

    from drip import detectors
    from drip.detectors import models
    from drip.deploy import onnx_infer
    from drip.deploy.export import export
    from drip.data.synthetic import CLASSES, draw_scene

    device = torch.device(args.device)
    info = machine(str(device))
    rng = np.random.default_rng(0)
    scenes = [draw_scene(rng, args.image_size, args.image_size * 3 // 4) for _ in range(max(args.images, args.batch_size) + 1)]
    images = [s[0] for s in scenes]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="drip-bench-detectors-"))
    figures: dict[str, dict[str, float]] = {}
    for network in args.networks:
        torch.manual_seed(0)
        model = models.build_model(network, len(CLASSES) + 1, "none", args.image_size).to(device)
        row = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
        amp = torch.autocast("cuda", dtype=detectors.mixed_precision(model, device)) if device.type == "cuda" else None

        # -- inference, PyTorch
        times = []
        with detectors.evaluation_mode(model, args.image_size):
            for image in images[: args.images + 1]:
                start = time.perf_counter()
                with amp or contextlib.nullcontext():
                    detectors.forward_batch(model, [image], args.image_size, device, 1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        row["torch_images_per_s"] = 1 / median(times[1:])

        # -- inference, ONNX Runtime (CPU)
        if device.type == "cpu":
            path = models.export_model(work / f"{network}.pt", model.cpu(), network, list(CLASSES), args.image_size, {})
            onnx_path = export(path, "onnx")
            session = onnx_infer.load_onnx(onnx_path)
            times = []
            for image in images[: args.images + 1]:
                start = time.perf_counter()
                onnx_infer.predict(session, image, args.image_size)
                times.append(time.perf_counter() - start)
            row["onnx_images_per_s"] = 1 / median(times[1:])

        # -- training steps
        model.to(device).train()
        detectors.set_input_size(model, args.image_size)
        optimizer = torch.optim.AdamW(
            [{"params": g["params"], "lr": 1e-4 * g["lr_scale"]} for g in detectors.param_groups(model, "adamw")]
        )
        batch = []
        for image, boxes, labels in scenes[: args.batch_size]:
            tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255).to(device)
            target = {"boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
                      "labels": torch.tensor([CLASSES.index(n) + 1 for n in labels], device=device)}
            batch.append((tensor, target))
        times = []
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            with amp or contextlib.nullcontext():
                losses = detectors.losses(model, [b[0] for b in batch], [b[1] for b in batch])
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        row["train_images_per_s"] = args.batch_size / median(times[1:])
        figures[network] = row
        del model, optimizer

    base = figures.get(NETWORKS[0], {})
    lines = [f"image size {args.image_size}, {args.images} timed images, {args.steps} timed training steps of "
             f"{args.batch_size} images; x = ratio to {NETWORKS[0]}",
             f"{'network':<36} {'params':>8} {'torch img/s':>14} {'onnx img/s':>14} {'train img/s':>14}"]
    for network, row in figures.items():
        cells = []
        for key in ("torch_images_per_s", "onnx_images_per_s", "train_images_per_s"):
            value = row.get(key)
            ratio = f" {value / base[key]:.2f}x" if value and base.get(key) and network != NETWORKS[0] else ""
            cells.append("-" if value is None else f"{value:.2f}{ratio}")
        lines.append(f"{network:<36} {row['params_m']:>7.1f}M " + " ".join(f"{c:>14}" for c in cells))
    report("detectors", info, {"image_size": args.image_size, "figures": figures}, lines, args.json)


if __name__ == "__main__":
    main()
