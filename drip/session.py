"""The session folder: the contract between stages.

Layout under ``--session_folder`` (default ``pipeline/``)::

    dl/                       the current session
      session.json            what ran, when, with which Drip (updated by each stage), and
                              the Docker image training ran in (``docker_image``), if any
      pipeline.config         the training config (commented YAML, user-editable)
      label_map.pbtxt         class ids and names
      split/                  train.json, eval.json (Drip JSON manifests), report.json,
                              train.coco.json, eval.coco.json (the same, as COCO)
      records/                train-*.tfrecord, eval-*.tfrecord, records.json
      checkpoints/            step-XXXXXXX.pt, the newest few, and best.pt (best AP so far)
      logs/                   TensorBoard event files
      metrics.jsonl           one row of COCO metrics per evaluation during training
      model.pt                the exported model (the best by AP on the eval split)
      report/                 index.html and the pictures it shows (drip.evaluation.report)
    images_augmented/         augmented training images and annotations.json
    images_tiled/             with --tile_size: the training images as tiles (and the small
                              ones whole), which split/train.json then lists
    trash/<timestamp>/        earlier sessions, moved here instead of deleted
    cache/                    downloaded weights, shared by all sessions

Every stage takes a ``Session`` and reads and writes only the files named here, so any stage can
be re-run alone. Standard library only.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SessionError


@dataclass(frozen=True)
class Session:
    root: Path

    @property
    def dl(self) -> Path:
        return self.root / "dl"

    @property
    def trash(self) -> Path:
        return self.root / "trash"

    @property
    def images_augmented(self) -> Path:
        return self.root / "images_augmented"

    @property
    def images_tiled(self) -> Path:
        return self.root / "images_tiled"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def state_path(self) -> Path:
        return self.dl / "session.json"

    @property
    def config_path(self) -> Path:
        return self.dl / "pipeline.config"

    @property
    def label_map_path(self) -> Path:
        return self.dl / "label_map.pbtxt"

    @property
    def split_dir(self) -> Path:
        return self.dl / "split"

    @property
    def train_manifest(self) -> Path:
        return self.split_dir / "train.json"

    @property
    def eval_manifest(self) -> Path:
        return self.split_dir / "eval.json"

    @property
    def train_coco(self) -> Path:
        return self.split_dir / "train.coco.json"

    @property
    def eval_coco(self) -> Path:
        return self.split_dir / "eval.coco.json"

    @property
    def report_path(self) -> Path:
        return self.split_dir / "report.json"

    @property
    def augmented_manifest(self) -> Path:
        return self.images_augmented / "annotations.json"

    @property
    def records_dir(self) -> Path:
        return self.dl / "records"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dl / "checkpoints"

    @property
    def logs_dir(self) -> Path:
        return self.dl / "logs"

    @property
    def model_path(self) -> Path:
        return self.dl / "model.pt"

    @property
    def metrics_path(self) -> Path:
        return self.dl / "metrics.jsonl"

    @property
    def best_checkpoint_path(self) -> Path:
        return self.checkpoints_dir / "best.pt"

    # -- lifecycle ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.dl.is_dir()

    def start_new(self) -> Path | None:
        """Move an existing session (``dl/``, ``images_augmented/``, ``images_tiled/``) to ``trash/<timestamp>/``.

        Returns the trash folder it went to, or None when there was nothing to move. Nothing is
        deleted: a name already in the trash gets a numeric suffix.
        """
        movable = [p for p in (self.dl, self.images_augmented, self.images_tiled) if p.exists() or p.is_symlink()]
        if not movable:
            self.dl.mkdir(parents=True, exist_ok=True)
            return None
        target = trash_folder(self.trash)
        for path in movable:
            move(path, target / path.name)
        self.dl.mkdir(parents=True, exist_ok=True)
        return target

    def require(self, path: Path, stage: str) -> Path:
        """``path`` if it exists, else a SessionError saying which stage makes it."""
        if not path.exists():
            raise SessionError(
                f"{path} is missing; run the {stage} stage first "
                f"(drip stage {stage} --session_folder {self.root})"
            )
        return path

    # -- session.json -------------------------------------------------------------------------
    def read_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as exc:
            raise SessionError(
                f"{self.state_path}: not valid JSON (line {exc.lineno}); restore it from "
                "trash or start a new session"
            ) from None

    def record(self, key: str, value: Any) -> None:
        """Keep ``value`` under ``key`` at the top of session.json, beside the stages."""
        state = self.read_state()
        state[key] = value
        write_json(self.state_path, state)

    def record_stage(self, stage: str, **facts: Any) -> None:
        """Note in session.json that ``stage`` finished, with what it reports about itself."""
        from . import __version__

        state = self.read_state()
        state.setdefault("drip_version", __version__)
        state.setdefault("stages", {})[stage] = {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **facts,
        }
        write_json(self.state_path, state)


def trash_folder(trash: Path, label: str = "") -> Path:
    """Create and return ``trash/<timestamp>[-label]``, or ``...-2``, ``...-3`` when taken.

    ``mkdir`` either creates the folder or fails, so two runs in the same second (or two
    processes at once) never share one and nothing moved there lands on an earlier copy.
    """
    name = time.strftime("%Y%m%d-%H%M%S") + (f"-{label}" if label else "")
    trash.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = trash / (name if n == 1 else f"{name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


def move(src: Path, dst: Path) -> None:
    """Move a file or folder to ``dst``, which must not exist: nothing is overwritten or lost.

    Within a file system this is one rename. Across file systems (a trash folder that is a link
    to another disk, say) the copy is made as ``dst.partial``, synced to disk, renamed to
    ``dst``, and only then is the source removed: a copy that fails (disk full) or is killed
    leaves the source untouched and at most a ``.partial`` folder, which the next move replaces.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        raise SessionError(f"cannot move {src} to {dst}: that name is taken; nothing was moved")
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise SessionError(
                f"cannot move {src} to {dst} ({exc.strerror}); nothing was moved: check that "
                f"{src} exists and that you may write to both folders"
            ) from None
    partial = dst.with_name(dst.name + ".partial")
    _remove(partial)  # left by a copy that was killed; its source was never touched
    try:
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, partial, symlinks=True)
        else:
            shutil.copy2(src, partial, follow_symlinks=False)
        _sync(partial)
        os.rename(partial, dst)
        _sync(dst.parent)
    except OSError as exc:
        _remove(partial)
        reason = exc.strerror or str(exc).splitlines()[0]
        raise SessionError(
            f"cannot copy {src} to {dst} on another file system ({reason}); {src} is unchanged: "
            f"free space on the disk of {dst.parent} (or make it writable) and run again"
        ) from None
    try:
        _remove(src)
    except OSError as exc:
        raise SessionError(
            f"copied {src} to {dst}, but could not remove {src} ({exc.strerror}); the copy is "
            f"complete: delete {src} by hand and run again"
        ) from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _sync(path: Path) -> None:
    """fsync ``path``, and everything under it if it is a folder: the copy is on disk before
    the original goes."""
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            paths += [Path(root, name) for name in files + dirs]
    for p in paths:
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            continue  # links and special files carry no data of their own to sync
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:
            # Some file systems cannot sync a folder (EINVAL); its files are synced all the same.
            if not (p.is_dir() and exc.errno in (errno.EINVAL, errno.ENOTSUP)):
                raise
        finally:
            os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: readers never see half a file, a crash leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """Read a JSON file; malformed content is an InputError naming the file and line."""
    from .errors import InputError

    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found; check the path") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; save it as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path} line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}); fix it"
        ) from None
