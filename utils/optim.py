"""Optimizer set-up and learning-rate control for training: parameter groups, nominal-batch weight decay,
epoch schedules (one-cycle, linear), and the per-iteration warm-up of lr, momentum and accumulation."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from utils.log import LOGGER

OPTIMIZERS = ("SGD", "Adam", "AdamW")

# Normalisation layers whose scale ('weight') must not be pulled toward zero by weight decay.
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)

# Index of each parameter group in the optimizer; the bias group comes first because warm-up treats it
# specially (its lr starts high, at warmup_bias_lr, instead of at 0).
BIAS_GROUP, DECAY_GROUP, NORM_GROUP = 0, 1, 2


def split_parameters(model: nn.Module) -> tuple[list, list, list]:
    """Trainable parameters as (biases, weights that take weight decay, normalisation weights).

    Each parameter is assigned once, from the module that owns it directly.
    """
    biases, decayed, norm_weights = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias":
                biases.append(p)
            elif name == "weight" and isinstance(module, NORM_LAYERS):
                norm_weights.append(p)
            else:
                decayed.append(p)
    return biases, decayed, norm_weights


def scaled_weight_decay(weight_decay: float, batch_size: int, accumulate: int, nbs: int) -> float:
    """Weight decay per optimizer step so that decay per image is what hyp specifies at the nominal batch.

    A step that sums the gradients of batch_size * accumulate images should decay in proportion.
    """
    return weight_decay * batch_size * accumulate / nbs


def build_optimizer(model: nn.Module, name: str = "SGD", lr: float = 0.01, momentum: float = 0.9,
                    weight_decay: float = 1e-5) -> torch.optim.Optimizer:
    """An optimizer with three groups: biases (no decay), weights (decay), normalisation weights (no decay)."""
    biases, decayed, norm_weights = split_parameters(model)
    if name == "SGD":
        optimizer = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=True)
    elif name == "Adam":
        optimizer = torch.optim.Adam(biases, lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    else:
        raise ValueError(f"optimizer '{name}' is not one of {', '.join(OPTIMIZERS)}")
    optimizer.add_param_group({"params": decayed, "weight_decay": weight_decay})
    optimizer.add_param_group({"params": norm_weights, "weight_decay": 0.0})
    LOGGER.info(f"optimizer: {name}(lr={lr}, momentum={momentum}) with parameter groups "
                f"{len(biases)} bias (no decay), {len(decayed)} weight (decay={weight_decay:g}), "
                f"{len(norm_weights)} normalisation weight (no decay)")
    return optimizer


def one_cycle(y1: float = 0.0, y2: float = 1.0, steps: int = 100) -> Callable[[float], float]:
    """Half a cosine from y1 at step 0 to y2 at `steps` (https://arxiv.org/abs/1812.01187)."""
    return lambda x: y1 + (y2 - y1) * (1 - math.cos(x * math.pi / steps)) / 2


def linear(y1: float = 1.0, y2: float = 0.0, steps: int = 100) -> Callable[[float], float]:
    """A straight line from y1 at step 0 to y2 at `steps`."""
    return lambda x: y1 + (y2 - y1) * x / steps


def lr_factor(epochs: int, lrf: float, cos: bool = False) -> Callable[[float], float]:
    """Epoch -> multiple of lr0: a cosine (--cos-lr) or linear ramp from 1 down to lrf over the run."""
    return one_cycle(1.0, lrf, epochs) if cos else linear(1.0, lrf, epochs)


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int, lrf: float, cos: bool = False
                    ) -> tuple[torch.optim.lr_scheduler.LambdaLR, Callable[[float], float]]:
    """A per-epoch LambdaLR over `lr_factor`, and the factor itself (warm-up aims at it).

    The count starts one epoch behind, as YOLOv5's train.py leaves it (it sets `last_epoch = start_epoch - 1`
    after building its LambdaLR): after warm-up, epoch e trains at lr0 * lf(e - 1), while warm-up aims at lf(e).
    Kept so that both trainers take the same steps from the same start (bench/yolov5_train_parity.py).
    """
    lf = lr_factor(epochs, lrf, cos)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    scheduler.last_epoch = -1  # the first epoch end's step lands on lf(0), so epoch 1 trains at lf(0)
    return scheduler, lf


def warmup_iterations(warmup_epochs: float, batches_per_epoch: int, minimum: int = 100) -> int:
    """Warm-up length in iterations: warmup_epochs worth of batches, but never fewer than `minimum`."""
    return max(round(warmup_epochs * batches_per_epoch), minimum)


def nominal_accumulate(nbs: int, batch_size: int) -> int:
    """Batches whose gradients add up to about one nominal batch of nbs images."""
    return max(round(nbs / batch_size), 1)


def warmup_accumulate(ni: int, nw: int, nbs: int, batch_size: int) -> int:
    """Accumulation during warm-up: ramps linearly from 1 at iteration 0 to nbs/batch_size at nw."""
    return max(1, int(np.interp(ni, [0, nw], [1, nbs / batch_size]).round()))


def apply_warmup(optimizer: torch.optim.Optimizer, ni: int, nw: int, epoch_factor: float, hyp: dict) -> None:
    """Set every group's lr (and SGD momentum) for warm-up iteration ni of nw.

    The bias group's lr falls from warmup_bias_lr and the others rise from 0, all toward the epoch's
    scheduled lr (initial_lr * epoch_factor); momentum rises from warmup_momentum to momentum.
    """
    for j, group in enumerate(optimizer.param_groups):
        start = hyp["warmup_bias_lr"] if j == BIAS_GROUP else 0.0
        group["lr"] = float(np.interp(ni, [0, nw], [start, group["initial_lr"] * epoch_factor]))
        if "momentum" in group:
            group["momentum"] = float(np.interp(ni, [0, nw], [hyp["warmup_momentum"], hyp["momentum"]]))


def planned_optimizer_steps(batches_per_epoch: int, epochs: int, nw: int, nbs: int, batch_size: int) -> int:
    """Optimizer steps a run of `epochs` takes under the accumulation rule (a step when at least
    `accumulate` iterations have passed since the last one; accumulate ramps during warm-up), assuming
    no step is skipped. Warm-up is walked iteration by iteration, the constant tail counted in one go."""
    total = batches_per_epoch * epochs
    last, steps = -1, 0
    for ni in range(min(nw + 1, total)):
        if ni - last >= warmup_accumulate(ni, nw, nbs, batch_size):
            last, steps = ni, steps + 1
    if total > nw + 1:
        accumulate = warmup_accumulate(nw, nw, nbs, batch_size)
        first = max(nw + 1, last + accumulate)  # first iteration after warm-up that can step
        if first <= total - 1:
            steps += 1 + (total - 1 - first) // accumulate
    return steps
