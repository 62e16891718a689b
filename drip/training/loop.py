"""The training loop: a small ``run_step`` and the hooks around it (detectron2's train_loop).

``Trainer.train`` reads the loader once (the ``StepBatchSampler`` spans every remaining step),
runs ``run_step`` per batch and then each hook's ``after_step``; logging, evaluation and
checkpoints live in ``hooks``. Ctrl-C or SIGTERM (``docker stop``) sets ``stopping``: the hooks
see it (the checkpoint hook saves), and the loop ends with ``Interrupted``.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .. import console, detectors
from ..data.records import collate
from ..errors import Interrupted, SessionError
from ..parallel import cores
from ..stops import StopSignals


class HookBase:
    """Called by ``Trainer.train``: ``before_train`` inside the loop's context (writer, progress bar
    and data open), ``after_step`` after every step, ``after_train`` when the loop ends normally."""

    trainer: "Trainer"

    def before_train(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        pass


class Trainer:
    """Steps from ``start_step`` to ``end``; everything but the step itself is a hook.

    Run state the hooks share: ``step`` (steps done), ``losses`` (the last step's, on the
    device), ``lr`` (the rate that step used), ``stopping`` (a stop was requested), ``best`` (the
    best evaluation so far) and ``improved`` (this step's evaluation is the new best),
    ``last_saved`` (the newest checkpoint) and ``excluded`` (seconds spent in hooks that
    ``paused()`` training, left out of images/s).
    """

    def __init__(self, model: nn.Module, optimizer, scheduler, scaler, loader, device: torch.device, *,
                 start_step: int, end: int, batch_size: int, grad_clip: float, ema=None, use_amp: bool = False,
                 best: dict[str, Any] | None = None, last_saved: Path | None = None, closing=(), net: nn.Module | None = None,
                 agree=None, show_progress: bool = True):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        # ``net`` runs the steps: the model, or its DistributedDataParallel wrapper. ``model`` is
        # the bare one, for checkpoints, the EMA and evaluation.
        self.net = net if net is not None else model
        # ``agree(flag)`` makes a stop request every rank's at the same step (distributed.Context.any).
        self._agree = agree or (lambda flag: flag)
        self.show_progress = show_progress
        self.loader, self.device, self.ema = loader, device, ema
        self.start_step, self.end, self.batch_size, self.grad_clip = start_step, end, batch_size, grad_clip
        self.use_amp = use_amp
        self.closing = list(closing)  # closed when the loop ends (the dataset's open shards)
        self.step = start_step
        self.fixed_steps: int | None = None  # the step count --time_limit fixed (hooks.TimeLimitHook)
        self.losses: dict[str, torch.Tensor] = {}
        self.lr = optimizer.param_groups[0]["lr"]
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.stopping = False
        self.best, self.improved = best, False
        self.since_best = 0  # evaluations in a row without a better AP (--patience)
        self.finished = False  # a hook ended the run before ``end`` (--patience); it saved first
        self.last_saved = last_saved
        self.excluded = 0.0
        self.bar = None
        self.hooks: list[HookBase] = []
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._autocast = (functools.partial(torch.autocast, "cuda", dtype=detectors.mixed_precision(model, device))
                          if use_amp else contextlib.nullcontext)

    def register(self, *hooks: HookBase | None) -> None:
        for hook in hooks:
            if hook is not None:
                hook.trainer = self
                self.hooks.append(hook)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluating, saving) does not count as training in images/s."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - started

    def check_finite(self) -> None:
        """Stop with the fix when a loss since the start went NaN or infinite (one device sync)."""
        if bool(self.nonfinite):
            last = f"; the last good checkpoint is {self.last_saved}" if self.last_saved else ""
            raise SessionError(
                f"the loss became NaN or infinite by step {self.step} (learning rate {self.lr:.3g}); lower "
                f"--learning_rate (e.g. to {self.lr / 4:.2g}) or raise --warmup_steps, then train again{last}"
            )

    def run_step(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> None:
        device = self.device
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with self._autocast():
            losses = detectors.losses(self.net, images, targets)
        total = sum(losses.values())
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        # Kept on the device: the logging hook reads them (one sync) only at log steps.
        self.losses = {**losses, "loss_total": total}
        self.nonfinite |= ~torch.isfinite(total.detach())

    def train(self) -> float:
        """Train to ``end``; returns images/s (the time in ``paused()`` hooks left out)."""
        first_step_done = None  # images/s is measured after the first step (worker start-up, warm-up)
        self.net.train()
        loop_start = time.perf_counter()
        # An end of 10**9 or more is --time_limit's provisional one: no total until it is fixed.
        progress = console.progress(total=self.end if self.end < 10**9 else None, initial=self.start_step, unit="step",
                                    desc="train",
                                    disable=not self.show_progress)
        with StopRequest() as stop, progress as bar, contextlib.ExitStack() as closing:
            for item in self.closing:
                closing.enter_context(contextlib.closing(item))
            self.bar = bar
            for hook in self.hooks:
                hook.before_train()
            # Not bound to a name: the loader's iterator (and its worker processes) goes as soon
            # as the loop ends, also when it raises and a traceback keeps this frame.
            for images, targets in self.loader:
                self.run_step(images, targets)
                bar.update(1)
                if first_step_done is None:
                    first_step_done = (time.perf_counter(), self.step, self.excluded)
                self.stopping = self._agree(stop.requested is not None)
                self.improved = False
                for hook in self.hooks:
                    hook.after_step()
                if self._agree(self.finished):  # rank 0's hooks decide (--patience); every rank ends
                    self.finished = True
                    break
                if self.step >= self.end:  # --time_limit fixed an end before batches already fetched
                    break
                if self.stopping:
                    raise Interrupted(
                        f"stopped at step {self.step}; checkpoint saved to {self.last_saved}; resume with --resume_training"
                    )
            for hook in self.hooks:
                hook.after_train()
        if first_step_done is not None and self.step > first_step_done[1]:
            seconds = time.perf_counter() - first_step_done[0] - (self.excluded - first_step_done[2])
            steps = self.step - first_step_done[1]
        else:  # a single step: nothing to measure it against but the whole loop
            seconds = time.perf_counter() - loop_start - self.excluded
            steps = self.step - self.start_step
        return steps * self.batch_size / max(seconds, 1e-9)


# -- data -------------------------------------------------------------------------------------
def make_loader(dataset, sampler, requested_workers: int, device: torch.device, seed: int):
    workers = num_workers(requested_workers)
    # One pass of the loader is the whole run (the sampler spans every step), so the
    # workers start once; persistent_workers would only keep them alive after it.
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        # Its own generator: the loader's worker seeds must not draw from the training RNG.
        generator=torch.Generator().manual_seed(seed),
    )


def num_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    available = cores()
    return 0 if available <= 1 else min(8, available)


def _ignore_stop_signals(_worker_id: int) -> None:
    # Ctrl-C reaches every process of the terminal's group, and systemd, Slurm (scancel,
    # preemption) and `kill -TERM -- -PGID` send SIGTERM to every process of the job: the workers
    # must keep serving batches while the main process finishes its step and saves. A worker
    # killed by SIGTERM would crash the trainer instead ("DataLoader worker ... is killed").
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopRequest(StopSignals):
    """SIGINT/SIGTERM for the loop: the first asks to stop after the step, a second aborts."""

    def __init__(self):
        super().__init__(on_signal=self._handle)

    @property
    def requested(self) -> str | None:
        return self.first

    @staticmethod
    def _handle(name: str, count: int) -> None:
        if count > 1:
            raise KeyboardInterrupt
        console.warn(f"{name}: stopping after this step to save a checkpoint (again to stop at once, unsaved)")
