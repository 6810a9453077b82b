"""bench/yolov5_train_e2e.py's summary against hand-computed numbers (no training, no YOLOv5)."""
import importlib.util
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "yolov5_train_e2e", Path(__file__).resolve().parents[1] / "bench" / "yolov5_train_e2e.py")
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)


def test_curve_figures_best_and_last_50():
    maps = [0.0] * 250 + [0.1] * 25 + [0.3] * 25  # 300 epochs
    fig = e2e.curve_figures(maps)
    assert fig["best"] == 0.3
    assert fig["last50"] == pytest.approx(0.2)  # (25 * 0.1 + 25 * 0.3) / 50
    assert e2e.curve_figures([0.1, 0.3])["last50"] == pytest.approx(0.2)  # fewer epochs than 50: all of them


def test_summary_hand_computed():
    per_seed = {
        0: {"yolov5": {"best": 0.50}, "ours": {"best": 0.52}},
        1: {"yolov5": {"best": 0.40}, "ours": {"best": 0.41}},
        2: {"yolov5": {"best": 0.60}, "ours": {"best": 0.57}},
        3: {"yolov5": {"best": 0.70}},  # ours did not finish seed 3: in YOLOv5's mean, not in the paired difference
    }
    s = e2e.summarise(per_seed, ["best"])["best"]
    # YOLOv5: mean 0.55, deviations -.05 -.15 .05 .15 -> sum of squares .05, sd sqrt(.05 / 3)
    assert s["yolov5"][0] == pytest.approx(0.55)
    assert s["yolov5"][1] == pytest.approx(math.sqrt(0.05 / 3))
    assert s["yolov5"][2] == 4
    # ours: 0.52 0.41 0.57 -> mean 0.5, deviations .02 -.09 .07 -> .0134, sd sqrt(.0134 / 2)
    assert s["ours"][0] == pytest.approx(0.5)
    assert s["ours"][1] == pytest.approx(math.sqrt(0.0134 / 2))
    # paired differences .02 .01 -.03 -> mean 0, deviations .02 .01 -.03 -> .0014, sd sqrt(.0007), SE sd / sqrt(3)
    assert s["n_paired"] == 3
    assert s["diff"] == pytest.approx(0.0, abs=1e-12)
    assert s["se"] == pytest.approx(math.sqrt(0.0007) / math.sqrt(3))
    assert s["ok"] is True


def test_summary_verdict_and_undefined_se():
    per_seed = {0: {"yolov5": {"x": 0.5}, "ours": {"x": 0.40}},
                1: {"yolov5": {"x": 0.5}, "ours": {"x": 0.42}}}
    s = e2e.summarise(per_seed, ["x"])["x"]
    # differences -.10 -.08: mean -.09, sd sqrt(.0002), SE .01 -> -.09 < -.01: no
    assert s["diff"] == pytest.approx(-0.09)
    assert s["se"] == pytest.approx(0.01)
    assert s["ok"] is False
    one = e2e.summarise({0: {"yolov5": {"x": 0.5}, "ours": {"x": 0.6}}, 1: {"yolov5": {"x": 0.4}}}, ["x"])["x"]
    assert one["n_paired"] == 1 and math.isnan(one["se"]) and one["ok"] is None
    assert math.isnan(one["ours"][1])  # one seed: no sample sd


def test_markdown_rows():
    per_seed = {0: {"yolov5": {"best": 0.5, "last50": 0.45}, "ours": {"best": 0.52, "last50": 0.47}},
                1: {"yolov5": {"best": 0.4, "last50": 0.35}, "ours": {"best": 0.41, "last50": 0.36}},
                2: {"yolov5": {"best": 0.3, "last50": 0.25}}}
    text = e2e.markdown(per_seed, e2e.FIGURES["img16"])
    assert "| 0 | 0.5000 | 0.5200 | 0.4500 | 0.4700 |" in text
    assert "| 2 | 0.3000 | - | 0.2500 | - |" in text
    # best: YOLOv5 mean .4 sd .1; ours .465 sd .0778; differences .02 .01 -> .015, SE .005 -> yes
    assert "| val mAP50-95, best epoch | 0.4000 (0.1000) | 0.4650 (0.0778) | 0.0150 (0.0050) | 3, 2, 2 | yes |" in text
