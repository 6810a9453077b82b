"""Anchor fit: best-possible recall of a model's anchors on a dataset, and k-means + evolution when poor."""
from __future__ import annotations

import numpy as np
import torch

from utils.log import LOGGER
from utils.torch_utils import de_parallel

PREFIX = "AutoAnchor: "
BPR_GOOD = 0.98  # below this best possible recall, anchors are recomputed


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


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, k) squared euclidean distances; for 2-d points this beats torch.cdist's general kernel."""
    return (x[:, None] - c[None]).pow(2).sum(-1)


def kmeans(x: torch.Tensor, k: int, rng: np.random.Generator, restarts: int = 10,
           max_iter: int = 100) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; the lowest-distortion of `restarts` runs. Returns (k, d)."""
    n = len(x)
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    best, best_cost = None, float("inf")
    for _ in range(restarts):
        # k-means++: each next centre drawn with probability proportional to squared distance.
        centres = x[[int(rng.integers(n))]]
        for _ in range(1, k):
            d2 = _sq_dist(x, centres).min(1)[0].double()
            total = float(d2.sum())
            p = (d2 / total).numpy() if total > 0 else np.full(n, 1.0 / n)
            centres = torch.cat((centres, x[[int(rng.choice(n, p=p / p.sum()))]]), 0)
        for _ in range(max_iter):
            assign = _sq_dist(x, centres).argmin(1)
            new = centres.clone()
            for j in range(k):
                members = x[assign == j]
                if len(members):
                    new[j] = members.mean(0)
                else:  # empty cluster: restart it on the point worst served by the others
                    new[j] = x[_sq_dist(x, new).min(1)[0].argmax()]
            converged = torch.allclose(new, centres)
            centres = new
            if converged:
                break
        cost = float(_sq_dist(x, centres).min(1)[0].sum())
        if cost < best_cost:
            best, best_cost = centres, cost
    return best


def kmean_anchors(dataset, n: int = 9, img_size: int = 640, thr: float = 4.0, gen: int = 1000,
                  seed: int = 0, verbose: bool = True) -> np.ndarray:
    """Anchors (n, 2) in pixels, sorted by area, fitted to the dataset's label sizes.

    k-means on whitened (w, h) gives a start; a genetic search then mutates it for `gen` generations,
    keeping mutations that raise the fitness (mean best side ratio over labels that fit, as in
    anchor_fit). Randomness comes from np.random.default_rng(seed) only.
    """
    rng = np.random.default_rng(seed)
    wh0 = label_wh(dataset, img_size)
    tiny = int((wh0 < 3.0).any(1).sum())
    if tiny:
        LOGGER.warning(f"{PREFIX}{tiny} of {len(wh0)} labels are smaller than 3 pixels at --img {img_size}")
    wh = torch.from_numpy(wh0[(wh0 >= 2.0).any(1)])
    if len(wh) >= n:
        scale = wh.std(0).clamp(min=1e-6)  # whiten so that w and h weigh alike in the distances
        k = kmeans(wh / scale, n, rng) * scale
    else:
        LOGGER.warning(f"{PREFIX}only {len(wh)} usable labels for {n} anchors; starting from random anchors")
        k = torch.from_numpy(np.sort(rng.random(n * 2)).reshape(n, 2) * img_size).float()
    if not len(wh):
        return _sorted_by_area(k.numpy())
    inv_thr = 1 / thr

    def fitness(anchors: torch.Tensor) -> float:
        best = _worst_side_ratio(anchors, wh).max(1)[0]
        return float((best * (best > inv_thr).float()).mean())

    k = k.float()
    f = fitness(k)
    mutation_p, sigma = 0.9, 0.1
    for _ in range(gen):
        v = np.ones(k.shape)
        while (v == 1).all():  # a mutation that changes nothing would waste a generation
            mask = rng.random(k.shape) < mutation_p
            v = (mask * rng.random() * rng.standard_normal(k.shape) * sigma + 1).clip(0.3, 3.0)
        candidate = (k * torch.from_numpy(v).float()).clamp(min=2.0)
        fc = fitness(candidate)
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
