"""Checkpoints: what goes in one, writing and pruning them, finding the newest, resume checks.

A checkpoint holds everything the next step depends on: model, optimizer, scheduler and
gradient-scaler state, the random states and the step, plus the config, the EMA, the best
evaluation so far and a fingerprint of the records (``data_fingerprint``) that tells on resume
whether the data changed. Only plain types and tensors go in, so they load with
``torch.load(weights_only=True)``. Files are written atomically (``files.save_atomic``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..config import Config
from ..data.records import shard_path
from ..detectors import files, models
from ..errors import SessionError
from ..session import Session, move, read_json, trash_folder

CHECKPOINT_FORMAT = "drip-checkpoint"
CHECKPOINT_VERSION = 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d{7,})\.pt$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:07d}.pt"


def checkpoint_state(trainer, step: int, *, network: str, classes: list[str], config: Config,
                     data: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint of ``trainer`` (a ``loop.Trainer``) at ``step``."""
    ema = trainer.ema
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": step,
        "network": network,
        "classes": list(classes),
        "structure": models.structure_of(trainer.model),
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "optimizer_name": config.optimizer,
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "config": config.to_dict(),
        "rng": rng_states(trainer.device),
        "data": data,
        "ema": ema.model.state_dict() if ema is not None else None,
        "ema_updates": ema.updates if ema is not None else 0,
        "best": trainer.best,
        "evaluations_since_best": trainer.since_best,  # so a resumed run keeps --patience's count
        "fixed_steps": getattr(trainer, "fixed_steps", None),  # the count --time_limit fixed, for a resume
    }


def save_checkpoint(state: dict[str, Any], directory: Path, step: int, *, keep: int, last_saved: Path | None,
                    protected: set[Path]) -> Path:
    """Write ``step-XXXXXXX.pt`` and prune all but the newest ``keep`` (and ``protected``)."""
    path = checkpoint_path(directory, step)
    try:
        files.save_atomic(state, path)
    except SessionError as exc:  # disk full: the checkpoints already written still count
        last = f"; then resume from {last_saved.name} with --resume_training" if last_saved else ""
        raise SessionError(f"{exc}{last}") from None
    protected = {path} | protected
    for old in list_checkpoints(directory)[:-keep]:
        if old not in protected:
            old.unlink(missing_ok=True)
    return path


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


def read_best(path: Path) -> dict[str, Any] | None:
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
    ap = best.get("AP")
    console.info(f"best model so far: step {best['step']} (AP {'-' if ap is None else format(ap, '.3f')})")
    return best


# -- resume checks ----------------------------------------------------------------------------
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
            path = shard_path(session.records_dir, item, index_path)
            if path.name in digests:
                shards[path.name] = str(digests[path.name])
            else:
                st = path.stat() if path.is_file() else None
                shards[path.name] = f"size {st.st_size}, modified {st.st_mtime_ns}" if st else "missing"
        count = entry.get("count") if isinstance(entry, dict) else None
        out[split] = {"count": count if isinstance(count, int) else None, "shards": shards}
    return out


def check_data(checkpoint: dict[str, Any], path: Path, now: dict[str, Any], allow: bool) -> None:
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


def check_resumable(checkpoint: dict[str, Any], path: Path, config: Config, classes: list[str]) -> None:
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


def set_aside_earlier_run(session: Session) -> None:
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


# -- random states ----------------------------------------------------------------------------
def rng_states(device: torch.device) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
    return {"torch": torch.get_rng_state(), "cuda": list(cuda)}


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if device.type == "cuda" and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def cuda_indices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
