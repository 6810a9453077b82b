"""Exponential moving average (EMA) of a model's weights.

The EMA is kept in FP32 whatever the model's precision. By default the model's floating-point parameters and
persistent buffers are moved, at construction, into one contiguous buffer per (device, dtype): every tensor
becomes a view into it with the same values, shape, strides and name, and the EMA lives in a second buffer
with the same layout. An update is then a single ``lerp_`` over the whole model, the memory-bandwidth floor
(12 bytes per parameter) instead of hundreds of small kernels plus a ``state_dict()`` rebuild.

When the model's tensors are replaced after that (``.to(dtype)``, ``.half()``, a memory-format change,
``load_state_dict(assign=True)``, ``p.data = ...``) the views are gone; each update notices this from the
tensors' addresses and falls back to cached per-tensor lists with ``torch._foreach_lerp_`` (``ema.path``
says which is in use; ``ema.attach(model)`` flattens again). What is watched is every (module, name) slot that
held a tensor when the EMA was attached; after swapping whole submodules for new ones holding new tensors
(fusing, re-heading), call ``ema.attach(model)``. Module swaps that keep the tensors, such as
``SyncBatchNorm.convert_sync_batchnorm``, need nothing. A model moved to another device after the EMA was built
(``model.to(device)``) is followed: the next update moves the EMA there too, and says so.

Two classes: :class:`EMAStorage` owns that layout (the pairing, the flat buffers or lists, the checks that they
are still the model's, and the ``copy_``/``lerp_`` operations on them); :class:`ModelEMA` owns the averaging (the
clock, the schedule's decay, what an update does) and the checkpoint state.

Tensors are paired with the EMA's by registration order, never by name, so a ``torch.compile``d model
(keys prefixed ``_orig_mod.``) or a DDP/DataParallel wrapper works the same.

The schedule's clock (``unit``): ``'steps'`` (YOLOv5's) counts optimizer steps. ``'images'`` counts nominal
batches of ``nbs`` images: ``update(model, images=B)`` says how many images the step's gradient covered, and the
step is given the decay of the stretch ``(x - B / nbs, x]`` of that clock, where ``x`` is the images seen so far
divided by ``nbs`` (Busbridge et al. 2023: ``decay ** (B / nbs)`` for a constant decay). Decays over stretches
compose exactly (the decay over ``(a, b]`` times the decay over ``(b, c]`` is the decay over ``(a, c]``), so an
EMA's weight on any span of the image stream does not depend on how the stream was cut into optimizer steps:
the batch size, accumulation and the number of processes leave the horizon unchanged. A schedule defined per
step, ``d(n)``, is read as holding over the n-th nominal batch ``(n - 1, n]`` (images ``(n - 1) * nbs`` to
``n * nbs``): a step covering the fraction ``f`` of that batch gets ``d(n) ** f``, and the ramp's step ``n`` is
the nominal batch an image falls in, ``ceil(images / nbs)``. The ``power`` schedule has its own exact form,
``(a / b) ** (gamma + 1)`` over ``(a, b]``. ``tau``, ``update_after_step`` and ``total_steps`` are counted in
the same unit.
"""
from __future__ import annotations

import contextlib
import copy
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn

from utils.log import LOGGER
from utils.torch_utils import de_parallel

ScheduleFn = Callable[..., float]
# window(start, end, total_steps, **params): the decay over the stretch (start, end] of the schedule's clock
WindowFn = Callable[..., float]


@dataclass(frozen=True)
class _Schedule:
    fn: ScheduleFn  # fn(decay, step, total_steps, **params): the decay of averaging step `step` (1, 2, ...)
    params: tuple[str, ...]  # names of the ModelEMA settings passed to fn (and window) as keywords
    window: WindowFn | None  # exact decay over a stretch; None: composed from fn step by step


_SCHEDULES: dict[str, _Schedule] = {}
_BUILTIN_SCHEDULES = ("ramp", "constant", "threshold", "exp", "power")
# ModelEMA settings a schedule may take (the bema_* ones are utils.bema.BEMA's)
SCHEDULE_PARAMS = ("tau", "beta", "gamma", "sigma_rel", "bema_power", "bema_lag", "bema_multiplier")
UNITS = ("steps", "images")

# The power-function EMA's relative width sqrt(g + 1) / ((g + 2) * sqrt(g + 3)) peaks where u = g + 1 solves
# u**2 + u - 1 = 0 (its log-derivative in u vanishes there): no power EMA is wider than this.
GAMMA_WIDEST = (math.sqrt(5.0) - 1.0) / 2.0 - 1.0  # -0.382

# Every view starts on a 64-byte boundary so vectorised and cuDNN kernels on the model see aligned weights.
_ALIGN_BYTES = 64

# C++ loop comparing tensors' addresses with recorded ones (what torch's CUDA-graph trees use); about half the
# cost of calling data_ptr() per tensor from Python, which matters on small models. Python loop if it goes away.
_C_PTRS_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)

# hyp-yaml keys understood by ModelEMA.from_hyp, with the constructor argument each one sets.
HYP_KEYS = {
    "ema_decay": "decay",
    "ema_tau": "tau",
    "ema_schedule": "schedule",
    "ema_beta": "beta",
    "ema_update_every": "update_every",
    "ema_update_after_step": "update_after_step",
    "ema_flat": "flat",
    "ema_gamma": "gamma",
    "ema_sigma_rel": "sigma_rel",
    "ema_unit": "unit",
}
# ema_* keys that ModelEMA leaves to others: Switch EMA (utils/switch_ema.py), the BatchNorm recompute
# (utils/bn_recompute.py) and the companion EMAs (utils/ema_companions.py), read by the training loop, and BEMA's
# (utils/bema.py, a ModelEMA subclass).
BEMA_HYP_KEYS = ("ema_bema", "ema_bema_power", "ema_bema_bias_power", "ema_bema_lag", "ema_bema_multiplier")
OTHER_HYP_KEYS = ("ema_switch", "ema_bn_recompute", "ema_companion_taus", *BEMA_HYP_KEYS)
DEFAULT_NBS = 64  # YOLOv5's nominal batch, when the hyp dict has no 'nbs'


def power_sigma_rel(gamma: float) -> float:
    """Relative width (standard deviation over length) of the power-function EMA profile with exponent gamma:
    ``sqrt(gamma + 1) / ((gamma + 2) * sqrt(gamma + 3))`` (Karras et al. 2023, EDM2)."""
    gamma = float(gamma)
    if not gamma > -1.0 or not math.isfinite(gamma):
        raise ValueError(f"power EMA gamma must be a finite number above -1, got {gamma}")
    return math.sqrt(gamma + 1.0) / ((gamma + 2.0) * math.sqrt(gamma + 3.0))


SIGMA_REL_MAX = power_sigma_rel(GAMMA_WIDEST)  # 0.3003


def power_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power EMA with relative width sigma_rel: the root of
    ``power_sigma_rel(gamma) = sigma_rel`` above -0.382 (below it the width shrinks again toward gamma = -1).
    sigma_rel wider than any power EMA reaches (SIGMA_REL_MAX, 0.3003) is refused."""
    s = float(sigma_rel)
    if not 0.0 < s <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel {sigma_rel} is outside (0, {SIGMA_REL_MAX:.4f}]: no power-function EMA has "
                         "that relative width")
    # power_sigma_rel falls monotonically from SIGMA_REL_MAX to 0 on [GAMMA_WIDEST, inf); it is below s at
    # gamma = 1 / s (about 1 / gamma there), so bisect between the two.
    lo, hi = GAMMA_WIDEST, max(1.0 / s, 1.0)
    while hi - lo > 1e-13 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if power_sigma_rel(mid) > s else (lo, mid)
    return 0.5 * (lo + hi)


def register_schedule(name: str, fn: ScheduleFn, params: tuple[str, ...] = (), overwrite: bool = False,
                      window: WindowFn | None = None) -> None:
    """Make ``fn(decay, step, total_steps) -> float`` selectable as ``ModelEMA(schedule=name)`` or in the hyp yaml.

    ``step`` counts averaging steps in the EMA's unit (1 on the first averaged step); ``total_steps`` is
    what the EMA was given (may be None). ``params`` names further ModelEMA settings passed as keywords
    (``'tau'``, ``'beta'``, ``'gamma'``, ``'sigma_rel'``), as the built-in ``ramp``, ``exp`` and ``power`` use.
    ``window(start, end, total_steps, **params)``, optional, is the exact decay over the stretch ``(start, end]``
    (used by ``update_every`` and ``unit='images'``); it must equal the product of ``fn`` over the steps of an
    integer stretch. Without it the stretch's decay is composed from ``fn`` (see the module docstring).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"schedule name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"schedule {name!r}: {fn!r} is not callable")
    if name in _SCHEDULES and not overwrite:
        raise ValueError(f"EMA schedule {name!r} is already registered (pass overwrite=True to replace it)")
    if name in _BUILTIN_SCHEDULES and name in _SCHEDULES and _SCHEDULES[name].fn is not fn:
        raise ValueError(f"EMA schedule {name!r} is built in and cannot be replaced")
    if window is not None and not callable(window):
        raise TypeError(f"schedule {name!r}: window {window!r} is not callable")
    unknown = set(params) - set(SCHEDULE_PARAMS)
    if unknown:
        raise ValueError(f"schedule {name!r}: unknown params {sorted(unknown)}; a schedule can take "
                         f"{', '.join(map(repr, SCHEDULE_PARAMS))}")
    _SCHEDULES[name] = _Schedule(fn, tuple(params), window)


def available_schedules() -> list[str]:
    return sorted(_SCHEDULES)


def schedule_params(name: str) -> tuple[str, ...]:
    """The ModelEMA settings (of SCHEDULE_PARAMS) the registered schedule `name` uses; () for an unknown name."""
    entry = _SCHEDULES.get(name)
    return entry.params if entry is not None else ()


def _ramp(decay: float, step: int, total_steps: int | None, tau: float) -> float:
    # YOLOv5's warm-up: the average forgets its random start quickly, then settles at `decay`.
    return decay * (1.0 - math.exp(-step / tau))


def _constant(decay: float, step: int, total_steps: int | None) -> float:
    return decay


def _threshold(decay: float, step: int, total_steps: int | None) -> float:
    # TensorFlow's ExponentialMovingAverage(num_updates=...) rule.
    return min(decay, (1.0 + step) / (10.0 + step))


def _exp(decay: float, step: int, total_steps: int | None, beta: float) -> float:
    # Ramp measured in fractions of the run, so its shape does not depend on the dataset size.
    if not total_steps or total_steps <= 0:
        raise ValueError("EMA schedule 'exp' needs total_steps (the run's length on the EMA's clock: optimizer "
                         "steps, or nominal batches with unit 'images')")
    return decay * (1.0 - math.exp(-beta * step / total_steps))


def _power(decay: float, step: int, total_steps: int | None, gamma: float) -> float:
    # EDM2's power-function EMA: the average of steps 1..t weighted as t**gamma, whatever decay says.
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def _power_window(start: float, end: float, total_steps: int | None, gamma: float) -> float:
    # The per-step decays (1 - 1/s)**(gamma + 1) telescope: their product over s in (a, b] is (a / b)**(gamma + 1).
    return 0.0 if start <= 0.0 else (start / end) ** (gamma + 1.0)


register_schedule("ramp", _ramp, params=("tau",))
register_schedule("constant", _constant)
register_schedule("threshold", _threshold)
register_schedule("exp", _exp, params=("beta",))
register_schedule("power", _power, params=("gamma",), window=_power_window)


def copy_attr(a: object, b: object, include: tuple | list = (), exclude: tuple | list = ()) -> None:
    """Copy b's public attributes onto a: only those in ``include`` when it is given, never those in ``exclude``."""
    for key, value in vars(b).items():
        if (include and key not in include) or key.startswith("_") or key in exclude:
            continue
        setattr(a, key, value)


@dataclass
class _Entry:
    """One distinct tensor of a module's state dict and every (dict, key) slot that holds it."""

    name: str
    tensor: torch.Tensor
    is_param: bool
    slots: list[tuple[dict, str]] = field(default_factory=list)


def _scan(module: nn.Module) -> list[_Entry]:
    """Parameters and persistent buffers in state-dict order, shared tensors once."""
    entries: dict[int, _Entry] = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for store, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for key, t in store.items():
                if t is None or (not is_param and key in mod._non_persistent_buffers_set):
                    continue
                entry = entries.get(id(t))
                if entry is None:
                    entry = entries[id(t)] = _Entry(dot + key, t, is_param)
                if not any(d is store and k == key for d, k in entry.slots):
                    entry.slots.append((store, key))
    return list(entries.values())


def _is_dense(t: torch.Tensor) -> bool:
    """True when t covers exactly numel() consecutive elements in some dimension order (contiguous,
    channels_last, any permutation): then a same-strided view into a flat buffer can replace it."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _put(entry: _Entry, new: torch.Tensor) -> None:
    """Make every slot of entry use `new`; a parameter keeps its identity so optimizers and hooks still see it."""
    if entry.is_param:
        entry.tensor.data = new
    else:
        for store, key in entry.slots:
            store[key] = new
        entry.tensor = new


@dataclass
class _Group:
    """Model tensors of one (device, dtype) laid out in `model_flat`; the EMA's copy in `ema_flat`."""

    model_flat: torch.Tensor
    ema_flat: torch.Tensor
    is_float: bool
    same_dtype: bool  # model_flat already FP32: no cast in the update


def _layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Aligned start offsets (in elements) and the total length of a flat buffer holding these tensors."""
    align = max(1, _ALIGN_BYTES // tensors[0].element_size())
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() // align) * align
    return offsets, total


def _existing_flat(tensors: list[torch.Tensor], offsets: list[int], total: int) -> torch.Tensor | None:
    """The flat buffer these tensors already live in with exactly this layout (a second ModelEMA on the same
    model, or one re-attached), so it is shared rather than rebuilt."""
    storage = tensors[0].untyped_storage()
    if storage.nbytes() != total * tensors[0].element_size():
        return None
    for t, off in zip(tensors, offsets):
        if t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != off:
            return None
    return torch.empty(0, dtype=tensors[0].dtype, device=tensors[0].device).set_(storage, 0, (total,), (1,))


def host_copies(state_dict: dict) -> dict:
    """Detached copies of a state dict's tensors on the CPU, in the standard layout: what a checkpoint stores.
    Copied straight from the device (one transfer per tensor), not cloned there first: a state dict built for
    saving would otherwise take the model's size again in GPU memory while it is written."""
    return {k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for k, v in state_dict.items()}


def shadow_copy(model: nn.Module) -> nn.Module:
    """An FP32, eval-mode copy of the model (wrappers looked through) without gradients: what an EMA holds."""
    shadow = copy.deepcopy(de_parallel(model)).float().eval()
    for p in shadow.parameters():
        p.requires_grad_(False)
        p.grad = None
    return shadow


class EMAStorage:
    """Where an EMA keeps its values: the tensors of ``shadow`` (the EMA's module), paired with the model's by
    registration order, and the two operations an average needs, ``copy_`` and ``lerp_``, from the model.

    Flat path (default): the model's floating-point tensors are moved into one buffer per (device, dtype) and the
    shadow's into a second buffer of the same layout (FP32), so each operation is one kernel per buffer. Foreach
    path: per-tensor lists for ``torch._foreach_lerp_``, used with ``flat=False``, for tensors that cannot be
    views into one buffer, and after the model's tensors were replaced (see the module docstring). Integer
    buffers are copied by both operations. Several storages on one model share its flat buffer.
    """

    def __init__(self, shadow: nn.Module, model: nn.Module, flat: bool = True):
        self.shadow = shadow
        self.flat = bool(flat)
        self.path = "foreach"
        self._bind(de_parallel(model), self.flat, "flat=False")

    # ---------------------------------------------------------------- the operations
    def copy_(self) -> None:
        """shadow = model, every tensor."""
        if self.path == "flat":
            for g in self.groups:
                g.ema_flat.copy_(g.model_flat)
        else:
            torch._foreach_copy_(self._lerp_ema + self._cast_ema, self._lerp_model + self._cast_model)
            self.copy_integers()

    def lerp_(self, weight: float) -> None:
        """shadow += weight * (model - shadow) for the floating-point tensors; integer buffers copied."""
        if self.path == "flat":
            for g in self.groups:
                if g.is_float:
                    g.ema_flat.lerp_(g.model_flat if g.same_dtype else g.model_flat.float(), weight)
                else:
                    g.ema_flat.copy_(g.model_flat)
        else:
            if self._lerp_ema:
                torch._foreach_lerp_(self._lerp_ema, self._lerp_model, weight)
            if self._cast_ema:
                converted = [m.to(e.device, torch.float32) for e, m in zip(self._cast_ema, self._cast_model)]
                torch._foreach_lerp_(self._cast_ema, converted, weight)
            self.copy_integers()

    def float_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(shadow's floating-point tensors, the model's as FP32 on the same devices), in the same order: the
        whole buffers on the flat path. Storages of one model list them alike, for averages that combine them."""
        if self.path == "flat":
            floats = [g for g in self.groups if g.is_float]
            return [g.ema_flat for g in floats], [g.model_flat if g.same_dtype else g.model_flat.float()
                                                   for g in floats]
        converted = [m.to(e.device, torch.float32) for e, m in zip(self._cast_ema, self._cast_model)]
        return self._lerp_ema + self._cast_ema, self._lerp_model + converted

    def copy_integers(self) -> None:
        """shadow = model for the integer buffers only (num_batches_tracked)."""
        if self.path == "flat":
            for g in self.groups:
                if not g.is_float:
                    g.ema_flat.copy_(g.model_flat)
        elif self._copy_ema:
            torch._foreach_copy_(self._copy_ema, self._copy_model)

    def model_is_finite(self) -> bool:
        if self.path == "flat":
            checks = [torch.isfinite(g.model_flat).all() for g in self.groups if g.is_float]
        else:
            checks = [torch.isfinite(t).all() for t in self._lerp_model + self._cast_model]
        return bool(torch.stack([c.cpu() for c in checks]).all()) if checks else True

    # ---------------------------------------------------------------- pairing model and shadow tensors
    def attach(self, model: nn.Module, flat: bool | None = None) -> None:
        """Pair with ``model``'s current tensors; with ``flat`` (default: the constructor's choice) move them into
        flat buffers. The shadow's values are kept."""
        flat = self.flat if flat is None else bool(flat)
        self._bind(de_parallel(model), flat, "flat=False")

    def follow(self, model: nn.Module) -> None:
        """Before an operation: make sure the pairing is with ``model`` (wrappers looked through) and its current
        tensors, re-binding (and saying so) when they or the shadow's were replaced."""
        bound = self._model_ref()
        if model is bound or model is self._outer_ref():  # the usual call: skip unwrapping
            model = bound
        else:
            outer, model = model, de_parallel(model)
            if model is bound:
                self._outer_ref = weakref.ref(outer)
        if self._model_changed(model) or self._shadow_replaced():
            self._repair(model)

    def paired_entries(self, model: nn.Module) -> tuple[list[_Entry], list[_Entry]]:
        """(model's entries, shadow's entries), paired by order; RuntimeError for another architecture."""
        model_entries, ema_entries = _scan(model), _scan(self.shadow)
        if len(model_entries) != len(ema_entries):
            raise RuntimeError(f"model has {len(model_entries)} parameters/buffers but the EMA has {len(ema_entries)}: "
                               "not the architecture this ModelEMA was built from")
        for m, e in zip(model_entries, ema_entries):
            if m.tensor.shape != e.tensor.shape:
                raise RuntimeError(f"model tensor {m.name} {tuple(m.tensor.shape)} does not match EMA tensor "
                                   f"{e.name} {tuple(e.tensor.shape)}: not the architecture this ModelEMA was "
                                   "built from")
        return model_entries, ema_entries

    def _bind(self, model: nn.Module, flat: bool, reason: str) -> None:
        model_entries, ema_entries = self.paired_entries(model)
        if flat:
            reason = self._unflattenable(model_entries)
        if reason is None:
            self._flatten(model_entries, ema_entries)
            self.path = "flat"
            n = sum(g.model_flat.numel() for g in self.groups)
            LOGGER.info(f"ModelEMA: flat path, {len(model_entries)} tensors in {len(self.groups)} buffer(s) "
                        f"of {n:,} values")
            self._cache_lists([], [])
        else:
            self.groups = []
            self.path = "foreach"
            self._cache_lists(model_entries, ema_entries)
            LOGGER.info(f"ModelEMA: per-tensor foreach path ({reason})")
        self._model_ref = self._outer_ref = weakref.ref(model)
        self._slots = [slot for e in model_entries for slot in e.slots]
        self._ptrs = [store[key].data_ptr() for store, key in self._slots]
        self._ptr_indices = list(range(len(self._ptrs)))
        # One shadow tensor watched: what replaces the shadow's tensors (.half(), .to(), assign=True) replaces them all.
        self._shadow_probe = ema_entries[0].slots[0] if ema_entries else None
        self._shadow_probe_ptr = ema_entries[0].tensor.data_ptr() if ema_entries else 0

    @staticmethod
    def _unflattenable(entries: list[_Entry]) -> str | None:
        for e in entries:
            t = e.tensor
            if type(t) not in (torch.Tensor, nn.Parameter) or t.layout != torch.strided or t.is_quantized:
                return f"{e.name} is a {type(t).__name__} with layout {t.layout}"
            if not _is_dense(t):
                return f"{e.name} has overlapping or gapped strides {t.stride()}"
        return None

    def _flatten(self, model_entries: list[_Entry], ema_entries: list[_Entry]) -> None:
        by_key: dict[tuple, list[int]] = {}
        for i, e in enumerate(model_entries):
            by_key.setdefault((e.tensor.device, e.tensor.dtype), []).append(i)
        self.groups = []
        with torch.no_grad():
            for (device, dtype), idx in by_key.items():
                tensors = [model_entries[i].tensor for i in idx]
                offsets, total = _layout(tensors)
                model_flat = _existing_flat(tensors, offsets, total)
                if model_flat is None:
                    # zeros: the alignment gaps then stay 0 in both buffers and the lerp leaves them alone
                    model_flat = torch.zeros(total, dtype=dtype, device=device)
                    for i, off in zip(idx, offsets):
                        t = model_entries[i].tensor
                        view = model_flat.as_strided(t.shape, t.stride(), off)
                        view.copy_(t)
                        _put(model_entries[i], view)
                is_float = dtype.is_floating_point
                ema_dtype = torch.float32 if is_float else dtype
                ema_flat = torch.zeros(total, dtype=ema_dtype, device=device)
                for i, off in zip(idx, offsets):
                    t = model_entries[i].tensor
                    view = ema_flat.as_strided(t.shape, t.stride(), off)
                    view.copy_(ema_entries[i].tensor)
                    _put(ema_entries[i], view)
                self.groups.append(_Group(model_flat, ema_flat, is_float, dtype == torch.float32))

    def _cache_lists(self, model_entries: list[_Entry], ema_entries: list[_Entry]) -> None:
        """Per-tensor lists for the foreach path, split by whether the update needs a cast or a device move."""
        self._lerp_ema, self._lerp_model = [], []
        self._cast_ema, self._cast_model = [], []
        self._copy_ema, self._copy_model = [], []
        for m, e in zip(model_entries, ema_entries):
            mt, et = m.tensor.detach(), e.tensor.detach()
            if not et.is_floating_point():
                self._copy_ema.append(et)
                self._copy_model.append(mt)
            elif mt.dtype == et.dtype and mt.device == et.device:
                self._lerp_ema.append(et)
                self._lerp_model.append(mt)
            else:
                self._cast_ema.append(et)
                self._cast_model.append(mt)

    def _model_changed(self, model: nn.Module) -> bool:
        """Cheap per-update check that the lists/views still are the model's tensors: same module, and every
        slot still holds a tensor at the recorded address (replacement or `.data =` both move it)."""
        if model is not self._model_ref():
            return True
        try:
            current = [store[key] for store, key in self._slots]
            if _C_PTRS_EQUAL is not None:
                return not _C_PTRS_EQUAL(current, self._ptrs, self._ptr_indices)
            return [t.data_ptr() for t in current] != self._ptrs
        except (KeyError, AttributeError, TypeError, RuntimeError):  # a slot was removed or set to None
            return True

    def _shadow_replaced(self) -> bool:
        """Whether the shadow module's own tensors were replaced, leaving the buffers updated here orphaned."""
        if self._shadow_probe is None:
            return False
        store, key = self._shadow_probe
        t = store.get(key)
        return t is None or t.data_ptr() != self._shadow_probe_ptr

    @staticmethod
    def _devices(module: nn.Module) -> set[torch.device]:
        return {e.tensor.device for e in _scan(module)}

    def _model_moved(self, model: nn.Module) -> torch.device | None:
        """The one device the model's tensors are all on, when the shadow's are elsewhere; else None."""
        model_devices = self._devices(model)
        if len(model_devices) != 1 or model_devices == self._devices(self.shadow):
            return None
        return next(iter(model_devices))

    def _repair(self, model: nn.Module) -> None:
        if self._shadow_replaced():
            LOGGER.warning("ModelEMA: ema.ema's tensors were replaced (.half(), .to() or load_state_dict(assign=True) "
                           "on the EMA module); the average goes on in FP32 from their current values. Convert a "
                           "copy of ema.ema instead.")
            self.shadow.float()
            if not self._model_changed(model):
                self._bind(model, self.path == "flat", "flat=False")
                return
        moved_to = self._model_moved(model)
        if moved_to is not None:
            # An EMA built before model.to(device): averaging across devices would cost one blocking transfer per
            # tensor per update and validate the EMA on the old device; the EMA follows the model instead.
            LOGGER.warning(f"ModelEMA: the model is on {moved_to} but the EMA on "
                           f"{', '.join(sorted(map(str, self._devices(self.shadow))))} (built before the model was "
                           f"moved); moving the EMA to {moved_to}, its values kept")
            self.shadow.to(moved_to)
            self._bind(model, self.flat, "flat=False")
            return
        was = self.path
        self._bind(model, False, "the model's tensors were replaced")
        if was == "flat":
            LOGGER.warning("ModelEMA: the model's tensors were replaced after the EMA was built (.to(), .half(), "
                           "memory format, load_state_dict(assign=True)...); using the slower per-tensor foreach "
                           "path from now on. Call ema.attach(model) to flatten again.")


class ModelEMA:
    """Exponential moving average of a model's state dict, FP32, updated with one fused ``lerp_``.

    ``ema = d * ema + (1 - d) * model`` for every floating-point parameter and persistent buffer (BatchNorm
    statistics included); integer buffers (``num_batches_tracked``) are copied. ``d`` comes from the
    schedule: ``ramp`` (default, ``decay * (1 - exp(-step / tau))``), ``constant``, ``threshold``
    (``min(decay, (1 + step) / (10 + step))``), ``exp`` (``decay * (1 - exp(-beta * step / total_steps))``),
    ``power`` (``(1 - 1 / step) ** (gamma + 1)``: EDM2's power-function EMA, the average of everything so far
    weighted as ``t ** gamma``; ``decay`` is not used) or a function added with :func:`register_schedule`.

    Args:
        model: the model being trained (DDP/DataParallel/torch.compile wrappers are looked through).
        decay, tau: the ramp's final decay and time constant (in the unit's steps).
        updates: optimizer steps already counted (resume).
        schedule, beta, total_steps: schedule name and the settings some schedules need.
        gamma, sigma_rel: the power schedule's exponent, or its relative width (one of the two; sigma_rel is
            converted with :func:`power_gamma` and may not exceed SIGMA_REL_MAX, 0.3003).
        update_every: average only every k-th call; the decay over the k steps is compounded (``d ** k`` for a
            constant schedule, ``(1 - k / t) ** (gamma + 1)`` for ``power``) so the averaging horizon in optimizer
            steps does not change.
        update_after_step: copy the weights instead of averaging for the first n steps.
        flat: move the model's tensors into one flat buffer (default) so an update is a single kernel;
            ``False`` keeps the model untouched and uses per-tensor ``torch._foreach_lerp_``.
        unit, nbs: the schedule's clock: ``'steps'`` (optimizer steps, default) or ``'images'`` (nominal batches
            of ``nbs`` images; every update then says ``images=B``). See the module docstring.
        images: images already counted (resume with ``unit='images'``); default ``updates * nbs``.

    Attributes: ``ema`` (the averaged nn.Module, eval mode, FP32, no gradients), ``storage`` (the EMAStorage
    holding ``ema``'s values and pairing them with the model's), ``updates``, ``skipped`` (updates refused by
    ``check_finite``), ``path`` ('flat' or 'foreach'), ``images`` (images counted),
    ``sigma_rel`` (relative width of the power profile with exponent ``gamma``; None without gamma).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        tau: float = 2000,
        updates: int = 0,
        schedule: str = "ramp",
        beta: float = 15.0,
        total_steps: int | None = None,
        update_every: int = 1,
        update_after_step: int = 0,
        flat: bool = True,
        gamma: float | None = None,
        sigma_rel: float | None = None,
        unit: str = "steps",
        nbs: float = DEFAULT_NBS,
        images: float | None = None,
    ):
        self.decay = float(decay)
        self.tau = float(tau)
        self.schedule = schedule
        self.beta = float(beta)
        if gamma is not None and sigma_rel is not None:
            raise ValueError(f"EMA: give gamma ({gamma}) or sigma_rel ({sigma_rel}), not both")
        self.gamma = None if gamma is None else float(gamma)
        if sigma_rel is not None:
            self.gamma = power_gamma(sigma_rel)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.update_every = int(update_every)
        self.update_after_step = int(update_after_step)
        self.unit = unit
        self.nbs = float(nbs)
        self.updates = int(updates)
        self.skipped = 0
        self.flat = bool(flat)
        self._check_settings()
        self.images = float(self.updates * self.nbs if images is None else images)
        self.pending_images = 0.0  # images of the calls since the last averaging (update_every > 1)

        self.ema = shadow_copy(model)
        self.storage = EMAStorage(self.ema, model, self.flat)

    @classmethod
    def from_hyp(cls, model: nn.Module, hyp: dict, updates: int = 0, total_steps: int | None = None, **kwargs):
        """Build from a hyp dict: ``ema_decay, ema_tau, ema_schedule, ema_beta, ema_gamma, ema_sigma_rel,
        ema_update_every, ema_update_after_step, ema_flat, ema_unit`` and ``nbs`` (all optional; keyword
        arguments win). With ``ema_unit: images``, ``total_steps`` counts nominal batches."""
        known = [*HYP_KEYS, *OTHER_HYP_KEYS]
        unknown = sorted(k for k in hyp if str(k).startswith("ema_") and k not in known)
        if unknown:
            raise ValueError(f"unknown EMA hyperparameter(s) {unknown}; known: {sorted(known)}")
        if hyp.get("ema_bema") is True and cls is ModelEMA:
            raise ValueError("hyp ema_bema: true asks for a bias-corrected EMA: build it with utils.bema.ema_from_hyp")
        settings = {arg: hyp[key] for key, arg in HYP_KEYS.items() if key in hyp}
        settings["nbs"] = hyp.get("nbs", DEFAULT_NBS)
        settings.update(kwargs)
        return cls(model, updates=updates, total_steps=total_steps, **settings)

    @property
    def sigma_rel(self) -> float | None:
        """Relative width of the power-function profile with exponent ``gamma`` (None when gamma is not set)."""
        return None if self.gamma is None else power_sigma_rel(self.gamma)

    # ---------------------------------------------------------------- settings and the decay schedule
    def _check_settings(self) -> None:
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"unknown EMA schedule {self.schedule!r}; available: {available_schedules()}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {self.decay}")
        if self.tau <= 0:
            raise ValueError(f"EMA tau must be positive, got {self.tau}")
        if self.update_every < 1:
            raise ValueError(f"EMA update_every must be >= 1, got {self.update_every}")
        if self.update_after_step < 0:
            raise ValueError(f"EMA update_after_step must be >= 0, got {self.update_after_step}")
        if self.schedule == "exp" and not self.total_steps:
            length = f"nominal batches of {self.nbs:g} images" if self.unit == "images" else "optimizer steps"
            raise ValueError(f"EMA schedule 'exp' needs total_steps (the run's length in {length})")
        if self.gamma is not None:
            power_sigma_rel(self.gamma)  # refuses gamma <= -1
        if self.gamma is None and {"gamma", "sigma_rel"} & set(_SCHEDULES[self.schedule].params):
            raise ValueError(f"EMA schedule {self.schedule!r} needs gamma or sigma_rel (hyp: ema_gamma or "
                             "ema_sigma_rel, e.g. ema_sigma_rel: 0.1)")
        if self.unit not in UNITS:
            raise ValueError(f"EMA unit must be one of {UNITS}, got {self.unit!r}")
        if not self.nbs > 0 or not math.isfinite(self.nbs):
            raise ValueError(f"EMA nbs (nominal batch size) must be positive, got {self.nbs}")

    def decay_at(self, step: int) -> float:
        """The schedule's decay at averaging step ``step`` (1 = first averaged step); 0 before that (a copy)."""
        if step <= 0:
            return 0.0
        entry = _SCHEDULES[self.schedule]
        d = float(entry.fn(self.decay, step, self.total_steps, **{p: getattr(self, p) for p in entry.params}))
        if not 0.0 <= d <= 1.0:  # also rejects NaN
            raise ValueError(f"EMA schedule {self.schedule!r} returned decay {d} at step {step}; must be in [0, 1]")
        return d

    def decay_over(self, start: float, end: float) -> float:
        """The decay of one averaging that stands for the stretch ``(start, end]`` of the schedule's clock
        (averaging steps or nominal batches): the schedule's exact window if it has one, else the product of
        ``decay_at(n) ** f`` over the steps ``(n - 1, n]`` the stretch overlaps by the fraction ``f``. Averaging
        once with it equals averaging at every step of the stretch while the model stays put."""
        entry = _SCHEDULES[self.schedule]
        if entry.window is not None:
            d = float(entry.window(start, end, self.total_steps, **{p: getattr(self, p) for p in entry.params}))
            if not 0.0 <= d <= 1.0:
                raise ValueError(f"EMA schedule {self.schedule!r} returned decay {d} over ({start}, {end}]; "
                                 "must be in [0, 1]")
            return d
        d = 1.0
        n = math.floor(start) + 1
        while n - 1 < end:
            overlap = min(end, n) - max(start, n - 1)
            if overlap > 0:
                dn = self.decay_at(n)
                d *= dn if overlap == 1 else dn ** overlap
            n += 1
        return d

    def _window_decay(self, step: int) -> float:
        # Averaging once for the last k steps with the product of their decays equals averaging at each of
        # them while the model stays put: the horizon in optimizer steps is that of update_every=1.
        return self.decay_over(step - self.update_every, step)

    # ---------------------------------------------------------------- the update
    def update(self, model: nn.Module, check_finite: bool = False, images: float | None = None) -> bool:
        """Count one optimizer step and fold ``model`` into the average. Returns whether the EMA changed.

        With ``check_finite`` a model holding NaN/inf is not averaged in: the step is not counted and
        ``skipped`` goes up, so one bad step cannot poison the average (it costs one read of the model).
        ``images``: the images this step's gradient covered (over all processes); required with
        ``unit='images'``, ignored with ``'steps'``.
        """
        # No torch.no_grad() needed: every tensor written or read here is a detached alias or a plain buffer,
        # and on small models each Python-level step of this function shows in the timings.
        images = self._count(images)
        if self.updates % self.update_every:
            return False
        self.storage.follow(model)
        if check_finite and not self.storage.model_is_finite():
            self._uncount(images)
            LOGGER.warning(f"ModelEMA: model has non-finite values; update skipped ({self.skipped} so far)")
            return False
        self._average_in(model, self._decay_since_last_average())
        return True

    def _average_in(self, model: nn.Module, d: float) -> None:
        """ema = d * ema + (1 - d) * model; d = 0 is a copy."""
        if d == 0.0:
            self.storage.copy_()
        else:
            self.storage.lerp_(1.0 - d)

    def _count(self, images: float | None) -> float | None:
        """Count the step (and with unit 'images' its images, which it then returns as a float)."""
        if self.unit == "images":
            if images is None or not images > 0:
                raise ValueError(f"ModelEMA with unit 'images' needs update(model, images=B) with B > 0, got {images}")
            images = float(images)
            self.images += images
            self.pending_images += images
        self.updates += 1
        return images

    def _uncount(self, images: float | None) -> None:
        """Take back what _count counted, for a step refused by check_finite."""
        self.updates -= 1
        self.skipped += 1
        if self.unit == "images":
            self.images -= images
            self.pending_images -= images

    def _decay_since_last_average(self) -> float:
        """The decay of this averaging: that of the schedule's stretch since the previous one (its clock's
        steps, or the nominal batches of the images counted since)."""
        if self.unit == "images":
            end = self.images / self.nbs - self.update_after_step
            d = self.decay_over(end - self.pending_images / self.nbs, end)
            self.pending_images = 0.0
            return d
        step = self.updates - self.update_after_step
        return self.decay_at(step) if self.update_every == 1 else self._window_decay(step)

    # ---------------------------------------------------------------- storage
    @property
    def path(self) -> str:
        """'flat' (one lerp_ per buffer) or 'foreach' (per-tensor lists): see EMAStorage."""
        return self.storage.path

    @property
    def _groups(self) -> list[_Group]:  # the flat buffers, which tests inspect
        return self.storage.groups

    def attach(self, model: nn.Module, flat: bool | None = None) -> None:
        """Pair the EMA with ``model``'s current tensors; with ``flat`` (default: the constructor's choice)
        move them into flat buffers. Call again after replacing the model's tensors to get the flat path
        back; the EMA's values are kept."""
        self.storage.attach(model, flat)

    def update_attr(self, model: nn.Module, include: tuple | list = ("yaml", "nc", "hyp", "names", "stride",
                                                                    "class_weights"),
                    exclude: tuple | list = ("process_group", "reducer")) -> None:
        """Copy the model's metadata attributes (class names, strides, hyp...) onto the EMA module."""
        copy_attr(self.ema, de_parallel(model), include, exclude)

    # ---------------------------------------------------------------- evaluation and checkpoints
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA's floating-point values into ``model`` in place (cast to the model's dtypes), so that
        training continues from them (Switch EMA); the model's integer buffers are left as they are."""
        model_entries, ema_entries = self.storage.paired_entries(de_parallel(model))
        with torch.no_grad():
            for m, e in zip(model_entries, ema_entries):
                if m.tensor.is_floating_point():
                    m.tensor.detach().copy_(e.tensor)

    @contextlib.contextmanager
    def apply_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into ``model`` (in place, so wrappers, optimizers and views stay
        valid); the model's own values come back on exit, also when the block raises."""
        target = de_parallel(model)
        model_entries, ema_entries = self.storage.paired_entries(target)
        with torch.no_grad():
            saved = [m.tensor.detach().clone() for m in model_entries]
            for m, e in zip(model_entries, ema_entries):
                m.tensor.detach().copy_(e.tensor)
        try:
            yield model
        finally:
            with torch.no_grad():
                for m, s in zip(model_entries, saved):
                    m.tensor.detach().copy_(s)

    def state_dict(self, weights: bool = True) -> dict:
        """EMA weights (an FP32 state dict of ``ema``, detached copies on the CPU), counters and schedule settings:
        plain values only, so it loads with ``torch.load(weights_only=True)``. With ``weights=False`` the
        'ema' entry is left out, for a caller that stores ``ema.ema``'s weights its own way (train.py packs them)."""
        state = {"ema": host_copies(self.ema.state_dict())} if weights else {}
        return state | {
            "updates": self.updates,
            "skipped": self.skipped,
            "decay": self.decay,
            "tau": self.tau,
            "schedule": self.schedule,
            "beta": self.beta,
            "total_steps": self.total_steps,
            "update_every": self.update_every,
            "update_after_step": self.update_after_step,
            "gamma": self.gamma,
            "sigma_rel": self.sigma_rel,  # for readers; loading restores gamma
            "unit": self.unit,
            "nbs": self.nbs,
            "images": self.images,
            "pending_images": self.pending_images,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved; the weights are copied into the existing (flat) tensors."""
        missing = [k for k in ("ema", "updates") if k not in state]
        if missing:
            raise KeyError(f"ModelEMA state is missing {missing}; got keys {sorted(state)}")
        settings = {k: state[k] for k in ("decay", "tau", "schedule", "beta", "total_steps", "update_every",
                                          "update_after_step", "gamma", "unit", "nbs") if k in state}
        if settings.get("schedule", self.schedule) not in _SCHEDULES:
            raise ValueError(f"checkpoint uses EMA schedule {settings['schedule']!r}, which is not registered here "
                             f"(available: {available_schedules()}); register_schedule() it before loading")
        # Everything is checked before the first value is copied: torch copies tensor by tensor and reports a
        # mismatch only at the end, so a refused state would otherwise leave the average half overwritten.
        self._check_weights(state["ema"])
        old = {k: getattr(self, k) for k in settings}
        for k, v in settings.items():
            setattr(self, k, v)
        try:
            self._check_settings()
        except ValueError:
            for k, v in old.items():
                setattr(self, k, v)
            raise
        self.ema.load_state_dict(state["ema"])  # in-place copies: the views into the EMA buffer stay
        self.updates = int(state["updates"])
        self.skipped = int(state.get("skipped", 0))
        self.images = float(state.get("images", self.updates * self.nbs))
        self.pending_images = float(state.get("pending_images", 0.0))

    def _check_weights(self, weights: dict) -> None:
        """One-line ValueError unless ``weights`` has exactly the EMA's tensor names and shapes."""
        own = self.ema.state_dict()
        if not isinstance(weights, dict):
            raise ValueError(f"ModelEMA state: 'ema' is a {type(weights).__name__}, not a state dict")
        missing, unexpected = [k for k in own if k not in weights], [k for k in weights if k not in own]
        if missing or unexpected:
            raise ValueError(f"ModelEMA state does not fit this model: {len(missing)} tensor(s) missing "
                             f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
        for k, v in own.items():
            shape = tuple(getattr(weights[k], "shape", ()))
            if shape != tuple(v.shape):
                raise ValueError(f"ModelEMA state does not fit this model: '{k}' is {shape} there but "
                                 f"{tuple(v.shape)} here")

    def __repr__(self) -> str:
        return (f"ModelEMA(path={self.path!r}, updates={self.updates}, skipped={self.skipped}, "
                f"schedule={self.schedule!r}, decay={self.decay}, tau={self.tau}, gamma={self.gamma}, "
                f"update_every={self.update_every}, update_after_step={self.update_after_step}, unit={self.unit!r}, "
                f"nbs={self.nbs})")


# What the start-of-run line names when YOLOv5's ramp will not have reached averaging by the end of a run; the
# figures are docs/ema_quality.md's (held-out digits, test mAP50-95 gain over the raw model, mean +/- sd over seeds).
SHORT_RUN_ALTERNATIVE = ("measured alternatives: --posthoc to choose the width after training (+0.033 +/- 0.005 test "
                         "mAP50-95 over the raw model in a 1,950-step run, 3 seeds, where tau 2000 gives -0.0006), or "
                         "'ema_tau' in the hyp file near a quarter of the planned steps (tau 500 there: +0.024 +/- "
                         "0.007; a tau whose ramp reaches the ceiling early averages in the early, worse models: tau "
                         "200 -0.074); docs/ema_quality.md")
AVERAGING_TAUS = 3  # a ramp that has run for 3 tau is at 1 - exp(-3) = 95% of its ceiling: it averages


def averaging_horizon(decay: float) -> float:
    """The number of steps an EMA of per-step decay d averages over, 1 / (1 - d): the sum of its weights' ages
    is d / (1 - d), and 63% of its weight lies on the last 1 / (1 - d) steps for d near 1. inf for d = 1."""
    return math.inf if decay >= 1.0 else 1.0 / (1.0 - decay)


def end_of_run_plan(ema: ModelEMA, epochs: int) -> list[str]:
    """Lines saying what the EMA will be at the end of a run of ``ema.total_steps`` steps on its clock over
    ``epochs`` epochs: its decay at the last step and the averaging horizon that means, in steps and epochs; and,
    when the ramp will not have run ``AVERAGING_TAUS`` time constants, the measured alternatives."""
    if not ema.total_steps or epochs <= 0:
        return []
    unit = "optimizer steps" if ema.unit == "steps" else f"nominal batches of {ema.nbs:g} images"
    averaged = ema.total_steps - ema.update_after_step
    d_end = ema.decay_at(averaged)
    horizon = averaging_horizon(d_end)
    per_epoch = ema.total_steps / epochs
    if math.isinf(horizon):
        reach = "all of them (decay 1)"
    else:
        reach = f"about the last {horizon:,.0f} {unit} ({horizon / per_epoch:,.2f} epochs)"
    settings = f"{ema.schedule} schedule, decay {ema.decay:g}"
    if ema.schedule == "ramp":
        settings += f", tau {ema.tau:g}"
    lines = [f"EMA: {settings}; at the last of the run's {ema.total_steps:,} {unit} its decay will be "
             f"{d_end:.4f}, averaging over {reach}"]
    if ema.schedule == "ramp" and averaged < AVERAGING_TAUS * ema.tau:
        share = 1.0 - math.exp(-max(averaged, 0) / ema.tau)
        lines.append(f"EMA: the ramp reaches only {share:.0%} of its ceiling in {max(averaged, 0):,} {unit} "
                     f"(under {AVERAGING_TAUS} x tau = {AVERAGING_TAUS * ema.tau:,.0f}), so the EMA ends close to "
                     f"the raw model; {SHORT_RUN_ALTERNATIVE}")
    return lines
