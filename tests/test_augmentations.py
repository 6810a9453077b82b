"""Augmentations against hand-computed geometry and pixel facts."""
import numpy as np
import pytest

from utils.augmentations import (FILL_VALUE, augment_hsv, box_candidates, letterbox, mixup, mosaic4,
                                 random_flips, random_perspective)


def solid(h, w, bgr):
    return np.full((h, w, 3), bgr, np.uint8)


def test_letterbox_full_square_hand_computed():
    im = solid(50, 100, (10, 20, 30))
    out, ratio, pad = letterbox(im, 64, auto=False)
    # r = min(64/50, 64/100) = 0.64 -> 64 x 32 resized, 32 rows of padding split 16/16
    assert out.shape == (64, 64, 3)
    assert ratio == (0.64, 0.64) and pad == (0.0, 16.0)
    assert (out[:16] == FILL_VALUE).all() and (out[48:] == FILL_VALUE).all()
    assert (out[16:48] == (10, 20, 30)).all()


def test_letterbox_odd_padding_and_auto_and_no_scaleup():
    im = solid(45, 100, (0, 0, 255))
    out, ratio, pad = letterbox(im, 64, auto=False)
    # 45 * 0.64 = 28.8 -> 29 rows; 35 rows of padding: 17 above, 18 below; YOLOv5 reports the pad as 35 / 2
    assert out.shape == (64, 64, 3) and pad == (0.0, 17.5)
    assert ratio == (0.64, 29 / 45)
    assert (out[17:46] == (0, 0, 255)).all() and (out[:17] == FILL_VALUE).all() and (out[46:] == FILL_VALUE).all()

    out, _, pad = letterbox(im, 64, auto=True, stride=32)  # minimum rectangle: 29 rows -> 32
    assert out.shape == (32, 64, 3) and pad == (0.0, 1.5) and (out[1:30] == (0, 0, 255)).all()

    small = solid(10, 20, (1, 2, 3))
    out, ratio, pad = letterbox(small, 64, auto=False, scaleup=False)  # never enlarged
    assert ratio == (1.0, 1.0) and pad == (22.0, 27.0) and (out[27:37, 22:42] == (1, 2, 3)).all()

    out, ratio, pad = letterbox(small, (32, 48), scale_fill=True)  # stretched, no padding
    assert out.shape == (32, 48, 3) and ratio == (2.4, 3.2) and pad == (0.0, 0.0)


@pytest.mark.parametrize("seed", range(6))
def test_mosaic4_places_each_image_around_the_centre(seed):
    s = 64
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [solid(s, s, c) for c in colours]
    full_box = np.array([[0, 0.5, 0.5, 1.0, 1.0]], np.float32)
    labels = [full_box + [[k, 0, 0, 0, 0]] for k in range(4)]
    xc, yc = (int(v) for v in np.random.default_rng(seed).uniform(s / 2, 3 * s / 2, 2))  # mosaic4's first draw
    canvas, out = mosaic4(images, labels, s, np.random.default_rng(seed))

    assert canvas.shape == (2 * s, 2 * s, 3)
    assert tuple(canvas[yc - 1, xc - 1]) == colours[0] and tuple(canvas[yc - 1, xc]) == colours[1]
    assert tuple(canvas[yc, xc - 1]) == colours[2] and tuple(canvas[yc, xc]) == colours[3]
    grey = (FILL_VALUE,) * 3
    assert (tuple(canvas[0, 0]) == grey) == (xc > s or yc > s)  # image 0 spans [xc - s, xc) x [yc - s, yc)
    assert (tuple(canvas[-1, -1]) == grey) == (xc < s or yc < s)  # image 3 spans [xc, xc + s) x [yc, yc + s)
    expected = np.array([[0, xc - s, yc - s, xc, yc], [1, xc, yc - s, xc + s, yc],
                         [2, xc - s, yc, xc, yc + s], [3, xc, yc, xc + s, yc + s]], np.float32)
    expected[:, 1:] = expected[:, 1:].clip(0, 2 * s)
    np.testing.assert_allclose(out, expected)


def test_random_perspective_identity_and_crop_border():
    im = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    labels = np.array([[1, 5, 6, 30, 20]], np.float32)
    out, lb = random_perspective(im, labels.copy(), np.random.default_rng(1), degrees=0, translate=0, scale=0,
                                 shear=0, perspective=0)
    np.testing.assert_array_equal(out, im)
    np.testing.assert_allclose(lb, labels)

    # border -10 crops 10 pixels on each side around the centre: pure crop, no other change
    out, lb = random_perspective(im, labels.copy(), np.random.default_rng(1), degrees=0, translate=0, scale=0,
                                 shear=0, perspective=0, border=(-10, -10))
    assert out.shape == (20, 40, 3)
    np.testing.assert_array_equal(out, im[10:30, 10:50])
    np.testing.assert_allclose(lb, [[1, 0, 0, 20, 10]])  # shifted by -10 and clipped at 0


@pytest.mark.parametrize("perspective", [0.0, 0.0005])
def test_random_perspective_box_encloses_warped_object(perspective):
    im = np.zeros((120, 160, 3), np.uint8)
    im[40:80, 50:110] = 255  # the object
    labels = np.array([[0, 50, 40, 110, 80]], np.float32)
    for seed in range(5):
        out, lb = random_perspective(im, labels.copy(), np.random.default_rng(seed), degrees=25, translate=0.1,
                                     scale=0.3, shear=5, perspective=perspective)
        ys, xs = np.nonzero(out[..., 0] > 200)
        assert len(lb) == 1 and lb[0, 0] == 0
        # the warped corners bound the warped rectangle: within 2 pixels of its painted extent
        np.testing.assert_allclose(lb[0, 1:], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=2.0)


def test_box_candidates_thresholds():
    before = np.array([[0, 0, 10, 10]] * 4, np.float32)
    after = np.array([[0, 0, 10, 10],  # unchanged: kept
                      [0, 0, 2, 10],  # 2 px wide: not > wh_thr
                      [0, 0, 3, 3],  # 9% of the area: under area_thr 0.1
                      [0, 0, 4, 4]], np.float32)  # 16%: kept
    assert box_candidates(before, after).tolist() == [True, False, False, True]
    thin = np.array([[0, 0, 500, 4]], np.float32)
    assert not box_candidates(thin, thin, ar_thr=100)[0] and box_candidates(thin, thin, ar_thr=200)[0]


def test_augment_hsv_grey_keeps_hue_and_saturation_value_changes_brightness():
    grey = solid(8, 8, (100, 100, 100))
    im = grey.copy()
    augment_hsv(im, np.random.default_rng(0), hgain=0.5, sgain=0.9, vgain=0.0)
    np.testing.assert_array_equal(im, grey)  # a grey pixel has no hue or saturation to change
    rng = np.random.default_rng(5)
    gain_v = np.random.default_rng(5).uniform(-1, 1, 3)[2] * 0.4 + 1
    augment_hsv(im, rng, hgain=0.0, sgain=0.0, vgain=0.4)
    assert abs(int(im[0, 0, 0]) - int(100 * gain_v)) <= 1 and (im == im[0, 0, 0]).all()


def test_random_flips_mirror_pixels_and_labels():
    im = np.zeros((4, 6, 3), np.uint8)
    im[0, 0] = 255  # top-left marker
    labels = np.array([[0, 0.2, 0.3, 0.1, 0.1]], np.float32)
    out, lb = random_flips(im, labels.copy(), np.random.default_rng(0), flipud=1.0, fliplr=1.0)
    assert out[3, 5, 0] == 255 and out[0, 0, 0] == 0
    np.testing.assert_allclose(lb, [[0, 0.8, 0.7, 0.1, 0.1]])
    out, lb = random_flips(im, labels.copy(), np.random.default_rng(0), flipud=0.0, fliplr=0.0)
    np.testing.assert_array_equal(out, im)
    np.testing.assert_allclose(lb, labels)


def test_mixup_blends_and_concatenates():
    a, b = solid(4, 4, (200, 0, 0)), solid(4, 4, (0, 100, 0))
    la, lb = np.array([[1, 0, 0, 2, 2]], np.float32), np.array([[2, 1, 1, 3, 3]], np.float32)
    r = np.random.default_rng(9).beta(32.0, 32.0)
    out, labels = mixup(a, la, b, lb, np.random.default_rng(9))
    assert out[0, 0, 0] == int(200 * r) and out[0, 0, 1] == int(100 * (1 - r))
    np.testing.assert_array_equal(labels, np.concatenate([la, lb]))


def test_random_perspective_keeps_whole_boxes_however_much_it_zooms_out():
    """box_candidates compares the warped area with the zoomed original: an object shrunk to a tenth of
    its area but fully visible is still an object."""
    im = np.zeros((200, 200, 3), np.uint8)
    labels = np.array([[0, 50, 50, 150, 150]], np.float32)  # centred: any zoom keeps it inside
    zooms = []
    for seed in range(20):
        _, lb = random_perspective(im, labels.copy(), np.random.default_rng(seed), degrees=0, translate=0,
                                   scale=0.9, shear=0, perspective=0)
        assert len(lb) == 1, seed
        zooms.append((lb[0, 3] - lb[0, 1]) / 100)
    assert min(zooms) < 0.3  # some draws shrank the area below box_candidates' 10%
