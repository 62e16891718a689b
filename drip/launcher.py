"""Host side of ``training_starter.py`` and ``inference_starter.py``.

Parses the same flags as ``drip train`` / ``drip infer`` plus where to run them (``--runtime``),
then runs the command in this Python (``local``) or in Drip's container (``docker``). Imports
only the standard library (and, for the Docker runtime, the Docker SDK): a host needs no PyTorch
to start Drip, and ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import cli
from .errors import DripError, guarded

RUNTIMES = ("auto", "local", "docker")


DOCKER_FLAGS = ("base_image", "docker_network", "gpus", "tensorboard_port", "shell")


def _gpus(value: str) -> str:
    v = value.strip().lower()
    if v in ("all", "none") or (v.isdigit() and int(v) > 0):
        return v
    raise argparse.ArgumentTypeError(f"{value!r} is not 'all', 'none' or a number of GPUs (e.g. 1)")


def _port(value: str) -> int:
    if value.isdigit() and 0 <= int(value) <= 65535:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1-65535, or 0 for none)")


def add_runtime_flags(p: argparse.ArgumentParser, command: str = "train") -> None:
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=os.environ.get("DRIP_RUNTIME", "auto"),
        help="Where the stages run: 'docker' in Drip's container (GPU through the NVIDIA "
        "Container Toolkit), 'local' in this Python, 'auto' = docker when a Docker engine "
        "answers, else local (default: auto, or $DRIP_RUNTIME)",
    )
    # Docker-only flags default to SUPPRESS: the namespace then tells whether the user gave
    # one, and --runtime local can say that it has no effect.
    d = p.add_argument_group("docker runtime")
    d.add_argument(
        "--gpus",
        type=_gpus,
        default=argparse.SUPPRESS,
        metavar="{all,N,none}",
        help="GPUs the container gets, through the NVIDIA Container Toolkit (default: all; "
        "with --device cpu none are requested)",
    )
    d.add_argument(
        "--base_image",
        default=argparse.SUPPRESS,
        metavar="IMAGE",
        help="Image to build Drip's image on, passed as the Dockerfile's BASE_IMAGE: any image "
        "with Python >= 3.10 and venv, e.g. one made by scripts/docker_base_image.sh where no "
        "registry can be reached (default: the Dockerfile's, an official slim Python image)",
    )
    d.add_argument(
        "--docker_network",
        default=argparse.SUPPRESS,
        metavar="NETWORK",
        help="Docker network for the image build and the container, e.g. 'host' when pip in a "
        "build cannot reach the package index through the default bridge (default: the "
        "engine's bridge)",
    )
    if command == "train":
        d.add_argument(
            "--tensorboard_port",
            type=_port,
            default=argparse.SUPPRESS,
            metavar="PORT",
            help="TensorBoard runs in the container during training, on http://127.0.0.1:PORT/ "
            "only (0 = no TensorBoard) (default: 6006)",
        )
    d.add_argument(
        "--shell",
        action="store_true",
        default=argparse.SUPPRESS,
        help="Open an interactive shell in Drip's container with the mounts, user and GPUs "
        f"this 'drip {command}' would get, instead of running it",
    )


STARTERS = {"train": "training_starter.py", "infer": "inference_starter.py"}


def build_parser(command: str, prog: str) -> argparse.ArgumentParser:
    if command == "train":
        p = cli.add_train_flags(cli.new_parser(prog, cli.TRAIN_DESCRIPTION))
    else:
        p = cli.add_infer_flags(cli.new_parser(prog, cli.INFER_DESCRIPTION))
    add_runtime_flags(p, command)
    # A flag of the other starter given to this one: the error names the starter that takes it.
    p.related = lambda: {other: build_parser_only(other) for other in STARTERS if other != command}
    return p


def build_parser_only(command: str) -> argparse.ArgumentParser:
    """The other starter's parser, for the hint about a flag it takes (not its own hints)."""
    p = build_parser(command, STARTERS[command])
    p.related = None
    return p


def docker_unavailable_reason(timeout: float = 2.0) -> str | None:
    """None when Drip can run in Docker here, else why not (one line).

    Fast: when no engine listens the socket refuses at once, and a hung one gets ``timeout``.
    """
    from .runtime import docker

    try:
        docker.connect(timeout=timeout)
    except DripError as exc:
        return str(exc)
    return None


def choose_runtime(requested: str) -> str:
    if requested == "local":
        return "local"
    reason = docker_unavailable_reason()
    if reason is None:
        return "docker"
    if requested == "docker":
        raise DripError(f"--runtime docker: {reason}; use --runtime local")
    print(f"[drip] running locally ({reason})", file=sys.stderr)
    return "local"


def main(command: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(command, prog or os.path.basename(sys.argv[0])).parse_args(argv)

    def run() -> int:
        requested = "docker" if getattr(args, "shell", False) and args.runtime == "auto" else args.runtime
        if choose_runtime(requested) == "local":
            docker_only = [f"--{name}" for name in DOCKER_FLAGS if hasattr(args, name)]
            if "--shell" in docker_only:
                raise DripError("--shell opens a shell in Drip's container; it needs --runtime docker")
            if docker_only:
                print(f"[drip] {', '.join(docker_only)}: no effect with the local runtime", file=sys.stderr)
            return cli.run_command(command, args)
        from .runtime import docker

        return docker.run(command, args)

    return guarded(run)
