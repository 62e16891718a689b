"""Stage 5, train: fit the detector to the session's records, resumably.

Reads ``records/records.json`` (the shards under ``"train"`` and ``"eval"``, the ``"classes"``),
the shards it lists and ``label_map.pbtxt``. Writes ``checkpoints/step-XXXXXXX.pt`` every
``checkpoint_every`` steps and at the end (the newest ``keep_checkpoints`` are kept), TensorBoard
events in ``logs/`` and, at the end, ``model.pt`` and the pictures of ``report/`` (``drip.report``).

Every ``eval_every`` steps and at the end the model (its EMA with ``--ema``) is scored on the eval
shards with ``drip.evaluate`` (pycocotools' COCO metrics). Each evaluation appends a row to
``metrics.jsonl``, prints a summary and goes to TensorBoard; a better AP than any before saves
``checkpoints/best.pt`` (never pruned), and ``model.pt`` is the best model, its step and metrics
recorded in the file and in ``session.json``. Without an eval split the last step is exported.

TensorBoard: ``loss/*``, ``lr`` and ``throughput/images_per_sec`` every ``log_every`` steps;
``metrics/*`` (AP, AP50, ...), ``metrics_per_class/AP/<class>`` and ``.../AP50/<class>``, one
precision-recall curve per class (``pr_curves/<class>``, COCO's, at IoU 0.5) and
``eval_predictions/<n>`` (the first eval images, predicted boxes beside the ground truth) at each
evaluation; ``train/augmented_samples`` once at the start: training samples as the model sees
them, after the online augmentation, with their boxes.

A checkpoint holds everything the next step depends on: model, optimizer, scheduler and
gradient-scaler state, the random states and the step. The batches of a step are a function of
the step alone (``drip.data.StepBatchSampler``), so ``--resume_training`` continues exactly where
the run stopped, with the config as it is now: edit ``pipeline.config`` (more steps, another
learning rate) and the new values apply from the next step. Ctrl-C or SIGTERM (``docker stop``)
finishes the current step, saves a checkpoint and stops.

Only plain types and tensors go into checkpoints, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import console, models, report
from ..evaluate import evaluate_records, predict, summary_lines
from ..tiling import training_slicing
from ..config import Config
from ..data import RecordDataset, StepBatchSampler, collate
from ..errors import Interrupted, SessionError
from ..labelmap import LabelMap
from ..parallel import cores
from ..session import Session, move, read_json, trash_folder

CHECKPOINT_FORMAT = "drip-checkpoint"
CHECKPOINT_VERSION = 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d{7,})\.pt$")
_WARMUP_START = 0.001  # warmup starts at this fraction of the peak rate (torchvision's warmup_factor)
_SHOWN_EVAL_IMAGES = 4  # eval images drawn to TensorBoard at each evaluation
_SHOWN_TRAIN_SAMPLES = 8  # augmented training samples in the grid drawn at the start
_SHOWN_SCORE = 0.5  # predictions drawn from this score up
_SHOWN_SIZE = 320  # longer side of a drawn image: thumbnails are enlarged, photos shrunk
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


@dataclass
class TrainResult:
    step: int  # the step training stopped at (== number_of_steps when it finished)
    model_path: Path
    images_per_sec: float | None  # None when there was nothing left to train


def run(session: Session, config: Config, resume: bool = False) -> TrainResult:
    """Train to ``config.number_of_steps``; with ``resume``, from the newest readable checkpoint."""
    classes, shards = read_records(session)
    eval_shards = read_eval_records(session)
    num_classes = len(classes) + 1
    device = models.resolve_device(config.device)
    found = find_checkpoint(session.checkpoints_dir) if resume else None
    if resume and found is None:
        console.info(f"no checkpoint in {session.checkpoints_dir}: training starts at step 0")
    checkpoint_path, checkpoint = found if found else (None, None)
    if checkpoint is not None:
        _check_resumable(checkpoint, checkpoint_path, config, classes)
        _check_data(checkpoint, checkpoint_path, data_fingerprint(session), config.allow_changed_data)
    start_step = checkpoint["step"] if checkpoint else 0
    if config.optimizer == "auto":  # configure resolves it; a run resumed keeps its optimizer
        started_with = checkpoint.get("optimizer_name") if checkpoint else None
        config = dataclasses.replace(
            config, optimizer=started_with or models.resolve_optimizer("auto", config.number_of_steps)
        )
    network = checkpoint["network"] if checkpoint else models.network_name(config.network, session.cache)
    if checkpoint is None:
        _set_aside_earlier_run(session)
        best = None
    else:
        # Rows and a best.pt from after the checkpoint belong to steps that are trained again.
        _drop_metrics_after(session.metrics_path, start_step)
        best = _read_best(session.best_checkpoint_path)

    # The run owns the random state while it trains: seeded from config.seed (so the model's
    # initialisation and the detectors' box sampling repeat), restored from a checkpoint on
    # resume, and handed back to the caller untouched afterwards.
    with torch.random.fork_rng(devices=_cuda_indices(device)):
        torch.default_generator.manual_seed(config.seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(config.seed)
        if checkpoint is not None:
            model = models.restore(network, num_classes, checkpoint["structure"], checkpoint["model"], str(checkpoint_path))
            models.set_image_size(model, config.image_size)
            _set_rng_states(checkpoint["rng"], device)
            console.info(f"resuming from {checkpoint_path.name} at step {start_step}")
        else:
            model = models.build_model(config.network, num_classes, config.weights, config.image_size, session.cache)
        _set_box_sampling(model, config)

        if start_step >= config.number_of_steps:
            console.info(
                f"already finished at step {start_step}; raise --number_of_steps (now "
                f"{config.number_of_steps}) to train further"
            )
            last = model
            if config.ema and checkpoint.get("ema") is not None:
                last = copy.deepcopy(model)
                last.load_state_dict(checkpoint["ema"])
            _export(session, config, network, classes, last, start_step, best)
            return TrainResult(start_step, session.model_path, None)

        loop = _Loop(session, config, model, network, classes, device, shards, start_step, checkpoint, checkpoint_path,
                     eval_shards, best)
        step, images_per_sec = loop.train()
        best = loop.best

    best_step, best_metrics = _export(session, config, network, classes, loop.ema.model if loop.ema else model, step, best)
    session.record_stage(
        "train", step=step, images_per_sec=round(images_per_sec, 2), device=str(device), network=network,
        best_step=best_step, best_metrics=best_metrics,
    )
    console.info(f"trained to step {step} at {images_per_sec:.1f} images/s on {device}; model saved to {session.model_path}")
    report.write_after_training(session, config)
    return TrainResult(step, session.model_path, images_per_sec)


def _export(session: Session, config: Config, network: str, classes: list[str], last: nn.Module, last_step: int,
            best: dict[str, Any] | None) -> tuple[int, dict[str, Any] | None]:
    """Write ``model.pt``: the weights of the best evaluation, else (no eval split) the last step's.

    Returns the exported step and its metrics (None without an evaluation).
    """
    model, step, metrics = last, last_step, None
    if best is not None:
        metrics = best.get("metrics")
        if best["step"] != last_step:
            path = session.best_checkpoint_path
            try:
                data = models.torch_load(path, "best checkpoint")
                state = data["ema"] if data.get("ema") is not None else data["model"]
                model = models.restore(network, len(classes) + 1, data["structure"], state, str(path))
                step = best["step"]
            except (models.ModelError, KeyError, TypeError) as exc:
                console.warn(f"{path} cannot be read ({exc}); exporting the model of the last step ({last_step}) instead")
                metrics = None
        ap = (metrics or {}).get("AP")
        console.info(
            f"exporting the best model: step {step} of {last_step}"
            + (f", AP {ap:.3f} on the eval split" if ap is not None else "")
        )
    extra = {"step": step, "last_step": last_step, "metrics": metrics}
    models.export_model(session.model_path, model, network, classes, config.image_size, config.to_dict(), extra)
    return step, metrics


def _set_box_sampling(model: nn.Module, config: Config) -> None:
    """Apply ``box_batch_size_per_image`` (a training-time setting, not part of the weights)."""
    if config.box_batch_size_per_image is None:
        return
    sampler = getattr(getattr(model, "roi_heads", None), "fg_bg_sampler", None)
    if sampler is None:
        console.info(f"--box_batch_size_per_image applies to Faster R-CNN only; {config.network} ignores it")
        return
    sampler.batch_size_per_image = int(config.box_batch_size_per_image)


# -- the loop ---------------------------------------------------------------------------------
class _Loop:
    """One training run from ``start_step`` to ``config.number_of_steps``."""

    def __init__(self, session, config, model, network, classes, device, shards, start_step, checkpoint, checkpoint_path,
                 eval_shards=(), best=None):
        self.session, self.config, self.model, self.network = session, config, model, network
        self.classes, self.device, self.start_step = classes, device, start_step
        self.resumed_from = checkpoint_path
        self.last_saved = checkpoint_path
        self.data = data_fingerprint(session)  # saved in every checkpoint: see _check_data
        self.use_amp = bool(config.amp) and device.type == "cuda"
        self.eval_shards = list(eval_shards)
        self.best = best  # {"step", "AP", "metrics"} of the best evaluation so far, or None
        model.to(device)
        self.ema = None
        if config.ema:
            state = checkpoint.get("ema") if checkpoint is not None else None
            updates = int(checkpoint.get("ema_updates") or 0) if state is not None else 0
            self.ema = _EMA(model, config.ema_decay, state, updates)

        lr = config.learning_rate
        if lr is None:
            lr = models.default_learning_rate(network, config.batch_size, config.optimizer)
        self.optimizer = _optimizer(model, config, lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        if checkpoint is not None:
            self._restore_optimizer(checkpoint, lr)
        # A fresh LambdaLR from today's config, placed at the resumed step: an edited learning
        # rate or schedule applies from here on; only the step count comes from the checkpoint.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(config.warmup_steps, config.lr_schedule, config.number_of_steps),
            last_epoch=start_step - 1,
        )

        dataset = RecordDataset(
            shards, config.image_size, train=True, seed=config.seed, num_classes=len(classes),
            augmentation=config.online_augmentation,
        )
        sampler = StepBatchSampler(len(dataset), config.batch_size, config.seed, start_step, config.number_of_steps)
        self.sampler = sampler
        workers = _num_workers(config.num_workers)
        self.dataset = dataset
        # One pass of the loader is the whole run (the sampler spans every step), so the
        # workers start once; persistent_workers would only keep them alive after it.
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            worker_init_fn=_ignore_stop_signals if workers > 0 else None,
            # Its own generator: the loader's worker seeds must not draw from the training RNG.
            generator=torch.Generator().manual_seed(config.seed),
        )

    def _restore_optimizer(self, checkpoint: dict[str, Any], lr: float) -> None:
        if checkpoint.get("optimizer_name") != self.config.optimizer:
            console.info(
                f"optimizer changed from {checkpoint.get('optimizer_name')} to {self.config.optimizer}: "
                "its state (momentum) starts fresh"
            )
        else:
            try:
                self.optimizer.load_state_dict(checkpoint["optimizer"])
            except (ValueError, KeyError) as exc:
                console.warn(f"the checkpoint's optimizer state does not fit this model ({exc}); it starts fresh")
            # load_state_dict brought back the old hyper-parameters; today's config wins.
            _set_hyperparameters(self.optimizer, lr, self.config.weight_decay)
        if self.use_amp and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])

    def train(self) -> tuple[int, float]:
        config, model, device = self.config, self.model, self.device
        end = config.number_of_steps
        params = [p for p in model.parameters() if p.requires_grad]
        autocast = functools.partial(torch.autocast, "cuda", dtype=torch.float16) if self.use_amp else contextlib.nullcontext
        writer = _summary_writer(self.session.logs_dir, self.start_step)
        sums: dict[str, torch.Tensor] = {}
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        steps_in_window, window_start = 0, time.perf_counter()
        # Seconds spent writing checkpoints and evaluating, left out of images/s: that measures training.
        saving, saving_in_window = 0.0, 0.0
        first_step_done = None  # images/s is measured after the first step (worker start-up, warm-up)
        step, saved_at = self.start_step, None
        model.train()
        if not self.eval_shards:
            console.info("no eval split (records.json lists no eval images): no evaluation; the last step's model is exported")
        loop_start = time.perf_counter()
        with _StopRequest() as stop, writer, console.progress(
            total=end, initial=self.start_step, unit="step", desc="train"
        ) as bar, contextlib.closing(self.dataset):
            self._log_training_samples(writer)
            # Not bound to a name: the loader's iterator (and its worker processes) goes as soon
            # as the loop ends, also when it raises and a traceback keeps this frame.
            for images, targets in self.loader:
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
                with autocast():
                    losses = model(images, targets)
                total = sum(losses.values())
                lr_used = self.optimizer.param_groups[0]["lr"]
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(total).backward()
                if config.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(params, config.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(model)
                step += 1
                bar.update(1)

                # Summed on the device; read (one sync) only at log steps.
                losses = {**losses, "loss_total": total}
                for name, value in losses.items():
                    value = value.detach().float()
                    sums[name] = sums[name] + value if name in sums else value
                nonfinite |= ~torch.isfinite(total.detach())
                steps_in_window += 1
                if first_step_done is None:
                    first_step_done = (time.perf_counter(), step)

                stopping = stop.requested is not None
                if step % config.log_every == 0 or step == end or stopping:
                    names = list(sums)
                    values = (torch.stack([sums[n] for n in names]) / steps_in_window).tolist()
                    self._check_finite(nonfinite, step, lr_used)
                    now = time.perf_counter()
                    for name, value in zip(names, values):
                        writer.add_scalar(f"loss/{name.removeprefix('loss_')}", value, step)
                    writer.add_scalar("lr", lr_used, step)
                    seconds = max(now - window_start - saving_in_window, 1e-9)
                    writer.add_scalar("throughput/images_per_sec", steps_in_window * config.batch_size / seconds, step)
                    bar.set_postfix(loss=f"{values[names.index('loss_total')]:.3f}", refresh=False)
                    sums, steps_in_window, window_start, saving_in_window = {}, 0, now, 0.0
                improved = False
                if self.eval_shards and not stopping and (
                    step == end or (config.eval_every > 0 and step % config.eval_every == 0)
                ):
                    self._check_finite(nonfinite, step, lr_used)
                    started = time.perf_counter()
                    improved = self._evaluate(step, writer)
                    saving_in_window += time.perf_counter() - started
                    saving += time.perf_counter() - started
                if step % config.checkpoint_every == 0 or step == end or stopping or improved:
                    self._check_finite(nonfinite, step, lr_used)
                    started = time.perf_counter()
                    if step % config.checkpoint_every == 0 or step == end or stopping:
                        saved_at = self._save(step)
                    if improved:
                        models.save_atomic(self._checkpoint(step), self.session.best_checkpoint_path)
                    saving_in_window += time.perf_counter() - started
                    saving += time.perf_counter() - started
                if stopping:
                    raise Interrupted(
                        f"stopped at step {step}; checkpoint saved to {saved_at}; resume with --resume_training"
                    )
        if first_step_done is not None and step > first_step_done[1]:
            seconds = time.perf_counter() - first_step_done[0] - saving
            images_per_sec = (step - first_step_done[1]) * config.batch_size / max(seconds, 1e-9)
        else:  # a single step: nothing to measure it against but the whole loop
            seconds = time.perf_counter() - loop_start - saving
            images_per_sec = (step - self.start_step) * config.batch_size / max(seconds, 1e-9)
        return step, images_per_sec

    def _check_finite(self, nonfinite: torch.Tensor, step: int, lr: float) -> None:
        if bool(nonfinite):
            last = f"; the last good checkpoint is {self.last_saved}" if self.last_saved else ""
            raise SessionError(
                f"the loss became NaN or infinite by step {step} (learning rate {lr:.3g}); lower "
                f"--learning_rate (e.g. to {lr / 4:.2g}) or raise --warmup_steps, then train again{last}"
            )

    def _save(self, step: int) -> Path:
        directory = self.session.checkpoints_dir
        path = directory / f"step-{step:07d}.pt"
        try:
            models.save_atomic(self._checkpoint(step), path)
        except SessionError as exc:  # disk full: the checkpoints already written still count
            last = f"; then resume from {self.last_saved.name} with --resume_training" if self.last_saved else ""
            raise SessionError(f"{exc}{last}") from None
        self.last_saved = path
        protected = {path} | ({self.resumed_from} if self.resumed_from else set())
        for old in list_checkpoints(directory)[: -self.config.keep_checkpoints]:
            if old not in protected:
                old.unlink(missing_ok=True)
        return path

    def _checkpoint(self, step: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "network": self.network,
            "classes": list(self.classes),
            "structure": models.structure_of(self.model),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_name": self.config.optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.config.to_dict(),
            "rng": _rng_states(self.device),
            "data": self.data,
            "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "best": self.best,
        }

    # -- evaluation ---------------------------------------------------------------------------
    def _evaluate(self, step: int, writer) -> bool:
        """Score the model (its EMA) on the eval split, report it; True when its AP is the best yet."""
        model = self.ema.model if self.ema is not None else self.model
        console.info(f"evaluating step {step} on the eval split" + (" (EMA weights)" if self.ema is not None else ""))
        # Evaluation draws no random numbers today; forking keeps it so whatever torchvision does.
        with torch.random.fork_rng(devices=_cuda_indices(self.device)):
            metrics = evaluate_records(
                model, self.eval_shards, self.classes, self.device, self.config.batch_size, self.config.image_size,
                slicing=training_slicing(self.config),  # a model trained on tiles: whole images, sliced
            )
            self._log_predictions(writer, model, step)
        _log_metrics(writer, metrics, step)
        row = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **metrics.to_json()}
        with open(self.session.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        best = self.best
        improved = best is None or (metrics.AP is not None and (best.get("AP") is None or metrics.AP > best["AP"]))
        if improved:
            self.best = {"step": step, "AP": metrics.AP, "metrics": metrics.to_json()}
        was = "" if best is None or improved else f"; the best is still step {best['step']} (AP {_show(best.get('AP'))})"
        console.info(f"step {step}: " + ("new best" if improved else "evaluated") + was)
        for line in summary_lines(metrics):
            console.info(line)
        return improved

    def _eval_samples(self) -> list[tuple[Any, list[list[float]], list[int]]]:
        """The first few eval images (PIL), their boxes in its pixels and labels; read once."""
        if not hasattr(self, "_samples"):
            self._samples = _read_eval_samples(self.eval_shards, _SHOWN_EVAL_IMAGES)
        return self._samples

    def _log_predictions(self, writer, model: nn.Module, step: int) -> None:
        samples = self._eval_samples()
        if not samples:
            return
        found = predict(model, [(i, image) for i, (image, _, _) in enumerate(samples)],
                        image_size=self.config.image_size, device=self.device, batch_size=self.config.batch_size)
        for i, ((image, boxes, labels), det) in enumerate(zip(samples, found)):
            keep = det.scores >= _SHOWN_SCORE
            predicted = _drawn(image, det.boxes[keep].tolist(), det.labels[keep].tolist(), self.classes,
                               det.scores[keep].tolist())
            truth = _drawn(image, boxes, labels, self.classes)
            panel = _side_by_side([(f"predicted (score >= {_SHOWN_SCORE})", predicted), ("ground truth", truth)])
            writer.add_image(f"eval_predictions/{i}", _hwc(panel), step, dataformats="HWC")

    def _log_training_samples(self, writer) -> None:
        """A grid of training samples as the model gets them (online augmentation included)."""
        keys: list = []
        step = self.start_step
        while len(keys) < _SHOWN_TRAIN_SAMPLES and step < self.sampler.num_steps:
            keys += self.sampler.batch(step)
            step += 1
        tiles = []
        for key in keys[:_SHOWN_TRAIN_SAMPLES]:
            image, target = self.dataset[key]
            pil = Image.fromarray((image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())
            tiles.append(_drawn(pil, target["boxes"].tolist(), target["labels"].tolist(), self.classes))
        if tiles:
            writer.add_image("train/augmented_samples", _hwc(_grid(tiles, columns=4)), self.start_step, dataformats="HWC")


# -- optimizer and schedule -------------------------------------------------------------------
def _optimizer(model: nn.Module, config: Config, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or AdamW, with no weight decay on norm layers and biases.

    Decaying a norm's scale or a bias towards zero only fights the normalisation; torchvision's
    reference does the same (--norm-weight-decay 0).
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if isinstance(module, _NORMS) or name == "bias" else decay).append(param)
    groups = [
        {"params": params, "decay": is_decay}
        for params, is_decay in ((decay, True), (no_decay, False))
        if params
    ]
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    _set_hyperparameters(optimizer, lr, config.weight_decay)
    return optimizer


def _set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["initial_lr"] = lr  # the scheduler's base: peak rate after warmup
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group.get("decay", True) else 0.0


def _lr_factor(warmup_steps: int, schedule: str, total_steps: int):
    """The LambdaLR factor of each step: linear warmup from 0.001x, then the schedule."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            alpha = step / warmup_steps
            warm = _WARMUP_START * (1 - alpha) + alpha
        else:
            warm = 1.0
        if schedule == "cosine":
            main = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        elif schedule == "step":
            main = 0.1 ** sum(step >= m * total_steps for m in (0.7, 0.9))
        else:
            main = 1.0
        return warm * main

    return factor


# -- records ----------------------------------------------------------------------------------
def read_records(session: Session) -> tuple[list[str], list[Path]]:
    """Class names (id 1 first) and the training shards, checked against the label map."""
    index_path = session.require(session.records_dir / "records.json", "records")
    index = read_json(index_path)
    names = list(LabelMap.read(session.require(session.label_map_path, "split")).names)
    if not isinstance(index, dict):
        raise SessionError(f"{index_path}: expected an object with 'train' and 'classes'; rerun the records stage")
    recorded = index.get("classes")
    if recorded is not None and list(recorded) != names:
        raise SessionError(
            f"{index_path}: the records were written for classes {list(recorded)} but "
            f"{session.label_map_path.name} has {names}; rerun the records stage"
        )
    listed = index.get("train") or []
    if isinstance(listed, dict):  # {"shards": [...], "count": N, ...} as the records stage writes it
        listed = listed.get("shards") or []
    shards = [_shard_path(session.records_dir, entry, index_path) for entry in listed]
    if not shards:
        raise SessionError(f"{index_path}: no training shards listed; rerun the records stage")
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise SessionError(f"{missing[0]}: training shard missing ({len(missing)} in all); rerun the records stage")
    return names, shards


def read_eval_records(session: Session) -> list[Path]:
    """The eval shards ``records.json`` lists (none when the split held nothing out)."""
    index_path = session.records_dir / "records.json"
    index = read_json(index_path)
    listed = (index.get("eval") or []) if isinstance(index, dict) else []
    if isinstance(listed, dict):
        listed = listed.get("shards") or []
    shards = [_shard_path(session.records_dir, entry, index_path) for entry in listed]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise SessionError(f"{missing[0]}: eval shard missing ({len(missing)} in all); rerun the records stage")
    return shards


def _shard_path(records_dir: Path, entry: Any, index_path: Path) -> Path:
    if isinstance(entry, dict):
        entry = entry.get("file") or entry.get("path") or entry.get("name")
    if not isinstance(entry, str) or not entry:
        raise SessionError(f"{index_path}: shard entry {entry!r} is not a file name; rerun the records stage")
    return records_dir / entry


# -- checkpoints ------------------------------------------------------------------------------
def list_checkpoints(directory: Path) -> list[Path]:
    """``step-XXXXXXX.pt`` files in ``directory``, oldest step first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def find_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; unreadable newer ones are moved aside with a warning.

    Temporary files of saves that were killed midway (``.step-*.pt.tmp-<pid>``) are removed.
    """
    for stray in sorted(directory.glob(".*.tmp-*")) if directory.is_dir() else []:
        stray.unlink(missing_ok=True)
        console.info(f"removed {stray.name}, left by a checkpoint save that was interrupted")
    for path in reversed(list_checkpoints(directory)):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("not a Drip checkpoint")
            missing = [k for k in ("step", "network", "classes", "model", "optimizer", "rng", "structure") if k not in data]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            return path, data
        # A half-written or damaged file fails in many ways (zip, pickle, EOF, our checks): any
        # failure means "not usable", and the previous checkpoint is the way forward.
        except Exception as exc:  # noqa: BLE001
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            console.warn(f"{path.name} cannot be read ({reason}); moved it to {aside.name}, trying the previous checkpoint")
    return None


def data_fingerprint(session: Session) -> dict[str, Any]:
    """What the session's records are, saved in each checkpoint to tell on resume if they changed.

    Per split: the image count and each shard's SHA-256 as ``records.json`` lists it (the records
    stage hashes what it writes); for a shard listed without one, its size and modification time.
    """
    index_path = session.records_dir / "records.json"
    index = read_json(index_path) if index_path.is_file() else {}
    out: dict[str, Any] = {"classes": list(index.get("classes") or []) if isinstance(index, dict) else []}
    for split in ("train", "eval"):
        entry = index.get(split) if isinstance(index, dict) else None
        listed = entry.get("shards") or [] if isinstance(entry, dict) else entry or []
        digests = entry.get("sha256") or {} if isinstance(entry, dict) else {}
        shards = {}
        for item in listed:
            path = _shard_path(session.records_dir, item, index_path)
            if path.name in digests:
                shards[path.name] = str(digests[path.name])
            else:
                st = path.stat() if path.is_file() else None
                shards[path.name] = f"size {st.st_size}, modified {st.st_mtime_ns}" if st else "missing"
        count = entry.get("count") if isinstance(entry, dict) else None
        out[split] = {"count": count if isinstance(count, int) else None, "shards": shards}
    return out


def _check_data(checkpoint: dict[str, Any], path: Path, now: dict[str, Any], allow: bool) -> None:
    """Refuse to resume on records other than the checkpoint's, saying what changed."""
    was = checkpoint.get("data")
    if not isinstance(was, dict) or was == now:
        return  # the same records (or a checkpoint from before Drip recorded them)
    changes = []
    for split in ("train", "eval"):
        before, after = was.get(split) or {}, now.get(split) or {}
        if before.get("count") != after.get("count"):
            changes.append(f"{split} images {before.get('count')} -> {after.get('count')}")
        old, new = before.get("shards") or {}, after.get("shards") or {}
        differ = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
        if differ:
            shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
            changes.append(f"{split} shards differ: {shown}")
    if was.get("classes") != now.get("classes"):
        changes.append(f"classes {was.get('classes')} -> {now.get('classes')}")
    what = "; ".join(changes) or "records.json differs"
    message = f"the records changed since {path.name} was saved ({what})"
    if allow:
        console.warn(f"{message}; resuming on the new records as --allow_changed_data asks")
        return
    raise SessionError(
        f"{message}; resuming would train on other data than the checkpoint's: pass "
        "--allow_changed_data true to resume anyway, or start a new session (without --resume_training)"
    )


def _set_aside_earlier_run(session: Session) -> None:
    """Move an earlier run's checkpoints and logs to the trash before training from step 0.

    Left in place, a later --resume_training would pick up that run's newer checkpoints, and
    TensorBoard would draw both runs as one.
    """
    earlier = [p for p in (session.checkpoints_dir, session.logs_dir) if p.is_dir() and any(p.iterdir())]
    earlier += [p for p in (session.metrics_path,) if p.is_file()]
    if not earlier:
        return
    target = trash_folder(session.trash, "train")
    for path in earlier:
        move(path, target / path.name)
    console.info(f"moved the earlier run's {' and '.join(p.name for p in earlier)} to {target}")


def _check_resumable(checkpoint: dict[str, Any], path: Path, config: Config, classes: list[str]) -> None:
    if list(checkpoint["classes"]) != list(classes):
        raise SessionError(
            f"{path}: trained for classes {list(checkpoint['classes'])} but the session's records have "
            f"{list(classes)}; start a new session (without --resume_training)"
        )
    was = checkpoint.get("config", {}).get("network")
    if was is not None and was != config.network:
        raise SessionError(
            f"--network {config.network}: the checkpoints in {path.parent} are of {was}; set network "
            f"back to {was} in pipeline.config, or start a new session (without --resume_training)"
        )


def _rng_states(device: torch.device) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
    return {"torch": torch.get_rng_state(), "cuda": list(cuda)}


def _set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if device.type == "cuda" and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _cuda_indices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


# -- EMA and the best model --------------------------------------------------------------------
class _EMA:
    """An exponential moving average of a model's weights and buffers, updated after each step.

    As timm's ModelEmaV2 (buffers such as BatchNorm statistics are averaged too), with the
    warm-up of TensorFlow's ExponentialMovingAverage(num_updates): the decay of update ``n`` is
    ``min(decay, (1 + n) / (10 + n))``, so the random initialisation fades within the first
    steps instead of lingering for thousands.
    """

    def __init__(self, model: nn.Module, decay: float, state: dict[str, torch.Tensor] | None = None, updates: int = 0):
        # requires_grad stays as in the model: the exported model file records frozen parameters
        # by it. The copy is never in a backward pass, and update() runs without autograd.
        self.model = copy.deepcopy(model).eval()
        if state is not None:
            self.model.load_state_dict(state)
        self.decay, self.updates = float(decay), int(updates)
        own, source = self.model.state_dict(), model.state_dict()
        self._floats = [(own[k], source[k]) for k in own if own[k].is_floating_point()]
        self._others = [(own[k], source[k]) for k in own if not own[k].is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if self._floats:
            ema, live = zip(*self._floats)
            torch._foreach_lerp_(list(ema), list(live), 1.0 - decay)
        for ema, live in self._others:
            ema.copy_(live)


def _read_best(path: Path) -> dict[str, Any] | None:
    """The best evaluation so far, as ``best.pt`` records it; None without a usable one."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        best = data.get("best") if isinstance(data, dict) else None
        if not isinstance(best, dict) or "step" not in best:
            raise ValueError("no record of its evaluation")
    except Exception as exc:  # noqa: BLE001 - any damage means: no best yet (as find_checkpoint)
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        console.warn(f"{path.name} cannot be read ({exc}); moved it to {aside.name}: the best model is chosen afresh")
        return None
    console.info(f"best model so far: step {best['step']} (AP {_show(best.get('AP'))})")
    return best


def _drop_metrics_after(path: Path, step: int) -> None:
    """Keep the ``metrics.jsonl`` rows up to ``step``: the steps after it are trained again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# -- TensorBoard: metrics, curves and pictures --------------------------------------------------
def _log_metrics(writer, metrics, step: int) -> None:
    for name, value in metrics.stats().items():
        if value is not None:
            writer.add_scalar(f"metrics/{name}", value, step)
    for kind, values in (("AP", metrics.per_class_ap), ("AP50", metrics.per_class_ap50)):
        for name, value in values.items():
            if value is not None:
                writer.add_scalar(f"metrics_per_class/{kind}/{name}", value, step)
    for name, curve in metrics.pr_curves.items():
        if curve is not None:
            _add_pr_curve(writer, f"pr_curves/{name}", curve, metrics.recall_thresholds,
                          metrics.per_class_objects.get(name, 0), step)


def _add_pr_curve(writer, tag: str, precision: list[float], recall: list[float], objects: int, step: int) -> None:
    """COCO's precision at its 101 recall points (IoU 0.5) as a TensorBoard PR curve.

    TensorBoard's curves are indexed by a rising score threshold (recall falling); COCO's by
    recall, so the points go in reversed. The counts, shown only in TensorBoard's tooltips, are
    reconstructed from precision, recall and the number of objects.
    """
    p = np.asarray(precision[::-1], dtype=np.float64)
    r = np.asarray(recall[::-1], dtype=np.float64)
    tp = np.where(p > 0, r * objects, 0.0)
    fp = np.where(p > 0, tp * (1 - p) / np.maximum(p, 1e-12), 0.0)
    fn = objects - tp
    tn = np.zeros_like(tp)
    writer.add_pr_curve_raw(tag, tp, fp, tn, fn, p, r, step, num_thresholds=len(p))


def _read_eval_samples(shards: list[Path], count: int) -> list[tuple[Any, list[list[float]], list[int]]]:
    from ..tfrecord import decode_example, iter_records

    samples = []
    for path in shards:
        for payload in iter_records(path):
            if len(samples) >= count:
                return samples
            example = decode_example(payload)
            try:
                with Image.open(io.BytesIO(example.encoded)) as img:
                    image = img.convert("RGB")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                continue  # evaluate_records names the record; a picture can do without it
            w, h = image.size
            boxes = [[b[0] * w, b[1] * h, b[2] * w, b[3] * h] for b in example.boxes]
            samples.append((image, boxes, list(example.labels)))
    return samples


def _drawn(image, boxes, labels, classes, scores=None):
    """``image`` scaled to ``_SHOWN_SIZE`` with its boxes drawn as ``drip infer`` draws them."""
    from .infer import draw_detections

    scale = _SHOWN_SIZE / max(image.size)
    shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    detections = []
    for i, (box, label) in enumerate(zip(boxes, labels)):
        label = int(label)
        detections.append({
            "class_id": label,
            "label": classes[label - 1] if 1 <= label <= len(classes) else f"class_{label}",
            "score": None if scores is None else float(scores[i]),
            "box": [float(v) * scale for v in box],
        })
    return draw_detections(shown, detections)


def _side_by_side(panels) -> Any:
    """Images side by side, each with its caption above, on a dark background."""
    from PIL import ImageDraw

    caption, gap = 18, 6
    width = sum(image.width for _, image in panels) + gap * (len(panels) + 1)
    height = max(image.height for _, image in panels) + caption + gap
    out = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(out)
    x = gap
    for title, image in panels:
        draw.text((x, 3), title, fill=(235, 235, 235))
        out.paste(image, (x, caption))
        x += image.width + gap
    return out


def _grid(tiles, columns: int) -> Any:
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    gap = 4
    out = Image.new("RGB", (columns * (cell_w + gap) + gap, rows * (cell_h + gap) + gap), (32, 32, 32))
    for i, tile in enumerate(tiles):
        out.paste(tile, (gap + (i % columns) * (cell_w + gap), gap + (i // columns) * (cell_h + gap)))
    return out


def _hwc(image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


# -- plumbing ---------------------------------------------------------------------------------
def _num_workers(requested: int) -> int:
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


def _summary_writer(logs_dir: Path, start_step: int):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step hides the events a stopped run logged after its last checkpoint: the resumed run
    # writes those steps again.
    return SummaryWriter(str(logs_dir), purge_step=start_step + 1 if start_step > 0 else None)


class _StopRequest:
    """SIGINT/SIGTERM handlers for the loop: the first asks to stop after the step, a second aborts."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        console.warn(f"{self.requested}: stopping after this step to save a checkpoint (again to stop at once, unsaved)")

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
