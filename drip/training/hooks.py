"""What happens between training steps, as hooks on ``loop.Trainer`` (detectron2's hooks.py).

They run in the order registered, after every step: ``LogHook`` (losses, learning rate and
images/s to TensorBoard and the progress bar), ``EvalHook`` (scores the model on the eval split,
appends to ``metrics.jsonl``, tracks the best evaluation), ``CheckpointHook`` (``step-*.pt`` and
``best.pt``). Each writes files: the stage registers them on the process that writes (rank 0);
the others get a ``LogHook`` without a writer (it takes part in averaging the losses over the
ranks) and a ``SyncCheckHook``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..config import Config
from ..data.tiling import training_slicing
from ..detectors import files
from ..errors import SessionError
from ..evaluation.metrics import evaluate_records, summary_lines
from ..session import Session
from . import events
from .checkpoints import checkpoint_state, cuda_indices, save_checkpoint
from .loop import HookBase


class LogHook(HookBase):
    """Every ``log_every`` steps (and at the end or a stop): mean losses, lr and images/s.

    ``mean`` averages the summed losses over the ranks (every rank calls it at the same steps);
    without a ``writer`` the hook only takes part in that.
    """

    def __init__(self, writer, log_every: int, dataset=None, sampler=None, classes: list[str] = (), mean=None):
        self.writer, self.log_every = writer, log_every
        self.mean = mean or (lambda tensor: tensor)
        self.dataset, self.sampler, self.classes = dataset, sampler, list(classes)
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0

    def before_train(self) -> None:
        t = self.trainer
        if self.writer is not None and self.dataset is not None:
            events.log_training_samples(self.writer, self.dataset, self.sampler, self.classes, t.start_step)
        self._window_start, self._excluded_at_start = time.perf_counter(), t.excluded

    def after_step(self) -> None:
        t = self.trainer
        # Summed on the device; read (one sync) only at log steps.
        for name, value in t.losses.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._steps += 1
        if not (t.step % self.log_every == 0 or t.step == t.end or t.stopping):
            return
        names = list(self._sums)
        values = self.mean(torch.stack([self._sums[n] for n in names]) / self._steps).tolist()
        t.check_finite()
        now = time.perf_counter()
        if self.writer is None:
            self._sums, self._steps = {}, 0
            return
        for name, value in zip(names, values):
            self.writer.add_scalar(f"loss/{name.removeprefix('loss_')}", value, t.step)
        self.writer.add_scalar("lr", t.lr, t.step)
        seconds = max(now - self._window_start - (t.excluded - self._excluded_at_start), 1e-9)
        self.writer.add_scalar("throughput/images_per_sec", self._steps * t.batch_size / seconds, t.step)
        if t.bar is not None:
            t.bar.set_postfix(loss=f"{values[names.index('loss_total')]:.3f}", refresh=False)
        self._sums, self._steps = {}, 0
        self._window_start, self._excluded_at_start = now, t.excluded


class EvalHook(HookBase):
    """Every ``eval_every`` steps and at the end (not on a stop): COCO metrics of the model (its
    EMA) on the eval shards, to TensorBoard, ``metrics.jsonl`` and the console; sets
    ``trainer.best`` and ``trainer.improved`` when the AP is the best yet."""

    def __init__(self, writer, session: Session, config: Config, classes: list[str], eval_shards: list[Path]):
        self.writer, self.session, self.config = writer, session, config
        self.classes, self.eval_shards = list(classes), list(eval_shards)
        self._samples = None

    def after_step(self) -> None:
        t, every = self.trainer, self.config.eval_every
        if not self.eval_shards or t.stopping or not (t.step == t.end or (every > 0 and t.step % every == 0)):
            return
        t.check_finite()
        with t.paused():
            t.improved = self.evaluate(t.step)
        # An evaluation of the best's own step is one a resumed run trains again: not a miss.
        t.since_best = 0 if t.improved or t.best["step"] == t.step else t.since_best + 1
        patience = self.config.patience
        if patience and t.since_best >= patience and t.step < t.end:
            console.info(
                f"no better AP than step {t.best['step']}'s in the last {t.since_best} evaluations "
                f"(--patience {patience}): stopping at step {t.step} of {t.end}; the best model is exported"
            )
            t.finished = True

    def evaluate(self, step: int) -> bool:
        """Score the model (its EMA) on the eval split, report it; True when its AP is the best yet."""
        t, config = self.trainer, self.config
        model = t.ema.model if t.ema is not None else t.model
        console.info(f"evaluating step {step} on the eval split" + (" (EMA weights)" if t.ema is not None else ""))
        # Evaluation draws no random numbers today; forking keeps it so whatever torchvision does.
        with torch.random.fork_rng(devices=cuda_indices(t.device)):
            metrics = evaluate_records(model, self.eval_shards, self.classes, t.device, config.batch_size,
                                       config.image_size,
                                       slicing=training_slicing(config))  # a model trained on tiles: whole images, sliced
            if self._samples is None:  # the first few eval images, read once
                self._samples = events.read_eval_samples(self.eval_shards, events.SHOWN_EVAL_IMAGES)
            events.log_predictions(self.writer, model, self._samples, self.classes, step,
                                   image_size=config.image_size, device=t.device, batch_size=config.batch_size,
                                   slicing=training_slicing(config))
        events.log_metrics(self.writer, metrics, step)
        events.append_metrics_row(self.session.metrics_path, step, metrics)
        best = t.best
        improved = best is None or (metrics.AP is not None and (best.get("AP") is None or metrics.AP > best["AP"]))
        if improved:
            t.best = {"step": step, "AP": metrics.AP, "metrics": metrics.to_json()}
        was = "" if best is None or improved else f"; the best is still step {best['step']} (AP {events.show(best.get('AP'))})"
        console.info(f"step {step}: " + ("new best" if improved else "evaluated") + was)
        for line in summary_lines(metrics):
            console.info(line)
        return improved


class CheckpointHook(HookBase):
    """``step-XXXXXXX.pt`` every ``checkpoint_every`` steps, at the end and on a stop (the newest
    ``keep_checkpoints`` kept, and the one resumed from); ``best.pt`` after a new best evaluation."""

    def __init__(self, session: Session, config: Config, network: str, classes: list[str], data: dict[str, Any],
                 resumed_from: Path | None):
        self.session, self.config, self.network, self.classes = session, config, network, list(classes)
        self.data = data  # the records' fingerprint, saved in every checkpoint: see checkpoints.check_data
        self.resumed_from = resumed_from

    def state(self, step: int) -> dict[str, Any]:
        return checkpoint_state(self.trainer, step, network=self.network, classes=self.classes, config=self.config,
                                data=self.data)

    def after_step(self) -> None:
        t = self.trainer
        periodic = t.step % self.config.checkpoint_every == 0 or t.step == t.end or t.stopping or t.finished
        if not (periodic or t.improved):
            return
        t.check_finite()
        with t.paused():
            if periodic:
                t.last_saved = save_checkpoint(
                    self.state(t.step), self.session.checkpoints_dir, t.step, keep=self.config.keep_checkpoints,
                    last_saved=t.last_saved, protected={self.resumed_from} if self.resumed_from else set(),
                )
            if t.improved:
                files.save_atomic(self.state(t.step), self.session.best_checkpoint_path)


class SyncCheckHook(HookBase):
    """At the end, on every rank: the weights must be the same everywhere (DDP keeps them so; a
    difference means the ranks trained apart, and the exported model would be one of several)."""

    def __init__(self, context):
        self.context = context

    def after_train(self) -> None:
        from .distributed import weights_digest

        digests = self.context.gather(weights_digest(self.trainer.model))
        if len(set(digests)) != 1:
            raise SessionError(
                f"after step {self.trainer.step} the ranks' weights differ (digests {digests}); the processes "
                "trained apart: report this as a bug in Drip, with the ranks' logs"
            )
        console.info(f"weights identical on all {len(digests)} ranks after step {self.trainer.step}")


class TimeLimitHook(HookBase):
    """``--time_limit``: after a probe of measured steps, fix the number of steps that fits.

    The probe lasts at least ``PROBE`` steps and ``PROBE_FRACTION`` of the limit (5 to 30 s): the
    first steps run while data workers fill their queues, and a 5-step probe of a mosaic run
    measured half its later speed, ending a 3-minute run after 128 s. The first step is left out
    of the measure (worker start-up, allocation). The time left after the probe, less a reserve
    (the evaluations, the model file, the report and a margin), divided by the
    time of a step, gives the count; ``decide`` (rank 0's value on every rank) makes it one
    number, and ``relayout(steps)`` lays the run out over it (the stage's callback: the schedule,
    the sampler, the evaluations, pipeline.config).
    """

    PROBE = 5
    PROBE_FRACTION, PROBE_MIN_S, PROBE_MAX_S = 0.05, 5.0, 30.0
    EVALUATIONS = 4  # at a quarter, half, three quarters and the end of the steps
    EVAL_OVERHEAD_S = 3.0  # pycocotools and the TensorBoard pictures, per evaluation
    REPORT_S = 8.0  # the report's pictures, beyond a pass over the eval split (3 s measured)
    # Python's start and imports before the clock starts (3-4 s), and 2% for steps that slow down:
    # a 7-minute race's whole command took 423 s without it.
    MARGIN_S, MARGIN_FRACTION = 4.0, 0.02

    def __init__(self, limit_s: float, started: float, eval_images: int, decide, relayout):
        self.limit_s, self.started, self.eval_images = float(limit_s), float(started), int(eval_images)
        self.decide, self.relayout = decide, relayout
        self.probe_s = min(self.PROBE_MAX_S, max(self.PROBE_MIN_S, self.PROBE_FRACTION * self.limit_s))
        self._first = None
        self.done = False

    def after_step(self) -> None:
        t = self.trainer
        if self.done:
            return
        now = time.time()
        if self._first is None:
            self._first = (now, t.step, t.excluded)
            return
        measured = t.step - self._first[1]
        spent = now - self._first[0] - (t.excluded - self._first[2])
        if measured < self.PROBE or spent < self.probe_s:
            return
        per_step = max(spent, 1e-6) / measured
        steps = self.decide(self.steps_that_fit(per_step, t.batch_size, t.step, now))
        self.done = True
        self.relayout(int(steps))

    def steps_that_fit(self, per_step: float, batch_size: int, step: int, now: float) -> int:
        # Inference is about a third of a training step's forward and backward.
        one_pass = self.eval_images * per_step / max(batch_size, 1) / 3
        evaluations = self.EVALUATIONS if self.eval_images else 0
        reserve = evaluations * (one_pass + self.EVAL_OVERHEAD_S) + one_pass + self.REPORT_S
        reserve += self.MARGIN_S + self.MARGIN_FRACTION * self.limit_s
        left = self.limit_s - (now - self.started) - reserve
        return step + max(1, int(left / per_step))
