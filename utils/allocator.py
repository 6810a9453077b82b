"""The C allocator's settings for a training or evaluation process (glibc on Linux).

On the CPU, torch takes every tensor's memory from malloc and gives it back when the tensor dies. glibc serves
blocks above its mmap threshold (128 KiB at first, raised as such blocks are freed, to at most 32 MiB) with
fresh mmap'd pages that go back to the kernel on free, and it trims the heap's free top beyond its trim
threshold: the next step's activations and gradients then page-fault on every 4 KiB again. A yolov5n training
step (coco128, 320 px, batch 16) took about 55,000 page faults and 1.2x the time for it (bench/train_speed.py
--malloc both). reuse_freed_memory() raises both thresholds so that freed blocks stay in the heap and are
reused: the process keeps its peak heap instead of handing pages back and faulting them in again (the 16-image
training job of bench/profile_train.py peaked at 1.34 GB resident instead of 1.23 GB).

The price besides the memory: a process that forks (DataLoader workers) after its heap has grown shares the
kept pages copy-on-write, and every later write to one of them faults and copies it. Workers are therefore
started early: train.py's training workers at the first batch, its replayed validation batches collated at
set-up (ReplayLoader.collate_now), val.py's before the model's first batch.

The scripts (train.py, val.py, detect.py) call it when run as commands. Importing this project as a library
(torch.hub, tests) leaves the host process's allocator alone.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, and up to this much free memory at the heap's top is kept.
KEEP_BYTES = 1 << 30


def reuse_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse (see the module docstring); False where that does not apply (not
    glibc, not Linux): the allocator is then left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # musl and others have a mallopt that does nothing and answers 0
    return mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) == 1
