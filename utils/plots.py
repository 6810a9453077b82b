"""Figures written by train.py and val.py: metric curves, confusion matrix, image mosaics, label and
training-result summaries. Matplotlib runs on the Agg backend (files only, no display needed)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
from matplotlib.collections import LineCollection, PatchCollection  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.boxes import xywh2xyxy  # noqa: E402
from utils.log import LOGGER  # noqa: E402

# Twenty distinct colours (RGB), cycled by class index.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 200, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]  # fmt: skip


def class_color(c: int, bgr: bool = False) -> tuple[int, int, int]:
    r, g, b = PALETTE[int(c) % len(PALETTE)]
    return (b, g, r) if bgr else (r, g, b)


def _name(names, c: int) -> str:
    if names is None:
        return str(c)
    if isinstance(names, dict):
        return str(names.get(c, c))
    return str(names[c]) if 0 <= c < len(names) else str(c)


def _save(fig, fname) -> Path:
    fname = Path(fname)
    fname.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(fname, dpi=150)
    plt.close(fig)
    return fname


def _grey_lines(ax, x, ys) -> None:
    """Many unlabelled curves y(x) as one artist (one line per class made the plot several times slower)."""
    ax.add_collection(LineCollection([np.column_stack((x, y)) for y in ys], colors="grey", linewidths=1))


def plot_pr_curve(recall, precision, ap, fname="PR_curve.png", names=None, classes=None) -> Path:
    """Precision against recall per class (thin grey when many) and their mean (thick).

    recall (R,), precision (k, R) for the k classes in `classes`; ap (k,) AP at IoU 0.5 for the legend.
    """
    precision, ap = np.asarray(precision), np.asarray(ap).reshape(-1)
    classes = list(range(len(precision))) if classes is None else list(classes)
    fig, ax = plt.subplots(1, 1, figsize=(9, 6), tight_layout=True)
    few = 0 < len(precision) < 21
    if few:
        for i, c in enumerate(classes):
            ax.plot(recall, precision[i], linewidth=1, label=f"{_name(names, c)} {ap[i]:.3f}")
    else:
        _grey_lines(ax, recall, precision)
    if len(precision):
        ax.plot(recall, precision.mean(0), linewidth=3, color="blue", label=f"all classes {ap.mean():.3f} mAP@0.5")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1), title="Precision-Recall Curve")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left", fontsize=7)
    return _save(fig, fname)


def plot_mc_curve(confidence, values, fname="mc_curve.png", names=None, classes=None, xlabel="Confidence", ylabel="Metric") -> Path:
    """A metric against the confidence threshold per class and its mean, whose maximum is marked."""
    values = np.asarray(values)
    classes = list(range(len(values))) if classes is None else list(classes)
    fig, ax = plt.subplots(1, 1, figsize=(9, 6), tight_layout=True)
    few = 0 < len(values) < 21
    if few:
        for i, c in enumerate(classes):
            ax.plot(confidence, values[i], linewidth=1, label=_name(names, c))
    else:
        _grey_lines(ax, confidence, values)
    if len(values):
        mean = values.mean(0)
        best = int(mean.argmax())
        ax.plot(confidence, mean, linewidth=3, color="blue", label=f"all classes {mean[best]:.2f} at {confidence[best]:.3f}")
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1), title=f"{ylabel}-Confidence Curve")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left", fontsize=7)
    return _save(fig, fname)


def plot_confusion_matrix(matrix, names, fname="confusion_matrix.png", normalize: bool = True) -> Path:
    """Heat map of a (nc+1, nc+1) matrix[predicted, true]; the last row/column is background.

    normalize divides each column by its total, so a column reads as where that true class went.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    nc = matrix.shape[0] - 1
    shown = matrix / (matrix.sum(0, keepdims=True) + 1e-9) if normalize else matrix
    shown = np.where(shown < 0.005, np.nan, shown)  # blank the near-zero cells
    labels = [_name(names, i) for i in range(nc)] + ["background"]
    fig, ax = plt.subplots(1, 1, figsize=(12, 9), tight_layout=True)
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if nc < 30:  # annotate and name every cell only while it stays readable
        ticks = np.arange(nc + 1)
        # As large as a cell holds "0.00" (the matrix is about 540 points wide), 6 to 16 points: a fixed 6 was
        # unreadable on the few-class matrices of custom datasets
        size = float(np.clip(540 / (nc + 1) / 3.4, 6, 16))
        ax.set_xticks(ticks, labels, rotation=90, fontsize=float(np.clip(size, 7, 12)))
        ax.set_yticks(ticks, labels, fontsize=float(np.clip(size, 7, 12)))
        for (i, j), v in np.ndenumerate(shown):
            if not np.isnan(v):
                colour = "white" if normalize and v > 0.6 else "black"  # legible on the darkest blues too
                ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center", fontsize=size,
                        color=colour)
    ax.set(xlabel="True", ylabel="Predicted", title="Confusion Matrix" + (" (normalised per true class)" if normalize else ""))
    return _save(fig, fname)


class Annotator:
    """Draws labelled boxes on one BGR uint8 image with OpenCV: detect.py's output images, the hub results'
    save()/render(), and each tile of plot_images' batch mosaics.

    Boxes are drawn crisp (no anti-aliasing) in their colour; a label sits on a filled box of the same colour
    above the box's top-left corner, or just inside it when there is no room above.
    """

    def __init__(self, im: np.ndarray, line_width: int | None = None, font_scale: float | None = None):
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise ValueError(f"Annotator needs an HxWx3 uint8 image, got {im.shape} {im.dtype}")
        self.im = im if im.flags.c_contiguous and im.flags.writeable else np.ascontiguousarray(im).copy()
        # YOLOv5's default: about 0.3% of the mean side, at least 2 px.
        self.lw = int(line_width or max(round(sum(im.shape[:2]) / 2 * 0.003), 2))
        self.font_scale = font_scale or self.lw / 3
        self.font_thickness = max(self.lw - 1, 1)

    def box_label(self, box, label: str = "", color=(128, 128, 128), txt_color=(255, 255, 255)) -> None:
        """Draw an xyxy box (pixels) and, when given, its label text."""
        p1 = (int(round(float(box[0]))), int(round(float(box[1]))))
        p2 = (int(round(float(box[2]))), int(round(float(box[3]))))
        cv2.rectangle(self.im, p1, p2, color, thickness=self.lw, lineType=cv2.LINE_8)
        if not label:
            return
        (w, h), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, self.font_scale, self.font_thickness)
        above = p1[1] - h - 3 >= 0
        corner = (p1[0] + w, p1[1] - h - 3 if above else p1[1] + h + 3)
        cv2.rectangle(self.im, p1, corner, color, -1, cv2.LINE_8)
        baseline_y = p1[1] - 2 if above else p1[1] + h + 2
        cv2.putText(self.im, label, (p1[0], baseline_y), cv2.FONT_HERSHEY_SIMPLEX, self.font_scale, txt_color,
                    self.font_thickness, cv2.LINE_AA)  # fmt: skip

    def text(self, xy, text: str, color=(220, 220, 220)) -> None:
        """Plain text with its baseline's left end at xy (pixels)."""
        cv2.putText(self.im, text, (int(xy[0]), int(xy[1])), cv2.FONT_HERSHEY_SIMPLEX, self.font_scale, color,
                    self.font_thickness, cv2.LINE_AA)  # fmt: skip

    def result(self) -> np.ndarray:
        return self.im


def _to_numpy(x):
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def plot_images(images, targets, paths=None, fname="images.jpg", names=None, max_subplots: int = 16, max_size: int = 1920, conf_thres: float = 0.25) -> Path:
    """Tile a batch into one mosaic and draw its boxes.

    images: (b, 3, h, w) RGB, uint8 or float in 0..1 (or 0..255). targets: rows [img_idx, cls, cx, cy, w, h]
    for labels or [img_idx, cls, cx, cy, w, h, conf] for predictions, box coordinates normalised (all <= 1.1)
    or in pixels of the batch images. Predictions below conf_thres are not drawn.
    """
    images = _to_numpy(images)
    targets = np.zeros((0, 6)) if targets is None else _to_numpy(targets)
    if targets.ndim != 2 or not len(targets):
        targets = np.zeros((0, 6))
    if images.dtype != np.uint8:
        images = images * 255 if images.size and images.max() <= 1.0 else images
        images = images.clip(0, 255).astype(np.uint8)
    b, _, h, w = images.shape
    b = min(b, max_subplots)
    grid = math.ceil(b**0.5)
    scale = min(1.0, max_size / (grid * max(h, w)))
    th, tw = math.ceil(h * scale), math.ceil(w * scale)
    mosaic = np.full((grid * th, grid * tw, 3), 255, dtype=np.uint8)
    normalised = bool(len(targets)) and targets[:, 2:6].max() <= 1.1
    is_pred = targets.shape[1] > 6
    line = max(1, round(min(th, tw) / 200))
    font = max(0.3, min(th, tw) / 600)
    for i in range(b):
        x0, y0 = (i % grid) * tw, (i // grid) * th
        tile = np.ascontiguousarray(images[i].transpose(1, 2, 0)[:, :, ::-1])  # RGB -> BGR for OpenCV
        if scale < 1:
            tile = cv2.resize(tile, (tw, th), interpolation=cv2.INTER_AREA)
        annotator = Annotator(np.ascontiguousarray(tile), line_width=line, font_scale=font)
        rows = targets[targets[:, 0] == i]
        if len(rows):
            xyxy = xywh2xyxy(rows[:, 2:6] * ([w, h, w, h] if normalised else 1.0) * scale)
            for box, row in zip(xyxy, rows):
                if is_pred and row[6] < conf_thres:
                    continue
                c = int(row[1])
                label = f"{_name(names, c)} {row[6]:.1f}" if is_pred else _name(names, c)
                annotator.box_label(box, label, color=class_color(c, bgr=True))
        if paths is not None and i < len(paths):
            annotator.text((3, int(14 * font / 0.4)), Path(paths[i]).name[:40])
        tile = annotator.result()
        cv2.rectangle(tile, (0, 0), (tw - 1, th - 1), (255, 255, 255), 1)
        mosaic[y0 : y0 + th, x0 : x0 + tw] = tile
    fname = Path(fname)
    fname.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(fname), mosaic):
        raise OSError(f"could not write {fname}")
    return fname


def plot_labels(labels, names=None, save_dir=Path(".")) -> Path:
    """labels.jpg: boxes per class, box centres, box sizes, and a few boxes overlaid at one scale.

    labels: (n, 5) [cls, cx, cy, w, h] normalised, for the whole training set.
    """
    labels = _to_numpy(labels).reshape(-1, 5)
    cls, xywh = labels[:, 0].astype(int), labels[:, 1:]
    nc = max(len(names) if names is not None else 0, int(cls.max()) + 1 if len(cls) else 1)
    LOGGER.info(f"Plotting labels to {Path(save_dir) / 'labels.jpg'}...")
    fig, ax = plt.subplots(2, 2, figsize=(8, 8), tight_layout=True)
    counts = np.bincount(cls, minlength=nc)
    ax[0, 0].bar(range(nc), counts, color=[np.array(class_color(c)) / 255 for c in range(nc)])
    ax[0, 0].set(ylabel="instances", xlabel="class")
    if nc < 30:
        ax[0, 0].set_xticks(range(nc), [_name(names, c) for c in range(nc)], rotation=90, fontsize=7)
    # Box outlines centred in a unit square: shows the spread of shapes and sizes.
    ax[0, 1].set(xlim=(0, 1), ylim=(0, 1), title="boxes (centred)", aspect="equal")
    boxes = [plt.Rectangle((0.5 - bw / 2, 0.5 - bh / 2), bw, bh) for _, _, bw, bh in xywh[:500]]
    ax[0, 1].add_collection(PatchCollection(boxes, facecolor="none", linewidths=0.5,  # one artist, not 500
                                            edgecolors=[np.array(class_color(c)) / 255 for c in cls[:500]]))
    ax[1, 0].hist2d(xywh[:, 0], xywh[:, 1], bins=50, range=[[0, 1], [0, 1]], cmap="Blues")
    ax[1, 0].set(xlabel="x", ylabel="y", aspect="equal")
    ax[1, 0].invert_yaxis()  # image rows grow downwards
    ax[1, 1].hist2d(xywh[:, 2], xywh[:, 3], bins=50, range=[[0, 1], [0, 1]], cmap="Blues")
    ax[1, 1].set(xlabel="width", ylabel="height", aspect="equal")
    return _save(fig, Path(save_dir) / "labels.jpg")


def plot_results(csv_path) -> Path:
    """results.png beside results.csv: one panel per numeric column, plotted against the epoch."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="") as f:
        rows = [[v.strip() for v in r] for r in csv.reader(f) if r]
    if len(rows) < 2:
        raise ValueError(f"{csv_path}: no data rows to plot")
    header, body = [h.strip() for h in rows[0]], rows[1:]

    def column(j):
        try:
            return np.array([float(r[j]) for r in body])
        except (ValueError, IndexError):
            return None  # text or ragged column: not plotted

    data = {h: column(j) for j, h in enumerate(header)}
    x_name = next((h for h in header if h.lower() == "epoch"), None)
    x = data[x_name] if x_name is not None and data[x_name] is not None else np.arange(len(body))
    series = [h for h in header if h != x_name and data[h] is not None]
    if not series:
        raise ValueError(f"{csv_path}: no numeric columns besides the epoch")
    cols = min(5, len(series))
    nrows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3 * cols, 2.6 * nrows), squeeze=False)
    # fixed margins: tight_layout measured every tick label of the grid and took half of the plot's time
    height = 2.6 * nrows  # inches: room for tick labels and the x label below, the title above
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.5 / height, top=1 - 0.3 / height, wspace=0.35, hspace=0.55)
    for ax, name in zip(axes.flat, series):
        ax.plot(x, data[name], marker=".", linewidth=1.5, markersize=4)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch" if x_name else "row", fontsize=8)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    return _save(fig, csv_path.with_name("results.png"))
