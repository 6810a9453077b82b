"""utils/coco.py and utils/metrics.py against pycocotools' COCOeval on the same boxes."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from utils.coco import (
    coco80_to_91,
    coco_evaluate,
    find_annotations_json,
    image_id_from_path,
    predictions_to_coco,
    yolo_labels_to_coco_gt,
)
from utils.metrics import ap_per_class, match_predictions


def _xywh_to_xyxy(b):
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def our_map(gt: dict, predictions: list[dict]) -> tuple[float, float]:
    """Our metrics on COCO-format records: (mAP50-95, mAP50); categories mapped back to class indices."""
    to_cls = {c["id"]: i for i, c in enumerate(gt["categories"])}
    tps, confs, pcls, tcls = [], [], [], []
    for image in gt["images"]:
        g = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
        p = [d for d in predictions if d["image_id"] == image["id"]]
        g_box = _xywh_to_xyxy([a["bbox"] for a in g])
        g_cls = np.array([to_cls[a["category_id"]] for a in g])
        p_box = _xywh_to_xyxy([d["bbox"] for d in p])
        p_conf = np.array([d["score"] for d in p])
        p_cls = np.array([to_cls[d["category_id"]] for d in p])
        tps.append(match_predictions(p_box, p_conf, p_cls, g_box, g_cls))
        confs.append(p_conf)
        pcls.append(p_cls)
        tcls.append(g_cls)
    res = ap_per_class(np.concatenate(tps), np.concatenate(confs), np.concatenate(pcls), np.concatenate(tcls))
    _, _, map50, map50_95 = res.mean_results()
    return map50_95, map50


def _handmade_dataset(rng: np.random.Generator, n_images=8, nc=80):
    """Random YOLO labels over a few classes, including a repeated box and an image without boxes."""
    classes = [0, 11, 40, 79]  # 79: has boxes but will get no predictions
    im_files, labels, shapes = [], [], []
    for i in range(n_images):
        w, h = int(rng.integers(200, 640)), int(rng.integers(200, 640))
        n = 0 if i == 3 else int(rng.integers(1, 7))
        cx, cy = rng.uniform(0.2, 0.8, n), rng.uniform(0.2, 0.8, n)
        bw, bh = rng.uniform(0.05, 0.35, n), rng.uniform(0.05, 0.35, n)
        cls = rng.choice(classes, n)
        lb = np.stack([cls, cx, cy, bw, bh], 1) if n else np.zeros((0, 5))
        if i == 1 and n:
            lb = np.concatenate([lb, lb[:1]])  # the same object labelled twice
        im_files.append(f"/data/images/val/{1000 + i:012d}.jpg")
        labels.append(lb.astype(np.float32))
        shapes.append((w, h))
    return SimpleNamespace(im_files=im_files, labels=labels, shapes=np.array(shapes)), nc


def _handmade_predictions(rng: np.random.Generator, gt: dict) -> list[dict]:
    """Jittered hits (some duplicated, some with the wrong class), misses, false positives, varied scores."""
    preds = []
    for a in gt["annotations"]:
        if a["category_id"] == coco80_to_91()[79] or rng.random() < 0.15:
            continue  # missed
        x, y, w, h = a["bbox"]
        for _ in range(1 + int(rng.random() < 0.3)):  # sometimes a duplicate detection
            j = rng.uniform(-0.12, 0.12, 4) * [w, h, w, h]
            cat = a["category_id"] if rng.random() > 0.1 else coco80_to_91()[5]
            preds.append({"image_id": a["image_id"], "category_id": cat, "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]]})
    for image in gt["images"]:
        for _ in range(int(rng.integers(0, 4))):  # background false positives
            x, y = rng.uniform(0, image["width"] / 2), rng.uniform(0, image["height"] / 2)
            cat = coco80_to_91()[int(rng.choice([0, 11, 40, 5]))]
            preds.append({"image_id": image["id"], "category_id": cat, "bbox": [x, y, 40.0, 30.0]})
    scores = rng.permutation(len(preds)) + rng.uniform(0.1, 0.9, len(preds))  # distinct after rounding
    scores = scores / scores.max()
    for d, s in zip(preds, scores):
        d["bbox"] = [round(float(v), 3) for v in d["bbox"]]
        d["score"] = round(float(s), 5)
    return preds


def test_coco80_to_91_matches_coco128_categories(coco128):
    official = json.loads((coco128 / "annotations" / "instances_train2017.json").read_text())
    assert coco80_to_91() == [c["id"] for c in official["categories"]]


def test_image_ids_from_file_names():
    assert image_id_from_path("/a/images/000000000009.jpg") == 9
    assert image_id_from_path("frame_12.png") == "frame_12"
    assert image_id_from_path("/x/\u00bd.jpg") == "\u00bd"  # a numeric character that int() refuses


@pytest.mark.parametrize("files", [["a/000000000007.jpg", "b/7.jpg"], ["a/000000000007.jpg", "a/cat.jpg"]])
def test_gt_refuses_image_ids_cocoeval_cannot_tell_apart(files):
    ds = SimpleNamespace(im_files=files, labels=[np.zeros((0, 5), np.float32)] * 2, shapes=np.array([[64, 48]] * 2))
    with pytest.raises(ValueError, match=f"{files[0]} and {files[1]}"):
        yolo_labels_to_coco_gt(ds, names=["0"])


def test_find_annotations_json(tmp_path, coco128):
    assert find_annotations_json(coco128 / "images" / "train2017") == coco128 / "annotations" / "instances_train2017.json"
    assert find_annotations_json([str(coco128 / "images" / "train2017")]) is not None
    (tmp_path / "images" / "val").mkdir(parents=True)
    assert find_annotations_json(tmp_path / "images" / "val") is None


def test_predictions_to_coco_format():
    det = torch.tensor([[10.0, 20.0, 50.0, 80.0, 0.1234567, 11.0]])
    (rec,) = predictions_to_coco(det, 42, coco80_to_91())
    assert rec == {"image_id": 42, "category_id": 13, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.12346}
    assert predictions_to_coco(torch.zeros((0, 6)), 1, coco80_to_91()) == []


def test_gt_from_yolo_labels_in_pixels():
    ds = SimpleNamespace(im_files=["x/000000000007.jpg"], labels=[np.array([[2, 0.5, 0.25, 0.5, 0.5]], np.float32)], shapes=np.array([[200, 100]]))
    gt = yolo_labels_to_coco_gt(ds, names=[str(i) for i in range(80)])
    (a,) = gt["annotations"]
    assert gt["images"] == [{"id": 7, "file_name": "000000000007.jpg", "width": 200, "height": 100}]
    assert a["bbox"] == pytest.approx([50.0, 0.0, 100.0, 50.0]) and a["area"] == pytest.approx(5000.0)
    assert a["category_id"] == 3 and a["iscrowd"] == 0 and a["id"] == 1
    assert len(gt["categories"]) == 80


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_handmade_boxes_agree_with_cocoeval(seed):
    rng = np.random.default_rng(seed)
    ds, nc = _handmade_dataset(rng)
    gt = yolo_labels_to_coco_gt(ds, names=[f"c{i}" for i in range(nc)])
    preds = _handmade_predictions(rng, gt)
    ours = our_map(gt, preds)
    theirs = coco_evaluate(gt, preds, max_det=300, verbose=False)
    assert 0.15 < theirs[0] < 0.9  # a non-trivial case: neither empty nor perfect
    assert ours[0] == pytest.approx(theirs[0], abs=1e-9)
    assert ours[1] == pytest.approx(theirs[1], abs=1e-9)


def test_cocoeval_summary_honours_max_det():
    # pycocotools' own summarize() reads maxDets=100 for its first line; ours must not print -1 for 300.
    rng = np.random.default_rng(5)
    ds, nc = _handmade_dataset(rng, n_images=3)
    gt = yolo_labels_to_coco_gt(ds, names=[str(i) for i in range(nc)])
    preds = _handmade_predictions(rng, gt)
    map50_95, map50, stats = coco_evaluate(gt, preds, max_det=300, verbose=False)
    assert len(stats) == 12 and (stats[:3] >= 0).all() and stats[1] >= stats[0]
    assert coco_evaluate(gt, [], max_det=300, verbose=False)[:2] == (0.0, 0.0)


def test_yolo_labels_reproduce_official_coco128_annotations(coco128):
    """The labels' boxes, submitted as predictions, score AP 1 against the official json: image ids,
    category ids and pixel boxes line up (crowd regions, absent from the labels, are ignored by COCOeval)."""
    from utils.dataloaders import LoadImagesAndLabels

    dataset = LoadImagesAndLabels(str(coco128 / "images" / "train2017"), img_size=64, nc=80)
    gt = yolo_labels_to_coco_gt(dataset, names=[str(i) for i in range(80)])
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0 - 1e-4 * k}
             for k, a in enumerate(gt["annotations"])]  # fmt: skip
    official = coco128 / "annotations" / "instances_train2017.json"
    map50_95, map50, _ = coco_evaluate(official, preds, img_ids=[im["id"] for im in gt["images"]], verbose=False)
    assert len(gt["images"]) == 128 and len(gt["annotations"]) == 929
    assert map50 == pytest.approx(1.0) and map50_95 == pytest.approx(1.0)
