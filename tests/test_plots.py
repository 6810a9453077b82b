"""utils/plots.py: boxes land where the targets say, and every figure is written as a readable image."""
from pathlib import Path

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from utils import plots
from utils.metrics import ConfusionMatrix
from utils.plots import class_color, plot_confusion_matrix, plot_images, plot_labels, plot_mc_curve, plot_pr_curve, plot_results


def test_plot_images_draws_boxes_in_class_colour(tmp_path):
    images = torch.zeros((2, 3, 64, 96), dtype=torch.uint8)
    # image 1, class 3, box x 24..72, y 16..48 (normalised centre/size); a prediction below 0.25 is skipped
    labels = torch.tensor([[1, 3, 0.5, 0.5, 0.5, 0.5]])
    out = plot_images(images, labels, paths=None, fname=tmp_path / "labels.png")
    mosaic = cv2.imread(str(out))  # BGR
    assert mosaic.shape == (128, 192, 3)  # 2 images -> 2x2 grid of 64x96 tiles
    x0 = 96  # image 1 is the second tile of the first row
    b, g, r = mosaic[32, x0 + 24].astype(int)  # on the left edge of the box, mid height
    assert (r, g, b) == class_color(3)
    assert mosaic[32, x0 + 48].tolist() == [0, 0, 0]  # box interior untouched
    assert mosaic[32, 48].tolist() == [0, 0, 0]  # image 0 has no boxes

    # the same box in pixels, as a prediction at 0.9, and a second one at 0.1 (not drawn)
    preds = torch.tensor([[1, 3, 48.0, 32.0, 48.0, 32.0, 0.9], [0, 5, 48.0, 32.0, 48.0, 32.0, 0.1]])
    mosaic2 = cv2.imread(str(plot_images(images, preds, fname=tmp_path / "pred.png")))
    assert mosaic2[32, x0 + 24].tolist() == mosaic[32, x0 + 24].tolist()
    assert mosaic2[32, 24].tolist() == [0, 0, 0]


def test_plot_images_handles_float_images_and_no_targets(tmp_path):
    images = torch.full((5, 3, 32, 32), 0.5)
    out = plot_images(images, torch.zeros((0, 6)), paths=[f"/x/im{i}.jpg" for i in range(5)], fname=tmp_path / "b.jpg")
    mosaic = cv2.imread(str(out))
    assert mosaic.shape == (96, 96, 3)  # 5 images -> 3x3 grid
    assert abs(int(mosaic[20, 20, 0]) - 128) < 8  # 0.5 -> grey 127/128
    assert (mosaic[80, 80] > 240).all()  # unused tiles stay white


def test_curves_and_confusion_matrix_written(tmp_path):
    rng = np.random.default_rng(0)
    px = np.linspace(0, 1, 101)
    pr = np.sort(rng.random((3, 101)), 1)[:, ::-1]
    for f in (
        plot_pr_curve(px, pr, np.array([0.5, 0.6, 0.7]), tmp_path / "PR_curve.png", names=["a", "b", "c"]),
        plot_mc_curve(np.linspace(0, 1, 1000), rng.random((3, 1000)), tmp_path / "F1_curve.png", ylabel="F1"),
        plot_pr_curve(px, np.zeros((0, 101)), np.zeros(0), tmp_path / "PR_empty.png"),
    ):
        assert cv2.imread(str(f)) is not None
    cm = ConfusionMatrix(nc=2)
    cm.process_batch(torch.tensor([[0, 0, 10, 10, 0.9, 1.0]]), torch.tensor([[0, 0, 0, 10, 10.0]]))
    img = cv2.imread(str(plot_confusion_matrix(cm.matrix, ["cat", "dog"], tmp_path / "confusion_matrix.png")))
    assert img is not None and img.shape[0] > 100


def test_plot_labels(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.concatenate([rng.integers(0, 4, (50, 1)), rng.uniform(0.05, 0.95, (50, 4))], 1)
    out = plot_labels(labels, names=["a", "b", "c", "d"], save_dir=tmp_path)
    assert out == tmp_path / "labels.jpg" and cv2.imread(str(out)) is not None


def test_plot_results_reads_padded_csv(tmp_path):
    csv = tmp_path / "results.csv"
    csv.write_text(
        "      epoch,  train/box_loss,  metrics/mAP_0.5,   note\n"
        "          0,          0.1,           0.2,   warm\n"
        "          1,          0.08,          0.3,   ok\n"
    )
    out = plot_results(csv)
    assert out == tmp_path / "results.png" and cv2.imread(str(out)) is not None
    (tmp_path / "empty.csv").write_text("epoch,loss\n")
    with pytest.raises(ValueError, match="empty.csv"):
        plot_results(tmp_path / "empty.csv")


@pytest.mark.parametrize("nc", [2, 9, 29])
def test_confusion_matrix_numbers_are_large_enough_to_read_and_fit_their_cells(tmp_path, monkeypatch, nc):
    """Each cell's number, measured on the saved figure's renderer, fits inside its cell and is as large as that
    allows: 16 points, or at least half the cell's width (a fixed 6 points left few-class matrices unreadable)."""
    kept = []
    monkeypatch.setattr(plots, "_save", lambda fig, fname: kept.append(fig) or Path(fname))
    plot_confusion_matrix(np.ones((nc + 1, nc + 1)), [f"c{i}" for i in range(nc)], tmp_path / "cm.png")
    fig = kept[0]
    fig.set_dpi(150)  # as _save writes it
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    cell = ax.get_window_extent(renderer).width / (nc + 1)
    numbers = ax.texts
    assert len(numbers) == (nc + 1) ** 2
    for t in numbers:
        width = t.get_window_extent(renderer).width
        assert width < cell and (t.get_fontsize() == 16 or width > cell / 2), (t.get_fontsize(), width, cell)
    plt.close(fig)
