"""BatchNorm statistics recomputed for averaged weights.

An EMA (or any weight average) averages BatchNorm's running mean and variance along with the weights, but the
statistics a layer's inputs really have under the averaged weights are not the average of the statistics the
model had along the way: every layer's input depends on all the weights before it. This module measures them
again, as ``torch.optim.swa_utils.update_bn`` does, on batches of training images augmented as training augments
them (the run's hyp: mosaic, perspective, HSV, flips) and converted the way training converts them
(channels_last, /255, the run's autocast). Augmented, not letterboxed as validation reads images: the weights
were trained under the statistics of augmented batches, and on the digits bench statistics measured on plain
letterboxed images cost the EMA 0.016 of test mAP50-95 while augmented ones kept it (docs/ema_quality.md).

    batches = FixedBatches.from_data(data["train"], imgsz, batch_size, stride, count=16, hyp=hyp)
    recompute_bn_stats(ema.ema, batches, device, amp_dtype)     # in place; the model's mode comes back

The statistics are a plain average over the batches (BatchNorm's ``momentum=None``): the running mean is the
mean of the batch means, the running variance the mean of the batches' unbiased variances.
"""
from __future__ import annotations

import itertools
from typing import Iterable

import torch
import torch.nn as nn

from utils.dataloaders import create_dataloader
from utils.log import LOGGER
from utils.torch_utils import autocast

HYP_KEY = "ema_bn_recompute"  # training batches to recompute the EMA's BatchNorm statistics on; 0 = off


def bn_recompute_batches(hyp: dict) -> int:
    """The hyp's ``ema_bn_recompute`` (0 when absent); one-line ValueError unless it is a whole number >= 0."""
    n = hyp.get(HYP_KEY, 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"hyp {HYP_KEY} must be a whole number of training batches (0 = off), got {n!r}")
    return n


class FixedBatches:
    """The first ``count`` batches of a loader, read once and replayed: the same images every time, so a run
    that recomputes statistics every epoch reads them once, and a resumed run sees the same ones."""

    def __init__(self, loader: Iterable, count: int):
        if count < 1:
            raise ValueError(f"FixedBatches needs at least one batch, got {count}")
        self.loader, self.count = loader, int(count)
        self._imgs: list[torch.Tensor] | None = None

    @classmethod
    def from_data(cls, path, imgsz: int, batch_size: int, stride: int, count: int, hyp: dict | None,
                  seed: int = 0, single_cls: bool = False, prefix: str = "BatchNorm recompute: ") -> FixedBatches:
        """``count`` batches of the images under ``path`` (a dataset split as the data yaml gives it) at ``imgsz``,
        augmented as training does with the run's ``hyp`` (None: letterboxed, not augmented), in an order and
        with draws set by ``seed``; read in this process (no workers)."""
        loader, dataset = create_dataloader(path, imgsz, batch_size, stride, single_cls=single_cls, hyp=hyp,
                                            augment=hyp is not None, cache=None, rect=False, workers=0, shuffle=True,
                                            seed=seed, prefix=prefix)
        if count > len(loader):
            LOGGER.info(f"{prefix}{count} batches asked for, {len(loader)} of {batch_size} images exist; using those")
        return cls(loader, min(count, len(loader)))

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        if self._imgs is None:
            self._imgs = [batch[0] for batch in itertools.islice(iter(self.loader), self.count)]
        return iter(self._imgs)


def recompute_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu",
                       amp_dtype: torch.dtype | None = None,
                       memory_format: torch.memory_format = torch.channels_last) -> int:
    """Replace the running mean and variance of every BatchNorm layer of ``model`` by those of its inputs over
    ``batches`` (uint8 image tensors, B x 3 x H x W, as the loaders give them). In place: views into an EMA's
    flat buffer stay views. The forward passes run without gradients in training mode, under autocast for
    ``amp_dtype`` (None: FP32); the modules' training flags and momenta come back afterwards.
    Returns the number of images seen (0, and the model untouched, when it has no BatchNorm layer)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    batches = list(batches)
    if not batches:
        raise ValueError("recompute_bn_stats: no batches given")
    device = torch.device(device)
    momenta = [m.momentum for m in norms]
    modes = [(m, m.training) for m in model.modules()]
    seen = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches instead of an exponential one
        model.train()
        with torch.no_grad(), autocast(device, amp_dtype):
            for imgs in batches:
                x = imgs.to(device, non_blocking=True).contiguous(memory_format=memory_format).float().div_(255)
                model(x)
                seen += x.shape[0]
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return seen
