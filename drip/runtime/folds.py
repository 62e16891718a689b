"""``drip audit``'s folds side by side: one process per fold, up to ``--fold_jobs`` at a time,
each pinned to one GPU (``CUDA_VISIBLE_DEVICES``) or, on the CPU, to its share of the cores.

``drip.runtime.audit`` writes each fold's session folder and its ``fold.json`` (what the fold
trains on, what it predicts, with which config); ``run`` starts ``python -m drip.runtime.audit
--fold FOLD_JSON`` for each on a free slot, sends the process's output to the fold's
``fold.log``, shows every fold's lines on the console prefixed ``[drip fold N]``, and hands each
fold that exits cleanly to the caller, which reads its predictions. A fold that fails ends the
others and raises one line naming it and its log; Ctrl-C (or SIGTERM) ends them all. A fold's
process has a session of its own (``start_new_session``), so the group that ends it holds its
data-loading workers too.

Standard library only: nothing here needs PyTorch, and the folds import it themselves.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import DistributedError, Interrupted
from ..stops import StopSignals
from .torchrun import kill_group, last_error

CPUS_ENV = "DRIP_FOLD_CPUS"  # the cores a fold's process keeps, e.g. "0,1": it pins itself before importing torch


@dataclass(frozen=True)
class Slot:
    """Where one of the folds running at once runs."""

    index: int
    gpu: str | None  # its CUDA_VISIBLE_DEVICES; None on the CPU
    cpus: tuple[int, ...]  # the cores it keeps


@dataclass(frozen=True)
class Fold:
    number: int  # 1-based, as dl/audit/folds/fold-N names it
    spec: Path  # its fold.json
    log: Path  # where its process's output goes


def visible_gpus(count: int, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` value that names each of this process's ``count`` GPUs alone:
    its own list's entries when it has one (indices or UUIDs of the machine), else 0..count-1."""
    given = [part.strip() for part in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    return given[:count] if given else [str(i) for i in range(count)]


def slots(jobs: int, gpus: list[str], cpus: list[int]) -> list[Slot]:
    """``jobs`` slots: slot s trains on GPU s (the GPUs taken in turn when there are more slots than
    GPUs) and keeps the s-th share of ``cpus``, so the folds' threads and data-loading workers do
    not fight over the cores. With fewer cores than slots every slot keeps them all."""
    share = len(cpus) // jobs
    return [Slot(s, gpus[s % len(gpus)] if gpus else None,
                 tuple(cpus[s * share:(s + 1) * share]) if share else tuple(cpus)) for s in range(jobs)]


def fold_environ(slot: Slot, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of a fold's process on ``slot``."""
    env = dict(environ)
    env[CPUS_ENV] = ",".join(map(str, slot.cpus))
    # Threads per process as torchrun sets them: the slot's cores, unless the user chose.
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(slot.cpus))))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    return env


def pin_cpus(environ: Mapping[str, str] = os.environ) -> None:
    """In a fold's process: keep to the cores its slot was given (``drip.parallel.cores`` then
    counts those, for threads and data-loading workers)."""
    cpus = environ.get(CPUS_ENV)
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def run(folds: list[Fold], places: list[Slot], done: Callable[[Fold], None], out=None,
        python: str = sys.executable) -> None:
    """Run every fold to the end, ``len(places)`` at a time; ``done(fold)`` after each that exits
    cleanly, in the order they finish. Raises ``DistributedError`` naming the first fold that
    fails, ``Interrupted`` after Ctrl-C or SIGTERM; either way every fold still running is ended."""
    out = out or sys.stderr
    queued = list(folds)
    free = list(places)
    running: dict[int, _Running] = {}
    finished: list[float] = []  # seconds each fold took
    with StopSignals() as stops:
        try:
            while queued or running:
                while queued and free and not stops.received:
                    fold, slot = queued.pop(0), free.pop(0)
                    running[fold.number] = _start(fold, slot, python)
                    where = f"GPU {slot.gpu}" if slot.gpu is not None else f"{len(slot.cpus)} core(s)"
                    _say(out, f"audit: fold {fold.number} started on {where}, pid {running[fold.number].proc.pid}; "
                         f"its log: {fold.log}")
                for number, job in list(running.items()):
                    job.pump(out)
                    if job.proc.poll() is None:
                        continue
                    job.pump(out, final=True)
                    del running[number]
                    if job.proc.returncode != 0:
                        raise DistributedError(failure_line(job.fold, len(folds), job.proc.returncode))
                    done(job.fold)
                    finished.append(time.monotonic() - job.started)
                    free.append(job.slot)
                    left = estimate_left(finished, [time.monotonic() - j.started for j in running.values()],
                                         len(queued), len(places))
                    _say(out, f"audit: fold {number} finished in {finished[-1]:.0f} s ({len(finished)} of {len(folds)} "
                         "folds)" + (f"; the others in about {max(1.0, left):.0f} s" if running or queued else ""))
                if stops.received:
                    ended = ", ".join(str(n) for n in sorted(running)) or "none"
                    raise Interrupted(f"{stops.first}: the audit stopped and ended its running folds "
                                      f"({ended}); nothing in dl/audit/ claims to be complete; run drip audit again")
                time.sleep(0.2)
        finally:
            for job in running.values():
                kill_group(job.proc)
            for job in running.values():
                job.proc.wait()
                job.pump(out, final=True)


def estimate_left(finished: list[float], elapsed: list[float], queued: int, jobs: int) -> float:
    """Seconds until the last fold ends, if each takes as long as the finished ones on average."""
    mean = sum(finished) / len(finished)
    ends = sorted([max(0.0, mean - e) for e in elapsed] + [0.0] * (jobs - len(elapsed)))
    for _ in range(queued):  # each queued fold takes the slot that frees first
        ends[0] += mean
        ends.sort()
    return max(ends) if ends else 0.0


def failure_line(fold: Fold, total: int, returncode: int) -> str:
    """One line naming the fold that failed, how, what it said last and its log."""
    how = (f"was killed by {signal.Signals(-returncode).name}" if returncode < 0
           else f"exited with code {returncode}")
    said = last_error(fold.log)
    return f"fold {fold.number} of {total} {how}" + (f" ({said})" if said else "") + f"; its log: {fold.log}"


class _Running:
    """A fold's process, and what of its log the console has shown."""

    def __init__(self, fold: Fold, slot: Slot, proc: subprocess.Popen):
        self.fold, self.slot, self.proc = fold, slot, proc
        self.started = time.monotonic()
        self.offset = 0
        self.partial = ""

    def pump(self, out, final: bool = False) -> None:
        """Show the log's new lines, each prefixed with the fold; a progress bar's redraws
        (``\\r``) become lines of their own."""
        try:
            with open(self.fold.log, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        self.offset += len(data)
        lines = re.split(r"[\r\n]", self.partial + data.decode("utf-8", "replace"))
        self.partial = "" if final else lines.pop()
        prefix = f"[drip fold {self.fold.number}]"
        shown = [prefix + (line[6:] if line.startswith("[drip]") else " " + line) for line in lines if line.strip()]
        if shown:
            out.write("\n".join(shown) + "\n")
            out.flush()


def _start(fold: Fold, slot: Slot, python: str) -> _Running:
    fold.log.parent.mkdir(parents=True, exist_ok=True)
    with open(fold.log, "ab") as log:
        # A session of its own: Ctrl-C reaches this process only, which ends the folds' groups.
        proc = subprocess.Popen([python, "-m", "drip.runtime.audit", "--fold", str(fold.spec)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=fold_environ(slot),
                                start_new_session=True)
    return _Running(fold, slot, proc)


def _say(out, message: str) -> None:
    print(f"[drip] {message}", file=out, flush=True)
