"""export.py --include openvino: YOLOv5's *_openvino_model/ folder, outputs equal to PyTorch's on real coco128 images,
val.py's mAP equal to the checkpoint's, detect.py and the hub model running it, and FP16 compression on the CPU."""
import logging
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml

import detect
import export
import val
from tests.test_detect import coco128_images, one_thread, read_labels  # noqa: F401  (one_thread: autouse fixture)
from tests.test_export import FIXED, FIXED_BATCH, TRAIN_SIZE, assert_parity, coco_batch, copy_into, trained  # noqa: F401
from utils.inference import Detector, OpenVinoModel, letterbox_batch, load_model

ROOT = export.ROOT


def export_openvino(trained, folder, *flags):
    weights = copy_into(trained[0], folder)
    assert export.main(["--weights", str(weights), "--include", "openvino", *flags]) == 0
    return weights, folder / "best_openvino_model"


@pytest.fixture(scope="module")
def ov_dynamic(trained, tmp_path_factory):
    """A --dynamic FP32 export: (best.pt, best_openvino_model/)."""
    return export_openvino(trained, tmp_path_factory.mktemp("ov_dynamic"), "--img", "64", "--dynamic")


def weight_count(weights) -> int:
    """Floats in the exported graph's weights: the fused model's parameters and buffers (anchors)."""
    model = load_model(weights)
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())


def test_dynamic_folder_is_yolov5s_and_matches_pytorch_at_two_batch_and_image_sizes(ov_dynamic, coco_batch):
    weights, folder = ov_dynamic
    assert sorted(p.name for p in folder.iterdir()) == ["best.bin", "best.xml", "best.yaml"]
    meta = yaml.safe_load((folder / "best.yaml").read_text())
    # YOLOv5's DetectMultiBackend reads NAME.yaml beside NAME.xml: d["stride"], d["names"], names looked up by int
    assert meta["stride"] == 32 and meta["names"] == {0: "c0", 1: "c1"} and meta["half"] is False
    assert 0.9 < (folder / "best.bin").stat().st_size / (4 * weight_count(weights)) < 1.1  # float32 weights
    pt, model = load_model(weights), load_model(folder)
    assert isinstance(model, OpenVinoModel) and model.names == ["c0", "c1"] and model.stride.tolist() == [32.0]
    assert model.fixed_shape is None and model.batch is None
    for n, size in ((1, (96, 128)), (3, (160, 224))):
        batch, _ = letterbox_batch(coco_batch[0][:n], size, 32, fixed_shape=size)
        x = batch.float() / 255
        with torch.no_grad():
            expected = pt(x)[0]
        assert_parity(model(x)[0], expected, max(size))


def test_val_map_equals_the_checkpoints(trained, ov_dynamic, tmp_path):
    """The same rect batches at 64 px through the checkpoint and through the --dynamic folder."""
    weights, data = trained
    common = dict(batch_size=8, workers=0, plots=False, project=tmp_path, exist_ok=True, imgsz=TRAIN_SIZE)
    pt_map = val.run(data, weights=str(weights), name="pt", **common)[0][3]
    assert pt_map > 0.2  # a model that really detects: a wrong export would show
    assert abs(val.run(data, weights=str(ov_dynamic[1]), name="ov", **common)[0][3] - pt_map) <= 1e-3


def test_detect_and_hub_run_the_folder(ov_dynamic, coco128, tmp_path):
    weights, folder = ov_dynamic
    image = coco128_images()[0]
    save_dir = detect.run(source=image, weights=folder, imgsz=128, conf_thres=0.01, save_txt=True, save_conf=True,
                          project=tmp_path, name="ov")  # fmt: skip
    rows = read_labels(save_dir / "labels" / f"{image.stem}.txt")
    pt = Detector(load_model(weights))
    pt.conf = 0.01
    expected = pt.detect([cv2.imread(str(image))], [image.name], size=128).xywhn[0]
    assert len(rows) == len(expected) > 0
    np.testing.assert_allclose(rows[:, 1:], expected[:, :5].numpy(), rtol=1e-4, atol=2e-6)
    hub = torch.hub.load(str(ROOT), "custom", path=str(folder), source="local", _verbose=False)
    hub.conf = 0.01
    np.testing.assert_allclose(hub(str(image), size=128).xywhn[0][:, :5].numpy(), rows[:, 1:], rtol=1e-4, atol=2e-6)


def test_fixed_half_export_on_the_cpu(trained, coco_batch, tmp_path):
    """--half without CUDA is for OpenVINO alone: FP16 weights (2 bytes each in the .bin), computed in float32, so
    the outputs are PyTorch's with the same weights rounded to FP16, to float32 precision. A fixed 64x64 batch-3
    file runs 4 images as a batch of 3 and a padded one, and refuses other sizes."""
    weights, folder = export_openvino(trained, tmp_path, "--img", str(FIXED[0]), "--batch-size", str(FIXED_BATCH), "--half")
    assert 0.9 < (folder / "best.bin").stat().st_size / (2 * weight_count(weights)) < 1.1
    assert yaml.safe_load((folder / "best.yaml").read_text())["half"] is True
    rounded = load_model(weights).half().float()
    x = coco_batch[1]
    with torch.no_grad():
        expected = rounded(x)[0]
    for path in (folder, folder / "best.xml"):  # the folder, as YOLOv5 takes it, or the .xml in it
        model = load_model(path)
        assert model.fixed_shape == FIXED and model.batch == FIXED_BATCH
        assert_parity(model(x)[0], expected, FIXED[0])
    with pytest.raises(ValueError, match="exported for 64x64 images, got 96x128"):
        model(torch.zeros(1, 3, 96, 128))


def test_refusals_are_one_line(trained, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="yolo")
    weights = copy_into(trained[0], tmp_path)

    def errors():
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]

    assert export.main(["--weights", str(weights), "--include", "onnx", "openvino", "--half"]) == 1
    assert len(errors()) == 1 and "--include openvino alone compresses to FP16 on any device" in errors()[0]
    caplog.clear()
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    assert export.main(["--weights", str(weights), "--include", "openvino"]) == 1
    assert errors() == ["export: OpenVINO export needs the 'openvino' package, which is not installed: pip install openvino"]
    assert not (tmp_path / "best_openvino_model").exists()
