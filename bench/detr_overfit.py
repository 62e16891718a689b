#!/usr/bin/env python3
"""The DETR families learn what the labels say: each overfits a few images, without downloads.

    .venv/bin/python bench/detr_overfit.py                      # every DETR family's smallest size
    .venv/bin/python bench/detr_overfit.py --networks dfine_n --steps 300
    .venv/bin/python bench/detr_overfit.py --quick              # 10 steps: checks the script works

Each network is built as Drip builds it (``--weights none``: nothing is downloaded) and trained
through Drip's own pieces (``drip.detectors.losses``, the family's parameter groups and learning
rate, AdamW, gradient clipping at the family's 0.1) on the same ``--images`` synthetic scenes
(``drip.data.synthetic``, shapes of three classes) at ``--image_size``, all of them every step;
then it predicts those images (``drip.detectors.forward_batch``) and pycocotools scores them
(``drip.evaluation.metrics.coco_metrics``). A wrong conversion (labels off by one, width and
height swapped) caps AP50 near zero however long it trains; a DETR that learns its own training
images reaches a high AP50. From scratch DETRs learn slowly: this is a floor for "learns", not a
measure of how well.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, parser, report  # noqa: E402

NETWORKS = ["dfine_n", "rtdetr_v2_r18", "rfdetr_n", "lwdetr_t"]


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="*", default=NETWORKS)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None, help="default: the family's rate for a batch of --images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.steps = 10
    warnings.simplefilter("ignore")

    import numpy as np
    import torch
    from PIL import Image

    from drip import detectors
    from drip.data.synthetic import CLASSES, draw_scene
    from drip.detectors import models
    from drip.evaluation.metrics import ImageDetections, ImageTruth, coco_metrics

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    scenes = [draw_scene(rng, 160, 120, CLASSES, 3, (1 / 4, 1 / 2), False) for _ in range(args.images)]
    images = [np.asarray(img.convert("RGB")) for img, _, _ in scenes]
    truths = [ImageTruth(i, 160, 120, boxes, [CLASSES.index(label) + 1 for label in labels])
              for i, (_, boxes, labels) in enumerate(scenes)]
    tensors = [torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(255) for a in images]
    targets = [{"boxes": torch.tensor(t.boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(t.labels)}
               for t in truths]

    rows, figures = [], {}
    for name in args.networks:
        model = models.build_model(name, len(CLASSES) + 1, "none", args.image_size, classes=list(CLASSES))
        lr = args.lr or detectors.default_learning_rate(name, args.images, "adamw")
        groups = [{"params": g["params"], "lr": lr * g["lr_scale"], "weight_decay": 1e-4 if g["decay"] else 0.0}
                  for g in detectors.param_groups(model, "adamw")]
        optimizer = torch.optim.AdamW(groups, lr=lr)
        clip = detectors.recipe(name).get("grad_clip", 0.0)
        model.train()
        start = time.perf_counter()
        for _ in range(args.steps):
            total = sum(detectors.losses(model, tensors, targets).values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        seconds = time.perf_counter() - start
        with detectors.evaluation_mode(model):
            outputs = detectors.forward_batch(model, [Image.fromarray(a) for a in images], args.image_size,
                                              torch.device("cpu"), len(images))
        found = []
        for i, (out, (w, h)) in enumerate(outputs):
            boxes = detectors.scale_boxes(out["boxes"], (160, 120), (w, h)).numpy()
            found.append(ImageDetections(i, boxes, detectors.numpy(out["scores"]), detectors.numpy(out["labels"])))
        metrics = coco_metrics(truths, found, CLASSES)
        figures[name] = {"AP50": metrics.AP50, "AP": metrics.AP, "steps": args.steps, "seconds": round(seconds, 1),
                         "loss_last": float(total), "lr": lr}
        rows.append(f"| `{name}` | {args.steps} | {metrics.AP50:.3f} | {metrics.AP:.3f} | {float(total):.2f} | {seconds:.0f} s |")
        print(rows[-1], flush=True)
    lines = [f"{args.images} images at {args.image_size} px, batch {args.images}, from scratch (--weights none)",
             "| network | steps | AP50 on its training images | AP | last loss | training time |",
             "| --- | --- | --- | --- | --- | --- |", *rows]
    report("DETRs overfit a few images", machine(), {"networks": figures}, lines, args.json)


if __name__ == "__main__":
    main()
