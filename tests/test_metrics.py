"""utils/metrics.py against hand-computed values (COCO matching, 101-point AP, max-F1, confusion matrix)."""
import numpy as np
import pytest
import torch

from utils.metrics import IOU_THRESHOLDS, ConfusionMatrix, ap_per_class, fitness, match_predictions


def test_iou_thresholds_are_cocos():
    assert np.allclose(IOU_THRESHOLDS, [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])


def test_fitness_weights_map50_and_map50_95():
    x = np.array([[0.3, 0.4, 0.6, 0.2], [1.0, 1.0, 0.0, 1.0]])
    assert fitness(x) == pytest.approx([0.1 * 0.6 + 0.9 * 0.2, 0.9])
    assert fitness([0.5, 0.5, 0.5, 0.4, 1.0, 2.0, 3.0]) == pytest.approx(0.41)  # loss columns ignored


def test_matching_follows_score_order_not_best_iou():
    # One box; the higher-scored prediction overlaps it less (IoU 0.63) than the lower-scored one (0.92).
    # COCO gives the box to the higher score wherever it qualifies; the other one only gets it beyond 0.63.
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    preds = torch.tensor([[0.0, 0.0, 10.0, 6.3], [0.0, 0.0, 10.0, 9.2]])
    correct = match_predictions(preds, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), gt, torch.tensor([1]))
    t = IOU_THRESHOLDS
    assert correct[0].tolist() == (t <= 0.63).tolist()
    assert correct[1].tolist() == ((t > 0.63) & (t <= 0.92)).tolist()


def test_matching_respects_class_and_single_use_and_order_of_input():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=float)
    gt_cls = np.array([0, 1])
    # given in scrambled score order: a duplicate of box 0 (lower score), box 0, a wrong-class copy of box 1
    preds = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=float)
    scores = np.array([0.5, 0.7, 0.9])
    cls = np.array([0, 0, 2])
    correct = match_predictions(preds, scores, cls, gt, gt_cls)
    assert not correct[0].any()  # box 0 already taken by the 0.7 prediction
    assert correct[1].all()
    assert not correct[2].any()  # class 2 never matches a class-1 box


def test_matching_prefers_best_iou_among_free_boxes():
    gt = np.array([[0, 0, 10, 10], [1, 0, 11, 10]], dtype=float)  # prediction equals the second box
    correct = match_predictions(np.array([[1, 0, 11, 10.0]]), [0.9], [0], gt, [0, 0])
    assert correct.all()  # matched box 1 at IoU 1 (box 0 would fail above IoU 0.818)


def test_matching_gives_an_iou_tie_to_the_later_box():
    # Boxes A = [0, 10] and B = [5, 15] (x; y 0..10). The first prediction, x 2..13, overlaps each by
    # 80 / 130 = 0.615; COCOeval's scan keeps the later of equal IoUs, so it takes B at t <= 0.6, which
    # leaves A to the second prediction (A itself) at every threshold. Taking A would make it a duplicate.
    gt = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], dtype=float)
    preds = np.array([[2, 0, 13, 10], [0, 0, 10, 10]], dtype=float)
    correct = match_predictions(preds, [0.9, 0.8], [0, 0], gt, [0, 0])
    assert correct[0].tolist() == (IOU_THRESHOLDS <= 80 / 130).tolist()
    assert correct[1].all()


def test_ap_hand_computed_101_point_envelope():
    # 2 boxes; predictions by score: TP, FP, TP (exact overlaps -> same at every IoU threshold).
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> envelope 1, 2/3, 2/3.
    # recall points 0..0.50 (51 of them) read 1, points 0.51..1 (50) read 2/3.
    tp = np.array([[True] * 10, [False] * 10, [True] * 10])
    res = ap_per_class(tp, conf=[0.9, 0.8, 0.7], pred_cls=[3, 3, 3], target_cls=[3, 3])
    expected = (51 * 1 + 50 * 2 / 3) / 101
    assert res.classes.tolist() == [3]
    assert res.ap50[0] == pytest.approx(expected, abs=1e-12)
    assert res.ap50_95[0] == pytest.approx(expected, abs=1e-12)


def test_ap_class_without_predictions_counts_zero_and_class_without_gt_is_excluded():
    tp = np.array([[True] * 10, [True] * 10])
    # class 0: one box, found; class 1: one box, never predicted; class 2: predicted, has no box
    res = ap_per_class(tp, conf=[0.9, 0.8], pred_cls=[0, 2], target_cls=[0, 1])
    assert res.classes.tolist() == [0, 1]
    assert res.ap50.tolist() == pytest.approx([1.0, 0.0])
    mp, mr, map50, map50_95 = res.mean_results()
    assert map50 == pytest.approx(0.5) and map50_95 == pytest.approx(0.5)
    assert res.p.tolist() == pytest.approx([1.0, 0.0]) and res.r.tolist() == pytest.approx([1.0, 0.0])


def test_precision_recall_read_at_max_f1_confidence():
    # A threshold c keeps the predictions scoring >= c.
    # Class 0 (2 boxes): 0.9 TP, 0.8 TP, 0.7 FP, 0.6 FP -> F1 = 1 for c in (0.7, 0.8], 2/3 in (0.8, 0.9].
    # Class 1 (1 box): 0.95 FP, 0.85 TP -> P = 1/2, R = 1 (F1 2/3) for c <= 0.85.
    # Mean F1 peaks at (1 + 2/3) / 2 for c in (0.7, 0.8]; P, R and the counts are read there.
    tp = np.array([[1] * 10, [1] * 10, [0] * 10, [0] * 10, [0] * 10, [1] * 10], dtype=bool)
    conf = [0.9, 0.8, 0.7, 0.6, 0.95, 0.85]
    res = ap_per_class(tp, conf=conf, pred_cls=[0, 0, 0, 0, 1, 1], target_cls=[0, 0, 1])
    assert 0.7 < res.best_conf <= 0.8
    assert res.p.tolist() == pytest.approx([1.0, 0.5], abs=1e-9)
    assert res.r.tolist() == pytest.approx([1.0, 1.0], abs=1e-9)
    assert res.f1.tolist() == pytest.approx([1.0, 2 / 3], abs=1e-9)
    assert res.tp.tolist() == [2, 1] and res.fp.tolist() == [0, 1]
    assert res.f1_curve.mean(0).max() == pytest.approx((1 + 2 / 3) / 2, abs=1e-9)


def test_ap_with_no_predictions_at_all():
    res = ap_per_class(np.zeros((0, 10), bool), conf=[], pred_cls=[], target_cls=[0, 0, 5])
    assert res.classes.tolist() == [0, 5]
    assert res.ap.shape == (2, 10) and not res.ap.any()
    assert res.mean_results() == (0.0, 0.0, 0.0, 0.0)


def test_confusion_matrix_hand_counts():
    cm = ConfusionMatrix(nc=3, conf=0.25, iou_thres=0.45)
    labels = torch.tensor([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30], [2, 50, 50, 60, 60.0]])
    detections = torch.tensor(
        [
            [0, 0, 10, 10, 0.9, 0],  # correct class 0
            [20, 20, 30, 30, 0.8, 2],  # box of class 1 called class 2
            [0, 0, 10, 9, 0.7, 0],  # second hit on box 0: box already paired -> background FP of class 0
            [80, 80, 90, 90, 0.6, 1],  # nothing there -> background FP of class 1
            [50, 50, 60, 60, 0.1, 2],  # below conf 0.25 -> dropped, so box of class 2 is missed
        ]
    )
    cm.process_batch(detections, labels)
    expected = np.zeros((4, 4), int)
    expected[0, 0] = 1
    expected[2, 1] = 1
    expected[0, 3] = 1
    expected[1, 3] = 1
    expected[3, 2] = 1
    assert (cm.matrix == expected).all()
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0, 0] and fp.tolist() == [1, 1, 1]
    cm.process_batch(torch.zeros((0, 6)), labels[:1])  # no detections: the box is missed
    assert cm.matrix[3, 0] == 1
