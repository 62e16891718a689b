"""The torchrun worker: ``python -m drip.runtime.worker``, one per process that torchrun starts.

``drip.runtime.torchrun`` starts torchrun with this module as the worker. Each worker sends its
output to ``dl/logs/rank-N.log``, joins the group with ``--dist_timeout`` as the timeout of every
collective (a dead or hung peer ends the run instead of hanging it), and runs the train (or infer)
stage on the session the launching process prepared, with the config it resolved
(``CONFIG_ENV``). After an elastic restart (``TORCHELASTIC_RESTART_COUNT`` > 0) it resumes from
the newest checkpoint. What a rank knows of its group is ``drip.training.distributed``'.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .. import console
from ..errors import DistributedError, guarded
from ..session import Session
from ..training.distributed import context
from .torchrun import CONFIG_ENV


def redirect_output(log: Path) -> None:
    """Send this process's stdout and stderr (Python's and the C libraries') to ``log``, appended."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m drip.runtime.worker", description="A torchrun worker of drip.")
    p.add_argument("--command", choices=("train", "infer"), default="train")
    p.add_argument("--session_folder", required=True)
    p.add_argument("--logs_dir", help="where rank-N.log goes (default: the session's dl/logs)")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    ctx = context()
    session = Session(Path(args.session_folder))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    host = os.uname().nodename
    logs_dir = Path(args.logs_dir or session.logs_dir)
    redirect_output(logs_dir / f"rank-{ctx.rank}.log")
    console.info(
        f"rank {ctx.rank} of {ctx.world} (local rank {ctx.local_rank}) on {host}, pid {os.getpid()}"
        + (f", restart {restart}" if restart else "")
    )
    hung: list[int] = []  # pids of silent peers on this machine, ended once this rank's error is logged

    def run() -> int:
        from ..config import Config, InferConfig
        from ..stages import infer, train

        # The launching process resolved the config (session file, flags, configure) and hands it
        # over whole: flags that are never kept in pipeline.config must reach the ranks too.
        values = json.loads(os.environ[CONFIG_ENV])
        try:
            if args.command == "infer":
                infer.run(InferConfig().updated(values, "the launching process"), session)
            else:
                train.run(session, Config().updated(values, "the launching process"), resume=args.resume or restart > 0)
        except RuntimeError as exc:  # a collective that timed out or lost its peer
            text = str(exc).lower()
            if "timed out" in text or "timeout" in text:
                raise _silent_peer_error(ctx, host, logs_dir, values.get("dist_timeout"), hung) or DistributedError(
                    f"rank {ctx.rank} on {host}: a collective operation timed out: another rank is dead or hung "
                    "(see the other ranks' logs), or rank 0 paused longer than --dist_timeout; raise it if so"
                ) from None
            if "connection" in text or "peer" in text:
                raise DistributedError(
                    f"rank {ctx.rank} on {host}: lost the connection to another rank (it died, or its node went "
                    "away); see the other ranks' logs"
                ) from None
            raise
        finally:
            context().close()
        return 0

    code = guarded(run)
    # A silent rank on this machine is ended (SIGKILL) only now that this rank's line naming it is in
    # its log: torchrun stops the whole group as soon as it sees that rank die. It must be ended:
    # torchrun gives the others of a failed group 30 s to exit after its SIGTERM, which a stopped
    # process never hears, and a restart (--max_restarts) starts only once every worker has exited.
    for pid in hung:
        _end_worker(pid)
    return code


def _silent_peer_error(ctx, host: str, logs_dir: Path, timeout_minutes, hung: list[int]) -> DistributedError | None:
    """After a collective timed out: the rank that stopped answering (its heartbeat stood still), in
    one line with its log, or None when every peer still beats (a slow one, not a hung one). The
    pids of silent ranks on this machine (``host``) are added to ``hung``."""
    silent = ctx.silent_peers()
    if not silent:
        return None
    hung.extend(pid for _rank, peer_host, pid in silent if peer_host == host)
    rank, peer_host, _ = silent[0]
    also = "".join(f", and rank {r} on {h}" for r, h, _ in silent[1:])
    return DistributedError(
        f"rank {rank} on {peer_host} stopped answering{also}: rank {ctx.rank} waited --dist_timeout "
        f"({timeout_minutes} min) for it in a collective, and its heartbeat stood still (hung, stopped, or its "
        f"machine froze); its log: {logs_dir / f'rank-{rank}.log'}"
    )


def _end_worker(pid: int) -> None:
    """SIGKILL ``pid`` if it is still a drip worker (a pid is reused only after its process is gone)."""
    try:
        if b"drip.runtime.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass


if __name__ == "__main__":
    sys.exit(main())
