#!/usr/bin/env python3
"""Memory of training: peak RSS over 1,000 against 10,000 records. Reading must stream.

    .venv/bin/python bench/memory.py            # 1,000 and 10,000 records
    .venv/bin/python bench/memory.py --quick    # 200 and 2,000 records: checks the script works

Writes two sessions whose TFRecord shards hold N and 10 N records (320x240 JPEGs, about 15 kB
each, so a reader that kept the image bytes would grow by about 150 MB per 10,000 records), then
trains each for the same few steps with Drip's train stage in a child process (its default
data-loading workers) and samples the resident memory of that process and of its workers every
100 ms (RSS of the training process; PSS, which splits shared pages, of it and its workers
together). Prints the peaks and the ratio: 1.0 means memory does not grow with the dataset.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, parser, report  # noqa: E402

CHILD = """
import sys
sys.path.insert(0, {root!r})
from drip.config import Config
from drip.session import Session
from drip.stages import train
config = Config().updated({config!r}, "bench")
from pathlib import Path
train.run(Session(Path({session!r})), config)
"""


def write_session(folder: Path, n: int, pool: list[tuple[bytes, list, list]]) -> Path:
    """A session holding ``n`` training records (cycling through ``pool``), as the records stage leaves it."""
    from drip.data.labelmap import LabelMap
    from drip.session import Session, write_json
    from drip.data.synthetic import CLASSES
    from drip.data.tfrecord import DetectionExample, TFRecordWriter, encode_example

    session = Session(folder)
    session.start_new()
    session.records_dir.mkdir(parents=True, exist_ok=True)
    LabelMap.from_names(CLASSES).write(session.label_map_path)
    per_shard = 1000
    count = -(-n // per_shard)
    names = [f"train-{i:05d}-of-{count:05d}.tfrecord" for i in range(count)]
    for shard, name in enumerate(names):
        with TFRecordWriter(session.records_dir / name) as writer:
            for i in range(shard * per_shard, min(n, (shard + 1) * per_shard)):
                encoded, boxes, labels = pool[i % len(pool)]
                writer.write(encode_example(DetectionExample(
                    encoded=encoded, format="jpeg", filename=f"img_{i:06d}.jpg", source_id=f"img_{i:06d}.jpg",
                    width=320, height=240, boxes=boxes, labels=labels, texts=[CLASSES[k - 1] for k in labels],
                )))
    write_json(session.records_dir / "records.json", {
        "train": {"shards": names, "count": n},
        "eval": {"shards": [], "count": 0},
        "classes": list(CLASSES),
    })
    return folder


def image_pool(k: int = 32) -> list[tuple[bytes, list, list]]:
    import numpy as np

    from drip.data.images import encode_jpeg
    from drip.data.synthetic import CLASSES, draw_scene

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(k):
        image, boxes, labels = draw_scene(rng, 320, 240)
        normalized = [[b[0] / 320, b[1] / 240, min(b[2] / 320, 1.0), min(b[3] / 240, 1.0)] for b in boxes]
        pool.append((encode_jpeg(image, quality=90), normalized, [CLASSES.index(x) + 1 for x in labels]))
    return pool


def rss_kb(pid: int) -> int:
    return _proc_kb(f"/proc/{pid}/status", "VmRSS:")


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages split between the processes that share them."""
    return _proc_kb(f"/proc/{pid}/smaps_rollup", "Pss:")


def _proc_kb(path: str, key: str) -> int:
    """The kB figure on the ``key`` line of a /proc file; 0 when the process is gone."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            found += [int(c) for c in text]
    except OSError:
        pass
    return found


def train_peak(session: Path, config: dict) -> tuple[int, int, float]:
    """(peak RSS of the training process, peak PSS of it and its workers) in kB, and the seconds it ran."""
    code = CHILD.format(root=str(ROOT), config=config, session=str(session))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    main_peak = total_peak = 0
    while proc.poll() is None:
        own = rss_kb(proc.pid)
        main_peak = max(main_peak, own)
        # Workers are forked: their RSS counts the pages they share with the parent again.
        total_peak = max(total_peak, pss_kb(proc.pid) + sum(pss_kb(c) for c in children(proc.pid)))
        time.sleep(0.1)  # smaps_rollup walks the page tables: sampling costs CPU
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{err[-3000:]}")
    return main_peak, total_peak, time.perf_counter() - start


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--records", type=int, default=None, help="the smaller dataset (default 1000, quick 200); the larger is 10x")
    p.add_argument("--steps", type=int, default=None, help="training steps on each (default 30, quick 6)")
    args = p.parse_args()
    if not Path("/proc/self/status").exists():
        raise SystemExit("this benchmark reads /proc: run it on Linux")
    small = args.records or (200 if args.quick else 1000)
    steps = args.steps or (6 if args.quick else 30)
    info = machine("cpu")
    config = {
        "network": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none", "image_size": 160,
        "batch_size": 4, "number_of_steps": steps, "checkpoint_every": steps, "device": "cpu", "log_every": 5,
    }
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="drip-bench-mem-"))
    results = {}
    try:
        pool = image_pool()
        for n in (small, small * 10):
            folder = write_session(workdir / f"session-{n}", n, pool)
            size_mb = sum(f.stat().st_size for f in (folder / "dl" / "records").glob("*.tfrecord")) / 1e6
            main_kb, total_kb, seconds = train_peak(folder, config)
            results[n] = {"records_mb": round(size_mb, 1), "peak_rss_mb": round(main_kb / 1024, 1),
                          "peak_pss_with_workers_mb": round(total_kb / 1024, 1), "seconds": round(seconds, 1)}
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    a, b = results[small], results[small * 10]
    ratio_main = b["peak_rss_mb"] / a["peak_rss_mb"]
    ratio_total = b["peak_pss_with_workers_mb"] / a["peak_pss_with_workers_mb"]
    figures = {"steps": steps, "config": config, "by_records": {str(k): v for k, v in results.items()},
               "ratio_peak_rss": round(ratio_main, 3), "ratio_peak_pss_with_workers": round(ratio_total, 3)}
    lines = [f"training {steps} steps of {config['network']} at {config['image_size']} px, batch {config['batch_size']}, CPU"]
    for n, r in results.items():
        lines.append(
            f"{n:>6} records ({r['records_mb']:.0f} MB of shards): peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"with workers (PSS) {r['peak_pss_with_workers_mb']:.0f} MB"
        )
    lines.append(
        f"ratio {small * 10} / {small} records: {ratio_main:.2f} (training process), {ratio_total:.2f} "
        f"(with workers); streaming means ~1.0 (goal: no growth with the dataset)"
    )
    report("memory", info, figures, lines, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
