"""Dataset yaml files: find the yaml, validate its keys, and resolve the dataset root and image folders.

A dataset yaml holds `path` (the dataset root), `train` and `val` (image folders, .txt lists of image
paths, or lists of either, relative to `path`), optional `test`, `names` (a list or an {id: name} map),
an optional `nc` that must agree with `names`, an optional `download` URL of a .zip/.tar archive, and an
optional `make`: the command that makes a dataset built locally (e.g. `python data/make_digits.py`), named in
the error when the dataset is missing and never run. A split may instead name a COCO `instances_*.json`
(utils/coco_json.py), its images beside it or in the yaml's `images:` (a folder, or a {split: folder} map);
`names` may then be left out and are the json's.

A relative `path` is looked up, in order, under $DATASETS_DIR, ROOT.parent/'datasets' and
ROOT.parent/'shared'/'datasets' (ROOT is this repository); an absolute `path` is used as it is; a yaml
without `path` takes the folder that holds the yaml. When the root is found nowhere and the yaml has a
`download` URL, the archive is fetched into the first writable candidate folder and unpacked there; a
failed attempt removes everything it created (folders included) and nothing else.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import yaml

from utils import coco_json
from utils.cli import read_text_file
from utils.log import LOGGER

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data"
DOWNLOAD_TIMEOUT_S = 30


class DatasetError(ValueError):
    """A dataset yaml or dataset that cannot be used; the message says which key or paths are at fault."""


def dataset_search_dirs() -> list[Path]:
    """Folders a relative dataset `path` is looked up in, in priority order."""
    dirs = []
    env = os.environ.get("DATASETS_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    dirs += [ROOT.parent / "datasets", ROOT.parent / "shared" / "datasets"]
    return dirs


def find_data_yaml(data: str | Path) -> Path:
    """The yaml file named by `data`: a path as given, or a bare name ('coco128', 'coco128.yaml') in data/."""
    p = Path(data).expanduser()
    candidates = [p]
    if not p.is_absolute() and len(p.parts) == 1:
        candidates += [DATA_DIR / p.name]
        if p.suffix not in (".yaml", ".yml"):
            candidates += [DATA_DIR / f"{p.name}.yaml"]
    if p.is_dir():
        raise DatasetError(f"--data {data} is a folder; give the dataset's yaml file (e.g. data/coco128.yaml)")
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise DatasetError(f"dataset yaml '{data}' not found; looked for: {', '.join(str(c) for c in candidates)}")


def _load_yaml(file: Path) -> dict:
    try:
        text = read_text_file(file, "--data")
    except ValueError as e:  # a binary file (a .pt, an image) given as the dataset yaml
        raise DatasetError(str(e)) from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DatasetError(f"dataset yaml {file} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise DatasetError(f"dataset yaml {file} must hold a mapping of keys (path, train, val, names)")
    return d


def _names_list(names, nc, where: str) -> list[str]:
    """names as a list indexed by class id; a dict must have the keys 0..nc-1."""
    if isinstance(names, dict):
        try:
            keyed = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: 'names' keys must be integer class ids, got {list(names)}") from None
        if sorted(keyed) != list(range(len(keyed))):
            raise DatasetError(f"{where}: 'names' keys must be the class ids 0..{len(keyed) - 1} without gaps, "
                               f"got {sorted(keyed)}")
        out = [keyed[i] for i in range(len(keyed))]
    elif isinstance(names, (list, tuple)):
        out = [str(n) for n in names]
    else:
        raise DatasetError(f"{where}: 'names' must be a list or a {{id: name}} mapping, got {type(names).__name__}")
    if not out:
        raise DatasetError(f"{where}: 'names' is empty")
    if nc is not None and int(nc) != len(out):
        raise DatasetError(f"{where}: nc={nc} disagrees with the {len(out)} entries of 'names'")
    return out


def _missing_dirs(d: Path) -> list[Path]:
    """d and its ancestors that do not exist yet, deepest first."""
    out = []
    while not d.exists() and d.parent != d:
        out.append(d)
        d = d.parent
    return out


def _move_into(src: Path, dst: Path, created: list[Path]) -> None:
    """Move src to dst, appending what this creates to `created`. Where dst is an existing folder, src's
    entries are moved into it one by one; an existing file is never replaced."""
    if not os.path.lexists(dst):
        os.replace(src, dst)
        created.append(dst)
    elif dst.is_dir() and src.is_dir() and not src.is_symlink():
        for child in sorted(src.iterdir()):
            _move_into(child, dst / child.name, created)


def _remove(paths) -> None:
    """Remove files and folder trees, last created first."""
    for p in reversed(list(paths)):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            p.unlink()


def _fetch_and_unpack(url: str, dest_dir: Path, expected: Path) -> None:
    """Download an archive and unpack it into dest_dir, which must then hold `expected`; raises on failure.

    The archive is downloaded and unpacked beside its destination under temporary names, then moved into
    place. Whatever fails (network, disk, a damaged archive, Ctrl-C), everything this attempt created is
    removed again, the folders it had to make included, and nothing that existed before is touched.
    """
    new_dirs = _missing_dirs(dest_dir)
    created: list[Path] = []  # placed into dest_dir
    scratch: list[Path] = []  # the partial download and the unpacking folder
    name = Path(url.split("?")[0]).name or "dataset.zip"
    done = False
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        LOGGER.info(f"Downloading {url} to {dest_dir} ...")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest_dir)
        scratch.append(Path(tmp))
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r:
            shutil.copyfileobj(r, f)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".unpack", dir=dest_dir))
        scratch.append(staging)
        if zipfile.is_zipfile(tmp):
            with zipfile.ZipFile(tmp) as z:
                z.extractall(staging)  # zipfile drops absolute and '..' member paths
        elif tarfile.is_tarfile(tmp):
            with tarfile.open(tmp) as t:
                t.extractall(staging, filter="data")
        else:
            raise ValueError(f"{url} is neither a zip nor a tar archive")
        if not (staging / expected.name).is_dir():
            held = ", ".join(sorted(e.name for e in staging.iterdir())) or "nothing"
            raise ValueError(f"the archive does not hold a folder {expected.name}/ (it holds: {held})")
        for entry in sorted(staging.iterdir()):
            _move_into(entry, dest_dir / entry.name, created)
        # _move_into never replaces an existing file, so a file or dangling link named like the dataset
        # leaves the unpacked folder unplaced; only a real folder at `expected` counts as success.
        if not expected.is_dir():
            raise ValueError(f"{expected} is not a folder after unpacking (a file or broken link is in the way)")
        done = True
    finally:
        if not done:
            _remove(created)
        _remove(scratch)
        for d in [] if done else new_dirs:  # deepest first; a folder that someone else filled meanwhile stays
            try:
                d.rmdir()
            except OSError:
                break


def writable_dir(d: Path) -> bool:
    """True when d (or its nearest existing ancestor) can be written to; mode bits are checked too, since
    os.access answers yes for root on a dr-xr-xr-x folder."""
    while not d.exists():
        if d.parent == d:
            return False
        d = d.parent
    return os.access(d, os.W_OK) and bool(d.stat().st_mode & 0o222)


def resolve_dataset_root(path_value, yaml_file: Path | None, download: str | None, autodownload: bool,
                         make: str | None = None) -> Path:
    """The absolute dataset root for a yaml `path` value, downloading it when allowed and needed; the error for a
    missing dataset names the yaml's `make` command, if it has one."""
    where = yaml_file or "dataset dict"
    if path_value in (None, ""):
        if yaml_file is None:
            raise DatasetError("dataset dict has no 'path' key and no yaml file to take the root from")
        return yaml_file.parent
    p = Path(str(path_value)).expanduser()
    if p.is_absolute():
        searched = [p]
    else:
        searched = [d / p for d in dataset_search_dirs()]
    for c in searched:
        if c.is_dir():
            return c.resolve()

    failure = ""
    if download and "://" not in str(download):
        failure = f"; 'download' is not a URL ({str(download)[:60]!r}); download scripts are not run"
    elif download and autodownload:
        targets = [c for c in searched if writable_dir(c.parent)]
        if not targets:
            failure = f"; download of {download} not attempted: no writable folder among the candidates"
        else:
            target = targets[0]
            try:
                _fetch_and_unpack(str(download), target.parent, target)
            except Exception as e:  # any network, disk or archive problem is reported in one line
                failure = (f"; download of {download} into {target.parent} failed (nothing left behind): "
                           f"{type(e).__name__}: {e}")
            else:
                LOGGER.info(f"Dataset downloaded to {target}")
                return target.resolve()
    elif download:
        failure = f"; automatic download from {download} is disabled"
    make_it = f"; make it with: {make}" if make else ""  # last: the command to copy
    raise DatasetError(f"{where}: dataset path '{path_value}' not found; searched: "
                       f"{', '.join(str(c) for c in searched)}{failure}; {_how_to_fix(p, download)}{make_it}")


def _how_to_fix(p: Path, download) -> str:
    """The end of the missing-dataset error: the ways to make the dataset findable, so that a fresh clone's
    first command says what to do rather than only where it looked."""
    if p.is_absolute():
        ways = [f"put the dataset at {p}", "or edit the yaml's 'path'"]
    else:
        ways = [f"set DATASETS_DIR=/path/to/folder if that folder holds {p}",
                f"or put {p} in {ROOT.parent / 'datasets'}"]
    if download and "://" in str(download):
        ways.append("or run online, so that the yaml's download fetches it")
    return "to fix: " + ", ".join(ways)


def _resolve_images(value, root: Path, key: str, where) -> str | list[str]:
    """Absolute image source(s) for train/val/test; every folder or list file must exist."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and any(coco_json.is_coco_json(i) for i in items):
        raise DatasetError(f"{where}: '{key}' lists a COCO json among other sources; give one json per split")
    out = []
    for item in items:
        p = Path(str(item)).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.exists():
            raise DatasetError(f"{where}: '{key}' images not found: {p} does not exist")
        out.append(str(p.resolve()))
    return out if isinstance(value, (list, tuple)) else out[0]


def _coco_json_splits(d: dict, root: Path, jsons: dict, names, where) -> list[str]:
    """Make each json split (resolved in d, as given in jsons) a coco_json.JsonSplit holding its `images:` folder,
    so that a loader handed the split alone reads the yaml's images; the class names (the json's when the yaml has
    none). Reads the first json only when the names must come from it."""
    images = d.get("images")
    folders = {k: v.images for k, v in jsons.items() if isinstance(v, coco_json.JsonSplit)}  # a dict checked before
    if images not in (None, ""):
        per_split = images if isinstance(images, dict) else {k: images for k in jsons}
        resolved = {}
        for key, folder in per_split.items():
            if key not in jsons:
                raise DatasetError(f"{where}: 'images' names split '{key}', which is not a COCO json split")
            p = Path(str(folder)).expanduser()
            p = p if p.is_absolute() else root / p
            if not p.is_dir():
                raise DatasetError(f"{where}: 'images' folder {p} does not exist")
            folders[key] = p.resolve()
            resolved[key] = str(p.resolve())
        d["images"] = resolved if isinstance(images, dict) else next(iter(resolved.values()))
    for key in jsons:
        d[key] = coco_json.JsonSplit(Path(d[key]), folders.get(key))
    if names is not None:
        return names
    key = next(iter(jsons))
    try:
        names = coco_json.read_names(d[key])
    except coco_json.CocoJsonError as e:
        raise DatasetError(f"{where}: '{key}': {e}") from None
    if d.get("nc") is not None and int(d["nc"]) != len(names):
        raise DatasetError(f"{where}: nc={d['nc']} disagrees with the {len(names)} categories of {d[key]}")
    return names


def check_dataset(data: str | Path | dict, autodownload: bool = True) -> dict:
    """Load and validate a dataset yaml (path, bare name or dict); return it with absolute paths.

    The returned dict has path (absolute str), train, val (absolute str or list of str; a COCO json split is a
    coco_json.JsonSplit), test (when given), names (list[str]), nc (int), yaml_file (str or None) and any other
    keys of the yaml.
    Raises DatasetError naming the missing key, or every folder searched for the dataset.
    """
    if isinstance(data, dict):
        d, yaml_file = dict(data), (Path(data["yaml_file"]) if data.get("yaml_file") else None)
    else:
        yaml_file = find_data_yaml(data)
        d = _load_yaml(yaml_file)
    where = yaml_file or "dataset dict"

    jsons = {k: d[k] for k in ("train", "val", "test") if coco_json.is_coco_json(d.get(k))}
    missing = [k for k in ("train", "val", "names") if d.get(k) in (None, "", []) and not (k == "names" and jsons)]
    if missing:
        raise DatasetError(f"{where}: missing required key{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(repr(k) for k in missing)}")
    names = _names_list(d["names"], d.get("nc"), where) if d.get("names") not in (None, "", []) else None

    root = resolve_dataset_root(d.get("path"), yaml_file, d.get("download"), autodownload, d.get("make"))
    d["path"] = str(root)
    for key in ("train", "val", "test"):
        if d.get(key) not in (None, "", []):
            d[key] = _resolve_images(d[key], root, key, where)
        elif key == "test":
            d.pop("test", None)
    if jsons:
        names = _coco_json_splits(d, root, jsons, names, where)
    d["names"], d["nc"] = names, len(names)
    d["yaml_file"] = str(yaml_file) if yaml_file else None
    return d
