"""COCO json formats and pycocotools' COCOeval: predictions out, ground truth from YOLO labels, scoring.

YOLO datasets number the 80 COCO classes 0-79; the COCO json files use the original category ids
1-90 (with gaps). Image ids are the integers in COCO's file names (000000000009.jpg -> 9); other
datasets keep the file stem as a string id.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from utils.boxes import xyxy2xywh
from utils.log import LOGGER

# COCO's 80 detection categories among ids 1..90: the ten ids that were never annotated are missing.
_COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)


def coco80_to_91() -> list[int]:
    """COCO category id (1..90) of each of the 80 YOLO class indices."""
    return [i for i in range(1, 91) if i not in _COCO_UNUSED_IDS]


def category_map(nc: int) -> list[int]:
    """Category id used in json files for each class index: COCO's ids for an 80-class dataset, else the index."""
    return coco80_to_91() if nc == 80 else list(range(nc))


def image_id_from_path(path) -> int | str:
    """COCO image id of an image file: its stem as an int when numeric ('000000000009' -> 9), else the stem."""
    stem = Path(path).stem
    return int(stem) if stem.isdecimal() else stem  # isnumeric() also admits '½', which int() refuses


def predictions_to_coco(detections, image_id, class_map: list[int]) -> list[dict]:
    """COCO result records for one image.

    detections: (n, 6) [x1, y1, x2, y2, conf, cls] in original-image pixels (tensor or array).
    Boxes become [x_min, y_min, width, height] rounded to 1/1000 pixel, scores rounded to 5 decimals.
    """
    det = detections.detach().cpu().double().numpy() if hasattr(detections, "detach") else np.asarray(detections, float)
    if not len(det):
        return []
    xywh = xyxy2xywh(det[:, :4])
    xywh[:, :2] -= xywh[:, 2:] / 2  # centre to top-left corner
    return [
        {
            "image_id": image_id,
            "category_id": class_map[int(c)],
            "bbox": [round(float(v), 3) for v in box],
            "score": round(float(s), 5),
        }
        for box, s, c in zip(xywh, det[:, 4], det[:, 5])
    ]


def yolo_labels_to_coco_gt(dataset, class_map: list[int] | None = None, names: list[str] | None = None) -> dict:
    """A COCO ground-truth dict built from a YOLO dataset's own labels (no crowd regions).

    dataset needs im_files, labels (list of (n, 5) [cls, cx, cy, w, h] normalised) and shapes
    ((n, 2) original width, height). Every class 0..nc-1 becomes a category so that COCOeval scores the
    same class set as our metrics (classes without boxes are then left out of its means).
    """
    max_cls = max((int(lb[:, 0].max()) for lb in dataset.labels if len(lb)), default=-1)
    nc = len(names) if names is not None else (len(class_map) if class_map is not None else max_cls + 1)
    if max_cls >= nc:
        raise ValueError(f"labels hold class {max_cls} but only {nc} classes are named")
    class_map = class_map if class_map is not None else category_map(nc)
    names = names if names is not None else [str(i) for i in range(nc)]
    images, annotations = [], []
    files_by_id: dict = {}
    for im_file, labels, (w, h) in zip(dataset.im_files, dataset.labels, np.asarray(dataset.shapes)):
        image_id = image_id_from_path(im_file)
        # COCOeval keys everything by image id: a shared id would silently merge two images' boxes
        if image_id in files_by_id:
            raise ValueError(f"{files_by_id[image_id]} and {im_file} have the same COCO image id {image_id!r}")
        files_by_id[image_id] = im_file
        images.append({"id": image_id, "file_name": Path(im_file).name, "width": int(w), "height": int(h)})
        for cls, cx, cy, bw, bh in np.asarray(labels, dtype=np.float64).reshape(-1, 5):
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
            annotations.append(
                {
                    # ids start at 1: COCOeval records a match by the gt id and treats 0 as "unmatched"
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": class_map[int(cls)],
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    example = {type(i): f for i, f in files_by_id.items()}
    if len(example) > 1:  # COCOeval sorts the ids, and an int and a str do not compare
        raise ValueError(f"COCO image ids must be all numbers or all names, but {example[int]} and {example[str]} mix them")
    categories = [{"id": class_map[i], "name": names[i], "supercategory": ""} for i in range(nc)]
    return {"images": images, "annotations": annotations, "categories": categories}


def find_annotations_json(split_path) -> Path | None:
    """The official COCO json of an image folder, if the dataset ships one.

    For DATASET/images/NAME the file is DATASET/annotations/instances_NAME.json.
    """
    if not split_path:
        return None
    if isinstance(split_path, (list, tuple)):
        if len(split_path) != 1:
            return None
        split_path = split_path[0]
    split = Path(split_path)
    if split.suffix == ".txt":  # an image list file, e.g. val2017.txt beside images/
        candidates = [split.parent / "annotations" / f"instances_{split.stem}.json"]
    else:
        root = split.parent.parent if split.parent.name == "images" else split.parent
        candidates = [root / "annotations" / f"instances_{split.name}.json"]
    return next((c for c in candidates if c.is_file()), None)


def _load_coco(gt):
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        if isinstance(gt, dict):
            coco = COCO()
            coco.dataset = gt
            coco.createIndex()
            return coco
        return COCO(str(gt))


def _summary_lines(coco_eval) -> tuple[np.ndarray, list[str]]:
    """COCOeval.summarize's twelve numbers, read at the largest maxDets we set.

    COCOeval.summarize hard-codes maxDets=100 for its first line and prints -1 when 100 is not in
    params.maxDets, so the summary is recomputed here from the accumulated arrays.
    """
    p = coco_eval.params
    precision, recall = coco_eval.eval["precision"], coco_eval.eval["recall"]
    area_index = {name: i for i, name in enumerate(p.areaRngLbl)}
    rows = [
        ("Average Precision", 1, None, "all", -1),
        ("Average Precision", 1, 0.5, "all", -1),
        ("Average Precision", 1, 0.75, "all", -1),
        ("Average Precision", 1, None, "small", -1),
        ("Average Precision", 1, None, "medium", -1),
        ("Average Precision", 1, None, "large", -1),
        ("Average Recall", 0, None, "all", 0),
        ("Average Recall", 0, None, "all", 1),
        ("Average Recall", 0, None, "all", -1),
        ("Average Recall", 0, None, "small", -1),
        ("Average Recall", 0, None, "medium", -1),
        ("Average Recall", 0, None, "large", -1),
    ]
    stats, lines = np.zeros(len(rows)), []
    for k, (title, is_ap, iou_thr, area, m) in enumerate(rows):
        values = precision if is_ap else recall
        if iou_thr is not None:
            values = values[np.isclose(p.iouThrs, iou_thr)]
        values = values[..., area_index[area], m]
        valid = values[values > -1]
        stats[k] = valid.mean() if valid.size else -1.0
        iou_str = f"{p.iouThrs[0]:0.2f}:{p.iouThrs[-1]:0.2f}" if iou_thr is None else f"{iou_thr:0.2f}"
        kind = "(AP)" if is_ap else "(AR)"
        lines.append(f" {title:<18} {kind} @[ IoU={iou_str:<9} | area={area:>6s} | maxDets={p.maxDets[m]:>3d} ] = {stats[k]:0.3f}")
    return stats, lines


def coco_evaluate(gt, predictions, img_ids=None, max_det: int = 300, use_cats: bool = True, verbose: bool = True):
    """Score COCO-format predictions with pycocotools' COCOeval (bbox), maxDets = [1, 10, max_det].

    gt: a COCO ground-truth dict, a json path or a pycocotools COCO; predictions: a list of result
    records or a json path. img_ids limits the evaluation to those images (default: every image in gt).
    Returns (mAP50-95, mAP50, stats) with stats COCOeval's twelve summary numbers; a run without
    predictions scores 0 (pycocotools cannot load an empty result list).
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt = _load_coco(gt)
    if not isinstance(predictions, list):
        predictions = json.loads(Path(predictions).read_text())
    known_images = set(coco_gt.getImgIds())
    kept = [d for d in predictions if d["image_id"] in known_images]
    if len(kept) < len(predictions):
        LOGGER.warning(f"COCOeval: {len(predictions) - len(kept)} predictions are for images absent from the ground truth; ignored")
    if not kept:
        LOGGER.warning("COCOeval: no predictions to score")
        return 0.0, 0.0, np.zeros(12)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(kept)
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        if img_ids is not None:
            coco_eval.params.imgIds = list(img_ids)
        coco_eval.params.maxDets = [1, 10, max_det]
        coco_eval.params.useCats = int(use_cats)
        coco_eval.evaluate()
        coco_eval.accumulate()
    stats, lines = _summary_lines(coco_eval)
    if verbose:
        for line in lines:
            LOGGER.info(line)
    return float(stats[0]), float(stats[1]), stats
