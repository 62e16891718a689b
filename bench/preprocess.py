#!/usr/bin/env python3
"""Pre-processing throughput: Drip's split + augment + records against the JPEG codec limit.

    .venv/bin/python bench/preprocess.py            # 300 images of 640x480
    .venv/bin/python bench/preprocess.py --quick    # 60 images: checks the script works

Writes a few hundred synthetic 640x480 JPEGs, then in one run measures

* the codec limit: every image decoded and encoded again (Pillow, JPEG quality 95, what the
  augment stage writes), in a process pool over every core: the fastest any pre-processing
  that touches each image's pixels once could go;
* Drip: the split, augment (``--augmentations`` copies of each training image, default 1 as
  in Drip) and records stages, as ``drip train`` runs them, with their default worker counts;

and prints both in source images per second, the ratio (goal: Drip within 2x of the codec
limit, i.e. ratio >= 0.5) and how busy the cores were (CPU seconds / (wall seconds x cores)).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, cores, machine, parser, report  # noqa: E402


def _decode_encode(path: str) -> int:
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=95)
    return len(out.getvalue())


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def codec_limit(paths: list[Path], workers: int) -> tuple[float, float]:
    """Seconds to decode + encode every image on ``workers`` processes, and the cores' busy share."""
    context = multiprocessing.get_context("spawn")  # as the stages start their pools
    cpu = cpu_seconds()
    with Timer() as t:
        with context.Pool(workers) as pool:
            list(pool.imap_unordered(_decode_encode, [str(p) for p in paths], chunksize=4))
    return t.seconds, (cpu_seconds() - cpu) / (t.seconds * cores())


def drip_stages(workdir: Path, images: Path, metadata: Path, copies: int) -> tuple[dict[str, float], float]:
    from drip.config import Config
    from drip.session import Session
    from drip.stages import augment, records, split

    session = Session(workdir / "pipeline")
    session.start_new()
    config = Config().updated(
        {"src_json_path": str(metadata), "image_folder_path": str(images), "augmentations": copies},
        "bench",
    )
    seconds = {}
    cpu = cpu_seconds()
    with Timer() as total:
        for name, stage in (("split", split), ("augment", augment), ("records", records)):
            with Timer() as t:
                stage.run(session, config)
            seconds[name] = t.seconds
    seconds["total"] = total.seconds
    return seconds, (cpu_seconds() - cpu) / (total.seconds * cores())


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=None, help="synthetic images to make (default 300, quick 60)")
    p.add_argument("--augmentations", type=int, default=1, help="augmented copies per image (default 1, Drip's default)")
    args = p.parse_args()
    n = args.images or (60 if args.quick else 300)
    info = machine("cpu")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="drip-bench-pre-"))
    try:
        from drip.data.synthetic import make_dataset, write_drip_json

        images = workdir / "images"
        annotations = make_dataset(images, n, size=(640, 480), seed=0)
        metadata = workdir / "metadata.json"
        write_drip_json(metadata, annotations)
        paths = [images / a.file for a in annotations]
        # Warm the page cache and the pool machinery once, so neither side pays for it alone.
        codec_limit(paths[: cores() * 4], cores())

        codec_s, codec_busy = codec_limit(paths, cores())
        stages, drip_busy = drip_stages(workdir, images, metadata, args.augmentations)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    codec_rate = n / codec_s
    drip_rate = n / stages["total"]
    ratio = drip_rate / codec_rate
    figures = {
        "images": n,
        "image_size": [640, 480],
        "augmentations": args.augmentations,
        "codec_limit_images_per_s": round(codec_rate, 1),
        "drip_images_per_s": round(drip_rate, 1),
        "ratio_drip_to_codec": round(ratio, 3),
        "stage_seconds": {k: round(v, 2) for k, v in stages.items()},
        "cores_busy": {"codec": round(codec_busy, 2), "drip": round(drip_busy, 2)},
    }
    lines = [
        f"images: {n} synthetic JPEGs of 640x480, {args.augmentations} augmented copies each "
        "(of the training images: the default 20% held out for evaluation get none)",
        f"codec limit (decode + encode, {cores()} processes): {codec_rate:.1f} images/s, cores busy {codec_busy:.0%}",
        f"drip split+augment+records: {drip_rate:.1f} images/s, cores busy {drip_busy:.0%} "
        f"(split {stages['split']:.1f} s, augment {stages['augment']:.1f} s, records {stages['records']:.1f} s)",
        f"ratio drip / codec limit: {ratio:.2f} (goal >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'})",
    ]
    report("pre-processing", info, figures, lines, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
