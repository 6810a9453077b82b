"""Companion EMAs: extra ramp EMAs of other time constants, tracked in the same training run as the main EMA.

An EMA that does not feed back into training (another tau) is a function of the raw trajectory alone, so one run
can carry several of them instead of training once per tau: bench/ema_quality.py reads every tau from one run.
The hyp file's ``ema_companion_taus`` lists the taus ([] = off). Each companion is a ModelEMA with the ramp
schedule, the main EMA's decay ceiling, clock (``ema_unit``, ``nbs``), ``ema_update_every``,
``ema_update_after_step`` and storage, and its own tau: the same EMA the main one would be with ``ema_tau: X``.
It is updated after exactly the steps the main EMA is updated after (optimizer steps actually taken).

In train.py (rank 0)::

    companions = CompanionEMAs.from_hyp(model, hyp, total_steps)   # None when off
    companions.update(model, images=B)                             # after every optimizer step taken
    # FP16 like 'ema' (finished checkpoints keep it), and FP32 packed for an exact resume, from one CPU copy:
    ckpt["ema_companions"], ckpt["resume"]["ema_companions"] = companions.checkpoint_entries()
    companions.restore(resume_ckpt)                                # --resume: FP32 state, else FP16 weights

A companion's weights load as a model with ``model_from_checkpoint(companion_checkpoint(ckpt, name))``.
"""
from __future__ import annotations

import math

import torch.nn as nn

from utils.checkpoint import half_state_dict, pack_state_dict, unpacked_state_dict
from utils.ema import DEFAULT_NBS, ModelEMA

HYP_KEY = "ema_companion_taus"
CHECKPOINT_KEY = "ema_companions"
# The main EMA's keys a companion shares; its schedule is the ramp and its tau its own whatever the main EMA's are.
SHARED_KEYS = {"ema_decay": "decay", "ema_update_every": "update_every", "ema_update_after_step": "update_after_step",
               "ema_flat": "flat", "ema_unit": "unit"}


def companion_taus(hyp: dict) -> list[float]:
    """The hyp's ``ema_companion_taus`` as floats ([] when absent); one-line ValueError unless it is a list of
    distinct positive finite numbers."""
    taus = hyp.get(HYP_KEY, [])
    if taus is None:
        return []
    if not isinstance(taus, (list, tuple)):
        raise ValueError(f"hyp {HYP_KEY} must be a list of EMA time constants, e.g. [200, 500], got {taus!r}")
    for t in taus:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"hyp {HYP_KEY}: every tau must be a positive number of steps, got {t!r}")
    names = [companion_name(t) for t in taus]
    if len(set(names)) != len(names):
        raise ValueError(f"hyp {HYP_KEY} lists a tau twice: {list(taus)}")
    return [float(t) for t in taus]


def companion_name(tau: float) -> str:
    """'tau200', 'tau2.5e+03'...: the key of a companion in checkpoints and the bench's tables."""
    return f"tau{float(tau):g}"


def companion_checkpoint(ckpt: dict, name: str) -> dict:
    """The checkpoint with companion ``name``'s weights as its 'ema' (what model_from_checkpoint loads); a
    one-line KeyError when the checkpoint holds no such companion."""
    held = ckpt.get(CHECKPOINT_KEY) or {}
    if name not in held:
        raise KeyError(f"checkpoint holds no companion EMA {name!r} (it holds {sorted(held) or 'none'})")
    return {**ckpt, "ema": held[name]}


class CompanionEMAs:
    """One ramp ModelEMA per tau, updated together (see the module docstring)."""

    def __init__(self, model: nn.Module, taus: list[float], decay: float = 0.9999, total_steps: int | None = None,
                 nbs: float = DEFAULT_NBS, **settings):
        if not taus:
            raise ValueError("CompanionEMAs needs at least one tau")
        self.emas = {companion_name(t): ModelEMA(model, decay=decay, tau=t, schedule="ramp", total_steps=total_steps,
                                                 nbs=nbs, **settings) for t in taus}

    @classmethod
    def from_hyp(cls, model: nn.Module, hyp: dict, total_steps: int | None = None) -> CompanionEMAs | None:
        """The companions the hyp lists (None when ``ema_companion_taus`` is absent or empty)."""
        taus = companion_taus(hyp)
        if not taus:
            return None
        settings = {arg: hyp[key] for key, arg in SHARED_KEYS.items() if key in hyp}
        return cls(model, taus, total_steps=total_steps, nbs=hyp.get("nbs", DEFAULT_NBS), **settings)

    @property
    def names(self) -> list[str]:
        return list(self.emas)

    def update(self, model: nn.Module, images: float | None = None) -> None:
        """Fold the model into every companion: call after each optimizer step actually taken, as the main EMA."""
        for ema in self.emas.values():
            ema.update(model, images=images)

    def summary(self) -> str:
        """The start-of-run line."""
        return (f"Companion EMAs (ramp, decay {next(iter(self.emas.values())).decay:g}, not fed back into training): "
                + ", ".join(self.emas) + f"; their weights go into every checkpoint's '{CHECKPOINT_KEY}'")

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_entries(self) -> tuple[dict, dict]:
        """({name: FP16 state dict}, :meth:`state_dict`): what every checkpoint holds for use (finished ones keep it,
        as 'ema') and what last.pt's resume state holds, from one CPU copy of each companion's weights (packed, as
        train.py's build_checkpoint copies the main EMA: each device tensor crosses to the host once)."""
        state = self.state_dict()
        return {name: half_state_dict(unpacked_state_dict(entry["ema"])) for name, entry in state.items()}, state

    def checkpoint_weights(self) -> dict:
        """{name: FP16 state dict}: what finished checkpoints (epochN.pt, best.pt, last.pt) hold, as 'ema'."""
        return self.checkpoint_entries()[0]

    def state_dict(self) -> dict:
        """{name: the ModelEMA state with its FP32 weights packed into CPU buffers}: the resume state, from which a
        run continues every companion bit-exactly."""
        return {name: {**ema.state_dict(weights=False), "ema": pack_state_dict(ema.ema.state_dict())}
                for name, ema in self.emas.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; each companion keeps this run's planned steps (an --epochs extension).
        ValueError (one line) when the saved companions are not this run's."""
        self._check_names(state, "resume state")
        for name, ema in self.emas.items():
            planned = ema.total_steps
            ema.load_state_dict({**state[name], "ema": unpacked_state_dict(state[name]["ema"])})
            ema.total_steps = planned

    def load_weights(self, weights: dict, updates: int, images: float | None = None) -> None:
        """Continue from a finished checkpoint's FP16 weights (:meth:`checkpoint_weights`) at ``updates`` steps,
        as the main EMA continues a finished run extended with --epochs (not bit-exact: FP16)."""
        self._check_names(weights, "checkpoint")
        for name, ema in self.emas.items():
            floats = {k: v.float() if v.is_floating_point() else v for k, v in weights[name].items()}
            state = {"ema": floats, "updates": int(updates)}
            if images is not None:
                state["images"] = float(images)
            ema.load_state_dict(state)

    def restore(self, ckpt: dict) -> None:
        """Continue from a resumed run's checkpoint: its FP32 resume state when it has one (an unfinished run),
        else its FP16 weights (a finished run extended with --epochs). One-line ValueError when it lacks them."""
        resume = ckpt.get("resume")
        if resume is not None:
            self.load_state_dict(resume.get(CHECKPOINT_KEY))
        else:
            images = ckpt.get("train_state", {}).get("ema_images")
            self.load_weights(ckpt.get(CHECKPOINT_KEY), int(ckpt["updates"]), images)

    def _check_names(self, saved: dict, what: str) -> None:
        if not isinstance(saved, dict) or sorted(saved) != sorted(self.emas):
            held = sorted(saved) if isinstance(saved, dict) else "none"
            raise ValueError(f"the {what} holds companion EMAs {held}, this run's hyp asks for {sorted(self.emas)}")
