"""DDP on NCCL, one process per GPU: the worker that tests/test_gpu.py starts under torchrun.

Not a test file (pytest does not collect it). Each rank builds Drip's smallest network on its
GPU, wraps it in DistributedDataParallel on an NCCL process group, and trains two steps with
fp16 autocast and a GradScaler, as Drip's trainer does. It checks that the group is NCCL, that
an all-reduce of CUDA tensors sums over the ranks, that DDP's gradient is the mean of what each
rank's own batch gives (a plain copy of the model, same sampling seed), and that the weights
are the same on every rank at the end. It prints one ``nccl probe ok`` line per rank, or fails.

``--cpu``: the same on gloo and the CPU, without autocast, so that the probe itself is tested
where there is no GPU (tests/test_distributed.py).
"""

from __future__ import annotations

import copy
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from drip import detectors
from drip.detectors import models
from drip.training.distributed import weights_digest

NETWORK = "fasterrcnn_mobilenet_v3_large_320_fpn"


def batch(rank: int, device) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own images
    images = [torch.rand(3, 128, 128, generator=g).to(device) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]], device=device),
                "labels": torch.tensor([1 + rank % 3], device=device)} for _ in images]
    return images, targets


def grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def main(argv: list[str]) -> None:
    cuda = "--cpu" not in argv
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=2), device_id=device if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert dist.get_backend() == backend, dist.get_backend()

    total = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(total)
    assert total.item() == world * (world + 1) / 2, (total.item(), world)

    torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    model = models.build_model(NETWORK, 4, "none", 128).to(device).train()
    plain = copy.deepcopy(model)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    images, targets = batch(rank, device)

    # DDP's gradient is the mean over the ranks of each rank's own: compare with a plain copy's.
    torch.manual_seed(1)  # Faster R-CNN samples anchors and proposals: the same draws on both
    sum(detectors.losses(net, images, targets).values()).backward()
    torch.manual_seed(1)
    sum(detectors.losses(plain, images, targets).values()).backward()
    own = grads(plain)
    mean = own.clone()
    dist.all_reduce(mean)
    mean /= world
    got = grads(model)
    error = ((got - mean).norm() / mean.norm()).item()
    assert error < 1e-3, f"rank {rank}: DDP's gradient is {error:.2g} off the mean of the ranks' own"

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            loss = sum(detectors.losses(net, images, targets).values())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert torch.isfinite(loss).item(), loss
    digests: list[float] = [0.0] * world
    dist.all_gather_object(digests, weights_digest(model))
    assert len(set(digests)) == 1, f"weights differ between ranks: {digests}"
    where = torch.cuda.get_device_name(device) if cuda else "the CPU"
    print(f"nccl probe ok: rank {rank} of {world}, {backend} on {where}, gradient off the mean by {error:.2g}, "
          f"weights identical after 2 {'fp16' if cuda else 'fp32'} steps", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
