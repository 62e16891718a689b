"""The Docker runtime: runs ``drip train`` / ``drip infer`` in Drip's container, from the host.

Two halves:

* ``build_run_spec`` turns a command and its parsed flags into a ``RunSpec``: the image, the
  argv inside the container, the bind mounts, the user, the environment, the GPU request,
  TensorBoard. It is a pure function of its arguments (and of which paths exist), so the unit tests
  check every mount and flag without an engine.
* ``run`` / ``ensure_image`` / ``doctor`` talk to the engine through the Docker SDK for Python
  (imported only when called): build the image with streamed progress, run the container with
  streamed logs, forward Ctrl-C, return the container's exit code.

Paths: every host path Drip reads or writes is bind-mounted at the *same* absolute path inside
the container, and the container starts in the same working directory. The flags therefore
reach ``drip`` exactly as typed, error messages name the user's own paths, and a session made
in the container can be resumed with ``--runtime local`` and vice versa. A path that would
land on the image's own folders (``/usr``, ``/opt``, ``/root``...) is mounted under
``/drip/host`` instead and its flag rewritten. Inputs are mounted read-only; the session and
results folders read-write; nothing else of the host is visible.

Standard library only at import time: the starters must start without PyTorch, and fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import hashlib
import io
import os
import re
import select
import signal
import socket
import struct
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..config import HOST_STARTED_ENV, STARTED_ENV, AuditConfig, Config, InferConfig, SelectConfig
from ..errors import DripError
from ..stops import STOP, StopSignals
from .torchrun import Launch

DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"  # the Dockerfile's ARG default (a test checks)
IMAGE_REPO = "drip"
HOST_PREFIX = "/drip/host"
DEFAULT_SESSION_FOLDER = "pipeline/"
# The container's environment names its image, and session.json keeps it under this key.
IMAGE_ENV, BASE_IMAGE_ENV, SESSION_IMAGE_KEY = "DRIP_IMAGE", "DRIP_BASE_IMAGE", "docker_image"
DEFAULT_TENSORBOARD_PORT = 6006
# In bridge mode TensorBoard listens on the container's 127.0.0.1, and drip.runtime.relay relays a Unix
# socket in this folder (a private host folder mounted here) to it; see drip/runtime/relay.py.
RELAY_DIR = "/drip/tensorboard"
RELAY_SOCKET = "tensorboard.sock"
GIB = 1 << 30

# Top-level folders of the image: a host path under one of these cannot be mirrored without
# hiding the image's own files (or, for /root, without a folder the container user can't enter).
RESERVED_TOP = frozenset({
    "bin", "boot", "dev", "drip", "etc", "lib", "lib32", "lib64", "libx32",
    "opt", "proc", "root", "run", "sbin", "sys", "usr", "var",
})

# Path-valued options: (field, mode, kind). "input" = mount read-only if it exists; "maybe" =
# a path only when it exists (else a name: --network NAME, --weights coco); "output" =
# read-write, created on the host first so it belongs to the user, not to the engine's root.
TRAIN_PATHS = (
    ("src_json_path", "ro", "input"),
    ("eval_json_path", "ro", "input"),
    ("image_folder_path", "ro", "input"),
    ("class_map_path", "ro", "input"),
    ("augmentation_policy", "ro", "input"),
    ("network", "ro", "maybe"),
    ("weights", "ro", "maybe"),
)
INFER_PATHS = (
    ("images_path", "ro", "input"),
    ("model", "ro", "input"),
    ("src_json_path", "ro", "input"),
    ("results_path", "rw", "output"),
)
SELECT_PATHS = (
    ("images_path", "ro", "input"),
    ("model", "ro", "input"),
    ("output", "rw", "output file"),  # its folder is mounted: the earlier file goes to trash/ beside it
)
# Per command: the schemas whose fields are its flags (the first holds the path flags), its path flags.
COMMANDS = {
    "train": ((Config,), TRAIN_PATHS),
    "infer": ((InferConfig,), INFER_PATHS),
    "audit": ((Config, AuditConfig), TRAIN_PATHS),
    "select": ((SelectConfig,), SELECT_PATHS),
}
# Commands that write a session (mounted read-write, with the weights cache).
SESSION_COMMANDS = ("train", "audit")
WEIGHT_NAMES = frozenset({"coco", "imagenet", "none"})

NVIDIA_FIX = (
    "install the NVIDIA Container Toolkit, then run 'sudo nvidia-ctk runtime configure "
    "--runtime=docker && sudo systemctl restart docker'"
)


class Mount(NamedTuple):
    host: str  # the real path on the host (symlinks resolved)
    container: str  # where it appears inside the container
    mode: str  # "ro" or "rw"


@dataclass(frozen=True)
class Identity:
    """Who the container runs as: the user behind the starter (behind ``sudo`` too)."""

    uid: int
    gid: int
    name: str
    groups: tuple[int, ...] = ()

    @property
    def home(self) -> str:
        return "/root" if self.uid == 0 else f"/home/{_safe_name(self.name)}"


@dataclass(frozen=True)
class Host:
    """The facts about the host and engine that a run spec depends on."""

    cwd: str
    identity: Identity
    memory_bytes: int = 8 * GIB  # the engine's memory: sizes /dev/shm
    nvidia_runtime: bool | None = None  # None: unknown (request GPUs and see)
    tty: bool = False  # stdout and stderr are a terminal: allocate one in the container
    stdin_tty: bool = False  # so is stdin: --shell is interactive
    term: str = "xterm"

    @classmethod
    def current(cls, memory_bytes: int | None = None, nvidia_runtime: bool | None = None) -> Host:
        return cls(
            cwd=os.getcwd(),
            identity=invoking_identity(),
            memory_bytes=memory_bytes or _host_memory(),
            nvidia_runtime=nvidia_runtime,
            tty=sys.stdout.isatty() and sys.stderr.isatty(),
            stdin_tty=sys.stdin.isatty(),
            term=os.environ.get("TERM") or "xterm",
        )


@dataclass
class RunSpec:
    """Everything ``docker run`` needs, as plain data."""

    image: str
    command: list[str]  # argv inside the container
    mounts: list[Mount]
    user: str  # "uid:gid"
    group_add: list[str]
    environment: dict[str, str]
    working_dir: str
    device_requests: list[dict[str, Any]]
    shm_size: int  # bytes of /dev/shm: DataLoader workers pass batches through it
    network: str | None  # None: the engine's default (bridge)
    tmpfs: dict[str, str] = field(default_factory=dict)  # HOME, owned by the user
    make_dirs: list[str] = field(default_factory=list)  # host folders to create before the run
    tensorboard: list[str] | None = None  # argv to start in the running container
    tensorboard_url: str | None = None
    # argv of the relay from a Unix socket in RELAY_DIR to TensorBoard (bridge mode); the starter
    # mounts a private host folder there and serves the host's loopback port through it.
    tensorboard_relay: list[str] | None = None
    notes: list[str] = field(default_factory=list)  # one-line messages for the user
    tty: bool = False
    interactive: bool = False  # --shell: stdin attached
    init: bool = True  # tini as PID 1: forwards Ctrl-C to drip, reaps DataLoader workers


# -- the user ---------------------------------------------------------------------------------
def invoking_identity(environ: dict[str, str] | None = None, euid: int | None = None) -> Identity:
    """The user who ran the starter: under ``sudo`` the one behind it (SUDO_UID/SUDO_GID)."""
    environ = os.environ if environ is None else environ
    euid = os.geteuid() if euid is None else euid
    if euid == 0 and environ.get("SUDO_UID", "").isdigit():
        uid = int(environ["SUDO_UID"])
        gid = int(environ["SUDO_GID"]) if environ.get("SUDO_GID", "").isdigit() else uid
        name = environ.get("SUDO_USER") or str(uid)
        try:
            groups = os.getgrouplist(name, gid)
        except (KeyError, OSError):
            groups = [gid]
    else:
        uid, gid = os.getuid(), os.getgid()
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = str(uid)
        groups = os.getgroups()
    return Identity(uid, gid, name, tuple(sorted({g for g in groups if g != gid})))


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "user"


# -- paths ------------------------------------------------------------------------------------
def container_path(host_abs: str) -> str:
    """Where the host path ``host_abs`` appears in the container: the same path if it can be."""
    parts = Path(host_abs).parts
    if len(parts) < 2 or parts[1] in RESERVED_TOP:
        return HOST_PREFIX + host_abs.rstrip("/") if host_abs != "/" else HOST_PREFIX
    return host_abs


def _resolve(value: str, cwd: str) -> tuple[str, str]:
    """(absolute path as typed, real path) of a path flag's value relative to ``cwd``."""
    lexical = os.path.normpath(os.path.join(cwd, os.path.expanduser(value)))
    return lexical, os.path.realpath(lexical)


def _arg_in_container(value: str, cwd: str) -> str:
    """The flag value that names, inside the container, what ``value`` names on the host."""
    lexical, _ = _resolve(value, cwd)
    inside = container_path(lexical)
    as_typed = os.path.normpath(os.path.join(container_path(cwd), os.path.expanduser(value)))
    return value if as_typed == inside else inside


def yolo_dataset_folders(value: str, cwd: str) -> list[str]:
    """The folders a YOLO source's images live in, to mount with it: a data.yaml's folder and
    the folders its top-level ``path:``, ``train:``, ``val:`` and ``test:`` lines name outside
    it, or the folder above a ``labels`` folder (which holds ``images/`` too). Empty for other
    formats. The yaml is read line by line: the host side has no YAML parser, and one-line
    values are what data.yaml files hold."""
    lexical, real = _resolve(value, cwd)
    parts = Path(lexical).parts
    if os.path.isdir(real) and "labels" in parts[1:]:
        at = len(parts) - 1 - parts[::-1].index("labels")
        return [str(Path(*parts[:at]))]
    if not (os.path.isfile(real) and lexical.lower().endswith((".yaml", ".yml"))):
        return []
    here = os.path.dirname(lexical)
    folders = [here]
    try:
        lines = Path(real).read_text(encoding="utf-8-sig", errors="replace").splitlines()
    except OSError:
        return folders  # drip itself reports an unreadable yaml
    for line in lines:
        match = re.match(r"(path|train|val|test):\s*(.+?)\s*(#.*)?$", line)
        if not match:
            continue
        named = match.group(2).strip("'\"")
        if not named or named.startswith(("[", "{")):
            continue
        target = os.path.normpath(os.path.join(here, os.path.expanduser(named)))
        if os.path.isfile(target):
            target = os.path.dirname(target)
        if os.path.isdir(target) and not _inside(target, here) and target != here:
            folders.append(target)
    return folders


def _add_mount(mounts: list[Mount], new: Mount) -> None:
    """Add ``new`` unless a mount already gives the same access; rw wins over ro."""
    for i, m in enumerate(mounts):
        if m.container == new.container:
            if new.mode == "rw" and m.mode == "ro":
                mounts[i] = new
            return
    mounts.append(new)


def _prune(mounts: list[Mount]) -> list[Mount]:
    """Drop mounts that a mount of a parent folder with the same mode already covers.

    A read-only input inside a read-write folder (or the other way round) keeps its own mount:
    Docker mounts parents first, so the inner one wins and inputs stay read-only. So does one
    reached through a symlink: the parent's mount would show the link, not its target.
    """
    kept = []
    for m in mounts:
        covered = any(
            o is not m and o.mode == m.mode and _inside(m.container, o.container)
            and m.host == o.host.rstrip("/") + m.container[len(o.container.rstrip("/")):]
            for o in mounts
        )
        if not covered:
            kept.append(m)
    return sorted(kept, key=lambda m: (m.container.count("/"), m.container))


def _inside(path: str, folder: str) -> bool:
    return path != folder and (path + "/").startswith(folder.rstrip("/") + "/")


# -- GPUs -------------------------------------------------------------------------------------
def plan_gpus(gpus: str, device: str, nvidia_runtime: bool | None) -> tuple[list[dict], list[str]]:
    """The GPU request for ``--gpus`` and ``--device``, and notes to print.

    GPUs are requested unless the user asked for none or for the CPU. An engine that lacks the
    NVIDIA runtime gets a one-line explanation with the fix, and runs on the CPU only when the
    user allowed it (``--device cpu`` or ``--gpus none``).
    """
    if gpus == "none" or device == "cpu":
        if device == "cuda":
            raise DripError("--device cuda with --gpus none: the container would see no GPU; drop one of them")
        notes = []
        if nvidia_runtime is False and gpus != "none":
            notes.append(
                "the Docker engine has no NVIDIA runtime; running on the CPU (--device cpu). "
                f"For GPUs: {NVIDIA_FIX}"
            )
        return [], notes
    if nvidia_runtime is False:
        raise DripError(no_gpu_message())
    count = -1 if gpus == "all" else int(gpus)
    return [{"driver": "", "count": count, "capabilities": [["gpu"]]}], []


def no_gpu_message() -> str:
    return (
        "the Docker engine cannot give the container a GPU (it has no NVIDIA runtime): "
        f"{NVIDIA_FIX}; or pass --device cpu to run on the CPU"
    )


# -- the spec ---------------------------------------------------------------------------------
def _effective(args: argparse.Namespace, schema, name: str):
    """The value of field ``name``: as given on the command line, else the schema default."""
    if hasattr(args, name):
        return getattr(args, name)
    return {f.name: f.default for f in dataclasses.fields(schema)}[name]


def build_run_spec(
    command: str, args: argparse.Namespace, image: str, host: Host, base_image: str | None = None
) -> RunSpec:
    """What to run in the container for ``drip <command>`` with the parsed ``args``.

    ``args`` is the starter's namespace: the schema fields the user typed (defaults are
    suppressed), ``session_folder``, ``resume_training`` (train) and the runtime flags.
    ``image`` (and the ``base_image`` it was built on) reach the container as ``DRIP_IMAGE`` and
    ``DRIP_BASE_IMAGE``: training records them in the session (``drip.runtime.local``), so
    inference can run in the same image (``plan_image``).
    """
    if command not in COMMANDS:
        raise ValueError(f"the Docker runtime runs {', '.join(COMMANDS)}, not {command!r}")
    schemas, paths = COMMANDS[command]
    schema = schemas[0]
    cwd, ident = host.cwd, host.identity
    mounts: list[Mount] = []
    make_dirs: list[str] = []
    rewritten: dict[str, str] = {}
    notes: list[str] = []

    def mount(value: str, mode: str, create: bool = False) -> str:
        lexical, real = _resolve(value, cwd)
        if create and not os.path.exists(real):
            make_dirs.append(real)
        _add_mount(mounts, Mount(real, container_path(lexical), mode))
        return _arg_in_container(value, cwd)

    for name, mode, kind in paths:
        value = _effective(args, schema, name)
        if value is None:
            continue
        value = str(value)
        exists = os.path.exists(_resolve(value, cwd)[1])
        if kind == "maybe" and (value.lower() in WEIGHT_NAMES or not exists):
            continue  # a network name or a weights keyword, not a file
        if kind == "input" and not exists:
            continue  # drip itself reports a missing input, with the path as typed
        if kind == "output file":
            folder = os.path.dirname(value) or "."
            rewritten[name] = os.path.join(mount(folder, mode, create=True), os.path.basename(value))
            continue
        inside = mount(value, mode, create=kind == "output")
        if name in ("src_json_path", "eval_json_path"):
            for dataset in yolo_dataset_folders(value, cwd):
                mount(dataset, "ro")  # YOLO's images are beside its labels, not in --image_folder_path
        if inside != value or hasattr(args, name):
            rewritten[name] = inside

    session = str(getattr(args, "session_folder", DEFAULT_SESSION_FOLDER))
    session_lexical, session_real = _resolve(session, cwd)
    env_extra = {}
    if command in SESSION_COMMANDS:
        session_arg = mount(session, "rw", create=True)
        env_extra["TORCH_HOME"] = container_path(session_lexical) + "/cache"  # downloads survive sessions
    elif _effective(args, schema, "model") is None and os.path.isdir(session_real):
        session_arg = mount(session, "ro")  # the default model: <session>/dl/model.pt, read only
    else:
        session_arg = _arg_in_container(session, cwd)

    argv = ["drip", command, "--session_folder", session_arg]
    if command == "train" and getattr(args, "resume_training", False):
        argv.append("--resume_training")
    if command in ("audit", "select"):
        argv += ["--runtime", "local"]  # already in the container
    for f in [f for one in schemas for f in dataclasses.fields(one)]:
        if f.name in rewritten:
            argv += [f"--{f.name}", rewritten[f.name]]
        elif hasattr(args, f.name):
            argv += [f"--{f.name}", str(getattr(args, f.name))]

    device = str(_effective(args, schema, "device"))
    gpus = getattr(args, "gpus", "all")
    device_requests, gpu_notes = plan_gpus(gpus, device, host.nvidia_runtime)
    notes += gpu_notes

    network = getattr(args, "docker_network", None) or None
    if command == "infer" and str(getattr(args, "nproc_per_node", "1")) != "1":
        argv += ["--nproc_per_node", str(args.nproc_per_node)]  # the images shared over processes
    if command in SESSION_COMMANDS:
        argv += _launch_argv(args, gpus, device)
        if int(getattr(args, "nnodes", 1)) > 1:
            # torchrun's rendezvous and the collectives connect machine to machine, on ports the
            # bridge network would hide: the container takes the host's network.
            if network not in (None, "host"):
                raise DripError(
                    f"--nnodes {args.nnodes} needs the host's network in the container (torchrun connects the "
                    f"machines directly); drop --docker_network {network}"
                )
            network = "host"
            notes.append("several machines: the container uses the host's network (--network host)")
    tensorboard = relay = url = None
    tb_port = int(getattr(args, "tensorboard_port", DEFAULT_TENSORBOARD_PORT))
    if command == "train" and tb_port and not getattr(args, "shell", False):
        logs = container_path(session_lexical) + "/dl/logs"
        if network == "host":
            # The container shares the host's network: bind the loopback address directly.
            tensorboard = _tensorboard_argv(logs, "127.0.0.1", tb_port)
        else:
            # No published port: one would make the container's bridge address serve TensorBoard
            # to other containers. Its own loopback, relayed through a Unix socket (drip.runtime.relay).
            tensorboard = _tensorboard_argv(logs, "127.0.0.1", DEFAULT_TENSORBOARD_PORT)
            relay = ["python", "-m", "drip.runtime.relay", "--unix", f"{RELAY_DIR}/{RELAY_SOCKET}",
                     "--to", f"127.0.0.1:{DEFAULT_TENSORBOARD_PORT}"]
        url = f"http://127.0.0.1:{tb_port}/"

    home = ident.home
    tmpfs = {}
    if any(m.container == home for m in mounts):
        home = "/tmp"  # the user's data is mounted right there: no room for a home
    else:
        tmpfs[home] = f"uid={ident.uid},gid={ident.gid},mode=0700"  # a home of their own, not the host's
    environment = {
        "HOME": home,
        "USER": ident.name,
        "LOGNAME": ident.name,
        "PYTHONUNBUFFERED": "1",  # logs reach the terminal as they happen
        IMAGE_ENV: image,
        **({BASE_IMAGE_ENV: base_image} if base_image else {}),
        **env_extra,
    }
    if host.tty:
        environment["TERM"] = host.term

    shell = bool(getattr(args, "shell", False))
    if not shell and STARTED_ENV in os.environ:
        environment[HOST_STARTED_ENV] = os.environ[STARTED_ENV]  # --time_limit counts from the host's start
    if shell:
        notes.append("shell with the mounts of: " + " ".join(_quote(a) for a in argv))
        argv = ["/bin/bash"]

    return RunSpec(
        image=image,
        command=argv,
        mounts=_prune(mounts),
        user=f"{ident.uid}:{ident.gid}",
        group_add=[str(g) for g in ident.groups],
        environment=environment,
        working_dir=container_path(os.path.normpath(cwd)),
        device_requests=device_requests,
        shm_size=shm_size_for(host.memory_bytes),
        network=network,
        tmpfs=tmpfs,
        make_dirs=make_dirs,
        tensorboard=tensorboard,
        tensorboard_url=url,
        tensorboard_relay=relay,
        notes=notes,
        tty=host.tty and (host.stdin_tty or not shell),
        interactive=shell,
    )


def _launch_argv(args: argparse.Namespace, gpus: str, device: str) -> list[str]:
    """torchrun's flags for ``drip train`` in the container: those given, and with ``--gpus N`` one
    process per GPU the container gets (with ``all``, 'auto' counts them inside)."""
    out = []
    defaults = {f.name: f.default for f in dataclasses.fields(Launch)}
    for name, default in defaults.items():
        value = getattr(args, name, default)
        if name == "nproc_per_node" and value == "auto" and gpus.isdigit() and device != "cpu":
            value = gpus
        if value != default:
            out += [f"--{name}", str(value)]
    return out


def _tensorboard_argv(logdir: str, address: str, port: int) -> list[str]:
    return ["tensorboard", "--logdir", logdir, "--host", address, "--port", str(port)]


def shm_size_for(memory_bytes: int) -> int:
    """/dev/shm for the container: half the memory (a limit, not a reservation), 1-32 GiB.

    Docker's default of 64 MiB makes DataLoader workers fail with 'bus error'.
    """
    return max(GIB, min(memory_bytes // 2, 32 * GIB))


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _host_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


# -- the image --------------------------------------------------------------------------------
def project_root() -> Path:
    """The folder holding Drip's Dockerfile: the clone the starters run from."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "Dockerfile").is_file():
        raise DripError(
            f"Drip's Dockerfile is not in {root}; the Docker runtime builds its image from a "
            "clone of Drip: run the starters from the clone, or use --runtime local"
        )
    return root


def context_files(root: Path) -> list[str]:
    """The files of the build context, as .dockerignore filters them (sorted, relative)."""
    from docker.utils.build import exclude_paths

    ignore = root / ".dockerignore"
    patterns = []
    if ignore.is_file():
        patterns = [
            line.strip() for line in ignore.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
    paths = exclude_paths(str(root), patterns)
    return sorted(p for p in paths if (root / p).is_file())


def image_tag(root: Path, files: list[str], base_image: str) -> str:
    """``drip:<hash>`` of the build context and the base image: what goes into the image."""
    h = hashlib.sha256()
    h.update(f"base={base_image}\n".encode())
    for rel in files:
        path = root / rel
        h.update(f"{rel}\0{os.access(path, os.X_OK)}\0{path.stat().st_size}\0".encode())
        h.update(path.read_bytes())
    return f"{IMAGE_REPO}:{h.hexdigest()[:16]}"


def _context_tar(root: Path, files: list[str]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in files:
            info = tar.gettarinfo(str(root / rel), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0  # the same content gives the same layer cache keys
            info.mode = 0o755 if info.mode & 0o111 else 0o644
            with open(root / rel, "rb") as f:
                tar.addfile(info, f)
    buf.seek(0)
    return buf


@dataclass(frozen=True)
class ImagePlan:
    """What Drip's image is made of, and the tag that names exactly that."""

    root: Path
    files: list[str]
    base_image: str
    tag: str

    @classmethod
    def of_project(cls, base_image: str | None = None) -> ImagePlan:
        root = project_root()
        base = base_image or DEFAULT_BASE_IMAGE
        files = context_files(root)
        return cls(root, files, base, image_tag(root, files, base))


def ensure_image(client, plan: ImagePlan, network: str | None, out=sys.stderr) -> str:
    """Build ``plan.tag`` unless the engine has it already; streams the build's output."""
    import docker

    try:
        client.images.get(plan.tag)
        return plan.tag
    except docker.errors.ImageNotFound:
        pass
    print(f"[drip] building image {plan.tag} from {plan.root / 'Dockerfile'} on {plan.base_image} "
          "(the first build downloads PyTorch: several minutes, about 6 GB)", file=out, flush=True)
    started = time.monotonic()
    stream = client.api.build(
        fileobj=_context_tar(plan.root, plan.files),
        custom_context=True,
        tag=plan.tag,
        buildargs={"BASE_IMAGE": plan.base_image},
        network_mode=network,
        labels={"org.drip.base-image": plan.base_image},
        rm=True,
        forcerm=True,
        decode=True,
    )
    tail: list[str] = []
    for chunk in stream:
        if "error" in chunk:
            raise DripError(_build_error(chunk.get("error", ""), plan.base_image, tail))
        text = chunk.get("stream") or ""
        if chunk.get("status"):
            text = f"{chunk['status']} {chunk.get('progress', '')}".rstrip() + "\n"
        if text:
            out.write(text)
            out.flush()
            tail = (tail + text.splitlines())[-20:]
    print(f"[drip] built {plan.tag} in {time.monotonic() - started:.0f} s", file=out, flush=True)
    return plan.tag


def _build_error(message: str, base: str, tail: list[str]) -> str:
    message = " ".join(message.split())
    unreachable = re.search(
        r"pull access denied|manifest unknown|not found|dial tcp|no such host|connection refused|TLS handshake",
        message,
    )
    if unreachable and "returned a non-zero code" not in message:  # FROM failed, not a RUN step
        return (
            f"building Drip's image: could not get the base image {base} ({message}); without "
            "access to a registry, build a local base (sudo scripts/docker_base_image.sh) and "
            "pass --base_image drip-test-base:bookworm --docker_network host"
        )
    if "returned a non-zero code" in message and any("pip" in line for line in tail):
        return (
            f"building Drip's image failed: {message}; if pip could not reach the package index, "
            "try --docker_network host (and check the proxy settings of the Docker engine)"
        )
    return f"building Drip's image failed: {message}"


# -- the engine -------------------------------------------------------------------------------
def engine_address() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def connect(timeout: float = 5.0):
    """A Docker SDK client that answered a ping, or a DripError saying why none did."""
    try:
        import docker
    except ImportError:
        raise DripError(
            "the Docker SDK for Python is not installed; pip install 'docker>=7.1' (or run "
            "scripts/setup.sh), or use --runtime local"
        ) from None
    import requests

    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
        return client
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise DripError(unreachable_message(exc)) from None


def unreachable_message(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    where = engine_address()
    if "Permission denied" in text or "PermissionError" in text:
        return (
            f"no permission to use the Docker engine at {where}: add yourself to the docker "
            "group (sudo usermod -aG docker $USER, then log in again) or run with sudo"
        )
    if "No such file" in text or "FileNotFoundError" in text or "Connection refused" in text:
        return f"no Docker engine answers at {where}; install Docker and start it (sudo systemctl start docker)"
    return f"the Docker engine at {where} does not answer ({text[:160]})"


def nvidia_runtime(info: dict) -> bool | None:
    """Whether the engine lists the NVIDIA runtime. None when it may still have GPUs (CDI)."""
    if "nvidia" in (info.get("Runtimes") or {}):
        return True
    if info.get("CDISpecDirs"):
        return None  # Docker 25+ can reach GPUs through CDI without a runtime entry
    return False


def run(command: str, args: argparse.Namespace) -> int:
    """``drip <command>`` in Drip's container; returns the container's exit code."""
    client = connect()
    info = client.info()
    plan = plan_image(command, args, client)
    host = Host.current(memory_bytes=info.get("MemTotal") or None, nvidia_runtime=nvidia_runtime(info))
    spec = build_run_spec(command, args, plan.tag, host, plan.base_image)  # a user mistake fails before a build
    ensure_image(client, plan, getattr(args, "docker_network", None))
    return run_spec(client, spec, host.identity)


def trained_image(session_folder: str) -> dict[str, str] | None:
    """``{"tag", "base_image"}`` of the image the session at ``session_folder`` was trained in, as
    its ``dl/session.json`` records it; None where it records none (trained locally, or before
    Drip recorded it) or cannot be read."""
    from ..session import Session

    try:
        recorded = Session(Path(session_folder)).read_state().get(SESSION_IMAGE_KEY)
    except (DripError, OSError):
        return None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("tag"), str):
        return None
    return {"tag": recorded["tag"], "base_image": str(recorded.get("base_image") or DEFAULT_BASE_IMAGE)}


def plan_image(command: str, args: argparse.Namespace, client, out=None) -> ImagePlan:
    """The image ``drip <command>`` runs in.

    Training builds (or finds) the image of this clone on ``--base_image``. Inference of the
    session's own model, without ``--base_image``, runs in the image the session was trained in:
    the code that made the model, on the base it was built on (a base that needs no registry
    stays one). If the engine no longer has that image, this clone's is built on the same base.
    """
    out = out or sys.stderr
    base = getattr(args, "base_image", None)
    if command == "train" or base is not None or getattr(args, "model", None) is not None:
        return ImagePlan.of_project(base)
    session = str(getattr(args, "session_folder", DEFAULT_SESSION_FOLDER))
    recorded = trained_image(session)
    if recorded is None:
        return ImagePlan.of_project(None)
    plan = ImagePlan.of_project(recorded["base_image"])
    if plan.tag == recorded["tag"]:
        return plan
    import docker

    try:
        client.images.get(recorded["tag"])
    except docker.errors.ImageNotFound:
        print(f"[drip] {session} was trained in {recorded['tag']}, which the engine no longer has; "
              f"using this clone's image on the same base, {recorded['base_image']}", file=out, flush=True)
        return plan
    print(f"[drip] {command} runs in {recorded['tag']}, the image {session} was trained in (Drip's code "
          "has changed since; pass --base_image to run this clone's)", file=out, flush=True)
    return dataclasses.replace(plan, tag=recorded["tag"])


def prepare_host(spec: RunSpec, identity: Identity) -> None:
    """Create the read-write folders on the host, owned by the user (also under sudo)."""
    chown = os.geteuid() == 0 and identity.uid != 0
    for folder in spec.make_dirs:
        missing = []
        p = Path(folder)
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            if chown:
                os.chown(d, identity.uid, identity.gid)


def _tensorboard_listener(spec: RunSpec) -> socket.socket | None:
    """The host's 127.0.0.1 port for TensorBoard, checked free before the container starts.

    Bound and returned when the starter relays it (bridge mode); on the host network TensorBoard
    binds it itself, so it is only checked.
    """
    if not spec.tensorboard_url:
        return None
    port = int(spec.tensorboard_url.rsplit(":", 1)[1].strip("/"))
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        raise DripError(
            f"--tensorboard_port {port}: the port is in use on 127.0.0.1; pass another port, "
            "or --tensorboard_port 0 to run without TensorBoard"
        ) from None
    if not spec.tensorboard_relay:
        s.close()
        return None
    s.listen(64)
    return s


def _relay_folder(identity: Identity) -> str:
    """A private host folder for the relay's socket, writable by the container's user."""
    import tempfile

    # /tmp keeps the socket's path under the 108 bytes a Unix socket address may have.
    folder = tempfile.mkdtemp(prefix="drip-tb-", dir="/tmp" if os.path.isdir("/tmp") else None)
    if os.geteuid() == 0 and identity.uid != 0:
        os.chown(folder, identity.uid, identity.gid)
    return folder


def create_kwargs(client, spec: RunSpec, name: str) -> dict[str, Any]:
    """Arguments of the SDK's low-level ``create_container`` for ``spec``."""
    import docker

    host_config = client.api.create_host_config(
        mounts=[docker.types.Mount(m.container, m.host, type="bind", read_only=m.mode == "ro") for m in spec.mounts],
        device_requests=[docker.types.DeviceRequest(**r) for r in spec.device_requests] or None,
        shm_size=spec.shm_size,
        network_mode=spec.network,
        group_add=spec.group_add or None,
        tmpfs=spec.tmpfs or None,
        init=spec.init,
        privileged=False,
        security_opt=["no-new-privileges"],
    )
    return {
        "image": spec.image,
        "command": spec.command,
        "user": spec.user,
        "environment": spec.environment,
        "working_dir": spec.working_dir,
        "tty": spec.tty,
        "stdin_open": spec.interactive,
        "detach": False,
        "host_config": host_config,
        "name": name,
        "labels": {"org.drip.command": spec.command[1] if len(spec.command) > 1 else "shell"},
    }


def run_spec(client, spec: RunSpec, identity: Identity, out=None, err=None) -> int:
    """Run ``spec``: stream its output, forward signals, return its exit code, remove it."""
    import docker

    out = out or sys.stdout
    err = err or sys.stderr
    for note in spec.notes:
        print(f"[drip] {note}", file=err, flush=True)
    prepare_host(spec, identity)
    listener = _tensorboard_listener(spec)
    relay_folder = stop_relay = None
    if listener is not None:
        relay_folder = _relay_folder(identity)
        spec = dataclasses.replace(spec, mounts=[*spec.mounts, Mount(relay_folder, RELAY_DIR, "rw")])
    name = f"drip-{os.getpid()}-{os.urandom(3).hex()}"
    try:
        cid = client.api.create_container(**create_kwargs(client, spec, name))["Id"]
    except docker.errors.APIError as exc:
        _close_relay(listener, None, relay_folder)
        raise DripError(_run_error(exc)) from None
    try:
        sock = client.api.attach_socket(cid, params={
            "stdin": 1 if spec.interactive else 0, "stdout": 1, "stderr": 1, "stream": 1,
        })
        try:
            client.api.start(cid)
        except docker.errors.APIError as exc:
            raise DripError(_run_error(exc)) from None
        if spec.tensorboard:
            _start_tensorboard(client, cid, spec, err)
            if listener is not None:
                from . import relay

                stop_relay = relay.start(listener, relay.unix_connector(os.path.join(relay_folder, RELAY_SOCKET)))
        if spec.interactive and spec.tty:
            _resize(client, cid)
        _pump(client, cid, sock, spec, out, err)
        return int(client.api.wait(cid).get("StatusCode", 1))
    finally:
        try:
            client.api.remove_container(cid, force=True)
        except docker.errors.APIError:
            pass
        _close_relay(listener, stop_relay, relay_folder)


def _close_relay(listener: socket.socket | None, stop, folder: str | None) -> None:
    if stop is not None:
        stop.set()
    if listener is not None:
        listener.close()
    if folder is not None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)  # Drip's own temporary folder: the socket, nothing else


def _run_error(exc) -> str:
    text = " ".join(str(getattr(exc, "explanation", None) or exc).split())
    if "could not select device driver" in text:
        return no_gpu_message()
    return f"the Docker engine refused to run the container: {text}"


def _start_tensorboard(client, cid: str, spec: RunSpec, err) -> None:
    for argv in filter(None, (spec.tensorboard, spec.tensorboard_relay)):
        exec_id = client.api.exec_create(
            cid, argv, user=spec.user, environment=spec.environment,
            workdir=spec.working_dir, stdout=False, stderr=False,
        )["Id"]
        client.api.exec_start(exec_id, detach=True)
    print(f"[drip] TensorBoard: {spec.tensorboard_url}", file=err, flush=True)


def _resize(client, cid: str) -> None:
    """Give the container's terminal the size of ours (at start and on SIGWINCH)."""
    import docker

    try:
        size = os.get_terminal_size(sys.stdout.fileno())
        client.api.resize(cid, height=size.lines, width=size.columns)
    except (OSError, docker.errors.APIError):
        pass  # not a terminal, or the container is gone: nothing to resize


def _pump(client, cid: str, sock, spec: RunSpec, out, err) -> None:
    """Copy the container's output to ours (and our stdin to it for --shell) until it ends.

    Ctrl-C (or SIGTERM to the starter) sends SIGINT (SIGTERM) to drip in the container, and the
    starter waits for it however long it takes: training finishes its step, saves a checkpoint,
    says so and exits, and on a large model and a slow disk that can take minutes. Only a second
    Ctrl-C (or SIGTERM) kills the container, losing the steps since its last checkpoint.
    """
    raw = getattr(sock, "_sock", sock)
    stdin_fd = sys.stdin.fileno() if spec.interactive else None
    restore_tty: Callable[[], None] | None = None
    tty_mode = spec.interactive and spec.tty
    if tty_mode:
        import termios
        import tty

        saved = termios.tcgetattr(stdin_fd)
        tty.setraw(stdin_fd)
        old_winch = signal.signal(signal.SIGWINCH, lambda *_: _resize(client, cid))

        def _restore():
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
            signal.signal(signal.SIGWINCH, old_winch)

        restore_tty = _restore
    demux = _Demux(out, err, tty=spec.tty)
    stopping = 0
    training = spec.command[1:2] in (["train"], ["audit"])
    # In a raw terminal Ctrl-C is a byte for the shell in the container; SIGINT comes from kill.
    signals = StopSignals((signal.SIGINT,) if tty_mode else STOP)
    try:
        with signals:
            while True:
                readers = [raw, signals] + ([stdin_fd] if stdin_fd is not None else [])
                ready, _, _ = select.select(readers, [], [], 1.0)
                for sig in signals.take():
                    stopping += 1
                    if stopping == 1:
                        print(f"\n[drip] {stop_message(sig, training)}", file=err, flush=True)
                        _signal(client, cid, sig)
                    else:
                        print(f"\n[drip] {kill_message(training)}", file=err, flush=True)
                        _signal(client, cid, "SIGKILL")
                if raw in ready:
                    data = raw.recv(65536)
                    if not data:
                        break
                    demux.feed(data)
                if stdin_fd is not None and stdin_fd in ready:
                    data = os.read(stdin_fd, 65536)
                    if data:
                        raw.sendall(data)
                    else:
                        raw.shutdown(socket.SHUT_WR)  # EOF: the container's stdin closes
                        stdin_fd = None
    finally:
        demux.flush()
        if restore_tty:
            restore_tty()


def stop_message(sig: str, training: bool) -> str:
    if training:
        return (f"stopping: {sig} sent to the container; training finishes its step, saves a checkpoint "
                "and says when it is done (on a large model and a slow disk this can take minutes). "
                "Ctrl-C again kills it now, losing every step since its last checkpoint")
    return f"stopping: {sig} sent to the container. Ctrl-C again kills it now"


def kill_message(training: bool) -> str:
    if training:
        return ("killing the container: the checkpoint being written is lost, and so is every step "
                "since the last one saved; --resume_training continues from that one")
    return "killing the container"


def _signal(client, cid: str, sig: str) -> None:
    import docker

    try:
        client.api.kill(cid, signal=sig)
    except docker.errors.APIError:
        pass  # already gone


class _Demux:
    """Splits Docker's multiplexed attach stream (8-byte frame headers) into stdout and stderr."""

    def __init__(self, out, err, tty: bool):
        self.targets = {1: out, 2: err}
        self.tty = tty
        self.buf = b""

    def _write(self, stream_id: int, data: bytes) -> None:
        target = self.targets.get(stream_id, self.targets[2])
        target = getattr(target, "buffer", None) or target
        try:
            target.write(data)
        except TypeError:
            target.write(data.decode("utf-8", "replace"))
        target.flush()

    def feed(self, data: bytes) -> None:
        if self.tty:
            self._write(1, data)
            return
        self.buf += data
        while len(self.buf) >= 8:
            stream_id, size = struct.unpack(">BxxxL", self.buf[:8])
            if len(self.buf) < 8 + size:
                break
            self._write(stream_id, self.buf[8:8 + size])
            self.buf = self.buf[8 + size:]

    def flush(self) -> None:
        if self.buf:
            self._write(2, self.buf)
            self.buf = b""


# -- doctor -----------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    status: str  # "ok", "warn", "fail"
    detail: str
    fix: str = ""


def _free_bytes(path: Path) -> int | None:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
        return st.f_bavail * st.f_frsize
    except OSError:
        return None


def doctor_checks(
    session_folder: str = DEFAULT_SESSION_FOLDER, base_image: str | None = None, connect_fn: Callable = connect
) -> list[Check]:
    """Whether this host can run Drip's container: engine, NVIDIA runtime, disk, shared memory."""
    checks: list[Check] = []
    try:
        client = connect_fn()
    except DripError as exc:
        checks.append(Check("engine", "fail", str(exc).split(";")[0], str(exc).split(";", 1)[-1].strip()))
        client = None
    info: dict = {}
    if client is not None:
        info = client.info()
        checks.append(Check(
            "engine", "ok",
            f"Docker {info.get('ServerVersion', '?')} answers at {engine_address()} "
            f"(API {client.api.api_version}, {info.get('Driver', '?')} storage)",
        ))
        gpu = nvidia_runtime(info)
        if gpu:
            checks.append(Check("nvidia", "ok", "the engine has the NVIDIA runtime: containers get GPUs with --gpus"))
        elif gpu is None:
            checks.append(Check("nvidia", "warn", "no NVIDIA runtime listed, but the engine supports CDI: GPUs may work", NVIDIA_FIX))
        else:
            checks.append(Check("nvidia", "warn", "the engine has no NVIDIA runtime: Drip runs on the CPU only (--device cpu)", NVIDIA_FIX))
        root = info.get("DockerRootDir") or "/var/lib/docker"
        free = _free_bytes(Path(root)) if engine_address().startswith("unix://") else None
        need = 12 * GIB  # the image is about 6 GB, and a rebuild holds two for a while
        if free is None:
            checks.append(Check("image disk", "warn", f"cannot see the free space of {root} from here", ""))
        elif free < need:
            checks.append(Check(
                "image disk", "fail", f"{free / GIB:.1f} GiB free for images in {root}; Drip's image needs about {need // GIB} GiB",
                "free space there (docker system prune removes unused images and build cache)",
            ))
        else:
            checks.append(Check("image disk", "ok", f"{free / GIB:.0f} GiB free for images in {root}"))
    session = Path(session_folder)
    free = _free_bytes(session)
    need = 2 * GIB
    if free is None or free < need:
        checks.append(Check(
            "session disk", "fail",
            f"{'unknown' if free is None else f'{free / GIB:.1f} GiB'} free for the session in {session}; a session needs a few GiB "
            "(augmented images, records, checkpoints)",
            "free space there, or pass --session_folder on a disk with more room",
        ))
    else:
        checks.append(Check("session disk", "ok", f"{free / GIB:.0f} GiB free for the session in {session}"))
    memory = int(info.get("MemTotal") or _host_memory())
    shm = shm_size_for(memory)
    if memory < 4 * GIB:
        checks.append(Check(
            "shared memory", "warn",
            f"the engine has {memory / GIB:.1f} GiB of memory; containers get {shm / GIB:.1f} GiB of /dev/shm for DataLoader workers",
            "give Docker more memory, or pass --num_workers 0 to load data in the main process",
        ))
    else:
        checks.append(Check(
            "shared memory", "ok",
            f"containers get {shm / GIB:.0f} GiB of /dev/shm for DataLoader workers "
            f"(engine memory {memory / GIB:.0f} GiB)",
        ))
    if client is not None:
        try:
            tag = ImagePlan.of_project(base_image).tag
            import docker

            try:
                client.images.get(tag)
                checks.append(Check("image", "ok", f"{tag} is built"))
            except docker.errors.ImageNotFound:
                checks.append(Check("image", "ok", f"{tag} is not built yet; the first run builds it (several minutes)"))
        except DripError as exc:
            checks.append(Check("image", "warn", str(exc)))
    return checks


def doctor(session_folder: str = DEFAULT_SESSION_FOLDER, base_image: str | None = None, out=None) -> int:
    """``drip doctor``: print each check with its fix; non-zero exit when one fails."""
    out = out or sys.stdout
    checks = doctor_checks(session_folder, base_image)
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.status.upper():4}  {c.name:<{width}}  {c.detail}", file=out)
        if c.fix and c.status != "ok":
            print(f"{'':4}  {'':<{width}}  fix: {c.fix}", file=out)
    return 1 if any(c.status == "fail" for c in checks) else 0
