"""Large images, small objects: what --tile_size gains. A CPU benchmark.

Makes large synthetic canvases (``--canvas`` pixels square) with ``--objects`` small shapes each
(40-56 px, one class, like trees on an orthomosaic), then trains the same network for the same
steps at the same ``--image_size``, twice, through Drip's real pipeline:

* **whole**: Drip without tiles: every image resized to ``--image_size``, as before tiling;
* **tiles**: ``--tile_size`` equal to ``--image_size``: trained on tiles.

and scores three ways on canvases neither has seen (pycocotools' AP50 and AP, through
``drip evaluate``): the whole-image model on whole images; the tile model on whole images
(``--tile_size 0``); the tile model sliced (its default). Each scoring runs in a child process
so its peak resident memory (``VmHWM``) is its own, and its images/s is timed there.

    .venv/bin/python bench/tiling.py            # about 15-25 minutes on 2 quiet CPU cores
    .venv/bin/python bench/tiling.py --quick    # a smoke test of the script
    .venv/bin/python bench/tiling.py --model M  # score a model already trained on such tiles
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, parser, report

NETWORK = "fasterrcnn_mobilenet_v3_large_320_fpn"


def canvas(rng, size: int, n: int, px=(40, 56)):
    """A dark textured canvas with ``n`` bright shapes that do not touch, and their boxes."""
    import numpy as np
    from PIL import Image, ImageDraw

    noise = rng.normal(0, 12, size=(size // 16 + 1, size // 16 + 1, 3))
    img = Image.fromarray(np.clip(60 + noise, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    boxes: list[list[float]] = []
    while len(boxes) < n:
        s = int(rng.integers(px[0], px[1] + 1))
        x, y = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
        box = [x, y, x + s, y + s]
        if any(box[0] < b[2] + 8 and b[0] < box[2] + 8 and box[1] < b[3] + 8 and b[1] < box[3] + 8 for b in boxes):
            continue
        colour = tuple(int(c) for c in rng.integers(170, 256, size=3))
        if len(boxes) % 2:
            draw.ellipse(box, fill=colour, outline=(255, 255, 255))
        else:
            draw.rectangle(box, fill=colour, outline=(255, 255, 255))
        boxes.append([float(v) for v in box])
    return img, boxes


def write_canvases(folder: Path, names: list[str], size: int, n: int, seed: int, px=(40, 56)) -> Path:
    """Canvases under ``folder`` and their Drip JSON, ``folder``.json; returns the JSON's path."""
    import numpy as np

    from drip.data.dataset import ImageAnnotation
    from drip.data.synthetic import write_drip_json

    rng = np.random.default_rng(seed)
    annotations = []
    for name in names:
        img, boxes = canvas(rng, size, n, px)
        (folder / "site").mkdir(parents=True, exist_ok=True)
        img.save(folder / "site" / f"{name}.png")
        annotations.append(ImageAnnotation(f"site/{name}.png", size, size, boxes, ["tree"] * len(boxes)))
    meta = folder.with_suffix(".json")
    write_drip_json(meta, annotations)
    return meta


def score(model: Path, images: Path, annotations: Path, out: Path, tile_size: int | None, batch: int) -> dict:
    """AP50, AP, images/s and peak RSS of one ``drip evaluate`` run, in a child process."""
    args = [sys.executable, __file__, "--_score", str(model), str(images), str(annotations), str(out),
            str(tile_size if tile_size is not None else ""), str(batch)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"scoring failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _score_child(model: str, images: str, annotations: str, out: str, tile_size: str, batch: str) -> None:
    from drip.runtime import local

    overrides = {"model": model, "images_path": images, "src_json_path": annotations, "results_path": out,
                 "batch_size": int(batch), "device": "cpu"}
    if tile_size:
        overrides["tile_size"] = int(tile_size)
    start = time.perf_counter()
    result = local.evaluate(Path(tempfile.gettempdir()), overrides)
    seconds = time.perf_counter() - start
    stats = result.metrics.stats()
    print(json.dumps({
        "AP50": stats.get("AP50"), "AP": stats.get("AP"), "images": result.metrics.images,
        "seconds": round(seconds, 1), "images_per_s": round(result.metrics.images / seconds, 3),
        "peak_rss_mb": round(_peak_rss_kb() / 1024, 1),
    }))


def _peak_rss_kb() -> int:
    """This process's peak resident memory. Not ``ru_maxrss``: Linux carries that over from the
    parent across fork and exec, so a child would report the benchmark's own peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def train(session: Path, train_json: Path, images: Path, steps: int, size: int, tile: int | None) -> float:
    from drip.runtime import local

    overrides = {
        "src_json_path": str(train_json), "image_folder_path": str(images), "network": NETWORK, "weights": "none",
        "image_size": size, "batch_size": 4, "number_of_steps": steps, "eval_percentage": 0, "augmentations": 1,
        "box_batch_size_per_image": 128, "device": "cpu", "checkpoint_every": steps, "log_every": 50, "seed": 0,
    }
    if tile:
        overrides |= {"tile_size": tile, "tile_overlap": 0.3}
    start = time.perf_counter()
    local.train(session, overrides)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--canvas", type=int, default=3000, help="canvas side in pixels")
    p.add_argument("--objects", type=int, default=40, help="objects per canvas")
    p.add_argument("--train-canvases", type=int, default=3)
    p.add_argument("--test-canvases", type=int, default=2)
    p.add_argument("--steps", type=int, default=400, help="training steps of each run")
    p.add_argument("--image-size", type=int, default=192, help="--image_size of both runs, and the tile size")
    p.add_argument("--batch", type=int, default=4, help="--batch_size of the scoring runs (tiles per pass when sliced)")
    p.add_argument("--model", help="score this model, trained on tiles of such canvases, instead of training "
                   "both (the whole-image model's row is then left out)")
    args = p.parse_args(argv)
    if args.quick:
        args.canvas, args.objects, args.train_canvases, args.test_canvases, args.steps = 800, 10, 1, 1, 10

    info = machine("cpu")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="drip-bench-tiling-"))
    train_json = write_canvases(work / "train", [f"t{i}" for i in range(args.train_canvases)], args.canvas, args.objects, 1)
    test_json = write_canvases(work / "test", [f"e{i}" for i in range(args.test_canvases)], args.canvas, args.objects, 2)

    seconds = {}
    models = {"whole": work / "session whole", "tiles": work / "session tiles"}
    runs = [
        ("whole-image model, whole images", "whole", None),
        ("tile model, whole images (--tile_size 0)", "tiles", 0),
        ("tile model, sliced (its default)", "tiles", None),
    ]
    if args.model:
        models["tiles"] = Path(args.model)
        runs = runs[1:]
        trained = f"the given model {args.model}"
    else:
        for name, tile in (("whole", None), ("tiles", args.image_size)):
            seconds[name] = train(models[name], train_json, work / "train", args.steps, args.image_size, tile)
        trained = (
            f"{NETWORK} from scratch, {args.steps} steps at --image_size {args.image_size} on {args.train_canvases} "
            f"training canvases (training: {seconds['whole']:.0f} s whole, {seconds['tiles']:.0f} s tiles)"
        )
    rows = {
        name: score(models[model], work / "test", test_json, work / f"metrics {i}", tile, args.batch)
        for i, (name, model, tile) in enumerate(runs)
    }
    base = rows["tile model, whole images (--tile_size 0)"]
    lines = [
        f"{args.test_canvases} test canvases of {args.canvas} px with {args.objects} objects of 40-56 px; {trained}",
        "",
        "| run | AP50 | AP | images/s | peak RSS |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        ap50 = "-" if row["AP50"] is None else f"{row['AP50']:.3f}"
        ap = "-" if row["AP"] is None else f"{row['AP']:.3f}"
        lines.append(f"| {name} | {ap50} | {ap} | {row['images_per_s']:.2f} | {row['peak_rss_mb']:.0f} MB |")
    sliced = rows["tile model, sliced (its default)"]
    lines.append(
        f"sliced / the same model on whole images: AP50 {sliced['AP50'] or 0:.3f} vs {base['AP50'] or 0:.3f}, "
        f"speed x{sliced['images_per_s'] / base['images_per_s']:.2f}, memory x{sliced['peak_rss_mb'] / base['peak_rss_mb']:.2f}"
    )
    report("tiling", info, {"rows": rows, "train_seconds": seconds, "args": vars(args)}, lines, args.json)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_score":
        _score_child(*sys.argv[2:8])
        sys.exit(0)
    sys.exit(main())
