"""Does Drip's training recipe learn better than a plain torchvision loop? A CPU benchmark.

Builds a small synthetic detection set (coloured circles, squares and triangles on textured
backgrounds, several per image: ``drip.data.synthetic``), then trains the same network from scratch
for the same number of steps, batch size and image size, twice:

* **Drip**: the real pipeline (split, augment, records, configure, train) with Drip's defaults,
  exactly as ``drip train`` runs it; the model scored is the one Drip exports (``dl/model.pt``).
* **plain**: a torchvision loop written the way ``references/detection`` writes it: SGD with
  momentum 0.9 and weight decay 1e-4 on every parameter, the reference learning rate
  (0.02 for 16 images, scaled to the batch) held constant after the reference's linear warmup
  over the first epoch, random horizontal flips only, no gradient clipping, no EMA.

Both train on the same images (the plain loop reads the training half of Drip's split) and are
scored on a third set of images neither has seen, with ``drip.evaluation.metrics`` (pycocotools' COCOeval).
Drip picks its exported model by AP on its own eval split; the test set keeps that choice honest.

    .venv/bin/python bench/recipe.py            # the full run (about 20-25 min on 2 CPU cores)
    .venv/bin/python bench/recipe.py --quick    # a smoke test of the script (a few minutes)

``--set key=value`` passes any Drip config field to the Drip run (e.g. ``--set ema=false``) to
measure what one part of the recipe contributes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

from drip.detectors import models  # noqa: E402
from drip.runtime import local  # noqa: E402
from drip.data.annotations import load_annotations  # noqa: E402
from drip.evaluation.metrics import ImageTruth, coco_metrics, predict  # noqa: E402
from drip.parallel import cores  # noqa: E402
from drip.session import Session  # noqa: E402
from drip.data.synthetic import CLASSES, make_dataset, write_drip_json  # noqa: E402

NETWORK = "fasterrcnn_mobilenet_v3_large_320_fpn"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps of each run")
    parser.add_argument("--train-images", type=int, default=200, help="training images (Drip adds its augmented copies)")
    parser.add_argument("--eval-images", type=int, default=50, help="Drip's eval split (model selection)")
    parser.add_argument("--test-images", type=int, default=100, help="held-out images both models are scored on")
    parser.add_argument("--image-size", type=int, default=160, help="longer image side in pixels (the images are 160x120)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--roi-samples", type=int, default=128,
                        help="RoIs sampled per image for the box head, in both runs: torchvision's 512 makes a CPU "
                             "step about 3x slower (RoIAlign backward) and changes little with a few objects an image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--workdir", type=Path, default=None, help="where data and sessions go (default: a temp folder)")
    parser.add_argument("--only", choices=("both", "drip", "plain"), default="both")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a Drip config value for the Drip run (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="a few steps on a few images: checks the script works")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.train_images, args.eval_images, args.test_images = 30, 24, 8, 8

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="drip-recipe-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # no files/augmentations.yaml here: Drip uses its built-in policy
    print(machine_info(), flush=True)
    print(f"workdir {workdir}", flush=True)

    data = make_data(workdir, args)
    results: dict[str, dict] = {}
    if args.only in ("both", "drip"):
        results["drip"] = run_drip(workdir, data, args)
    if args.only in ("both", "plain"):
        results["plain"] = run_plain(workdir, data, args)

    print()
    print(f"network {NETWORK}, from scratch; {args.steps} steps of {args.batch_size} images at {args.image_size} px; "
          f"{args.train_images} training images, scored on {args.test_images} unseen ones")
    for name, r in results.items():
        print(f"  {name:<6} AP50 {r['AP50']:.3f}  AP {r['AP']:.3f}  ({r['train_seconds']:.0f} s training)")
    if len(results) == 2:
        plain = results["plain"]["AP50"]
        ratio = results["drip"]["AP50"] / plain if plain > 0 else math.inf
        print(f"  AP50 ratio drip/plain: {ratio:.2f}")
        results["ratio_ap50"] = ratio
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))
    return 0


def machine_info() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"cpu {cpu}, {cores()} cores (load average {load}); torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), torchvision {torchvision.__version__}, python {platform.python_version()}")


# -- data ---------------------------------------------------------------------------------------
def make_data(workdir: Path, args) -> dict:
    images = workdir / "images"
    annotations = make_dataset(images, args.train_images + args.eval_images, seed=args.seed)
    write_drip_json(workdir / "metadata.json", annotations)
    test_dir = workdir / "test"
    test = make_dataset(test_dir, args.test_images, seed=args.seed + 10_000, folders=())
    return {"images": images, "metadata": workdir / "metadata.json", "test_dir": test_dir, "test": test,
            "eval_percentage": 100.0 * args.eval_images / (args.train_images + args.eval_images)}


def score(model: torch.nn.Module, classes, data: dict, image_size: int) -> dict:
    """COCO metrics on the test images (the same code path as ``drip evaluate``).

    ``classes`` names the model's class ids 1..K: Drip numbers classes in order of first
    appearance in the annotations, the plain loop in ``CLASSES`` order.
    """
    classes = list(classes)
    truths, pairs = [], []
    for i, ann in enumerate(data["test"]):
        image = Image.open(data["test_dir"] / ann.file).convert("RGB")
        truths.append(ImageTruth(i, image.width, image.height, ann.boxes, [classes.index(l) + 1 for l in ann.labels]))
        pairs.append((i, image))
    detections = predict(model, pairs, image_size=image_size, device="cpu", batch_size=8)
    metrics = coco_metrics(truths, detections, classes)
    return {"AP50": metrics.AP50 or 0.0, "AP": metrics.AP or 0.0, "per_class_ap50": metrics.per_class_ap50}


# -- Drip ---------------------------------------------------------------------------------------
def run_drip(workdir: Path, data: dict, args) -> dict:
    overrides = {
        "src_json_path": str(data["metadata"]),
        "image_folder_path": str(data["images"]),
        "eval_percentage": data["eval_percentage"],
        "seed": args.seed,
        "network": NETWORK,
        "weights": "none",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "number_of_steps": args.steps,
        "box_batch_size_per_image": args.roi_samples,
        "device": "cpu",
    }
    for item in args.overrides:
        key, _, value = item.partition("=")
        overrides[key.strip()] = value.strip()
    print(f"\n== drip: {overrides}", flush=True)
    started = time.perf_counter()
    local.train(workdir / "drip", overrides)
    seconds = time.perf_counter() - started
    session = Session(workdir / "drip")
    loaded = models.load_model(session.model_path, "cpu")
    result = {**score(loaded.model, loaded.classes, data, args.image_size), "train_seconds": seconds,
              "exported_step": loaded.meta.get("step"), "overrides": {k: str(v) for k, v in overrides.items()}}
    print(f"drip: AP50 {result['AP50']:.3f} on the test images (model of step {result['exported_step']}), "
          f"{seconds:.0f} s for all stages", flush=True)
    return result


# -- the plain torchvision loop -----------------------------------------------------------------
class PlainDataset(torch.utils.data.Dataset):
    """references/detection style: PIL image -> tensor, resized as Drip resizes, random hflip."""

    def __init__(self, root: Path, annotations, image_size: int):
        self.root, self.annotations, self.size = root, annotations, image_size

    def __len__(self):
        return len(self.annotations)

    def __getitem__(self, i):
        ann = self.annotations[i]
        image = Image.open(self.root / ann.file).convert("RGB")
        scale = self.size / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        boxes = torch.tensor(ann.boxes, dtype=torch.float32).reshape(-1, 4) * scale
        labels = torch.tensor([CLASSES.index(l) + 1 for l in ann.labels], dtype=torch.int64)
        if random.random() < 0.5:
            tensor = tensor.flip(-1)
            boxes = torch.stack([tensor.shape[-1] - boxes[:, 2], boxes[:, 1], tensor.shape[-1] - boxes[:, 0], boxes[:, 3]], 1)
        return tensor, {"boxes": boxes, "labels": labels}


def run_plain(workdir: Path, data: dict, args) -> dict:
    # The same training images as Drip: the train half of its split (run Drip first), else all.
    split = workdir / "drip" / "dl" / "split" / "train.json"
    if split.exists():
        annotations = load_annotations(split, data["images"]).images
    else:
        annotations = load_annotations(data["metadata"], data["images"]).images[: args.train_images]
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = torchvision.models.detection.__dict__[NETWORK](weights=None, weights_backbone=None, num_classes=len(CLASSES) + 1)
    models.set_image_size(model, args.image_size)  # the same input size as Drip's
    model.roi_heads.fg_bg_sampler.batch_size_per_image = args.roi_samples
    params = [p for p in model.parameters() if p.requires_grad]
    lr = 0.02 / 16 * args.batch_size
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    dataset = PlainDataset(data["images"], annotations, args.image_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=0,
        collate_fn=lambda batch: tuple(zip(*batch)),
    )
    # references/detection/engine.py: linear warmup from lr/1000 over the first epoch (at most 1000 iterations).
    warmup = min(1000, len(loader) - 1)
    print(f"\n== plain: {len(dataset)} images, SGD lr {lr:g} constant after {warmup} warmup iterations, hflip", flush=True)
    model.train()
    step, started = 0, time.perf_counter()
    while step < args.steps:
        for images, targets in loader:
            factor = 0.001 * (1 - step / warmup) + step / warmup if step < warmup else 1.0
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            losses = model(list(images), list(targets))
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0:
                print(f"plain step {step}/{args.steps} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
            if step >= args.steps:
                break
    seconds = time.perf_counter() - started
    result = {**score(model, CLASSES, data, args.image_size), "train_seconds": seconds}
    print(f"plain: AP50 {result['AP50']:.3f} on the test images, {seconds:.0f} s training", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
