"""Switch EMA (Li et al. 2024, "Switch EMA: A Free Lunch for Better Flatness and Sharpness", arXiv 2402.09240):
at the end of every epoch the EMA's weights are copied into the model being trained, which then continues from
them. The optimizer's state (momenta) is kept. Between two switches the EMA averages as usual, so every epoch
starts from a point of the flatter region the average sits in, and the final model is the EMA.

Under DDP only rank 0 holds the EMA: it copies, then every process receives rank 0's weights, so the replicas
stay identical.
"""
from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn

from utils.torch_utils import de_parallel

HYP_KEY = "ema_switch"  # true: Switch EMA at every epoch end


def switch_ema_enabled(hyp: dict) -> bool:
    """The hyp's ``ema_switch`` (False when absent); one-line ValueError unless it is true or false."""
    on = hyp.get(HYP_KEY, False)
    if not isinstance(on, bool):
        raise ValueError(f"hyp {HYP_KEY} must be true or false, got {on!r}")
    return on


def switch_to_average(model: nn.Module, ema, distributed: bool = False) -> None:
    """Copy ``ema``'s weights (a ModelEMA; None on the ranks other than 0) into ``model``; with ``distributed``,
    every process must call it at the same point, and all of them end with rank 0's weights."""
    if ema is not None:
        ema.copy_to(model)
    if distributed:
        for tensor in de_parallel(model).state_dict().values():  # detached tensors that share the model's memory
            dist.broadcast(tensor, src=0)
