"""Import of checkpoints saved by the original YOLOv5 project, without running anything they pickle.

A YOLOv5 ``.pt`` file pickles whole ``nn.Module`` objects, a numpy ``best_fitness``, ``pathlib`` paths and an
``argparse.Namespace``, so ``torch.load(..., weights_only=True)`` refuses it. Here a restricted unpickler
resolves only the globals such a file needs: tensor storages and rebuild functions become tensors, numbers
and paths become plain values, and every known class (YOLOv5's layers, torch's modules) becomes an inert
placeholder that records its pickled state and runs nothing. Any other global stops the load. The tensors
are then collected by their state-dict names.

This module only reads a YOLOv5 file into plain data (``read_yolov5_checkpoint``); turning that into this
project's checkpoint format is ``utils.checkpoint``'s job (``load_checkpoint`` calls this module, never the
reverse). Errors are YOLOv5ImportError with a one-line message naming the file.
"""
from __future__ import annotations

import collections
import contextlib
import io
import math
import pathlib
import pickle
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn


class YOLOv5ImportError(Exception):
    """A YOLOv5 checkpoint that cannot be read, trusted or used; the message is one line."""


def one_line_error(e: BaseException) -> str:
    """The exception's type and the first line of its message, for quoting inside a one-line error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@dataclass
class YOLOv5Checkpoint:
    """What a YOLOv5 checkpoint holds, as plain data. ``model`` and ``ema`` are state dicts with the tensors
    as stored (dtype unchanged), or None where the file has no such entry; ``date`` is None when not stored."""

    model: dict[str, torch.Tensor] | None
    ema: dict[str, torch.Tensor] | None
    yaml: dict
    names: list[str]
    nc: int
    opt: dict
    hyp: dict
    epoch: int
    best_fitness: float
    updates: int
    date: str | None


# ----------------------------------------------------------------------- placeholders and the unpickler
class _Inert:
    """Stand-in for a pickled object of a known class: records what the pickle gives it, runs nothing."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        inst = object.__new__(cls)
        inst.args = args
        inst.state = None
        return inst

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    @property
    def attrs(self) -> dict:
        """The instance __dict__ as pickled (BUILD may also pass a (dict, slots) pair)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        return state if isinstance(state, dict) else {}


class _InertModule(_Inert):
    """Placeholder for an nn.Module subclass (YOLOv5's or torch's)."""


class _InertNamespace(_Inert):
    """Placeholder for argparse.Namespace (older YOLOv5 stored opt that way)."""


def _placeholder(base: type, qualname: str) -> type:
    # A fresh class per lookup is enough: a pickle names each class once and memoizes the reference.
    return type(qualname.rsplit(".", 1)[-1], (base,), {"qualname": qualname})


class _StorageKind:
    """What ``torch.FloatStorage`` and friends stand for in a persistent id: just a dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
_NN_MODULE_NAMES = {
    name for name in dir(nn) if isinstance(getattr(nn, name), type) and issubclass(getattr(nn, name), nn.Module)
}
_YOLOV5_MODULES = ("models.yolo", "models.common", "models.experimental")
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")


class _TensorMarker:
    """``torch.Tensor`` / ``torch.nn.Parameter`` as named inside ``_rebuild_from_type_v2``."""


class _NdarrayMarker:
    """``numpy.ndarray`` as named inside numpy's ``_reconstruct``."""


class _NumpyDtype(_Inert):
    """numpy.dtype(name, align, copy) + BUILD(state); resolved to a real dtype only for plain numbers."""

    @property
    def dtype(self) -> np.dtype:
        name = self.args[0] if self.args else None
        if not isinstance(name, str):
            raise YOLOv5ImportError(f"unsupported numpy dtype {name!r}")
        dtype = np.dtype(name)
        if dtype.kind not in "biufc":
            raise YOLOv5ImportError(f"unsupported numpy dtype {name!r}")
        order = self.state[1] if isinstance(self.state, tuple) and len(self.state) > 1 else "="
        return dtype.newbyteorder(order) if order in ("<", ">") else dtype


class _NumpyArray(_Inert):
    """numpy ``_reconstruct`` + BUILD(version, shape, dtype, fortran, bytes) -> a real array of numbers."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise YOLOv5ImportError("malformed numpy array in checkpoint")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _NumpyDtype) or not isinstance(raw, (bytes, bytearray)):
            raise YOLOv5ImportError("unsupported numpy array (object data) in checkpoint")
        dt = dtype.dtype
        self.array = np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order="F" if fortran else "C").copy()


def _numpy_reconstruct(cls, shape, typecode):
    if cls is not _NdarrayMarker:
        raise YOLOv5ImportError("numpy _reconstruct of something other than ndarray")
    return _NumpyArray()


def _numpy_scalar(dtype, raw=None):
    if not isinstance(dtype, _NumpyDtype) or not isinstance(raw, (bytes, bytearray)):
        raise YOLOv5ImportError("unsupported numpy scalar in checkpoint")
    return np.frombuffer(bytes(raw), dtype=dtype.dtype)[0]


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles spell ``bytes`` as _codecs.encode(str, 'latin1'); nothing else is let through.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise YOLOv5ImportError("unexpected _codecs.encode call in checkpoint")
    return text.encode("latin1")


def _pure_path(flavour):
    def build(*parts):
        if not all(isinstance(p, str) for p in parts):
            raise YOLOv5ImportError("malformed path in checkpoint")
        return str(flavour(*parts))

    return build


class _Storage:
    """A storage read from the archive: a flat tensor of its dtype."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise YOLOv5ImportError("tensor without storage in checkpoint")
    flat = storage.flat
    # A weight never overlaps itself; a crafted stride-0 view could make the clone below ask for terabytes.
    if math.prod(size) > flat.numel():
        raise YOLOv5ImportError("tensor larger than its storage in checkpoint")
    # as_strided refuses negative offsets and strides and any view that reaches past the storage.
    return flat.as_strided(tuple(size), tuple(stride), offset).clone()


def _rebuild_tensor_v1(storage, offset, size, stride):
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise YOLOv5ImportError("parameter without tensor in checkpoint")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if new_type is not _TensorMarker or func not in (_rebuild_tensor, _rebuild_parameter):
        raise YOLOv5ImportError("unsupported tensor type in checkpoint")
    return func(*args)


def _set(items=()):
    return set(items)


def _frozenset(items=()):
    return frozenset(items)


class _RefusedGlobal(YOLOv5ImportError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.global_name = f"{module}.{name}"


# Globals a YOLOv5 checkpoint's pickle may name, each mapped to inert data or to a function of this module.
_FIXED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_v1,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorMarker,
    ("torch.nn.parameter", "Parameter"): _TensorMarker,
    ("torch", "Size"): tuple,
    ("torch", "device"): torch.device,
    ("numpy", "ndarray"): _NdarrayMarker,
    ("numpy", "dtype"): _NumpyDtype,
    ("argparse", "Namespace"): _InertNamespace,
    ("pathlib", "PosixPath"): _pure_path(pathlib.PurePosixPath),
    ("pathlib", "PurePosixPath"): _pure_path(pathlib.PurePosixPath),
    ("pathlib", "WindowsPath"): _pure_path(pathlib.PureWindowsPath),
    ("pathlib", "PureWindowsPath"): _pure_path(pathlib.PureWindowsPath),
    ("pathlib", "Path"): _pure_path(pathlib.PurePosixPath),
}


def _resolve_global(module: str, name: str):
    """What a global named in a YOLOv5 pickle stands for here, or None when it is not allowed."""
    if module == "__builtin__":  # protocol-2 pickles use Python 2's name; find_class sees it raw
        module = "builtins"
    fixed = _FIXED_GLOBALS.get((module, name))
    if fixed is not None:
        return fixed
    if module in _NUMPY_CORE and name == "_reconstruct":
        return _numpy_reconstruct
    if module in _NUMPY_CORE and name == "scalar":
        return _numpy_scalar
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
        return _StorageKind(_STORAGE_DTYPES[name])
    if module == "torch" and name in _DTYPE_NAMES:
        return getattr(torch, name)
    if module in _YOLOV5_MODULES and name.isidentifier():
        return _placeholder(_InertModule, f"{module}.{name}")
    if (module == "torch.nn" or module.startswith("torch.nn.modules.")) and name in _NN_MODULE_NAMES:
        return _placeholder(_InertModule, f"{module}.{name}")
    return None


def first_refused_global(path: str | Path) -> str | None:
    """First global named by a plain (non-zip) pickle file that this importer would not accept, as
    ``module.name``, or None. The opcodes are only parsed, never run, so a refused file can be described
    without loading it (torch's own refusal text cannot be quoted: it invites weights_only=False)."""
    stream = io.BytesIO(Path(path).read_bytes())
    with contextlib.suppress(Exception):
        for _ in range(4):  # torch's legacy format is several pickles in a row; the data is the fourth
            pushed: list[str | None] = []  # strings pushed by the last opcodes (None: something else)
            for opcode, arg, _ in pickletools.genops(stream):
                names = None
                if opcode.name in ("GLOBAL", "INST"):
                    names = arg.split(" ", 1)
                elif opcode.name == "STACK_GLOBAL" and len(pushed) >= 2 and None not in pushed[-2:]:
                    names = pushed[-2:]  # a name fetched from the memo is not followed: better none than wrong
                if names and _resolve_global(*names) is None:
                    return ".".join(names)
                if opcode.name != "MEMOIZE":
                    pushed = (pushed + [arg if "UNICODE" in opcode.name else None])[-2:]
    return None


class _YOLOv5Unpickler(pickle.Unpickler):
    """Resolves only the globals a YOLOv5 checkpoint needs, each to inert data or a function of this module;
    any other global (os.system, builtins.eval, ...) stops the load before it can be called."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        found = _resolve_global(module, name)
        if found is None:
            raise _RefusedGlobal(module, name)
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise YOLOv5ImportError(f"unsupported persistent id {str(pid)[:60]}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageKind) or not isinstance(key, str) or not isinstance(numel, int):
            raise YOLOv5ImportError("malformed storage reference")
        if key not in self.storages:
            dtype = kind.dtype
            record = f"{self.prefix}data/{key}"
            try:
                raw = self.archive.read(record)
            except KeyError:
                raise YOLOv5ImportError(f"storage record {record} missing") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) != numel * itemsize:
                raise YOLOv5ImportError(f"storage record {record} is truncated")
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if self.byteorder == "big" and itemsize > 1:
                flat = flat.view(torch.uint8).view(-1, itemsize).flip(1).contiguous().view(dtype).view(-1)
            self.storages[key] = _Storage(flat)
        return self.storages[key]


def _unpickle_archive(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise YOLOv5ImportError(f"{path} is a zip file but not a torch checkpoint (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        with contextlib.suppress(KeyError):
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        unpickler = _YOLOv5Unpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix, byteorder)
        return unpickler.load()


# ------------------------------------------------------------------------------ from placeholders to data
def _module_state_dict(module: _InertModule, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a placeholder module tree under their state-dict names (params, persistent buffers)."""
    attrs = module.attrs
    out: dict[str, torch.Tensor] = {}
    skip = set(attrs.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (attrs.get(kind) or {}).items():
            if tensor is None or (kind == "_buffers" and name in skip):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise YOLOv5ImportError(f"{prefix}{name} is not a tensor")
            out[prefix + name] = tensor
    for name, child in (attrs.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, _InertModule):
            raise YOLOv5ImportError(f"{prefix}{name} is not a module")
        out.update(_module_state_dict(child, f"{prefix}{name}."))
    return out


def _state_dict(module: _InertModule) -> dict[str, torch.Tensor]:
    sd = _module_state_dict(module)
    # YOLOv5 up to v5.0 registered Detect.anchor_grid as a buffer; it is derived from 'anchors' and has
    # no place in the model's state today.
    return {k: v for k, v in sd.items() if not k.endswith(".anchor_grid")}


_DROP = object()


def _leaf_value(obj: Any) -> Any:
    """An opt/hyp leaf kept as a plain value (numpy scalars become Python numbers), or _DROP for anything
    else the file holds there (devices, dtypes, bytes, placeholders of other classes)."""
    if isinstance(obj, np.generic):  # before the number check: np.float64 is a float subclass
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj  # the unpickler builds no subclasses of these: paths already arrive as str
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    return _DROP


def _lenient_plain(obj: Any) -> Any:
    """Plain copy of YOLOv5's opt/hyp/yaml/names entries; parts that are not plain data are dropped."""
    if isinstance(obj, _InertNamespace):
        obj = obj.attrs
    if isinstance(obj, _NumpyArray):
        return obj.array.tolist()
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            v = _lenient_plain(v)
            if v is not _DROP and isinstance(k, (str, int)):
                out[k] = v
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(v for v in map(_lenient_plain, obj) if v is not _DROP)
    if isinstance(obj, (set, frozenset)):
        return [v for v in map(_lenient_plain, obj) if v is not _DROP]
    return _leaf_value(obj)


def _scalar(value: Any, kind: type, default):
    if isinstance(value, _NumpyArray):
        value = value.array.reshape(-1)[0] if value.array.size else None
    if value is None:
        return default
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1)[0].item() if value.numel() else default
    return kind(value)


def read_yolov5_checkpoint(path: str | Path) -> YOLOv5Checkpoint:
    """Read an original YOLOv5 checkpoint (a torch zip archive) without executing any of its pickle.
    Raises YOLOv5ImportError with one line naming the file."""
    path = Path(path)
    try:
        raw = _unpickle_archive(path)
    except _RefusedGlobal as e:
        raise YOLOv5ImportError(
            f"{path} refused: its pickle references {e.global_name}, which is neither a tensor nor a known "
            "YOLOv5 class (nothing was executed)"
        ) from None
    except YOLOv5ImportError as e:
        raise YOLOv5ImportError(f"{path} is not a usable checkpoint: {e}") from None
    except Exception as e:
        raise YOLOv5ImportError(f"{path} is not a readable checkpoint ({one_line_error(e)[:200]})") from None

    try:
        return _from_placeholders(raw, path)
    except YOLOv5ImportError:
        raise
    except Exception as e:  # the pickle was read, but what it holds has the wrong types or shapes
        raise YOLOv5ImportError(f"{path} is not a usable YOLOv5 checkpoint ({one_line_error(e)[:200]})") from None


def _from_placeholders(raw: Any, path: Path) -> YOLOv5Checkpoint:
    """The plain contents of an unpickled YOLOv5 file (placeholder objects and tensors)."""
    if not isinstance(raw, dict):
        raise YOLOv5ImportError(f"{path} is not a checkpoint: it holds a {type(raw).__name__}, not a dict")
    modules = {k: raw.get(k) for k in ("model", "ema") if isinstance(raw.get(k), _InertModule)}
    if not modules:
        raise YOLOv5ImportError(f"{path} is not a checkpoint of this project or of YOLOv5 (no model or ema entry)")
    first = modules.get("ema", modules.get("model"))
    for key, module in modules.items():
        if not module.qualname.startswith("models.yolo."):
            raise YOLOv5ImportError(f"{path}: '{key}' is a {module.qualname}, not a YOLOv5 detection model")
    attrs = first.attrs
    yaml = _lenient_plain(attrs.get("yaml"))
    if not isinstance(yaml, dict) or "backbone" not in yaml or "head" not in yaml:
        raise YOLOv5ImportError(f"{path}: the YOLOv5 model carries no usable yaml")
    names = _lenient_plain(attrs.get("names"))
    nc = _scalar(attrs.get("nc"), int, None) or int(yaml.get("nc", 0)) or None
    if isinstance(names, dict):
        names = [str(names[k]) for k in sorted(names)]
    if nc is None:
        raise YOLOv5ImportError(f"{path}: the YOLOv5 model does not say how many classes it has")
    if not isinstance(names, list) or len(names) != nc:
        names = [str(i) for i in range(nc)]
    yaml["nc"] = nc

    model_sd = _state_dict(modules["model"]) if "model" in modules else None
    ema_sd = _state_dict(modules["ema"]) if "ema" in modules else None
    opt = _lenient_plain(raw.get("opt") or raw.get("train_args") or {})
    hyp = _lenient_plain(attrs.get("hyp") or (opt.get("hyp") if isinstance(opt, dict) else None) or {})
    return YOLOv5Checkpoint(
        model=model_sd,
        ema=ema_sd,
        yaml=yaml,
        names=names,
        nc=nc,
        opt=opt if isinstance(opt, dict) else {},
        hyp=hyp if isinstance(hyp, dict) else {},
        epoch=_scalar(raw.get("epoch"), int, -1),
        best_fitness=_scalar(raw.get("best_fitness"), float, 0.0),
        updates=_scalar(raw.get("updates"), int, 0),
        date=str(raw["date"]) if raw.get("date") else None,
    )
