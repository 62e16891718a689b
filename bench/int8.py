"""int8 against fp32 ONNX on the CPU: accuracy and speed of ``drip export --int8``, side by side.

Takes a trained session (``--session``; its ``dl/model.pt``), exports it twice with the real
``drip export`` (fp32, then ``--int8`` calibrated on the session's eval images), and runs both
with ONNX Runtime on held-out images (``--test``: a folder and its Drip JSON, or synthetic
shapes made here, of another seed than any training set) the way ``drip infer`` runs them.
Prints AP50 and AP (pycocotools, ``drip.evaluation.metrics``) and the median milliseconds per
image, with one thread and with every core, for each model.

    .venv/bin/python bench/int8.py --session /tmp/yolox-session
    .venv/bin/python bench/int8.py --session S --test-images DIR --test-json DIR/metadata.json --image-size 320
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from drip import cli  # noqa: E402
from drip.data.annotations import load_for_scoring  # noqa: E402
from drip.data.detections import scale_boxes_np  # noqa: E402
from drip.data.synthetic import make_dataset, write_drip_json  # noqa: E402
from drip.deploy.onnx_infer import load_onnx, predict  # noqa: E402
from drip.evaluation.metrics import ImageDetections, ImageTruth, coco_metrics  # noqa: E402
from drip.parallel import cores  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--session", type=Path, required=True, help="a trained Drip session folder")
    parser.add_argument("--test-images", type=Path, default=None, help="held-out images (default: synthetic shapes)")
    parser.add_argument("--test-json", type=Path, default=None, help="their annotations (Drip JSON, COCO, ...)")
    parser.add_argument("--synthetic", type=int, default=100, help="synthetic test images when --test-images is not given")
    parser.add_argument("--size", default="160x120", help="synthetic image size WxH")
    parser.add_argument("--image-size", type=int, default=None, help="export at this size (default: the model's)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="drip-int8-"))
    if args.test_images is None:
        width, height = (int(v) for v in args.size.split("x"))
        args.test_images = work / "test"
        write_drip_json(work / "test.json", make_dataset(args.test_images, args.synthetic, size=(width, height),
                                                         seed=20_000, folders=()))
        args.test_json = work / "test.json"
    model_pt = args.session / "dl" / "model.pt"
    paths = {"fp32": work / "model.onnx", "int8": work / "model.int8.onnx"}
    started = time.perf_counter()
    sized = ["--image_size", str(args.image_size)] if args.image_size else []
    assert cli.main(["export", "--model", str(model_pt), "--output", str(paths["fp32"]), *sized]) == 0
    exported = time.perf_counter()
    assert cli.main(["export", "--model", str(model_pt), "--output", str(paths["int8"]), "--int8", *sized]) == 0
    print(f"export: fp32 {exported - started:.1f} s, int8 (with calibration) {time.perf_counter() - exported:.1f} s")

    annotations = load_for_scoring(args.test_json, args.test_images).relative_to(args.test_images)
    rows = {}
    for name, path in paths.items():
        model = load_onnx(path)
        classes = model.classes
        truths, found, times = [], [], {1: [], cores(): []}
        for threads in times:
            model = load_onnx(path, threads=threads)
            for i, ann in enumerate(annotations):
                image = Image.open(args.test_images / ann.file).convert("RGB")
                tick = time.perf_counter()
                output, shape = predict(model, image, model.image_size)
                times[threads].append(time.perf_counter() - tick)
                if threads == 1:
                    truths.append(ImageTruth(i, image.width, image.height, ann.boxes,
                                             [classes.index(label) + 1 for label in ann.labels]))
                    found.append(ImageDetections(i, scale_boxes_np(output["boxes"], image.size, shape),
                                                 output["scores"], output["labels"]))
        metrics = coco_metrics(truths, found, classes)
        rows[name] = (metrics.AP50 or 0.0, metrics.AP or 0.0, *(1000 * statistics.median(t[1:] or t) for t in times.values()),
                      path.stat().st_size / 1e6)
    network = load_onnx(paths["fp32"]).network
    print(f"\n{network} from {model_pt}, {len(annotations)} held-out images; ms per image (median, ONNX Runtime CPU)")
    print(f"{'model':<6} {'AP50':>6} {'AP':>6} {'ms 1 thread':>12} {f'ms {cores()} threads':>12} {'MB':>6}")
    for name, (ap50, ap, one, many, size) in rows.items():
        print(f"{name:<6} {ap50:6.3f} {ap:6.3f} {one:12.1f} {many:12.1f} {size:6.1f}")
    fp32, int8 = rows["fp32"], rows["int8"]
    print(f"int8 - fp32: AP50 {int8[0] - fp32[0]:+.3f}; speed x{fp32[2] / int8[2]:.2f} (1 thread), x{fp32[3] / int8[3]:.2f} "
          f"({cores()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
