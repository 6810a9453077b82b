"""Checkpoints: atomic writes, loads that never execute pickled code, and import of original YOLOv5 files.

Our checkpoints are dicts of plain values and tensors (format 'yolo-ema', see INTERFACES.md), so they load
with ``torch.load(..., weights_only=True)``. A checkpoint saved by the original YOLOv5 project pickles whole
``nn.Module`` objects, a numpy ``best_fitness`` and ``pathlib`` paths; those files are read here with a
restricted unpickler that turns every known class into an inert placeholder (nothing of the file's runs),
and the tensors are then collected by their state-dict names.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import glob
import io
import math
import os
import pathlib
import pickle
import pickletools
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models.yolo import Model
from utils.log import LOGGER

FORMAT = "yolo-ema"
VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be written, read, trusted or used; the message is one line."""


# --------------------------------------------------------------------------------------------- saving
def _plain(obj: Any, where: str) -> Any:
    """Copy of ``obj`` made of values that ``torch.load(weights_only=True)`` accepts; paths and numpy
    scalars become str / Python numbers, anything else is refused with the key path that holds it."""
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, np.generic) and not isinstance(obj, np.object_):
        return obj.item()  # before the float/int checks: np.float64 is a float subclass
    if isinstance(obj, int):  # IntEnum and friends would need their class to load (bool cannot be subclassed)
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, nn.Parameter):
            raise CheckpointError(f"{where}: tensor subclass {type(obj).__name__} cannot be stored in a checkpoint")
        return obj.detach()
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            key = _plain(key, f"{where} key {key!r}")
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise CheckpointError(f"{where}: key of type {type(key).__name__} cannot be stored")
            out[key] = _plain(value, f"{where}[{key!r}]")
        return out
    if isinstance(obj, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise CheckpointError(
        f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not a plain value "
        "(allowed: dict, list, tuple, str, int, float, bool, None, tensor)"
    )


def _new_file_mode(path: Path) -> int:
    """Permissions for the written file: those of the file it replaces, else 0o666 minus the umask
    (mkstemp creates 0o600, which would make checkpoints unreadable to the rest of a team)."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o777
    umask = 0o022
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; some platforms cannot open a folder, which is harmless."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Write ``ckpt`` to ``path`` atomically: a temporary file in the same folder is written, flushed to
    disk and renamed over ``path``, so a crash at any instant leaves either the old or the new file whole."""
    path = Path(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"a checkpoint must be a dict, got {type(ckpt).__name__}")
    plain = _plain(ckpt, "checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(plain, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, Exception):
            raise CheckpointError(f"could not write checkpoint {path}: {_one_line(e)}") from e
        raise
    _fsync_dir(path.parent)
    _remove_stale_temps(path, keep_newer_than=os.stat(path).st_mtime)
    return path


def _remove_stale_temps(path: Path, keep_newer_than: float) -> None:
    """Delete temporary files that earlier writers of ``path`` left when they were killed mid-write (a
    SIGKILL skips every cleanup). One writer per checkpoint path is assumed; files written after this
    save finished are left alone."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < keep_newer_than:
                stale.unlink()
                LOGGER.info(f"Removed {stale}, left by an interrupted checkpoint write")


def half_state_dict(state_dict: dict) -> dict:
    """FP16 copy of a state dict for storage: floating tensors halved (detached, contiguous, own memory),
    integer tensors such as ``num_batches_tracked`` cloned unchanged."""
    out = {}
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            value = value.half() if value.is_floating_point() else value
            value = value.clone(memory_format=torch.contiguous_format)
        out[name] = value
    return out


# What a finished checkpoint for evaluation and fine-tuning holds (best.pt, posthoc_best.pt, epochN.pt): the FP16
# weights and what describes them, without the optimizer's momenta (as large as the model in FP32) or resume state.
FINISHED_KEYS = ("format", "version", "epoch", "best_fitness", "model", "ema", "updates", "opt", "hyp", "yaml", "nc",
                 "names", "date")


def finished_checkpoint(ckpt: dict) -> dict:
    """The entries of ``ckpt`` that a finished checkpoint keeps (FINISHED_KEYS); a shallow copy."""
    return {k: ckpt[k] for k in FINISHED_KEYS if k in ckpt}


def strip_resume_state(path: str | Path) -> bool:
    """Remove the resume-only entry from a finished run's checkpoint (atomic rewrite).
    Returns whether the file changed."""
    ckpt = load_checkpoint(path)
    if "resume" not in ckpt:
        return False
    del ckpt["resume"]
    save_checkpoint(ckpt, path)
    return True


# -------------------------------------------------------------------------------------------- loading
def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _foreign_global(path: Path) -> str | None:
    """First global named by a plain pickle file that the YOLOv5 importer would not accept. The opcodes are
    only parsed, never run; torch's own refusal text cannot be used (it invites weights_only=False)."""
    stream = io.BytesIO(path.read_bytes())
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


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint of ours (``weights_only=True``), or import an original YOLOv5 one without running
    its pickle. Anything else raises CheckpointError with one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":  # a zip archive whose central directory (written last) is missing
            raise CheckpointError(f"{path} is a truncated or damaged checkpoint (incomplete zip archive)")
        if not head.startswith(b"\x80"):  # neither a torch zip archive nor a (legacy) pickle
            raise CheckpointError(f"{path} is not a checkpoint (not a torch file)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # Refused by the weights-only unpickler: either a YOLOv5 file (pickled modules) or hostile/foreign.
        if not is_zip:  # a bare pickle or torch's pre-1.6 format: neither ours nor a YOLOv5 v6+/v7 file
            name = _foreign_global(path)
            reason = f" (its pickle references {name}; nothing was executed)" if name else ""
            raise CheckpointError(f"{path} refused: not a checkpoint of this project{reason}") from None
        ckpt = import_yolov5_checkpoint(path)
        return _to_device(ckpt, map_location)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({_one_line(e)[:200]})") from None
    return _validate_ours(obj, path)


def _validate_ours(obj: Any, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")
    if obj.get("format") != FORMAT:
        bare = obj and all(isinstance(v, torch.Tensor) for v in obj.values())
        hint = " (it looks like a bare state dict)" if bare else ""
        raise CheckpointError(f"{path} is not a checkpoint of this project: no format '{FORMAT}'{hint}")
    version = obj.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version!r}; this code reads up to {VERSION}")
    for key in ("yaml", "nc", "names"):
        if key not in obj:
            raise CheckpointError(f"{path} is incomplete: no '{key}' entry")
    if obj.get("model") is None and obj.get("ema") is None:
        raise CheckpointError(f"{path} holds no weights: 'model' and 'ema' are both empty")
    # weights_only guarantees plain types, not the right ones; callers index these without further checks
    nc = obj["nc"]
    if type(nc) is not int or nc < 1:
        raise CheckpointError(f"{path} is malformed: 'nc' is {nc!r}, not a positive int")
    if not isinstance(obj["names"], list) or not isinstance(obj["yaml"], dict):
        raise CheckpointError(f"{path} is malformed: 'names' must be a list and 'yaml' a dict")
    for key in ("model", "ema"):
        sd = obj.get(key)
        if sd is not None and not (isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())):
            raise CheckpointError(f"{path} is malformed: '{key}' is not a state dict of tensors")
    return obj


def _to_device(obj: Any, map_location: Any) -> Any:
    if map_location in (None, "cpu") or not isinstance(map_location, (str, torch.device)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(map_location)
    if isinstance(obj, dict):
        return {k: _to_device(v, map_location) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, map_location) for v in obj)
    return obj


def check_checkpoint_classes(ckpt: dict, nc: int, weights: str | Path = "weights", data: str | Path = "data") -> None:
    """Refuse weights trained on another class count than the dataset has."""
    trained = int(ckpt["nc"])
    if trained != int(nc):
        raise CheckpointError(f"weights {weights} were trained on {trained} classes but data {data} has {nc}")


def model_from_checkpoint(ckpt: dict, use_ema: bool = True) -> nn.Module:
    """Build the model described by the checkpoint's yaml and load its EMA (or raw) weights in FP32.
    Returns the model in eval mode with names, nc and stride set."""
    weights = ckpt.get("ema") if use_ema and ckpt.get("ema") is not None else ckpt.get("model")
    if weights is None:
        raise CheckpointError("checkpoint holds no weights: 'model' and 'ema' are both empty")
    try:
        model = Model(copy.deepcopy(ckpt["yaml"]), ch=3, nc=int(ckpt["nc"]), verbose=False)
    except Exception as e:
        raise CheckpointError(f"cannot build the model from the checkpoint's yaml ({_one_line(e)[:200]})") from None
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in weights:
            raise CheckpointError(f"checkpoint of another shape: it has no '{name}', which its yaml's model needs")
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint of another shape: '{name}' is {tuple(weights[name].shape)} in the checkpoint "
                f"but {tuple(tensor.shape)} in the model built from its yaml"
            )
    extra = [name for name in weights if name not in own]
    if extra:
        raise CheckpointError(
            f"checkpoint of another shape: '{extra[0]}' has no place in the model built from its yaml"
        )
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, strict=True
    )
    model.float()
    model.nc = int(ckpt["nc"])
    model.names = [str(n) for n in ckpt["names"]]
    if ckpt.get("hyp"):
        model.hyp = dict(ckpt["hyp"])
    return model.eval()


# ------------------------------------------------------------------------- original YOLOv5 import
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
            raise CheckpointError(f"unsupported numpy dtype {name!r}")
        dtype = np.dtype(name)
        if dtype.kind not in "biufc":
            raise CheckpointError(f"unsupported numpy dtype {name!r}")
        order = self.state[1] if isinstance(self.state, tuple) and len(self.state) > 1 else "="
        return dtype.newbyteorder(order) if order in ("<", ">") else dtype


class _NumpyArray(_Inert):
    """numpy ``_reconstruct`` + BUILD(version, shape, dtype, fortran, bytes) -> a real array of numbers."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise CheckpointError("malformed numpy array in checkpoint")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _NumpyDtype) or not isinstance(raw, (bytes, bytearray)):
            raise CheckpointError("unsupported numpy array (object data) in checkpoint")
        dt = dtype.dtype
        self.array = np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order="F" if fortran else "C").copy()


def _numpy_reconstruct(cls, shape, typecode):
    if cls is not _NdarrayMarker:
        raise CheckpointError("numpy _reconstruct of something other than ndarray")
    return _NumpyArray()


def _numpy_scalar(dtype, raw=None):
    if not isinstance(dtype, _NumpyDtype) or not isinstance(raw, (bytes, bytearray)):
        raise CheckpointError("unsupported numpy scalar in checkpoint")
    return np.frombuffer(bytes(raw), dtype=dtype.dtype)[0]


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles spell ``bytes`` as _codecs.encode(str, 'latin1'); nothing else is let through.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("unexpected _codecs.encode call in checkpoint")
    return text.encode("latin1")


def _pure_path(flavour):
    def build(*parts):
        if not all(isinstance(p, str) for p in parts):
            raise CheckpointError("malformed path in checkpoint")
        return str(flavour(*parts))

    return build


class _Storage:
    """A storage read from the archive: a flat tensor of its dtype."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise CheckpointError("tensor without storage in checkpoint")
    flat = storage.flat
    # A weight never overlaps itself; a crafted stride-0 view could make the clone below ask for terabytes.
    if math.prod(size) > flat.numel():
        raise CheckpointError("tensor larger than its storage in checkpoint")
    # as_strided refuses negative offsets and strides and any view that reaches past the storage.
    return flat.as_strided(tuple(size), tuple(stride), offset).clone()


def _rebuild_tensor_v1(storage, offset, size, stride):
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("parameter without tensor in checkpoint")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if new_type is not _TensorMarker or func not in (_rebuild_tensor, _rebuild_parameter):
        raise CheckpointError("unsupported tensor type in checkpoint")
    return func(*args)


def _set(items=()):
    return set(items)


def _frozenset(items=()):
    return frozenset(items)


class _RefusedGlobal(CheckpointError):
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
            raise CheckpointError(f"unsupported persistent id {str(pid)[:60]}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageKind) or not isinstance(key, str) or not isinstance(numel, int):
            raise CheckpointError("malformed storage reference")
        if key not in self.storages:
            dtype = kind.dtype
            record = f"{self.prefix}data/{key}"
            try:
                raw = self.archive.read(record)
            except KeyError:
                raise CheckpointError(f"storage record {record} missing") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) != numel * itemsize:
                raise CheckpointError(f"storage record {record} is truncated")
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if self.byteorder == "big" and itemsize > 1:
                flat = flat.view(torch.uint8).view(-1, itemsize).flip(1).contiguous().view(dtype).view(-1)
            self.storages[key] = _Storage(flat)
        return self.storages[key]


def _unpickle_archive(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path} is a zip file but not a torch checkpoint (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        with contextlib.suppress(KeyError):
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        unpickler = _YOLOv5Unpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix, byteorder)
        return unpickler.load()


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
                raise CheckpointError(f"{prefix}{name} is not a tensor")
            out[prefix + name] = tensor
    for name, child in (attrs.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, _InertModule):
            raise CheckpointError(f"{prefix}{name} is not a module")
        out.update(_module_state_dict(child, f"{prefix}{name}."))
    return out


def _yolov5_state_dict(module: _InertModule) -> dict[str, torch.Tensor]:
    sd = _module_state_dict(module)
    # YOLOv5 up to v5.0 registered Detect.anchor_grid as a buffer; it is derived from 'anchors' and has
    # no place in the model's state today.
    return half_state_dict({k: v for k, v in sd.items() if not k.endswith(".anchor_grid")})


def _lenient_plain(obj: Any) -> Any:
    """Plain copy of YOLOv5's opt/hyp/git entries; parts that are not plain data are dropped."""
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
    try:
        return _plain(obj, "")
    except CheckpointError:
        return _DROP


_DROP = object()


def _scalar(value: Any, kind: type, default):
    if isinstance(value, _NumpyArray):
        value = value.array.reshape(-1)[0] if value.array.size else None
    if value is None:
        return default
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1)[0].item() if value.numel() else default
    return kind(value)


def import_yolov5_checkpoint(path: str | Path) -> dict:
    """Read an original YOLOv5 checkpoint without executing it and return it in our format."""
    path = Path(path)
    try:
        raw = _unpickle_archive(path)
    except _RefusedGlobal as e:
        raise CheckpointError(
            f"{path} refused: its pickle references {e.global_name}, which is neither a tensor nor a known "
            "YOLOv5 class (nothing was executed)"
        ) from None
    except CheckpointError as e:
        raise CheckpointError(f"{path} is not a usable checkpoint: {e}") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({_one_line(e)[:200]})") from None

    try:
        return _from_yolov5(raw, path)
    except CheckpointError:
        raise
    except Exception as e:  # the pickle was read, but what it holds has the wrong types or shapes
        raise CheckpointError(f"{path} is not a usable YOLOv5 checkpoint ({_one_line(e)[:200]})") from None


def _from_yolov5(raw: Any, path: Path) -> dict:
    """Our checkpoint dict from the placeholder objects of an unpickled YOLOv5 file."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(raw).__name__}, not a dict")
    modules = {k: raw.get(k) for k in ("model", "ema") if isinstance(raw.get(k), _InertModule)}
    if not modules:
        raise CheckpointError(f"{path} is not a checkpoint of this project or of YOLOv5 (no model or ema entry)")
    first = modules.get("ema", modules.get("model"))
    for key, module in modules.items():
        if not module.qualname.startswith("models.yolo."):
            raise CheckpointError(f"{path}: '{key}' is a {module.qualname}, not a YOLOv5 detection model")
    attrs = first.attrs
    yaml = _lenient_plain(attrs.get("yaml"))
    if not isinstance(yaml, dict) or "backbone" not in yaml or "head" not in yaml:
        raise CheckpointError(f"{path}: the YOLOv5 model carries no usable yaml")
    names = _lenient_plain(attrs.get("names"))
    nc = _scalar(attrs.get("nc"), int, None) or int(yaml.get("nc", 0)) or None
    if isinstance(names, dict):
        names = [str(names[k]) for k in sorted(names)]
    if nc is None:
        raise CheckpointError(f"{path}: the YOLOv5 model does not say how many classes it has")
    if not isinstance(names, list) or len(names) != nc:
        names = [str(i) for i in range(nc)]
    yaml["nc"] = nc

    model_sd = _yolov5_state_dict(modules["model"] if "model" in modules else modules["ema"])
    ema_sd = _yolov5_state_dict(modules["ema"]) if "ema" in modules else None
    opt = _lenient_plain(raw.get("opt") or raw.get("train_args") or {})
    hyp = _lenient_plain(attrs.get("hyp") or (opt.get("hyp") if isinstance(opt, dict) else None) or {})
    LOGGER.info(f"Imported YOLOv5 checkpoint {path} ({len(model_sd)} tensors, {nc} classes), no code executed")
    return {
        "format": FORMAT,
        "version": VERSION,
        "epoch": _scalar(raw.get("epoch"), int, -1),
        "best_fitness": _scalar(raw.get("best_fitness"), float, 0.0),
        "model": model_sd,
        "ema": ema_sd,
        "updates": _scalar(raw.get("updates"), int, 0),
        "optimizer": None,  # YOLOv5's parameter groups are not ours; imported weights start a new run
        "opt": opt if isinstance(opt, dict) else {},
        "hyp": hyp if isinstance(hyp, dict) else {},
        "yaml": yaml,
        "nc": nc,
        "names": names,
        "date": str(raw.get("date") or datetime.now(timezone.utc).isoformat()),
        "imported_from": "yolov5",
    }
