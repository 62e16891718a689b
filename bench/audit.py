"""Does ``drip audit`` find planted label faults, and does ``drip select`` pick better images than chance?

**audit**: makes a labelled synthetic set (``--scenes shapes``: several shapes an image, which may
overlap, ``drip.data.synthetic.draw_scene``; ``--scenes sparse``: many small shapes that never
touch, ``draw_sparse_scene``), plants faults of three kinds in as many images each (one fault an
image; ``--scenes sample``: the quick start's scenes, larger shapes that never overlap):
``missing`` deletes a box, ``wrong_class`` swaps its class for another, ``bad_box`` moves
a box by 0.5-1 of its size in a random direction. Then runs ``drip audit`` (the real command,
in this process, from scratch) and reads ``label_issues.json``. A fault counts as found when an
issue of its kind on its image has IoU >= 0.5 with its box (the deleted box; the box as
labelled). Prints recall per kind, precision among the top K issues (K = faults planted) and
the time the audit took.

**select**: trains a model on a small labelled set of shape scenes, lets ``drip select`` choose
``--select-count`` images from an unlabelled pool of shape scenes and sparse scenes (a kind the
first model has not seen), then trains from that model on the labelled set plus the chosen
images, and again plus as many random ones from the pool, for the same steps, and scores both on
test images of both kinds (AP50, ``drip evaluate``'s code).

    .venv/bin/python bench/audit.py                    # the held-out check's size: 240 images at 320 px, 300 steps
    .venv/bin/python bench/audit.py --images 120 --image-size 192 --steps 200   # reduced (BENCHMARKS.md)
    .venv/bin/python bench/audit.py --quick            # a smoke test of the script

``--model SESSION`` measures the comparison alone, in minutes: that trained model predicts the
scenes (which it never saw) in place of the out-of-fold models, e.g. the quick start's model
(``scripts/quickstart.sh``, then ``--model pipeline/ --scenes sample --image-size 320``).
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import machine, parser, report  # noqa: E402
from drip.data.dataset import ImageAnnotation  # noqa: E402
from drip.data.synthetic import CLASSES, draw_sparse_scene, make_dataset, write_drip_json  # noqa: E402
from drip.evaluation.report import box_iou  # noqa: E402

FAULT_KINDS = ("missing", "wrong_class", "bad_box")


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("audit", "select", "both"), default="both")
    p.add_argument("--scenes", choices=("shapes", "sparse", "sample", "both"), default="both",
                   help="the audit's kinds of data: both = shapes and sparse; sample = the quick start's scenes")
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--steps", type=int, default=300, help="--number_of_steps of every model")
    p.add_argument("--final-steps", type=int, default=None,
                   help="drip audit --final_steps (default: its own, half of --steps); the final model is not scored "
                        "here, so 1 measures the audit alone")
    p.add_argument("--faults", type=float, default=0.05, help="images given a fault of each kind, as a fraction")
    p.add_argument("--select-labelled", type=int, default=40)
    p.add_argument("--select-pool", type=int, default=120)
    p.add_argument("--select-count", type=int, default=20)
    p.add_argument("--model", default=None,
                   help="a trained Drip model (or session): skip the folds, and let it predict the scenes (which it "
                        "never saw) in place of the out-of-fold models; measures the comparison alone, in minutes")
    p.add_argument("--network", default=None,
                   help="the detector (default: none given, as in the held-out check: drip audit's yolox_nano, "
                        "drip train's default for --part select)")
    p.add_argument("--roi-samples", type=int, default=None,
                   help="--box_batch_size_per_image (default: the network's, 512): 128 makes a CPU step much faster")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.image_size, args.steps = 24, 96, 4
        args.select_labelled, args.select_pool, args.select_count = 8, 12, 4
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="drip-audit-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # no files/augmentations.yaml here: the built-in policy
    info = machine("cpu")
    figures: dict = {"args": {k: v for k, v in vars(args).items() if k != "json"}}
    lines = [f"workdir {workdir}"]
    if args.part in ("audit", "both"):
        for scenes in (("shapes", "sparse") if args.scenes == "both" else (args.scenes,)):
            run = bench_model if args.model else bench_audit
            result = run(workdir / f"audit-{scenes}", scenes, args)
            figures[f"audit_{scenes}"] = result
            how = f"predicted by {args.model}" if args.model else f"{args.steps} steps"
            lines.append(
                f"audit, {scenes} scenes: {args.images} images at {args.image_size} px, {how}, "
                f"{result['planted']} faults planted; {result['seconds'] / 60:.1f} min; the model finds "
                f"{result['model_recall']:.0%} of the labels"
            )
            lines.append("  recall " + ", ".join(f"{k} {v['found']}/{v['planted']}" for k, v in result["recall"].items())
                         + f"; precision in the top {result['planted']}: {result['precision_top_k']:.2f}")
    if args.part in ("select", "both"):
        result = bench_select(workdir / "select", args)
        figures["select"] = result
        if args.model:
            lines.append(f"select with {args.model}: {args.select_count} of a pool of {args.select_pool} "
                         f"({result['pool_sparse_share']:.0%} sparse scenes, a kind the model never saw): "
                         f"{result['selected_sparse_share']:.0%} of the chosen are sparse scenes")
        else:
            lines.append(f"select: {args.select_labelled} labelled + {args.select_count} of a pool of {args.select_pool}, "
                         f"{args.steps} steps each: AP50 selected {result['selected']['AP50']:.3f}, "
                         f"random {result['random']['AP50']:.3f} (first model {result['first']['AP50']:.3f})")
    report("audit", info, figures, lines, args.json)
    return 0


# -- data ---------------------------------------------------------------------------------------
def make_scenes(folder: Path, n: int, size: int, scenes: str, seed: int) -> list[ImageAnnotation]:
    if scenes == "shapes":
        return make_dataset(folder, n, size=(size, size * 3 // 4), seed=seed, folders=())
    if scenes == "sample":  # as scripts/make_sample_data.py draws the quick start's images
        return make_dataset(folder, n, size=(size, size * 3 // 4), seed=seed, folders=(), object_size=(0.25, 0.5),
                            overlap=False)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img, boxes, labels = draw_sparse_scene(rng, size, size * 3 // 4, int(rng.integers(3, 9)),
                                               object_px=(max(8, size // 12), max(12, size // 7)))
        rel = f"sparse_{i:04d}.jpg"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / rel, quality=92)
        out.append(ImageAnnotation(rel, img.width, img.height, boxes, labels))
    return out


def plant(annotations: list[ImageAnnotation], fraction: float, seed: int) -> list[dict]:
    """Faults planted in place (one an image, each kind in ``fraction`` of the images); returns them."""
    rng = random.Random(seed)
    per_kind = max(1, round(fraction * len(annotations)))
    order = [a for a in annotations if len(a.boxes) >= 2]  # an image keeps a box: not an empty image
    rng.shuffle(order)
    faults = []
    for k, kind in enumerate(FAULT_KINDS):
        for a in order[k * per_kind:(k + 1) * per_kind]:
            i = rng.randrange(len(a.boxes))
            box = list(a.boxes[i])
            if kind == "missing":
                del a.boxes[i], a.labels[i]
            elif kind == "wrong_class":
                a.labels[i] = rng.choice([c for c in CLASSES if c != a.labels[i]])
            else:
                w, h = box[2] - box[0], box[3] - box[1]
                angle, by = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.0)
                dx, dy = np.cos(angle) * by * w, np.sin(angle) * by * h
                dx = min(max(dx, -box[0]), a.width - box[2])
                dy = min(max(dy, -box[1]), a.height - box[3])
                box = [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]
                a.boxes[i] = box
            faults.append({"image": a.file, "kind": kind, "box": box})
    return faults


def score_issues(issues: list[dict], faults: list[dict]) -> dict:
    def hit(issue, fault):
        return (issue["image"] == fault["image"] and issue["kind"] == fault["kind"]
                and box_iou(issue["box"], fault["box"])[0, 0] >= 0.5)

    recall = {kind: {"planted": 0, "found": 0} for kind in FAULT_KINDS}
    for fault in faults:
        recall[fault["kind"]]["planted"] += 1
        recall[fault["kind"]]["found"] += any(hit(i, fault) for i in issues)
    top = issues[:len(faults)]
    right = sum(any(hit(i, f) for f in faults) for i in top)
    kinds_top = {kind: sum(i["kind"] == kind for i in top) for kind in ("missing", "wrong_class", "bad_box",
                                                                        "duplicate", "spurious")}
    return {"recall": recall, "precision_top_k": right / max(1, len(faults)), "top_k_kinds": kinds_top,
            "found": sum(v["found"] for v in recall.values())}


def train_flags(args, steps=None) -> list[str]:
    roi = ["--box_batch_size_per_image", str(args.roi_samples)] if args.roi_samples else []
    steps = steps or args.steps
    # Drip's warmup is 100 steps: a shorter run would spend it all warming up.
    warmup = ["--warmup_steps", str(max(1, steps // 3))] if steps < 300 else []
    network = ["--network", args.network] if args.network else []
    return [*roi, *warmup, *network, "--weights", "none", "--image_size", str(args.image_size),
            "--device", "cpu", "--number_of_steps", str(steps), "--num_workers", "0"]


# -- audit --------------------------------------------------------------------------------------
def bench_audit(folder: Path, scenes: str, args) -> dict:
    from drip.cli import main as drip

    annotations = make_scenes(folder / "images", args.images, args.image_size, scenes, args.seed)
    faults = plant(annotations, args.faults, args.seed)
    write_drip_json(folder / "labels.json", annotations)
    started = time.perf_counter()
    code = drip(["audit", "--session_folder", str(folder / "session"), "--src_json_path", str(folder / "labels.json"),
                 "--image_folder_path", str(folder / "images"), *train_flags(args),
                 *(["--final_steps", str(args.final_steps)] if args.final_steps else [])])
    seconds = time.perf_counter() - started
    assert code == 0, f"drip audit failed ({code})"
    issues = json.loads((folder / "session" / "dl" / "audit" / "label_issues.json").read_text())
    state = json.loads((folder / "session" / "dl" / "session.json").read_text())
    return {"planted": len(faults), "issues": len(issues), "seconds": round(seconds, 1),
            "model_recall": state["stages"]["audit"]["recall"],
            **score_issues(issues, faults)}


def bench_model(folder: Path, scenes: str, args) -> dict:
    """The comparison alone: ``args.model`` predicts every image, as an out-of-fold model would."""
    from drip.evaluation.audit import ImageLabels, ImagePredictions, find_issues
    from drip.evaluation.results import resolve_model_path
    from drip.runtime.audit import predict_paths

    annotations = make_scenes(folder / "images", args.images, args.image_size, scenes, args.seed)
    faults = plant(annotations, args.faults, args.seed)
    started = time.perf_counter()
    found = predict_paths(resolve_model_path(args.model, Path(".")), [folder / "images" / a.file for a in annotations],
                          "cpu", 4)
    pairs = [(ImageLabels(a.file, a.boxes, a.labels), ImagePredictions(a.file, *found[str(folder / "images" / a.file)]))
             for a in annotations]
    audit = find_issues(pairs)
    issues = [issue.to_json() for issue in audit.issues]
    return {"planted": len(faults), "issues": len(issues), "seconds": round(time.perf_counter() - started, 1),
            "model_recall": audit.recall, **score_issues(issues, faults)}


# -- select -------------------------------------------------------------------------------------
def bench_select(folder: Path, args) -> dict:
    from drip.cli import main as drip
    from drip.config import EvaluateConfig
    from drip.evaluation.metrics import evaluate_annotations

    labelled = make_scenes(folder / "images", args.select_labelled, args.image_size, "shapes", args.seed + 1)
    known = "sample" if args.model else "shapes"  # the kind the first model trained on (--model: the quick start's)
    pool_shapes = make_scenes(folder / "pool" / "a", args.select_pool // 2, args.image_size, known, args.seed + 2)
    pool_sparse = make_scenes(folder / "pool" / "b", args.select_pool - args.select_pool // 2, args.image_size,
                              "sparse", args.seed + 3)
    pool = {f"a/{a.file}": a for a in pool_shapes} | {f"b/{a.file}": a for a in pool_sparse}
    test = make_scenes(folder / "test", 30, args.image_size, "shapes", args.seed + 4)
    test += [ImageAnnotation(f"s/{a.file}", a.width, a.height, a.boxes, a.labels)
             for a in make_scenes(folder / "test" / "s", 30, args.image_size, "sparse", args.seed + 5)]
    write_drip_json(folder / "test.json", test)
    write_drip_json(folder / "labelled.json", labelled)

    def train(name: str, extra: list[ImageAnnotation], start: list[str]) -> dict:
        images = [ImageAnnotation(f"images/{a.file}", a.width, a.height, a.boxes, a.labels) for a in labelled]
        images += [ImageAnnotation(f"pool/{key}", a.width, a.height, a.boxes, a.labels) for key, a in extra]
        write_drip_json(folder / f"{name}.json", images)
        started = time.perf_counter()
        assert drip(["train", "--session_folder", str(folder / name), "--src_json_path", str(folder / f"{name}.json"),
                     "--image_folder_path", str(folder), "--eval_percentage", "0", "--report", "false",
                     *train_flags(args), *start]) == 0
        seconds = time.perf_counter() - started
        config = EvaluateConfig().updated({"model": str(folder / name / "dl" / "model.pt"), "device": "cpu",
                                           "images_path": str(folder / "test"), "src_json_path": str(folder / "test.json"),
                                           "results_path": str(folder / name / "test-metrics.json")}, "bench")
        metrics = evaluate_annotations(config, folder).metrics
        return {"AP50": metrics.AP50 or 0.0, "AP": metrics.AP or 0.0, "seconds": round(seconds, 1)}

    if args.model:  # no training: which kind of pool image does select take, against chance?
        started = time.perf_counter()
        assert drip(["select", "--model", args.model, "--images_path", str(folder / "pool"), "--device", "cpu",
                     "--count", str(args.select_count), "--output", str(folder / "selected.json")]) == 0
        rows = json.loads((folder / "selected.json").read_text())["images"]
        return {"selected_sparse_share": sum(r["image"].startswith("b/") for r in rows) / max(1, len(rows)),
                "pool_sparse_share": len(pool_sparse) / len(pool), "seconds": round(time.perf_counter() - started, 1),
                "model": args.model}
    first = train("first", [], [])
    assert drip(["select", "--model", str(folder / "first"), "--images_path", str(folder / "pool"), "--device", "cpu",
                 "--count", str(args.select_count), "--output", str(folder / "selected.json")]) == 0
    chosen = [(row["image"], pool[row["image"]]) for row in json.loads((folder / "selected.json").read_text())["images"]]
    randomly = random.Random(args.seed).sample(sorted(pool.items()), len(chosen))
    start = ["--network", str(folder / "first" / "dl" / "model.pt")]
    selected = train("selected", chosen, start)
    rand = train("random", randomly, start)
    def sparse_share(rows):
        return sum(1 for key, _ in rows if key.startswith("b/")) / max(1, len(rows))

    return {"first": first, "selected": selected, "random": rand, "selected_sparse_share": sparse_share(chosen),
            "random_sparse_share": sparse_share(randomly)}


if __name__ == "__main__":
    sys.exit(main())
