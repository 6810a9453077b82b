"""YOLO-format detection datasets: label verification and caching, augmented samples, seeded loaders.

Layout: images/<split>/*.jpg with labels/<split>/*.txt beside them (img2label_paths), one `cls cx cy w h`
row per object, normalised to [0, 1]. A missing label file means the image has no objects (background).

Label scan: every image and label file is verified once; bad ones are skipped with a warning that names
the file and the reason, and one summary line counts images, backgrounds, corrupt files and duplicate
rows. The result is cached in `labels/<split>.cache` (a numpy .npz read with allow_pickle=False, so a
cache file cannot run code), keyed by a hash of every file's path, size and mtime plus the class count;
any change re-scans. Where the labels folder is read-only the cache lives in the user cache folder
($XDG_CACHE_HOME or ~/.cache, then yolo-ema/).

Determinism: a sample's every random draw comes from np.random.Generator(PCG64([seed, epoch, index])),
never from a global RNG. The sampler yields (epoch, index) pairs, so the epoch travels with each index
into whichever worker process loads it; the same seed therefore gives identical batches whatever the
number of workers, and persistent workers need no per-epoch signal. The shuffle order of an epoch comes
from a torch.Generator seeded from (seed, epoch); under DDP each rank takes a strided share of it.

COCO-JSON splits (utils/coco_json.py): the json's boxes are the labels; each image is verified as above and the
result cached beside the json (`instances_NAME.cache`, else in the user cache folder), keyed by the json's and
every image's path, size and mtime; the dataset's `coco` then holds what val.py scores it with.

Images that cannot be read any more (removed or damaged after the label scan) do not stop a run. In
training, such an image (a mosaic tile too) is replaced by the first readable image of a permutation that
is a pure function of (seed, epoch, index), so within a run every worker and every DDP rank picks the same
stand-in. A resumed run rescans the labels, so it repeats the original batches only while the dataset is
unchanged: an image removed in between is dropped from the list, and every later index shifts. In
validation, it becomes a grey image of the shape it would have had, without labels. Either way the sample
and its collated Batch list the path in `unreadable`; workers never log, the consumer of the batches does.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from utils import coco_json
from utils.augmentations import (FILL_VALUE, augment_hsv, letterbox, mixup, mosaic4, random_flips,
                                 random_perspective)
from utils.boxes import xywhn2xyxy, xyxy2xywhn
from utils.data_config import DatasetError, writable_dir
from utils.log import LOGGER

# OpenCV's thread pool does not survive fork(): a DataLoader worker inherits the pool's state without its
# threads (reconfiguring it there waits forever). Keeping OpenCV single-threaded in every process means there
# is no pool to inherit; the DataLoader workers are where decoding and augmentation run in parallel.
cv2.setNumThreads(0)

IMG_FORMATS = ("bmp", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp")
LABEL_CACHE_VERSION = 2  # bumped whenever verification changes, so older caches are re-scanned
MIN_IMAGE_SIDE = 10  # pixels; smaller images are treated as corrupt
EXIF_ORIENTATION = 0x0112

# Per-image outcome of the label scan.
LABELLED, BACKGROUND_MISSING, BACKGROUND_EMPTY, CORRUPT = 0, 1, 2, 3
SUBSTITUTE_STREAM = 1  # SeedSequence spawn key of the stand-in draws: independent of the augmentation draws


class UnreadableImageError(FileNotFoundError):
    """An image that passed the label scan but cannot be read now (removed or changed since)."""


class Sample(NamedTuple):
    """One dataset item."""
    img: torch.Tensor  # uint8 (3, H, W) RGB
    targets: torch.Tensor  # (n, 6) [0, cls, cx, cy, w, h], normalised to img
    path: str  # the image shown (a stand-in's path when the sample's own image could not be read in training)
    shapes: tuple | None  # ((h0, w0), ((ratio_h, ratio_w), (pad_w, pad_h))) when letterboxed, None for mosaics
    unreadable: tuple[str, ...]  # images this sample needed but could not read


class Batch(NamedTuple):
    """Collated samples; targets' column 0 is the image's position in the batch."""
    imgs: torch.Tensor  # uint8 (B, 3, H, W), channels_last
    targets: torch.Tensor  # (n, 6)
    paths: tuple[str, ...]
    shapes: tuple
    unreadable: tuple[str, ...]  # distinct image paths that could not be read for this batch (almost always empty)

    def readable(self) -> "Batch":
        """This batch without the samples whose own image is listed in `unreadable` (validation's grey
        stand-ins), targets re-indexed; `unreadable` is kept."""
        bad = set(self.unreadable)
        keep = [i for i, p in enumerate(self.paths) if p not in bad]
        if len(keep) == len(self.paths):
            return self
        position = torch.full((len(self.paths),), -1, dtype=torch.long)
        position[keep] = torch.arange(len(keep))
        new_index = position[self.targets[:, 0].long()]
        targets = self.targets[new_index >= 0].clone()
        targets[:, 0] = new_index[new_index >= 0].to(targets.dtype)
        return Batch(self.imgs[keep], targets, tuple(self.paths[i] for i in keep),
                     tuple(self.shapes[i] for i in keep), tuple(self.unreadable))


def user_cache_dir() -> Path:
    """This project's folder in the user cache ($XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "yolo-ema"


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one sample: a pure function of (seed, epoch, index)."""
    mask = (1 << 64) - 1  # SeedSequence wants non-negative integers
    return np.random.Generator(np.random.PCG64([int(seed) & mask, int(epoch) & mask, int(index) & mask]))


def substitute_order(seed: int, epoch: int, index: int, n: int) -> np.ndarray:
    """The images, in the order tried, that stand in for image `index` of an n-image dataset when it cannot
    be read in epoch `epoch`: a permutation of the other indices, a pure function of (seed, epoch, index)."""
    mask = (1 << 64) - 1
    seq = np.random.SeedSequence([int(seed) & mask, int(epoch) & mask, int(index) & mask],
                                 spawn_key=(SUBSTITUTE_STREAM,))
    order = np.random.Generator(np.random.PCG64(seq)).permutation(int(n))
    return order[order != index]


def img2label_paths(img_paths) -> list[str]:
    """Label file of each image: the last '/images/' of the path becomes '/labels/', the suffix '.txt'."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    out = []
    for p in map(str, img_paths):
        cut = p.rfind(images)
        if cut >= 0:
            p = p[:cut] + labels + p[cut + len(images):]
        out.append(str(Path(p).with_suffix(".txt")))
    return out


def list_image_files(path, prefix: str = "") -> list[str]:
    """Sorted absolute image paths from a folder (searched recursively), a .txt list of image paths
    (relative ones are relative to the list's folder), a single image, or a list of those."""
    sources = path if isinstance(path, (list, tuple)) else [path]
    files = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            files += [str(f) for f in p.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS and f.is_file()]
        elif p.is_file() and p.suffix[1:].lower() in IMG_FORMATS:
            files.append(str(p))
        elif p.is_file():
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                raise DatasetError(f"{prefix}{p} is neither an image folder, an image, nor a text list of image "
                                   "paths") from None
            for line in (x.strip() for x in lines):
                if line:
                    f = Path(line).expanduser()
                    files.append(str(f if f.is_absolute() else p.parent / f))
        else:
            raise DatasetError(f"{prefix}{p} does not exist")
    files = sorted({os.path.abspath(f) for f in files})
    if not files:
        raise DatasetError(f"{prefix}no images found in {path} (formats: {', '.join(IMG_FORMATS)})")
    return files


# ----------------------------------------------------------------------------------------------- label scan

def _check_image(im_file: str) -> tuple[tuple[int, int] | None, str]:
    """(width, height) after EXIF rotation, or (None, reason) when the image cannot be used."""
    try:
        with Image.open(im_file) as im:
            im.verify()  # structure and checksums, without decoding pixels
        with Image.open(im_file) as im:
            fmt = (im.format or "").lower()
            w, h = im.size
            if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
                w, h = h, w  # cv2.imread applies the EXIF rotation, so report the size it will see
    except FileNotFoundError:
        return None, "image file not found"
    except Exception as e:  # PIL raises many types for broken files
        return None, f"unreadable image ({type(e).__name__}: {e})"
    if fmt not in IMG_FORMATS:
        return None, f"unsupported image format '{fmt}'"
    if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
        return None, f"image too small ({w}x{h})"
    if fmt in ("jpeg", "mpo"):
        with open(im_file, "rb") as f:
            f.seek(max(0, os.path.getsize(im_file) - 1024))
            tail = f.read().rstrip(b"\x00")  # zero padding after the end marker is harmless
        if not tail.endswith(b"\xff\xd9"):
            return None, "truncated JPEG (no end-of-image marker)"
    # OpenCV decodes the images in training and refuses some damage that PIL's checks pass (a PNG cut inside
    # its last chunk, a short BMP, a JPEG without image data); found only then, it would stop training
    # mid-epoch. Decoding once here costs a few ms per image, paid once thanks to the label cache.
    if cv2.imread(im_file) is None:
        return None, "image cannot be decoded (truncated or damaged)"
    return (w, h), ""


def _parse_label_file(lb_file: str, nc: int | None) -> tuple[np.ndarray | None, int, str]:
    """(labels (n, 5) float32 with duplicates removed, duplicates dropped, '') or (None, 0, reason)."""
    try:
        text = Path(lb_file).read_text(encoding="utf-8-sig")  # editors on Windows may add a BOM
    except (OSError, UnicodeDecodeError) as e:
        return None, 0, f"unreadable label file {lb_file} ({type(e).__name__})"
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{lb_file} line {lineno}"
        if len(parts) != 5:
            return None, 0, f"{where}: {len(parts)} columns, expected 5 (class cx cy w h)"
        try:
            values = [float(v) for v in parts]
        except ValueError:
            return None, 0, f"{where}: non-numeric value in '{line.strip()}'"
        if not all(math.isfinite(v) for v in values):
            return None, 0, f"{where}: non-numeric value in '{line.strip()}'"
        cls = values[0]
        if cls != int(cls):
            return None, 0, f"{where}: class id {parts[0]} is not an integer"
        if cls < 0:
            return None, 0, f"{where}: negative class id {int(cls)}"
        if nc is not None and cls >= nc:
            return None, 0, f"{where}: class id {int(cls)} >= nc={nc}"
        if not all(0.0 <= v <= 1.0 for v in values[1:]):
            return None, 0, f"{where}: coordinates outside [0, 1] in '{line.strip()}'"
        rows.append(values)
    labels = np.array(rows, dtype=np.float32).reshape(-1, 5)
    _, first = np.unique(labels, axis=0, return_index=True)
    n_dup = len(labels) - len(first)
    if n_dup:
        labels = labels[np.sort(first)]  # keep the first occurrence, in file order
    return labels, n_dup, ""


def verify_image_label(im_file: str, lb_file: str, nc: int | None):
    """Verify one image and its label file. Returns (status, (w, h), labels (n, 5), duplicates, message)."""
    empty = np.zeros((0, 5), np.float32)
    size, reason = _check_image(im_file)
    if size is None:
        return CORRUPT, (0, 0), empty, 0, f"{im_file}: skipped, {reason}"
    if not os.path.isfile(lb_file):
        return BACKGROUND_MISSING, size, empty, 0, ""
    labels, n_dup, reason = _parse_label_file(lb_file, nc)
    if labels is None:
        return CORRUPT, (0, 0), empty, 0, f"{im_file}: skipped, {reason}"
    msg = f"{lb_file}: {n_dup} duplicate row{'s' if n_dup > 1 else ''} dropped" if n_dup else ""
    return (LABELLED if len(labels) else BACKGROUND_EMPTY), size, labels, n_dup, msg


def _files_signature(im_files, label_files) -> str:
    """Hash of every file's path, size and mtime."""
    h = hashlib.sha256(f"v{LABEL_CACHE_VERSION}\n".encode())
    for f in (*im_files, *label_files):
        try:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}\0absent\n".encode())
    return h.hexdigest()


def label_cache_paths(label_files, source) -> tuple[Path, Path]:
    """(cache beside the labels folder, fallback cache in the user cache folder) for this dataset."""
    labels_dir = Path(label_files[0]).parent.resolve()
    name = labels_dir.name
    if isinstance(source, (list, tuple)) or not Path(str(source)).is_dir():
        # several sources or a list file share the first labels folder: keep their caches apart
        name += "-" + hashlib.sha1(repr([str(s) for s in np.atleast_1d(source)]).encode()).hexdigest()[:8]
    beside = labels_dir.parent / f"{name}.cache"
    key = hashlib.sha1(str(beside).encode()).hexdigest()[:16]
    return beside, user_cache_dir() / "labels" / f"{name}-{key}.cache"


def _first_readable_cache(candidates, signature) -> tuple[dict | None, Path | None]:
    """(contents, path) of the first candidate cache that is readable and current, else (None, None)."""
    for candidate in candidates:
        cached = _read_label_cache(candidate, signature)
        if cached is not None:
            return cached, candidate
    return None, None


def _read_label_cache(path: Path, signature) -> dict | None:
    """The cache at path when it is current: its signature equals `signature` (a str, or a function of the cached
    dict, for caches that list the files they were made from)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        expected = signature(d) if callable(signature) else signature
        if int(d["version"]) == LABEL_CACHE_VERSION and str(d["signature"]) == expected:
            return d
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged cache is rebuilt, not fatal
        LOGGER.warning(f"WARNING: label cache {path} is unreadable ({type(e).__name__}), scanning again")
    return None


def _write_atomic(path: Path, write) -> None:
    """write(file) into a temporary file beside path, then rename it over path: concurrent DDP ranks may
    write the same cache, and each write lands whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def scan_labels(im_files, label_files, nc=None, source=None, prefix: str = "") -> dict:
    """Verify all image/label pairs, through the label cache. Logs each problem and one summary line.

    The cache holds the verification without the class-count check (so datasets built with and without
    nc share it); class ids >= nc are checked afterwards, on the cached labels.
    Returns a dict of arrays over im_files: status, shapes (n, 2) w,h, counts, labels (sum counts, 5),
    duplicates, messages, plus 'cache' (the cache file used).
    """
    signature = _files_signature(im_files, label_files)
    beside, fallback = label_cache_paths(label_files, source if source is not None else im_files)
    cached, where = _first_readable_cache((beside, fallback), signature)

    if cached is None:
        n = len(im_files)
        with ThreadPool(min(8, os.cpu_count() or 1)) as pool:
            results = pool.starmap(verify_image_label, zip(im_files, label_files, [None] * n))
        labels = [r[2] for r in results]
        cached = {
            "version": np.array(LABEL_CACHE_VERSION),
            "signature": np.array(signature),
            "status": np.array([r[0] for r in results], np.int8),
            "shapes": np.array([r[1] for r in results], np.int64).reshape(-1, 2),
            "counts": np.array([len(lb) for lb in labels], np.int64),
            "labels": np.concatenate(labels, 0) if labels else np.zeros((0, 5), np.float32),
            "duplicates": np.array([r[3] for r in results], np.int64),
            "messages": np.array([r[4] for r in results], dtype=np.str_),
        }
        where = _write_label_cache(cached, beside, fallback, prefix)

    if nc is not None:
        cached = dict(cached)
        _reject_classes_outside(cached, im_files, label_files, int(nc))
    for msg in cached["messages"]:
        if msg:
            LOGGER.warning(f"{prefix}WARNING: {msg}")
    status = cached["status"]
    n_corrupt = int((status == CORRUPT).sum())
    n_background = int(((status == BACKGROUND_MISSING) | (status == BACKGROUND_EMPTY)).sum())
    n_missing = int((status == BACKGROUND_MISSING).sum())
    LOGGER.info(f"{prefix}Scanning {Path(label_files[0]).parent}... {len(status) - n_corrupt} images, "
                f"{n_background} backgrounds ({n_missing} without a label file), {n_corrupt} corrupt, "
                f"{int(cached['duplicates'].sum())} duplicate rows dropped (cache: {where})")
    cached["cache"] = str(where)
    return cached


def _write_label_cache(cached: dict, beside: Path, fallback: Path, prefix: str) -> Path | None:
    """Write the cache beside the labels, else (read-only) at fallback; returns where it went (None: nowhere)."""
    targets = [beside, fallback]
    if not beside.parent.is_dir() or not writable_dir(beside.parent):
        targets = [fallback]
        LOGGER.info(f"{prefix}Folder {beside.parent} is read-only or absent; label cache kept at {fallback}")
    where = None
    for target in targets:
        try:
            _write_atomic(target, lambda f: np.savez(f, **cached))
            where = target
            break
        except OSError as e:  # e.g. a read-only file system that the mode bits did not reveal
            LOGGER.warning(f"{prefix}WARNING: cannot write label cache {target}: {e}")
    if where is not None and where != targets[0]:
        LOGGER.info(f"{prefix}Label cache kept at {where}")
    return where


def _coco_signature(json_file: Path, image_dir, im_files) -> str:
    h = hashlib.sha256(f"v{LABEL_CACHE_VERSION}\ncoco\n{image_dir}\n".encode())
    h.update(_files_signature([str(json_file)], [str(f) for f in im_files]).encode())
    return h.hexdigest()


def _verify_coco_image(split: coco_json.CocoSplit, i: int):
    """verify_image_label's result for image entry i of a COCO json."""
    empty = np.zeros((0, 5), np.float32)
    if split.problems[i]:
        return CORRUPT, (0, 0), empty, 0, split.problems[i]
    im_file, iid = split.im_files[i], split.image_ids[i]
    size, reason = _check_image(im_file)
    if size is None or tuple(size) != tuple(split.sizes[i]):
        reason = reason or f"the image is {size[0]}x{size[1]}, the json says {split.sizes[i][0]}x{split.sizes[i][1]}"
        return CORRUPT, (0, 0), empty, 0, f"{split.json_file}: skipped image id {iid} ({Path(im_file).name}): {reason}"
    labels = split.labels[i]
    _, first = np.unique(labels, axis=0, return_index=True)
    n_dup = len(labels) - len(first)
    msg = ""
    if n_dup:
        labels = labels[np.sort(first)]
        msg = f"{split.json_file}: image id {iid}: {n_dup} duplicate box{'es' if n_dup > 1 else ''} dropped"
    return (LABELLED if len(labels) else BACKGROUND_EMPTY), size, labels, n_dup, msg


def scan_coco_json(json_file, images=None, nc=None, prefix: str = "") -> dict:
    """scan_labels for a COCO instances json whose images are in `images` (None: coco_json.image_folder's search):
    the same dict, plus im_files, image_ids, category_ids, names, notes and n_crowd over the json's image entries.
    Bad entries are logged and marked CORRUPT."""
    json_file = Path(json_file).resolve()
    given = None if images is None else str(Path(images).resolve())
    beside = json_file.with_suffix(".cache")
    fallback = user_cache_dir() / "labels" / f"{json_file.stem}-{hashlib.sha1(str(beside).encode()).hexdigest()[:16]}.cache"

    def folder(image_dir):  # a cache of a given folder must not serve a load that searches (and back)
        return given if given is not None else f"searched {image_dir}"

    def current(d):  # the signature the cached file list has now
        return _coco_signature(json_file, folder(d["image_dir"]), d["im_files"])

    cached, where = _first_readable_cache((beside, fallback), current)
    if cached is None:
        try:
            split = coco_json.parse(json_file, given)
        except coco_json.CocoJsonError as e:
            raise DatasetError(f"{prefix}{e}") from None
        with ThreadPool(min(8, os.cpu_count() or 1)) as pool:
            results = pool.starmap(_verify_coco_image, [(split, i) for i in range(len(split.im_files))])
        labels = [r[2] for r in results]
        cached = {
            "version": np.array(LABEL_CACHE_VERSION),
            "signature": np.array(_coco_signature(json_file, folder(split.image_dir), split.im_files)),
            "status": np.array([r[0] for r in results], np.int8),
            "shapes": np.array([r[1] for r in results], np.int64).reshape(-1, 2),
            "counts": np.array([len(lb) for lb in labels], np.int64),
            "labels": np.concatenate(labels, 0) if labels else np.zeros((0, 5), np.float32),
            "duplicates": np.array([r[3] for r in results], np.int64),
            "messages": np.array([r[4] for r in results], dtype=np.str_),
            "im_files": np.array(split.im_files, dtype=np.str_),
            "image_ids": np.array(split.image_ids, np.int64),
            "category_ids": np.array(split.category_ids, np.int64),
            "names": np.array(split.names, dtype=np.str_),
            "notes": np.array(split.notes, dtype=np.str_),
            "n_crowd": np.array(split.n_crowd),
            "image_dir": np.array(split.image_dir),
        }
        where = _write_label_cache(cached, beside, fallback, prefix)
    cached = dict(cached)
    if nc is not None and len(cached["category_ids"]) != int(nc):
        raise DatasetError(f"{prefix}{json_file} has {len(cached['category_ids'])} categories but the data yaml "
                           f"names {nc} classes")
    for msg in (*cached["notes"], *cached["messages"]):
        if msg:
            LOGGER.warning(f"{prefix}WARNING: {msg}")
    status = cached["status"]
    n_corrupt = int((status == CORRUPT).sum())
    n_background = int((status == BACKGROUND_EMPTY).sum())
    LOGGER.info(f"{prefix}Scanning {json_file}... {len(status) - n_corrupt} images, {n_background} backgrounds, "
                f"{n_corrupt} skipped, {int(cached['duplicates'].sum())} duplicate boxes dropped, "
                f"{int(cached['n_crowd'])} crowd regions not trained on (cache: {where})")
    cached["cache"] = str(where)
    return cached


def _reject_classes_outside(scan: dict, im_files, label_files, nc: int) -> None:
    """Mark images whose labels hold a class id >= nc as corrupt (in place), with a message each."""
    counts = scan["counts"].copy()
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    messages, status = scan["messages"].astype(object), scan["status"].copy()
    duplicates = scan["duplicates"].copy()
    keep_rows = np.ones(len(scan["labels"]), bool)
    for i in np.flatnonzero(counts):
        cls = scan["labels"][starts[i]:starts[i] + counts[i], 0]
        if cls.max() >= nc:
            status[i] = CORRUPT
            messages[i] = (f"{im_files[i]}: skipped, {label_files[i]}: "
                           f"class id {int(cls.max())} >= nc={nc}")
            keep_rows[starts[i]:starts[i] + counts[i]] = False
            counts[i] = duplicates[i] = 0
    scan["status"], scan["counts"], scan["labels"] = status, counts, scan["labels"][keep_rows]
    scan["duplicates"] = duplicates
    scan["messages"] = messages.astype(np.str_)


# --------------------------------------------------------------------------------------------------- dataset

class LoadImagesAndLabels(Dataset):
    """A YOLO-format detection dataset with YOLOv5's training augmentation and validation letterbox.

    Indexing with an int uses `self.epoch` (set_epoch) for the random draws; indexing with an
    (epoch, index) pair, as SeededSampler does, carries the epoch into worker processes.
    Items are Sample tuples (image uint8 (3, H, W) RGB, targets (n, 6) [0, cls, cx, cy, w, h] normalised to
    the output image, image path, shapes, unreadable paths) with shapes = ((h0, w0), ((ratio_h, ratio_w),
    (pad_w, pad_h))) for letterboxed images and None for mosaics. Augmentation hyp keys absent from `hyp`
    are off.
    """

    def __init__(self, path, img_size=640, batch_size=16, augment=False, hyp=None, rect=False, cache_images=None,
                 single_cls=False, stride=32, pad=0.0, seed=0, prefix="", nc=None):
        if augment and hyp is None:
            raise ValueError("augment=True needs the augmentation hyperparameters (hyp)")
        self.img_size, self.augment, self.rect, self.stride = int(img_size), augment, rect, int(stride)
        self.hyp = dict(hyp or {})
        self.mosaic = augment and not rect  # rectangular batches keep each image's own aspect ratio
        self.mosaic_border = (-self.img_size // 2, -self.img_size // 2)
        self.seed, self.epoch, self.prefix, self.nc = int(seed), 0, prefix, nc
        if augment and self.hyp.get("copy_paste", 0) > 0:
            LOGGER.info(f"{prefix}copy_paste={self.hyp['copy_paste']} ignored: it needs segment labels, "
                        "which box labels do not have")

        is_json = coco_json.is_coco_json(path)
        if is_json:
            split = coco_json.JsonSplit.of(path)
            scan = scan_coco_json(split.json_file, split.images, nc=nc, prefix=prefix)
            files = [str(f) for f in scan["im_files"]]
        else:
            files = list_image_files(path, prefix)
            scan = scan_labels(files, img2label_paths(files), nc=nc, source=path, prefix=prefix)
        per_image = np.split(scan["labels"], np.cumsum(scan["counts"])[:-1]) if len(files) else []
        keep = scan["status"] != CORRUPT
        self.im_files = [f for f, k in zip(files, keep) if k]
        if not self.im_files:
            raise DatasetError(f"{prefix}no usable images in {path}: every image was skipped (see warnings)")
        self.label_files = [str(path)] * len(self.im_files) if is_json else img2label_paths(self.im_files)
        self.coco = coco_json.CocoSource(
            str(Path(path).resolve()), dict(zip(self.im_files, (int(i) for i, k in zip(scan["image_ids"], keep) if k))),
            [int(c) for c in scan["category_ids"]]) if is_json else None  # fmt: skip
        self.labels = [lb.astype(np.float32).copy() for lb, k in zip(per_image, keep) if k]
        self.shapes = scan["shapes"][keep]  # (n, 2) width, height
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        if not any(len(lb) for lb in self.labels):
            LOGGER.warning(f"{prefix}WARNING: no labels found in {path}; every image is a background")
        self.n = len(self.im_files)
        self.batch = np.arange(self.n) // max(int(batch_size), 1)  # batch index of each image
        self.batch_shapes = None
        if rect:
            self._sort_into_rect_batches(max(int(batch_size), 1), pad)

        self.ims = [None] * self.n  # RAM cache of resized images
        self.im_hw0 = [None] * self.n
        self.npy_files = None  # disk cache of decoded images
        if cache_images in ("ram", True):
            self.cache_in_ram()
        elif cache_images == "auto":
            self.cache_in_ram(auto=True)
        elif cache_images == "disk":
            self.cache_on_disk()
        elif cache_images not in (None, False, "", "off"):
            raise ValueError(f"cache_images must be None, 'off', 'auto', 'ram' or 'disk', got {cache_images!r}")

    def __len__(self):
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ------------------------------------------------------------------------------------------- geometry
    def _sort_into_rect_batches(self, batch_size: int, pad: float) -> None:
        """Order images by aspect ratio and give each batch the smallest stride-multiple shape (h, w)
        that letterboxes all of its images at img_size."""
        aspect = self.shapes[:, 1] / self.shapes[:, 0]  # h / w
        order = np.argsort(aspect, kind="stable")
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.shapes, aspect = self.shapes[order], aspect[order]
        n_batches = int(self.batch[-1]) + 1
        rel = np.ones((n_batches, 2))
        for b in range(n_batches):
            a = aspect[self.batch == b]
            if a.max() < 1:  # all landscape: full width, height of the tallest
                rel[b] = (a.max(), 1.0)
            elif a.min() > 1:  # all portrait: full height, width of the widest
                rel[b] = (1.0, 1.0 / a.min())
        self.batch_shapes = (np.ceil(rel * self.img_size / self.stride + pad).astype(int) * self.stride)

    # ------------------------------------------------------------------------------------------- images
    def resized_size(self, w0: int, h0: int) -> tuple[int, int]:
        """(w, h) of a w0 x h0 image after load_image: long side img_size, aspect ratio kept, the short side
        rounded up as YOLOv5's load_image does (640x426 at 256 -> 256x171, not 256x170). A sharp model's scores
        move a lot with one pixel of input size, so rounding the other way loses mAP parity with YOLOv5."""
        r = self.img_size / max(h0, w0)
        if r == 1:
            return w0, h0
        return min(self.img_size, max(1, math.ceil(w0 * r))), min(self.img_size, max(1, math.ceil(h0 * r)))

    def load_image(self, i: int):
        """Image i resized so its long side is img_size: (image BGR, (h0, w0), (h, w)).
        Raises UnreadableImageError when the file is gone or cannot be decoded any more."""
        if self.ims[i] is not None:
            return self.ims[i], self.im_hw0[i], self.ims[i].shape[:2]
        f = self.im_files[i]
        if self.npy_files is not None and os.path.isfile(self.npy_files[i]):
            im = np.load(self.npy_files[i], allow_pickle=False)
        else:
            # the existence check first: OpenCV prints a warning of its own for a missing file
            im = cv2.imread(f) if os.path.isfile(f) else None
            if im is None:
                raise UnreadableImageError(f"{f}: image could not be read (changed or removed since the label scan?)")
        h0, w0 = im.shape[:2]
        w, h = self.resized_size(w0, h0)
        if (w, h) != (w0, h0):
            interp = cv2.INTER_LINEAR if (self.augment or self.img_size > max(h0, w0)) else cv2.INTER_AREA
            im = cv2.resize(im, (w, h), interpolation=interp)
        return im, (h0, w0), im.shape[:2]

    def _resized_bytes(self) -> int:
        sizes = [self.resized_size(int(w), int(h)) for w, h in self.shapes]
        return int(sum(w * h * 3 for w, h in sizes))

    def replay_bytes(self) -> int:
        """Bytes of one pass's collated images, letterboxed to their batch's shape (uint8): what ReplayLoader keeps."""
        if self.batch_shapes is not None:
            hw = self.batch_shapes[self.batch]
            return int((hw[:, 0] * hw[:, 1]).sum() * 3)
        return self.n * 3 * self.img_size**2

    def cache_in_ram(self, auto: bool = False) -> None:
        """Decode and resize every image once and keep it in memory (skipped when memory is short). With `auto`,
        only when the images take at most AUTO_CACHE_SHARE of the available memory: a small dataset is then
        decoded once instead of every epoch (JPEG decoding is most of a sample's cost), with identical samples.
        A split without augmentation, once cached, is also replayed (ReplayLoader keeps its collated batches for
        the run): `auto` counts those batches too."""
        need, available = self._resized_bytes(), _available_memory()
        if auto and available is None:
            LOGGER.info(f"{self.prefix}Not caching images in RAM ({need / 2**20:.0f} MiB): the available memory "
                        f"is unknown; --cache ram caches it")
            return
        replayed = 0 if self.augment else self.replay_bytes()
        if auto and need + replayed > AUTO_CACHE_SHARE * available:
            with_replay = f" with {replayed / 2**20:.0f} MiB of replayed batches" if replayed else ""
            LOGGER.info(f"{self.prefix}Not caching images in RAM ({(need + replayed) / 2**20:.0f} MiB{with_replay} "
                        f"is more than {AUTO_CACHE_SHARE:.0%} of the available memory); --cache ram caches it "
                        f"(up to {RAM_CACHE_SHARE:.0%} of available memory)")
            return
        if available is not None and need > RAM_CACHE_SHARE * available:
            LOGGER.warning(f"{self.prefix}WARNING: not caching images in RAM: {need / 2**30:.1f} GiB needed, "
                           f"{available / 2**30:.1f} GiB available")
            return
        with ThreadPool(min(8, os.cpu_count() or 1)) as pool:
            for i, (im, hw0, _) in enumerate(pool.imap(self.load_image, range(self.n))):
                self.ims[i], self.im_hw0[i] = im, hw0
        LOGGER.info(f"{self.prefix}Cached {self.n} images in RAM ({need / 2**20:.0f} MiB)")

    def cache_on_disk(self) -> None:
        """Save each decoded image as .npy beside it (or in the user cache when that folder is read-only);
        a .npy older than its image is rewritten."""
        folders = {}
        for f in self.im_files:
            d = Path(f).parent
            if d not in folders:
                fallback = user_cache_dir() / "npy" / hashlib.sha1(str(d).encode()).hexdigest()[:16]
                folders[d] = d if writable_dir(d) else fallback
                if folders[d] != d:
                    LOGGER.info(f"{self.prefix}Image folder {d} is read-only; .npy cache kept in {folders[d]}")
        npy = [str(folders[Path(f).parent] / (Path(f).stem + ".npy")) for f in self.im_files]
        stale = [i for i, (f, c) in enumerate(zip(self.im_files, npy))
                 if not os.path.isfile(c) or os.stat(c).st_mtime_ns < os.stat(f).st_mtime_ns]
        need = int((self.shapes[stale].prod(1) * 3).sum()) if stale else 0
        target = next(iter(folders.values()))
        target.mkdir(parents=True, exist_ok=True)
        if need > 0.9 * shutil.disk_usage(target).free:
            LOGGER.warning(f"{self.prefix}WARNING: not caching images on disk: {need / 2**30:.1f} GiB needed")
            return

        def save(i):
            im = cv2.imread(self.im_files[i])
            if im is None:
                raise FileNotFoundError(f"{self.im_files[i]}: image could not be read")
            _write_atomic(Path(npy[i]), lambda f: np.save(f, im, allow_pickle=False))

        for d in set(folders.values()):
            d.mkdir(parents=True, exist_ok=True)
        with ThreadPool(min(8, os.cpu_count() or 1)) as pool:
            pool.map(save, stale)
        self.npy_files = npy
        LOGGER.info(f"{self.prefix}Images cached on disk as .npy ({len(stale)} written, {self.n - len(stale)} reused)")

    # ------------------------------------------------------------------------------------------- samples
    def load_mosaic(self, index: int, rng: np.random.Generator, source: "SampleImages"):
        """Image `index` and three random others in a mosaic, then warped and cropped to img_size square.
        Returns (image, pixel labels, index of the image shown in place of `index`).

        The four are placed in a random order, as YOLOv5 does: were `index` always top-left, the crop
        around the mosaic centre would only ever show the bottom-right part of it.
        """
        others = rng.integers(0, self.n, 3)
        indices = [[index, *(int(i) for i in others)][j] for j in rng.permutation(4)]
        tiles = [source.load(i) for i in indices]  # (index shown, image, (h0, w0), (h, w))
        img, labels = mosaic4([t[1] for t in tiles], [self.labels[t[0]] for t in tiles], self.img_size, rng)
        h = self.hyp
        img, labels = random_perspective(img, labels, rng, degrees=h.get("degrees", 0.0),
                                         translate=h.get("translate", 0.0), scale=h.get("scale", 0.0),
                                         shear=h.get("shear", 0.0), perspective=h.get("perspective", 0.0),
                                         border=self.mosaic_border)
        return img, labels, tiles[indices.index(index)][0]

    def __getitem__(self, item) -> Sample:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        index = int(index)
        rng = sample_rng(self.seed, epoch, index)
        source = SampleImages(self, epoch)
        h = self.hyp

        if self.mosaic and rng.random() < h.get("mosaic", 0.0):
            img, labels, shown = self.load_mosaic(index, rng, source)
            shapes = None
            if rng.random() < h.get("mixup", 0.0):
                img2, labels2, _ = self.load_mosaic(int(rng.integers(0, self.n)), rng, source)
                img, labels = mixup(img, labels, img2, labels2, rng)
        else:
            shown, loaded, (h0, w0), (hr, wr) = source.load(index)
            shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
            img, (ratio_w, ratio_h), (pad_w, pad_h) = letterbox(loaded, shape, auto=False, scaleup=self.augment)
            if img is loaded and self.augment:
                img = img.copy()  # never let in-place augmentation touch the RAM cache
            shapes = (h0, w0), ((hr / h0 * ratio_h, wr / w0 * ratio_w), (pad_w, pad_h))
            labels = self.labels[shown].copy() if shown is not None else np.zeros((0, 5), np.float32)
            if len(labels):
                labels[:, 1:] = xywhn2xyxy(labels[:, 1:], ratio_w * wr, ratio_h * hr, pad_w, pad_h)
            if self.augment:
                img, labels = random_perspective(img, labels, rng, degrees=h.get("degrees", 0.0),
                                                 translate=h.get("translate", 0.0), scale=h.get("scale", 0.0),
                                                 shear=h.get("shear", 0.0), perspective=h.get("perspective", 0.0))

        n = len(labels)
        if n:
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=img.shape[1], h=img.shape[0], clip=True, eps=1e-3)
        if self.augment:
            augment_hsv(img, rng, hgain=h.get("hsv_h", 0.0), sgain=h.get("hsv_s", 0.0), vgain=h.get("hsv_v", 0.0))
            img, labels = random_flips(img, labels, rng, flipud=h.get("flipud", 0.0), fliplr=h.get("fliplr", 0.0))

        targets = np.zeros((n, 6), np.float32)
        targets[:, 1:] = labels
        path = self.im_files[index if shown is None else shown]
        return Sample(torch.from_numpy(to_chw_rgb(img)), torch.from_numpy(targets), path, shapes,
                      source.unreadable_paths())

    @staticmethod
    def collate_fn(batch) -> Batch:
        """Stack images; concatenate targets with column 0 set to each target's image index in the batch."""
        imgs, targets, paths, shapes, unreadable = zip(*batch)
        for i, t in enumerate(targets):
            t[:, 0] = i
        unreadable = tuple(dict.fromkeys(p for u in unreadable for p in u))  # distinct, in order
        # Not stacked into shared memory as default_collate does in a worker: that saves a copy but leaves
        # glibc's heap thresholds low, and the freshly mapped pages of the next samples cost more than the
        # copy (bench/data_speed.py's page_faults).
        # Stacked straight into channels_last, the models' layout: the permuting copy is made here, in the worker,
        # instead of on the main process's path to the next step (a no-op there now).
        stacked = torch.empty((len(imgs), *imgs[0].shape), dtype=imgs[0].dtype, memory_format=torch.channels_last)
        return Batch(torch.stack(imgs, 0, out=stacked), torch.cat(targets, 0), paths, shapes, unreadable)


def to_chw_rgb(im: np.ndarray) -> np.ndarray:
    """A new contiguous (3, H, W) RGB array from an (H, W, 3) BGR image, also from the flipped views that
    np.flipud / np.fliplr return: equal to np.ascontiguousarray(im.transpose(2, 0, 1)[::-1]), at a third
    of its cost (OpenCV deinterleaves into the output planes, then flips each plane in place)."""
    flip_rows, flip_cols = im.strides[0] < 0, im.strides[1] < 0
    base = im[::-1 if flip_rows else 1, ::-1 if flip_cols else 1]  # the unflipped array behind a view
    if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8 or not base.flags.c_contiguous:
        return np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])
    out = np.empty((3, *im.shape[:2]), np.uint8)
    planes = cv2.split(base, [out[2], out[1], out[0]])
    if planes[0].ctypes.data != out[2].ctypes.data:  # OpenCV wrote elsewhere: out holds nothing
        return np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])
    if flip_rows or flip_cols:
        code = -1 if flip_rows and flip_cols else (0 if flip_rows else 1)  # OpenCV's flip codes
        for plane in out:
            cv2.flip(plane, code, dst=plane)
    return out


class SampleImages:
    """The images of one sample (one, four for a mosaic, eight with mixup), standing in for unreadable ones.

    load(i) returns (index whose labels go with the image, image, (h0, w0), (h, w)). When image i cannot be
    read, in training the first readable image of substitute_order(seed, epoch, i) stands in for it; in
    validation it is a grey image of the size image i would have had, and the index is None (no labels).
    """

    def __init__(self, dataset: LoadImagesAndLabels, epoch: int):
        self.dataset, self.epoch = dataset, epoch
        self.unreadable: dict[int, None] = {}  # indices found unreadable, in order (a dict as an ordered set)

    def _try(self, i: int):
        if i in self.unreadable:
            return None
        try:
            return self.dataset.load_image(i)
        except UnreadableImageError:
            self.unreadable[i] = None
            return None

    def load(self, i: int):
        ds = self.dataset
        loaded = self._try(i)
        if loaded is not None:
            return (i, *loaded)
        if not ds.augment:
            w0, h0 = (int(v) for v in ds.shapes[i])
            w, h = ds.resized_size(w0, h0)
            return None, np.full((h, w, 3), FILL_VALUE, np.uint8), (h0, w0), (h, w)
        for j in substitute_order(ds.seed, self.epoch, i, ds.n):
            loaded = self._try(int(j))
            if loaded is not None:
                return (int(j), *loaded)
        raise DatasetError(f"{ds.im_files[i]}: image could not be read, nor any other image of the dataset "
                           "(removed since the label scan?)")

    def unreadable_paths(self) -> tuple[str, ...]:
        return tuple(self.dataset.im_files[i] for i in self.unreadable)


# --cache auto (train.py's default) keeps decoded images in RAM when they take at most this share of the memory
# available, so a small dataset is decoded once instead of every epoch.
AUTO_CACHE_SHARE = 0.1
# --cache ram still refuses above this share: the cache must leave room for the workers and the model.
RAM_CACHE_SHARE = 0.8


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat_value(path: Path, key: str) -> int | None:
    """The number after `key` in a file of "key value" lines (memory.stat; "Key: value kB" in /proc/meminfo), or
    None when the file or the key is missing."""
    try:
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0].removesuffix(":") == key:
                return int(fields[1])
    except (OSError, ValueError):
        pass
    return None


def _cgroup_memory_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this container's memory cgroup (v2, else v1, under root) may still take, or None without a limit.

    Page cache the kernel would drop first (inactive_file) is not counted as used, as `docker stats` does:
    reading the dataset fills the cache, and that must not make the memory look spent.
    """
    for limit_file, usage_file, stat_file, inactive_key in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
             "total_inactive_file")):
        if not (root / limit_file).is_file():
            continue
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is None or usage is None:  # "max" (v2's no limit) or unreadable
            return None
        used = max(usage - (_stat_value(root / stat_file, inactive_key) or 0), 0)
        return max(limit - used, 0)
    return None


def _available_memory(meminfo: Path = Path("/proc/meminfo"),
                      cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of memory available to new allocations, or None when unknown: Linux MemAvailable, capped by the
    container's cgroup limit, which MemAvailable ignores (it reports the host's memory)."""
    host = _stat_value(meminfo, "MemAvailable")  # in kB
    host = None if host is None else host * 1024
    container = _cgroup_memory_headroom(cgroup_root)
    known = [m for m in (host, container) if m is not None]
    return min(known) if known else None


# ------------------------------------------------------------------------------------------ sampling, loader

def epoch_shuffle_seed(seed: int, epoch: int) -> int:
    """The torch.Generator seed of an epoch's shuffle: a hash of (seed, epoch)."""
    mask = (1 << 64) - 1
    words = np.random.SeedSequence([int(seed) & mask, int(epoch) & mask]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class SeededSampler(Sampler):
    """Yields (epoch, index) pairs in an order fixed by (seed, epoch); set_epoch before each epoch.

    With world_size > 1, each rank takes every world_size-th element of the epoch's order starting at
    its rank; the order is first padded by repeating its last element so that all ranks get the same
    number of samples (repeating the last, not the first, keeps rectangular batches uniform in shape).
    """

    def __init__(self, n: int, shuffle: bool = False, seed: int = 0, rank: int = -1, world_size: int = 1):
        self.n, self.shuffle, self.seed = int(n), bool(shuffle), int(seed)
        self.world_size = max(int(world_size), 1) if rank >= 0 else 1
        self.rank = max(int(rank), 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank {rank} is not below world_size {world_size}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        """This rank's indices for the current epoch."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(epoch_shuffle_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world_size > 1:
            order += order[-1:] * (len(self) * self.world_size - self.n)
            order = order[self.rank::self.world_size]
        return order

    def __iter__(self):
        epoch = self.epoch
        return iter([(epoch, i) for i in self.order()])

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)


class SeededDataLoader(DataLoader):
    """A DataLoader over a SeededSampler; set_epoch(e) fixes epoch e's order and augmentation."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class ReplayLoader:
    """A validation loader's batches, collated once and replayed on every later pass.

    For a split whose samples never change (no augmentation) and whose images are all cached in RAM, such as the
    validation train.py runs every epoch: letterboxing, collation and the workers' hand-offs are then paid once
    per run instead of once per epoch, for as much memory again as the cache. The replayed batches are the same
    objects on every pass, so their users must not change them in place (val.run does not). A pass that stops
    early is not kept; after the first full one the loader and its workers are let go.
    """

    def __init__(self, loader: DataLoader):
        # Kept batches are not pinned: they stay for the whole run, and torch's pinned-memory allocator rounds each
        # block up to a power of two, so a COCO-sized split would hold GBs of page-locked memory beyond the cache.
        loader.pin_memory = False
        self.loader, self.dataset, self.batch_size = loader, loader.dataset, loader.batch_size
        self.num_workers, self.pin_memory = loader.num_workers, False
        self._length = len(loader)
        self._batches: list | None = None

    @staticmethod
    def suits(loader: DataLoader) -> bool:
        """Whether every pass over the loader gives the same batches from memory: no augmentation, every image
        cached in RAM."""
        ds = loader.dataset
        return not ds.augment and all(im is not None for im in ds.ims)

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        return iter(self._batches) if self._batches is not None else self._first_pass()

    def collate_now(self) -> None:
        """Make the first pass now. train.py calls it at set-up: forking the loader's workers later, from a process
        whose heap training has grown (allocator.reuse_freed_memory keeps it), shares that heap copy-on-write and
        cost the first validation of the 16-image job about 0.6 s of page faults."""
        for _ in self:
            pass

    def _first_pass(self):
        batches = []
        for batch in self.loader:
            batches.append(batch)
            yield batch
        self._batches, self.loader = batches, None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow), else the count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def dataloader_workers(workers: int, batch_size: int, world_size: int = 1) -> int:
    """Worker processes per loader: the requested number, at most this process's share of the CPUs (the
    world_size DDP ranks on the machine share them) and at most one per image of a batch."""
    return max(0, min(int(workers), usable_cpus() // max(int(world_size), 1), int(batch_size)))


def create_dataloader(path, imgsz, batch_size, stride, single_cls=False, hyp=None, augment=False, cache=None,
                      pad=0.0, rect=False, rank=-1, world_size=1, workers=8, shuffle=False, seed=0, nc=None,
                      prefix="", pin_memory=False):
    """Build (loader, dataset). batch_size is per process; under DDP (rank >= 0) each of world_size ranks
    gets a strided share of every epoch's order. Workers are persistent: the epoch travels with the index;
    loader.num_workers is the number really used (dataloader_workers). With rect, shuffling is turned off
    (batches are formed from images sorted by aspect ratio) and the rect shapes are computed for the global
    batch (batch_size * world_size), which each rank's strided batch falls inside. pin_memory=True (for a
    CUDA device only: pinning opens a CUDA context) makes host-to-GPU copies of the batches asynchronous.
    The loader yields Batch tuples.
    """
    if rect and shuffle:
        LOGGER.warning(f"{prefix}WARNING: --rect is incompatible with shuffling; shuffle=False")
        shuffle = False
    ranks = max(int(world_size), 1) if rank >= 0 else 1
    dataset = LoadImagesAndLabels(path, imgsz, batch_size * ranks, augment=augment, hyp=hyp, rect=rect,
                                  cache_images=cache, single_cls=single_cls, stride=int(stride), pad=pad, seed=seed,
                                  prefix=prefix, nc=nc)
    batch_size = max(1, min(batch_size, len(dataset)))
    nw = dataloader_workers(workers, batch_size, ranks)
    sampler = SeededSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=ranks)
    loader = SeededDataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=nw,
                              pin_memory=bool(pin_memory), collate_fn=LoadImagesAndLabels.collate_fn,
                              persistent_workers=nw > 0)
    return loader, dataset
