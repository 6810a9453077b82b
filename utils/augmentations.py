"""Image augmentations for detection: letterbox, mosaic, random perspective, HSV jitter, flips, mixup.

Every random function takes an explicit `rng: np.random.Generator`; nothing reads a global random state,
so the data pipeline can make each sample a pure function of (seed, epoch, index).

Images are HWC uint8 BGR arrays (as cv2 reads them). Box labels come in two layouts:
  pixel labels  (n, 5) [cls, x1, y1, x2, y2] in the image's pixels (mosaic, random_perspective, mixup),
  normalised    (n, 5) [cls, cx, cy, w, h] as fractions of the image size (random_flips).

YOLOv5's `copy_paste` needs polygon segments, which YOLO box labels do not have; it is not implemented
and the data pipeline says so when a hyp file asks for it.
"""
from __future__ import annotations


import cv2
import numpy as np

from utils.boxes import xywhn2xyxy

FILL_VALUE = 114  # grey used for padding, as YOLOv5 does


def letterbox(im: np.ndarray, new_shape=640, color=(FILL_VALUE,) * 3, auto: bool = True,
              scale_fill: bool = False, scaleup: bool = True, stride: int = 32):
    """Resize keeping the aspect ratio, then pad to new_shape (h, w) or (s, s).

    auto: pad only up to the next multiple of stride (minimum rectangle) instead of the full shape.
    scale_fill: stretch to new_shape without padding. scaleup=False never enlarges (validation).
    Returns (image, (ratio_w, ratio_h), (pad_w, pad_h)), YOLOv5's letterbox geometry: the image is placed
    at (floor(pad_w), floor(pad_h)), and (pad_w, pad_h) is half the padding added on each axis, a half pixel
    more than where the image sits when that padding is odd. Labels are mapped into the output and boxes back
    out of it with these pads, as YOLOv5 does in training and validation: models trained by YOLOv5 (ours
    too) learned boxes in that frame, so mapping them with the whole-pixel offset would shift every box by
    half a pixel and cost mAP50-95 against YOLOv5's val.py on the same weights.
    """
    h0, w0 = im.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    out_h, out_w = int(new_shape[0]), int(new_shape[1])

    if scale_fill:
        new_w, new_h = out_w, out_h
    else:
        r = min(out_h / h0, out_w / w0)
        if not scaleup:
            r = min(r, 1.0)
        new_w, new_h = max(1, int(round(w0 * r))), max(1, int(round(h0 * r)))
        if auto:  # shrink the canvas to the smallest stride multiple holding the image
            out_w = new_w + (out_w - new_w) % stride
            out_h = new_h + (out_h - new_h) % stride

    if (new_w, new_h) != (w0, h0):
        im = cv2.resize(im, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pad_w, pad_h = out_w - new_w, out_h - new_h
    left, top = pad_w // 2, pad_h // 2
    if pad_w or pad_h:
        im = cv2.copyMakeBorder(im, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT, value=color)
    return im, (new_w / w0, new_h / h0), (pad_w / 2, pad_h / 2)


def augment_hsv(im: np.ndarray, rng: np.random.Generator, hgain: float = 0.5, sgain: float = 0.5,
                vgain: float = 0.5) -> None:
    """Jitter hue, saturation and value of a BGR uint8 image in place by random gains in [1-g, 1+g]."""
    gains = rng.uniform(-1.0, 1.0, 3) * (hgain, sgain, vgain) + 1.0
    if not (hgain or sgain or vgain):
        return
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_hue = ((x * gains[0]) % 180).astype(np.uint8)  # OpenCV's 8-bit hue runs 0..179 and wraps
    lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=im)


def box_candidates(box1: np.ndarray, box2: np.ndarray, wh_thr: float = 2, ar_thr: float = 100,
                   area_thr: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """Which warped boxes to keep: box1 (n, 4) xyxy before warping (already scaled by the warp's zoom),
    box2 (n, 4) after warping and clipping. Kept: wider and taller than wh_thr pixels, at least area_thr
    of the area they had, aspect ratio under ar_thr."""
    w1, h1 = box1[:, 2] - box1[:, 0], box1[:, 3] - box1[:, 1]
    w2, h2 = box2[:, 2] - box2[:, 0], box2[:, 3] - box2[:, 1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (aspect < ar_thr)


def random_perspective(im: np.ndarray, labels: np.ndarray, rng: np.random.Generator, degrees: float = 10,
                       translate: float = 0.1, scale: float = 0.1, shear: float = 10, perspective: float = 0.0,
                       border=(0, 0)):
    """Random rotation, scale, shear, translation and perspective of an image and its pixel labels.

    border (top/bottom, left/right) grows (positive) or crops (negative) the output: the output is
    (h + 2*border[0], w + 2*border[1]); a mosaic canvas of 2s uses border -s/2 to come out s x s.
    Boxes are warped by their four corners, clipped to the output, and dropped by box_candidates.
    Returns (image, labels).
    """
    out_h, out_w = im.shape[0] + 2 * border[0], im.shape[1] + 2 * border[1]

    # Compose right to left: move the image centre to the origin, apply perspective, rotate and scale,
    # shear, then translate to a random point around the output centre.
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -im.shape[1] / 2, -im.shape[0] / 2
    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = rng.uniform(-perspective, perspective, 2)
    rot = np.eye(3)
    angle = rng.uniform(-degrees, degrees)
    zoom = rng.uniform(1 - scale, 1 + scale)
    rot[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=angle, scale=zoom)
    shr = np.eye(3)
    shr[0, 1], shr[1, 0] = np.tan(np.deg2rad(rng.uniform(-shear, shear, 2)))
    move = np.eye(3)
    move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_w
    move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_h
    M = move @ shr @ rot @ persp @ centre

    if border[0] or border[1] or not np.array_equal(M, np.eye(3)):
        fill = (FILL_VALUE,) * 3
        if perspective:
            im = cv2.warpPerspective(im, M, dsize=(out_w, out_h), borderValue=fill)
        else:
            im = cv2.warpAffine(im, M[:2], dsize=(out_w, out_h), borderValue=fill)

    if len(labels):
        corners = labels[:, [1, 2, 3, 2, 3, 4, 1, 4]].reshape(-1, 2)  # (x1,y1) (x2,y1) (x2,y2) (x1,y2)
        pts = np.concatenate([corners, np.ones((len(corners), 1))], axis=1) @ M.T
        pts = pts[:, :2] / pts[:, 2:3] if perspective else pts[:, :2]
        pts = pts.reshape(-1, 4, 2)
        warped = np.concatenate([pts.min(axis=1), pts.max(axis=1)], axis=1)
        warped[:, [0, 2]] = warped[:, [0, 2]].clip(0, out_w)
        warped[:, [1, 3]] = warped[:, [1, 3]].clip(0, out_h)
        keep = box_candidates(labels[:, 1:5] * zoom, warped, area_thr=0.10)
        labels = np.concatenate([labels[keep, :1], warped[keep]], axis=1).astype(np.float32)
    return im, labels


def mosaic4(images, labels_list, size: int, rng: np.random.Generator):
    """Place four images around a random centre of a 2*size square grey canvas.

    images: four HWC uint8 images (each at most `size` on its long side); labels_list: their normalised
    labels (n, 5) [cls, cx, cy, w, h]. Image k goes to quadrant k (top-left, top-right, bottom-left,
    bottom-right) with its inner corner on the centre, cut off where it leaves the canvas.
    Returns (canvas (2s, 2s, 3), pixel labels (n, 5) [cls, x1, y1, x2, y2] clipped to the canvas).
    """
    s2 = 2 * size
    xc, yc = (int(v) for v in rng.uniform(size / 2, 3 * size / 2, 2))
    canvas = np.full((s2, s2, images[0].shape[2]), FILL_VALUE, dtype=np.uint8)
    out = []
    for k, (im, lb) in enumerate(zip(images, labels_list)):
        h, w = im.shape[:2]
        x0 = xc - w if k in (0, 2) else xc  # where the image's top-left corner falls on the canvas
        y0 = yc - h if k in (0, 1) else yc
        cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + w, s2), min(y0 + h, s2)
        canvas[cy1:cy2, cx1:cx2] = im[cy1 - y0:cy2 - y0, cx1 - x0:cx2 - x0]
        if len(lb):
            px = lb.copy()
            px[:, 1:] = xywhn2xyxy(lb[:, 1:], w, h, x0, y0)
            out.append(px)
    labels = np.concatenate(out, 0) if out else np.zeros((0, 5), np.float32)
    labels[:, 1:] = labels[:, 1:].clip(0, s2)
    return canvas, labels.astype(np.float32)


def mixup(im: np.ndarray, labels: np.ndarray, im2: np.ndarray, labels2: np.ndarray, rng: np.random.Generator):
    """Blend two same-sized images with a Beta(32, 32) ratio (mostly near 0.5) and keep both label sets."""
    r = rng.beta(32.0, 32.0)
    blended = (im.astype(np.float32) * r + im2.astype(np.float32) * (1 - r)).astype(np.uint8)
    return blended, np.concatenate([labels, labels2], 0)


def random_flips(im: np.ndarray, labels: np.ndarray, rng: np.random.Generator, flipud: float = 0.0,
                 fliplr: float = 0.5):
    """Flip up-down with probability flipud and left-right with probability fliplr; labels normalised
    (n, 5) [cls, cx, cy, w, h] are updated in place. Returns (image, labels)."""
    draw_ud, draw_lr = rng.random(2)
    if draw_ud < flipud:
        im = np.flipud(im)
        labels[:, 2] = 1 - labels[:, 2]
    if draw_lr < fliplr:
        im = np.fliplr(im)
        labels[:, 1] = 1 - labels[:, 1]
    return im, labels
