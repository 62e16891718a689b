"""Host side of ``training_starter.py`` and ``inference_starter.py``.

Parses the same flags as ``drip train`` / ``drip infer`` plus where to run them (``--runtime``),
then runs the command in this Python (``local``) or in Drip's container (``docker``), as
``drip audit`` and ``drip select`` do (``cli.run_in_runtime``). Imports
only the standard library (and, for the Docker runtime, the Docker SDK): a host needs no PyTorch
to start Drip, and ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import cli
from .config import start_clock
from .errors import guarded

STARTERS = {"train": "training_starter.py", "infer": "inference_starter.py"}


def build_parser(command: str, prog: str) -> argparse.ArgumentParser:
    if command == "train":
        p = cli.add_train_flags(cli.new_parser(prog, cli.TRAIN_DESCRIPTION))
    else:
        p = cli.add_infer_flags(cli.new_parser(prog, cli.INFER_DESCRIPTION))
    cli.add_runtime_flags(p, command)
    # A flag of the other starter given to this one: the error names the starter that takes it.
    p.related = lambda: {other: build_parser_only(other) for other in STARTERS if other != command}
    return p


def build_parser_only(command: str) -> argparse.ArgumentParser:
    """The other starter's parser, for the hint about a flag it takes (not its own hints)."""
    p = build_parser(command, STARTERS[command])
    p.related = None
    return p


def main(command: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    start_clock()  # --time_limit counts from here: the preparing stages, a container's start too
    args = build_parser(command, prog or os.path.basename(sys.argv[0])).parse_args(argv)
    return guarded(cli.run_in_runtime, command, args)
