"""drip.stops: the one place SIGINT and SIGTERM are noted while Drip works (real signals, sent to
this process)."""

from __future__ import annotations

import os
import select
import signal

import pytest

from drip.stops import StopSignals


def test_signals_are_noted_wake_select_and_the_old_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    seen = []
    with StopSignals(on_signal=lambda name, count: seen.append((name, count))) as stops:
        assert stops.first is None and select.select([stops], [], [], 0)[0] == []
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert select.select([stops], [], [], 5)[0] == [stops]  # readable: a pump's select wakes
        assert stops.take() == ["SIGTERM", "SIGINT"]
        assert stops.take() == [] and select.select([stops], [], [], 0)[0] == []
        assert stops.first == "SIGTERM" and stops.received == ["SIGTERM", "SIGINT"]
        assert seen == [("SIGTERM", 1), ("SIGINT", 2)]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_process_that_ignored_sigint_still_hears_it():
    """A background job of a script starts with SIGINT ignored; Python keeps that."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals() as stops:
            os.kill(os.getpid(), signal.SIGINT)
            select.select([stops], [], [], 5)
            assert stops.received == ["SIGINT"]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_what_on_signal_raises_reaches_the_interrupted_code():
    """The training loop's second Ctrl-C stops at once: its handler raises."""

    def second_aborts(_name, count):
        if count > 1:
            raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), StopSignals(on_signal=second_aborts) as stops:
        os.kill(os.getpid(), signal.SIGINT)
        select.select([stops], [], [], 5)
        os.kill(os.getpid(), signal.SIGINT)
        select.select([], [], [], 5)  # the handler runs (and raises) before this returns
    assert signal.getsignal(signal.SIGINT) is before
