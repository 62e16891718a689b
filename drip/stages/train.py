"""Stage 5, train: fit the detector to the session's records, resumably.

Reads ``records/records.json`` (the shards under ``"train"`` and ``"eval"``, the ``"classes"``),
the shards it lists and ``label_map.pbtxt``. Writes ``checkpoints/step-XXXXXXX.pt`` every
``checkpoint_every`` steps and at the end (the newest ``keep_checkpoints`` are kept), TensorBoard
events in ``logs/`` and, at the end, ``model.pt`` and the pictures of ``report/`` (``drip.evaluation.report``).

Every ``eval_every`` steps and at the end the model (its EMA with ``--ema``) is scored on the eval
shards with ``drip.evaluation.metrics`` (pycocotools' COCO metrics). Each evaluation appends a row to
``metrics.jsonl``, prints a summary and goes to TensorBoard; a better AP than any before saves
``checkpoints/best.pt`` (never pruned), and ``model.pt`` is the best model, its step and metrics
recorded in the file and in ``session.json``. Without an eval split the last step is exported.
With ``--patience N`` the run ends after N evaluations in a row without a better AP (the count is
in each checkpoint, so a resumed run goes on counting, and an ended one stays ended).

What goes to TensorBoard is listed in ``drip.training.events``.

A checkpoint holds everything the next step depends on: model, optimizer, scheduler and
gradient-scaler state, the random states and the step. The batches of a step are a function of
the step alone (``drip.data.records.StepBatchSampler``), so ``--resume_training`` continues exactly where
the run stopped, with the config as it is now: edit ``pipeline.config`` (more steps, another
learning rate) and the new values apply from the next step. Ctrl-C or SIGTERM (``docker stop``)
finishes the current step, saves a checkpoint and stops.

Only plain types and tensors go into checkpoints, so they load with ``torch.load(weights_only=True)``.

This module wires the run (model, optimizer, data, hooks) as torchvision's ``train.py`` does; the
loop, the hooks, checkpoints, optimizer/schedule/EMA and the events are in ``drip.training``.
"""


from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import console, detectors
from ..config import STARTED_ENV, Config
from ..data.records import RecordDataset, StepBatchSampler, read_eval_records, read_records
from ..detectors import files, models
from ..errors import SessionError
from ..evaluation import report
from ..session import Session
from ..training import distributed, events
from ..training.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_data,
    check_resumable,
    cuda_indices,
    data_fingerprint,
    find_checkpoint,
    list_checkpoints,
    read_best,
    set_aside_earlier_run,
    set_rng_states,
)
from ..training.hooks import CheckpointHook, EvalHook, LogHook, SyncCheckHook, TimeLimitHook
from ..training.loop import Trainer, make_loader
from ..training.optim import EMA, build_optimizer, build_scheduler, restore_optimizer

# Imported from here by tests and benchmarks; they live in drip.training and drip.data.records.
__all__ = [
    "run", "TrainResult", "read_records", "read_eval_records", "list_checkpoints", "find_checkpoint",
    "data_fingerprint", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION",
]


@dataclass
class TrainResult:
    step: int  # the step training stopped at (== number_of_steps when it finished)
    model_path: Path
    images_per_sec: float | None  # None when there was nothing left to train


def run(session: Session, config: Config, resume: bool = False) -> TrainResult:
    """Train to ``config.number_of_steps``; with ``resume``, from the newest readable checkpoint.

    Under torchrun every rank runs this; ``writes`` (rank 0) is the one process that touches the
    session's files and prints progress, and the others receive its checkpoint.
    """
    started = float(os.environ.get(STARTED_ENV) or time.time())  # --time_limit counts from the command's start
    ctx = distributed.context()
    classes, shards = read_records(session)
    eval_shards = read_eval_records(session)
    num_classes = len(classes) + 1
    device = models.resolve_device(config.device)
    if ctx.distributed and device.type == "cuda":
        device = ctx.cuda_device()
        torch.cuda.set_device(device)
    ctx.init(device, config.dist_timeout)
    writes = ctx.is_main  # the one decision: only this process writes files and shows progress
    per_rank = distributed.split_batch(config.batch_size, ctx.world)
    if ctx.distributed and writes:
        shared = device.type == "cuda" and ctx.backend == "gloo"
        console.info(f"{ctx.world} processes x {per_rank} images = batch {config.batch_size}, {ctx.backend} on "
                     f"{device.type}" + (" (processes share GPUs, which NCCL refuses: slower)" if shared else ""))
    found = find_checkpoint(session.checkpoints_dir) if resume and writes else None
    if resume and writes and found is None:
        console.info(f"no checkpoint in {session.checkpoints_dir}: training starts at step 0")
    fingerprint = data_fingerprint(session)
    if ctx.distributed:
        _check_same_records(ctx, fingerprint, session)
        found = ctx.broadcast(found)  # rank 0's checkpoint, wherever the others' files are
    checkpoint_path, checkpoint = found if found else (None, None)
    if checkpoint is not None and writes:
        check_resumable(checkpoint, checkpoint_path, config, classes)
        check_data(checkpoint, checkpoint_path, fingerprint, config.allow_changed_data)
    start_step = checkpoint["step"] if checkpoint else 0
    fixed_steps = checkpoint.get("fixed_steps") if checkpoint and config.time_limit else None
    if fixed_steps:  # --time_limit fixed the count in the run resumed: train to it, as that run would have
        config = _laid_out(config, int(fixed_steps))
    elif config.time_limit:
        config = dataclasses.replace(config, number_of_steps=PROVISIONAL_STEPS)
    if config.optimizer == "auto":  # configure resolves it; a run resumed keeps its optimizer
        started_with = checkpoint.get("optimizer_name") if checkpoint else None
        config = dataclasses.replace(
            config, optimizer=started_with or models.resolve_optimizer("auto", config.number_of_steps)
        )
    network = checkpoint["network"] if checkpoint else models.network_name(config.network, session.cache)
    best = None
    if checkpoint is None and not ctx.distributed:
        set_aside_earlier_run(session)  # under torchrun the launching process did, before the ranks started
    elif checkpoint is not None and writes:
        # Rows and a best.pt from after the checkpoint belong to steps that are trained again.
        events.drop_metrics_after(session.metrics_path, start_step)
        best = read_best(session.best_checkpoint_path)

    # The run owns the random state while it trains: seeded from config.seed (so the model's
    # initialisation and the detectors' box sampling repeat), restored from a checkpoint on
    # resume, and handed back to the caller untouched afterwards.
    with torch.random.fork_rng(devices=cuda_indices(device)):
        torch.default_generator.manual_seed(config.seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(config.seed)
        if checkpoint is not None:
            model = models.restore(network, num_classes, checkpoint["structure"], checkpoint["model"], str(checkpoint_path))
            models.set_image_size(model, config.image_size)
            set_rng_states(checkpoint["rng"], device)
            console.info(f"resuming from {checkpoint_path.name} at step {start_step}")
        else:
            model = models.build_model(config.network, num_classes, config.weights, config.image_size, session.cache,
                                       classes)
        _set_box_sampling(model, config)

        since_best = int(checkpoint.get("evaluations_since_best") or 0) if checkpoint else 0
        stopped_early = bool(config.patience) and since_best >= config.patience
        if start_step >= config.number_of_steps or stopped_early:
            console.info(
                f"stopped early at step {start_step}: {since_best} evaluations without a better AP (--patience "
                f"{config.patience}); raise --patience, or set it to 0, to train on" if stopped_early else
                f"already finished at step {start_step}; raise --number_of_steps (now "
                f"{config.number_of_steps}) to train further"
            )
            last = model
            if config.ema and checkpoint.get("ema") is not None:
                last = copy.deepcopy(model)
                last.load_state_dict(checkpoint["ema"])
            if writes:
                _export(session, config, network, classes, last, start_step, best)
            return TrainResult(start_step, session.model_path, None)

        trainer, dataset, sampler = _trainer(config, model, network, classes, device, shards, start_step, checkpoint,
                                             checkpoint_path, best, ctx, writes)
        trainer.since_best = since_best
        trainer.fixed_steps = fixed_steps
        if config.time_limit and not fixed_steps:
            if trainer.bar is None and writes:
                console.info(f"--time_limit {config.time_limit:g} min: timing a few seconds of steps to fix their number")

            def relayout(steps: int) -> None:
                nonlocal config
                config = _laid_out(config, max(steps, trainer.step + 1))
                trainer.end = sampler.num_steps = trainer.fixed_steps = config.number_of_steps
                trainer.scheduler = build_scheduler(trainer.optimizer, config, trainer.step)
                for hook in trainer.hooks:
                    if hasattr(hook, "config"):
                        hook.config = config
                if trainer.bar is not None:
                    trainer.bar.total = config.number_of_steps
                    trainer.bar.refresh()
                if writes:
                    config.write(session.config_path)
                    console.info(
                        f"--time_limit {config.time_limit:g} min: training to step {config.number_of_steps} "
                        f"(warmup {config.warmup_steps}, evaluations every {config.eval_every or 'end'}); "
                        "pipeline.config records it"
                    )

            eval_images = sum(1 for _ in _eval_count(eval_shards)) if eval_shards else 0
            trainer.register(TimeLimitHook(config.time_limit * 60, started, eval_images, ctx.broadcast, relayout))
        writer = None
        if writes:
            if not eval_shards:
                console.info("no eval split (records.json lists no eval images): no evaluation; the last step's model is exported")
            writer = events.summary_writer(session.logs_dir, start_step)
            trainer.register(
                LogHook(writer, config.log_every, dataset, sampler, classes, mean=ctx.mean),
                EvalHook(writer, session, config, classes, eval_shards),
                CheckpointHook(session, config, network, classes, fingerprint, checkpoint_path),
            )
        else:
            trainer.register(LogHook(None, config.log_every, mean=ctx.mean))
        if ctx.distributed:
            trainer.register(SyncCheckHook(ctx))
        with writer if writer is not None else contextlib.nullcontext():
            images_per_sec = trainer.train()
        step, best = trainer.step, trainer.best

    if not writes:
        return TrainResult(step, session.model_path, images_per_sec)
    best_step, best_metrics = _export(session, config, network, classes, trainer.ema.model if trainer.ema else model,
                                      step, best)
    session.record_stage(
        "train", step=step, images_per_sec=round(images_per_sec, 2), device=str(device), network=network,
        best_step=best_step, best_metrics=best_metrics, stopped_early=trainer.finished, processes=ctx.world,
    )
    where = f"{ctx.world} processes on {device.type}" if ctx.distributed else str(device)
    console.info(f"trained to step {step} at {images_per_sec:.1f} images/s on {where}; model saved to {session.model_path}")
    report.write_after_training(session, config)
    return TrainResult(step, session.model_path, images_per_sec)


# --time_limit: the run's end until a few measured steps fix it (TimeLimitHook).
PROVISIONAL_STEPS = 10**9


def _laid_out(config: Config, steps: int) -> Config:
    """The config of a run of ``steps`` steps under --time_limit: the schedule and the final
    plain part follow from the count; warmup at most a fifth of it, four evaluations."""
    every = max(1, steps // TimeLimitHook.EVALUATIONS) if config.eval_every else 0
    return dataclasses.replace(config, number_of_steps=steps, warmup_steps=min(config.warmup_steps, steps // 5),
                               eval_every=every)


def _eval_count(shards: list[Path]):
    from ..data.tfrecord import index_records

    for shard in shards:
        yield from index_records(shard)


def _check_same_records(ctx: distributed.Context, fingerprint: dict[str, Any], session: Session) -> None:
    """Every node must train on the records rank 0 has (each may hold its own copy)."""
    theirs = ctx.broadcast(fingerprint)
    if theirs != fingerprint:
        raise SessionError(
            f"rank {ctx.rank}: the records in {session.records_dir} differ from rank 0's; every node needs the "
            "same data and settings (same files, --seed and split flags), or a shared session folder"
        )


def _trainer(config: Config, model: nn.Module, network: str, classes: list[str], device: torch.device,
             shards: list[Path], start_step: int, checkpoint: dict[str, Any] | None, checkpoint_path: Path | None,
             best: dict[str, Any] | None, ctx: distributed.Context,
             writes: bool) -> tuple[Trainer, RecordDataset, StepBatchSampler]:
    """The ``Trainer`` of this run (hooks not yet registered), its dataset and its (global) sampler."""
    use_amp = bool(config.amp) and device.type == "cuda"
    if ctx.distributed and config.sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif writes:
            console.info("--sync_bn needs CUDA (PyTorch's SyncBatchNorm); each CPU process keeps its own statistics")
    model.to(device)
    ema = None
    if config.ema and writes:  # only the writing rank evaluates and saves it
        state = checkpoint.get("ema") if checkpoint is not None else None
        updates = int(checkpoint.get("ema_updates") or 0) if state is not None else 0
        ema = EMA(model, config.ema_decay, state, updates)
    lr = config.learning_rate
    if lr is None:  # from the global batch: the rule does not change with the number of processes
        lr = models.default_learning_rate(network, config.batch_size, config.optimizer)
    optimizer = build_optimizer(model, config, lr)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if checkpoint is not None:
        restore_optimizer(optimizer, scaler, checkpoint, config, lr, use_amp)
    scheduler = build_scheduler(optimizer, config, start_step)
    dataset = RecordDataset(
        shards, config.image_size, train=True, seed=config.seed, num_classes=len(classes),
        augmentation=config.online_augmentation,
    )
    sampler = StepBatchSampler(len(dataset), config.batch_size, config.seed, start_step, config.number_of_steps,
                               config.plain_fraction)
    # Rank r reads slice r of each step's global batch: the same images per step on any world size.
    batches = distributed.RankSlice(sampler, ctx.rank, ctx.world) if ctx.distributed else sampler
    loader = make_loader(dataset, batches, config.num_workers, device, config.seed + ctx.rank)
    net = None
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    trainer = Trainer(
        model, optimizer, scheduler, scaler, loader, device, start_step=start_step, end=config.number_of_steps,
        batch_size=config.batch_size, grad_clip=config.grad_clip, ema=ema, use_amp=use_amp, best=best,
        last_saved=checkpoint_path, closing=[dataset], net=net, agree=ctx.any, show_progress=writes,
    )
    return trainer, dataset, sampler


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
                data = files.torch_load(path, "best checkpoint")
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
    if not detectors.set_box_sampling(model, int(config.box_batch_size_per_image)):
        console.info(f"--box_batch_size_per_image applies to Faster R-CNN only; {config.network} ignores it")
