#!/usr/bin/env python3
"""Training throughput: Drip's train stage against a torchvision-reference training loop.

    .venv/bin/python bench/train_throughput.py            # CPU: 24 measured steps each
    .venv/bin/python bench/train_throughput.py --quick    # 4 measured steps: checks the script works

Both sides train the same network (``--network``, random weights: no download) on the same
images (synthetic 640x480 JPEGs, no augmented copies) at the same batch and image size:

* drip: ``drip.stages.train.run`` as ``drip train`` runs it, on the TFRecords the split and
  records stages write, with its defaults (workers per core, pinned memory and mixed precision
  on CUDA, losses read every ``log_every`` steps, gradient clipping, the weights' moving average)
  except the per-sample augmentation, set to a horizontal flip like the reference's;
* reference: the loop of torchvision's ``references/detection`` (``train.py`` +
  ``engine.train_one_epoch``): a map-style dataset decoding each JPEG with Pillow and
  ``PILToTensor`` + ``ToDtype``, random horizontal flip, a DataLoader with ``--ref_workers``
  workers (the reference's ``-j 4``) and ``collate_fn = tuple(zip(*batch))``, a list of image
  tensors moved with ``.to(device)`` one by one, SGD (momentum 0.9, weight decay 1e-4) with a
  linear warmup, the detector's own transform resizing the full image, and ``.item()`` on the
  total and every loss each step (its MetricLogger), no mixed precision (its default).

Both loops' DataLoaders are wrapped to time each ``next()``: the data-wait fraction is the time
blocked waiting for a batch over the step time. The first ``--warmup`` steps (worker start-up,
allocator, cuDNN autotuning) are left out of every figure. Goal: Drip at least 1.2x the
reference on a GPU and not slower on the CPU, with data wait under 5% of the step time.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, parser, report  # noqa: E402


class StepClock:
    """Timestamps of each batch's arrival and the time spent waiting for it."""

    def __init__(self):
        self.arrivals: list[float] = []
        self.waits: list[float] = []

    def wrap(self, iterator):
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            now = time.perf_counter()
            self.waits.append(now - start)
            self.arrivals.append(now)
            yield batch

    def window(self, skip: int) -> tuple[int, float, float]:
        """(steps, seconds, seconds waiting for data) from the arrival of batch ``skip`` to the last.

        Step i runs from batch i's arrival to batch i+1's, so its wait is batch i+1's.
        """
        last = len(self.arrivals) - 1
        if last <= skip:
            raise SystemExit(f"only {len(self.arrivals)} steps ran; raise --steps above --warmup")
        seconds = self.arrivals[last] - self.arrivals[skip]
        return last - skip, seconds, sum(self.waits[skip + 1: last + 1])


@contextlib.contextmanager
def clocked_dataloaders(clock: StepClock):
    """Every DataLoader made inside times its batches with ``clock`` (Drip's train stage makes its own)."""
    import torch.utils.data

    original = torch.utils.data.DataLoader

    class ClockedDataLoader(original):
        def __iter__(self):
            return clock.wrap(super().__iter__())

    torch.utils.data.DataLoader = ClockedDataLoader
    try:
        yield
    finally:
        torch.utils.data.DataLoader = original


def prepare(workdir: Path, n: int):
    """Images, annotations and a Drip session through split and records (no augmented copies)."""
    from drip.config import Config
    from drip.session import Session
    from drip.stages import augment, configure, records, split
    from drip.data.synthetic import make_dataset, write_drip_json

    images = workdir / "images"
    write_drip_json(workdir / "metadata.json", make_dataset(images, n, size=(640, 480), seed=0))
    session = Session(workdir / "pipeline")
    session.start_new()
    config = Config().updated(
        {"src_json_path": str(workdir / "metadata.json"), "image_folder_path": str(images),
         "augmentations": 0, "eval_percentage": 0},
        "bench",
    )
    with contextlib.redirect_stderr(io.StringIO()):
        for stage in (split, augment, records):
            stage.run(session, config)
        configure.run(session, config, check_model=False)
    return session, config


def run_drip(session, config, clock: StepClock):
    from drip.stages import train

    with clocked_dataloaders(clock), contextlib.redirect_stderr(io.StringIO()):
        return train.run(session, config)


class ReferenceDataset:
    """The reference's CocoDetection + presets, on Drip's split manifest: decode, flip, tensors."""

    def __init__(self, session, flip: float = 0.5):
        from drip.data.dataset import read_drip_json, resolve_image
        from drip.session import read_json

        data = read_json(session.train_manifest)
        root = Path(data["image_root"])
        ids = {name: i for i, name in enumerate(data["classes"], start=1)}
        self.items = [
            (resolve_image(root, a.file), a.boxes, [ids[label] for label in a.labels])
            for a in read_drip_json(data, str(session.train_manifest))
        ]
        self.flip = flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image
        from torchvision.transforms import v2 as T

        path, boxes, labels = self.items[index]
        image = Image.open(path).convert("RGB")
        image = T.functional.to_dtype(T.functional.pil_to_tensor(image), torch.float, scale=True)
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if torch.rand(1) < self.flip:
            width = image.shape[-1]
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64)}


def collate_fn(batch):
    return tuple(zip(*batch))


def run_reference(session, network: str, image_size: int, batch_size: int, steps: int, workers: int, device, clock: StepClock):
    import torch

    from drip.detectors import models
    from drip.data.synthetic import CLASSES

    torch.manual_seed(0)
    model = models.build_model(network, len(CLASSES) + 1, "none", image_size).to(device)
    dataset = ReferenceDataset(session)
    sampler = torch.utils.data.RandomSampler(dataset)
    batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.02 / 16 * batch_size, momentum=0.9, weight_decay=1e-4)
    warmup_iters = min(1000, len(loader) - 1)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.001, total_iters=warmup_iters)
    model.train()
    done = 0
    while done < steps:  # epochs, as train.py's loop over train_one_epoch
        for images, targets in clock.wrap(iter(loader)):
            images = list(image.to(device) for image in images)
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
            loss_value = losses.item()
            if not math.isfinite(loss_value):
                raise SystemExit(f"reference loss is {loss_value}")
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            scheduler.step()
            {k: v.item() for k, v in loss_dict.items()}  # MetricLogger.update
            done += 1
            if done >= steps:
                break


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--network", default=None, help="default: fasterrcnn_mobilenet_v3_large_320_fpn on CPU, "
                   "fasterrcnn_mobilenet_v3_large_fpn on GPU")
    p.add_argument("--image_size", type=int, default=None, help="default: 320 on CPU, 640 on GPU")
    p.add_argument("--batch_size", type=int, default=None, help="default: 4 on CPU, 16 on GPU")
    p.add_argument("--steps", type=int, default=None, help="measured steps per side (default 24 CPU, 100 GPU; quick 4)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out first (default 3; 10 on GPU)")
    p.add_argument("--images", type=int, default=64, help="synthetic training images (default 64)")
    p.add_argument("--ref_workers", type=int, default=4, help="the reference's DataLoader workers (its -j, default 4)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args()

    import torch

    from drip.detectors import models

    device = models.resolve_device(args.device)
    gpu = device.type == "cuda"
    network = args.network or ("fasterrcnn_mobilenet_v3_large_fpn" if gpu else "fasterrcnn_mobilenet_v3_large_320_fpn")
    size = args.image_size or (640 if gpu else 320)
    batch = args.batch_size or (16 if gpu else 4)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 3)
    steps = args.steps or (4 if args.quick else 100 if gpu else 24)
    info = machine(str(device))
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="drip-bench-train-"))
    try:
        session, config = prepare(workdir, args.images)
        settings = {"network": network, "weights": "none", "image_size": size, "batch_size": batch,
                    "number_of_steps": warmup + steps + 1, "checkpoint_every": warmup + steps + 1,
                    "device": device.type}
        if "online_augmentation" in config.fields():
            settings["online_augmentation"] = "flip"  # the reference's only augmentation
        config = config.updated(settings, "bench")
        ref_clock, drip_clock = StepClock(), StepClock()
        run_reference(session, network, size, batch, warmup + steps + 1, args.ref_workers, device, ref_clock)
        if gpu:
            torch.cuda.synchronize()
        result = run_drip(session, config, drip_clock)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    figures = {"network": network, "image_size": size, "batch_size": batch, "measured_steps": steps, "warmup_steps": warmup}
    rates = {}
    for name, clock in (("reference", ref_clock), ("drip", drip_clock)):
        n, seconds, waiting = clock.window(warmup)
        rates[name] = n * batch / seconds
        figures[name] = {
            "images_per_s": round(rates[name], 2),
            "data_wait_fraction": round(waiting / seconds, 4),
            "steps": n,
        }
    from drip.training.loop import num_workers

    figures["drip"]["workers"] = num_workers(config.num_workers)
    figures["drip"]["stage_reported_images_per_s"] = round(result.images_per_sec or 0.0, 2)
    ratio = rates["drip"] / rates["reference"]
    figures["ratio_drip_to_reference"] = round(ratio, 3)
    goal = 1.2 if gpu else 1.0
    wait = figures["drip"]["data_wait_fraction"]
    lines = [
        f"model: {network} at {size} px, batch {batch}, {steps} measured steps after {warmup}, device {device}",
        f"reference loop ({args.ref_workers} workers): {rates['reference']:.2f} images/s, "
        f"data wait {figures['reference']['data_wait_fraction']:.1%} of step time",
        f"drip train stage: {rates['drip']:.2f} images/s, data wait {wait:.1%} of step time",
        f"ratio drip / reference: {ratio:.2f} (goal >= {goal}: {'met' if ratio >= goal else 'NOT met'}); "
        f"data wait goal < 5%: {'met' if wait < 0.05 else 'NOT met'}",
    ]
    report("training throughput", info, figures, lines, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
