"""Work spread over threads, results in order: what the stages use to keep every core busy.

Threads, not processes: the heavy parts of Drip's per-image work (Pillow's decoders and
encoders, OpenCV, NumPy on whole images) release the GIL, and a process pool would add a
Python interpreter's start-up and imports per worker to stages that take seconds.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def core_ids() -> list[int]:
    """The cores this process may run on (a container's share, not the host's), in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def cores() -> int:
    """How many cores this process may run on (``core_ids``)."""
    return len(core_ids())


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, in order.

    At most a few items per thread are in flight, so results are not held in memory faster
    than the caller takes them (``Executor.map`` would submit everything at once).
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers * 4:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
