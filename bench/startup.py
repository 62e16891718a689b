#!/usr/bin/env python3
"""Start-up time of the starters, in milliseconds (median of several runs).

    .venv/bin/python bench/startup.py            # 10 runs each
    .venv/bin/python bench/startup.py --quick    # 3 runs each

* ``training_starter.py --help`` and ``inference_starter.py --help``: the host side imports only
  the standard library, so this is the floor of any Python program plus argparse;
* a mistyped value (``--batch_size 0``): refused before anything heavy is imported;
* a no-op run: ``training_starter.py --runtime local --resume_training`` on a session that has
  already finished training: everything up to the first stage's work (PyTorch, the session, the
  checkpoint), and the model file written again;
* for scale, ``python -c pass`` and ``python -c "import torch"`` on the same Python.

All with ``--runtime local``: with ``auto`` the time would include asking a Docker engine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, median, machine, parser, report  # noqa: E402


def timed_ms(argv: list[str], runs: int, expect: int = 0) -> float:
    times = []
    env = {**os.environ, "DRIP_RUNTIME": "local"}
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
        times.append((time.perf_counter() - start) * 1000)
        if out.returncode != expect:
            raise SystemExit(f"{' '.join(argv)} exited {out.returncode}, expected {expect}:\n{out.stderr[-2000:]}")
    return median(times)


def finished_session(workdir: Path) -> Path:
    """A session trained to its last step (one step, tiny): resuming it has nothing to do."""
    from memory import image_pool, write_session

    folder = write_session(workdir / "session", 8, image_pool(4))
    flags = ["--session_folder", str(folder), "--network", "fasterrcnn_mobilenet_v3_large_320_fpn",
             "--weights", "none", "--image_size", "64", "--batch_size", "1", "--number_of_steps", "1",
             "--device", "cpu", "--num_workers", "0"]
    for stage in ("configure", "train"):  # configure writes the pipeline.config a resume reads
        out = subprocess.run(
            [sys.executable, "-c", "import sys; from drip.cli import main; sys.exit(main(sys.argv[1:]))",
             "stage", stage, *flags],
            capture_output=True, text=True, cwd=ROOT,
        )
        if out.returncode != 0:
            raise SystemExit(f"could not train the session for the no-op run:\n{out.stderr[-3000:]}")
    return folder


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--runs", type=int, default=None, help="runs per command (default 10, quick 3)")
    args = p.parse_args()
    runs = args.runs or (3 if args.quick else 10)
    python = sys.executable
    info = machine()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="drip-bench-start-"))
    try:
        folder = finished_session(workdir)
        figures = {
            "python_pass_ms": timed_ms([python, "-c", "pass"], runs),
            "import_torch_ms": timed_ms([python, "-c", "import torch, torchvision"], runs),
            "training_starter_help_ms": timed_ms([python, str(ROOT / "training_starter.py"), "--help"], runs),
            "inference_starter_help_ms": timed_ms([python, str(ROOT / "inference_starter.py"), "--help"], runs),
            "bad_flag_ms": timed_ms(
                [python, str(ROOT / "training_starter.py"), "--runtime", "local", "--batch_size", "0"], runs, expect=2
            ),
            "noop_resume_ms": timed_ms(
                [python, str(ROOT / "training_starter.py"), "--runtime", "local", "--resume_training",
                 "--session_folder", str(folder)],
                runs,
            ),
        }
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    figures = {k: round(v) for k, v in figures.items()}
    figures["runs"] = runs
    lines = [
        f"median of {runs} runs, --runtime local",
        f"python -c pass:                          {figures['python_pass_ms']:6d} ms",
        f"python -c 'import torch, torchvision':   {figures['import_torch_ms']:6d} ms",
        f"training_starter.py --help:              {figures['training_starter_help_ms']:6d} ms",
        f"inference_starter.py --help:             {figures['inference_starter_help_ms']:6d} ms",
        f"training_starter.py --batch_size 0:      {figures['bad_flag_ms']:6d} ms (refused before PyTorch loads)",
        f"no-op run (--resume_training, finished): {figures['noop_resume_ms']:6d} ms",
    ]
    report("start-up", info, figures, lines, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
