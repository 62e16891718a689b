"""Ctrl-C and SIGTERM while Drip works: noted, so that the work stops where it can save.

Whatever runs long holds a ``StopSignals`` while it works: the training loop (the first signal
stops it after its step, with a checkpoint; a second at once), the Docker starter's pump (it
forwards the signal to the container), the torchrun runner (to torchrun) and the audit's fold
runner (it ends its folds). What each does with a signal is its own; the handlers are one.

A handler notes the signal, writes a byte to a pipe that ``select`` can watch (``fileno``), and
calls ``on_signal`` if given (for what must happen at once, in the handler). Handlers are installed
explicitly rather than left to Python's default (a KeyboardInterrupt): a process started with
SIGINT ignored (a background job of a script or a CI runner: the shell ignores SIGINT for it, and
Python keeps that) would never hear Ctrl-C or ``kill -INT``, and a KeyboardInterrupt lands wherever
the main thread is, also outside the code that would save. Outside the main thread no handler can
be installed: nothing is noted. On leaving, the handlers found on entering are put back.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

STOP = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """A context manager: while open, ``signals`` are noted in ``received`` (names, oldest first)."""

    def __init__(self, signals: tuple[int, ...] = STOP, on_signal: Callable[[str, int], None] | None = None):
        """``on_signal(name, count)`` runs in the handler, ``count`` being how many were noted so far."""
        self._signals = signals
        self._on_signal = on_signal
        self.received: list[str] = []
        self._pending: list[str] = []
        self._previous: dict[int, Any] = {}
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> "StopSignals":
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        self._pending.append(name)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe already holds wake-ups enough
        if self._on_signal is not None:
            self._on_signal(name, len(self.received))

    @property
    def first(self) -> str | None:
        """The first signal noted, or None."""
        return self.received[0] if self.received else None

    def fileno(self) -> int:
        """A descriptor that turns readable when a signal is noted (for ``select``)."""
        return self._wake_r

    def take(self) -> list[str]:
        """The signals noted since the last call, oldest first."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        taken = []
        while self._pending:  # a handler may append meanwhile: pop, never clear
            taken.append(self._pending.pop(0))
        return taken

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
