"""COCO-JSON datasets read as they are: a data yaml's train/val/test may name an `instances_*.json`.

    path: coco128
    train: annotations/instances_train2017.json   # images found beside it (see image_folder)
    val: annotations/instances_train2017.json
    images: images/train2017                      # optional: one folder, or {train: ..., val: ...}
    # names: optional; taken from the json's categories

Categories become the class ids 0..nc-1 in ascending category id order, named as in the json. Boxes marked
`iscrowd` are not training targets (COCOeval ignores the detections that fall on them, see val.py). An image
without annotations is a background. An image with a bad entry (a box outside the image by more than
OVERHANG_PX, a non-positive width or height, an unknown category id, a malformed box), an image whose file is
missing or whose size disagrees with the json, and a malformed image entry are named in a warning and left
out, as an image with a bad YOLO label line is; an annotation of an image id the json does not list is named
and ignored.

This module only reads the json; utils/dataloaders.py verifies the image files and caches the result like
YOLO labels, and val.py scores against the original json with pycocotools.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OVERHANG_PX = 1.0  # annotation tools round box corners; a box this far past the border is clipped to it, not bad


class CocoJsonError(ValueError):
    """A json file that cannot be used as a dataset at all; the message is one line naming it."""


@dataclass(frozen=True)
class JsonSplit:
    """A json split as check_dataset resolves it: the json and the yaml's `images:` folder for it (None: found by
    image_folder's search). It reads as the json's path (str, os.fspath, Path, f-strings), so it goes on wherever a
    split's path goes (train.py and val.py hand data['train'] / data['val'] to the loader) and the folder with it."""

    json_file: Path
    images: Path | None = None

    def __str__(self) -> str:
        return str(self.json_file)

    def __fspath__(self) -> str:
        return str(self.json_file)

    @classmethod
    def of(cls, source) -> JsonSplit:
        """`source` itself when it is a JsonSplit, else its json path with the folder left to the search."""
        return source if isinstance(source, cls) else cls(Path(source).resolve())


def is_coco_json(source) -> bool:
    """True for a JsonSplit or a single path ending in .json (a COCO instances file)."""
    return isinstance(source, JsonSplit) or (isinstance(source, (str, Path)) and str(source).lower().endswith(".json"))


def load_json(json_file) -> dict:
    """The json's content, checked to have the lists of a COCO instances file."""
    json_file = Path(json_file)
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CocoJsonError(f"COCO json {json_file} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CocoJsonError(f"COCO json {json_file} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("categories"), list):
        raise CocoJsonError(f"COCO json {json_file} has no 'images' and 'categories' lists: not a COCO instances file")
    if not isinstance(data.get("annotations", []), list):
        raise CocoJsonError(f"COCO json {json_file}: 'annotations' is not a list")
    return data


def categories(data: dict, json_file) -> tuple[list[int], list[str]]:
    """(category ids ascending, their names): class i is the i-th id."""
    by_id = {}
    for k, c in enumerate(data["categories"]):
        cid = c.get("id") if isinstance(c, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise CocoJsonError(f"COCO json {json_file}: category entry {k} has no integer 'id'")
        if cid in by_id:
            raise CocoJsonError(f"COCO json {json_file}: category id {cid} is listed twice")
        by_id[cid] = str(c.get("name", cid))
    if not by_id:
        raise CocoJsonError(f"COCO json {json_file} lists no categories")
    ids = sorted(by_id)
    return ids, [by_id[i] for i in ids]


def read_names(json_file) -> list[str]:
    """Class names of a COCO json, in class id order."""
    return categories(load_json(json_file), json_file)[1]


def image_folder(json_file, data: dict | None = None, given=None) -> Path:
    """Where the json's `file_name`s are: `given` (the yaml's `images:`), else the first of these that holds one
    of them: the json's own folder (Roboflow's layout), ROOT/images/NAME and ROOT/NAME (COCO's layouts, for
    ROOT/annotations/instances_NAME.json), ROOT/images."""
    json_file = Path(json_file).resolve()
    if given is not None:
        return Path(given)
    data = data if data is not None else load_json(json_file)
    root, name = json_file.parent.parent, json_file.stem.removeprefix("instances_")
    candidates = [json_file.parent, root / "images" / name, root / name, root / "images"]
    names = [im.get("file_name") for im in data["images"] if isinstance(im, dict) and isinstance(im.get("file_name"), str)]
    for folder in candidates:
        if folder.is_dir() and any((folder / n).is_file() for n in names):
            return folder
    raise CocoJsonError(f"the images of {json_file} are in none of {', '.join(str(c) for c in candidates)}; "
                        "give their folder as the data yaml's 'images:'")


@dataclass
class CocoSplit:
    """A json's usable content, one entry per image entry of the json (in the json's order)."""

    json_file: str
    image_dir: str
    category_ids: list[int]
    names: list[str]
    im_files: list[str] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) as the json says
    labels: list[np.ndarray] = field(default_factory=list)  # (n, 5) [cls, cx, cy, w, h] normalised, no crowd boxes
    problems: list[str] = field(default_factory=list)  # why the image is left out, or ''
    notes: list[str] = field(default_factory=list)  # warnings that leave nothing out (stray annotations)
    n_crowd: int = 0


def _box_problem(ann: dict, w: int, h: int, known: dict) -> tuple[str, list[float] | None]:
    """(reason this annotation is bad or '', its box clipped to the image)."""
    if ann.get("category_id") not in known:
        return f"unknown category id {ann.get('category_id')!r}", None
    box = ann.get("bbox")
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        return f"bbox {box!r} is not 4 numbers [x, y, width, height]", None
    x, y, bw, bh = (float(v) for v in box)
    if bw <= 0 or bh <= 0:
        return f"bbox {list(box)} has a non-positive size", None
    if x < -OVERHANG_PX or y < -OVERHANG_PX or x + bw > w + OVERHANG_PX or y + bh > h + OVERHANG_PX:
        return f"bbox {list(box)} lies outside the {w}x{h} image", None
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
    return "", [x1, y1, x2, y2]


def parse(json_file, given_images=None) -> CocoSplit:
    """Read a COCO instances json into per-image YOLO labels, naming every bad entry (see the module doc)."""
    json_file = Path(json_file).resolve()
    data = load_json(json_file)
    cat_ids, names = categories(data, json_file)
    folder = image_folder(json_file, data, given_images)
    cls_of = {cid: i for i, cid in enumerate(cat_ids)}
    out = CocoSplit(str(json_file), str(folder), cat_ids, names)

    position: dict[int, int] = {}  # image id -> index in out
    for k, im in enumerate(data["images"]):
        iid = im.get("id") if isinstance(im, dict) else None
        fname = im.get("file_name") if isinstance(im, dict) else None
        w, h = (im.get("width"), im.get("height")) if isinstance(im, dict) else (None, None)
        problem = ""
        if not isinstance(iid, int) or isinstance(iid, bool):
            problem = f"image entry {k} has no integer 'id'"
        elif iid in position:
            problem = f"image id {iid} is listed twice"
        elif not isinstance(fname, str) or not fname:
            problem = f"image id {iid} has no 'file_name'"
        elif not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
            problem = f"image id {iid} ({fname}) has no positive integer 'width' and 'height'"
        path = str(folder / fname) if isinstance(fname, str) and fname else str(folder / f"<entry {k}>")
        if not problem and not os.path.isfile(path):
            problem = f"image id {iid} ({fname}): image file not found: {path}"
        if isinstance(iid, int) and not isinstance(iid, bool) and iid not in position:
            position[iid] = len(out.im_files)  # also for an image left out: its annotations are not strays
        out.im_files.append(path)
        out.image_ids.append(iid if isinstance(iid, int) and not isinstance(iid, bool) else -1)
        out.sizes.append((w, h) if isinstance(w, int) and isinstance(h, int) else (0, 0))
        out.labels.append([])
        out.problems.append(f"{json_file}: skipped {problem}" if problem else "")

    for k, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict):
            out.notes.append(f"{json_file}: annotation entry {k} is not an object; ignored")
            continue
        i = position.get(ann.get("image_id"))
        if i is None:
            out.notes.append(f"{json_file}: annotation id {ann.get('id')} refers to image id {ann.get('image_id')!r}, "
                             "which the json does not list; ignored")
            continue
        if out.problems[i]:
            continue  # the image is left out already
        w, h = out.sizes[i]
        reason, xyxy = _box_problem(ann, w, h, cls_of)
        if reason:
            out.problems[i] = (f"{json_file}: skipped image id {out.image_ids[i]} ({Path(out.im_files[i]).name}), "
                               f"annotation id {ann.get('id')}: {reason}")
            continue
        if ann.get("iscrowd"):
            out.n_crowd += 1  # a crowd region: COCOeval ignores detections on it, training does not aim at it
            continue
        x1, y1, x2, y2 = xyxy
        out.labels[i].append([cls_of[ann["category_id"]], (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])
    out.labels = [np.array(lb, np.float32).reshape(-1, 5) for lb in out.labels]
    return out


@dataclass
class CocoSource:
    """What val.py needs of a dataset read from a COCO json: the json, each kept image's id, and the category id
    of each class."""

    json_file: str
    image_ids: dict[str, int]  # image path -> the json's image id
    category_ids: list[int]  # class index -> the json's category id

    def evaluate(self, predictions: list[dict], excluded=(), max_det: int = 300, use_cats: bool = True):
        """COCOeval of `predictions` (COCO result records with this json's ids) against the json itself, over the
        dataset's images less `excluded` paths: crowd regions and the original ids as COCO scores them. Images
        left out as bad entries are not scored. Returns (mAP50-95, mAP50, stats)."""
        from utils.coco import coco_evaluate

        left_out = set(map(str, excluded))
        img_ids = [i for f, i in self.image_ids.items() if f not in left_out]
        return coco_evaluate(scorable(load_json(self.json_file)), predictions, img_ids=img_ids, max_det=max_det,
                             use_cats=use_cats)


def scorable(data: dict) -> dict:
    """The json as pycocotools can index and score it: entries that are not objects dropped, and the optional keys
    that annotation tools leave out filled in (COCOeval reads every box's 'area' and 'iscrowd', indexes by 'id',
    and takes an id of 0 for 'unmatched'). The boxes themselves are left as they are."""
    images = [im for im in data["images"] if isinstance(im, dict) and isinstance(im.get("id"), int)]
    anns = [a for a in data.get("annotations", []) if isinstance(a, dict)]
    ids = [a.get("id") for a in anns]
    renumber = not all(isinstance(i, int) and i > 0 for i in ids) or len(set(ids)) != len(ids)
    for k, a in enumerate(anns, 1):
        if renumber:
            a["id"] = k
        box = a.get("bbox")
        if "area" not in a and isinstance(box, (list, tuple)) and len(box) == 4:
            a["area"] = float(box[2]) * float(box[3])
        a.setdefault("iscrowd", 0)
    return {**data, "images": images, "annotations": anns}
