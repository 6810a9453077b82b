"""Torch run-time helpers: device choice, unwrapping DDP/DataParallel, seeding, model size."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.nn as nn

from utils.log import LOGGER


def select_device(device: str = "", batch_size: int = 0) -> torch.device:
    """Turn a '--device' string ('' auto, 'cpu', '0', '0,1', 'cuda:0') into a torch.device, with a clear error.

    Under torchrun each process takes the LOCAL_RANK-th of the listed GPUs (of all visible GPUs when none
    are listed), so one process drives one GPU.
    """
    spec = str(device).strip().lower().replace("cuda:", "")
    if spec == "cpu":
        return torch.device("cpu")
    if spec in ("", "auto") and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available; use --device cpu")
    count = torch.cuda.device_count()
    ids = list(range(count)) if spec in ("", "auto") else [int(s) for s in spec.split(",") if s != ""]
    for i in ids:
        if i >= count:
            raise ValueError(f"--device {device}: only {count} CUDA device(s) present")
    local_rank = int(os.getenv("LOCAL_RANK", -1))
    if local_rank >= len(ids):
        raise ValueError(f"LOCAL_RANK {local_rank} has no GPU of its own among {ids}: "
                         "start at most one process per GPU")
    if batch_size and len(ids) > 1 and local_rank < 0:
        LOGGER.warning(f"{len(ids)} GPUs listed but one process runs: using GPU {ids[0]}; "
                       "start one process per GPU with torchrun to use them all")
    return torch.device(f"cuda:{ids[max(local_rank, 0)]}")


def is_parallel(model: nn.Module) -> bool:
    return isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel))


def de_parallel(model: nn.Module) -> nn.Module:
    """The module inside a DataParallel/DistributedDataParallel wrapper, or the model itself."""
    return model.module if is_parallel(model) else model


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with deterministic, also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        os.environ["PYTHONHASHSEED"] = str(seed)


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers holding NaN or Inf (a diverged model or EMA)."""
    return [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_info(model: nn.Module, name: str = "Model") -> str:
    """One summary line: layers, parameters, gradients."""
    n_layers = len(list(model.modules()))
    n_params = count_parameters(model)
    n_grads = sum(p.numel() for p in model.parameters() if p.requires_grad)
    line = f"{name} summary: {n_layers} layers, {n_params:,} parameters, {n_grads:,} gradients"
    LOGGER.info(line)
    return line
