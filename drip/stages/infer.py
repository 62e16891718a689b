"""Inference: run an exported model on a folder of folders of images and write what it found.

Reads   ``<session_folder>/dl/model.pt`` (or ``--model``: a model file or a session folder) and
        every image under ``--images_path``, recursively.
Writes  for each group (below), under ``<results_path>/<group>/``:

        ``<relative stem>.jpg``   the image as displayed, with its detections drawn
        ``<relative stem>.json``  its detections::

            {"image": "cam 1/day/a.jpg", "width": 640, "height": 480,
             "detections": [{"class_id": 1, "label": "cat", "score": 0.9731,
                             "box": [12.0, 30.5, 200.0, 310.0],
                             "box_normalized": [0.01875, 0.063542, 0.3125, 0.645833]}]}

        ``detections.json``       every image's record, the images that failed to decode
                                  (``errors``), the model, threshold and counts

        With ``--src_json_path`` (annotations of these images, any format Drip reads), also
        at the top of ``<results_path>``:

        ``metrics.json``          COCO metrics of the model on the annotated images (as
                                  ``drip evaluate`` writes them; see ``drip.evaluation.metrics``), and
                                  under ``at_threshold`` what the drawn results show at
                                  ``--threshold``: the images with every object found (IoU
                                  0.5, right class) and the false boxes
        ``coco_results.json``     for COCO annotations: every detection of the annotated
                                  images as ``[{"image_id", "category_id", "bbox": [x, y, w, h],
                                  "score"}]`` in the file's own image and category ids, for
                                  COCO tooling (pycocotools' ``loadRes``)

        Both hold all detections down to ``drip.evaluation.metrics.EVAL_SCORE_FLOOR``, as AP needs;
        ``--threshold`` still decides what is drawn and listed per image.
Moves   an earlier ``<results_path>/<group>/`` (and ``metrics.json``, ``coco_results.json``)
        to ``<results_path>/trash/<timestamp>/`` first: results are never overwritten.

Groups: an image under ``<images_path>/<folder>/...`` belongs to group ``<folder>`` (deeper
sub-folders are kept inside the group's results); images directly in ``<images_path>`` form a
group named after that folder. Files and folders whose name starts with a dot are skipped: they
are system clutter (``.DS_Store``, macOS ``._x.jpg`` resource forks), not photos.

``box`` is ``[xmin, ymin, xmax, ymax]`` in pixels of the image as displayed (after EXIF
rotation), the same convention as Drip JSON annotations; ``image`` is relative to
``images_path``. Two images whose outputs would share a name (``a.jpg`` and ``a.png`` in one
folder) are told apart by keeping the extension of every one after the first in sorted order:
``a.json`` / ``a.jpg`` and ``a.png.json`` / ``a.png.jpg``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .. import detectors
from ..config import InferConfig
from ..console import info
from ..data.detections import to_detections_np
from ..data.tiling import Slicing, resolve_slicing
from ..detectors import forward_batch, to_detections
from ..errors import ConfigError, ModelError
from ..evaluation.results import (
    COCO_RESULTS,
    METRICS,
    ImageJob,
    InferResult,
    find_images,
    resolve_model_path,
    run_groups,
    summary,
    trash_earlier_results,
)
from ..session import Session


# -- entry point ------------------------------------------------------------------------------
def run(config: InferConfig, session_folder: Path | Session) -> InferResult:
    """Run the model chosen by ``config`` on every image under ``config.images_path``."""
    root = session_folder.root if isinstance(session_folder, Session) else Path(session_folder)
    model_path = resolve_model_path(config.model, root)
    # Find the images before loading the model: a typo in --images_path should fail in a blink.
    groups = find_images(Path(config.images_path), Path(config.results_path))
    annotations = _read_annotations(config)
    from ..detectors.models import load_model, resolve_device

    device = resolve_device(config.device)
    from ..training import distributed

    ctx = distributed.context()
    if ctx.distributed and device.type == "cuda":
        device = ctx.cuda_device()  # one GPU per process, or shared where there are fewer
        torch.cuda.set_device(device)
    loaded = load_model(model_path, device)
    return run_loaded(config, loaded, model_path, device, groups, annotations)


def run_loaded(
    config: InferConfig,
    loaded: Any,
    model_path: Path,
    device: torch.device | str = "cpu",
    groups: dict[str, list[ImageJob]] | None = None,
    annotations: Any = None,
) -> InferResult:
    """``run`` with the model already loaded (and ``annotations`` already read, if any).

    ``loaded`` needs ``model`` (a torchvision-style detector: a list of CHW float tensors in,
    one ``{"boxes", "scores", "labels"}`` dict per image out, boxes in input pixels),
    ``classes`` (names, id 1 first) and ``image_size``, as ``drip.detectors.models.LoadedModel`` has.
    """
    started = time.perf_counter()
    images_path, results_path = Path(config.images_path), Path(config.results_path)
    if groups is None:
        groups = find_images(images_path, results_path)
    size = config.image_size or getattr(loaded, "image_size", None)
    if not size:
        raise ModelError(f"{model_path}: the model does not record its image size; pass --image_size")
    size = int(size)
    names = list(getattr(loaded.classes, "names", loaded.classes))
    slicing = resolve_slicing(config.tile_size, config.tile_overlap, config.tile_full_pass, getattr(loaded, "meta", {}))
    model = loaded.model.eval()
    detectors.set_input_size(model, size)
    device = torch.device(device)
    if annotations is None:
        annotations = _read_annotations(config)
    scoring = None
    if annotations is not None:
        from ..evaluation.metrics import Scoring

        scoring = Scoring(annotations, names, str(config.src_json_path))

    from ..training import distributed

    ctx = distributed.context()  # under torchrun: the images shared over the processes
    if ctx.distributed:
        if scoring is not None:
            raise ConfigError(
                f"--src_json_path {config.src_json_path} with several processes: scoring needs every "
                "prediction in one process; score with one (--nproc_per_node 1), or run 'drip evaluate'"
            )
        ctx.init(device, 30.0)
    if ctx.is_main:
        trash_earlier_results(results_path, list(groups) + [METRICS, COCO_RESULTS])
    ctx.barrier()  # the earlier results are gone before any rank writes
    index = {
        "images_path": str(images_path),
        "model": str(model_path),
        "network": getattr(loaded, "network", None),
        "classes": names,
        "threshold": config.threshold,
        "image_size": size,
        "tiling": slicing.to_json() if slicing else None,
    }

    def predict(batch: Sequence[tuple[ImageJob, Image.Image]]) -> list[list[dict[str, Any]]]:
        return _predict_batch(model, batch, size, device, names, config.threshold, config.batch_size, scoring, slicing)

    # --threshold is the user's filter, so a threshold under the model's own floor (torchvision's
    # is 5%) must see the boxes it would drop; while scoring, AP needs the whole curve.
    floor = detectors.EVAL_SCORE_FLOOR if scoring else config.threshold / 100.0
    with detectors.evaluation_mode(model, score_floor=floor):
        # Sliced, one image is decoded at a time and its tiles make the batches.
        out_dirs, n_images, n_detections, n_failed = run_groups(
            groups, results_path, 1 if slicing else config.batch_size, predict, index,
            share=ctx if ctx.distributed else None,
        )

    seconds = time.perf_counter() - started
    info(summary(n_images, n_detections, seconds, results_path, len(out_dirs), n_failed))
    # The scores come last: what a user reads at the end of a run.
    metrics = None
    if scoring:
        from ..evaluation.metrics import write_scores

        metrics = write_scores(scoring, results_path, config, model_path, loaded, size)
    return InferResult(
        groups=out_dirs, images=n_images, detections=n_detections, seconds=seconds, failed=n_failed, metrics=metrics
    )


# -- scoring against annotations (--src_json_path) --------------------------------------------
def _read_annotations(config: InferConfig) -> Any:
    if not config.src_json_path:
        return None
    from ..data.annotations import load_for_scoring

    # Annotation paths are relative to the image folder, as infer's image paths are.
    return load_for_scoring(Path(config.src_json_path), Path(config.images_path))


# -- the model --------------------------------------------------------------------------------
def _predict_batch(
    model: torch.nn.Module,
    batch: Sequence[tuple[ImageJob, Image.Image]],
    size: int,
    device: torch.device,
    names: list[str],
    threshold: float,
    batch_size: int,
    scoring: Any = None,
    slicing: Slicing | None = None,
) -> list[list[dict[str, Any]]]:
    """The detection records of each image of ``batch`` (and each fed to ``scoring``)."""
    if slicing is not None:
        from ..evaluation.metrics import predict_sliced

        out = []
        for job, image in batch:
            found = predict_sliced(model, job.rel, image, size, device, batch_size, slicing)
            if scoring is not None and scoring.wants(job.rel):
                scoring.add(job.rel, image.size, found)
            out.append(to_detections_np(
                found.boxes, found.scores, found.labels,
                size=image.size, resized=image.size, threshold=threshold, names=names,
            ))
        return out
    results = forward_batch(model, [image for _, image in batch], size, device, batch_size)
    out = []
    for (job, image), (output, shape) in zip(batch, results):
        if scoring is not None and scoring.wants(job.rel):
            from ..evaluation.metrics import detections_from_output

            scoring.add(job.rel, image.size, detections_from_output(job.rel, output, image.size, shape))
        out.append(
            to_detections(
                output["boxes"], output["scores"], output["labels"],
                size=image.size, resized=shape, threshold=threshold, names=names,
            )
        )
    return out
