"""Validation pre-processing and NMS pinned to YOLOv5's documented steps (the mAP-parity checks).

The expected values are worked out by hand from what YOLOv5's val pipeline does: load_image resizes the long
side to --img and rounds the other side up (math.ceil), with INTER_AREA when shrinking; rectangular batches
get the smallest stride multiple of (aspect * img / stride + pad); letterbox centres the image with
round(d - 0.1) pixels before and round(d + 0.1) after, in grey 114, and reports the pad as d, half the padding;
the tensor is RGB, CHW. NMS shifts each class's boxes by class * 7680 pixels before one torchvision NMS.
"""
import cv2
import numpy as np
import pytest
import torch

from utils.boxes import non_max_suppression, scale_boxes
from utils.dataloaders import LoadImagesAndLabels


@pytest.fixture
def landscape(tmp_path):
    """A 640x426 photo-like image (a smooth gradient plus texture, so resampling differences show) with one box."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:426, 0:640]
    im = np.stack([xx * 255 // 639, yy * 255 // 425, (xx + yy) % 256], -1).astype(np.int16)
    im = np.clip(im + rng.integers(-20, 21, im.shape), 0, 255).astype(np.uint8)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), im)
    (tmp_path / "labels" / "a.txt").write_text("3 0.5 0.5 0.25 0.5\n")
    return tmp_path / "images", im


def test_rect_validation_tensor_is_yolov5s(landscape):
    folder, im = landscape
    sample = LoadImagesAndLabels(str(folder), img_size=256, batch_size=1, rect=True, stride=32, pad=0.5)[0]
    # r = 256 / 640 = 0.4: 640 x 426 -> 256 x ceil(170.4) = 256 x 171, shrunk with INTER_AREA
    resized = cv2.resize(im, (256, 171), interpolation=cv2.INTER_AREA)
    # batch shape: h = ceil(426 / 640 * 256 / 32 + 0.5) * 32 = ceil(5.825) * 32 = 192, w = ceil(8 + 0.5) * 32 = 288
    # padding: 21 rows -> d = 10.5: round(10.4) = 10 above, round(10.6) = 11 below; 32 columns -> 16 and 16
    expected = cv2.copyMakeBorder(resized, 10, 11, 16, 16, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    expected = expected[..., ::-1].transpose(2, 0, 1)  # BGR -> RGB, HWC -> CHW
    assert tuple(sample.img.shape) == (3, 192, 288)
    assert torch.equal(sample.img, torch.from_numpy(np.ascontiguousarray(expected)))
    (h0, w0), ((gain_h, gain_w), pad) = sample.shapes
    assert (h0, w0) == (426, 640) and pad == (16.0, 10.5)  # YOLOv5's pad: half the padding, not where the image sits
    assert (gain_h, gain_w) == (171 / 426, 256 / 640)
    # the label, in YOLOv5's frame: y = 0.5 * 171 + 10.5 = 96 at the box's centre, height 0.5 * 171 = 85.5
    cx, cy, w, h = sample.targets[0, 2:].tolist()
    assert (cx * 288, cy * 192, w * 288, h * 192) == pytest.approx((144.0, 96.0, 64.0, 85.5), abs=1e-3)


def test_square_validation_tensor_is_yolov5s(landscape):
    """Exported fixed-size files are validated on square letterboxes (rect off)."""
    folder, im = landscape
    sample = LoadImagesAndLabels(str(folder), img_size=256, batch_size=1, rect=False, stride=32)[0]
    resized = cv2.resize(im, (256, 171), interpolation=cv2.INTER_AREA)
    # 85 rows of padding: d = 42.5 -> round(42.4) = 42 above, round(42.6) = 43 below
    expected = cv2.copyMakeBorder(resized, 42, 43, 0, 0, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    assert torch.equal(sample.img, torch.from_numpy(np.ascontiguousarray(expected[..., ::-1].transpose(2, 0, 1))))
    assert sample.shapes[1][1] == (0.0, 42.5)


def test_boxes_map_back_through_yolov5s_pad():
    """A box predicted in the letterboxed frame comes back by subtracting YOLOv5's pad (42.5, not the 42 rows the
    image was moved by) and dividing by each axis's gain."""
    box = torch.tensor([[12.8, 52.5, 64.0, 95.3]])
    scale_boxes((256, 256), box, (426, 640), ratio_pad=((171 / 426, 256 / 640), (0.0, 42.5)))
    expected = [12.8 / 0.4, (52.5 - 42.5) * 426 / 171, 64.0 / 0.4, (95.3 - 42.5) * 426 / 171]
    assert box[0].tolist() == pytest.approx(expected, rel=1e-6)


def _raw(rows, nc=80):
    """Rows (cx, cy, w, h, obj, {class: score}) as one image of an 80-class detector's output."""
    out = torch.zeros(1, len(rows), 5 + nc)
    for i, (cx, cy, w, h, obj, scores) in enumerate(rows):
        out[0, i, :5] = torch.tensor([cx, cy, w, h, obj])
        for c, s in scores.items():
            out[0, i, 5 + c] = s
    return out


def test_nms_class_offset_is_yolov5s_7680_pixels():
    """Two boxes 2.48 px apart (exact IoU 7.52 / 12.48 = 0.6026, over the 0.601 threshold). In class 0 the
    second is suppressed. In class 79 YOLOv5 shifts both by 79 * 7680 = 606720 px, where float32 steps are
    1/16 px: the shift rounds 2.48 to 2.5, the IoU becomes 7.5 / 12.5 = 0.6 and the second box survives. Ours
    must do the same, or borderline boxes of high class ids differ from YOLOv5's."""
    for cls, kept in ((0, 1), (79, 2)):
        pred = _raw([(5.0, 5.0, 10.0, 10.0, 1.0, {cls: 0.9}), (7.48, 5.0, 10.0, 10.0, 1.0, {cls: 0.8})])
        out = non_max_suppression(pred, conf_thres=0.001, iou_thres=0.601, multi_label=True)[0]
        assert len(out) == kept, f"class {cls}"


def test_nms_multi_label_class_offset_and_max_det_together():
    """One box scoring two classes gives two detections (multi-label); the same box in another class never
    suppresses it (class offset) unless agnostic; max_det keeps the highest confidences."""
    pred = _raw([
        (50, 50, 20, 20, 0.9, {2: 0.9, 7: 0.5}),  # conf 0.81 (class 2) and 0.45 (class 7)
        (51, 50, 20, 20, 0.8, {7: 0.9}),          # conf 0.72, class 7: overlaps box 0's class-7 candidate
        (300, 300, 30, 30, 0.5, {2: 0.5}),        # conf 0.25, far away
    ])
    out = non_max_suppression(pred, conf_thres=0.1, iou_thres=0.6, multi_label=True)[0]
    # box 1 (0.72, class 7) suppresses box 0's class-7 candidate (0.45); box 0's class 2 is another class
    assert out[:, 4].tolist() == pytest.approx([0.81, 0.72, 0.25])
    assert out[:, 5].tolist() == [2.0, 7.0, 2.0]
    best_only = non_max_suppression(pred, conf_thres=0.1, iou_thres=0.6, multi_label=False)[0]
    assert best_only[:, 4].tolist() == pytest.approx([0.81, 0.72, 0.25])  # box 0 keeps only its best class
    agnostic = non_max_suppression(pred, conf_thres=0.1, iou_thres=0.6, multi_label=True, agnostic=True)[0]
    assert agnostic[:, 4].tolist() == pytest.approx([0.81, 0.25])
    capped = non_max_suppression(pred, conf_thres=0.1, iou_thres=0.6, multi_label=True, max_det=2)[0]
    assert capped[:, 4].tolist() == pytest.approx([0.81, 0.72])
