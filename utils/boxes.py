"""Box formats, rescaling between image sizes, and non-maximum suppression.

Boxes are (x1, y1, x2, y2) in pixels ("xyxy") or (centre x, centre y, width, height) ("xywh");
a trailing "n" means normalised by the image width and height. Functions accept torch tensors or numpy
arrays and return the same kind.
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision


def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xyxy2xywh(x):
    y = _clone(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywh2xyxy(x):
    y = _clone(x)
    half_w, half_h = x[..., 2] / 2, x[..., 3] / 2
    y[..., 0] = x[..., 0] - half_w
    y[..., 1] = x[..., 1] - half_h
    y[..., 2] = x[..., 0] + half_w
    y[..., 3] = x[..., 1] + half_h
    return y


def xywhn2xyxy(x, w: float = 640, h: float = 640, padw: float = 0, padh: float = 0):
    """Normalised xywh to pixel xyxy in an image of size (w, h) placed at offset (padw, padh)."""
    y = _clone(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x, w: float = 640, h: float = 640, clip: bool = False, eps: float = 0.0):
    """Pixel xyxy to normalised xywh; with clip, boxes are first clipped to the image (less eps)."""
    if clip:
        x = _clone(x)
        clip_boxes(x, (h - eps, w - eps))
    y = _clone(x)
    y[..., 0] = ((x[..., 0] + x[..., 2]) / 2) / w
    y[..., 1] = ((x[..., 1] + x[..., 3]) / 2) / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def clip_boxes(boxes, shape) -> None:
    """Clip xyxy boxes in place to an image of shape (height, width)."""
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, shape[1])
        boxes[..., 1].clamp_(0, shape[0])
        boxes[..., 2].clamp_(0, shape[1])
        boxes[..., 3].clamp_(0, shape[0])
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, shape[1])
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, shape[0])


def scale_boxes(img1_shape, boxes, img0_shape, ratio_pad=None):
    """Map xyxy boxes in place from a letterboxed image of shape img1_shape back to img0_shape (h, w).

    ratio_pad is ((gain_h, gain_w), (pad_w, pad_h)) as the letterbox reported it. The gains are applied
    per axis: resizing rounds each side to whole pixels, so at small sizes the two gains differ by up to
    a pixel's worth (0.5% at --img 160), which one shared gain would turn into a systematic shift.
    Without ratio_pad the letterbox geometry is recomputed from the two shapes (one gain, centred pad).
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        gain_h = gain_w = gain
        pad_w, pad_h = (img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2
    else:
        (gain_h, gain_w), (pad_w, pad_h) = ratio_pad
    boxes[..., [0, 2]] = (boxes[..., [0, 2]] - pad_w) / gain_w
    boxes[..., [1, 3]] = (boxes[..., [1, 3]] - pad_h) / gain_h
    clip_boxes(boxes, img0_shape)
    return boxes


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU (N, M) of two sets of xyxy boxes."""
    return torchvision.ops.box_iou(boxes1, boxes2)


MAX_WH = 7680  # pixels: larger than any image side, so boxes of different classes never overlap once shifted


def non_max_suppression(
    prediction: torch.Tensor,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: list[int] | None = None,
    agnostic: bool = False,
    multi_label: bool = False,
    max_det: int = 300,
    max_nms: int = 30000,
) -> list[torch.Tensor]:
    """Per-class NMS on raw detector output, with YOLOv5's semantics.

    prediction: (batch, anchors, 5 + nc) rows of (cx, cy, w, h, objectness, class scores...).
    A candidate's confidence is objectness * class score; with multi_label every class scoring above
    conf_thres yields its own candidate, otherwise only the best class does. At most max_nms candidates
    (highest confidence first) enter NMS and max_det detections leave it.
    Returns one (n, 6) tensor per image: x1, y1, x2, y2, confidence, class.
    """
    if not 0 <= conf_thres <= 1:
        raise ValueError(f"conf_thres must be in [0, 1], got {conf_thres}")
    if not 0 <= iou_thres <= 1:
        raise ValueError(f"iou_thres must be in [0, 1], got {iou_thres}")
    if isinstance(prediction, (list, tuple)):  # eval-mode model output: (predictions, feature maps)
        prediction = prediction[0]
    nc = prediction.shape[2] - 5
    multi_label &= nc > 1
    output = [torch.zeros((0, 6), device=prediction.device)] * prediction.shape[0]
    for i, x in enumerate(prediction):
        x = x[x[:, 4] > conf_thres].float()
        if not x.shape[0]:
            continue
        scores = x[:, 5:] * x[:, 4:5]
        box = xywh2xyxy(x[:, :4])
        if multi_label:
            j, k = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat((box[j], scores[j, k, None], k[:, None].float()), 1)
        else:
            conf, k = scores.max(1, keepdim=True)
            det = torch.cat((box, conf, k.float()), 1)[conf.view(-1) > conf_thres]
        if classes is not None:
            det = det[(det[:, 5:6] == torch.tensor(classes, device=det.device)).any(1)]
        if not det.shape[0]:
            continue
        det = det[det[:, 4].argsort(descending=True)[:max_nms]]
        # Per-class NMS by moving each class's boxes MAX_WH pixels apart, as YOLOv5 does: the float32 rounding
        # of the shifted coordinates is then the same as YOLOv5's, so borderline suppressions agree with it.
        offsets = torch.zeros_like(det[:, 5:6]) if agnostic else det[:, 5:6] * MAX_WH
        keep = torchvision.ops.nms(det[:, :4] + offsets, det[:, 4], iou_thres)[:max_det]
        output[i] = det[keep]
    return output
