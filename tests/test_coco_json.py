"""COCO-JSON datasets read as they are (utils/coco_json.py): coco128's real instances json against its YOLO labels,
hand-made jsons with each kind of bad entry, and val.py's COCOeval against the json (crowd regions, original ids)."""
import json
import logging

import cv2
import numpy as np
import pytest
import torch
import yaml

import val
from tests.test_detect import one_thread  # noqa: F401  (autouse fixture)
from utils import coco_json
from utils.data_config import DatasetError, check_dataset
from utils.dataloaders import LoadImagesAndLabels, create_dataloader

COCO_JSON = "annotations/instances_train2017.json"


@pytest.fixture(scope="module")
def coco128_json(coco128):
    return json.loads((coco128 / COCO_JSON).read_text())


def write_yaml(folder, **keys):
    file = folder / "data.yaml"
    file.write_text(yaml.safe_dump(keys))
    return file


def sorted_rows(a):
    return a[np.lexsort(a.T[::-1])] if len(a) else a


def test_coco128_json_gives_the_yolo_labels_and_is_cached(coco128, coco128_json, tmp_path, monkeypatch, caplog):
    """`path: coco128` is found by the usual lookup; names come from the json; the boxes equal coco128's own YOLO
    labels (its README: 929 boxes plus 10 crowd regions); a second load reads the cache without the json."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # coco128 is read-only: the cache goes here
    caplog.set_level(logging.INFO, logger="yolo")
    data = check_dataset(write_yaml(tmp_path, path="coco128", train=COCO_JSON, val=COCO_JSON))
    assert data["train"] == coco_json.JsonSplit(coco128 / COCO_JSON) and str(data["train"]) == str(coco128 / COCO_JSON)
    cats = sorted(coco128_json["categories"], key=lambda c: c["id"])
    assert data["names"] == [c["name"] for c in cats] and data["nc"] == 80
    ds = LoadImagesAndLabels(data["train"], 64, nc=80)
    assert "128 images, 2 backgrounds, 0 skipped, 0 duplicate boxes dropped, 10 crowd regions not trained on" in caplog.text
    yolo = LoadImagesAndLabels(str(coco128 / "images" / "train2017"), 64, nc=80)
    assert ds.im_files == yolo.im_files  # the json lists coco128's images in file name order
    for a, b in zip(ds.labels, yolo.labels):
        assert a.shape == b.shape
        np.testing.assert_allclose(sorted_rows(a), sorted_rows(b), atol=2e-6)  # the labels have 6 decimals
    assert ds.coco.image_ids[str(coco128 / "images" / "train2017" / "000000000009.jpg")] == 9
    assert ds.coco.category_ids == [c["id"] for c in cats] and ds.coco.category_ids[11] == 13

    def no_json(*args):
        raise AssertionError("the json was parsed again")

    monkeypatch.setattr(coco_json, "parse", no_json)
    again = LoadImagesAndLabels(data["train"], 64, nc=80)
    assert [len(lb) for lb in again.labels] == [len(lb) for lb in ds.labels] and again.coco == ds.coco


def make_images(folder, n=3, size=(80, 100)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"im{i}.jpg"), np.full((*size, 3), 60 + 40 * i, np.uint8))


def handmade(folder, annotations, images=None):
    """A json with images im0..im2 (100x80) beside it and categories 7 ('cat') and 3 ('dog')."""
    make_images(folder)
    images = images or [{"id": 10 + i, "file_name": f"im{i}.jpg", "width": 100, "height": 80} for i in range(3)]
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]}
    file = folder / "instances_x.json"
    file.write_text(json.dumps(data))
    return file


GOOD = {"id": 1, "image_id": 10, "category_id": 7, "bbox": [10, 20, 30, 40], "iscrowd": 0}


def test_handmade_json_classes_backgrounds_crowd_and_overhang(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="yolo")
    anns = [GOOD,
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [60.5, 0, 40, 80.8], "iscrowd": 0},  # 0.8 px over: clipped
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [0, 0, 50, 50], "iscrowd": 1}]
    file = handmade(tmp_path / "a", anns)
    data = check_dataset(write_yaml(tmp_path / "a", train=file.name, val=file.name))  # no path: the yaml's folder
    assert data["names"] == ["dog", "cat"]  # category ids 3, 7 in id order
    ds = LoadImagesAndLabels(data["train"], 64, nc=2)
    assert len(ds) == 3
    np.testing.assert_allclose(ds.labels[0], [[1, 0.25, 0.5, 0.3, 0.5]])  # cat: x 10..40 of 100, y 20..60 of 80
    np.testing.assert_allclose(ds.labels[1], [[0, 0.8025, 0.5, 0.395, 1.0]], rtol=1e-6)  # clipped to 60.5..100, 0..80
    assert ds.labels[2].shape == (0, 5)  # no annotations: a background
    assert "3 images, 1 backgrounds, 0 skipped, 0 duplicate boxes dropped, 1 crowd regions not trained on" in caplog.text
    assert ds.coco.category_ids == [3, 7] and list(ds.coco.image_ids.values()) == [10, 11, 12]
    assert (tmp_path / "a" / "instances_x.cache").is_file()  # beside the json, as labels/NAME.cache beside labels
    handmade(tmp_path / "a", [{**GOOD, "bbox": [0, 0, 50, 40]}])  # the json changes: scanned again
    np.testing.assert_allclose(LoadImagesAndLabels(data["train"], 64, nc=2).labels[0], [[1, 0.25, 0.25, 0.5, 0.5]])


BAD = [
    ({"id": 5, "image_id": 11, "category_id": 7, "bbox": [80, 10, 30, 20]}, "annotation id 5: bbox [80, 10, 30, 20] lies outside the 100x80 image"),
    ({"id": 6, "image_id": 11, "category_id": 7, "bbox": [10, 10, 0, 20]}, "annotation id 6: bbox [10, 10, 0, 20] has a non-positive size"),
    ({"id": 7, "image_id": 11, "category_id": 99, "bbox": [10, 10, 5, 5]}, "annotation id 7: unknown category id 99"),
]


@pytest.mark.parametrize("bad, message", BAD, ids=["outside", "non-positive", "unknown-category"])
def test_bad_annotation_names_it_and_skips_its_image(tmp_path, caplog, bad, message):
    caplog.set_level(logging.INFO, logger="yolo")
    file = handmade(tmp_path, [GOOD, {"id": 4, "image_id": 11, "category_id": 3, "bbox": [1, 1, 9, 9]}, bad])
    ds = LoadImagesAndLabels(str(file), 64, nc=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"WARNING: {file}: skipped image id 11 (im1.jpg), {message}"]
    assert [p.rsplit("/", 1)[1] for p in ds.im_files] == ["im0.jpg", "im2.jpg"] and list(ds.coco.image_ids.values()) == [10, 12]
    assert "2 images, 1 backgrounds, 1 skipped" in caplog.text


def test_missing_image_file_is_named_and_skipped(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="yolo")
    images = [{"id": 10 + i, "file_name": f"im{i}.jpg", "width": 100, "height": 80} for i in range(3)]
    images.append({"id": 13, "file_name": "gone.jpg", "width": 100, "height": 80})
    file = handmade(tmp_path, [GOOD, {"id": 2, "image_id": 13, "category_id": 7, "bbox": [1, 1, 5, 5]}], images)
    ds = LoadImagesAndLabels(str(file), 64, nc=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"WARNING: {file}: skipped image id 13 (gone.jpg): image file not found: {tmp_path / 'gone.jpg'}"]
    assert len(ds) == 3 and 13 not in ds.coco.image_ids.values()


def test_json_errors_are_one_line(tmp_path):
    make_images(tmp_path / "i")
    (tmp_path / "i" / "instances_x.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match=r"has no 'images' and 'categories' lists: not a COCO instances file$"):
        check_dataset(write_yaml(tmp_path / "i", train="instances_x.json", val="instances_x.json"))
    file = handmade(tmp_path / "j", [GOOD])
    with pytest.raises(DatasetError, match="'images' folder .*nowhere does not exist"):
        check_dataset(write_yaml(tmp_path / "j", train=file.name, val=file.name, images="nowhere"))
    with pytest.raises(DatasetError, match="nc=3 disagrees with the 2 categories"):
        check_dataset(write_yaml(tmp_path / "j", train=file.name, val=file.name, nc=3))


def test_two_yamls_on_one_json_each_load_their_own_images(tmp_path):
    """The `images:` folder travels with the split that check_dataset returns, not in a table keyed by the json: two
    data yamls naming one json with different folders, resolved in one process, each load their own images (as
    train.py and val.py load them, from data['train'] alone), and so does a split built without check_dataset."""
    file = handmade(tmp_path / "ann", [GOOD])  # images beside it too: the yamls' folders must win over the search
    for folder in ("a", "b"):
        make_images(tmp_path / folder)
    yamls = {f: write_yaml(tmp_path / "ann", path=str(tmp_path), train="ann/instances_x.json",
                           val="ann/instances_x.json", images=f).rename(tmp_path / f"{f}.yaml") for f in ("a", "b")}
    resolved = {f: check_dataset(y) for f, y in yamls.items()}  # b's resolved after a's
    resolved["a again"] = check_dataset(resolved["a"])  # val.run re-checks a resolved dict
    for key, data in resolved.items():
        want = [str(tmp_path / key[0] / f"im{i}.jpg") for i in range(3)]
        assert data["train"] == coco_json.JsonSplit(file, tmp_path / key[0]) and str(data["val"]) == str(file)
        assert LoadImagesAndLabels(data["train"], 64, nc=2).im_files == want, key
        assert create_dataloader(data["val"], 64, 2, 32, workers=0, nc=2)[1].im_files == want, key
    by_hand = LoadImagesAndLabels(coco_json.JsonSplit(file, tmp_path / "b"), 64, nc=2)  # no check_dataset first
    assert by_hand.im_files[0] == str(tmp_path / "b" / "im0.jpg")
    assert LoadImagesAndLabels(str(file), 64, nc=2).im_files[0] == str(tmp_path / "ann" / "im0.jpg")  # the search


# ---------------------------------------------------------------------------------------------- val.py on a json

class Oracle(torch.nn.Module):
    """A 'model' that answers each batch with boxes prepared for its images (val.run's model interface)."""

    def __init__(self, loader, boxes_by_path, nc):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # val.run reads the device from a parameter
        self.stride, self.names, self.outputs = torch.tensor([8.0, 16.0, 32.0]), None, []
        for batch in loader:
            rows = []
            for path, ((h0, w0), ((gh, gw), (pw, ph))) in zip(batch.paths, batch.shapes):
                b = np.asarray(boxes_by_path.get(path, np.zeros((0, 6))), np.float64).reshape(-1, 6)
                out = np.zeros((len(b), 5 + nc), np.float32)
                x1, y1, x2, y2 = b[:, 0] * gw + pw, b[:, 1] * gh + ph, b[:, 2] * gw + pw, b[:, 3] * gh + ph
                out[:, :4] = np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1)
                out[:, 4] = b[:, 4]
                out[np.arange(len(b)), 5 + b[:, 5].astype(int)] = 1.0
                rows.append(out)
            width = max(len(r) for r in rows) or 1
            padded = np.zeros((len(rows), width, 5 + nc), np.float32)
            for i, r in enumerate(rows):
                padded[i, :len(r)] = r
            self.outputs.append(torch.from_numpy(padded))

    def forward(self, im):
        return self.outputs.pop(0), None


def test_val_on_a_handmade_json_without_areas_or_ids(tmp_path, caplog):
    """Annotation tools may leave out 'area' and annotation ids, which COCOeval needs: exact boxes still score 1."""
    caplog.set_level(logging.INFO, logger="yolo")
    anns = [{"image_id": 10, "category_id": 7, "bbox": [10, 20, 30, 40]}, {"image_id": 11, "category_id": 3, "bbox": [50, 10, 40, 60]}]
    file = handmade(tmp_path, anns)
    data = check_dataset(write_yaml(tmp_path, train=file.name, val=file.name))
    loader, ds = create_dataloader(data["val"], 64, 4, 32, workers=0, nc=2)
    boxes = {ds.im_files[0]: [[10, 20, 40, 60, 0.9, 1]], ds.im_files[1]: [[50, 10, 90, 70, 0.8, 0]]}
    results = val.run(data, model=Oracle(loader, boxes, 2), dataloader=loader, plots=False, copy_model=False)
    assert results[0][2] == pytest.approx(1.0) and results[0][3] == pytest.approx(1.0)
    assert "COCOeval against" in caplog.text


def noisy_predictions(yolo_labels, im_file, w0, h0):
    """Jittered hits, misses, a wrong class and a false positive per image, drawn from the image's own seed."""
    rng = np.random.default_rng(int(im_file.rsplit("/", 1)[1][:-4]))
    out = []
    for cls, cx, cy, w, h in sorted_rows(yolo_labels).astype(np.float64):
        if rng.random() < 0.15:
            continue
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * [w0, h0, w0, h0]
        box += rng.uniform(-0.15, 0.15, 4) * [w * w0, h * h0, w * w0, h * h0]
        out.append([*box, rng.uniform(0.05, 1.0), cls if rng.random() > 0.1 else (cls + 1) % 80])
    out.append([5, 5, 45, 35, rng.uniform(0.05, 1.0), 0])
    return np.array(out)


def test_val_on_a_crowd_free_json_subset_equals_its_yolo_labels(coco128, coco128_json, tmp_path):
    """The same images and boxes as a json (scored by COCOeval on it) and as coco128's YOLO labels (scored by our
    matcher): the same predictions give the same mAP within 1e-4."""
    crowded = {a["image_id"] for a in coco128_json["annotations"] if a["iscrowd"]}
    images = [im for im in coco128_json["images"] if im["id"] not in crowded][:11]
    images += [im for im in coco128_json["images"] if im["id"] == 250]  # an image without objects
    ids = {im["id"] for im in images}
    subset = {"images": images, "categories": coco128_json["categories"],
              "annotations": [a for a in coco128_json["annotations"] if a["image_id"] in ids]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_sub.json").write_text(json.dumps(subset))
    yaml_file = write_yaml(tmp_path, path=str(tmp_path), train="annotations/instances_sub.json",
                           val="annotations/instances_sub.json", images=str(coco128 / "images" / "train2017"))
    data = check_dataset(yaml_file)

    yolo_root = tmp_path / "yolo"
    for sub in ("images", "labels"):
        (yolo_root / sub).mkdir(parents=True)
    for im in images:
        stem = im["file_name"][:-4]
        (yolo_root / "images" / im["file_name"]).symlink_to(coco128 / "images" / "train2017" / im["file_name"])
        label = coco128 / "labels" / "train2017" / f"{stem}.txt"
        if label.exists():
            (yolo_root / "labels" / f"{stem}.txt").write_text(label.read_text())
    yolo_ds = LoadImagesAndLabels(str(yolo_root / "images"), 64, nc=80)
    preds = {}
    for f, lb, (w0, h0) in zip(yolo_ds.im_files, yolo_ds.labels, yolo_ds.shapes):
        preds[f.rsplit("/", 1)[1]] = noisy_predictions(lb, f, w0, h0)

    maps = []
    for source in (data["val"], str(yolo_root / "images")):
        loader, ds = create_dataloader(source, 64, 4, 32, workers=0, nc=80)
        by_path = {f: preds[f.rsplit("/", 1)[1]] for f in ds.im_files}
        results = val.run(data, model=Oracle(loader, by_path, 80), dataloader=loader, plots=False, copy_model=False)
        maps.append(results[0][2:4])
    assert ds.coco is None and 0.2 < maps[1][1] < 0.9  # the YOLO run: our matcher, a non-trivial score
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-4)


def test_val_scores_crowd_regions_and_ids_as_coco_does(coco128, coco128_json, tmp_path, caplog):
    """Every non-crowd box predicted exactly, and a top-scored box on every crowd region: COCOeval on the json
    ignores the crowd hits (mAP 1), where a matcher without crowd regions would count them false positives."""
    caplog.set_level(logging.INFO, logger="yolo")
    data = check_dataset(write_yaml(tmp_path, path="coco128", train=COCO_JSON, val=COCO_JSON))
    loader, ds = create_dataloader(data["val"], 64, 32, 32, workers=0, nc=80)
    cls_of = {c: i for i, c in enumerate(ds.coco.category_ids)}
    path_of = {i: f for f, i in ds.coco.image_ids.items()}
    boxes = {}
    for k, a in enumerate(coco128_json["annotations"]):
        x, y, w, h = a["bbox"]
        score = 0.99 if a["iscrowd"] else 0.9 - 1e-4 * k
        boxes.setdefault(path_of[a["image_id"]], []).append([x, y, x + w, y + h, score, cls_of[a["category_id"]]])
    # NMS at IoU 1 keeps every box: a crowd box would otherwise suppress the exact boxes of the people in it
    results = val.run(data, model=Oracle(loader, boxes, 80), dataloader=loader, plots=False, copy_model=False,
                      save_json=True, save_dir=tmp_path, iou_thres=1.0)
    assert results[0][2] == pytest.approx(1.0, abs=1e-6) and results[0][3] == pytest.approx(1.0, abs=1e-6)
    assert "without crowd regions ours are" in caplog.text
    ours = float(caplog.text.split("without crowd regions ours are ")[1].split(",")[0])
    assert ours < 0.999  # the crowd hits are false positives to a matcher that does not know them
    written = json.loads((tmp_path / "model_predictions.json").read_text())
    assert {d["image_id"] for d in written} == {a["image_id"] for a in coco128_json["annotations"]}
    assert {d["category_id"] for d in written} == {a["category_id"] for a in coco128_json["annotations"]}


def test_train_runs_on_a_json_with_no_conversion(coco128, coco128_json, tmp_path):
    """train.py --data on a json split (eight coco128 images, crowd regions among them): it trains, and each epoch's
    validation is COCOeval against the json."""
    from tests.train_helpers import run_train, tiny_model_yaml, tiny_run_args

    images = [im for im in coco128_json["images"] if im["id"] in (9, 25, 30, 34, 36, 42, 149, 257)]  # 149, 257: crowds
    subset = {"images": images, "categories": coco128_json["categories"],
              "annotations": [a for a in coco128_json["annotations"] if a["image_id"] in {im["id"] for im in images}]}
    (tmp_path / "instances_eight.json").write_text(json.dumps(subset))
    data = write_yaml(tmp_path, train="instances_eight.json", val="instances_eight.json",
                      images=str(coco128 / "images" / "train2017"))
    proc = run_train(tiny_run_args(data, tiny_model_yaml(tmp_path), tmp_path / "runs", "json", 1))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "8 images, 0 backgrounds, 0 skipped, 0 duplicate boxes dropped, 2 crowd regions not trained on" in proc.stdout
    assert f"COCOeval against {tmp_path / 'instances_eight.json'}" in proc.stdout
    assert (tmp_path / "runs" / "json" / "weights" / "best.pt").is_file()
    saved = torch.load(tmp_path / "runs" / "json" / "weights" / "best.pt", weights_only=True)["opt"]
    assert saved["data"] == str(data) == yaml.safe_load((tmp_path / "runs" / "json" / "opt.yaml").read_text())["data"]
