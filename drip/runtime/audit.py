"""``drip audit`` and ``drip select``: the retraining loop's two commands, run in this process.

``drip audit`` folds the labelled images (``drip.evaluation.audit.assign_folds``), trains one
model per fold on the other folds through the ordinary stages (``local.run_all_stages``, so
under torchrun where training would be), predicts each fold's images with the model that never
saw them, compares labels and predictions (``drip.evaluation.audit.find_issues``), and then
trains the session's final model, which continues from the last fold's model on all the data.
With ``--fold_jobs`` > 1 (by default on several GPUs) the folds run side by side, each in a
process of its own (``drip.runtime.folds`` starts ``python -m drip.runtime.audit --fold``).
Files, in ``SESSION_FOLDER/dl/``:

* ``audit/folds/fold-N/``: each fold's session (its ``train.json``, model, logs); side by side
  also its ``fold.json`` (what its process does), ``fold.log`` and ``predictions.json``;
* ``audit/predictions.json``: every image's out-of-fold predictions (written after each fold);
* ``audit/label_issues.json``: the issues, ranked; ``audit/suggested.json``: the annotations with
  the sure suggestions applied, in COCO; ``audit/index.html`` and its crops;
* the final model's session as ``drip train`` writes it (``model.pt``, report, logs), the
  report linking to the audit page.

Everything the user gave is checked before the session moves to trash: bad input leaves
nothing half-written.

``drip select`` runs a session's model on a folder of unlabelled images and writes the ones worth
labelling next (``drip.evaluation.select``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import console
from ..config import CLI, AuditConfig, Config, SelectConfig, start_clock
from ..errors import ConfigError, InputError, guarded
from ..parallel import core_ids
from ..session import Session, read_json, write_json
from . import folds as folds_runtime
from . import local
from .torchrun import Launch

AUDIT_DIR = "audit"
# Without --network, the audit trains YOLOX-Nano: it trains K + 1 models, so a fast step matters
# most, and from scratch it learns in hundreds of steps what Faster R-CNN learns in thousands
# (BENCHMARKS.md#audit). A --network given (also Drip's default by name) is kept.
NETWORK = "yolox_nano"


@dataclass
class Item:
    labels: object  # drip.evaluation.audit.ImageLabels, named as the annotations name the image
    path: Path  # the image file
    name: str  # its path relative to the common image root, as the folds' train.json names it


def audit(session_folder: Path, overrides: dict, audit_overrides: dict, launch: Launch | None = None):
    """``drip audit``: folds, out-of-fold predictions, issues, then the final model."""
    from ..evaluation import audit as logic
    from ..evaluation.audit_page import write_page

    started = time.perf_counter()
    if "network" not in overrides:
        console.info(f"audit: no --network given: {NETWORK}, the fastest to learn from scratch "
                     "(the audit trains a model per fold and a final one)")
        overrides = {**overrides, "network": NETWORK}
    config = Config().updated(overrides, CLI)
    settings = AuditConfig().updated(audit_overrides, CLI)
    nproc = local.processes(launch, config)
    jobs, gpus = fold_jobs(settings.fold_jobs, settings.folds, config, launch)
    local._check_inputs(config)
    items, root = read_dataset(config)
    folds = logic.assign_folds([item.labels for item in items], settings.folds, config.seed)

    session = Session(Path(session_folder))
    moved = session.start_new()
    if moved:
        console.info(f"moved the previous session to {moved}")
    folder = session.dl / AUDIT_DIR
    plans = [_plan_fold(folder, k, settings.folds, items, folds, config, root) for k in range(settings.folds)]
    if jobs == 1:
        predictions: dict[str, object] = {}
        for plan in plans:
            console.info(plan.intro)
            start_clock()  # --time_limit, like --number_of_steps, is each model's budget
            local.run_all_stages(plan.session, plan.config, launch, nproc)
            predictions.update(predict_items(plan.session.model_path, plan.held, config))
            write_json(folder / "predictions.json", {name: p.__dict__ for name, p in predictions.items()})
    else:
        predictions = _run_folds_side_by_side(folder, plans, jobs, gpus)
    model_path = plans[-1].session.model_path

    pairs = [(item.labels, predictions[item.labels.image]) for item in items if item.labels.image in predictions]
    result = logic.find_issues(pairs)
    write_json(folder / "label_issues.json", [issue.to_json() for issue in result.issues])
    write_json(folder / "suggested.json", suggested_coco([item.labels for item in items], result.issues))
    write_page(folder, result, {item.labels.image: item.path for item in items})
    counts = logic.summary(result.issues)["by_kind"]
    session.record_stage("audit", folds=settings.folds, images=len(pairs), issues=len(result.issues), by_kind=counts,
                         recall=round(result.recall, 4), seconds=round(time.perf_counter() - started, 1))
    console.info(f"audit: {len(result.issues)} issues in {len(pairs)} images ("
                 + ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
                 + f"); the model found {result.recall:.0%} of the labels; see {folder / 'index.html'}")

    final_steps = settings.final_steps or max(1, config.number_of_steps // 2)
    console.info(f"audit: the final model continues from fold {settings.folds}'s on all the data, {final_steps} steps")
    final = config.updated({"network": str(model_path.resolve()), "number_of_steps": final_steps,
                            "warmup_steps": min(config.warmup_steps, max(1, final_steps // 3))}, "drip audit")
    start_clock()
    local.run_all_stages(session, final, launch, nproc)
    console.info(f"audit finished in {time.perf_counter() - started:.1f} s")
    return result


@dataclass
class FoldPlan:
    session: Session  # dl/audit/folds/fold-N
    config: Config  # training on the other folds' images
    held: list[Item]  # the images it predicts, never trained on
    intro: str  # what it does, in a line


def _plan_fold(folder: Path, k: int, total: int, items: list[Item], folds: list[int], config: Config,
               root: Path) -> FoldPlan:
    """Fold ``k``'s session folder and train.json, and its config."""
    held = [item for item, fold in zip(items, folds) if fold == k]
    trained = [item for item, fold in zip(items, folds) if fold != k]
    fold = Session(folder / "folds" / f"fold-{k + 1}")
    fold.dl.mkdir(parents=True, exist_ok=True)
    train_json = fold.root / "train.json"
    write_json(train_json, {"images": [_drip_entry(item) for item in trained]})
    fold_config = config.updated({
        "src_json_path": str(train_json), "image_folder_path": str(root), "eval_json_path": None,
        "eval_percentage": 0.0, "report": False,
    }, "drip audit")
    return FoldPlan(fold, fold_config, held, f"audit: fold {k + 1} of {total}: training on {len(trained)} images, "
                    f"then predicting the {len(held)} it never saw")


def fold_jobs(requested: str, total: int, config: Config, launch: Launch | None,
              gpu_count: Callable[[], int] | None = None) -> tuple[int, list[str]]:
    """How many folds train at once, and the GPUs they take in turn (none on the CPU).

    'auto': one per visible GPU when training on CUDA on one machine with several, else 1 (one
    fold after another, each through torchrun as ``drip train`` would run)."""
    gpus = 0
    if config.device != "cpu":
        gpus = (gpu_count or _cuda_devices)()
    several_nodes = launch is not None and launch.nnodes > 1
    if requested == "auto":
        wanted = gpus if launch is not None and not several_nodes and gpus > 1 else 1
    else:
        wanted = int(requested)
        if wanted > 1 and several_nodes:
            raise ConfigError(f"--fold_jobs {requested} runs folds side by side on this machine; with --nnodes "
                              f"{launch.nnodes} every fold trains on all the machines: leave --fold_jobs out")
    jobs = min(wanted, total)
    return jobs, folds_runtime.visible_gpus(gpus)[:jobs] if jobs > 1 else []


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _run_folds_side_by_side(folder: Path, plans: list[FoldPlan], jobs: int, gpus: list[str]) -> dict[str, object]:
    """Every fold in a process of its own, ``jobs`` at once; their predictions, in fold order.

    predictions.json is written after each fold as the sequential path writes it: the finished
    folds' predictions, in fold order, whatever order the folds finish in."""
    from ..evaluation.audit import ImagePredictions

    folds = []
    for number, plan in enumerate(plans, 1):
        console.info(plan.intro)
        spec = plan.session.root / "fold.json"
        write_json(spec, {"session": str(plan.session.root), "config": plan.config.to_dict(),
                          "predict": [[item.labels.image, str(item.path)] for item in plan.held],
                          "predictions": str(plan.session.root / "predictions.json")})
        folds.append(folds_runtime.Fold(number, spec, plan.session.root / "fold.log"))
    cpus = core_ids()
    places = folds_runtime.slots(jobs, gpus, cpus)
    console.info(f"audit: {len(plans)} folds, {jobs} at a time, each in a process of its own "
                 + (f"on one GPU ({', '.join(gpus)})" if gpus else f"on {len(places[0].cpus)} of {len(cpus)} cores"))
    found: dict[int, dict] = {}

    def merged() -> dict[str, dict]:
        return {name: p for number in sorted(found) for name, p in found[number].items()}

    def done(fold) -> None:
        found[fold.number] = read_json(plans[fold.number - 1].session.root / "predictions.json")
        write_json(folder / "predictions.json", merged())

    folds_runtime.run(folds, places, done)
    return {name: ImagePredictions(**p) for name, p in merged().items()}


def run_fold(spec_path: Path) -> int:
    """One fold in this process (``python -m drip.runtime.audit --fold FOLD_JSON``): its stages,
    then its out-of-fold predictions to its predictions.json. session.json's ``fold`` entry says
    which process ran it, when and where."""
    folds_runtime.pin_cpus()
    start_clock()
    started = time.time()
    spec = read_json(spec_path)
    fold = Session(Path(spec["session"]))
    config = Config().updated(spec["config"], str(spec_path))
    env = os.environ.get
    console.info(f"audit {fold.root.name} in a process of its own: pid {os.getpid()}, CUDA_VISIBLE_DEVICES="
                 f"{env('CUDA_VISIBLE_DEVICES')}, OMP_NUM_THREADS={env('OMP_NUM_THREADS')}, cores {env(folds_runtime.CPUS_ENV)}")
    local.run_all_stages(fold, config, None, 1)
    from ..evaluation.audit import ImageLabels

    held = [Item(ImageLabels(name, [], []), Path(path), name) for name, path in spec["predict"]]
    predictions = predict_items(fold.model_path, held, config)
    write_json(Path(spec["predictions"]), {name: p.__dict__ for name, p in predictions.items()})
    fold.record_stage("fold", pid=os.getpid(), started_at=round(started, 3), finished_at=round(time.time(), 3),
                      cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                      cores=os.environ.get(folds_runtime.CPUS_ENV))
    return 0


def read_dataset(config: Config) -> tuple[list[Item], Path]:
    """Every labelled image (the source's, its own eval set's, --eval_json_path's), and the folder
    every path lies under."""
    from ..data.annotations import load_annotations
    from ..evaluation.audit import ImageLabels

    image_folder = Path(config.image_folder_path)
    annotations = load_annotations(Path(config.src_json_path), image_folder)
    parts = [annotations] + ([annotations.eval] if annotations.eval is not None else [])
    if config.eval_json_path is not None:
        parts.append(load_annotations(Path(config.eval_json_path), image_folder))
    found: dict[Path, tuple[object, object]] = {}
    for part in parts:
        base = Path(os.path.abspath(part.image_root if part.image_root is not None else image_folder))
        for image in part.images:
            found.setdefault(base / image.file, (image, part))
    if not found:
        raise InputError(f"--src_json_path {config.src_json_path}: lists no images; nothing to audit")
    root = Path(os.path.commonpath([str(p.parent) for p in found]))
    items = []
    for path, (image, _) in found.items():
        labels = ImageLabels(image.file, [list(map(float, b)) for b in image.boxes], list(image.labels))
        items.append(Item(labels, path, path.relative_to(root).as_posix()))
    return items, root


def _drip_entry(item: Item) -> dict:
    return {"file": item.name, "objects": [{"label": label, "box": box}
                                           for box, label in zip(item.labels.boxes, item.labels.labels)]}


def predict_items(model_path: Path, items: list[Item], config) -> dict[str, object]:
    """``ImagePredictions`` of each item (by its name in the annotations), every score kept."""
    from ..evaluation.audit import ImagePredictions

    by_path = {str(item.path): item.labels.image for item in items}
    found = predict_paths(model_path, [item.path for item in items], config.device, config.batch_size)
    return {by_path[str(path)]: ImagePredictions(by_path[str(path)], boxes, labels, scores)
            for path, (boxes, labels, scores) in found.items()}


def predict_paths(model_path: Path, paths: list[Path], device_name: str, batch_size: int,
                  image_size: int | None = None, sizes: dict | None = None, tiles: tuple = (None, None, False)):
    """{path: (boxes, class names, scores)} of a Drip model on image files; an unreadable image is
    left out with a warning. ``sizes`` (if given) gets each image's (width, height)."""
    from ..data.images import open_rgb
    from ..data.tiling import resolve_slicing
    from ..detectors.models import load_model, resolve_device
    from ..evaluation.metrics import predict

    device = resolve_device(device_name)
    loaded = load_model(model_path, device)
    slicing = resolve_slicing(*tiles, loaded.meta)

    def images():
        for path in paths:
            try:
                image = open_rgb(path)
            except InputError as exc:
                console.warn(f"{exc}; left out")
                continue
            if sizes is not None:
                sizes[str(path)] = image.size
            yield str(path), image

    bar = console.progress(images(), total=len(paths), desc="predict")
    try:
        detections = predict(loaded.model, bar, image_size=int(image_size or loaded.image_size), device=device,
                             batch_size=batch_size, slicing=slicing)
    finally:
        bar.close()
    out = {}
    for det in detections:
        names = [loaded.classes[int(label) - 1] if 1 <= int(label) <= len(loaded.classes) else str(int(label))
                 for label in det.labels]
        out[det.image_id] = ([[round(float(v), 2) for v in box] for box in det.boxes], names,
                             [round(float(s), 5) for s in det.scores])
    return out


def suggested_coco(images, issues) -> dict:
    """The annotations with the sure suggestions applied, as COCO instances JSON; each changed or
    added box carries ``drip_issue`` (its kind), for a labelling tool's review."""
    from ..evaluation.audit import apply_suggestions

    applied = apply_suggestions(images, issues)
    classes = sorted({label for _, _, labels, _ in applied for label in labels})
    ids = {name: i + 1 for i, name in enumerate(classes)}
    out_images, annotations = [], []
    for image_id, (name, boxes, labels, changes) in enumerate(applied, 1):
        out_images.append({"id": image_id, "file_name": name})
        for box, label, change in zip(boxes, labels, changes):
            x0, y0, x1, y1 = (float(v) for v in box)
            row = {"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[label],
                   "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                   "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0}
            if change:
                row["drip_issue"] = change
            annotations.append(row)
    return {"info": {"description": "drip audit: the annotations with its suggestions scored 0.5 and up applied"},
            "images": out_images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in ids.items()]}


def select(session_folder: Path, overrides: dict):
    """``drip select``: the unlabelled images worth labelling next, best first, to ``--output``."""
    from ..evaluation import select as logic
    from ..evaluation.metrics import set_aside
    from ..evaluation.results import find_images, resolve_model_path

    config = SelectConfig().updated(overrides, CLI)
    model_path = resolve_model_path(config.model, Path(session_folder))
    output = Path(config.output)
    if output.is_dir():
        raise InputError(f"--output {output} is a folder; name the JSON file to write")
    jobs = [job for group in find_images(Path(config.images_path)).values() for job in group]
    sizes: dict[str, tuple[int, int]] = {}
    found = predict_paths(model_path, [job.path for job in jobs], config.device, config.batch_size,
                          config.image_size, sizes, (config.tile_size, config.tile_overlap, config.tile_full_pass))
    from ..data.images import open_rgb

    candidates = []
    for job in jobs:
        if str(job.path) not in found:
            continue
        boxes, labels, scores = found[str(job.path)]
        candidates.append(logic.Candidate(job.rel, boxes, labels, scores, sizes[str(job.path)],
                                          logic.thumbnail(open_rgb(job.path))))
    if not candidates:
        raise InputError(f"--images_path {config.images_path}: none of its images could be read")
    chosen = logic.choose(candidates, config.count)
    where = {job.rel: str(job.path) for job in jobs}
    chosen = [{"image": row["image"], "path": where[row["image"]], **row} for row in chosen]
    output.parent.mkdir(parents=True, exist_ok=True)
    moved = set_aside(output)
    if moved:
        console.info(f"moved the earlier {output.name} to {moved}")
    write_json(output, {"model": str(model_path), "images_path": str(config.images_path),
                        "candidates": len(candidates), "images": chosen})
    console.info(f"select: {len(chosen)} of {len(candidates)} images chosen, best first, in {output}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m drip.runtime.audit",
                                description="One fold of drip audit in a process of its own (drip.runtime.folds starts it).")
    p.add_argument("--fold", required=True, metavar="FOLD_JSON", help="the fold's fold.json, written by drip audit")
    return guarded(run_fold, Path(p.parse_args(argv).fold))


if __name__ == "__main__":
    sys.exit(main())
