"""Distributed training and inference: what a torchrun worker knows about its process group, in one place.

Started by ``torch.distributed.run`` (torchrun), each worker reads its place from the environment
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). ``context()`` is that place, and the
decisions that follow from it live here: which process writes (``is_main``: rank 0 alone writes
checkpoints, events, ``metrics.jsonl``, ``session.json`` and the model, and shows the progress
bar), how the global batch is split (``split_batch``: ``--batch_size`` is the global batch, each
rank takes ``batch_size / world`` images, Ultralytics' rule), and which part of a step's batch a
rank reads (``RankSlice``: rank r takes the r-th slice of the batch ``StepBatchSampler`` gives
for the step, so a run on any number of processes sees the same images at the same step).

Without torchrun (``WORLD_SIZE`` unset or 1) the context is a single process and every
collective is a no-op: the single-process path is the same code.

Every rank also beats a counter in torchrun's store (``BEAT_SECONDS``), from a thread of its own:
when a collective times out, ``silent_peers`` tells a rank that waits on a dead or hung one (a
SIGSTOP, a frozen machine) from one that only waits on a slow one, and names it.

The worker that torchrun starts, which runs the stages, is ``drip.runtime.worker``.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import ConfigError

BEAT_SECONDS = 1.0  # a rank's heartbeat period; one whose count stands still for 3 periods is hung


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this node (torchrun's LOCAL_WORLD_SIZE)
    backend: str | None = None  # the process group's, once joined
    _control: Any = None  # a gloo group for flags (stop requests): no GPU sync per step
    _store: Any = None  # this attempt's keys in torchrun's store: the heartbeats
    _beating: threading.Event = field(default_factory=threading.Event)  # set: the heartbeat thread stops

    @property
    def is_main(self) -> bool:
        """The one process that writes files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def cuda_device(self):
        """This rank's GPU: local rank r takes GPU r, or GPU r mod n where the node runs more
        processes than it has GPUs (they share them; ``init`` then uses gloo)."""
        import torch

        return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))

    def init(self, device, timeout_minutes: float) -> None:
        """Join the process group (``backend_for``: NCCL on CUDA, gloo on the CPU or on shared
        GPUs); idempotent."""
        if not self.distributed:
            return
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            return
        timeout = datetime.timedelta(minutes=float(timeout_minutes))
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        backend = self.backend = backend_for(device.type, self.local_world, gpus)
        # torchrun's agent keeps one rendezvous store across elastic restarts, and PyTorch 2.14
        # no longer namespaces the workers' keys by attempt: a restarted rank could read the
        # listening address of the dead attempt's rank and fail gloo's "connectFullMesh" with
        # "Connection refused". Each attempt gets its own prefix in that store.
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"drip/attempt_{attempt}", store), rank=rank,
                                world_size=world, timeout=timeout, device_id=device if backend == "nccl" else None)
        self._control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        self._start_heartbeat(dist.PrefixStore(f"drip/attempt_{attempt}/beat", store))

    def _start_heartbeat(self, store) -> None:
        """Count up ``beat/<rank>`` in the store every ``BEAT_SECONDS`` until ``close``; say once
        where this rank lives (``who/<rank>``: host and pid)."""
        self._store = store
        store.set(f"who/{self.rank}", f"{os.uname().nodename} {os.getpid()}")

        def beat() -> None:
            while not self._beating.wait(BEAT_SECONDS):
                try:
                    store.add(str(self.rank), 1)
                except Exception:  # the store went away with its agent: the run is ending anyway
                    return

        threading.Thread(target=beat, name="drip-heartbeat", daemon=True).start()

    def silent_peers(self) -> list[tuple[int, str, int]]:
        """(rank, host, pid) of every other rank whose heartbeat stood still for ``3 * BEAT_SECONDS``:
        hung or stopped, not merely slow. Empty where nothing can be told (no store, no answer)."""
        if self._store is None:
            return []
        peers = [r for r in range(self.world) if r != self.rank]
        try:
            self._store.set_timeout(datetime.timedelta(seconds=10))
            before = {r: self._store.add(str(r), 0) for r in peers}
            time.sleep(3 * BEAT_SECONDS)
            still = [r for r in peers if self._store.add(str(r), 0) == before[r]]
            found = []
            for r in still:
                host, pid = self._store.get(f"who/{r}").decode().split()
                found.append((r, host, int(pid)))
            return found
        except (RuntimeError, ValueError):  # the store's errors (DistStoreError) are RuntimeErrors
            return []

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (a stop request must stop all at one step)."""
        if not self.distributed:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return bool(t.item())

    def mean(self, tensor):
        """The mean of ``tensor`` over the ranks (in place on a copy); the tensor itself alone."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; tensors travel on the CPU)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self._control)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self._control)

    def close(self) -> None:
        if not self.distributed:
            return
        import gc

        import torch.distributed as dist

        # The trainer and its hooks point at each other, so the DDP wrapper (whose reducer holds
        # the process group) lives until the cyclic collector runs, which may be only during
        # interpreter shutdown: a gloo group destroyed then can abort the process (SIGABRT, see
        # pytorch/pytorch#179291). Collect now, while the interpreter is whole.
        self._beating.set()
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def backend_for(device_type: str, local_world: int, gpus: int) -> str:
    """The process group's backend: NCCL where each process of the node has a GPU of its own,
    gloo on the CPU and where processes share GPUs (NCCL refuses two processes on one GPU;
    gloo moves CUDA tensors through the host, slower but correct)."""
    return "nccl" if device_type == "cuda" and local_world <= gpus else "gloo"


_CONTEXT: Context | None = None


def context() -> Context:
    """This process's place in the group, read once from torchrun's environment."""
    global _CONTEXT
    if _CONTEXT is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        # LOCAL_RANK too: torchrun sets it, while a cluster (a PyTorchJob) may set WORLD_SIZE and
        # RANK for the machines around the launching process, which is no rank itself.
        if world > 1 and "LOCAL_RANK" in os.environ:
            _CONTEXT = Context(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                               int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        else:
            _CONTEXT = Context()
    return _CONTEXT


def split_batch(batch_size: int, world: int) -> int:
    """Images per rank of the global ``batch_size``; refuses one that does not divide."""
    if batch_size % world:
        lower, upper = (batch_size // world) * world, (batch_size // world + 1) * world
        options = f"--batch_size {lower} or {upper}" if lower else f"--batch_size {upper}"
        raise ConfigError(
            f"--batch_size {batch_size} does not divide over {world} processes (it is the global batch, "
            f"split evenly over them): use {options}"
        )
    return batch_size // world


class RankSlice:
    """Rank ``rank``'s share of each batch of ``sampler`` (a ``StepBatchSampler``): slice r of w.

    The global batch of a step stays a function of the step alone; the slices of all ranks
    together are that batch, in order.
    """

    def __init__(self, sampler, rank: int, world: int):
        self.sampler, self.rank, self.world = sampler, rank, world
        self.per_rank = split_batch(sampler.batch_size, world)

    def __iter__(self) -> Iterator[list]:
        lo = self.rank * self.per_rank
        for batch in self.sampler:
            yield batch[lo:lo + self.per_rank]

    def __len__(self) -> int:
        return len(self.sampler)


def weights_digest(model) -> float:
    """A number that differs when any parameter differs (the rank-to-rank sync check).

    Parameters only: DDP keeps those equal. Batch-norm running statistics (not frozen ones) are
    each rank's own after its last step; rank 0's are the ones saved.
    """
    import torch

    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            # Position-weighted, so swapped values do not cancel out.
            flat = param.detach().double().flatten().cpu()
            total += (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum() * (i + 1)
    return float(total)

