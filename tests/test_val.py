"""val.py on a few real coco128 images: the caller's model stays untouched, mAP agrees with pycocotools,
the command writes its report and files, and bad weights fail with one clear line."""
import json
import logging
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

import val
from models.yolo import Model
from utils.checkpoint import half_state_dict, save_checkpoint
from utils.coco import coco_evaluate, yolo_labels_to_coco_gt
from utils.dataloaders import create_dataloader
from utils.ema import ModelEMA
from utils.loss import ComputeLoss

IMG = 128


@pytest.fixture(scope="module")
def names(coco128):
    d = yaml.safe_load(open(val.ROOT / "data" / "coco128.yaml"))
    return [d["names"][i] for i in range(80)] if isinstance(d["names"], dict) else list(d["names"])


def _image_list(coco128, tmp_path, n):
    images = sorted((coco128 / "images" / "train2017").glob("*.jpg"))[:n]
    f = tmp_path / f"val{n}.txt"
    f.write_text("\n".join(str(p) for p in images) + "\n")
    return f


@pytest.fixture(scope="module")
def tiny_data(coco128, tmp_path_factory, names):
    """A dataset yaml whose val split is a list of 8 coco128 images (train and test unset or the same)."""
    tmp = tmp_path_factory.mktemp("data")
    lst = _image_list(coco128, tmp, 8)
    data = {"path": str(coco128), "train": str(lst), "val": str(lst), "names": {i: n for i, n in enumerate(names)}}
    f = tmp / "tiny.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def _loader(list_file, batch_size=8):
    return create_dataloader(str(list_file), IMG, batch_size, 32, rect=True, pad=0.5, workers=0, nc=80)[0]


@torch.no_grad()
def _propose_persons(m):
    """Bias an untrained model's head to propose 'person' boxes everywhere (objectness 0.5, class 0 at 0.5,
    others ~0)."""
    for conv in m.model[-1].m:
        b = conv.bias.view(m.model[-1].na, -1)
        b[:, 4] = 0.0
        b[:, 5:] = -12.0
        b[:, 5] = 0.0


def _checkpoint(path, nc=80, names=None, emit_boxes=True):
    """A yolov5n checkpoint of ours. With emit_boxes the untrained head is biased to propose 'person' boxes
    everywhere (objectness 0.5, class 0 at 0.5, others ~0), so NMS, plots and COCOeval have work to do."""
    torch.manual_seed(0)
    m = Model("yolov5n.yaml", nc=nc, verbose=False)
    if emit_boxes:
        _propose_persons(m)
    ckpt = dict(format="yolo-ema", version=1, epoch=3, best_fitness=0.0, model=half_state_dict(m.state_dict()),
                ema=half_state_dict(m.state_dict()), updates=10, optimizer=None, opt={}, hyp={}, yaml=m.yaml, nc=nc,
                names=list(names or [str(i) for i in range(nc)]), date="2026-01-01T00:00:00")  # fmt: skip
    return save_checkpoint(ckpt, path)


def test_run_never_modifies_the_given_model(tiny_data, tmp_path):
    """val.run(model=ema.ema, half=True), as train.py calls it in an fp16 run, leaves every EMA tensor bitwise
    unchanged and in place; the inference itself ran in FP16 (autocast), on the CPU as on CUDA."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hyp = yaml.safe_load(open(val.ROOT / "hyp" / "hyp.scratch-low.yaml"))
    model = Model("yolov5n.yaml", nc=80, verbose=False).to(device)
    model.hyp = hyp
    _propose_persons(model)  # detections in every image, so that --save-txt writes a file for each
    with torch.no_grad():  # non-trivial BN statistics: a BN update in train mode would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ema = ModelEMA(model)
    ema.ema.train()
    ema.ema.model[3].eval()  # a mixed state must come back as it was
    state = ema.ema.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    places = {k: (v.dtype, v.data_ptr()) for k, v in state.items()}  # a .half()/.float() round trip moves them
    flags = [m.training for m in ema.ema.modules()]
    conv_dtypes = []
    hook = ema.ema.model[0].conv.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    # no dataloader given: run() builds one from the yaml's val split
    results, maps, times = val.run(str(tiny_data), model=ema.ema, imgsz=IMG, batch_size=8, workers=0, half=True,
                                   plots=False, save_dir=tmp_path, save_txt=True, compute_loss=ComputeLoss(model, hyp))  # fmt: skip
    hook.remove()
    assert conv_dtypes and set(conv_dtypes) == {torch.float16}
    after = ema.ema.state_dict()
    assert {k: (v.dtype, v.data_ptr()) for k, v in after.items()} == places
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [m.training for m in ema.ema.modules()] == flags
    assert len(results) == 7 and maps.shape == (80,) and len(times) == 3
    assert all(x > 0 for x in results[4:])  # box, obj, cls losses of an untrained model on real boxes
    assert len(list((tmp_path / "labels").glob("*.txt"))) == 8  # --save-txt also works for a given model


class OracleDetector(nn.Module):
    """Stands in for a detector: for the k-th batch it outputs the k-th precomputed prediction tensor
    (raw YOLO rows: cx, cy, w, h in letterboxed pixels, objectness, class scores)."""

    def __init__(self, batches):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives val a device to read
        self.batches, self.calls = batches, 0

    def forward(self, im):
        out = self.batches[self.calls]
        self.calls += 1
        return out.to(im.device), None


def _oracle_predictions(loader, rng):
    """Jittered true boxes (some duplicated, some missed, some given the wrong class) with random scores,
    plus background boxes."""
    batches = []
    for im, targets, _, _, _ in loader:
        b, _, h, w = im.shape
        rows = [[] for _ in range(b)]
        for i, c, cx, cy, bw, bh in targets.tolist():
            if rng.random() < 0.15:
                continue
            for _ in range(1 + int(rng.random() < 0.3)):
                j = rng.uniform(-0.12, 0.12, 4)
                cls = int(c) if rng.random() > 0.1 else int(rng.integers(0, 80))
                box = [(cx + j[0] * bw) * w, (cy + j[1] * bh) * h, bw * (1 + j[2]) * w, bh * (1 + j[3]) * h]
                rows[int(i)].append((box, cls))
        for i in range(b):
            for _ in range(int(rng.integers(0, 5))):
                rows[i].append(([rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, w / 2), rng.uniform(8, h / 2)], int(rng.integers(0, 80))))
        n = max(len(r) for r in rows) or 1
        pred = torch.zeros((b, n, 85))
        for i, r in enumerate(rows):
            for k, (box, cls) in enumerate(r):
                pred[i, k, :4] = torch.tensor(box)
                pred[i, k, 4] = float(rng.uniform(0.01, 1.0))
                pred[i, k, 5 + cls] = 1.0
        batches.append(pred)
    return batches


@pytest.mark.parametrize("single_cls", [False, True])
def test_map_agrees_with_cocoeval_on_coco128(coco128, tmp_path, names, single_cls):
    """16 real images, predictions derived from their boxes; scored by val and by pycocotools."""
    lst = _image_list(coco128, tmp_path, 16)
    loader = create_dataloader(str(lst), IMG, 8, 32, rect=True, pad=0.5, workers=0, nc=80, single_cls=single_cls)[0]
    oracle = OracleDetector(_oracle_predictions(loader, np.random.default_rng(0)))
    data = {"nc": 80, "names": names, "val": str(lst)}
    (mp, mr, map50, map50_95, *_), maps, _ = val.run(data, model=oracle, dataloader=loader, save_json=True,
                                                     plots=False, save_dir=tmp_path, single_cls=single_cls)  # fmt: skip
    preds = json.loads((tmp_path / "model_predictions.json").read_text())
    gt = yolo_labels_to_coco_gt(loader.dataset, names=names)
    coco_map, coco_map50, _ = coco_evaluate(gt, preds, max_det=300, verbose=False, use_cats=not single_cls)
    assert maps.shape == ((1,) if single_cls else (80,))
    assert 0.2 < coco_map < 0.95
    assert abs(map50_95 - coco_map) < 0.002 and abs(map50 - coco_map50) < 0.002
    assert abs(map50_95 - coco_map) < 1e-4  # in fact the same up to the json's rounding
    assert 0 < mp <= 1 and 0 < mr <= 1


def test_cli_report_files_and_cocoeval(tiny_data, coco128, tmp_path, caplog, capsys):
    weights = _checkpoint(tmp_path / "w.pt", names=None)
    project = tmp_path / "runs"
    args = ["--weights", str(weights), "--data", str(tiny_data), "--img", str(IMG), "--batch-size", "4",
            "--project", str(project), "--save-txt", "--save-conf", "--save-json", "--verbose", "--workers", "0"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert val.main(args) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    header = "Class     Images  Instances          P          R      mAP50   mAP50-95"
    assert header in capsys.readouterr().err and header not in text  # the progress bar's label, not a second line
    all_row = next(line for line in text.splitlines() if line.strip().startswith("all "))
    assert all_row.split()[1:3] == ["8", str(sum(len(lb) for lb in _loader(tiny_data.parent / "val8.txt").dataset.labels))]
    assert "  person  " in text  # --verbose rows use the data yaml's names (checkpoint names are placeholders)
    assert "Speed: " in text and f"per image at shape (4, 3, {IMG}, {IMG})" in text
    assert "pycocotools" in text and "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=300 ]" in text
    save_dir = project / "exp"
    for f in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png",
              "val_batch0_labels.jpg", "val_batch0_pred.jpg", "val_batch1_pred.jpg", "w_predictions.json", "labels_gt.json"):  # fmt: skip
        assert (save_dir / f).is_file(), f
    txt = sorted((save_dir / "labels").glob("*.txt"))
    assert txt and all(len(line.split()) == 6 for line in txt[0].read_text().splitlines())
    preds = json.loads((save_dir / "w_predictions.json").read_text())
    assert preds and {"image_id", "category_id", "bbox", "score"} == set(preds[0]) and isinstance(preds[0]["image_id"], int)
    # --save-txt rows are the json records (x, y, w, h in pixels) normalised by the original image size
    w, h = cv2.imread(str(coco128 / "images" / "train2017" / f"{txt[0].stem}.jpg")).shape[1::-1]
    rows = np.array([[float(v) for v in line.split()] for line in txt[0].read_text().splitlines()])
    recs = [p for p in preds if p["image_id"] == int(txt[0].stem)]
    x, y, bw, bh = np.array([r["bbox"] for r in recs]).T
    assert len(rows) == len(recs) > 0 and (rows[:, 0] == 0).all() and {r["category_id"] for r in recs} == {1}
    assert np.allclose(rows[:, 1:5], np.stack([(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h], 1), atol=2e-5)
    assert np.allclose(rows[:, 5], [r["score"] for r in recs], atol=1e-5)
    # our table and pycocotools on the same predictions and labels
    line = next(x for x in text.splitlines() if x.startswith("mAP50-95: ours"))
    ours, theirs = float(line.split()[2].rstrip(",")), float(line.split()[4])
    assert abs(ours - theirs) < 0.002
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert val.main(args[:6] + ["--project", str(project), "--task", "speed", "--workers", "0"]) == 0
    assert (project / "exp2").is_dir() and "Speed: " in "".join(r.getMessage() for r in caplog.records) and not (project / "exp2" / "PR_curve.png").exists()


def _one_error_line(caplog):
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    return errors[0]


def test_cli_bad_weights_fail_with_one_line(tiny_data, tmp_path, caplog):
    common = ["--data", str(tiny_data), "--img", str(IMG), "--project", str(tmp_path / "runs"), "--workers", "0"]
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert val.main(["--weights", str(tmp_path / "missing.pt")] + common) == 1
    assert "missing.pt" in _one_error_line(caplog) and "not found" in _one_error_line(caplog)

    caplog.clear()
    junk = tmp_path / "notes.pt"
    junk.write_text("not a checkpoint")
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert val.main(["--weights", str(junk)] + common) == 1
    assert "notes.pt" in _one_error_line(caplog)

    caplog.clear()
    three = _checkpoint(tmp_path / "three.pt", nc=3, emit_boxes=False)
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert val.main(["--weights", str(three)] + common) == 1
    msg = _one_error_line(caplog)
    assert "3 classes" in msg and "80" in msg
    assert not (tmp_path / "runs").exists()  # refused weights leave no empty run folder behind

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert val.main(["--weights", "yolov5n.pt"] + common) == 1
    assert _one_error_line(caplog) == ("val: checkpoint yolov5n.pt not found: pretrained weights cannot be downloaded "
                                       "here; train from scratch with python train.py --cfg yolov5n.yaml --weights '', "
                                       "or give the path of a local .pt file")

    caplog.clear()
    ok = _checkpoint(tmp_path / "ok.pt", emit_boxes=False)
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert val.main(["--weights", str(ok), "--task", "test"] + common) == 1
    assert "test" in _one_error_line(caplog)


def test_binary_or_folder_data_fails_with_one_line_naming_flag_and_file(coco128, tmp_path, caplog):
    ok = _checkpoint(tmp_path / "ok.pt", emit_boxes=False)
    image = sorted((coco128 / "images" / "train2017").glob("*.jpg"))[0]
    common = ["--weights", str(ok), "--img", str(IMG), "--project", str(tmp_path / "runs"), "--workers", "0"]
    for given, expected in [(ok, f"val: --data {ok} is not a yaml file: it holds binary data, not text"),
                            (image, f"val: --data {image} is not a yaml file: it holds binary data, not text"),
                            (tmp_path, f"val: --data {tmp_path} is a folder; give the dataset's yaml file "
                                       "(e.g. data/coco128.yaml)")]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="yolo"):
            assert val.main(["--data", str(given)] + common) == 1
        assert _one_error_line(caplog) == expected
    assert not (tmp_path / "runs").exists()


def test_inference_copy_refreshed_in_place_equals_a_fresh_copy():
    """train.py refreshes one InferenceCopy per epoch instead of copying and fusing the EMA anew: after the
    source's weights and BatchNorm statistics change, the refreshed copy equals a fresh one bit for bit."""
    torch.manual_seed(0)
    source = Model("yolov5n.yaml", nc=3, verbose=False)
    copy = val.InferenceCopy(source)
    with torch.no_grad():  # a training step and new statistics
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    refreshed, fresh = copy.refresh(), val.InferenceCopy(source).model
    assert refreshed is copy.model and list(refreshed.state_dict()) == list(fresh.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(refreshed.state_dict().values(), fresh.state_dict().values()))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in refreshed.modules())  # folded
    assert refreshed.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())  # the source is untouched
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(refreshed.eval()(x)[0], source.eval()(x)[0], rtol=1e-4, atol=1e-3)


def test_half_is_fp16_autocast_on_the_cpu_too(tiny_data, tmp_path, monkeypatch):
    """`val.py --half` runs fp16 autocast on any device (never an in-place .half()) and agrees with FP32."""
    weights = _checkpoint(tmp_path / "w.pt")
    used = []
    real = val.autocast
    monkeypatch.setattr(val, "autocast", lambda device, dtype: used.append((device.type, dtype)) or real(device, dtype))
    common = dict(weights=weights, imgsz=IMG, batch_size=4, workers=0, plots=False, device="cpu", save_txt=True,
                  save_conf=True)
    val.run(str(tiny_data), half=True, project=tmp_path / "fp16", **common)
    assert set(used) == {("cpu", torch.float16)}
    used.clear()
    val.run(str(tiny_data), half=False, project=tmp_path / "fp32", **common)
    assert set(used) == {("cpu", None)}
    # The same top detection per image (the biased head proposes persons everywhere), to FP16's precision
    files = sorted((tmp_path / "fp32" / "exp" / "labels").glob("*.txt"))
    assert len(files) == 8
    for f in files:
        top32, top16 = (max((list(map(float, ln.split())) for ln in p.read_text().splitlines()), key=lambda r: r[5])
                        for p in (f, tmp_path / "fp16" / "exp" / "labels" / f.name))
        assert top16[0] == top32[0] and top16[1:] == pytest.approx(top32[1:], abs=2e-3), f.name


@pytest.mark.parametrize("device", ["0", "cuda", "CUDA", "cuda:1", "gpu", "0,x"])
def test_device_errors_are_one_line(tiny_data, tmp_path, caplog, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    weights = _checkpoint(tmp_path / "w.pt", emit_boxes=False)
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert val.main(["--weights", str(weights), "--data", str(tiny_data), "--device", device,
                         "--project", str(tmp_path / "runs")]) == 1
    line = _one_error_line(caplog)
    assert "CUDA is not available; use --device cpu" in line or "is not a device" in line
    assert not (tmp_path / "runs").exists()


def test_non_finite_weights_are_reported(caplog):
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with caplog.at_level(logging.WARNING, logger="yolo"):
        val.warn_non_finite(m)
        assert not caplog.records
        with torch.no_grad():
            m[1].running_var[2] = float("nan")
        val.warn_non_finite(m)
    assert "1 weight tensors hold NaN or Inf (first: 1.running_var)" in caplog.text


def _exported_file(tmp_path, tiny_data):
    exported = tmp_path / "best.onnx"
    exported.write_bytes(b"never read: the refusals come first")
    return exported, ["--weights", str(exported), "--data", str(tiny_data), "--img", str(IMG), "--project",
                      str(tmp_path / "runs"), "--workers", "0"]  # fmt: skip


def test_augment_with_exported_weights_is_refused_up_front(tiny_data, tmp_path, caplog):
    _, argv = _exported_file(tmp_path, tiny_data)
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert val.main(argv + ["--augment"]) == 1
    assert _one_error_line(caplog) == "val: --augment (test-time augmentation) needs PyTorch weights, not best.onnx"
    assert not (tmp_path / "runs").exists()


def test_missing_onnxruntime_is_one_line(tiny_data, tmp_path, caplog, monkeypatch):
    _, common = _exported_file(tmp_path, tiny_data)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with caplog.at_level(logging.INFO, logger="yolo"):
        assert val.main(common) == 1
    assert _one_error_line(caplog) == ("val: running an .onnx model needs the 'onnxruntime' package, which is not "
                                       "installed: pip install onnxruntime")  # fmt: skip
    assert not (tmp_path / "runs").exists()


def test_inference_copy_of_the_ema_holds_only_its_own_tensors():
    """ema.ema's tensors are views into one flat buffer of the whole model; the copy's memory must be its own
    tensors' and no more: the bytes of the distinct storages behind its parameters and buffers equal the bytes of
    those tensors (a deepcopied view would bring the whole flat buffer along, about the model's size again)."""
    torch.manual_seed(0)
    model = Model("yolov5n.yaml", nc=3, verbose=False)
    ema = ModelEMA(model)
    assert ema.path == "flat"
    copied = val.InferenceCopy(ema.ema).model
    tensors = [*copied.parameters(), *copied.buffers()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert sum(storages.values()) == sum(t.numel() * t.element_size() for t in tensors)
