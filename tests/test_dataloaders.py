"""Data pipeline: bad-input handling, label cache, determinism, geometry, caching, real coco128 images."""
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils import dataloaders
from utils.augmentations import FILL_VALUE
from utils.dataloaders import (Batch, LoadImagesAndLabels, ReplayLoader, SeededSampler, create_dataloader,
                               img2label_paths, label_cache_paths, substitute_order)
from utils.data_config import DatasetError

AUG_HYP = dict(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=5.0, translate=0.1, scale=0.5, shear=2.0,
               perspective=0.0, flipud=0.2, fliplr=0.5, mosaic=1.0, mixup=0.3, copy_paste=0.0)
GOOD_LABEL = "0 0.5 0.5 0.4 0.3\n1 0.25 0.25 0.2 0.2\n"


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Keep every fallback cache of these tests in tmp, never in the real ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "yolo-ema"


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger="yolo")
    return caplog


def write_image(path: Path, w=64, h=48, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    im = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
    im[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 256, 3)  # some structure to resize
    assert cv2.imwrite(str(path), im)
    return path


def make_split(root: Path, n=4, label=GOOD_LABEL, sizes=None):
    """root/images/train/{i}.jpg with root/labels/train/{i}.txt; returns the images folder."""
    for i in range(n):
        w, h = sizes[i] if sizes else (64, 48)
        write_image(root / "images" / "train" / f"{i}.jpg", w, h, seed=i)
        lb = root / "labels" / "train" / f"{i}.txt"
        lb.parent.mkdir(parents=True, exist_ok=True)
        lb.write_text(label)
    return root / "images" / "train"


def warnings_of(log):
    return [r.getMessage() for r in log.records if r.levelno >= logging.WARNING]


def summary_of(log):
    lines = [r.getMessage() for r in log.records if "Scanning" in r.getMessage()]
    assert len(lines) == 1, lines
    return lines[0]


def test_img2label_paths_replaces_last_images_folder():
    assert img2label_paths(["/d/images/x/images/a.b.jpg", "/d/pics/c.png"]) == [
        "/d/images/x/labels/a.b.txt", "/d/pics/c.txt"]


# -------------------------------------------------------------------------------------------- bad input

BAD_LABELS = {
    "columns": ("0 0.5 0.5 0.2\n", "4 columns, expected 5"),
    "non_numeric": ("0 0.5 abc 0.2 0.2\n", "non-numeric"),
    "not_finite": ("0 0.5 nan 0.2 0.2\n", "non-numeric"),
    "outside": ("0 0.5 1.2 0.2 0.2\n", "outside [0, 1]"),
    "negative_coord": ("0 -0.01 0.5 0.2 0.2\n", "outside [0, 1]"),
    "negative_class": ("-1 0.5 0.5 0.2 0.2\n", "negative class id -1"),
    "class_too_big": ("3 0.5 0.5 0.2 0.2\n", "class id 3 >= nc=3"),
    "fractional_class": ("1.5 0.5 0.5 0.2 0.2\n", "not an integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_bad_label_file_skips_that_image_only(tmp_path, log, case):
    images = make_split(tmp_path / "ds", n=3)
    bad_text, reason = BAD_LABELS[case]
    bad_label = tmp_path / "ds" / "labels" / "train" / "1.txt"
    bad_label.write_text(GOOD_LABEL + bad_text)  # one bad line spoils the file, as a partial file would
    ds = LoadImagesAndLabels(images, img_size=64, nc=3)
    assert ds.n == 2 and str(images / "1.jpg") not in ds.im_files
    warned = [w for w in warnings_of(log) if str(bad_label) in w]
    assert len(warned) == 1 and reason in warned[0] and str(images / "1.jpg") in warned[0]
    assert "line 3" in warned[0] or case == "class_too_big"
    assert "2 images, 0 backgrounds (0 without a label file), 1 corrupt, 0 duplicate rows" in summary_of(log)
    assert len(ds[0][1]) == 2  # training goes on with the good images


@pytest.mark.parametrize("case", ["truncated_end", "truncated_half", "garbage", "tiny", "listed_but_missing",
                                  "jpeg_headers_only", "png_cut_in_last_chunk", "short_bmp"])
def test_bad_image_skipped_with_reason(tmp_path, log, case):
    images = make_split(tmp_path / "ds", n=3, sizes=[(64, 48), (64, 48), (320, 240)])
    source, bad = images, images / "2.jpg"
    if case in ("png_cut_in_last_chunk", "short_bmp"):  # PIL's checks pass these; OpenCV cannot read them
        png = case.startswith("png")
        bad = write_image(images / ("2.png" if png else "2.bmp"), 320, 240)
        (images / "2.jpg").unlink()
        data = bad.read_bytes()
        bad.write_bytes(data[:-1] if png else data[:len(data) // 2])
        reason = "image cannot be decoded"
    elif case == "jpeg_headers_only":  # every header and the end marker, but the image data is lost
        data = (images / "2.jpg").read_bytes()
        (images / "2.jpg").write_bytes(data[:data.index(b"\xff\xda")] + data[-2:])  # cut at start-of-scan
        reason = "image cannot be decoded"
    elif case == "truncated_end":  # decodable headers, lost tail: cv2 would fill the rest with grey
        data = (images / "2.jpg").read_bytes()
        (images / "2.jpg").write_bytes(data[:-600])
        reason = "truncated JPEG (no end-of-image marker)"
    elif case == "truncated_half":  # cut inside the headers: PIL cannot even parse it
        data = (images / "2.jpg").read_bytes()
        (images / "2.jpg").write_bytes(data[:300])
        reason = "unreadable image"
    elif case == "garbage":
        (images / "2.jpg").write_bytes(b"this is not an image at all")
        reason = "unreadable image"
    elif case == "tiny":
        write_image(images / "2.jpg", 8, 8)
        reason = "image too small (8x8)"
    else:
        (images / "2.jpg").unlink()
        source = tmp_path / "ds" / "list.txt"
        source.write_text("images/train/0.jpg\nimages/train/1.jpg\nimages/train/2.jpg\n")
        reason = "image file not found"
    ds = LoadImagesAndLabels(source, img_size=64)
    assert ds.n == 2 and str(bad) not in ds.im_files
    warned = [w for w in warnings_of(log) if str(bad) in w]
    assert len(warned) == 1 and reason in warned[0]
    assert "2 images, 0 backgrounds (0 without a label file), 1 corrupt" in summary_of(log)


def test_duplicates_dropped_missing_and_empty_labels_are_backgrounds(tmp_path, log):
    images = make_split(tmp_path / "ds", n=4)
    labels = tmp_path / "ds" / "labels" / "train"
    (labels / "0.txt").write_text(GOOD_LABEL + "0 0.5 0.5 0.4 0.3\n0 0.5 0.50 0.40 0.3\n")  # 2 duplicates
    (labels / "1.txt").unlink()
    (labels / "2.txt").write_text("\n")
    ds = LoadImagesAndLabels(images, img_size=64, nc=2)
    assert ds.n == 4
    np.testing.assert_allclose(ds.labels[0], [[0, 0.5, 0.5, 0.4, 0.3], [1, 0.25, 0.25, 0.2, 0.2]])
    assert ds.labels[1].shape == (0, 5) and ds.labels[2].shape == (0, 5)
    assert len(ds[1][1]) == 0  # a background sample has no targets
    warned = warnings_of(log)
    assert len(warned) == 1 and str(labels / "0.txt") in warned[0] and "2 duplicate rows dropped" in warned[0]
    assert "4 images, 2 backgrounds (1 without a label file), 0 corrupt, 2 duplicate rows dropped" in summary_of(log)


def test_label_file_with_byte_order_mark_and_crlf(tmp_path, log):
    images = make_split(tmp_path / "ds", n=1)
    windows_text = b"\xef\xbb\xbf" + GOOD_LABEL.replace("\n", "\r\n").encode()
    (tmp_path / "ds" / "labels" / "train" / "0.txt").write_bytes(windows_text)
    ds = LoadImagesAndLabels(images, img_size=64)
    np.testing.assert_allclose(ds.labels[0], [[0, 0.5, 0.5, 0.4, 0.3], [1, 0.25, 0.25, 0.2, 0.2]])
    assert not warnings_of(log)


def test_nothing_usable_is_a_clear_error(tmp_path):
    images = make_split(tmp_path / "ds", n=1)
    (images / "0.jpg").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="no usable images"):
        LoadImagesAndLabels(images, img_size=64)
    with pytest.raises(DatasetError, match="does not exist"):
        LoadImagesAndLabels(tmp_path / "absent", img_size=64)
    archive = tmp_path / "ds.zip"
    archive.write_bytes(b"PK\x03\x04\xff\xfe binary")
    with pytest.raises(DatasetError, match="neither an image folder"):
        LoadImagesAndLabels(archive, img_size=64)


def test_single_image_source(tmp_path):
    images = make_split(tmp_path / "ds", n=2)
    ds = LoadImagesAndLabels(images / "1.jpg", img_size=64)
    assert ds.im_files == [str(images / "1.jpg")] and ds.labels[0].shape == (2, 5)


# -------------------------------------------------------------------------------------------- label cache

def test_label_cache_created_reused_and_invalidated(tmp_path, log, monkeypatch):
    images = make_split(tmp_path / "ds", n=3)
    cache = tmp_path / "ds" / "labels" / "train.cache"
    LoadImagesAndLabels(images, img_size=64)
    assert cache.is_file()
    with np.load(cache, allow_pickle=False) as z:  # loads without pickle: nothing in it can run code
        assert int(z["counts"].sum()) == 6

    def no_scan(*a):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(dataloaders, "verify_image_label", no_scan)
    ds = LoadImagesAndLabels(images, img_size=64)
    assert ds.labels[2].shape == (2, 5)

    monkeypatch.undo()
    (tmp_path / "ds" / "labels" / "train" / "2.txt").write_text("1 0.5 0.5 0.1 0.1\n")  # a label file changes
    ds = LoadImagesAndLabels(images, img_size=64)
    np.testing.assert_allclose(ds.labels[2], [[1, 0.5, 0.5, 0.1, 0.1]])
    write_image(images / "3.jpg")  # a new image, no label file
    ds = LoadImagesAndLabels(images, img_size=64)
    assert ds.n == 4 and ds.labels[3].shape == (0, 5)

    cache.write_bytes(b"garbage")  # a damaged cache is rebuilt
    ds = LoadImagesAndLabels(images, img_size=64)
    assert ds.n == 4 and any("unreadable" in w for w in warnings_of(log))


def test_label_cache_kept_in_user_cache_when_labels_read_only(tmp_path, log, user_cache):
    images = make_split(tmp_path / "ds", n=2)
    labels_parent = tmp_path / "ds" / "labels"
    labels_parent.chmod(0o555)
    try:
        before = sorted(p.name for p in labels_parent.iterdir())
        ds = LoadImagesAndLabels(images, img_size=64)
        assert sorted(p.name for p in labels_parent.iterdir()) == before  # nothing written there
        _, fallback = label_cache_paths(ds.label_files, images)
        assert fallback.is_file() and fallback.is_relative_to(user_cache)
        notes = [r.getMessage() for r in log.records if "read-only" in r.getMessage()]
        assert len(notes) == 1 and str(labels_parent) in notes[0]
        log.clear()
        LoadImagesAndLabels(images, img_size=64)  # second time: reused quietly
        assert not [r for r in log.records if "read-only" in r.getMessage()]
        assert str(fallback) in summary_of(log)
    finally:
        labels_parent.chmod(0o755)


# -------------------------------------------------------------------------------------------- determinism

def _epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(b.imgs.clone(), b.targets.clone(), b.paths) for b in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
                                    for x, y in zip(a, b))


def test_batches_identical_whatever_num_workers(tmp_path):
    images = make_split(tmp_path / "ds", n=10)
    runs = {}
    for workers in (0, 1, 2):
        loader, _ = create_dataloader(images, 64, 4, 32, hyp=AUG_HYP, augment=True, shuffle=True, seed=7,
                                      workers=workers)
        assert loader.num_workers == min(workers, dataloaders.usable_cpus())  # batch 4: not the limit here
        runs[workers] = [_epoch_batches(loader, e) for e in (0, 1)] + [_epoch_batches(loader, 0)]
        del loader
    for workers in (1, 2):
        assert _same(runs[0][0], runs[workers][0]) and _same(runs[0][1], runs[workers][1])
    assert _same(runs[0][0], runs[0][2]) and _same(runs[2][0], runs[2][2])  # epoch 0 again: the same
    assert not _same(runs[0][0], runs[0][1])  # another epoch: another order and augmentation
    assert [p for b in runs[0][0] for p in b[2]] != [p for b in runs[0][1] for p in b[2]]

    loader, ds = create_dataloader(images, 64, 4, 32, hyp=AUG_HYP, augment=True, shuffle=True, seed=8, workers=0)
    assert not _same(runs[0][0], _epoch_batches(loader, 0))  # another seed

    # what the workers delivered is the dataset evaluated at (epoch, index) in the sampler's order
    _, ds = create_dataloader(images, 64, 4, 32, hyp=AUG_HYP, augment=True, shuffle=True, seed=7, workers=0)
    sampler = SeededSampler(len(ds), shuffle=True, seed=7)
    sampler.set_epoch(1)
    expected = [ds[(1, i)] for i in sampler.order()]
    got = [(img, t) for imgs, targets, _ in runs[2][1] for img, t in zip(imgs, _split_targets(targets, len(imgs)))]
    assert len(got) == len(expected)
    for (img, t), e in zip(got, expected):
        assert torch.equal(img, e.img) and torch.equal(t[:, 1:], e.targets[:, 1:])


def _split_targets(targets, n):
    return [targets[targets[:, 0] == i] for i in range(n)]


def test_sample_is_pure_function_of_seed_epoch_index(tmp_path):
    images = make_split(tmp_path / "ds", n=5)
    ds = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=AUG_HYP, seed=3)
    a = ds[(2, 4)]
    for i in range(5):  # other samples in between change nothing
        ds[(1, i)]
    b = ds[(2, 4)]
    ds.set_epoch(2)
    c = ds[4]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[0], c[0])


def test_ddp_ranks_get_disjoint_strided_shares_of_one_permutation():
    full = SeededSampler(11, shuffle=True, seed=5)
    full.set_epoch(3)
    order = full.order()
    assert sorted(order) == list(range(11)) and all(e == 3 for e, _ in full)
    shares = []
    for rank in range(3):
        s = SeededSampler(11, shuffle=True, seed=5, rank=rank, world_size=3)
        s.set_epoch(3)
        shares.append(s.order())
        assert len(s) == 4 and len(shares[-1]) == 4
    padded = order + [order[-1]]  # 11 -> 12 by repeating the last element
    assert shares == [padded[r::3] for r in range(3)]
    assert sorted(set().union(*map(set, shares))) == list(range(11))


def test_rect_ddp_batches_share_one_shape(tmp_path):
    sizes = [(64, 32), (64, 48), (48, 64), (32, 64), (64, 64), (64, 20), (20, 64)]
    images = make_split(tmp_path / "ds", n=7, sizes=sizes)
    seen = []
    for rank in range(2):
        loader, ds = create_dataloader(images, 64, 2, 32, rect=True, rank=rank, world_size=2, workers=0)
        for imgs, _, paths, _, unreadable in loader:  # collate would fail on mixed shapes
            assert unreadable == ()
            for p in paths:
                i = ds.im_files.index(p)
                assert tuple(imgs.shape[2:]) == tuple(ds.batch_shapes[ds.batch[i]])
            seen += paths
    assert len(set(seen)) == 7


def test_worker_count_is_the_number_used(monkeypatch):
    """min(requested, this rank's share of the CPUs, batch size), and loader.num_workers says it."""
    monkeypatch.setattr(dataloaders, "usable_cpus", lambda: 8)
    workers = dataloaders.dataloader_workers
    assert workers(8, 16) == 8 and workers(12, 16) == 8  # the CPUs cap a larger request
    assert workers(8, 16, world_size=2) == 4 and workers(8, 16, world_size=3) == 2  # DDP ranks share them
    assert workers(8, 16, world_size=16) == 0  # more ranks than CPUs: each loads in its own process
    assert workers(8, 1) == 1 and workers(8, 3) == 3  # batch 1 still overlaps loading with compute
    assert workers(0, 16) == 0 and workers(-1, 16) == 0


def test_loader_uses_the_computed_workers_and_pins_memory_only_when_asked(tmp_path, monkeypatch):
    images = make_split(tmp_path / "ds", n=3)
    monkeypatch.setattr(dataloaders, "usable_cpus", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine running --device cpu
    loader, _ = create_dataloader(images, 64, 2, 32, rank=1, world_size=2, workers=8)
    assert loader.num_workers == 2 and loader.pin_memory is False
    loader, _ = create_dataloader(images, 64, 1, 32, workers=8, pin_memory=True)
    assert loader.num_workers == 1 and loader.pin_memory is True


# -------------------------------------------------------------------------------------------- unreadable images

def _break(path: Path, how: str):
    if how == "removed":
        path.unlink()
    else:
        path.write_bytes(b"overwritten by something else")


@pytest.mark.parametrize("how", ["removed", "corrupted"])
@pytest.mark.parametrize("mosaic", [0.0, 1.0])
def test_unreadable_training_image_replaced_by_the_seeded_stand_in(tmp_path, how, mosaic):
    """An image lost after the scan is, within epoch e, image j = substitute_order(seed, e, k)[0] with its labels:
    every sample equals the one of a dataset where file k holds image j, whatever the workers."""
    sizes = [(64, 48), (48, 64), (64, 64), (60, 40), (40, 60), (64, 32)]
    hyp = {**AUG_HYP, "mosaic": mosaic, "mixup": 0.3 * mosaic}
    a = make_split(tmp_path / "a", n=6, sizes=sizes)
    (tmp_path / "a" / "labels" / "train" / "4.txt").write_text("1 0.3 0.6 0.2 0.4\n")  # tells image 4 apart
    k, epoch, seed = 2, 1, 7
    j = int(substitute_order(seed, epoch, k, 6)[0])
    assert j != k and j == int(substitute_order(seed, epoch, k, 6)[0])
    b = tmp_path / "b" / "images" / "train"  # the same files, but file k is a copy of image j
    labels_a, labels_b = tmp_path / "a" / "labels" / "train", tmp_path / "b" / "labels" / "train"
    for src, dst in ((a, b), (labels_a, labels_b)):
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*"):
            (dst / f.name).write_bytes(f.read_bytes())
    (b / f"{k}.jpg").write_bytes((a / f"{j}.jpg").read_bytes())
    (labels_b / f"{k}.txt").write_text((labels_a / f"{j}.txt").read_text())
    expected = LoadImagesAndLabels(b, img_size=64, augment=True, hyp=hyp, seed=seed)

    loaders = {w: create_dataloader(a, 64, 2, 32, hyp=hyp, augment=True, shuffle=True, seed=seed, workers=w)
               for w in (0, 2)}
    resumed = LoadImagesAndLabels(a, img_size=64, augment=True, hyp=hyp, seed=seed)  # a fresh process, say
    _break(a / f"{k}.jpg", how)  # after the label scans
    runs = {}
    for w, (loader, _) in loaders.items():
        loader.set_epoch(epoch)
        runs[w] = list(loader)
    del loaders
    order = SeededSampler(6, shuffle=True, seed=seed)
    order.set_epoch(epoch)
    lost = str(a / f"{k}.jpg")
    for batch_0, batch_2, pair in zip(runs[0], runs[2], np.reshape(order.order(), (-1, 2))):
        assert torch.equal(batch_0.imgs, batch_2.imgs) and torch.equal(batch_0.targets, batch_2.targets)
        assert batch_0.paths == batch_2.paths and batch_0.unreadable == batch_2.unreadable
        assert batch_0.unreadable in ((), (lost,))
        if k in pair:  # this batch needed image k itself
            assert batch_0.unreadable == (lost,)
        for pos, i in enumerate(pair):
            want = expected[(epoch, int(i))]
            assert torch.equal(batch_0.imgs[pos], want.img)
            assert torch.equal(batch_0.targets[batch_0.targets[:, 0] == pos, 1:], want.targets[:, 1:])
            assert batch_0.paths[pos] == str(a / f"{j if i == k else i}.jpg")  # the image shown
    assert sum(bool(bt.unreadable) for bt in runs[0]) >= 1

    sample = resumed[(epoch, k)]  # another dataset object draws the same stand-in
    assert sample.unreadable == (lost,) and sample.path == str(a / f"{j}.jpg")
    assert torch.equal(sample.img, expected[(epoch, k)].img)


def test_unreadable_stand_ins_searched_in_order_and_none_readable_is_one_clear_error(tmp_path):
    images = make_split(tmp_path / "ds", n=5)
    ds = LoadImagesAndLabels(images, img_size=64, augment=True, hyp={**AUG_HYP, "mosaic": 0.0}, seed=3)
    order = [int(i) for i in substitute_order(3, 0, 1, 5)]
    assert sorted(order) == [0, 2, 3, 4]
    (images / "1.jpg").unlink()
    (images / f"{order[0]}.jpg").unlink()  # the first stand-in is gone too: the second one is used
    sample = ds[(0, 1)]
    assert sample.path == str(images / f"{order[1]}.jpg")
    assert sample.unreadable == (str(images / "1.jpg"), str(images / f"{order[0]}.jpg"))
    for f in images.glob("*.jpg"):
        f.unlink()
    with pytest.raises(DatasetError, match=r"1\.jpg: image could not be read, nor any other image of the dataset"):
        ds[(0, 1)]


def test_unreadable_validation_image_is_grey_without_labels(tmp_path):
    images = make_split(tmp_path / "ds", n=4, sizes=[(64, 32), (60, 30), (48, 64), (30, 60)])
    loader, ds = create_dataloader(images, 64, 2, 32, rect=True, pad=0.5, workers=0)
    before = {p: (s.img.shape, s.shapes, s.targets) for s in (ds[i] for i in range(4)) for p in [s.path]}
    lost = str(images / "1.jpg")
    (images / "1.jpg").unlink()
    k = ds.im_files.index(lost)
    sample = ds[k]
    assert sample.path == lost and sample.unreadable == (lost,) and len(sample.targets) == 0
    assert sample.img.shape == before[lost][0] and (sample.img == FILL_VALUE).all()  # its rect batch's shape
    assert sample.shapes == before[lost][1]  # where the image would have been: (60, 30) -> 64 x 32
    batches = list(loader)
    assert [bt.unreadable for bt in batches] == [(lost,) if lost in bt.paths else () for bt in batches]
    kept = [bt.readable() for bt in batches]
    assert [p for bt in kept for p in bt.paths] == [p for p in ds.im_files if p != lost]
    for bt in kept:  # the readable samples, untouched, their targets re-indexed
        for pos, p in enumerate(bt.paths):
            assert bt.imgs[pos].shape == before[p][0]
            assert torch.equal(bt.targets[bt.targets[:, 0] == pos, 1:], before[p][2][:, 1:])


class ContentOracle(torch.nn.Module):
    """A stand-in detector whose output depends on each image's pixels only: for an image it has been shown
    (by letterboxed content), jittered copies of its true boxes; for any other image, one confident false box."""

    def __init__(self, loader, nc):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives val a device to read
        self.nc, self.known = nc, {}
        rng = np.random.default_rng(0)
        for batch in loader:
            h, w = batch.imgs.shape[2:]
            for pos, img in enumerate(batch.imgs):
                rows = []
                for _, c, cx, cy, bw, bh in batch.targets[batch.targets[:, 0] == pos].tolist():
                    jit = rng.uniform(-0.15, 0.15, 4)
                    rows.append([(cx + jit[0] * bw) * w, (cy + jit[1] * bh) * h, bw * (1 + jit[2]) * w,
                                 bh * (1 + jit[3]) * h, rng.uniform(0.2, 0.9), c])
                self.known[self.key(img.float() / 255)] = rows

    @staticmethod
    def key(img):
        return hash((img * 255).round().to(torch.uint8).numpy().tobytes())

    def forward(self, im):
        out = torch.zeros((len(im), 4, 5 + self.nc))
        for i, img in enumerate(im):
            rows = self.known.get(self.key(img), [[10.0, 10.0, 16.0, 16.0, 0.95, 0]])
            for r, (cx, cy, bw, bh, conf, c) in enumerate(rows):
                out[i, r, :5] = torch.tensor([cx, cy, bw, bh, conf])
                out[i, r, 5 + int(c)] = 1.0
        return out, None


def test_validation_metrics_exclude_an_image_lost_after_the_scan(tmp_path, log):
    """val.run over 8 images, one removed after the scan, gives exactly the metrics of the other 7 and says
    it left the image out."""
    import val

    images = make_split(tmp_path / "ds", n=8)  # one size: rect batches have one shape, whoever is in them
    labels = tmp_path / "ds" / "labels" / "train"
    for i in range(8):
        (labels / f"{i}.txt").write_text(f"{i % 2} 0.{3 + i % 5} 0.5 0.3 0.4\n1 0.7 0.3 0.2 0.2\n")
    seven = tmp_path / "ds" / "seven.txt"
    seven.write_text("".join(f"images/train/{i}.jpg\n" for i in range(8) if i != 5))
    kw = dict(rect=True, pad=0.5, workers=0)
    ref_loader, _ = create_dataloader(seven, 64, 3, 32, **kw)
    loader, ds = create_dataloader(images, 64, 3, 32, **kw)
    oracle = ContentOracle(ref_loader, nc=2)
    data = {"nc": 2, "names": ["a", "b"]}
    run = dict(model=oracle, half=False, plots=False, save_dir=tmp_path)
    reference = val.run(data, dataloader=ref_loader, **run)[:2]
    lost = str(images / "5.jpg")
    (images / "5.jpg").unlink()
    log.clear()
    got = val.run(data, dataloader=loader, **run)[:2]
    assert 0 < reference[0][3] < 1  # the jitter leaves a mAP50-95 that a false box would change
    assert got[0] == reference[0] and np.array_equal(got[1], reference[1])
    table = [r.getMessage() for r in log.records if r.getMessage().split()[:1] == ["all"]]
    assert table[0].split()[1:3] == ["7", "14"]  # images seen, instances
    warned = [w for w in warnings_of(log) if "exclude" in w]
    assert len(warned) == 1 and lost in warned[0] and "1 image that could not be read" in warned[0]


def test_batch_readable_drops_listed_samples_and_reindexes_targets():
    imgs = torch.arange(3).view(3, 1, 1, 1).expand(3, 3, 2, 2).to(torch.uint8)
    targets = torch.tensor([[0, 5, .1, .1, .1, .1], [2, 6, .2, .2, .2, .2], [2, 7, .3, .3, .3, .3]])
    batch = Batch(imgs, targets, ("a", "b", "c"), ("sa", "sb", "sc"), ("b",))
    kept = batch.readable()
    assert kept.paths == ("a", "c") and kept.shapes == ("sa", "sc") and kept.unreadable == ("b",)
    assert kept.imgs[:, 0, 0, 0].tolist() == [0, 2]
    assert kept.targets[:, :2].tolist() == [[0, 5], [1, 6], [1, 7]]
    assert batch.targets[:, 0].tolist() == [0, 2, 2]  # the original is unchanged
    whole = Batch(imgs, targets, ("a", "b", "c"), ("sa", "sb", "sc"), ("elsewhere.jpg",))
    assert whole.readable() is whole  # a stand-in in training shows another image: nothing to drop


# -------------------------------------------------------------------------------------------- geometry

def test_letterboxed_sample_labels_and_shapes_hand_computed(tmp_path):
    root = tmp_path / "ds"
    images = make_split(root, n=1, sizes=[(200, 100)], label="2 0.5 0.5 0.5 0.5\n")
    img, targets, path, shapes, unreadable = LoadImagesAndLabels(images, img_size=64)[0]
    assert path == str(images / "0.jpg") and unreadable == ()
    # 200x100 -> 64x32 (ratio 0.32), padded 16 rows above and below to 64x64
    assert img.shape == (3, 64, 64) and img.dtype == torch.uint8
    assert shapes == ((100, 200), ((0.32, 0.32), (0.0, 16.0)))
    np.testing.assert_allclose(targets.numpy(), [[0, 2, 0.5, 0.5, 0.5, 0.25]], atol=1e-6)


def test_rect_batch_shapes_hand_computed(tmp_path):
    images = make_split(tmp_path / "ds", n=3, sizes=[(100, 200), (200, 100), (200, 150)])
    ds = LoadImagesAndLabels(images, img_size=64, batch_size=1, rect=True, stride=32)
    # sorted by h/w: 100/200 = 0.5, 150/200 = 0.75, 200/100 = 2
    assert [Path(f).name for f in ds.im_files] == ["1.jpg", "2.jpg", "0.jpg"]
    # h = ceil(ar * 64 / 32) * 32 for landscape, w likewise for portrait
    assert ds.batch_shapes.tolist() == [[32, 64], [64, 64], [64, 32]]
    img, _, _, shapes, _ = ds[0]
    assert img.shape == (3, 32, 64) and shapes == ((100, 200), ((0.32, 0.32), (0.0, 0.0)))


def test_mosaic_sample_shape_and_boxes_inside(tmp_path):
    images = make_split(tmp_path / "ds", n=4, sizes=[(64, 48), (40, 64), (64, 64), (30, 50)])
    ds = LoadImagesAndLabels(images, img_size=64, augment=True, hyp={**AUG_HYP, "mosaic": 1.0, "mixup": 0.0})
    n_boxes = 0
    for i in range(12):
        img, targets, _, shapes, _ = ds[(0, i % 4)]
        assert img.shape == (3, 64, 64) and shapes is None
        xyxy = torch.cat([targets[:, 2:4] - targets[:, 4:6] / 2, targets[:, 2:4] + targets[:, 4:6] / 2], 1)
        assert ((xyxy >= -1e-6) & (xyxy <= 1 + 1e-6)).all() and (targets[:, 4:6] > 0).all()
        assert set(targets[:, 1].tolist()) <= {0.0, 1.0}
        n_boxes += len(targets)
    assert n_boxes > 0


OBJECT_RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def make_object_split(root: Path):
    """Four black images (long side 64) holding one solid rectangle each, of class k and colour k."""
    sizes = [(64, 48), (48, 64), (64, 64), (64, 40)]
    for k, ((w, h), rgb) in enumerate(zip(sizes, OBJECT_RGB)):
        im = np.zeros((h, w, 3), np.uint8)
        x1, y1, x2, y2 = 10, 12, w - 20, h - 14  # 10+ px from every border: copies never touch
        im[y1:y2, x1:x2] = rgb[::-1]
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(exist_ok=True)
        assert cv2.imwrite(str(root / "images" / f"{k}.png"), im)
        (root / "labels" / f"{k}.txt").write_text(
            f"{k} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n")
    return root / "images"


@pytest.mark.parametrize("mosaic", [1.0, 0.0])
def test_augmented_boxes_follow_the_objects(tmp_path, mosaic):
    """Mosaic, letterbox, scale/translate, flips and normalisation composed: each target box must be the
    extent of its object's pixels in the sample (the colour marks the class), whatever the draws."""
    hyp = {**AUG_HYP, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "degrees": 0.0, "shear": 0.0, "flipud": 0.5,
           "mosaic": mosaic, "mixup": 0.0}
    ds = LoadImagesAndLabels(make_object_split(tmp_path / "ds"), img_size=64, augment=True, hyp=hyp, nc=4)
    checked = 0
    for epoch in range(4):
        for i in range(4):
            img, targets, _, _, _ = ds[(epoch, i)]
            im = img.permute(1, 2, 0).numpy().astype(int)
            H, W = im.shape[:2]
            for _, k, cx, cy, w, h in targets.tolist():
                box = np.array([(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H])
                x1, y1 = max(int(box[0]) - 3, 0), max(int(box[1]) - 3, 0)
                x2, y2 = min(int(box[2]) + 4, W), min(int(box[3]) + 4, H)
                ys, xs = np.nonzero(np.abs(im[y1:y2, x1:x2] - OBJECT_RGB[int(k)]).max(-1) < 60)
                assert len(xs), (epoch, i, k)
                extent = [x1 + xs.min(), y1 + ys.min(), x1 + xs.max() + 1, y1 + ys.max() + 1]
                np.testing.assert_allclose(extent, box, atol=2.0)  # interpolation blurs edges by a pixel
                checked += 1
    assert checked >= 16


def test_mosaic_places_the_sample_image_in_a_random_quadrant(tmp_path):
    """Four solid 64 x 64 images of distinct colours. The mosaic centre is drawn inside the output crop, so
    the output's top-left pixel lies in the top-left image: its colour names the image placed there."""
    images = tmp_path / "ds" / "images"
    images.mkdir(parents=True)
    for k, rgb in enumerate(OBJECT_RGB):
        assert cv2.imwrite(str(images / f"{k}.png"), np.full((64, 64, 3), rgb[::-1], np.uint8))
    ds = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=dict(mosaic=1.0))
    top_left = {tuple(ds[(epoch, 0)][0][:, 0, 0].tolist()) for epoch in range(16)}
    assert top_left <= set(OBJECT_RGB)
    assert len(top_left) > 1  # image 0 is not always the top-left one


# -------------------------------------------------------------------------------------------- image caches

def test_ram_and_disk_caches_give_identical_samples(tmp_path, user_cache, monkeypatch):
    images = make_split(tmp_path / "ds", n=3, sizes=[(80, 60), (60, 80), (64, 64)])
    plain = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=AUG_HYP)
    ram = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=AUG_HYP, cache_images="ram")
    disk = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=AUG_HYP, cache_images="disk")
    assert all(im is not None for im in ram.ims)
    assert sorted(p.name for p in images.glob("*.npy")) == ["0.npy", "1.npy", "2.npy"]
    np.testing.assert_array_equal(np.load(images / "1.npy"), cv2.imread(str(images / "1.jpg")))
    expected = {(e, i): plain[(e, i)] for i in range(3) for e in range(2)}

    def no_decoding(*args):
        raise AssertionError("a cached image was decoded again")

    with monkeypatch.context() as patch:
        patch.setattr(dataloaders.cv2, "imread", no_decoding)
        for (e, i), a in expected.items():
            b, c = ram[(e, i)], disk[(e, i)]
            assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])

    # colour-only augmentation of an image that needs no resizing nor padding works in place:
    # it must act on a copy, never on the cached image
    colour_only = dict(hsv_h=0.5, hsv_s=0.5, hsv_v=0.5, mosaic=0.0)
    plain = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=colour_only)
    ram = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=colour_only, cache_images="ram")
    for e in range(3):
        assert torch.equal(ram[(e, 2)][0], plain[(e, 2)][0])

    ro = make_split(tmp_path / "ro", n=2)
    ro.chmod(0o555)
    try:
        d = LoadImagesAndLabels(ro, img_size=64, cache_images="disk")
        assert not list(ro.glob("*.npy")) and all(Path(f).is_relative_to(user_cache) for f in d.npy_files)
        assert all(Path(f).is_file() for f in d.npy_files)
    finally:
        ro.chmod(0o755)


def test_auto_cache_keeps_a_small_dataset_in_ram_only(tmp_path, monkeypatch, log):
    """--cache auto (train.py's default): decoded once when the images take at most 10% of the available
    memory, not cached (and said so) above that; the samples are the same either way."""
    images = make_split(tmp_path / "ds", n=3, sizes=[(80, 60), (60, 80), (64, 64)])
    need = LoadImagesAndLabels(images, img_size=64)._resized_bytes()
    assert need == 64 * 48 * 3 * 2 + 64 * 64 * 3
    monkeypatch.setattr(dataloaders, "_available_memory", lambda: 10 * need)  # exactly at the share: cached
    auto = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=AUG_HYP, cache_images="auto")
    assert all(im is not None for im in auto.ims)
    monkeypatch.setattr(dataloaders, "_available_memory", lambda: 10 * need - 1)
    uncached = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=AUG_HYP, cache_images="auto")
    assert all(im is None for im in uncached.ims)
    assert (f"Not caching images in RAM ({need / 2**20:.0f} MiB is more than 10% of the available memory); "
            f"--cache ram caches it (up to 80% of available memory)") in log.text
    off = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=AUG_HYP, cache_images="off")
    for e in range(2):
        for i in range(3):
            assert torch.equal(auto[(e, i)][0], off[(e, i)][0]) and torch.equal(auto[(e, i)][1], off[(e, i)][1])


def test_cache_messages_match_what_ram_and_auto_do(tmp_path, monkeypatch, log):
    """The auto-cache message names the real --cache ram limit (80% of the available memory, checked here
    against what ram does), and unknown memory gets its own message instead of a comparison never made."""
    images = make_split(tmp_path / "ds", n=2)
    need = 64 * 48 * 3 * 2

    monkeypatch.setattr(dataloaders, "_available_memory", lambda: None)
    unknown = LoadImagesAndLabels(images, img_size=64, cache_images="auto")
    assert all(im is None for im in unknown.ims)
    assert "Not caching images in RAM (0 MiB): the available memory is unknown; --cache ram caches it" in log.text
    assert "more than" not in log.text
    assert all(im is not None for im in LoadImagesAndLabels(images, img_size=64, cache_images="ram").ims)

    monkeypatch.setattr(dataloaders, "_available_memory", lambda: need * 5 // 4)  # need is exactly 80%
    assert all(im is not None for im in LoadImagesAndLabels(images, img_size=64, cache_images="ram").ims)
    monkeypatch.setattr(dataloaders, "_available_memory", lambda: need * 5 // 4 - 1)
    assert all(im is None for im in LoadImagesAndLabels(images, img_size=64, cache_images="ram").ims)
    assert "WARNING: not caching images in RAM" in log.text


def test_cgroup_memory_headroom_v2_v1_and_no_limit(tmp_path):
    """A container's memory limit, not the host's MemAvailable, bounds what a cache may take: limit minus
    usage, where reclaimable page cache (inactive_file) does not count as used."""
    headroom = dataloaders._cgroup_memory_headroom
    assert headroom(tmp_path / "none") is None  # no cgroup files: no limit known

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("1000000\n")
    (v2 / "memory.current").write_text("300000\n")
    assert headroom(v2) == 700_000
    (v2 / "memory.stat").write_text("anon 200000\nfile 100000\ninactive_file 40000\nactive_file 60000\n")
    assert headroom(v2) == 740_000
    (v2 / "memory.current").write_text("1200000\n")  # over the limit for a moment
    assert headroom(v2) == 0
    (v2 / "memory.max").write_text("max\n")
    assert headroom(v2) is None

    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("2000000\n")
    (v1 / "memory.usage_in_bytes").write_text("500000\n")
    (v1 / "memory.stat").write_text("inactive_file 1\ntotal_inactive_file 100000\n")
    assert headroom(tmp_path / "v1") == 1_600_000


def test_available_memory_is_capped_by_the_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65536000 kB\nMemAvailable:   32768000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    host = 32768000 * 1024
    assert dataloaders._available_memory(meminfo, cgroup) == host  # no cgroup limit: the host's figure
    (cgroup / "memory.max").write_text(f"{2 * 2**30}\n")
    (cgroup / "memory.current").write_text(f"{2**30 + 2**29}\n")
    assert dataloaders._available_memory(meminfo, cgroup) == 2**29  # the container has 512 MiB left
    (cgroup / "memory.max").write_text(f"{2 * host}\n")
    (cgroup / "memory.current").write_text("0\n")
    assert dataloaders._available_memory(meminfo, cgroup) == host  # a loose limit changes nothing
    assert dataloaders._available_memory(tmp_path / "absent", cgroup) == 2 * host  # only the cgroup known
    assert dataloaders._available_memory(tmp_path / "absent", tmp_path / "absent") is None


# -------------------------------------------------------------------------------------------- real data

def test_coco128_labels_match_the_coco_json(coco128):
    ds = LoadImagesAndLabels(coco128 / "images" / "train2017", img_size=160, nc=80)
    with open(coco128 / "annotations" / "instances_train2017.json") as f:
        coco = json.load(f)
    non_crowd = {}
    for a in coco["annotations"]:
        if not a["iscrowd"]:
            non_crowd[a["image_id"]] = non_crowd.get(a["image_id"], 0) + 1
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    assert ds.n == 128 and sum(len(lb) for lb in ds.labels) == sum(non_crowd.values()) == 929
    for f, lb, shape in zip(ds.im_files, ds.labels, ds.shapes):
        image_id = int(Path(f).stem)
        assert len(lb) == non_crowd.get(image_id, 0) and tuple(shape) == sizes[image_id]


def test_coco128_batches_at_img_160(coco128):
    loader, ds = create_dataloader(coco128 / "images" / "train2017", 160, 4, 32, rect=True, pad=0.5, workers=0)
    imgs, targets, paths, shapes, unreadable = next(iter(loader))
    assert unreadable == ()
    assert imgs.dtype == torch.uint8 and imgs.shape[:2] == (4, 3) and len(paths) == 4
    for i, (path, ((h0, w0), ((rh, rw), (pw, ph)))) in enumerate(zip(paths, shapes)):
        raw = np.loadtxt(img2label_paths([path])[0], ndmin=2).astype(np.float32)
        got = targets[targets[:, 0] == i, 1:].numpy()
        # independent mapping: the original normalised box, scaled into pixels and shifted by the padding
        H, W = imgs.shape[2:]
        cx = (raw[:, 1] * w0 * rw + pw) / W
        cy = (raw[:, 2] * h0 * rh + ph) / H
        np.testing.assert_allclose(got[:, 0], raw[:, 0])
        np.testing.assert_allclose(got[:, 1], cx, atol=2e-3)
        np.testing.assert_allclose(got[:, 2], cy, atol=2e-3)
        np.testing.assert_allclose(got[:, 3], raw[:, 3] * w0 * rw / W, atol=2e-3)
        np.testing.assert_allclose(got[:, 4], raw[:, 4] * h0 * rh / H, atol=2e-3)

    train_loader, _ = create_dataloader(coco128 / "images" / "train2017", 160, 4, 32, hyp=AUG_HYP, augment=True,
                                        shuffle=True, workers=0)
    imgs, targets, _, shapes, _ = next(iter(train_loader))
    assert imgs.shape == (4, 3, 160, 160) and len(targets) > 0
    assert ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all() and set(targets[:, 0].tolist()) <= {0, 1, 2, 3}


def test_each_hyp_key_drives_its_own_augmentation(tmp_path):
    """One hyp key on at a time, against the plain letterboxed sample of the same image."""
    images = make_object_split(tmp_path / "ds")
    off = dict(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, degrees=0.0, translate=0.0, scale=0.0, shear=0.0, perspective=0.0,
               flipud=0.0, fliplr=0.0, mosaic=0.0, mixup=0.0)

    def sample(epoch=0, **on):
        ds = LoadImagesAndLabels(images, img_size=64, augment=True, hyp={**off, **on}, nc=4)
        return ds[(epoch, 0)]

    base_img, base_t, _, base_shapes, _ = sample()
    assert base_shapes is not None
    img, t, _, _, _ = sample(fliplr=1.0)
    assert torch.equal(img, base_img.flip(2)) and torch.allclose(t[:, 2], 1 - base_t[:, 2])
    img, t, _, _, _ = sample(flipud=1.0)
    assert torch.equal(img, base_img.flip(1)) and torch.allclose(t[:, 3], 1 - base_t[:, 3])
    img, t, _, _, _ = sample(hsv_v=0.9)
    assert not torch.equal(img, base_img) and torch.equal(t, base_t)
    moved = [sample(e, translate=0.1)[1] for e in range(3)]  # small enough to keep the object inside
    assert all(torch.allclose(m[:, 4:], base_t[:, 4:], atol=1e-3) for m in moved)  # same size ...
    assert any(not torch.allclose(m[:, 2:4], base_t[:, 2:4], atol=1e-3) for m in moved)  # ... elsewhere
    scaled = [sample(e, scale=0.3)[1] for e in range(3)]
    aspect = base_t[:, 4] / base_t[:, 5]
    assert all(torch.allclose(s[:, 4] / s[:, 5], aspect, rtol=0.05) for s in scaled)  # zoom keeps aspect
    assert any(not torch.allclose(s[:, 4:], base_t[:, 4:], rtol=0.05) for s in scaled)
    rotated = [sample(e, degrees=30.0)[1] for e in range(3)]
    assert any(not torch.allclose(r[:, 4] / r[:, 5], aspect, rtol=0.05) for r in rotated)
    assert sample(mosaic=1.0)[3] is None
    assert sample(mosaic=1.0, mixup=1.0)[1].shape[0] > sample(mosaic=1.0)[1].shape[0]


# -------------------------------------------------------------------------------------------- same data, less work

def _chw_rgb_reference(im):
    """The conversion the pipeline used before to_chw_rgb (commit 001af3a)."""
    return np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])


def test_to_chw_rgb_equals_the_strided_numpy_copy_for_every_view():
    im = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    views = {"plain": im, "flipud": np.flipud(im), "fliplr": np.fliplr(im), "both": np.flipud(np.fliplr(im)),
             "crop": im[3:-4, 5:-6], "flipped_crop": np.fliplr(im[3:-4, 5:-6]), "float": im.astype(np.float32),
             "hw4": np.dstack([im, im[..., :1]])}
    for name, v in views.items():
        got, want = dataloaders.to_chw_rgb(v), _chw_rgb_reference(v)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name
        assert got.flags.c_contiguous and not np.shares_memory(got, im), name
    np.testing.assert_array_equal(dataloaders.to_chw_rgb(im)[0], im[..., 2])  # plane 0 is red


@pytest.mark.parametrize("rect", [False, True])
def test_samples_and_batches_identical_to_the_previous_conversion_and_collate(tmp_path, monkeypatch, rect):
    """The same seed gives the same samples bit for bit as the pipeline before to_chw_rgb and default_collate:
    augmented samples (mosaic, mixup, both flips, so every kind of view) and letterboxed ones, RAM-cached too."""
    sizes = [(80, 60), (60, 80), (64, 64), (50, 70), (90, 45)]
    images = make_split(tmp_path / "ds", n=5, sizes=sizes)
    hyp = {**AUG_HYP, "flipud": 0.5, "mixup": 0.5}
    datasets = [LoadImagesAndLabels(images, img_size=64, batch_size=2, augment=True, hyp=hyp, rect=rect, seed=4),
                LoadImagesAndLabels(images, img_size=64, batch_size=2, augment=True, hyp=hyp, rect=rect, seed=4,
                                    cache_images="ram"),
                LoadImagesAndLabels(images, img_size=64, batch_size=2, rect=rect, pad=0.5)]
    items = [(e, i) for e in range(6) for i in range(5)]
    new = [[ds[item] for item in items] for ds in datasets]
    with monkeypatch.context() as old_code:
        old_code.setattr(dataloaders, "to_chw_rgb", _chw_rgb_reference)
        old = [[ds[item] for item in items] for ds in datasets]
    for a_list, b_list in zip(new, old):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a.img, b.img) and torch.equal(a.targets, b.targets) and a.targets.dtype == torch.float32
            assert a.shapes == b.shapes and a.path == b.path
    assert all(torch.equal(a.img, b.img) for a, b in zip(new[0], new[1]))  # the cache changes nothing either
    batch = LoadImagesAndLabels.collate_fn(new[2][:2] if rect else new[0][:4])
    assert torch.equal(batch.imgs, torch.stack([s.img for s in (new[2][:2] if rect else new[0][:4])]))
    assert batch.imgs.is_contiguous(memory_format=torch.channels_last)  # the models' layout, made in the worker


def test_replayed_validation_batches_equal_the_loaders_and_are_collated_once(tmp_path, monkeypatch):
    """A validation split cached in RAM gives the same batches every pass: read once from the loader, then
    replayed (no sample is built again); a pass stopped early is not kept. Augmented or uncached splits do not
    qualify."""
    sizes = [(64, 48), (48, 64), (64, 64), (40, 64), (64, 40), (64, 32), (32, 64)]
    images = make_split(tmp_path / "ds", n=7, sizes=sizes)
    direct, _ = create_dataloader(images, 64, 3, 32, rect=True, pad=0.5, cache="ram", workers=0)
    expected = [(b.imgs.clone(), b.targets.clone(), b.paths) for b in direct]
    loader, ds = create_dataloader(images, 64, 3, 32, rect=True, pad=0.5, cache="ram", workers=0)
    assert ReplayLoader.suits(loader)
    built = []
    original = type(ds).__getitem__
    monkeypatch.setattr(type(ds), "__getitem__", lambda self, i: built.append(i) or original(self, i))
    replay = ReplayLoader(loader)
    assert len(replay) == len(expected) == 3 and replay.dataset is ds
    next(iter(replay))  # a pass stopped after one batch: not kept
    first = [(b.imgs.clone(), b.targets.clone(), b.paths) for b in replay]
    assert len(built) == 3 + 7
    second = [(b.imgs.clone(), b.targets.clone(), b.paths) for b in replay]
    assert len(built) == 3 + 7  # replayed: nothing built again
    assert _same(first, expected) and _same(second, expected)
    uncached, _ = create_dataloader(images, 64, 3, 32, rect=True, workers=0)
    augmented, _ = create_dataloader(images, 64, 3, 32, hyp=AUG_HYP, augment=True, cache="ram", workers=0)
    assert not ReplayLoader.suits(uncached) and not ReplayLoader.suits(augmented)


def test_replayed_batches_are_not_pinned_and_count_in_the_auto_cache_budget(tmp_path, monkeypatch):
    """ReplayLoader keeps its batches for the whole run: not pinned (page-locked memory rounded up to powers of two),
    whatever the loader was built with. --cache auto counts them beside the cache for a split without augmentation:
    3 images of 64x48, 48x64 and 64x64 in one rect batch at 64 px with pad 0.5 are letterboxed to
    ceil(64 / 32 + 0.5) * 32 = 96 px square, 3 * 3 * 96 * 96 bytes beside the cache's 64 * 48 * 3 * 2 + 64 * 64 * 3."""
    images = make_split(tmp_path / "ds", n=3, sizes=[(64, 48), (48, 64), (64, 64)])
    need, replayed = 64 * 48 * 3 * 2 + 64 * 64 * 3, 3 * 3 * 96 * 96
    probe = LoadImagesAndLabels(images, img_size=64, batch_size=3, rect=True, pad=0.5)
    assert probe._resized_bytes() == need and probe.replay_bytes() == replayed
    monkeypatch.setattr(dataloaders, "_available_memory", lambda: 10 * need)  # the cache alone would fit
    tight = LoadImagesAndLabels(images, img_size=64, batch_size=3, rect=True, pad=0.5, cache_images="auto")
    assert all(im is None for im in tight.ims)
    monkeypatch.setattr(dataloaders, "_available_memory", lambda: 10 * (need + replayed))
    loader, ds = create_dataloader(images, 64, 3, 32, rect=True, pad=0.5, cache="auto", workers=0, pin_memory=True)
    assert all(im is not None for im in ds.ims) and ReplayLoader.suits(loader)
    replay = ReplayLoader(loader)
    assert not replay.pin_memory and not loader.pin_memory
    assert [b.imgs.shape for b in replay] == [(3, 3, 96, 96)]
    monkeypatch.setattr(dataloaders, "_available_memory", lambda: 10 * need)
    augmented = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=AUG_HYP, cache_images="auto")
    assert all(im is not None for im in augmented.ims)  # trained on, not replayed: the cache alone counts
