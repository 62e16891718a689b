"""Optimizer, learning-rate schedule and the EMA of the weights.

The optimizer and the schedule are built from today's config also on resume (only the step count
and the optimizer's state come from the checkpoint), so an edited learning rate or schedule
applies from the next step.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .. import console, detectors
from ..config import Config

_WARMUP_START = 0.001  # warmup starts at this fraction of the peak rate (torchvision's warmup_factor)


def build_optimizer(model: nn.Module, config: Config, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or AdamW over the parameter groups the network's family wants
    (``drip.detectors.param_groups``: no weight decay on norm layers and biases, a learning-rate
    factor per group, e.g. a slower backbone)."""
    groups = detectors.param_groups(model, config.optimizer)
    if config.optimizer == "adamw":
        # On the CPU PyTorch's default AdamW loops over the tensors; its fused kernel is about 5x
        # faster (0.115 s -> 0.022 s a step for Faster R-CNN's 19M parameters on 2 cores, a sixth
        # of a quick-start step). SGD's was not faster; CUDA keeps PyTorch's default.
        on_cpu = all(p.device.type == "cpu" for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=lr, fused=True if on_cpu else None)
    else:
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    set_hyperparameters(optimizer, lr, config.weight_decay)
    return optimizer


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        rate = lr * group.get("lr_scale", 1.0)
        group["initial_lr"] = rate  # the scheduler's base: peak rate after warmup
        group["lr"] = rate
        group["weight_decay"] = weight_decay if group.get("decay", True) else 0.0


def restore_optimizer(optimizer: torch.optim.Optimizer, scaler, checkpoint: dict[str, Any], config: Config,
                      lr: float, use_amp: bool) -> None:
    """The checkpoint's optimizer (momentum) and gradient-scaler state, under today's hyper-parameters."""
    if checkpoint.get("optimizer_name") != config.optimizer:
        console.info(
            f"optimizer changed from {checkpoint.get('optimizer_name')} to {config.optimizer}: "
            "its state (momentum) starts fresh"
        )
    else:
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as exc:
            console.warn(f"the checkpoint's optimizer state does not fit this model ({exc}); it starts fresh")
        # load_state_dict brought back the old hyper-parameters; today's config wins.
        set_hyperparameters(optimizer, lr, config.weight_decay)
    if use_amp and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, start_step: int):
    # A fresh LambdaLR from today's config, placed at the resumed step: an edited learning
    # rate or schedule applies from here on; only the step count comes from the checkpoint.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.warmup_steps, config.lr_schedule, config.number_of_steps),
        last_epoch=start_step - 1,
    )


def lr_factor(warmup_steps: int, schedule: str, total_steps: int):
    """The LambdaLR factor of each step: linear warmup from 0.001x, then the schedule."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            alpha = step / warmup_steps
            warm = _WARMUP_START * (1 - alpha) + alpha
        else:
            warm = 1.0
        if schedule == "cosine":
            main = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        elif schedule == "step":
            main = 0.1 ** sum(step >= m * total_steps for m in (0.7, 0.9))
        else:
            main = 1.0
        return warm * main

    return factor


class EMA:
    """An exponential moving average of a model's weights and buffers, updated after each step.

    As timm's ModelEmaV2 (buffers such as BatchNorm statistics are averaged too), with the
    warm-up of TensorFlow's ExponentialMovingAverage(num_updates): the decay of update ``n`` is
    ``min(decay, (1 + n) / (10 + n))``, so the random initialisation fades within the first
    steps instead of lingering for thousands.
    """

    def __init__(self, model: nn.Module, decay: float, state: dict[str, torch.Tensor] | None = None, updates: int = 0):
        # requires_grad stays as in the model: the exported model file records frozen parameters
        # by it. The copy is never in a backward pass, and update() runs without autograd.
        self.model = copy.deepcopy(model).eval()
        if state is not None:
            self.model.load_state_dict(state)
        self.decay, self.updates = float(decay), int(updates)
        own, source = self.model.state_dict(), model.state_dict()
        self._floats = [(own[k], source[k]) for k in own if own[k].is_floating_point()]
        self._others = [(own[k], source[k]) for k in own if not own[k].is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if self._floats:
            ema, live = zip(*self._floats)
            torch._foreach_lerp_(list(ema), list(live), 1.0 - decay)
        for ema, live in self._others:
            ema.copy_(live)
