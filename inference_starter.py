#!/usr/bin/env python3
"""Run a trained detector on a folder of folders of images: ``python3 inference_starter.py --help``.

Writes the images with boxes drawn and JSON results per folder under files/results/. Runs in
Drip's Docker container when a Docker engine answers, else in this Python.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from drip.launcher import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("infer"))
