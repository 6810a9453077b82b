"""Torch run-time helpers: device choice, mixed precision, unwrapping DDP/DataParallel, seeding, model size."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.nn as nn

from utils.determinism import WATCH
from utils.log import LOGGER


# --amp names and the autocast dtype each means; 'off' runs in FP32.
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}


def select_device(device: str = "", batch_size: int = 0) -> torch.device:
    """Turn a '--device' string ('' auto, 'cpu', 'cuda', '0', '0,1', 'cuda:0') into a torch.device, with a clear
    ValueError for anything else. 'cuda' means the visible GPUs, like ''.

    Under torchrun each process takes the LOCAL_RANK-th of the listed GPUs (of all visible GPUs when none
    are listed), so one process drives one GPU. A CUDA device is also made the current one, so that work
    without an explicit device (pinned-memory threads, synchronize()) lands on it rather than on GPU 0.
    """
    spec = str(device).strip().lower().replace("cuda:", "")
    if spec == "cpu":
        return torch.device("cpu")
    if spec in ("", "auto") and not torch.cuda.is_available():
        return torch.device("cpu")
    every_gpu = spec in ("", "auto", "cuda")
    listed = [s.strip() for s in spec.split(",") if s.strip()]
    if not every_gpu and not (listed and all(s.isdigit() for s in listed)):
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda, a GPU index such as 0, or a list such as 0,1")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available; use --device cpu")
    count = torch.cuda.device_count()
    ids = list(range(count)) if every_gpu else [int(s) for s in listed]
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
    chosen = torch.device(f"cuda:{ids[max(local_rank, 0)]}")
    torch.cuda.set_device(chosen)
    return chosen


def check_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an --amp choice on this device (None for 'off'); ValueError where it cannot run.

    A GPU without native bfloat16 would fail mid-run (or emulate it slowly), so that is refused at start-up.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp {amp!r} is not one of {', '.join(AMP_DTYPES)}")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no native bfloat16; use --amp fp16")
    return AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for dtype on device, or a disabled one for FP32 (dtype None)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def is_parallel(model: nn.Module) -> bool:
    return isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel))


def de_parallel(model: nn.Module) -> nn.Module:
    """The plain module inside DataParallel/DistributedDataParallel and torch.compile wrappers (in any nesting),
    or the model itself: what state dicts are saved from and the EMA pairs with."""
    while True:
        inner = model.module if is_parallel(model) else model
        orig = getattr(inner, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(orig, nn.Module):
            inner = orig
        if inner is model:
            return model
        model = inner


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with deterministic, also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        WATCH.install()  # warn_only: each kernel without a deterministic implementation is said as it happens
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        os.environ["PYTHONHASHSEED"] = str(seed)
    else:
        # cuDNN times its kernels once per new input shape and keeps the fastest: training batches have one shape
        # (unless --rect or --multi-scale), and validation's few rect shapes repeat every epoch.
        torch.backends.cudnn.benchmark = True


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers holding NaN or Inf (a diverged model or EMA).

    One check and one device synchronisation for the whole model: tensors that are views into one flat buffer
    (ModelEMA's layout) are checked as that buffer, the rest with one fused foreach kernel; the names are
    looked up only when something is wrong.
    """
    named = [(n, t.detach()) for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if t.is_floating_point()]
    if not named:
        return []
    by_storage: dict[tuple, list[torch.Tensor]] = {}
    for _, t in named:
        by_storage.setdefault((t.untyped_storage().data_ptr(), t.dtype, t.device), []).append(t)
    whole = []  # one tensor per storage: the flat buffer itself where several tensors share it
    for group in by_storage.values():
        t = group[0]
        if len(group) > 1:
            t = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
        if t.numel():  # the max-abs norm of an empty tensor is an error, and it holds nothing to check
            whole.append(t)
    if not whole:
        return []
    # Max-abs norms: inf or nan exactly when a tensor holds one, and they cannot overflow.
    norms = torch._foreach_norm(whole, float("inf"))
    if bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all()):
        return []
    return [name for name, t in named if not bool(torch.isfinite(t).all())]


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
