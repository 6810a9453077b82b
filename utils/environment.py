"""The software and hardware a run uses, in the one line users paste into bug reports."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def project_commit() -> str | None:
    """The short hash of the project's checked-out commit; None without git or outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    """'CPU', or a GPU's index, model and memory as YOLOv5 prints them: CUDA:0 (NVIDIA H200, 143771MiB)."""
    if device.type != "cuda":
        return device.type.upper()
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return f"CUDA:{index} ({props.name}, {props.total_memory // 2**20}MiB)"


def version_line(device: torch.device) -> str:
    commit = project_commit()
    return (f"yolo-ema {'commit ' + commit if commit else '(commit unknown)'}, Python-{platform.python_version()} "
            f"torch-{torch.__version__} {device_name(device)}")
