"""BEMA, the bias-corrected EMA of Block and Zhang 2025 ("EMA Without the Lag: Bias-Corrected Iterate Averaging
Schemes", arXiv 2508.00180).

An EMA of the iterates lags: it weights the recent iterates, which are the nearest to where training is going,
least. BEMA adds a correction proportional to how far the iterates have moved since a reference point theta_0:

    mu_t  = alpha_t * (theta_t - theta_0) + ema_t
    ema_t = (1 - beta_t) * ema_{t-1} + beta_t * theta_t
    beta_t  = (lag + multiplier * t) ** -power         (the EMA's weight on the newest iterate)
    alpha_t = (lag + multiplier * t) ** -bias_power    (the correction's weight)

Both weights shrink polynomially with t, the steps since the burn-in ended; the defaults (power 0.5, bias_power 0.2,
lag 10, multiplier 1) are the authors' code's. In their analysis (iterates as an Ornstein-Uhlenbeck process around
an optimum) the correction removes the EMA's bias toward the start without the variance a plain average of recent
iterates would have. The correction applies to the parameters only: buffers (BatchNorm's running statistics) are
not iterates of the optimizer, and extrapolated they leave their range (a falling running variance goes
negative), so the averaged model holds their plain EMA ema_t. mu_t, not ema_t, is the averaged model: ``BEMA.ema`` holds it, and it is what is validated and
saved. ``ema_t`` and ``theta_0`` are extra state, two more FP32 copies of the model, kept in the checkpoint's resume
state so that a resumed run continues bit for bit.

How it sits on ModelEMA: the schedule ``bema`` (registered here) gives the decay ``1 - beta_t``, so everything
ModelEMA does with a schedule holds: ``update_after_step`` is the burn-in (the average, theta_0 and the output are
the model itself until it has passed, and theta_0 is the model where it ends; the paper's tau),
``update_every`` averages every k-th step with the k steps' decays compounded (the paper's phi, but without
shortening the horizon), and ``unit: images`` counts t in nominal batches.

Hyp keys: ``ema_bema: true`` turns it on in place of the main EMA's schedule (``ema_decay``, ``ema_tau`` and
``ema_schedule`` are then not used); ``ema_bema_power``, ``ema_bema_bias_power``, ``ema_bema_lag`` and
``ema_bema_multiplier`` set the four numbers above.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from utils.ema import EMAStorage, ModelEMA, host_copies, register_schedule, shadow_copy
from utils.log import LOGGER

# The main EMA's schedule settings, which BEMA's own schedule replaces: not used, and not refused, with ema_bema.
REPLACED_HYP_KEYS = ("ema_schedule", "ema_decay", "ema_tau", "ema_gamma", "ema_sigma_rel", "ema_beta")
DEFAULTS = {"ema_bema_power": 0.5, "ema_bema_bias_power": 0.2, "ema_bema_lag": 10.0, "ema_bema_multiplier": 1.0}


def bema_beta(t: float, power: float, lag: float, multiplier: float) -> float:
    """The EMA's weight on the newest iterate at step t (>= 1) after the burn-in."""
    return (lag + multiplier * t) ** -power


def bema_alpha(t: float, bias_power: float, lag: float, multiplier: float) -> float:
    """The correction's weight at step t (>= 1) after the burn-in."""
    return (lag + multiplier * t) ** -bias_power


def _bema_schedule(decay: float, step: int, total_steps: int | None, bema_power: float, bema_lag: float,
                   bema_multiplier: float) -> float:
    return 1.0 - bema_beta(step, bema_power, bema_lag, bema_multiplier)


register_schedule("bema", _bema_schedule, params=("bema_power", "bema_lag", "bema_multiplier"))


class BEMA(ModelEMA):
    """ModelEMA whose ``ema`` is the bias-corrected average (see the module docstring).

    Args:
        model: the model being trained.
        power, bias_power, lag, multiplier: beta_t's and alpha_t's exponents, and the offset and scale of t in both.
        **kwargs: ModelEMA's (``update_after_step``, ``update_every``, ``unit``, ``nbs``, ``flat``, ``updates``,
            ``total_steps``, ``images``); the schedule is always ``bema``.

    Attributes beyond ModelEMA's: ``average`` (the EMA ema_t) and ``anchor`` (theta_0), EMAStorages whose
    ``shadow`` modules hold them, paired with the model like ``ema``'s.
    """

    def __init__(self, model: nn.Module, power: float = DEFAULTS["ema_bema_power"],
                 bias_power: float = DEFAULTS["ema_bema_bias_power"], lag: float = DEFAULTS["ema_bema_lag"],
                 multiplier: float = DEFAULTS["ema_bema_multiplier"], **kwargs):
        if kwargs.setdefault("schedule", "bema") != "bema":
            raise ValueError(f"BEMA has its own schedule; got schedule {kwargs['schedule']!r}")
        self.bema_power, self.bema_bias_power = float(power), float(bias_power)
        self.bema_lag, self.bema_multiplier = float(lag), float(multiplier)
        self._check_bema()
        super().__init__(model, **kwargs)
        self.average = EMAStorage(shadow_copy(model), model, self.flat)
        self.anchor = EMAStorage(shadow_copy(model), model, self.flat)

    @classmethod
    def from_hyp(cls, model: nn.Module, hyp: dict, updates: int = 0, total_steps: int | None = None, **kwargs):
        """ModelEMA.from_hyp's keys that apply (``ema_update_after_step``, ``ema_update_every``, ``ema_unit``,
        ``ema_flat``, ``nbs``) and ``ema_bema_power``, ``ema_bema_bias_power``, ``ema_bema_lag``,
        ``ema_bema_multiplier`` (defaults: DEFAULTS)."""
        settings = {key.removeprefix("ema_bema_"): hyp.get(key, default) for key, default in DEFAULTS.items()}
        rest = {k: v for k, v in hyp.items() if k not in REPLACED_HYP_KEYS}
        return super().from_hyp(model, rest, updates=updates, total_steps=total_steps, **settings, **kwargs)

    def _check_bema(self) -> None:
        numbers = {"power": self.bema_power, "bias_power": self.bema_bias_power, "lag": self.bema_lag,
                   "multiplier": self.bema_multiplier}
        if not all(map(math.isfinite, numbers.values())) or self.bema_power <= 0 or self.bema_bias_power < 0 or self.bema_lag < 0 or self.bema_multiplier <= 0:
            raise ValueError(f"BEMA needs power > 0, bias_power >= 0, lag >= 0 and multiplier > 0 (hyp ema_bema_*), "
                             f"got {numbers}")
        if self.bema_lag + self.bema_multiplier < 1:
            raise ValueError(f"BEMA needs lag + multiplier >= 1 so that the first weight (lag + multiplier) ** -power "
                             f"is at most 1, got lag {self.bema_lag} and multiplier {self.bema_multiplier}")

    # ---------------------------------------------------------------- the update
    def _average_in(self, model: nn.Module, d: float) -> None:
        self.average.follow(model)
        self.anchor.follow(model)
        if not self.storage.path == self.average.path == self.anchor.path:  # one fell back to per-tensor lists
            for storage in (self.storage, self.average, self.anchor):
                storage.attach(model, flat=False)
        t = self.clock() - self.update_after_step
        if t <= 0:  # burn-in: everything is the model, and theta_0 is where the burn-in ends
            for storage in (self.storage, self.average, self.anchor):
                storage.copy_()
            return
        if d == 0.0:
            self.average.copy_()
        else:
            self.average.lerp_(1.0 - d)
        out, theta = self.storage.float_pairs()
        average, _ = self.average.float_pairs()
        anchor, _ = self.anchor.float_pairs()
        torch._foreach_copy_(out, theta)
        torch._foreach_sub_(out, anchor)
        torch._foreach_mul_(out, self.alpha(t))
        torch._foreach_add_(out, average)
        # Buffers (BatchNorm's running statistics) keep their plain EMA: extrapolating them is meaningless, and a
        # running variance that fell during training would be pushed below zero (NaN once BatchNorm is fused).
        corrected = [b for b in self.storage.shadow.buffers() if b.is_floating_point()]
        if corrected:
            torch._foreach_copy_(corrected, [b for b in self.average.shadow.buffers() if b.is_floating_point()])
        self.storage.copy_integers()

    def clock(self) -> float:
        """Where the EMA's clock stands: optimizer steps counted, or nominal batches of images with unit images."""
        return self.images / self.nbs if self.unit == "images" else float(self.updates)

    def alpha(self, t: float) -> float:
        """The correction's weight at t steps (of the EMA's clock) after the burn-in."""
        return bema_alpha(t, self.bema_bias_power, self.bema_lag, self.bema_multiplier)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self, weights: bool = True) -> dict:
        """ModelEMA's state plus BEMA's settings and its two extra FP32 copies, ``bema_average`` (ema_t) and
        ``bema_anchor`` (theta_0); those are in it also with ``weights=False``, which leaves out only 'ema'."""
        return super().state_dict(weights) | {
            "bema_power": self.bema_power, "bema_bias_power": self.bema_bias_power, "bema_lag": self.bema_lag,
            "bema_multiplier": self.bema_multiplier,
            "bema_average": host_copies(self.average.shadow.state_dict()),
            "bema_anchor": host_copies(self.anchor.shadow.state_dict()),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. A state without BEMA's copies (a finished checkpoint, whose resume state
        is gone) restarts the correction: ema_t from the saved average, theta_0 the model's current weights."""
        old = (self.bema_power, self.bema_bias_power, self.bema_lag, self.bema_multiplier)
        self.bema_power = float(state.get("bema_power", self.bema_power))
        self.bema_bias_power = float(state.get("bema_bias_power", self.bema_bias_power))
        self.bema_lag = float(state.get("bema_lag", self.bema_lag))
        self.bema_multiplier = float(state.get("bema_multiplier", self.bema_multiplier))
        try:
            self._check_bema()
            for key in ("bema_average", "bema_anchor"):
                if key in state:
                    self._check_weights(state[key])
        except ValueError:
            self.bema_power, self.bema_bias_power, self.bema_lag, self.bema_multiplier = old
            raise
        super().load_state_dict(state)
        if "bema_average" in state and "bema_anchor" in state:
            self.average.shadow.load_state_dict(state["bema_average"])
            self.anchor.shadow.load_state_dict(state["bema_anchor"])
        else:
            self.average.shadow.load_state_dict(self.ema.state_dict())
            self.anchor.copy_()
            LOGGER.info("BEMA: no saved average and theta_0 (a finished run); the correction restarts from here")

    def __repr__(self) -> str:
        return (f"BEMA(path={self.path!r}, updates={self.updates}, power={self.bema_power}, "
                f"bias_power={self.bema_bias_power}, lag={self.bema_lag}, multiplier={self.bema_multiplier}, "
                f"update_every={self.update_every}, update_after_step={self.update_after_step}, unit={self.unit!r})")


def ema_from_hyp(model: nn.Module, hyp: dict, updates: int = 0, total_steps: int | None = None, **kwargs) -> ModelEMA:
    """The run's main EMA: a BEMA when the hyp says ``ema_bema: true``, else a ModelEMA (both from the hyp)."""
    on = hyp.get("ema_bema", False)
    if not isinstance(on, bool):
        raise ValueError(f"hyp ema_bema must be true or false, got {on!r}")
    if not on:
        return ModelEMA.from_hyp(model, hyp, updates=updates, total_steps=total_steps, **kwargs)
    if hyp.get("ema_schedule", "ramp") not in ("ramp", "bema"):
        raise ValueError(f"hyp ema_bema: true replaces the EMA's schedule; remove ema_schedule: {hyp['ema_schedule']}")
    return BEMA.from_hyp(model, hyp, updates=updates, total_steps=total_steps, **kwargs)

