#!/usr/bin/env python3
"""Scaling of distributed training: images/s on 1, 2, ... N processes, and the all-reduce's share.

    .venv/bin/python bench/scaling.py --device cpu --max_procs 2            # this machine's cores
    .venv/bin/python bench/scaling.py --device cuda --max_procs 8 \\
        --network fasterrcnn_resnet50_fpn_v2 --image_size 640 --per_rank_batch 4   # the GPU goal

For each process count k (1, 2, 4, ... up to ``--max_procs``) the script starts torchrun (the
same ``torch.distributed.run`` and DistributedDataParallel ``drip train`` uses: gloo on the CPU,
NCCL on CUDA) with k workers running Drip's step (``drip.training.loop.Trainer.run_step``: AMP
on CUDA, gradient clipping, the optimizer and schedule of ``drip.training.optim``) on synthetic
images, in two settings:

* same per-rank batch (weak scaling): ``--per_rank_batch`` images per process, global batch k x
  that; efficiency = images/s on k / (k x images/s on 1). The GPU goal: 90% from 1 to 8.
* same global batch (strong scaling): ``--global_batch`` split over the k processes; efficiency
  = speed-up / k. Small per-rank batches starve a GPU, so this one falls faster.

The all-reduce's share of a step: the same steps timed again inside DDP's ``no_sync()`` (no
gradient all-reduce), share = 1 - t(no_sync) / t(synced). On a CPU the k processes share the
cores, so images/s cannot rise with k there: the CPU figures show that the mechanism works and
what it costs, not a speed-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, parser, report  # noqa: E402


def worker(args) -> None:
    """One torchrun rank: time ``--steps`` synced steps and as many inside no_sync()."""
    import torch
    import torch.distributed as dist

    from drip.training import distributed
    from drip.detectors import models
    from drip.config import Config
    from drip.training.loop import Trainer
    from drip.training.optim import build_optimizer, build_scheduler

    ctx = distributed.context()
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{ctx.local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx.init(device, 10)
    per_rank = args.batch // ctx.world
    torch.manual_seed(0)
    model = models.build_model(args.network, 4, "none", args.image_size).to(device)
    config = Config().updated({"number_of_steps": 10_000, "warmup_steps": 0, "optimizer": "sgd"}, "bench")
    optimizer = build_optimizer(model, config, 0.001)
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if ctx.distributed else model
    trainer = Trainer(model, optimizer, build_scheduler(optimizer, config, 0),
                      torch.amp.GradScaler("cuda", enabled=device.type == "cuda"), [], device, start_step=0,
                      end=10_000, batch_size=args.batch, grad_clip=10.0, use_amp=device.type == "cuda", net=net)
    g = torch.Generator().manual_seed(ctx.rank)
    side = args.image_size
    images = [torch.rand(3, side, side * 3 // 4, generator=g) for _ in range(per_rank)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, side / 2, side / 3], [side / 3, side / 4, side - 5.0, side / 2]]),
                "labels": torch.tensor([1, 2])} for _ in range(per_rank)]
    net.train()

    def timed(steps: int, sync: bool) -> float:
        def sync_all():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if ctx.distributed:
                dist.barrier()

        sync_all()
        start = time.perf_counter()
        for _ in range(steps):
            if sync or not ctx.distributed:
                trainer.run_step(images, targets)
            else:
                with net.no_sync():
                    trainer.run_step(images, targets)
        sync_all()
        return (time.perf_counter() - start) / steps

    timed(args.warmup, True)
    synced = timed(args.steps, True)
    timed(1, False)
    unsynced = timed(args.steps, False)
    if ctx.is_main:
        Path(args.out).write_text(json.dumps({"world": ctx.world, "per_rank": per_rank, "step_s": synced,
                                              "no_sync_step_s": unsynced}))
    ctx.close()


def launch(args, k: int, batch: int, out: Path) -> dict:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k),
            str(Path(__file__).resolve()), "--worker", "--device", args.device, "--network", args.network,
            "--image_size", str(args.image_size), "--batch", str(batch), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // k))  # the cores shared out
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"torchrun with {k} processes failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["images_per_s"] = batch / result["step_s"]
    result["allreduce_share"] = max(0.0, 1 - result["no_sync_step_s"] / result["step_s"]) if k > 1 else 0.0
    return result


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--max_procs", type=int, default=2)
    p.add_argument("--network", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    p.add_argument("--image_size", type=int, default=320)
    p.add_argument("--per_rank_batch", type=int, default=2)
    p.add_argument("--global_batch", type=int, default=None, help="default: per_rank_batch x max_procs")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    p.add_argument("--batch", type=int, help=argparse_hidden())
    p.add_argument("--out", help=argparse_hidden())
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.steps, args.warmup, args.image_size = 2, 1, 128
    counts = [k for k in (1, 2, 4, 8, 16, 32) if k <= args.max_procs]
    global_batch = args.global_batch or args.per_rank_batch * counts[-1]
    info = machine(args.device)
    rows, figures = [], {"weak": [], "strong": []}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, batch_of in (("weak", lambda k: args.per_rank_batch * k), ("strong", lambda k: global_batch)):
            base = None
            for k in counts:
                if batch_of(k) % k:
                    continue
                r = launch(args, k, batch_of(k), Path(tmp) / f"{mode}-{k}.json")
                base = base or r["images_per_s"]
                r["efficiency"] = r["images_per_s"] / (k * base)
                figures[mode].append(r)
                rows.append(f"{mode:>6}  {k:>5}  {r['per_rank']:>8}  {batch_of(k):>6}  {r['images_per_s']:>9.2f}  "
                            f"{r['efficiency'] * 100:>9.0f}%  {r['allreduce_share'] * 100:>9.0f}%")
    head = [f"network {args.network}, {args.image_size} px, {args.device}, {args.steps} timed steps "
            f"after {args.warmup}", " mode  procs  per rank   batch   images/s  efficiency  all-reduce"]
    report("distributed scaling", info, figures, head + rows, args.json)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
