"""Launching training on several processes (and machines) with torchrun, and reporting on it.

``drip train`` with ``--nproc_per_node`` > 1 or ``--nnodes`` > 1 prepares the session in its own
process (split, augment, records, configure: once, never per rank), then starts
``python -m torch.distributed.run`` (torchrun: rendezvous, restarts, signal forwarding are all
PyTorch's) with ``python -m drip.runtime.worker`` as the worker. Each worker writes its output to
``dl/logs/rank-N.log``; torchrun's own output goes to ``dl/logs/torchrun.log``. This process
shows the log of its node's first rank (rank 0 on the first node) as it grows, forwards Ctrl-C
and SIGTERM to torchrun (which passes them to every worker: rank 0 saves one checkpoint, all
exit), and when the run fails it says in one line which rank on which host failed, how, and
where its log is.

One machine: torchrun's standalone rendezvous on a free local port. Several: a static
rendezvous at ``--rdzv_endpoint`` with ``--node_rank``, so rank 0 (the one that writes
checkpoints and the model) is always on node 0.

Standard library only: it runs in the starters' process too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DistributedError, Interrupted
from ..stops import StopSignals

LAUNCH_FLAGS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "max_restarts")
CONFIG_ENV = "DRIP_TRAIN_CONFIG"  # the resolved config, as JSON, from the launching process to the ranks
SHUTDOWN_SECONDS = 120  # what torchrun gives the workers to save a checkpoint after a stop



@dataclass(frozen=True)
class Launch:
    nproc_per_node: str = "auto"  # "auto" (one per visible GPU, else 1) or a number
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT of node 0, for several nodes
    max_restarts: int = 0

    def processes(self, gpus: int) -> int:
        """Processes on this node: the number given, or one per visible GPU."""
        if self.nproc_per_node == "auto":
            return max(1, gpus)
        return int(self.nproc_per_node)

    def check(self) -> None:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(
                f"--nnodes {self.nnodes} needs --rdzv_endpoint HOST:PORT (node 0's address and a free port, "
                "the same on every node)"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node_rank {self.node_rank} is not in 0..{self.nnodes - 1} (--nnodes {self.nnodes})")
        if self.rdzv_endpoint and not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", self.rdzv_endpoint):
            raise ConfigError(f"--rdzv_endpoint {self.rdzv_endpoint}: expected HOST:PORT, e.g. 10.0.0.1:29500")


def _count(what: str, low: int):
    def parse(value: str) -> int:
        if value.isdigit() and int(value) >= low:
            return int(value)
        raise argparse.ArgumentTypeError(f"{value!r} is not {what}")

    return parse


def _nproc(value: str) -> str:
    v = value.strip().lower()
    if v == "auto" or (v.isdigit() and int(v) >= 1):
        return v
    raise argparse.ArgumentTypeError(f"{value!r} is not 'auto' or a number of processes (e.g. 2)")


def add_flags(p: argparse.ArgumentParser, command: str = "train") -> None:
    """torchrun's flags, under torchrun's names. Not kept in pipeline.config: they say where a run
    goes, not what it learns. Inference takes only ``--nproc_per_node``."""
    g = p.add_argument_group(
        "distributed (torchrun: one process per GPU, or --device cpu --nproc_per_node N)"
    )
    if command == "infer":
        g.add_argument("--nproc_per_node", type=_nproc, default="1", metavar="{auto,N}",
                       help="Processes that share the images: 'auto' = one per visible GPU; each image is "
                       "predicted once, and the results are the files one process writes (default: 1)")
        return
    g.add_argument("--nproc_per_node", type=_nproc, default="auto", metavar="{auto,N}",
                   help="Training processes on this machine: 'auto' = one per visible GPU (1 on the CPU). "
                   "--batch_size is the global batch, split evenly over all processes (default: auto)")
    g.add_argument("--nnodes", type=_count("a number of machines (>= 1)", 1), default=1, metavar="N",
                   help="Machines taking part; run the same command on each, with its --node_rank (default: 1)")
    g.add_argument("--node_rank", type=_count("a node rank (>= 0)", 0), default=0, metavar="R",
                   help="This machine's place, 0..nnodes-1; node 0 holds rank 0, which writes the checkpoints "
                   "and the model (default: 0)")
    g.add_argument("--rdzv_endpoint", default=None, metavar="HOST:PORT",
                   help="Where the machines meet: node 0's address and a free TCP port, the same on every "
                   "node (needed with --nnodes > 1)")
    g.add_argument("--max_restarts", type=_count("a number of restarts (>= 0)", 0), default=0, metavar="N",
                   help="When a process dies, restart the group up to N times; it resumes from the newest "
                   "checkpoint at its exact step (default: 0: the run stops with the failed rank named)")


def from_args(args: argparse.Namespace) -> Launch:
    launch = Launch(
        nproc_per_node=str(getattr(args, "nproc_per_node", "auto")),
        nnodes=int(getattr(args, "nnodes", 1)),
        node_rank=int(getattr(args, "node_rank", 0)),
        rdzv_endpoint=getattr(args, "rdzv_endpoint", None),
        max_restarts=int(getattr(args, "max_restarts", 0)),
    )
    launch.check()
    return launch


def torchrun_argv(launch: Launch, nproc: int, session_folder: Path, resume: bool, dist_timeout: float,
                  python: str = sys.executable, command: str = "train", logs_dir: Path | None = None) -> list[str]:
    """The torchrun command line for this node."""
    argv = [python, "-m", "torch.distributed.run", "--nnodes", str(launch.nnodes), "--nproc-per-node", str(nproc),
            "--max-restarts", str(launch.max_restarts), "--monitor-interval", "1",
            "--shutdown-timeout", str(SHUTDOWN_SECONDS)]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        argv.append("--standalone")  # c10d on a free local port
    else:
        join = max(60, int(dist_timeout * 60))  # how long the nodes wait for each other to arrive
        argv += ["--rdzv-backend", "static", "--rdzv-endpoint", str(launch.rdzv_endpoint),
                 "--node-rank", str(launch.node_rank), "--rdzv-conf", f"join_timeout={join}"]
    argv += ["-m", "drip.runtime.worker", "--session_folder", str(session_folder)]
    if command != "train":
        argv += ["--command", command, "--logs_dir", str(logs_dir)]
    if resume:
        argv.append("--resume")
    return argv


def run(launch: Launch, nproc: int, session_folder: Path, logs_dir: Path, resume: bool, config: dict,
        out=None, command: str = "train") -> None:
    """Run torchrun to the end with the resolved ``config`` (a dict); raises ``Interrupted`` after a
    stop, ``DistributedError`` on a failure."""
    out = out or sys.stderr
    logs_dir.mkdir(parents=True, exist_ok=True)
    first = launch.node_rank * nproc
    follow = _Follow(logs_dir / f"rank-{first}.log", out)
    agent_log = logs_dir / "torchrun.log"
    agent_start = agent_log.stat().st_size if agent_log.exists() else 0
    rank_starts = {log.name: log.stat().st_size for log in logs_dir.glob("rank-*.log")}  # what this run adds
    env = dict(os.environ)
    # torchrun sets 1 thread per worker when unset; on the CPU a worker may use its share of cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env[CONFIG_ENV] = json.dumps(config)  # what the ranks train with
    argv = torchrun_argv(launch, nproc, session_folder, resume, float(config.get("dist_timeout", 30.0)),
                         command=command, logs_dir=logs_dir)
    world = nproc * launch.nnodes
    print(f"[drip] torchrun: {nproc} process(es) on this node, {world} in all; each rank logs to "
          f"{logs_dir}/rank-N.log", file=out, flush=True)
    with open(agent_log, "ab") as agent_out:
        proc = subprocess.Popen(argv, stdout=agent_out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)  # Ctrl-C reaches this process only; it forwards once

    def on_signal(name: str, count: int) -> None:
        if count == 1:
            print(f"[drip] {name}: asking every rank to stop after this step and save "
                  "(again to stop at once, unsaved)", file=out, flush=True)
            _send(proc, signal.Signals[name])
        else:
            kill_group(proc)

    with StopSignals(on_signal=on_signal) as stops:
        try:
            while proc.poll() is None:
                follow.pump()
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                kill_group(proc)
                proc.wait()
            follow.pump()
    if proc.returncode == 0:
        return
    if stops.received:
        stopped = follow.last_line_with("stopped at step")
        raise Interrupted(stopped.split("error: ", 1)[-1] if stopped else
                          f"stopped; resume with --resume_training (see {follow.path})")
    raise DistributedError(failure_line(agent_log, agent_start, logs_dir, proc.returncode, rank_starts))


def failure_line(agent_log: Path, start: int, logs_dir: Path, returncode: int,
                 rank_starts: dict[str, int] | None = None) -> str:
    """One line naming the failed rank, its host, what happened and its log, from torchrun's report
    (read from byte ``start``) and what the ranks' logs gained after ``rank_starts`` (name: size)."""
    # A rank that found a peer hung (drip.runtime.worker: its heartbeat stood still) names it: that
    # peer, not the rank that gave up waiting for it, is what the line is about. Every rank log is
    # read, not only the failures torchrun reports: the waiting rank ends the hung one, and torchrun
    # may report that one alone and stop the waiting rank itself.
    starts = rank_starts or {}
    for log in sorted(logs_dir.glob("rank-*.log"), key=lambda path: path.name):
        said = last_error(log, starts.get(log.name, 0))
        if said and re.match(r"rank \d+ on \S+ stopped answering", said):
            return said
    text = agent_log.read_bytes()[start:].decode("utf-8", "replace") if agent_log.exists() else ""
    root = text.rsplit("Root Cause (first observed failure):", 1)
    fields = dict(re.findall(r"^\s+(host|rank|exitcode|traceback)\s*:\s*(.*)$", root[-1], re.M)) if len(root) > 1 else {}
    if not fields:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["no report"]
        return f"torchrun failed (exit code {returncode}): {last[0].strip()}; its log: {agent_log}"
    rank = fields.get("rank", "?").split()[0]
    host = fields.get("host", "?").strip()
    code = fields.get("exitcode", "?").split("(pid")[0].strip()
    signame = re.search(r"\((SIG\w+)\)", fields.get("exitcode", ""))
    how = f"was killed by {signame.group(1)}" if signame else f"exited with code {code}"
    log = logs_dir / f"rank-{rank}.log"
    said = last_error(log, starts.get(log.name, 0))
    restarts = len(re.findall(r"Restarting worker group|restarting worker group", text))
    tail = f" after {restarts} restart(s)" if restarts else ""
    return f"rank {rank} on {host} {how}{tail}" + (f" ({said})" if said else "") + f"; its log: {log}"


def last_error(log: Path, start: int = 0) -> str | None:
    """The last error a Drip process wrote to ``log`` after byte ``start`` (its ``drip: error:`` line,
    or an exception's), or None."""
    try:
        text = log.read_bytes()[start:].decode("utf-8", "replace")
    except OSError:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines[-40:]):
        if line.startswith("drip: error:"):
            return line.removeprefix("drip: error:").strip()
        if re.match(r"^\w+(Error|Exception)\b", line):
            return line
    return None


class _Follow:
    """Copies what a growing log file gains to ``out`` (``tail -f``)."""

    def __init__(self, path: Path, out):
        self.path, self.out = path, out
        self.offset = path.stat().st_size if path.exists() else 0
        self.lines: list[str] = []

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        if data:
            self.offset += len(data)
            text = data.decode("utf-8", "replace")
            self.lines = (self.lines + text.splitlines())[-50:]
            self.out.write(text)
            self.out.flush()

    def last_line_with(self, needle: str) -> str | None:
        return next((line for line in reversed(self.lines) if needle in line), None)


def _send(proc: subprocess.Popen, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except ProcessLookupError:
        pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group: a process started with ``start_new_session`` and its
    children (torchrun and its workers; a fold and its data-loading workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
