"""Anchor fit: best-possible recall of a model's anchors on a dataset, and k-means + evolution when poor."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from utils.log import LOGGER
from utils.torch_utils import de_parallel

PREFIX = "AutoAnchor: "
BPR_GOOD = 0.98  # below this best possible recall, anchors are recomputed
KMEANS_RESTARTS = 30  # k-means runs the start is chosen from; YOLOv5 runs scipy's kmeans with iter=30


@torch.no_grad()
def check_anchor_order(m) -> bool:
    """Make anchor size order follow stride order (small anchors on the fine level); flip levels if not.

    `m` is a Detect module (anchors (nl, na, 2), stride (nl,)). Returns True when the levels were flipped.
    """
    area = m.anchors.prod(-1).mean(-1).view(-1)
    d_area = area[-1] - area[0]
    d_stride = m.stride[-1] - m.stride[0]
    if d_area and torch.sign(d_area).item() != torch.sign(d_stride).item():
        m.anchors[:] = m.anchors.flip(0)
        return True
    return False


def label_wh(dataset, imgsz: int = 640, rng: np.random.Generator | None = None) -> np.ndarray:
    """Label widths/heights in pixels (n, 2) after resizing each image's long side to imgsz.

    dataset: has `.shapes` (images, 2) as (w, h) and `.labels`, one (n, 5) [cls, cx, cy, w, h] array per
    image. With rng, each image also gets a random scale in [0.9, 1.1], as training augmentation would.
    """
    shapes = np.asarray(dataset.shapes, dtype=np.float64).reshape(-1, 2)
    labels = list(dataset.labels)
    if len(labels) != len(shapes):
        raise ValueError(f"dataset has {len(shapes)} image shapes but {len(labels)} label arrays")
    if not len(shapes):
        return np.zeros((0, 2), dtype=np.float32)
    sizes = imgsz * shapes / shapes.max(1, keepdims=True)
    if rng is not None:
        sizes = sizes * rng.uniform(0.9, 1.1, size=(len(sizes), 1))
    parts = [np.asarray(lb, dtype=np.float64).reshape(-1, 5)[:, 3:5] * s for s, lb in zip(sizes, labels)]
    return np.concatenate(parts, 0).astype(np.float32)


def anchor_fit(anchors: torch.Tensor, wh: torch.Tensor, thr: float = 4.0) -> tuple[float, float]:
    """(best possible recall, mean anchors per target) of pixel anchors (k, 2) for label sizes wh (n, 2).

    A label fits an anchor when neither side differs by more than a factor thr, the loss's anchor_t rule.
    BPR is the share of labels that fit at least one anchor.
    """
    ratio = _worst_side_ratio(anchors.float(), wh.float())
    best = ratio.max(1)[0]
    aat = (ratio > 1 / thr).float().sum(1).mean().item()
    bpr = (best > 1 / thr).float().mean().item()
    return bpr, aat


def _worst_side_ratio(anchors: torch.Tensor, wh: torch.Tensor) -> torch.Tensor:
    """(n, k): for each label and anchor, min over w, h of min(r, 1/r), r the label/anchor side ratio."""
    r = wh[:, None] / anchors[None]
    return torch.min(r, 1 / r).min(2)[0]


def anchor_fitness(anchors: torch.Tensor, wh: torch.Tensor, thr: float = 4.0) -> float:
    """The search's objective: mean over labels wh (n, 2) of the best worst-side ratio to pixel anchors (k, 2),
    counting 0 for a label no anchor fits within a factor thr."""
    best = _worst_side_ratio(anchors.float(), wh.float()).max(1)[0]
    return float((best * (best > 1 / thr).float()).mean())


def kmeans_start(wh: torch.Tensor, n: int, rng: np.random.Generator, thr: float = 4.0,
                 restarts: int = KMEANS_RESTARTS) -> torch.Tensor:
    """Pixel anchors (n, 2) to start the evolution from: `restarts` runs of scikit-learn's k-means on whitened
    (w, h), keeping the centres of highest anchor fitness.

    Whitening makes w and h weigh alike, as YOLOv5 does before scipy's kmeans. The runs alternate between a start
    from n random labels (scipy's, which YOLOv5 uses) and k-means++ (scikit-learn's default), and the best is
    chosen by the fitness the evolution then raises, not by k-means' distortion: on the first 16 coco128 images
    at 256 px the lowest-distortion centres, which k-means++ finds every time, fit worst (0.64 against 0.78), while
    random starts alone can miss one of nine well-separated clusters (tests/test_autoanchor.py).
    """
    if len(wh) < n:
        raise ValueError(f"k-means needs at least n={n} labels, got {len(wh)}")
    scale = wh.double().std(0).clamp(min=1e-6)
    x = (wh.double() / scale).numpy()
    best, best_f = None, -1.0
    with warnings.catch_warnings():  # fewer distinct sizes than anchors: duplicate centres, the evolution parts them
        warnings.simplefilter("ignore", ConvergenceWarning)
        for i, state in enumerate(rng.integers(2 ** 31 - 1, size=restarts)):
            init = "random" if i % 2 == 0 else "k-means++"
            fit = KMeans(n, init=init, n_init=1, random_state=int(state)).fit(x)
            k = (torch.from_numpy(fit.cluster_centers_) * scale).float()
            f = anchor_fitness(k, wh, thr)
            if f > best_f:
                best, best_f = k, f
    return best


def kmean_anchors(dataset, n: int = 9, img_size: int = 640, thr: float = 4.0, gen: int = 1000,
                  seed: int = 0, verbose: bool = True) -> np.ndarray:
    """Anchors (n, 2) in pixels, sorted by area, fitted to the dataset's label sizes.

    kmeans_start gives a start; a genetic search then mutates it for `gen` generations, keeping mutations that
    raise anchor_fitness. Randomness comes from np.random.default_rng(seed) only (train.py passes --seed), the
    k-means runs' included.
    """
    rng = np.random.default_rng(seed)
    wh0 = label_wh(dataset, img_size)
    tiny = int((wh0 < 3.0).any(1).sum())
    if tiny:
        LOGGER.warning(f"{PREFIX}{tiny} of {len(wh0)} labels are smaller than 3 pixels at --img {img_size}")
    wh = torch.from_numpy(wh0[(wh0 >= 2.0).any(1)])
    if len(wh) >= n:
        k = kmeans_start(wh, n, rng, thr)
    else:
        LOGGER.warning(f"{PREFIX}only {len(wh)} usable labels for {n} anchors; starting from random anchors")
        k = torch.from_numpy(np.sort(rng.random(n * 2)).reshape(n, 2) * img_size).float()
    if not len(wh):
        return _sorted_by_area(k.numpy())
    k = k.float()
    f = anchor_fitness(k, wh, thr)
    mutation_p, sigma = 0.9, 0.1
    for _ in range(gen):
        v = np.ones(k.shape)
        while (v == 1).all():  # a mutation that changes nothing would waste a generation
            mask = rng.random(k.shape) < mutation_p
            v = (mask * rng.random() * rng.standard_normal(k.shape) * sigma + 1).clip(0.3, 3.0)
        candidate = (k * torch.from_numpy(v).float()).clamp(min=2.0)
        fc = anchor_fitness(candidate, wh, thr)
        if fc > f:
            f, k = fc, candidate
    k = _sorted_by_area(k.numpy())
    if verbose:
        bpr, aat = anchor_fit(torch.from_numpy(k), torch.from_numpy(wh0), thr)
        LOGGER.info(f"{PREFIX}thr={thr:.2f}: {bpr:.4f} best possible recall, {aat:.2f} anchors past thr, "
                    f"fitness {f:.4f}; n={n}, img_size={img_size}, anchors: "
                    + ", ".join(f"{round(w)},{round(h)}" for w, h in k))
    return k.astype(np.float32)


def _sorted_by_area(k: np.ndarray) -> np.ndarray:
    return k[np.argsort(k.prod(1))]


@torch.no_grad()
def check_anchors(dataset, model, thr: float = 4.0, imgsz: int = 640, seed: int = 0) -> bool:
    """Replace the model's anchors by k-means + evolved ones when they fit the dataset's labels poorly.

    Poor means best possible recall below 0.98 on label sizes at imgsz with a random 0.9-1.1 rescale per
    image (seeded). New anchors are kept only if their recall is higher. Returns True when anchors changed.
    Works on a DDP-wrapped model; with the same seed every rank computes the same anchors.
    """
    m = de_parallel(model).model[-1]
    wh = label_wh(dataset, imgsz, rng=np.random.default_rng(seed))
    if not len(wh):
        LOGGER.warning(f"{PREFIX}no labels in the dataset, anchors left as they are")
        return False
    wh = torch.from_numpy(wh)
    stride = m.stride.to(m.anchors.device).view(-1, 1, 1)
    anchors = (m.anchors.float() * stride).cpu().view(-1, 2)
    bpr, aat = anchor_fit(anchors, wh, thr)
    msg = f"{PREFIX}{aat:.2f} anchors/target, {bpr:.3f} Best Possible Recall (BPR). "
    if bpr > BPR_GOOD:
        LOGGER.info(msg + "Current anchors are a good fit to the dataset")
        return False
    LOGGER.info(msg + "Anchors are a poor fit to the dataset, computing new ones...")
    new = kmean_anchors(dataset, n=m.anchors.numel() // 2, img_size=imgsz, thr=thr, seed=seed, verbose=True)
    new_bpr, _ = anchor_fit(torch.from_numpy(new), wh, thr)
    if new_bpr <= bpr:
        LOGGER.info(f"{PREFIX}new anchors ({new_bpr:.3f} BPR) are no better; keeping the original anchors")
        return False
    m.anchors[:] = torch.from_numpy(new).to(m.anchors).view_as(m.anchors)
    check_anchor_order(m)
    m.anchors /= stride.to(m.anchors)
    LOGGER.info(f"{PREFIX}new anchors set ({bpr:.3f} -> {new_bpr:.3f} BPR); "
                "put them in the model yaml to use them from the start")
    return True
