"""Detection metrics computed the way pycocotools' COCOeval computes them.

Matching: within one image, predictions are visited in descending score order and each takes the
unmatched ground-truth box of its class with the highest IoU, provided that IoU reaches the threshold;
this is repeated independently for every IoU threshold 0.50, 0.55, ..., 0.95.
Average precision: per class, the precision-recall curve over all images is made monotone from the
right (the "envelope") and sampled at the 101 recall points 0, 0.01, ..., 1 exactly as COCOeval samples
it. A class with ground truth but no predictions has AP 0; a class without ground truth is left out of
every mean (COCOeval marks it -1).
Precision and recall reported next to mAP are read at the one confidence threshold that maximises the
F1 score averaged over classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision

# COCOeval's thresholds, built the same way so that float comparisons agree bit for bit.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_POINTS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
CONFIDENCE_GRID = np.linspace(0, 1, 1000)  # x axis of the P, R and F1 versus confidence curves


def fitness(x) -> np.ndarray:
    """Model fitness used to pick best.pt: 0.1 * mAP50 + 0.9 * mAP50-95 on rows [P, R, mAP50, mAP50-95, ...]."""
    x = np.asarray(x, dtype=np.float64)
    return 0.1 * x[..., 2] + 0.9 * x[..., 3]


def _as_float64_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def match_predictions(pred_boxes, pred_scores, pred_cls, gt_boxes, gt_cls, iou_thresholds=IOU_THRESHOLDS) -> np.ndarray:
    """Which predictions of one image are true positives at each IoU threshold, COCO-style.

    pred_boxes (n, 4) and gt_boxes (m, 4) are xyxy in the same pixel space; pred_scores (n,), pred_cls (n,),
    gt_cls (m,). Returns a bool array (n, len(iou_thresholds)) in the order the predictions were given.
    Ties in score keep the given order (a stable sort, like COCOeval's mergesort); ties in IoU go to the
    later ground-truth box, which is what COCOeval's scan does.
    """
    iou_thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    n, m = len(pred_scores), len(gt_cls)
    correct = np.zeros((n, len(iou_thresholds)), dtype=bool)
    if n == 0 or m == 0:
        return correct
    # IoU in float64 as COCOeval does; pairs of different classes can never match.
    iou = torchvision.ops.box_iou(_as_float64_tensor(pred_boxes), _as_float64_tensor(gt_boxes)).numpy()
    same_class = _as_float64_tensor(pred_cls).numpy()[:, None] == _as_float64_tensor(gt_cls).numpy()[None, :]
    iou = np.where(same_class, iou, -1.0)
    # COCOeval compares against min(t, 1 - 1e-10), so an IoU of exactly 1 still matches at any t.
    effective_thr = np.minimum(iou_thresholds, 1 - 1e-10)
    order = np.argsort(-_as_float64_tensor(pred_scores).numpy(), kind="mergesort")
    candidates = iou.max(1) >= effective_thr.min()
    gt_taken = np.zeros((len(iou_thresholds), m), dtype=bool)
    reversed_cols = np.arange(m)[::-1]
    for d in order:
        if not candidates[d]:  # overlaps nothing of its class enough at the loosest threshold
            continue
        # (T, m) IoU of this prediction with each still-free box, per threshold; -inf where not allowed
        allowed = (~gt_taken) & (iou[d][None, :] >= effective_thr[:, None])
        masked = np.where(allowed, iou[d][None, :], -np.inf)
        best = reversed_cols[np.argmax(masked[:, ::-1], axis=1)]  # last index among equal maxima
        hit = np.isfinite(masked[np.arange(len(iou_thresholds)), best])
        correct[d] = hit
        gt_taken[np.nonzero(hit)[0], best[hit]] = True
        if gt_taken.all():  # every box is taken at every threshold: the rest are false positives
            break
    return correct


def _envelope_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray]:
    """COCO 101-point AP of one PR curve (ordered by descending score), and the sampled precision."""
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    sampled = np.zeros(len(RECALL_POINTS))
    valid = idx < len(envelope)
    sampled[valid] = envelope[idx[valid]]
    return float(sampled.mean()), sampled


@dataclass
class APResult:
    """Per-class results of ap_per_class; arrays are indexed like `classes` (classes with ground truth)."""

    classes: np.ndarray  # (k,) class ids with at least one ground-truth box, ascending
    n_gt: np.ndarray  # (k,) ground-truth boxes per class
    ap: np.ndarray  # (k, T) AP per class per IoU threshold
    p: np.ndarray  # (k,) precision at the max-mean-F1 confidence
    r: np.ndarray  # (k,) recall at that confidence
    f1: np.ndarray  # (k,) F1 at that confidence
    tp: np.ndarray  # (k,) true positives at that confidence (IoU 0.5)
    fp: np.ndarray  # (k,) false positives at that confidence
    best_conf: float  # the confidence threshold where P, R, F1 are read
    pr_curve: np.ndarray  # (k, 101) envelope precision at RECALL_POINTS, IoU 0.5
    p_curve: np.ndarray  # (k, 1000) precision versus CONFIDENCE_GRID, IoU 0.5
    r_curve: np.ndarray  # (k, 1000) recall versus CONFIDENCE_GRID
    f1_curve: np.ndarray  # (k, 1000) F1 versus CONFIDENCE_GRID

    @property
    def ap50(self) -> np.ndarray:
        return self.ap[:, 0] if self.ap.size else np.zeros(0)

    @property
    def ap50_95(self) -> np.ndarray:
        return self.ap.mean(1) if self.ap.size else np.zeros(0)

    def mean_results(self) -> tuple[float, float, float, float]:
        """(mean P, mean R, mAP50, mAP50-95) over the classes with ground truth; zeros when there are none."""
        if not len(self.classes):
            return 0.0, 0.0, 0.0, 0.0
        return float(self.p.mean()), float(self.r.mean()), float(self.ap50.mean()), float(self.ap50_95.mean())


def ap_per_class(tp, conf, pred_cls, target_cls, eps: float = 1e-16) -> APResult:
    """Average precision per class over a whole dataset.

    tp: (n, T) bool, from match_predictions, for all predictions of all images, concatenated image by
    image (COCOeval's order, which decides ties in score); conf (n,), pred_cls (n,); target_cls (g,) the
    class of every ground-truth box. Predictions of classes without ground truth are ignored.
    """
    conf = np.asarray(conf, dtype=np.float64).reshape(-1)
    pred_cls = np.asarray(pred_cls).reshape(-1)
    target_cls = np.asarray(target_cls).reshape(-1)
    tp = np.asarray(tp, dtype=bool)
    n_thr = tp.shape[1] if tp.ndim == 2 and tp.shape[1] else len(IOU_THRESHOLDS)
    tp = tp.reshape(len(conf), n_thr)

    order = np.argsort(-conf, kind="mergesort")
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    classes, n_gt = np.unique(target_cls, return_counts=True)
    k = len(classes)
    ap = np.zeros((k, n_thr))
    pr_curve = np.zeros((k, len(RECALL_POINTS)))
    p_curve = np.zeros((k, len(CONFIDENCE_GRID)))
    r_curve = np.zeros((k, len(CONFIDENCE_GRID)))

    for ci, c in enumerate(classes):
        sel = pred_cls == c
        if not sel.any():
            continue  # ground truth but no predictions: AP, P and R stay 0
        tpc = np.cumsum(tp[sel], 0, dtype=np.float64)
        fpc = np.cumsum(~tp[sel], 0, dtype=np.float64)
        recall = tpc / n_gt[ci]
        precision = tpc / (tpc + fpc + np.spacing(1))
        for t in range(n_thr):
            ap[ci, t], sampled = _envelope_ap(recall[:, t], precision[:, t])
            if t == 0:
                pr_curve[ci] = sampled
        # Curves versus confidence at IoU 0.5, as step functions: at threshold c the kept predictions
        # are those scoring >= c (no interpolation between scores, which would invent operating points).
        kept = np.searchsorted(-conf[sel], -CONFIDENCE_GRID, side="right")
        some = kept > 0
        r_curve[ci, some] = recall[kept[some] - 1, 0]
        p_curve[ci] = 1.0  # nothing kept: no false positives
        p_curve[ci, some] = precision[kept[some] - 1, 0]

    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    best = int(np.argmax(f1_curve.mean(0))) if k else 0
    p, r, f1 = p_curve[:, best], r_curve[:, best], f1_curve[:, best]
    tp_at = np.round(r * n_gt)
    fp_at = np.round(tp_at / (p + eps) - tp_at)
    return APResult(
        classes=classes.astype(int),
        n_gt=n_gt,
        ap=ap,
        p=p,
        r=r,
        f1=f1,
        tp=tp_at,
        fp=fp_at,
        best_conf=float(CONFIDENCE_GRID[best]),
        pr_curve=pr_curve,
        p_curve=p_curve,
        r_curve=r_curve,
        f1_curve=f1_curve,
    )


class ConfusionMatrix:
    """Detection confusion matrix with a background class.

    matrix[predicted, true] counts, with index nc meaning background: matrix[nc, c] is a missed box of
    class c, matrix[c, nc] a detection of class c that matches no box. Detections below `conf` are
    dropped; detections and boxes are paired one to one, greedily by descending IoU over `iou_thres`,
    whatever their classes (a pair of different classes is a confusion).
    """

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45):
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)

    def process_batch(self, detections, labels) -> None:
        """detections (n, 6) [x1, y1, x2, y2, conf, cls]; labels (m, 5) [cls, x1, y1, x2, y2] of one image."""
        labels = _as_float64_tensor(labels).reshape(-1, 5)
        gt_cls = labels[:, 0].long().numpy()
        if detections is None or len(detections) == 0:
            np.add.at(self.matrix, (self.nc, gt_cls), 1)
            return
        detections = _as_float64_tensor(detections).reshape(-1, 6)
        detections = detections[detections[:, 4] > self.conf]
        det_cls = detections[:, 5].long().numpy()
        det_used = np.zeros(len(det_cls), dtype=bool)
        gt_used = np.zeros(len(gt_cls), dtype=bool)
        if len(det_cls) and len(gt_cls):
            iou = torchvision.ops.box_iou(labels[:, 1:], detections[:, :4]).numpy()  # (m, n)
            gi, di = np.nonzero(iou > self.iou_thres)
            for k in np.argsort(-iou[gi, di], kind="mergesort"):
                g, d = gi[k], di[k]
                if gt_used[g] or det_used[d]:
                    continue
                gt_used[g] = det_used[d] = True
                self.matrix[det_cls[d], gt_cls[g]] += 1
        np.add.at(self.matrix, (self.nc, gt_cls[~gt_used]), 1)
        np.add.at(self.matrix, (det_cls[~det_used], self.nc), 1)

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """Per class: true positives (diagonal) and false positives (row sum less diagonal), background excluded."""
        tp = self.matrix.diagonal()[:-1]
        fp = self.matrix.sum(1)[:-1] - tp
        return tp, fp
