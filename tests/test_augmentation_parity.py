"""bench/augmentation_parity.py: our side's statistics against values worked out by hand, and its comparison.

YOLOv5 is not needed: the bench's YOLOv5 side is the same statistics code run in YOLOv5's interpreter.
"""
import json

import cv2
import numpy as np
from scipy.stats import ks_2samp

from bench import augmentation_parity as ap
from utils.log import LOGGER

AUGMENTATION_OFF = dict(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, degrees=0.0, translate=0.0, scale=0.0, shear=0.0,
                        perspective=0.0, flipud=0.0, fliplr=0.0, mosaic=0.0, mixup=0.0, copy_paste=0.0)
SCRATCH_LOW = dict(AUGMENTATION_OFF, hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, translate=0.1, scale=0.5, fliplr=0.5,
                   mosaic=1.0)

# two 64 px images, landscape (64 x 48) and portrait (48 x 64), with labels [cls, cx, cy, w, h] inside them
IMAGES = {
    "a": ((48, 64), [[3, 0.25, 0.5, 0.25, 0.5], [7, 0.75, 0.25, 0.375, 0.25]]),
    "b": ((64, 48), [[1, 0.5, 0.5, 0.5, 0.25]]),
}


def write_dataset(root, images=IMAGES):
    """Images of random colours in 0..100 (so no pixel is the grey 114) and their labels; the image folder."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    (root / "labels").mkdir()
    pictures = {}
    for name, ((h, w), labels) in images.items():
        pictures[name] = rng.integers(0, 101, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"{name}.png"), pictures[name])
        (root / "labels" / f"{name}.txt").write_text("".join(" ".join(map(str, lb)) + "\n" for lb in labels))
    return root / "images", pictures


def test_without_augmentation_the_statistics_are_the_labels_and_the_letterboxed_image(tmp_path):
    folder, pictures = write_dataset(tmp_path)
    got = ap.our_statistics(folder, 64, AUGMENTATION_OFF, count=4, cache_images=None)  # a, b, a, b
    for k, name in enumerate(["a", "b", "a", "b"]):
        (h, w), labels = IMAGES[name]
        labels = np.array(labels)
        # letterboxed by hand: the 64 px long side stays, the short side is padded evenly with 114
        canvas = np.full((64, 64, 3), 114, np.uint8)
        top, left = (64 - h) // 2, (64 - w) // 2
        canvas[top:top + h, left:left + w] = pictures[name]
        rgb = canvas[..., ::-1].reshape(-1, 3).astype(np.float64)
        hsv = cv2.cvtColor(canvas, cv2.COLOR_BGR2HSV).reshape(-1, 3).mean(0)
        assert got["boxes_out"][k] == got["labels_in"][k] == len(labels)
        assert got["dropped"][k] == got["off_canvas"][k] == got["dropped_by_warp"][k] == 0
        assert got["fill_fraction"][k] == 1 - h * w / 64**2
        np.testing.assert_allclose([got[f"mean_{c}"][k] for c in "rgb"], rgb.mean(0))
        np.testing.assert_allclose([got[f"std_{c}"][k] for c in "rgb"], rgb.std(0))
        np.testing.assert_allclose([got[c][k] for c in "hsv"], hsv)
        np.testing.assert_allclose([got[f"pre_{c}"][k] for c in "hsv"], hsv)  # HSV gains 0: nothing changed
        assert got["s_ratio"][k] == got["v_ratio"][k] == 1
        mine = got["box_sample"] == k
        np.testing.assert_array_equal(got["box_cls"][mine], labels[:, 0])
        np.testing.assert_allclose(got["box_w"][mine], labels[:, 3] * w, atol=1e-3)  # pixels, unscaled
        np.testing.assert_allclose(got["box_h"][mine], labels[:, 4] * h, atol=1e-3)
        np.testing.assert_allclose(got["box_cx"][mine], (labels[:, 1] * w + left) / 64, atol=1e-6)
        np.testing.assert_allclose(got["box_cy"][mine], (labels[:, 2] * h + top) / 64, atol=1e-6)


def test_a_mosaic_of_a_one_image_dataset_takes_its_labels_four_times(tmp_path):
    folder, _ = write_dataset(tmp_path, {"a": IMAGES["a"]})
    got = ap.our_statistics(folder, 64, SCRATCH_LOW, count=40, cache_images=None)
    assert (got["labels_in"] == 4 * 2).all()  # the image itself and three others, all of them the same image
    assert (got["off_canvas"] + got["dropped_by_warp"] + got["boxes_out"] == got["labels_in"]).all()
    assert (got["off_canvas"] >= 0).all() and (got["dropped_by_warp"] >= 0).all()
    assert got["boxes_out"].sum() == len(got["box_cls"]) and set(got["box_cls"]) <= {3, 7}
    assert (got["fill_fraction"] > 0).any() and (got["fill_fraction"] <= 1).all()
    assert (got["box_w"] > 0).all() and (got["box_h"] > 0).all()
    # V is scaled by a gain in [0.6, 1.4] and clipped at 255, so the mean's ratio stays in that range (a
    # little slack for the 8-bit round trip HSV -> BGR -> HSV)
    assert (got["v_ratio"] > 0.58).all() and (got["v_ratio"] < 1.42).all()
    assert got["v_ratio"].std() > 0.05  # and it is drawn anew for each sample


def synthetic_side(rng, samples=2000, scale=None):
    """collect()-shaped arrays: normal per-sample statistics, 3 boxes per sample of lognormal sizes, 5 classes;
    scale multiplies the named statistics."""
    scale = scale or {}
    side = {name: rng.normal(10, 2, samples) * scale.get(name, 1) for name, _ in ap.SAMPLE_STATS}
    n = 3 * samples
    side.update(box_sample=np.repeat(np.arange(samples), 3), box_cls=rng.integers(0, 5, n),
                box_cx=rng.uniform(0.1, 0.9, n), box_cy=rng.uniform(0.1, 0.9, n),
                box_w=rng.lognormal(3, 0.5, n) * scale.get("box_w", 1), box_h=rng.lognormal(3, 0.5, n),
                samples=np.array(samples))
    return side


def test_the_comparison_flags_a_10_percent_shift_and_not_noise():
    rng = np.random.default_rng(0)
    theirs = synthetic_side(rng)
    same = ap.compare(theirs, synthetic_side(rng), permutations=50)
    assert not any(r["flag"] for r in same["rows"]) and not any(s["flag"] for s in same["classes"]["shares"])
    assert all(r["resolution"] < ap.REL_TOLERANCE for r in same["rows"])  # 2,000 samples resolve 5% here
    shifted = ap.compare(theirs, synthetic_side(rng, scale=dict(boxes_out=1.1, box_w=1.1)), permutations=50)
    flagged = {r["name"]: r for r in shifted["rows"] if r["flag"]}
    assert set(flagged) == {"boxes_out", "box_w", "box_area", "box_aspect"}  # area and w / h follow w
    assert abs(flagged["boxes_out"]["rel"] - 0.1) < 0.02 and flagged["boxes_out"]["ks_p"] < 1e-6
    assert flagged["box_w"]["ks_p"] == 1 / 51  # no permutation of whole samples comes near the real split


def test_one_box_per_sample_gives_the_plain_standard_error_and_ks_distance():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 300), rng.normal(0.2, 1, 200)
    mean, se, _ = ap.clustered_mean(a, np.arange(300), 300)
    assert np.isclose(mean, a.mean()) and np.isclose(se, a.std(ddof=1) / np.sqrt(300))
    d, p = ap.clustered_ks(a, np.arange(300), 300, b, np.arange(200), 200, permutations=20, rng=rng)
    assert np.isclose(d, ks_2samp(a, b).statistic) and 0 < p <= 1


def test_quick_mode_runs_our_side_alone(tmp_path, capsys):
    folder, _ = write_dataset(tmp_path)
    out = tmp_path / "result.json"
    level, handlers = LOGGER.level, list(LOGGER.handlers)
    try:
        assert ap.main(ap.parse_opt(["--quick", "--datasets", f"{folder}:64", "--out", str(out)])) == 0
    finally:  # main quiets the project's logger; later tests read its INFO lines
        LOGGER.setLevel(level)
        LOGGER.handlers[:] = handlers
    printed = capsys.readouterr().out
    assert "| boxes_out | sample |" in printed and "| box_area | box |" in printed
    assert json.loads(out.read_text())["datasets"]["images"]["samples"] == 48
