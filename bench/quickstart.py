#!/usr/bin/env python3
"""The quick start as a new user meets it: how long ``scripts/quickstart.sh`` takes, what it finds.

Runs ``scripts/quickstart.sh`` (the install already done: its ``scripts/setup.sh`` then only
checks a stamp), timed from start to end, then reads ``files/results/metrics.json``, which its
inference wrote by scoring the drawn results against ``files/test_images/annotations.json``.
It prints the figures beside the goals a first run has to meet on a 2-core CPU without a GPU:

* at most 300 s from start to end, training and inference;
* on at least 6 of the 8 test images, every object has a box of its class at IoU 0.5 or more
  above the quick start's threshold (50%);
* at most 2 false boxes on all of them.

    .venv/bin/python bench/quickstart.py                        # the quick start as shipped
    .venv/bin/python bench/quickstart.py --runtime auto         # as the script decides (Docker if it answers)
    .venv/bin/python bench/quickstart.py -- --number_of_steps 100   # extra flags for training

The quick start writes to ``pipeline/`` and ``files/results/`` of this checkout, as for a user
(earlier results go to their ``trash/`` folders). It prints where each goal stands; it is a
measurement, not a test: ``tests/test_quickstart.py`` asserts the detections of the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, parser, report  # noqa: E402

GOAL_SECONDS = 300
GOAL_COMPLETE_IMAGES = 6
GOAL_FALSE_BOXES = 2
METRICS = ROOT / "files" / "results" / "metrics.json"


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--runtime", choices=("local", "docker", "auto"), default="local",
                   help="DRIP_RUNTIME for the quick start (default: local, so PyTorch's speed is measured, "
                        "not an image build)")
    p.add_argument("--log", metavar="PATH", help="write the quick start's output here (default: only its last lines are shown)")
    p.add_argument("extra", nargs="*", help="extra flags for training_starter.py (after --)")
    args = p.parse_args(argv)
    extra = list(args.extra) + (["--number_of_steps", "100"] if args.quick else [])
    info = machine()

    env = {**os.environ, "DRIP_RUNTIME": args.runtime}
    started = time.perf_counter()
    run = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh"), *extra], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if args.log:
        Path(args.log).write_text(run.stdout)
    if run.returncode != 0:
        print(run.stdout[-4000:])
        print(f"scripts/quickstart.sh failed with exit code {run.returncode} after {seconds:.0f} s", file=sys.stderr)
        return 1

    scores = json.loads(METRICS.read_text())
    found = scores["at_threshold"]
    ap50 = scores["metrics"]["AP50"]
    figures = {"seconds": round(seconds, 1), "AP50": ap50, "at_threshold": found, "extra_flags": extra,
               "runtime": args.runtime}

    def mark(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = [
        f"scripts/quickstart.sh {' '.join(extra)} (DRIP_RUNTIME={args.runtime})".rstrip(),
        f"  time, training and inference   {seconds:6.0f} s      goal <= {GOAL_SECONDS} s: {mark(seconds <= GOAL_SECONDS)}",
        f"  images with every object found {found['complete_images']:>3} of {found['images']}    "
        f"goal >= {GOAL_COMPLETE_IMAGES}: {mark(found['complete_images'] >= GOAL_COMPLETE_IMAGES)}",
        f"  false boxes                    {found['false_boxes']:>6}      goal <= {GOAL_FALSE_BOXES}: "
        f"{mark(found['false_boxes'] <= GOAL_FALSE_BOXES)}",
        f"  objects found                  {found['found_objects']:>3} of {found['objects']}   "
        f"(score >= {found['threshold']:.2f}, IoU >= 0.5, right class)",
        f"  AP50 on the test images        {ap50:6.3f}",
    ]
    report("quickstart", info, figures, lines, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
