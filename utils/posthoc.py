"""Post-hoc EMA: keep a few power-function EMAs and snapshots of them during training, and reconstruct
after training the EMA of any length (Karras et al. 2023, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2, arXiv 2312.02696, section 3.2 and appendix C).

Training side, :class:`PosthocEMA`: next to the main ModelEMA, one power EMA (``utils.ema`` schedule
``power``) per listed sigma_rel, FP32 and on the model's flat buffer (one ``lerp_`` each per step), and
``snapshots`` snapshots of each, evenly spaced in optimizer steps over the run's planned steps, written
atomically as ``<run>/weights/posthoc/sr<sigma_rel>_step<step>.pt`` with their step, position and gamma.

After training, :class:`ProfileFit` and :func:`synthesize`. The clock ``t`` is the EMAs' (optimizer steps, or
nominal batches with ``ema_unit: images``). A power EMA with exponent g read at position T weights the model
held over the clock stretch (a, b] by exactly the integral over (a, b] of

    p(t) = (g + 1) t**g / T**(g + 1)   on (0, T],   0 after T,

because its per-step decays telescope (``utils.ema``): the weight of step (a, b] is (b**(g+1) - a**(g+1)) /
T**(g+1). A combination sum_i c_i S_i of snapshots is therefore the average of the trajectory under the
profile f = sum_i c_i p_i, and the EMA wanted, a power EMA of the target sigma_rel at the end of the run, is
the average under its own profile p*. Least squares in L2 over t,

    minimise ||f - p*||**2   <=>   A c = b,   A_ij = <p_i, p_j>,   b_i = <p_i, p*>,

needs only inner products of truncated power functions. Both are nonzero on (0, min(T_i, T_j)]; for T_i <= T_j

    <p_i, p_j> = (g_i + 1)(g_j + 1) / (T_i**(g_i + 1) T_j**(g_j + 1)) * T_i**(g_i + g_j + 1) / (g_i + g_j + 1)
               = (g_i + 1)(g_j + 1) / (g_i + g_j + 1) * (T_i / T_j)**g_j / T_j,

evaluated in logs (T**g overflows for long runs and narrow profiles). The relative profile error of a fit
is ||f - p*|| / ||p*|| with ||f - p*||**2 = c'Ac - 2 c'b + <p*, p*>. For any weight trajectory theta(t), the
synthesized weights differ from the EMA tracked directly by the integral of (f - p*) theta, at most
||f - p*|| ||theta|| per value (Cauchy-Schwarz).
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from utils.checkpoint import save_checkpoint
from utils.ema import DEFAULT_NBS, GAMMA_WIDEST, SIGMA_REL_MAX, ModelEMA, power_gamma
from utils.log import LOGGER

SNAPSHOT_FORMAT = "yolo-ema-posthoc"
SNAPSHOT_VERSION = 1
DEFAULT_SNAPSHOTS = 32
DEFAULT_SIGMA_RELS = (0.05, 0.1)  # what train.py --posthoc keeps when the hyp lists no widths
HYP_KEYS = ("posthoc_sigma_rels", "posthoc_snapshots")
# A fit whose profile misses the target's by more than this is refused: the stored EMAs cannot reach it.
MAX_FIT_ERROR = 0.10
# Snapshots are FP32 (twice the disk of FP16). A fit for a small sigma_rel combines them with coefficients of
# alternating sign (sum of magnitudes 10.5 at 0.03, 27.6 at 0.02 from EMAs 0.05/0.10 x 32), and FP16 snapshots
# made the synthesized weights' RMS error 5.4x (0.03) and 13x (0.02) that of one FP16 rounding of the result
# (1.2e-3 and 2.9e-3 of the weights' RMS; `python bench/ema.py --posthoc-precision`). FP32 also lets an extended
# finished run continue the bank exactly from its last snapshots.
SNAPSHOT_DTYPE = torch.float32


class PosthocError(Exception):
    """Post-hoc EMA input that cannot be used (no snapshots, another architecture, a width out of reach);
    the message is one line."""


def settings_from_hyp(hyp: dict) -> tuple[list[float], int] | None:
    """(sigma_rels, snapshots) from hyp keys ``posthoc_sigma_rels`` and ``posthoc_snapshots``; None when the
    list is absent or empty (post-hoc EMA off). Raises ValueError with one line for a bad value."""
    unknown = sorted(str(k) for k in hyp if str(k).startswith("posthoc_") and k not in HYP_KEYS)
    if unknown:
        raise ValueError(f"unknown post-hoc EMA hyperparameter(s) {unknown}; known: {list(HYP_KEYS)}")
    snapshots = hyp.get("posthoc_snapshots", DEFAULT_SNAPSHOTS)
    if isinstance(snapshots, bool) or not isinstance(snapshots, int) or snapshots < 1:
        raise ValueError(f"hyp posthoc_snapshots must be a whole number >= 1, got {snapshots!r}")
    rels = hyp.get("posthoc_sigma_rels")
    if rels is None or (isinstance(rels, (list, tuple)) and not rels):
        return None
    if not isinstance(rels, (list, tuple)):
        raise ValueError(f"hyp posthoc_sigma_rels must be a list such as [0.05, 0.1], got {rels!r}")
    for s in rels:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s <= SIGMA_REL_MAX:
            raise ValueError(f"hyp posthoc_sigma_rels: {s!r} is not a relative width in (0, {SIGMA_REL_MAX:.4f}]")
    check_distinct_names(rels, "hyp posthoc_sigma_rels")
    return [float(s) for s in rels], snapshots


def with_posthoc_on(hyp: dict) -> dict:
    """The hyp with post-hoc EMAs on (train.py --posthoc): as it is when it lists widths, else with
    ``posthoc_sigma_rels`` set to DEFAULT_SIGMA_RELS; ``posthoc_snapshots`` stays the hyp's own."""
    if settings_from_hyp(hyp) is not None:
        return hyp
    return {**hyp, "posthoc_sigma_rels": list(DEFAULT_SIGMA_RELS)}


def snapshot_name(sigma_rel: float, step: int) -> str:
    return f"sr{sigma_rel:g}_step{step:08d}.pt"


_SNAPSHOT_NAME = re.compile(r"sr[^_]+_step(\d+)\.pt")


def check_distinct_names(sigma_rels, what: str) -> None:
    """Refuse widths whose snapshots would share file names: the names hold 6 significant digits, so 0.1 and
    0.1000001 would overwrite each other's files although the floats differ. One-line ValueError."""
    seen: dict[str, float] = {}
    for s in sigma_rels:
        label = f"{s:g}"
        if label in seen:
            raise ValueError(f"{what} lists a width twice: {seen[label]!r} and {s!r} would write the same snapshot "
                             f"files (sr{label}_step...), whose names keep 6 significant digits")
        seen[label] = s


# ------------------------------------------------------------------------------------------------ training side
class PosthocEMA:
    """A bank of power-function EMAs with periodic snapshots on disk, for choosing the EMA length after training.

    In train.py (rank 0, next to the main ModelEMA)::

        posthoc = PosthocEMA.from_hyp(model, hyp, total_steps, weights_dir / "posthoc")  # None when off
        ...after every optimizer step actually taken:
        posthoc.update(model, images=B)          # writes the snapshots that fall due at this step
        ...after the last epoch (also after an early stop), before the resume state is stripped:
        posthoc.finish()                         # snapshot at the last step if it was not one already

    Snapshots fall due at steps ``round(i * total_steps / snapshots)``, i = 1..snapshots; ``update`` writes
    them (a file per EMA, atomically), so a kill leaves whole files and a resumed run rewrites the ones after
    its checkpoint with identical contents. ``state_dict()`` (FP32 EMAs, counters, steps written) belongs in
    the resume state; ``load_state_dict`` keeps this object's ``total_steps``, the plan of the run being
    resumed, so an ``--epochs`` extension spaces the remaining snapshots over the longer plan (the ones
    written stay). A finished run extended without resume state continues from its last snapshots
    (:meth:`continue_from_snapshots`).
    """

    def __init__(self, model: nn.Module, sigma_rels: list[float], total_steps: int, folder: str | Path,
                 snapshots: int = DEFAULT_SNAPSHOTS, unit: str = "steps", nbs: float = DEFAULT_NBS, flat: bool = True):
        if not sigma_rels:
            raise ValueError("PosthocEMA needs at least one sigma_rel")
        check_distinct_names(sigma_rels, "post-hoc EMA sigma_rels")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.snapshots = int(snapshots)
        if self.snapshots < 1:
            raise ValueError(f"post-hoc EMA snapshots must be >= 1, got {snapshots}")
        self.folder = Path(folder)
        self.emas = [ModelEMA(model, schedule="power", sigma_rel=s, unit=unit, nbs=nbs, flat=flat)
                     for s in self.sigma_rels]
        self.written: list[int] = []  # steps whose snapshots are on disk (ascending)
        self._snapshot_bytes: int | None = None
        self.set_total_steps(total_steps)

    @classmethod
    def from_hyp(cls, model: nn.Module, hyp: dict, total_steps: int, folder: str | Path) -> PosthocEMA | None:
        """The bank described by hyp (``posthoc_sigma_rels``, ``posthoc_snapshots``, and ``ema_unit``, ``nbs``,
        ``ema_flat`` shared with the main EMA), or None when ``posthoc_sigma_rels`` is absent or empty.
        ``total_steps``: the run's planned optimizer steps. Bad values raise ValueError with one line."""
        settings = settings_from_hyp(hyp)
        if settings is None:
            return None
        sigma_rels, snapshots = settings
        return cls(model, sigma_rels, total_steps, folder, snapshots=snapshots, unit=hyp.get("ema_unit", "steps"),
                   nbs=hyp.get("nbs", DEFAULT_NBS), flat=hyp.get("ema_flat", True))

    # ---------------------------------------------------------------- the plan
    def set_total_steps(self, total_steps: int) -> None:
        """The run's planned optimizer steps; snapshots not yet written are spaced over this plan."""
        if total_steps is None or isinstance(total_steps, bool) or int(total_steps) < 1:
            raise ValueError(f"post-hoc EMA needs the run's planned optimizer steps (>= 1), got {total_steps!r}")
        self.total_steps = int(total_steps)
        self._next = self._next_due()

    def planned_steps(self) -> list[int]:
        """Steps at which snapshots fall due under the current plan."""
        n, total = self.snapshots, self.total_steps
        return sorted({max(1, round(i * total / n)) for i in range(1, n + 1)})

    def _next_due(self) -> int | None:
        last = self.written[-1] if self.written else 0
        return next((s for s in self.planned_steps() if s > last), None)

    @property
    def updates(self) -> int:
        """Optimizer steps counted."""
        return self.emas[0].updates

    # ---------------------------------------------------------------- training
    def update(self, model: nn.Module, images: float | None = None) -> None:
        """Fold the model into every power EMA (after an optimizer step actually taken; ``images`` as for
        ModelEMA.update) and write the snapshots due at this step."""
        for ema in self.emas:
            ema.update(model, images=images)
        if self._next is not None and self.updates >= self._next:
            self.save()

    def save(self) -> list[Path]:
        """Write every EMA's snapshot at the current step (nothing if that step is already on disk)."""
        step = self.updates
        if step < 1 or (self.written and self.written[-1] == step):
            return []
        paths = [save_checkpoint(self._snapshot(j), self.folder / snapshot_name(s, step))
                 for j, s in enumerate(self.sigma_rels)]
        self.written.append(step)
        self._next = self._next_due()
        return paths

    def finish(self) -> list[Path]:
        """At the end of training: a snapshot at the last step, so the bank's final state is on disk."""
        return self.save()

    def _snapshot(self, j: int) -> dict:
        ema = self.emas[j]
        return {
            "format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION,
            "sigma_rel": self.sigma_rels[j], "gamma": float(ema.gamma),
            "step": int(ema.updates), "position": _position(ema), "unit": ema.unit, "nbs": float(ema.nbs),
            "images": float(ema.images),
            # Copied to the CPU as they are cast: a snapshot file loads on a machine without CUDA
            "ema": {k: v.detach().to("cpu", SNAPSHOT_DTYPE if v.is_floating_point() else v.dtype, copy=True,
                                     memory_format=torch.contiguous_format) for k, v in ema.ema.state_dict().items()},
        }

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """FP32 state of the bank for exact resume: plain values only (loads with weights_only=True)."""
        return {"sigma_rels": list(self.sigma_rels), "snapshots": self.snapshots, "total_steps": self.total_steps,
                "written": list(self.written), "emas": [ema.state_dict() for ema in self.emas]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; ``total_steps`` stays this object's (the plan of the run going on).
        Snapshot files of steps after the restored one are deleted."""
        if [float(s) for s in state.get("sigma_rels", [])] != self.sigma_rels:
            raise ValueError(f"post-hoc EMA state holds sigma_rels {state.get('sigma_rels')}, but the hyp lists "
                             f"{self.sigma_rels}")
        for ema, ema_state in zip(self.emas, state["emas"]):
            ema.load_state_dict(ema_state)
        self.written = [int(s) for s in state.get("written", [])]
        self._next = self._next_due()
        self._remove_later_snapshots()

    def _remove_later_snapshots(self) -> None:
        # A run killed mid-epoch may have written snapshots after the checkpoint it resumes from. Under the same
        # plan they would be rewritten identically, but an --epochs extension re-spaces the plan, and files left
        # at the old plan's steps, from a trajectory this run no longer follows, would enter the fit.
        files = sorted(self.folder.glob("*.pt")) if self.folder.is_dir() else []
        later = [f for f in files if (m := _SNAPSHOT_NAME.fullmatch(f.name)) and int(m.group(1)) > self.updates]
        for f in later:
            f.unlink()
        if later:
            LOGGER.info(f"Post-hoc EMA: removed {len(later)} snapshot files written after step {self.updates}, "
                        f"where the run resumes, from {self.folder}")

    def continue_from_snapshots(self, updates: int) -> None:
        """Continue a finished run (its resume state stripped) from the last snapshot of every EMA, which
        ``finish`` wrote at its last step ``updates``."""
        found = find_snapshots(self.folder)
        self.written = sorted({s.step for s in found if s.sigma_rel in self.sigma_rels})
        for sigma_rel, ema in zip(self.sigma_rels, self.emas):
            mine = [s for s in found if s.sigma_rel == sigma_rel]
            latest = max(mine, key=lambda s: s.step) if mine else None
            if latest is None or latest.step != int(updates):
                where = f"its last snapshot is at step {latest.step}" if latest else "it has no snapshot"
                raise ValueError(f"post-hoc EMA sigma_rel {sigma_rel:g} cannot continue: the run is at step "
                                 f"{updates} but {where} in {self.folder}")
            snap = _read(latest.path)
            ema.ema.load_state_dict(snap["ema"])  # copies into the flat views, converting to FP32
            ema.updates, ema.images, ema.pending_images = latest.step, float(snap["images"]), 0.0
            if any(v.dtype == torch.float16 for v in latest.state.values()):
                LOGGER.warning(f"post-hoc EMA sigma_rel {sigma_rel:g}: continuing from an FP16 snapshot")
        self._next = self._next_due()

    # ---------------------------------------------------------------- reporting
    def disk_bytes(self) -> int:
        """Bytes the snapshots of this plan take on disk, the ones written included."""
        if self._snapshot_bytes is None:  # one snapshot serialised in memory: the exact file size
            buffer = io.BytesIO()
            torch.save(self._snapshot(0), buffer)
            self._snapshot_bytes = buffer.tell()
        last = self.written[-1] if self.written else 0
        files = len(self.written) + sum(1 for s in self.planned_steps() if s > last)
        return files * len(self.emas) * self._snapshot_bytes

    def summary(self) -> str:
        """One line for the start of the run."""
        rels = ", ".join(f"{s:g}" for s in self.sigma_rels)
        count = len(self.planned_steps())  # a snapshot per optimizer step at most
        fewer = f" ({self.snapshots} asked for, one per optimizer step at most)" if count < self.snapshots else ""
        return (f"Post-hoc EMA: {len(self.emas)} power EMAs (sigma_rel {rels}), {count} snapshots each{fewer}, "
                f"one every {self.total_steps / count:.3g} optimizer steps of {self.total_steps}, in {self.folder}: "
                f"{self.disk_bytes() / 1e6:.1f} MB on disk ({str(SNAPSHOT_DTYPE).replace('torch.', '')})")


def _position(ema: ModelEMA) -> float:
    """Where on its clock the EMA stands: optimizer steps, or nominal batches with unit 'images'."""
    return float(ema.images / ema.nbs if ema.unit == "images" else ema.updates)


# ------------------------------------------------------------------------------------------------ reading snapshots
@dataclass(frozen=True)
class Snapshot:
    """A snapshot file: what it says about itself, and its state dict memory-mapped (read when used)."""

    path: Path
    sigma_rel: float
    gamma: float
    step: int
    position: float
    unit: str
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)


def _read(path: Path) -> dict:
    try:  # weights_only: loading runs no code; mmap: the weights are paged in only when used
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise PosthocError(f"{path} is not a readable post-hoc EMA snapshot ({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != SNAPSHOT_FORMAT:
        raise PosthocError(f"{path} is not a post-hoc EMA snapshot (no format '{SNAPSHOT_FORMAT}')")
    if not isinstance(obj.get("version"), int) or obj["version"] > SNAPSHOT_VERSION:
        raise PosthocError(f"{path} has snapshot version {obj.get('version')!r}; this code reads up to "
                           f"{SNAPSHOT_VERSION}")
    ema = obj.get("ema")
    if not isinstance(ema, dict) or not all(isinstance(v, torch.Tensor) for v in ema.values()):
        raise PosthocError(f"{path} is malformed: 'ema' is not a state dict of tensors")
    return obj


def find_snapshots(folder: str | Path) -> list[Snapshot]:
    """The snapshots in folder, ordered by (sigma_rel, step); one line of PosthocError when there are none,
    a file is not a snapshot, or they mix clocks."""
    folder = Path(folder)
    files = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    if not files:
        raise PosthocError(f"{folder}: no post-hoc EMA snapshots (train with hyp posthoc_sigma_rels, e.g. "
                           "[0.05, 0.1], to keep them)")
    found = []
    for f in files:
        d = _read(f)
        try:
            found.append(Snapshot(f, float(d["sigma_rel"]), float(d["gamma"]), int(d["step"]),
                                  float(d["position"]), str(d["unit"]), d["ema"]))
        except (KeyError, TypeError, ValueError):
            raise PosthocError(f"{f} is malformed: it lacks sigma_rel, gamma, step, position or unit") from None
    units = {s.unit for s in found}
    if len(units) > 1:
        raise PosthocError(f"{folder} mixes snapshots counted in {sorted(units)}: not one run's")
    for s in found:
        if not s.position > 0:
            raise PosthocError(f"{s.path} has position {s.position}; a snapshot's position must be positive")
        # The fit's Gram entries hold 1 / (g_i + g_j + 1), infinite at g = -0.5 and negative below; no power EMA
        # has a gamma under the widest one's, so a file that says so was not written by a bank.
        if not s.gamma >= GAMMA_WIDEST:
            raise PosthocError(f"{s.path} has gamma {s.gamma}, below {GAMMA_WIDEST:.4f} (the widest power EMA's): "
                               "not a post-hoc EMA snapshot")
    return sorted(found, key=lambda s: (s.sigma_rel, s.step))


def check_architecture(snapshots: list[Snapshot], reference: dict[str, torch.Tensor], what: str) -> None:
    """Every snapshot holds exactly the reference's tensor names and shapes (``what`` names the reference)."""
    shapes = {k: tuple(v.shape) for k, v in reference.items()}
    for snap in snapshots:
        state = snap.state
        for k, v in state.items():
            if k not in shapes:
                raise PosthocError(f"{snap.path} is a snapshot of another architecture than {what}: it has '{k}'")
            if tuple(v.shape) != shapes[k]:
                raise PosthocError(f"{snap.path} is a snapshot of another architecture than {what}: '{k}' is "
                                   f"{tuple(v.shape)} there but {shapes[k]} in {what}")
        missing = [k for k in shapes if k not in state]
        if missing:
            raise PosthocError(f"{snap.path} is a snapshot of another architecture than {what}: no '{missing[0]}'")


# ------------------------------------------------------------------------------------------------ the fit
def profile_inner(gamma_a, pos_a, gamma_b, pos_b) -> np.ndarray:
    """<p_a, p_b>: L2 inner products of normalised power profiles p(t) = (g + 1) t**g / T**(g + 1) on (0, T]
    (elementwise over broadcast arrays; positions > 0)."""
    ga, ta, gb, tb = (np.asarray(x, dtype=np.float64) for x in (gamma_a, pos_a, gamma_b, pos_b))
    ga, ta, gb, tb = np.broadcast_arrays(ga, ta, gb, tb)
    a_first = ta <= tb  # name the shorter profile (i) and the longer one (j)
    gi, ti = np.where(a_first, ga, gb), np.where(a_first, ta, tb)
    gj, tj = np.where(a_first, gb, ga), np.where(a_first, tb, ta)
    log = gj * np.log(ti / tj) - np.log(tj)
    return (gi + 1.0) * (gj + 1.0) / (gi + gj + 1.0) * np.exp(log)


@dataclass
class Fit:
    """Coefficients over the snapshots that reconstruct a power EMA of ``sigma_rel`` at ``position``."""

    sigma_rel: float
    gamma: float
    position: float
    coeffs: np.ndarray
    error: float  # ||f - p*|| / ||p*||

    @property
    def end_decay(self) -> float:
        """The per-step decay of this power EMA at its position, (1 - 1/T)**(gamma + 1): what a YOLOv5-style
        EMA of about the same width uses there (per optimizer step; per nominal batch with ema_unit images)."""
        return (1.0 - 1.0 / self.position) ** (self.gamma + 1.0) if self.position > 1 else 0.0


class ProfileFit:
    """Least-squares fits of target power profiles by the profiles of a set of snapshots (see module doc)."""

    def __init__(self, snapshots: list[Snapshot], position: float | None = None):
        if not snapshots:
            raise PosthocError("no snapshots to fit with")
        self.snapshots = snapshots
        self.position = float(position if position is not None else max(s.position for s in snapshots))
        # Positions in units of the target's: the inner products all scale by 1/position, the coefficients not.
        self._gammas = np.array([s.gamma for s in snapshots])
        self._pos = np.array([s.position for s in snapshots]) / self.position
        self._gram = profile_inner(self._gammas[:, None], self._pos[:, None], self._gammas[None, :],
                                   self._pos[None, :])

    def fit(self, sigma_rel: float, max_error: float | None = MAX_FIT_ERROR) -> Fit:
        """The fit for a target width; a relative profile error above ``max_error`` is a PosthocError."""
        try:
            gamma = power_gamma(sigma_rel)
        except ValueError as e:
            raise PosthocError(str(e)) from None
        b = profile_inner(self._gammas, self._pos, gamma, 1.0)
        target = float(profile_inner(gamma, 1.0, gamma, 1.0))
        coeffs = np.linalg.lstsq(self._gram, b, rcond=None)[0]
        residual = float(coeffs @ self._gram @ coeffs - 2.0 * coeffs @ b + target)
        fit = Fit(float(sigma_rel), gamma, self.position, coeffs, math.sqrt(max(residual, 0.0) / target))
        if max_error is not None and fit.error > max_error:
            low_high = self.reachable(max_error)
            reach = f"reachable about {low_high[0]:.3g}-{low_high[1]:.3g}" if low_high else "none is reachable"
            raise PosthocError(f"sigma_rel {sigma_rel:g} is outside what the stored EMAs ({self.describe()}) can "
                               f"reach: profile error {fit.error:.2%} > {max_error:.0%} ({reach})")
        return fit

    def reachable(self, max_error: float = MAX_FIT_ERROR) -> tuple[float, float] | None:
        """Smallest and largest sigma_rel on a fine grid whose fit error is within max_error."""
        grid = np.geomspace(1e-3, SIGMA_REL_MAX, 300)
        ok = [s for s in grid if self.fit(float(s), max_error=None).error <= max_error]
        return (min(ok), max(ok)) if ok else None

    def describe(self) -> str:
        rels = sorted({s.sigma_rel for s in self.snapshots})
        counts = sorted({sum(1 for s in self.snapshots if s.sigma_rel == r) for r in rels})
        return (f"sigma_rel {', '.join(f'{r:g}' for r in rels)}; {'/'.join(map(str, counts))} snapshots each")


def synthesize(snapshots: list[Snapshot], coeffs) -> dict[str, torch.Tensor]:
    """sum_i c_i * snapshot_i in FP32 for every floating-point tensor (BatchNorm statistics included);
    integer buffers (num_batches_tracked) from the latest snapshot. The snapshots are memory-mapped, so only
    the result is held in memory."""
    out: dict[str, torch.Tensor] = {}
    for snap, c in zip(snapshots, np.asarray(coeffs, dtype=np.float64)):
        if c == 0.0:
            continue
        for k, v in snap.state.items():
            if v.is_floating_point():
                acc = out.get(k)
                if acc is None:
                    acc = out[k] = torch.zeros(v.shape, dtype=torch.float32)
                acc.add_(v.float(), alpha=float(c))
    latest = max(snapshots, key=lambda s: s.step).state
    return {k: out[k] if v.is_floating_point() else v.clone() for k, v in latest.items()
            if not v.is_floating_point() or k in out}

