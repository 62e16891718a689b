"""Stage 5, train: fit the detector to the session's records, resumably.

Reads ``records/records.json`` (the shards under ``"train"``, the ``"classes"``), the shards it
lists and ``label_map.pbtxt``. Writes ``checkpoints/step-XXXXXXX.pt`` every ``checkpoint_every``
steps and at the end (the newest ``keep_checkpoints`` are kept), TensorBoard events in ``logs/``
(losses, learning rate, images/s every ``log_every`` steps) and, at the end, ``model.pt``.

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
import functools
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import console, models
from ..config import Config
from ..data import RecordDataset, StepBatchSampler, collate
from ..errors import Interrupted, SessionError
from ..labelmap import LabelMap
from ..session import Session, move, read_json

CHECKPOINT_FORMAT = "drip-checkpoint"
CHECKPOINT_VERSION = 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d{7,})\.pt$")
_WARMUP_START = 0.001  # warmup starts at this fraction of the peak rate (torchvision's warmup_factor)
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
    num_classes = len(classes) + 1
    device = models.resolve_device(config.device)
    found = find_checkpoint(session.checkpoints_dir) if resume else None
    if resume and found is None:
        console.info(f"no checkpoint in {session.checkpoints_dir}: training starts at step 0")
    checkpoint_path, checkpoint = found if found else (None, None)
    if checkpoint is not None:
        _check_resumable(checkpoint, checkpoint_path, config, classes)
    start_step = checkpoint["step"] if checkpoint else 0
    network = checkpoint["network"] if checkpoint else models.network_name(config.network)
    if checkpoint is None:
        _set_aside_earlier_run(session)

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

        if start_step >= config.number_of_steps:
            console.info(
                f"already finished at step {start_step}; raise --number_of_steps (now "
                f"{config.number_of_steps}) to train further"
            )
            models.export_model(session.model_path, model, network, classes, config.image_size, config.to_dict(), {"step": start_step})
            return TrainResult(start_step, session.model_path, None)

        loop = _Loop(session, config, model, network, classes, device, shards, start_step, checkpoint, checkpoint_path)
        step, images_per_sec = loop.train()

    models.export_model(session.model_path, model, network, classes, config.image_size, config.to_dict(), {"step": step})
    session.record_stage("train", step=step, images_per_sec=round(images_per_sec, 2), device=str(device), network=network)
    console.info(f"trained to step {step} at {images_per_sec:.1f} images/s on {device}; model saved to {session.model_path}")
    return TrainResult(step, session.model_path, images_per_sec)


# -- the loop ---------------------------------------------------------------------------------
class _Loop:
    """One training run from ``start_step`` to ``config.number_of_steps``."""

    def __init__(self, session, config, model, network, classes, device, shards, start_step, checkpoint, checkpoint_path):
        self.session, self.config, self.model, self.network = session, config, model, network
        self.classes, self.device, self.start_step = classes, device, start_step
        self.resumed_from = checkpoint_path
        self.last_saved = checkpoint_path
        self.use_amp = bool(config.amp) and device.type == "cuda"
        model.to(device)

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

        dataset = RecordDataset(shards, config.image_size, train=True, seed=config.seed, num_classes=len(classes))
        sampler = StepBatchSampler(len(dataset), config.batch_size, config.seed, start_step, config.number_of_steps)
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
            worker_init_fn=_ignore_sigint if workers > 0 else None,
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
        # Seconds spent writing checkpoints, left out of images/s: that measures training.
        saving, saving_in_window = 0.0, 0.0
        first_step_done = None  # images/s is measured after the first step (worker start-up, warm-up)
        step, saved_at = self.start_step, None
        model.train()
        loop_start = time.perf_counter()
        with _StopRequest() as stop, writer, console.progress(
            total=end, initial=self.start_step, unit="step", desc="train"
        ) as bar, contextlib.closing(self.dataset):
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
                if step % config.checkpoint_every == 0 or step == end or stopping:
                    self._check_finite(nonfinite, step, lr_used)
                    started = time.perf_counter()
                    saved_at = self._save(step)
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
        models.save_atomic(self._checkpoint(step), path)
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
        }


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
    """The newest checkpoint that loads; unreadable newer ones are moved aside with a warning."""
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


def _set_aside_earlier_run(session: Session) -> None:
    """Move an earlier run's checkpoints and logs to the trash before training from step 0.

    Left in place, a later --resume_training would pick up that run's newer checkpoints, and
    TensorBoard would draw both runs as one.
    """
    earlier = [p for p in (session.checkpoints_dir, session.logs_dir) if p.is_dir() and any(p.iterdir())]
    if not earlier:
        return
    target = session.trash / f"{time.strftime('%Y%m%d-%H%M%S')}-train"
    suffix = 1
    while target.exists():
        suffix += 1
        target = session.trash / f"{time.strftime('%Y%m%d-%H%M%S')}-train-{suffix}"
    target.mkdir(parents=True)
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


# -- plumbing ---------------------------------------------------------------------------------
def _num_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))  # what this container may use, not the host's count
    except AttributeError:
        cores = os.cpu_count() or 1
    return 0 if cores <= 1 else min(8, cores)


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches every process of the terminal's group; the workers must keep serving
    # batches while the main process finishes its step and saves.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
