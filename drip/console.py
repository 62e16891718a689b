"""What Drip prints: one-line status messages and progress bars, all on stderr.

stdout stays free for machine-readable output. Progress bars show rate and ETA (tqdm); when
stderr is not a terminal (CI, ``docker logs``) they print a line every few seconds instead of
redrawing.
"""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def info(message: str) -> None:
    print(f"[drip] {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"[drip] warning: {message}", file=sys.stderr, flush=True)


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "img", initial: int = 0,
             disable: bool = False):
    """A tqdm progress bar with ETA on stderr (imported lazily: tqdm is a container-side need)."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=f"[drip] {desc}",
        unit=unit,
        initial=initial,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.2 if interactive else 5.0,
        leave=True,
        disable=disable,
    )
