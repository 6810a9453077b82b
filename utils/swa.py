"""SWA for detectors (Zhang, Wang, Dayoub and Sünderhauf 2020, "SWA Object Detection", arXiv:2012.12645): after
training, train the detector for 12 extra epochs with a cyclical learning rate, one cycle per epoch, and average the
12 epoch-end checkpoints uniformly; then measure the BatchNorm statistics of the average again.

The paper's code (hyz-xmaster/swa_object_detection, MMDetection) sets ``swa_lr_config = dict(policy='cyclic',
target_ratio=(1, 0.01), cyclic_times=12, step_ratio_up=0.0)`` over 12 epochs: every epoch starts at the base
learning rate and anneals, iteration by iteration, to 0.01 of it, then jumps back up. MMCV's cyclic policy anneals
with a cosine; ``anneal='linear'`` is the straight line some write-ups describe. Here iteration ``i`` of an epoch
of ``nb`` gets ``lr0 * f(i / (nb - 1))`` with f going from 1 at the first iteration to ``ratio`` at the last:

    cos:     f(t) = ratio + (1 - ratio) * (1 + cos(pi * t)) / 2
    linear:  f(t) = 1 - (1 - ratio) * t

The average is ``torch.optim.swa_utils.AveragedModel`` (its default running mean, so after k epochs each
checkpoint weighs 1/k) of the parameters; buffers are not averaged, since the BatchNorm statistics are measured
afresh for the averaged weights (utils/bn_recompute.py; swa.py says why that and not ``update_bn``).
"""
from __future__ import annotations

import math

import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from utils.torch_utils import de_parallel

ANNEALS = ("cos", "linear")
PAPER_EPOCHS = 12  # the paper's extra epochs
PAPER_RATIO = 0.01  # the paper's lowest learning rate of a cycle, as a fraction of the base


def cyclic_lr_factor(i: int, nb: int, ratio: float = PAPER_RATIO, anneal: str = "cos") -> float:
    """The learning rate of iteration ``i`` (0 .. nb - 1) of an SWA epoch of ``nb`` iterations, as a fraction of the
    base: 1 at the first iteration, ``ratio`` at the last (1 throughout an epoch of one iteration)."""
    if anneal not in ANNEALS:
        raise ValueError(f"SWA anneal must be one of {ANNEALS}, got {anneal!r}")
    if not 0 <= i < nb:
        raise ValueError(f"SWA iteration {i} outside an epoch of {nb}")
    t = i / (nb - 1) if nb > 1 else 0.0
    if anneal == "linear":
        return 1.0 - (1.0 - ratio) * t
    return ratio + (1.0 - ratio) * (1.0 + math.cos(math.pi * t)) / 2.0


class UniformAverage:
    """The uniform average of the models given to :meth:`add` (SWA's checkpoints), as an AveragedModel of their
    parameters; ``module`` is the averaged nn.Module (its buffers those of the first model until recomputed)."""

    def __init__(self):
        self.swa: AveragedModel | None = None

    def add(self, model: nn.Module) -> None:
        model = de_parallel(model)
        if self.swa is None:
            self.swa = AveragedModel(model, use_buffers=False)
        self.swa.update_parameters(model)

    @property
    def count(self) -> int:
        return 0 if self.swa is None else int(self.swa.n_averaged)

    @property
    def module(self) -> nn.Module:
        if self.swa is None:
            raise ValueError("SWA: no checkpoint averaged yet")
        return self.swa.module
