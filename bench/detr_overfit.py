#!/usr/bin/env python3
"""The DETR families learn what the labels say: each overfits a few images, without downloads.

    .venv/bin/python bench/detr_overfit.py                      # every DETR family's smallest size
    .venv/bin/python bench/detr_overfit.py --networks dfine_n --steps 300 --frozen_norms   # and the pre-fix build
    .venv/bin/python bench/detr_overfit.py --quick              # 10 steps: checks the script works
    .venv/bin/python bench/detr_overfit.py --networks --pretrain dfine_n rtdetr_v2_r18   # pretrained vs scratch only

Each network is built as Drip builds it (``--weights none``: nothing is downloaded) and trained
through Drip's own pieces (``drip.detectors.losses``, the family's parameter groups and learning
rate, AdamW, gradient clipping at the family's 0.1) on the same ``--images`` synthetic scenes
(``drip.data.synthetic``, shapes of three classes) at ``--image_size``, all of them every step;
then it predicts those images (``drip.detectors.forward_batch``) and pycocotools scores them
(``drip.evaluation.metrics.coco_metrics``). A wrong conversion (labels off by one, width and
height swapped) caps AP50 near zero however long it trains; a DETR that learns its own training
images reaches a high AP50. From scratch DETRs learn slowly: this is a floor for "learns", not a
measure of how well.

``--pretrain NETWORKS``: what a user with COCO weights relies on, without COCO. Each network is
pretrained on ``--pretrain_images`` scenes of circles, squares and triangles and written as a
Drip model file (``export_model``); then two runs fine-tune on ``--finetune_images`` scenes of
other classes (two, named ``disc`` and ``wedge``, drawn as circles and triangles), for the same
``--finetune_steps``: one from that file, loaded as ``--network FILE`` loads it (the class head
starts fresh: the names differ), one from scratch. Both are scored on 40 held-out scenes of the
new classes.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, parser, report  # noqa: E402

NETWORKS = ["dfine_n", "rtdetr_v2_r18", "deimv2_pico", "rfdetr_n", "lwdetr_t"]


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="*", default=NETWORKS)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None, help="default: the family's rate for a batch of --images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frozen_norms", action="store_true",
                   help="also train each network with its backbone's batch norms frozen, as Drip built it before "
                        "(transformers' default): the baseline of the fix, side by side")
    p.add_argument("--pretrain", nargs="*", default=[], help="networks to compare pretrained and scratch starts for")
    p.add_argument("--pretrain_images", type=int, default=32)
    p.add_argument("--pretrain_steps", type=int, default=400)
    p.add_argument("--finetune_images", type=int, default=8)
    p.add_argument("--finetune_steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8, help="pretraining and fine-tuning batch")
    args = p.parse_args()
    if args.quick:
        args.steps = args.pretrain_steps = args.finetune_steps = 10
    warnings.simplefilter("ignore")

    import numpy as np
    import torch
    from PIL import Image

    from drip import detectors
    from drip.data.synthetic import CLASSES, draw_scene
    from drip.detectors import hf, models
    from drip.evaluation.metrics import ImageTruth, coco_metrics, predict

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    def scenes(n: int, classes=CLASSES, names=None):
        """n scenes at 160x120: their tensors, targets (labels 1-based in ``names``) and truths."""
        names = names or classes
        drawn = [draw_scene(rng, 160, 120, classes, 3, (1 / 4, 1 / 2), False) for _ in range(n)]
        arrays = [np.asarray(img.convert("RGB")) for img, _, _ in drawn]
        truths = [ImageTruth(i, 160, 120, boxes, [classes.index(label) + 1 for label in labels])
                  for i, (_, boxes, labels) in enumerate(drawn)]
        tensors = [torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(255) for a in arrays]
        targets = [{"boxes": torch.tensor(t.boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(t.labels)}
                   for t in truths]
        return {"arrays": arrays, "tensors": tensors, "targets": targets, "truths": truths, "names": list(names)}

    def train(model, name: str, data: dict, steps: int, batch: int) -> tuple[float, float]:
        """``steps`` AdamW steps on ``batch`` of the images (all of them when there are no more);
        the last loss and the seconds taken."""
        lr = args.lr or detectors.default_learning_rate(name, batch, "adamw")
        groups = [{"params": g["params"], "lr": lr * g["lr_scale"], "weight_decay": 1e-4 if g["decay"] else 0.0}
                  for g in detectors.param_groups(model, "adamw")]
        optimizer = torch.optim.AdamW(groups, lr=lr)
        clip = detectors.recipe(name).get("grad_clip", 0.0)
        order = torch.Generator().manual_seed(args.seed)
        n = len(data["tensors"])
        model.train()
        start = time.perf_counter()
        for _ in range(steps):
            pick = range(n) if batch >= n else torch.randperm(n, generator=order)[:batch].tolist()
            total = sum(detectors.losses(model, [data["tensors"][i] for i in pick],
                                         [data["targets"][i] for i in pick]).values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        return float(total), time.perf_counter() - start

    def score(model, data: dict):
        """AP on ``data``, predicted as Drip's evaluation predicts (``metrics.predict``)."""
        found = predict(model, ((i, Image.fromarray(a)) for i, a in enumerate(data["arrays"])),
                        image_size=args.image_size, batch_size=8)
        return coco_metrics(data["truths"], found, data["names"])

    def frozen(model):
        """``model`` rebuilt with its backbone's batch norms frozen at their initial statistics."""
        config = model.net.config
        hf._freeze_norms(config, trained_backbone=True)
        model.net = hf._ready(type(model.net)(config))
        return model

    rows, figures = [], {}
    few = scenes(args.images)
    runs = [(name, False) for name in args.networks]
    if args.frozen_norms:
        runs += [(name, True) for name in args.networks if hf.NETWORKS[name].kind in ("d_fine", "rt_detr_v2", "deimv2")]
    for name, freeze in runs:
        torch.manual_seed(args.seed)
        model = models.build_model(name, len(CLASSES) + 1, "none", args.image_size, classes=list(CLASSES))
        model = frozen(model) if freeze else model
        loss, seconds = train(model, name, few, args.steps, args.images)
        metrics = score(model, few)
        label = f"{name}, backbone norms frozen" if freeze else name
        figures[label] = {"AP50": metrics.AP50, "AP": metrics.AP, "steps": args.steps, "seconds": round(seconds, 1),
                          "loss_last": loss}
        rows.append(f"| `{name}`{' (norms frozen)' if freeze else ''} | {args.steps} | {metrics.AP50:.3f} | "
                    f"{metrics.AP:.3f} | {loss:.2f} | {seconds:.0f} s |")
        print(rows[-1], flush=True)
    lines = []
    if args.networks:
        lines = [f"{args.images} images at {args.image_size} px, batch {args.images}, from scratch (--weights none)",
                 "| network | steps | AP50 on its training images | AP | last loss | training time |",
                 "| --- | --- | --- | --- | --- | --- |", *rows]

    if args.pretrain:
        new_classes, new_names = ("circle", "triangle"), ("disc", "wedge")
        source = scenes(args.pretrain_images)
        tune, held_out = scenes(args.finetune_images, new_classes, new_names), scenes(40, new_classes, new_names)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.pretrain:
                model = models.build_model(name, len(CLASSES) + 1, "none", args.image_size, classes=list(CLASSES))
                _, pre_seconds = train(model, name, source, args.pretrain_steps, args.batch)
                pretrained = Path(tmp) / f"{name}.pt"
                models.export_model(pretrained, model, name, CLASSES, args.image_size, {})
                result = {}
                for start in ("pretrained", "scratch"):
                    torch.manual_seed(args.seed)
                    network = str(pretrained) if start == "pretrained" else name
                    model = models.build_model(network, len(new_names) + 1, "none", args.image_size, classes=list(new_names))
                    _, seconds = train(model, name, tune, args.finetune_steps, args.batch)
                    metrics = score(model, held_out)
                    result[start] = {"AP50": metrics.AP50, "AP": metrics.AP, "seconds": round(seconds, 1)}
                figures[f"{name} pretrained vs scratch"] = {**result, "pretrain_seconds": round(pre_seconds, 1)}
                rows.append(f"| `{name}` | {result['pretrained']['AP50']:.3f} ({result['pretrained']['AP']:.3f}) | "
                            f"{result['scratch']['AP50']:.3f} ({result['scratch']['AP']:.3f}) | {pre_seconds:.0f} s |")
                print(rows[-1], flush=True)
        lines += ["", f"pretrained on {args.pretrain_images} scenes of 3 classes for {args.pretrain_steps} steps, then "
                  f"{args.finetune_steps} steps on {args.finetune_images} scenes of 2 other classes (batch {args.batch}), "
                  "scored on 40 held-out scenes of those",
                  "| network | AP50 (AP) from the pretrained file | AP50 (AP) from scratch | pretraining time |",
                  "| --- | --- | --- | --- |", *rows]
    report("DETRs overfit a few images", machine(), {"networks": figures}, lines, args.json)


if __name__ == "__main__":
    main()
