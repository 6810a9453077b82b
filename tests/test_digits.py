"""The held-out digits set (data/make_digits.py, data/digits.yaml): disjoint splits, boxes around the ink,
determinism from the seed, and the loader's message when the set has not been made."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.datasets import load_digits

from data import make_digits
from utils import data_config
from utils.data_config import DatasetError, check_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = make_digits.Settings(seed=3, canvas=64, train=6, val=4, test=4, min_digits=2, max_digits=4, min_size=10,
                            max_size=30)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_digits.make(tmp_path_factory.mktemp("digits") / "digits", TINY)


@pytest.fixture(scope="module")
def manifest(tiny) -> dict:
    return json.loads((tiny / "manifest.json").read_text())


def test_no_source_digit_in_two_splits(manifest):
    source = load_digits()
    pools = {s: set(manifest["sources"][s]) for s in make_digits.SPLITS}
    assert sum(len(p) for p in pools.values()) == len(source.images)  # every digit in exactly one split
    assert not (pools["train"] & pools["val"] or pools["train"] & pools["test"] or pools["val"] & pools["test"])
    # By content too: no 8x8 image drawn in one split equals one drawn in another.
    drawn = {s: {source.images[o["source"]].astype(np.uint8).tobytes()
                 for entry in manifest["images"][s] for o in entry["objects"]} for s in make_digits.SPLITS}
    assert all(drawn.values())
    assert not (drawn["train"] & drawn["val"] or drawn["train"] & drawn["test"] or drawn["val"] & drawn["test"])
    for split in make_digits.SPLITS:  # each canvas draws only its own split's digits
        assert {o["source"] for e in manifest["images"][split] for o in e["objects"]} <= pools[split]
    # Stratified: each class has about its share of the 1,797 digits in every split.
    counts = np.bincount(source.target[sorted(pools["test"])], minlength=10)
    assert counts.min() >= 0.2 * 174 - 2


def test_label_boxes_enclose_the_drawn_ink(tiny, manifest):
    source = load_digits()
    side = TINY.canvas
    checked = 0
    for split in make_digits.SPLITS:
        for entry in manifest["images"][split]:
            image = cv2.imread(str(tiny / entry["image"]))
            assert image.shape == (side, side, 3)
            label = tiny / entry["image"].replace("images/", "labels/", 1).replace(".png", ".txt")
            rows = np.loadtxt(label, ndmin=2)
            assert len(rows) == len(entry["objects"]) >= 1
            for row, obj in zip(rows, entry["objects"]):
                assert row[0] == source.target[obj["source"]]  # the class is the drawn digit's
                cx, cy, w, h = row[1:] * side
                x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
                # The ink: where the upscaled 8x8 digit has any coverage, at the manifest's patch position.
                coverage = cv2.resize(source.images[obj["source"]].astype(np.float32), (obj["w"], obj["h"]),
                                      interpolation=cv2.INTER_LINEAR)
                ys, xs = np.nonzero(coverage > 0)
                xs, ys = xs + obj["x"], ys + obj["y"]
                tol = 1e-3  # pixels: the label's 6-decimal rounding is far below this
                assert x0 - tol <= xs.min() and xs.max() + 1 <= x1 + tol
                assert y0 - tol <= ys.min() and ys.max() + 1 <= y1 + tol
                # ... and tightly: each side of the box touches ink.
                assert abs(xs.min() - x0) < tol and abs(xs.max() + 1 - x1) < tol
                assert abs(ys.min() - y0) < tol and abs(ys.max() + 1 - y1) < tol
                assert -tol <= x0 and x1 <= side + tol and -tol <= y0 and y1 <= side + tol
                checked += 1
            # Patches never overlap, so no box holds another digit's ink.
            for i, a in enumerate(entry["objects"]):
                for b in entry["objects"][i + 1:]:
                    assert (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                            or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])
    assert checked >= 6 + 4 + 4  # a digit without room is left out, but every canvas has one


def test_the_same_seed_writes_the_same_bytes(tiny, tmp_path):
    again = make_digits.make(tmp_path / "again", TINY)
    other = make_digits.make(tmp_path / "other", make_digits.Settings(**{**TINY.__dict__, "seed": 4}))
    files = sorted(p.relative_to(tiny) for p in tiny.rglob("*") if p.is_file())
    assert len(files) == 2 * (6 + 4 + 4) + 1
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((tiny / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert (tiny / "images/train/train_00000.png").read_bytes() != (other / "images/train/train_00000.png").read_bytes()
    first, second = (json.loads((d / "manifest.json").read_text())["sources"]["test"] for d in (tiny, other))
    assert first != second


def test_digits_yaml_loads_and_names_the_make_command_when_missing(tiny, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    monkeypatch.setattr(data_config, "ROOT", repo)
    monkeypatch.setenv("DATASETS_DIR", str(tmp_path / "empty"))
    yaml_file = ROOT / "data" / "digits.yaml"
    with pytest.raises(DatasetError, match=r"not found; searched: .*; make it with: python data/make_digits.py$"):
        check_dataset(yaml_file)

    monkeypatch.setenv("DATASETS_DIR", str(tiny.parent))
    d = check_dataset(yaml_file)
    assert d["nc"] == 10 and d["names"] == [str(i) for i in range(10)]
    assert {k: Path(d[k]) for k in make_digits.SPLITS} == {k: tiny / "images" / k for k in make_digits.SPLITS}


def test_bad_settings_and_an_existing_folder_are_one_line(tiny, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "data" / "make_digits.py"), *args],
                              capture_output=True, text=True)

    r = run("--out", str(tiny), "--train", "1", "--val", "1", "--test", "1")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "already exists" in r.stderr
    r = run("--out", str(tmp_path / "x"), "--sizes", "4", "40", "--canvas", "64")
    assert r.returncode == 1 and "--sizes" in r.stderr and not (tmp_path / "x").exists()
    stray = tmp_path / "stray"
    stray.mkdir()
    r = run("--out", str(stray), "--force")
    assert r.returncode == 1 and "only a folder made by this script" in r.stderr and stray.is_dir()
