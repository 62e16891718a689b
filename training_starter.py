#!/usr/bin/env python3
"""Train a detector on your labelled images: ``python3 training_starter.py --help``.

Runs split -> augment -> records -> configure -> train, in Drip's Docker container when a Docker
engine answers, else in this Python. Needs only the standard library to start.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from drip.launcher import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("train"))
