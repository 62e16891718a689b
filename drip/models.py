"""The detectors Drip trains, how they are built from a starting point, and the model file.

The networks and how to run them belong to ``drip.detectors`` (the contract, with one adapter per
family); this module turns the user's choice (``--network``, ``--weights``) into a built network
through it, and reads and writes the model file.

``build_model`` makes a network ready to train from ``coco`` (the whole detector pretrained on
COCO, downloaded into the session's cache), ``imagenet`` (backbone only), ``none`` (from scratch)
or a weights file, or continues from a model file exported by Drip.

The model file (``model.pt``) holds plain types and tensors only and is read with
``torch.load(weights_only=True)``: loading a model never runs code from the file. Alongside the
weights it records what is needed to rebuild the network offline: the architecture name, the class
names, the image size, the training config and what the family needs to rebuild it (for
torchvision: which layers it froze for the starting point), so a model trained from COCO weights
is rebuilt without downloading them again.
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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torchvision
from torch import nn

from . import console, detectors
from .detectors.base import load_matching  # noqa: F401  (re-exported: callers find it here)
from .detectors.tv import NETWORKS, NetworkSpec, freeze_norms  # noqa: F401  (torchvision's registry)
from .errors import ConfigError, ModelError, SessionError

MODEL_FORMAT = "drip-model"
MODEL_VERSION = 1
START_POINTS = ("coco", "imagenet", "objects365", "none")


@dataclass
class LoadedModel:
    """A model file turned back into a ready detector (in eval mode, on its device)."""

    model: nn.Module
    classes: list[str]  # names, class id 1 first
    image_size: int
    network: str
    meta: dict[str, Any]  # everything else in the file except the weights (config, step, ...)


# -- lookups ----------------------------------------------------------------------------------
def model_file(network: str, cache_dir: Path | None = None) -> Path | None:
    """The model file that ``--network`` names, or None when it names a registry network.

    A ``.zip`` archive holding the model file is unpacked (see ``extract_model_archive``) into
    ``cache_dir/archives/`` (a private temporary folder without one).
    """
    if str(network).strip().lower() in detectors.network_names():
        return None
    path = Path(network).expanduser()
    if path.is_file():
        return unpack_if_archive(path, "--network", cache_dir)
    if "/" in str(network) or "\\" in str(network) or path.suffix.lower() in (".pt", ".pth", ".zip"):
        raise ModelError(
            f"--network {network}: no such model file; check the path, or give a network name "
            f"({', '.join(detectors.network_names())})"
        )
    return None


def network_name(network: str, cache_dir: Path | None = None) -> str:
    """The architecture behind ``--network``: the name itself, or the one a model file records."""
    path = model_file(network, cache_dir)
    if path is None:
        detectors.family(network)
        return str(network).strip().lower()
    return read_model_file(path, "--network")["network"]


# Up to this many steps ``--optimizer auto`` trains with AdamW, beyond it with SGD.
AUTO_ADAMW_MAX_STEPS = 10_000


def resolve_optimizer(name: str, number_of_steps: int, network: str | None = None) -> str:
    """``sgd`` or ``adamw``: ``name`` itself, or what ``auto`` picks for a run this long (and for
    ``network``, whose family may insist on one)."""
    if name != "auto":
        return name
    if network is not None:
        chosen = detectors.default_optimizer(network_name(network), number_of_steps)
        if chosen is not None:
            return chosen
    return "adamw" if number_of_steps <= AUTO_ADAMW_MAX_STEPS else "sgd"


def default_learning_rate(network: str, batch_size: int, optimizer: str = "sgd") -> float:
    """The tuned peak learning rate of ``network`` for ``batch_size`` images a step."""
    return detectors.default_learning_rate(network_name(network), batch_size, optimizer)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when PyTorch sees a GPU, else the CPU; a named device must exist."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "--device cuda: PyTorch sees no GPU here (is the container started with GPU access?); "
                "use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {name}: there are only {torch.cuda.device_count()} GPUs; use cuda or cuda:0"
            )
    elif device.type != "cpu":
        raise ConfigError(f"--device {name!r}: Drip runs on cpu or cuda; use auto, cpu or cuda")
    return device


# -- building ---------------------------------------------------------------------------------
def build_model(
    network: str,
    num_classes: int,
    weights: str = "none",
    image_size: int = 640,
    cache_dir: Path | None = None,
    classes: list[str] | None = None,
) -> nn.Module:
    """A detector for ``num_classes`` classes (background included: label-map size + 1), whose
    names (id 1 first) are ``classes`` where given (the families that keep names use them).

    ``network`` is a registry name or a Drip model file (its architecture and weights are the
    start point; ``weights`` is then ignored). ``weights`` is ``coco``, ``imagenet``,
    ``objects365``, ``none`` (what the network's family offers) or the path of a weights file.
    Pretrained weights are downloaded into ``cache_dir`` (kept between sessions).
    """
    if num_classes < 2:
        raise ModelError(f"num_classes={num_classes}: a detector needs the background and at least one class")
    path = model_file(network, cache_dir)
    if path is not None:
        model = _from_model_file(path, num_classes, classes)
    else:
        name = str(network).strip().lower()
        offered = detectors.family(name).start_points
        start = str(weights).strip()
        if start.lower() in START_POINTS:
            model = detectors.build(name, num_classes, start.lower(), cache_dir, classes)
        else:
            where = Path(start).expanduser()
            if not where.exists():
                raise ModelError(
                    f"--weights {where}: not one of {', '.join(offered)} and no such file; check the path"
                )
            model = detectors.from_weights_file(name, num_classes, where, cache_dir, f"--weights {where}", classes)
    set_image_size(model, image_size)
    return model


def set_image_size(model: nn.Module, image_size: int) -> None:
    """Make the detector take images whose longer side is ``image_size`` as they are
    (``drip.detectors.set_input_size``)."""
    detectors.set_input_size(model, image_size)


def read_state_file(path: Path, cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in a ``--weights`` file (or a .zip holding one), read without running code."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"--weights {path}: a folder, not a weights file; give the state_dict file inside it")
    loaded = torch_load(unpack_if_archive(path, "--weights", cache_dir), "--weights")
    if isinstance(loaded, dict) and loaded.get("format") == MODEL_FORMAT:
        raise ModelError(f"--weights {path}: this is a model exported by Drip; pass it as --network {path} instead")
    state = _state_dict_in(loaded)
    if state is None:
        raise ModelError(
            f"--weights {path}: not a state_dict (a dict of tensors); save one with "
            "torch.save(model.state_dict(), path)"
        )
    return state


def _state_dict_in(obj: Any) -> dict[str, torch.Tensor] | None:
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


def _from_model_file(path: Path, num_classes: int, classes: list[str] | None = None) -> nn.Module:
    meta = read_model_file(path, "--network")
    model = restore(meta["network"], meta["num_classes"], meta["structure"], meta["state_dict"], f"--network {path}")
    if meta["num_classes"] != num_classes:
        detectors.replace_head(model, meta["network"], num_classes, classes)
        console.info(
            f"--network {path}: trained for {meta['num_classes'] - 1} classes, this session has "
            f"{num_classes - 1}: the class head starts fresh, the rest continues"
        )
    return model


def structure_of(model: nn.Module) -> dict[str, Any]:
    """What rebuilding ``model`` needs beyond its weights (torchvision: frozen norms and
    parameters), as plain types."""
    return detectors.structure_of(model)


def apply_structure(model: nn.Module, structure: dict[str, Any], source: str) -> None:
    detectors.apply_structure(model, structure, source)


def restore(network: str, num_classes: int, structure: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Rebuild ``network`` exactly as it was trained and load ``state`` into it, offline."""
    # The random initialisation is overwritten at once: don't let it move the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        model = detectors.rebuild(network, num_classes, structure, source)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(
            f"{source}: its weights do not fit {network} as this Drip builds it "
            f"({_first_line(exc)}); use the Drip and library versions it was made with"
        ) from None
    return model


# -- the model file ---------------------------------------------------------------------------
def export_model(
    path: Path,
    model: nn.Module,
    network: str,
    label_map_names,
    image_size: int,
    config_dict: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model file atomically: plain types and tensors only, loadable with weights_only."""
    from . import __version__

    names = [str(n) for n in label_map_names]
    core = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "network": network,
        "num_classes": len(names) + 1,
        "classes": names,
        "image_size": int(image_size),
        "config": dict(config_dict),
        "structure": structure_of(model),
        "versions": {"drip": __version__, "torch": str(torch.__version__), "torchvision": torchvision.__version__},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(core))
    if clash:
        raise ValueError(f"export_model: extra keys {clash} would overwrite the model file's own")
    save_atomic({**core, **extra}, Path(path))
    return Path(path)


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
        raise ModelError(f"{where}: not a readable zip archive ({_first_line(exc)}); copy it again") from None
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
                    f"{where}: cannot unpack {info.filename} ({_first_line(exc)}); copy the archive "
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
            f"{what} {path}: not a PyTorch file Drip can read ({_first_line(exc)}); it may be "
            "truncated: copy it again"
        ) from None


def read_model_file(path: Path, what: str = "--model") -> dict[str, Any]:
    """The checked contents of a Drip model file."""
    data = torch_load(Path(path), what)
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        if isinstance(data, dict) and data.get("format") == "drip-checkpoint":
            raise ModelError(
                f"{what} {path}: this is a training checkpoint, not an exported model; use the "
                "session's model.pt (written when training ends or with --resume_training)"
            )
        if _state_dict_in(data) is not None:
            raise ModelError(
                f"{what} {path}: a bare state_dict, not a Drip model; to train from it pass it as "
                "--weights PATH with --network NAME (the network it belongs to)"
            )
        raise ModelError(f"{what} {path}: not a model file exported by Drip; use the model.pt of a session")
    if data.get("version", 0) > MODEL_VERSION:
        raise ModelError(
            f"{what} {path}: model file version {data.get('version')} is newer than this Drip "
            f"reads ({MODEL_VERSION}); update Drip"
        )
    missing = [k for k in ("network", "num_classes", "classes", "image_size", "state_dict") if k not in data]
    if missing:
        raise ModelError(f"{what} {path}: damaged model file (missing {', '.join(missing)}); export it again")
    data.setdefault("structure", {})
    return data


def load_model(path: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the detector in a Drip model file, in eval mode on ``device``."""
    path = Path(path)
    data = read_model_file(path)
    model = restore(data["network"], data["num_classes"], data["structure"], data["state_dict"], f"--model {path}")
    set_image_size(model, data["image_size"])
    model.to(torch.device(device)).eval()
    meta = {k: v for k, v in data.items() if k != "state_dict"}
    return LoadedModel(model, list(data["classes"]), int(data["image_size"]), data["network"], meta)


def _unpickle_reason(exc: BaseException) -> str | None:
    """The line of torch's weights_only refusal that names the refused object, if it names one.

    torch's message is a paragraph of advice (to use weights_only=False); the ``GLOBAL`` line is
    what tells the user which object the file wanted to build. Without one, the file was not a
    pickle of objects at all but damaged or foreign bytes.
    """
    lines = [line.strip() for line in str(exc).splitlines() if "global" in line.lower()]
    return lines[0] if lines else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
