"""Snapshots of every global random-number generator a training process uses (Python, NumPy, torch CPU
and CUDA), as plain tensors, lists and numbers so they load with torch.load(weights_only=True)."""
from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng_state() -> dict:
    """The current state of the Python, NumPy, torch CPU and (when present) CUDA generators."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": {"version": int(py_version), "state": [int(v) for v in py_internal], "gauss_next": py_gauss},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Put every generator back to a state from `capture_rng_state`.

    CUDA states are restored only when the same number of devices is visible; otherwise the CUDA
    generators keep their seeds (a run moved to other hardware cannot be bit-exact anyway).
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
