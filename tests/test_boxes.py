"""Box format conversions, letterbox back-mapping and NMS, checked against hand-computed values."""
import numpy as np
import pytest
import torch

from utils.boxes import (
    box_iou,
    clip_boxes,
    non_max_suppression,
    scale_boxes,
    xywh2xyxy,
    xywhn2xyxy,
    xyxy2xywh,
    xyxy2xywhn,
)


def test_format_round_trips_on_tensors_and_arrays():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 80.0]])
    assert xyxy2xywh(xyxy).tolist() == [[30.0, 50.0, 40.0, 60.0]]
    assert xywh2xyxy(torch.tensor([[30.0, 50.0, 40.0, 60.0]])).tolist() == xyxy.tolist()
    arr = np.array([[0.5, 0.5, 0.25, 0.5]])
    # image 200 wide, 100 high, placed 7 px right and 3 px down
    assert xywhn2xyxy(arr, w=200, h=100, padw=7, padh=3).tolist() == [[82.0, 28.0, 132.0, 78.0]]
    assert xyxy2xywhn(np.array([[75.0, 25.0, 125.0, 75.0]]), w=200, h=100).tolist() == [[0.5, 0.5, 0.25, 0.5]]
    assert isinstance(xyxy2xywh(arr), np.ndarray)


def test_xyxy2xywhn_clip_keeps_boxes_inside():
    out = xyxy2xywhn(np.array([[-10.0, 0.0, 110.0, 50.0]]), w=100, h=100, clip=True)
    assert out.tolist() == [[0.5, 0.25, 1.0, 0.5]]


def test_clip_boxes_in_place():
    b = torch.tensor([[-5.0, -1.0, 700.0, 300.0]])
    clip_boxes(b, (240, 640))
    assert b.tolist() == [[0.0, 0.0, 640.0, 240.0]]


def test_scale_boxes_applies_each_axis_gain():
    # 640x427 image letterboxed to 128: resized to 128x85 (gains 0.2 and 85/427), 21.5 px pad top/bottom
    ratio_pad = ((85 / 427, 0.2), (0.0, 21.5))
    boxes = torch.tensor([[12.8, 21.5 + 85 / 427 * 100, 128.0, 21.5 + 85.0]], dtype=torch.float64)
    scale_boxes((128, 128), boxes, (427, 640), ratio_pad=ratio_pad)
    assert boxes[0].tolist() == pytest.approx([64.0, 100.0, 640.0, 427.0])


def test_scale_boxes_recomputes_letterbox_without_ratio_pad():
    # 200x100 (w x h) into 64x64: gain 0.32, resized 64x32, 16 px pad top and bottom
    boxes = torch.tensor([[0.0, 16.0, 32.0, 32.0]])
    scale_boxes((64, 64), boxes, (100, 200))
    assert boxes[0].tolist() == pytest.approx([0.0, 0.0, 100.0, 50.0])


def test_box_iou_matches_hand_computation():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    assert box_iou(a, b)[0].tolist() == pytest.approx([1 / 7, 1.0, 0.0])


def _raw(rows, nc):
    """Rows (cx, cy, w, h, obj, class scores...) as one image of detector output."""
    return torch.tensor(rows, dtype=torch.float32).view(1, -1, 5 + nc)


def test_nms_confidence_is_objectness_times_class_and_suppresses_per_class():
    pred = _raw([
        [50, 50, 20, 20, 0.9, 0.9, 0.1],  # conf 0.81 class 0
        [52, 50, 20, 20, 0.8, 0.9, 0.1],  # overlaps the first (IoU 0.82), same class: suppressed
        [52, 50, 20, 20, 0.8, 0.1, 0.9],  # same place, class 1: kept (per-class NMS)
        [150, 150, 10, 10, 0.1, 0.5, 0.5],  # conf 0.05 < 0.25: dropped
    ], nc=2)
    out = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.45)[0]
    assert out[:, 5].tolist() == [0.0, 1.0]
    assert out[:, 4].tolist() == pytest.approx([0.81, 0.72])
    assert out[0, :4].tolist() == [40.0, 40.0, 60.0, 60.0]


def test_nms_multi_label_agnostic_and_max_det():
    pred = _raw([[50, 50, 20, 20, 1.0, 0.6, 0.5], [52, 50, 20, 20, 1.0, 0.55, 0.1]], nc=2)
    multi = non_max_suppression(pred, conf_thres=0.3, iou_thres=0.45, multi_label=True)[0]
    # box 0 yields class 0 (0.6) and class 1 (0.5); box 1's class 0 (0.55) is suppressed by box 0's
    assert sorted(multi[:, 4].tolist()) == pytest.approx([0.5, 0.6])
    agnostic = non_max_suppression(pred, conf_thres=0.3, iou_thres=0.45, multi_label=True, agnostic=True)[0]
    assert agnostic[:, 4].tolist() == pytest.approx([0.6])
    capped = non_max_suppression(pred, conf_thres=0.3, iou_thres=0.99, multi_label=True, max_det=2)[0]
    assert capped[:, 4].tolist() == pytest.approx([0.6, 0.55])
    only_1 = non_max_suppression(pred, conf_thres=0.3, iou_thres=0.45, multi_label=True, classes=[1])[0]
    assert only_1[:, 5].tolist() == [1.0]


def test_nms_rejects_bad_thresholds_and_handles_empty():
    with pytest.raises(ValueError, match="conf_thres"):
        non_max_suppression(torch.zeros(1, 1, 6), conf_thres=1.5)
    out = non_max_suppression(torch.zeros(2, 3, 7))
    assert len(out) == 2 and out[0].shape == (0, 6)
