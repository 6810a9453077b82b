"""Wall time per named phase of a run (train.py --profile, bench/profile_train.py, val.py's speed line).

A PhaseTimer adds up the seconds spent in each `with timer("name"):` block; on CUDA it waits for the queued
kernels of its device at both ends of a block, so GPU work is charged to the phase that issued it. A disabled
timer hands out one shared no-op context: the training step pays nothing for the instrumentation.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch


class PhaseTimer:
    """Accumulated seconds and entry counts per phase name."""

    def __init__(self, device: torch.device | None = None, enabled: bool = True):
        self.enabled = enabled
        self.cuda_device = device if device is not None and device.type == "cuda" else None
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._off = contextlib.nullcontext()

    def __call__(self, name: str):
        return self._timed(name) if self.enabled else self._off

    @contextlib.contextmanager
    def _timed(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.add(name, time.perf_counter() - start)

    def _sync(self) -> None:
        if self.cuda_device is not None:
            torch.cuda.synchronize(self.cuda_device)

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        """Charge time measured elsewhere (e.g. a wait between two points) to a phase."""
        if self.enabled:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            self.counts[name] = self.counts.get(name, 0) + count

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()

    def merge(self, other: "PhaseTimer", prefix: str = "") -> None:
        for name, seconds in other.seconds.items():
            self.add(prefix + name, seconds, other.counts.get(name, 1))

    def total(self, name: str) -> float:
        return self.seconds.get(name, 0.0)

    def save(self, file: str | Path, **extra) -> None:
        Path(file).write_text(json.dumps({"seconds": self.seconds, "counts": self.counts, **extra}, indent=1))

    def table(self, wall: float | None = None) -> str:
        """A markdown table of the phases, largest first, in ms and as a share of `wall` (default: their sum)."""
        wall = wall or sum(self.seconds.values()) or 1.0
        rows = ["| phase | ms | % of wall | times |", "|---|---:|---:|---:|"]
        for name, s in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            rows.append(f"| {name} | {1000 * s:.0f} | {100 * s / wall:.1f} | {self.counts.get(name, 1)} |")
        return "\n".join(rows)
