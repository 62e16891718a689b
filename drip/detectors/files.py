"""Reading and writing the files a detector comes from, safely: what every adapter and the model
file share, and nothing about any network.

``torch_load`` reads plain data and tensors only (``weights_only``): a file never runs code.
``read_state_file`` takes the state_dict out of a ``--weights`` file (or of a checkpoint that
keeps it under ``model``/``state_dict``). A brought ``.zip`` is checked member by member before
the one model file inside it is unpacked (``unpack_if_archive``). ``save_atomic`` writes a file
that readers see whole or not at all.

What a Drip model file holds, and building a network from one, is ``drip.detectors.models``'.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import os
import pickle
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from .. import console
from ..errors import ModelError, SessionError
from .base import first_line

MODEL_FORMAT = "drip-model"


def read_state_file(path: Path, cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in a ``--weights`` file (or a .zip holding one), read without running code."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"--weights {path}: a folder, not a weights file; give the state_dict file inside it")
    loaded = torch_load(unpack_if_archive(path, "--weights", cache_dir), "--weights")
    if isinstance(loaded, dict) and loaded.get("format") == MODEL_FORMAT:
        raise ModelError(f"--weights {path}: this is a model exported by Drip; pass it as --network {path} instead")
    state = state_dict_in(loaded)
    if state is None:
        raise ModelError(
            f"--weights {path}: not a state_dict (a dict of tensors); save one with "
            "torch.save(model.state_dict(), path)"
        )
    return state


def state_dict_in(obj: Any) -> dict[str, torch.Tensor] | None:
    def is_state(value):
        return isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())

    if is_state(obj):
        return obj
    # Training checkpoints (torchvision references, Lightning, ...) keep it under one of these.
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and is_state(obj.get(key)):
            console.info(f"using the state_dict under {key!r} in the weights file")
            return obj[key]
    return None


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, synced, then renamed over it.

    Readers see the old file or the new one, never half of one, even if the power goes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        # torch reports a failed write as a RuntimeError ("unexpected pos") whose context is
        # the OSError that says why: a full disk or a file size limit is the user's to fix.
        cause = _os_error_in(exc)
        if cause is None:
            raise
        if cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise SessionError(
                f"could not save {path}: the disk is full or a file size limit was hit "
                f"({cause.strerror}); the earlier files there are unchanged: free space on the "
                f"disk holding {path.parent} (or raise the limit: ulimit -f) and run again"
            ) from None
        raise SessionError(
            f"could not save {path} ({cause.strerror or cause}); the earlier files there are "
            f"unchanged: check that the folder is writable and run again"
        ) from None


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError that ``exc`` is or was raised from (through __cause__/__context__), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


# -- brought archives -------------------------------------------------------------------------
ARCHIVE_SUFFIXES = (".zip",)


MODEL_SUFFIXES = (".pt", ".pth")


# Limits for a brought archive: a model archive has a handful of members; more, or gigabytes
# beyond any detector, is a mistake or a zip bomb.
ARCHIVE_MAX_MEMBERS = 1000


ARCHIVE_MAX_BYTES = 8 * 1024**3


_DRIVE = re.compile(r"^[A-Za-z]:")


_private_cache: Path | None = None


def unpack_if_archive(path: Path, what: str, cache_dir: Path | None = None) -> Path:
    """``path`` itself, or for a ``.zip`` the model file inside it, unpacked under ``cache_dir``.

    The archive is unpacked once into ``cache_dir/archives/<its sha256>/``: the same archive is
    found there again, another one (even under the same name) gets its own folder.
    """
    path = Path(path)
    if path.suffix.lower() not in ARCHIVE_SUFFIXES:
        return path
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ModelError(f"{what} {path}: cannot be read ({exc.strerror}); check the file") from None
    root = Path(cache_dir) if cache_dir is not None else _private_dir()
    target = root / "archives" / digest.hexdigest()[:32]
    done = [p for p in target.glob("*") if p.suffix.lower() in MODEL_SUFFIXES] if target.is_dir() else []
    if len(done) == 1:
        return done[0]  # unpacked before (renamed into place only when complete)
    return extract_model_archive(path, target, what)


def _private_dir() -> Path:
    """A temporary folder only this user can write, removed at exit: no shared /tmp name to hijack."""
    global _private_cache
    if _private_cache is None:
        _private_cache = Path(tempfile.mkdtemp(prefix="drip-models-"))
        atexit.register(shutil.rmtree, _private_cache, ignore_errors=True)
    return _private_cache


def extract_model_archive(zip_path: Path, target_dir: Path, what: str = "--network") -> Path:
    """The one model file (``.pt``/``.pth``) in a zip archive, extracted into ``target_dir``.

    A brought archive is hostile until checked: every member is checked before anything is
    written, and a member with ``..`` or an absolute path, a link or another special file, too
    many members or too many bytes refuse the whole archive. Only the model file is written,
    under its base name, to a temporary file in ``target_dir`` that is renamed when complete;
    ``zipfile.extractall`` is never used. A zip that is itself a ``torch.save`` file (one
    ``data.pkl`` and no ``.pt`` inside) is returned as it is.
    """
    zip_path, target_dir = Path(zip_path), Path(target_dir)
    where = f"{what} {zip_path}"
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelError(f"{where}: not a readable zip archive ({first_line(exc)}); copy it again") from None
    with archive:
        members = archive.infolist()
        if len(members) > ARCHIVE_MAX_MEMBERS:
            raise ModelError(
                f"{where}: {len(members)} members, more than the {ARCHIVE_MAX_MEMBERS} a model "
                "archive may have; zip only the model file"
            )
        for info in members:
            _check_member(info, where)
        total = sum(info.file_size for info in members)
        if total > ARCHIVE_MAX_BYTES:
            raise ModelError(
                f"{where}: unpacks to {_size(total)}, more than the {_size(ARCHIVE_MAX_BYTES)} "
                "a model archive may hold; zip only the model file"
            )
        found = [
            info for info in members
            if not info.is_dir()
            and PurePosixPath(info.filename).suffix.lower() in MODEL_SUFFIXES
            and not any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(info.filename).parts)
        ]
        if not found and any(PurePosixPath(info.filename).name == "data.pkl" for info in members):
            return zip_path  # torch.save writes zip archives: this is a model file named .zip
        if len(found) != 1:
            listed = ", ".join(info.filename for info in found[:5]) or "none"
            raise ModelError(
                f"{where}: expected exactly one model file (.pt or .pth) in the archive, found "
                f"{len(found)} ({listed}); zip the one model file alone"
            )
        info = found[0]
        out = target_dir / PurePosixPath(info.filename).name
        target_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            with archive.open(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, out)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError)):
                raise ModelError(
                    f"{where}: cannot unpack {info.filename} ({first_line(exc)}); copy the archive "
                    f"again, or unzip it and pass the model file itself"
                ) from None
            raise
    return out


def _size(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def _check_member(info: zipfile.ZipInfo, where: str) -> None:
    """Refuse a member that could write outside the target or is not a plain file or folder."""
    name = info.filename
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise ModelError(f"{where}: member {name!r} has an absolute path; refused: the archive must hold relative names only")
    if ".." in PurePosixPath(posix).parts:
        raise ModelError(f"{where}: member {name!r} points outside the archive (..); refused")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise ModelError(f"{where}: member {name!r} is a symbolic link; refused: zip the model file itself")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ModelError(f"{where}: member {name!r} is not a regular file; refused")
    if info.flag_bits & 0x1:
        raise ModelError(f"{where}: member {name!r} is encrypted; unzip it yourself and pass the model file")


def torch_load(path: Path, what: str) -> Any:
    """``torch.load`` that only reads plain data and tensors; any failure is a ModelError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickle_reason(exc)
        if reason is None:  # not a forbidden object: the bytes are no pickle torch understands
            raise ModelError(
                f"{what} {path}: not a PyTorch file Drip can read (unreadable pickle data); it may be "
                "damaged or of another format: copy it again"
            ) from None
        raise ModelError(
            f"{what} {path}: refused: the file holds Python objects that would run code when "
            f"loaded ({reason}); use a Drip model file or a plain state_dict"
        ) from None
    except FileNotFoundError:
        raise ModelError(f"{what} {path}: no such file; check the path") from None
    except IsADirectoryError:
        raise ModelError(f"{what} {path}: is a folder; give the model file inside it") from None
    except Exception as exc:  # torch reports a damaged file with many types (RuntimeError, EOFError, ...)
        raise ModelError(
            f"{what} {path}: not a PyTorch file Drip can read ({first_line(exc)}); it may be "
            "truncated: copy it again"
        ) from None


def _unpickle_reason(exc: BaseException) -> str | None:
    """The line of torch's weights_only refusal that names the refused object, if it names one.

    torch's message is a paragraph of advice (to use weights_only=False); the ``GLOBAL`` line is
    what tells the user which object the file wanted to build. Without one, the file was not a
    pickle of objects at all but damaged or foreign bytes.
    """
    lines = [line.strip() for line in str(exc).splitlines() if "global" in line.lower()]
    return lines[0] if lines else None
