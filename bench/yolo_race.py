"""Drip's YOLOX against Ultralytics YOLO11n, from scratch, given the same wall-clock, on this CPU.

Makes a YOLO-format dataset of synthetic scenes (``--scenes shapes``: a few large shapes on
textured backgrounds; ``crowded``: up to 12 small ones), then:

1. **Drip** trains with the real command line, ``python -m drip train --time_limit MINUTES``
   (``--network yolox_nano --weights none``, every other value Drip's default or the family's
   recipe); the wall-clock of the whole command (split to ``model.pt``) is measured.
2. **Ultralytics** ``YOLO("yolo11n.yaml")`` (from scratch, no download) trains in a venv of its own
   (``--ultralytics-python``: Ultralytics is AGPL-3.0 and never installed into Drip's venv) with
   ``time=`` set to the wall-clock Drip's command took, at the same image size.
3. Both models predict the held-out test split (Drip through ``drip.evaluation.metrics.predict``,
   Ultralytics with ``conf=0.001``), scored by the same pycocotools code (``coco_metrics``).

Prints AP50 and AP of both, side by side, with the steps/epochs each trained and the seconds.

    python3 -m venv /tmp/ultra && /tmp/ultra/bin/pip install --no-deps ultralytics ultralytics-thop
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/ultra/lib/python3.11/site-packages/drip.pth
    .venv/bin/python bench/yolo_race.py --minutes 7 --ultralytics-python /tmp/ultra/bin/python

(The .pth lets the separate venv use the torch and numpy already downloaded for Drip without
installing anything into Drip's venv.) ``--skip-ultralytics`` runs Drip alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from drip.data.dataset import ImageAnnotation  # noqa: E402
from drip.data.synthetic import CLASSES, draw_scene, write_yolo_labels  # noqa: E402
from drip.detectors import models  # noqa: E402
from drip.evaluation.metrics import ImageDetections, ImageTruth, coco_metrics, predict  # noqa: E402

SCENES = {
    # kind: (image size, objects per image at most, object size as a fraction of the shorter side)
    "shapes": ((320, 240), 4, (1 / 6, 1 / 3)),
    "crowded": ((320, 240), 12, (1 / 14, 1 / 7)),
}

ULTRALYTICS = r"""
import json, sys, time
from pathlib import Path
from ultralytics import YOLO
data, hours, size, out, test = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
started = time.time()
model = YOLO("yolo11n.yaml")
model.train(data=data, time=hours, imgsz=size, device="cpu", workers=2, plots=False, project=str(out), name="run",
            exist_ok=True, pretrained=False, amp=False, verbose=False)
trained = time.time() - started
best = out / "run" / "weights" / "best.pt"
model = YOLO(str(best if best.is_file() else out / "run" / "weights" / "last.pt"))
found = {}
for path in sorted(test.glob("*.jpg")):
    r = model.predict(str(path), imgsz=size, conf=0.001, max_det=300, device="cpu", verbose=False)[0]
    found[path.name] = {"boxes": r.boxes.xyxy.tolist(), "scores": r.boxes.conf.tolist(), "labels": r.boxes.cls.int().tolist()}
json.dump({"seconds": trained, "epochs": model.ckpt.get("epoch") if getattr(model, "ckpt", None) else None,
           "detections": found}, open(out / "found.json", "w"))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=7.0, help="Drip's --time_limit")
    parser.add_argument("--scenes", choices=sorted(SCENES), default="shapes")
    parser.add_argument("--train-images", type=int, default=240)
    parser.add_argument("--valid-images", type=int, default=40)
    parser.add_argument("--test-images", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=320, help="both networks' input size")
    parser.add_argument("--network", default="yolox_nano")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a further Drip flag for the Drip run (repeatable)")
    parser.add_argument("--ultralytics-python", default="/tmp/ultra/bin/python")
    parser.add_argument("--skip-ultralytics", action="store_true")
    parser.add_argument("--together", action="store_true",
                        help="train both at once, each given --minutes (fair on a machine whose load changes; each "
                             "gets about half of it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="drip-yolox-"))
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work / "data", args)
    print(f"workdir {work}; {args.scenes} scenes: {args.train_images} train, {args.valid_images} valid, "
          f"{args.test_images} test at {SCENES[args.scenes][0]}", flush=True)
    if args.together and not args.skip_ultralytics:
        import threading

        results = {}
        rival = threading.Thread(target=lambda: results.__setitem__(
            "ultralytics", run_ultralytics(work, data, args, args.minutes * 60)))
        rival.start()
        results["drip"] = run_drip(work, data, args)
        rival.join()
        results = {"drip": results["drip"], "ultralytics": results["ultralytics"]}
    else:
        results = {"drip": run_drip(work, data, args)}
        if not args.skip_ultralytics:
            results["ultralytics"] = run_ultralytics(work, data, args, results["drip"]["seconds"])
    print(f"\nfrom scratch on {args.scenes} scenes at {args.image_size} px, the same wall-clock "
          f"({results['drip']['seconds']:.0f} s), scored on {args.test_images} held-out images:")
    for name, r in results.items():
        print(f"  {name:<12} AP50 {r['AP50']:.3f}  AP {r['AP']:.3f}  ({r['trained']}, {r['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))
    return 0


def make_data(root: Path, args) -> dict:
    """``train``/``valid``/``test`` folders of images and YOLO labels, and a data.yaml with absolute paths."""
    size, most, object_size = SCENES[args.scenes]
    out = {}
    for offset, (split, n) in enumerate((("train", args.train_images), ("valid", args.valid_images), ("test", args.test_images))):
        rng = np.random.default_rng(args.seed * 1000 + offset)
        folder = root / split / "images"
        folder.mkdir(parents=True, exist_ok=True)
        annotations = []
        for i in range(n):
            image, boxes, labels = draw_scene(rng, *size, max_objects=most, object_size=object_size)
            name = f"{split}_{i:04d}.jpg"
            image.save(folder / name, quality=92)
            annotations.append(ImageAnnotation(name, size[0], size[1], boxes, labels))
        write_yolo_labels(root / split / "labels", annotations)
        out[split] = annotations
    (root / "data.yaml").write_text(
        f"path: {root}\ntrain: train/images\nval: valid/images\ntest: test/images\nnc: {len(CLASSES)}\n"
        f"names: {list(CLASSES)!r}\n", encoding="utf-8")
    out["yaml"] = root / "data.yaml"
    out["root"] = root
    return out


def truths(data: dict) -> list[ImageTruth]:
    return [ImageTruth(a.file, a.width, a.height, a.boxes, [CLASSES.index(label) + 1 for label in a.labels])
            for a in data["test"]]


def run_drip(work: Path, data: dict, args) -> dict:
    session = work / "drip"
    command = [sys.executable, "-m", "drip", "train", "--session_folder", str(session),
               "--src_json_path", str(data["yaml"]), "--network", args.network, "--weights", "none",
               "--image_size", str(args.image_size), "--time_limit", str(args.minutes), "--device", "cpu",
               "--seed", str(args.seed)]
    for item in args.overrides:
        key, _, value = item.partition("=")
        command += [f"--{key.strip()}", value.strip()]
    print("\n== drip: " + " ".join(command), flush=True)
    started = time.time()
    subprocess.run(command, check=True, cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.time() - started
    loaded = models.load_model(session / "pipeline" / "dl" / "model.pt" if (session / "pipeline").is_dir()
                               else session / "dl" / "model.pt")
    images = [(a.file, Image.open(data["root"] / "test" / "images" / a.file).convert("RGB")) for a in data["test"]]
    found = predict(loaded.model, images, image_size=loaded.image_size, device="cpu", batch_size=8)
    ids = [loaded.classes.index(c) + 1 for c in CLASSES]  # Drip's ids follow first appearance
    remap = {drip_id: CLASSES.index(loaded.classes[drip_id - 1]) + 1 for drip_id in ids}
    found = [ImageDetections(d.image_id, d.boxes, d.scores, np.array([remap[int(x)] for x in d.labels])) for d in found]
    metrics = coco_metrics(truths(data), found, CLASSES)
    result = {"AP50": metrics.AP50 or 0.0, "AP": metrics.AP or 0.0, "seconds": seconds,
              "trained": f"{loaded.meta.get('last_step')} steps"}
    print(f"drip: AP50 {result['AP50']:.3f} AP {result['AP']:.3f} after {seconds:.0f} s", flush=True)
    return result


def run_ultralytics(work: Path, data: dict, args, seconds: float) -> dict:
    out = work / "ultralytics"
    out.mkdir(exist_ok=True)
    script = out / "train.py"
    script.write_text(ULTRALYTICS, encoding="utf-8")
    print(f"\n== ultralytics yolo11n, time={seconds / 3600:.4f} h", flush=True)
    started = time.time()
    env = {**os.environ, "YOLO_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run([args.ultralytics_python, str(script), str(data["yaml"]), str(seconds / 3600), str(args.image_size),
                    str(out), str(data["root"] / "test" / "images")], check=True, cwd=out, env=env)
    wall = time.time() - started
    raw = json.loads((out / "found.json").read_text())
    found = [ImageDetections(name, np.array(d["boxes"]).reshape(-1, 4), np.array(d["scores"]),
                             np.array(d["labels"]) + 1) for name, d in raw["detections"].items()]
    metrics = coco_metrics(truths(data), found, CLASSES)
    result = {"AP50": metrics.AP50 or 0.0, "AP": metrics.AP or 0.0, "seconds": raw["seconds"],
              "trained": f"epoch {raw['epochs']}", "wall_with_prediction": wall}
    print(f"ultralytics: AP50 {result['AP50']:.3f} AP {result['AP']:.3f} after {raw['seconds']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
