"""Checkpoints of this project: atomic writes, loads that never execute pickled code, validation, and the
model a checkpoint describes.

Our checkpoints are dicts of plain values and tensors (format 'yolo-ema', described in README.md's
Checkpoints section), so they load with ``torch.load(..., weights_only=True)``. A checkpoint saved by the
original YOLOv5 project pickles whole modules and is refused by that loader; ``load_checkpoint`` then reads
it with utils.yolov5_import (which runs nothing from the file) and converts it to our format here.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import math
import os
import pathlib
import pickle
import re
import tempfile
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from models.yolo import MODELS_DIR, Model
from utils.log import LOGGER
from utils.yolov5_import import (YOLOv5ImportError, first_refused_global, one_line_error,
                                 read_yolov5_checkpoint)

FORMAT = "yolo-ema"
# 2: the resume state's FP32 model and EMA weights (pack_state_dict) and the optimizer's state (pack_tree) are
# packed; version-1 files, which hold plain state dicts there, still load and resume.
VERSION = 2


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
        # The standard layout on disk, whatever memory format training used, and on the CPU: a file of CUDA
        # tensors would not load with a bare torch.load on a machine without CUDA.
        return obj.detach().to("cpu").contiguous()
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
            raise CheckpointError(f"could not write checkpoint {path}: {one_line_error(e)}") from e
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


class _Packer:
    """Collects tensors into one contiguous CPU buffer per dtype: each add() returns the buffer's key, and the
    tensor's values go at the buffer's end. The buffers are allocated on the CPU and each tensor is copied into its
    slice directly, whatever device it is on: one transfer per tensor and no device memory for the copy (a
    checkpoint built on the GPU would otherwise take 16-32 bytes per parameter there while the writer saves it, and
    would not load with a bare torch.load on a machine without CUDA)."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, tensor: torch.Tensor) -> str:
        key = str(tensor.dtype).removeprefix("torch.")
        self.parts.setdefault(key, []).append(tensor.detach())
        return key

    def packed(self) -> dict[str, torch.Tensor]:
        """The buffers: copies on the CPU, in the standard layout whatever memory format the tensors had."""
        out = {}
        for key, parts in self.parts.items():
            buffer = torch.empty(sum(t.numel() for t in parts), dtype=parts[0].dtype, device="cpu")
            start = 0
            for t in parts:
                buffer[start:start + t.numel()].view(t.shape).copy_(t)
                start += t.numel()
            out[key] = buffer
        return out


class _Unpacker:
    """Hands out views into packed buffers in the order _Packer took the tensors in."""

    def __init__(self, packed: dict[str, torch.Tensor]):
        self.packed, self.offsets = packed, dict.fromkeys(packed, 0)

    def take(self, key: str, shape) -> torch.Tensor:
        n, start = math.prod(shape), self.offsets[key]
        self.offsets[key] = start + n
        return self.packed[key][start:start + n].view(shape)


def pack_state_dict(state_dict: dict) -> dict:
    """A state dict as one contiguous CPU buffer per dtype plus its layout: a few large tensors to pickle
    and write instead of hundreds of small ones (what every epoch's last.pt holds twice for exact resume). The
    values are copied in the standard layout, whatever memory format they have. unpacked_state_dict() restores it."""
    packer = _Packer()
    layout = [[name, packer.add(tensor), list(tensor.shape)] for name, tensor in state_dict.items()]
    return {"packed": packer.packed(), "layout": layout}


def unpacked_state_dict(entry: dict) -> dict:
    """The state dict of a pack_state_dict() entry (its tensors are views into the packed buffers), or the
    entry itself when it already is a plain state dict (a version-1 checkpoint)."""
    if set(entry) != {"packed", "layout"}:
        return entry
    unpacker = _Unpacker(entry["packed"])
    return {name: unpacker.take(key, shape) for name, key, shape in entry["layout"]}


def pack_tree(obj: Any) -> dict:
    """Nested dicts, lists and tuples (an optimizer's state dict) with every tensor copied into one contiguous
    CPU buffer per dtype: {"packed": {key: tensor}, "tree": obj with each tensor replaced by
    {"tensor": [key, shape]}}. The copy is the caller's to keep while the original goes on changing.
    unpacked_tree() restores it."""
    packer = _Packer()

    def walk(x):
        if isinstance(x, torch.Tensor):
            return {"tensor": [packer.add(x), list(x.shape)]}
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    tree = walk(obj)
    return {"packed": packer.packed(), "tree": tree}


def unpacked_tree(entry: Any) -> Any:
    """What pack_tree() packed (its tensors are views into the packed buffers), or the entry itself when it is
    not packed (a version-1 checkpoint)."""
    if not (isinstance(entry, dict) and set(entry) == {"packed", "tree"}):
        return entry
    unpacker = _Unpacker(entry["packed"])

    def walk(x):
        if isinstance(x, dict) and set(x) == {"tensor"}:
            return unpacker.take(*x["tensor"])
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    return walk(entry["tree"])


def load_optimizer_state(optimizer: torch.optim.Optimizer, entry: Any) -> None:
    """``optimizer.load_state_dict`` of a pack_tree() entry (or a plain state dict), then every state tensor in
    memory of its own, each one of a parameter's shape laid out like its parameter (channels_last weights get
    channels_last momenta). The unpacked tensors are contiguous views into the packed buffers: a view would keep the
    whole buffer alive for the run, and on CUDA the foreach/fused optimizer kernels take tensors whose strides
    differ from their parameters' one at a time, so a resumed run would run other (slower) kernels than a fresh one."""
    optimizer.load_state_dict(unpacked_tree(entry))
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype, device=value.device).copy_(value)
            elif value.untyped_storage().nbytes() > value.numel() * value.element_size():
                state[key] = value.clone()


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
# Kept too when a run has them: the companion EMAs' FP16 weights (utils/ema_companions.py).
FINISHED_OPTIONAL_KEYS = ("ema_companions",)


def finished_checkpoint(ckpt: dict) -> dict:
    """The entries of ``ckpt`` that a finished checkpoint keeps (FINISHED_KEYS and FINISHED_OPTIONAL_KEYS); a
    shallow copy."""
    return {k: ckpt[k] for k in (*FINISHED_KEYS, *FINISHED_OPTIONAL_KEYS) if k in ckpt}


class CheckpointWriter:
    """Writes checkpoints on one background thread, in the order they were submitted, so that training goes on
    while a file is pickled and flushed to disk. What is submitted must not change afterwards: pass copies.

    A failed write (a full disk) is raised as its CheckpointError by the next call to raise_error(), submit()
    or wait(); the files written before it stay whole.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._futures: list[Future] = []

    def submit(self, ckpt: dict, path: str | Path, on_saved: Callable[[], None] | None = None) -> None:
        """Queue save_checkpoint(ckpt, path); `on_saved` runs (on the writer's thread) once the file is in place."""
        self.raise_error()

        def write():
            save_checkpoint(ckpt, path)
            if on_saved is not None:
                on_saved()

        self._futures.append(self._pool.submit(write))

    def raise_error(self) -> None:
        """Raise the error of a finished write that failed (the first one); forget the writes done."""
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        for f in done:
            f.result()

    def wait(self) -> None:
        """Block until every submitted write is done; raise the first failure."""
        futures, self._futures = self._futures, []
        errors = [f.exception() for f in futures]  # waits for each
        for e in errors:
            if e is not None:
                raise e

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()


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
# The names YOLOv5 downloads its pretrained weights by (yolov5n.pt, yolov5s6.pt, yolov3-tiny.pt...).
PRETRAINED_NAME = re.compile(r"yolov\d+[a-z]*\d*(-[a-z]+)?\.pt", re.IGNORECASE)


def _pretrained_hint(path: Path) -> str:
    """For a bare YOLOv5 weights name that is not on disk: YOLOv5 would download it; here there is no such
    download, so say what to do instead. Empty for any other path."""
    if len(path.parts) != 1 or not PRETRAINED_NAME.fullmatch(path.name):
        return ""
    cfg = MODELS_DIR / f"{path.stem}.yaml"
    scratch = f"--cfg {cfg.name} --weights ''" if cfg.is_file() else "--cfg yolov5n.yaml --weights ''"
    return (f": pretrained weights cannot be downloaded here; train from scratch with "
            f"python train.py {scratch}, or give the path of a local .pt file")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint of ours (``weights_only=True``), or import an original YOLOv5 one without running
    its pickle. Anything else raises CheckpointError with one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found" + _pretrained_hint(path))
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
    except pickle.UnpicklingError:
        # Refused by the weights-only unpickler: either a YOLOv5 file (pickled modules) or hostile/foreign.
        if not is_zip:  # a bare pickle or torch's pre-1.6 format: neither ours nor a YOLOv5 v6+/v7 file
            name = first_refused_global(path)
            reason = f" (its pickle references {name}; nothing was executed)" if name else ""
            raise CheckpointError(f"{path} refused: not a checkpoint of this project{reason}") from None
        ckpt = import_yolov5_checkpoint(path)
        return _to_device(ckpt, map_location)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({one_line_error(e)[:200]})") from None
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


def trained_imgsz(ckpt: dict) -> int | None:
    """The image size a checkpoint's run trained at, when its options say."""
    opt = ckpt.get("opt")
    size = opt.get("imgsz", opt.get("img_size")) if isinstance(opt, dict) else None
    if isinstance(size, (list, tuple)) and size:  # YOLOv5 once stored [train, test] sizes
        size = size[-1]
    return int(size) if isinstance(size, (int, float)) and size > 0 else None


def trained_data(ckpt: dict) -> str | None:
    """The dataset yaml a checkpoint's run trained on (its --data, as given), when its options say."""
    opt = ckpt.get("opt")
    data = opt.get("data") if isinstance(opt, dict) else None
    return data if isinstance(data, str) and data else None


def model_from_checkpoint(ckpt: dict, use_ema: bool = True) -> nn.Module:
    """Build the model described by the checkpoint's yaml and load its EMA (or raw) weights in FP32.
    Returns the model in eval mode with names, nc, stride and trained_imgsz (None when unknown) set."""
    weights = ckpt.get("ema") if use_ema and ckpt.get("ema") is not None else ckpt.get("model")
    if weights is None:
        raise CheckpointError("checkpoint holds no weights: 'model' and 'ema' are both empty")
    try:
        model = Model(copy.deepcopy(ckpt["yaml"]), ch=3, nc=int(ckpt["nc"]), verbose=False)
    except Exception as e:
        raise CheckpointError(
            f"cannot build the model from the checkpoint's yaml ({one_line_error(e)[:200]})"
        ) from None
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
    model.trained_imgsz = trained_imgsz(ckpt)  # what detect.py and export.py default --img to
    model.trained_data = trained_data(ckpt)  # what val.py defaults --data to (export.py records it)
    if ckpt.get("hyp"):
        model.hyp = dict(ckpt["hyp"])
    return model.eval()


def import_yolov5_checkpoint(path: str | Path) -> dict:
    """Read an original YOLOv5 checkpoint without executing it (utils.yolov5_import) and return it in our
    format: FP16 weights, no optimizer state, marked ``imported_from``."""
    path = Path(path)
    try:
        imported = read_yolov5_checkpoint(path)
    except YOLOv5ImportError as e:
        raise CheckpointError(str(e)) from None
    model_sd = half_state_dict(imported.model if imported.model is not None else imported.ema)
    ema_sd = half_state_dict(imported.ema) if imported.ema is not None else None
    LOGGER.info(f"Imported YOLOv5 checkpoint {path} ({len(model_sd)} tensors, {imported.nc} classes), "
                "no code executed")
    return {
        "format": FORMAT,
        "version": VERSION,
        "epoch": imported.epoch,
        "best_fitness": imported.best_fitness,
        "model": model_sd,
        "ema": ema_sd,
        "updates": imported.updates,
        "optimizer": None,  # YOLOv5's parameter groups are not ours; imported weights start a new run
        "opt": imported.opt,
        "hyp": imported.hyp,
        "yaml": imported.yaml,
        "nc": imported.nc,
        "names": imported.names,
        "date": imported.date or datetime.now(timezone.utc).isoformat(),
        "imported_from": "yolov5",
    }
