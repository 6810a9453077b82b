"""YOLOv5's training augmentation beside ours, compared by distribution: what thousands of samples look like.

    OMP_NUM_THREADS=1 python bench/augmentation_parity.py --yolov5 ../yolov5 --yolov5-python ../yolov5-venv/bin/python

With augmentation on, the two loaders cannot give the same samples: YOLOv5 draws from Python's `random` and
NumPy's global generator, ours from one generator per (seed, epoch, index). So each side samples its own train
loader (`LoadImagesAndLabels(..., augment=True, hyp=hyp)`, the same hyp numbers on both sides: --hyp, by default
hyp/hyp.scratch-low.yaml, whose augmentation values are YOLOv5's scratch-low; YOLOv5 gets exactly the keys of its
own hyp.scratch-low.yaml) and the statistics of the samples are compared. Sample k is image k mod n of the
dataset on both sides (ours at epoch k div n), so both sides put each image first in a mosaic equally often.

Datasets (--datasets): coco128's train split at --img 640, the digits train split (data/make_digits.py, 64 px
canvases, 10 classes) at 64, or any `FOLDER:IMG` of images with YOLO labels beside them.

Statistics, per sample:

  boxes_out        boxes in the sample's targets
  labels_in        labels of the source images that went in (a mosaic's four tiles), counted as they enter
                   random_perspective
  dropped          labels_in - boxes_out
  off_canvas       of those, labels the mosaic cut away: clipped to zero width or height on its 2s canvas
  dropped_by_warp  dropped - off_canvas: what random_perspective's crop and candidate rule (under 2 px, under
                   10% of the area left, aspect over 100) removed from the canvas's labels
  fill_fraction    pixels equal to 114 in all channels (mosaic border, warp fill), before HSV (HSV moves the grey)
  pre_h, pre_s, pre_v   mean OpenCV 8-bit H, S, V of the image before HSV augmentation
  mean_r/g/b, std_r/g/b, h, s, v   of the output image (after HSV and flips), per channel, 0-255
  s_ratio, v_ratio  mean S (V) after HSV over mean S (V) before: the drawn gain, as the image shows it

and per box (pooled over all samples): box_w, box_h, box_area (pixels of the output image), box_aspect (w/h),
box_cx, box_cy (normalised); and the class shares of all boxes.

The numbers before and after HSV, and the label counts, come from one recorder installed in both interpreters:
it wraps the dataloader module's `random_perspective` and `augment_hsv` (both are called through that module's
globals on both sides) and records what goes in and out without drawing any random number. Both sides' per-sample
statistics are computed by this file's `sample_statistics`, which YOLOv5's interpreter loads from this file
(nothing here imports the project at module level, so YOLOv5's `utils` stays YOLOv5's).

Comparison per statistic: both means with standard errors (per sample: sd / sqrt(n); per box: clustered by
sample, since a sample's boxes are not independent draws), ours / YOLOv5's - 1, the difference in standard errors
of the difference, the smallest relative difference this run resolves at 3 standard errors, and the two-sample
Kolmogorov-Smirnov distance D with its p-value (per sample: scipy's ks_2samp; per box: a permutation test that
reassigns whole samples to sides, the only null that respects the clustering; the class shares use a chi-square
statistic permuted the same way). A statistic is flagged when the means differ by more than 5% relative and by
more than 3 standard errors.

YOLOv5's side runs in its own interpreter (--yolov5-python, from the --yolov5 checkout), concurrently with ours, on
a .txt list of the same images in a temporary folder: YOLOv5 then keeps its label cache there (list.cache), and
never reads or writes the `labels/<split>.cache` that our loader keeps beside the labels. Both sides cache the
resized images in RAM (the same samples, without decoding four files for each). YOLOv5 adds Albumentations (blur,
median blur, grey, CLAHE, 1% each) only where that package is installed; the report says whether it was (ours has
none). Without --yolov5, our side's statistics alone. --quick: 48 samples per dataset, to check that everything
runs. Results: docs/training.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FILL_VALUE = 114  # the grey of mosaic borders and warp fill, on both sides
REL_TOLERANCE = 0.05  # the bar: a 5% difference in a mean must show, and is flagged when beyond 3 SE
SIGMAS = 3.0
# Samples per side: enough for 3 standard errors of every mean but off_canvas and fill_fraction to be under 5%
# (those two vary most from sample to sample: at these counts about 4%), in about 7 minutes of two shared cores.
# A digits sample costs a tenth of a coco128 one.
DEFAULT_SAMPLES = dict(coco128=24000, digits=60000, other=8000)

# (name, what it is); the per-sample statistics, in table order
SAMPLE_STATS = (
    ("boxes_out", "boxes in the sample"),
    ("labels_in", "labels of the source images that went in"),
    ("dropped", "labels_in - boxes_out"),
    ("off_canvas", "dropped by the mosaic's 2s canvas"),
    ("dropped_by_warp", "dropped by random_perspective"),
    ("fill_fraction", "pixels equal to 114, before HSV"),
    ("pre_h", "mean H before HSV"), ("pre_s", "mean S before HSV"), ("pre_v", "mean V before HSV"),
    ("mean_r", "output mean R"), ("mean_g", "output mean G"), ("mean_b", "output mean B"),
    ("std_r", "output std R"), ("std_g", "output std G"), ("std_b", "output std B"),
    ("h", "output mean H"), ("s", "output mean S"), ("v", "output mean V"),
    ("s_ratio", "mean S after / before HSV"), ("v_ratio", "mean V after / before HSV"),
)
BOX_STATS = (
    ("box_w", "box width, px"), ("box_h", "box height, px"), ("box_area", "box area, px^2"),
    ("box_aspect", "box w / h"), ("box_cx", "box centre x, normalised"), ("box_cy", "box centre y, normalised"),
)


# ------------------------------------------------------------------------------ statistics (both interpreters)

class Recorder:
    """What one sample's augmentation took in and gave out, from wrappers around a dataloader module's
    `random_perspective` and `augment_hsv`. The wrappers pass every argument through unchanged and draw nothing,
    so the samples are those the module gives without them."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.labels_in = self.off_canvas = self.kept = 0
        self.before_hsv = None  # (fill fraction, mean H, mean S, mean V) of the image augment_hsv received

    def _random_perspective(self, original):
        def wrapper(im, labels, *args, **kwargs):
            pixel = np.asarray(labels, dtype=np.float64).reshape(-1, 5)  # [cls, x1, y1, x2, y2] on both sides
            self.labels_in += len(pixel)
            # a mosaic clips every label to its canvas: one wholly outside it is left with no width or height
            self.off_canvas += int(((pixel[:, 3] <= pixel[:, 1]) | (pixel[:, 4] <= pixel[:, 2])).sum())
            out = original(im, labels, *args, **kwargs)
            self.kept += len(out[1])
            return out
        return wrapper

    def _augment_hsv(self, original):
        def wrapper(im, *args, **kwargs):
            hsv = cv2.mean(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))[:3]
            self.before_hsv = (fill_fraction(im), *hsv)
            return original(im, *args, **kwargs)  # in place, as both modules' callers expect
        return wrapper

    @contextmanager
    def installed(self, module):
        """Wrap module.random_perspective and module.augment_hsv while the block runs."""
        saved = module.random_perspective, module.augment_hsv
        module.random_perspective = self._random_perspective(saved[0])
        module.augment_hsv = self._augment_hsv(saved[1])
        try:
            yield self
        finally:
            module.random_perspective, module.augment_hsv = saved


def fill_fraction(im: np.ndarray) -> float:
    """Share of an HWC uint8 image's pixels equal to the fill grey in all three channels."""
    grey = (FILL_VALUE,) * 3
    return cv2.countNonZero(cv2.inRange(im, grey, grey)) / (im.shape[0] * im.shape[1])


def sample_statistics(img: np.ndarray, targets: np.ndarray, recorder: Recorder) -> tuple[dict, np.ndarray]:
    """One sample's statistics: (per-sample values by name, boxes (n, 5) [cls, cx, cy, w px, h px]).

    img: the sample's uint8 (3, H, W) RGB image; targets (n, 6) [image, cls, cx, cy, w, h] normalised to it;
    recorder: what its augmentation recorded while the sample was made."""
    _, height, width = img.shape
    hwc = cv2.merge(list(np.ascontiguousarray(img)))  # (H, W, 3), as OpenCV wants it; 15x faster than numpy's copy
    mean, std = (x.ravel() for x in cv2.meanStdDev(hwc))  # per channel, sums in float64 (numpy's is 20x slower)
    hsv = cv2.mean(cv2.cvtColor(hwc, cv2.COLOR_RGB2HSV))[:3]
    targets = np.asarray(targets, np.float64).reshape(-1, 6)
    out = dict(boxes_out=len(targets), labels_in=recorder.labels_in, dropped=recorder.labels_in - len(targets),
               off_canvas=recorder.off_canvas, dropped_by_warp=recorder.labels_in - recorder.off_canvas - len(targets),
               mean_r=mean[0], mean_g=mean[1], mean_b=mean[2], std_r=std[0], std_g=std[1], std_b=std[2],
               h=hsv[0], s=hsv[1], v=hsv[2])
    if recorder.before_hsv is not None:
        fill, pre_h, pre_s, pre_v = recorder.before_hsv
        out.update(fill_fraction=fill, pre_h=pre_h, pre_s=pre_s, pre_v=pre_v,
                   s_ratio=hsv[1] / pre_s if pre_s >= 1 else np.nan,  # a near-grey image says nothing of its gain
                   v_ratio=hsv[2] / pre_v if pre_v >= 1 else np.nan)
    boxes = np.stack([targets[:, 1], targets[:, 2], targets[:, 3], targets[:, 4] * width, targets[:, 5] * height], 1)
    return out, boxes


def collect(get_item, count: int, recorder: Recorder, label: str = "") -> dict:
    """Statistics of samples 0..count-1, get_item(k) -> (uint8 (3, H, W) RGB image, (n, 6) targets), as arrays:
    one per SAMPLE_STATS name (NaN where not recorded), and the boxes of all samples with `box_sample`, the
    sample each belongs to."""
    per_sample = {name: np.full(count, np.nan) for name, _ in SAMPLE_STATS}
    boxes, owner = [], []
    start = time.time()
    for k in range(count):
        recorder.reset()
        img, targets = get_item(k)
        values, b = sample_statistics(img, targets, recorder)
        for name, v in values.items():
            per_sample[name][k] = v
        boxes.append(b)
        owner.append(np.full(len(b), k))
        if label and (k + 1) % max(count // 4, 1) == 0:
            print(f"{label}: {k + 1}/{count} samples, {time.time() - start:.0f} s", flush=True)
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 5))
    return dict(per_sample, box_sample=np.concatenate(owner).astype(np.int64) if owner else np.zeros(0, np.int64),
                box_cls=boxes[:, 0].astype(np.int64), box_cx=boxes[:, 1], box_cy=boxes[:, 2], box_w=boxes[:, 3],
                box_h=boxes[:, 4], samples=np.array(count))


# ------------------------------------------------------------------------------------------------ YOLOv5's side

# Inside YOLOv5's interpreter, from its checkout: its train loader on each dataset, this file's recorder and
# statistics, one npz per dataset. Seeded as its train.py's init_seeds seeds `random` and numpy.
YOLOV5_SIDE = """
import importlib.util, json, random, sys
import numpy as np
sys.path.insert(0, '.')
import utils.dataloaders as dataloaders
spec = importlib.util.spec_from_file_location('augmentation_parity_stats', {bench!r})
stats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stats)
config = json.load(open({config!r}))
random.seed(config['seed'])
np.random.seed(config['seed'])
for job in config['jobs']:
    ds = dataloaders.LoadImagesAndLabels(job['list'], job['img'], 16, augment=True, hyp=config['hyp'],
                                         cache_images='ram')
    n = len(ds)
    def get_item(k):
        img, targets, _, _ = ds[k % n]
        return img.numpy(), targets.numpy()
    with stats.Recorder().installed(dataloaders) as recorder:
        got = stats.collect(get_item, job['count'], recorder, label='YOLOv5 ' + job['name'])
    np.savez(job['out'], files=np.array([str(f) for f in ds.im_files]), labels=sum(len(x) for x in ds.labels),
             albumentations=ds.albumentations.transform is not None, **got)
"""


def yolov5_hyp(opt, hyp: dict) -> dict:
    """Our hyp's values under exactly the keys of YOLOv5's own hyp.scratch-low.yaml (YOLOv5 reads no others)."""
    import yaml
    theirs = yaml.safe_load((Path(opt.yolov5) / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    missing = [k for k in theirs if k not in hyp]
    if missing:
        sys.exit(f"augmentation_parity: --hyp lacks YOLOv5's keys {missing}")
    differ = {k: (hyp[k], theirs[k]) for k in theirs if hyp[k] != theirs[k]}
    if differ:
        print(f"note: --hyp differs from YOLOv5's hyp.scratch-low.yaml in {differ} (both sides get --hyp's values)")
    return {k: hyp[k] for k in theirs}


def start_yolov5(opt, hyp: dict, jobs: list[dict], folder: Path) -> subprocess.Popen:
    """YOLOv5's side in the background (the machine's second core), its output in folder/yolov5.log."""
    for job in jobs:
        job["list"] = str(folder / job["name"] / "list.txt")  # a folder of its own per dataset, for list.cache
        Path(job["list"]).parent.mkdir(parents=True, exist_ok=True)
        Path(job["list"]).write_text("".join(f"{f}\n" for f in job.pop("files")))
    config = folder / "yolov5_config.json"
    config.write_text(json.dumps(dict(seed=opt.seed, hyp=yolov5_hyp(opt, hyp), jobs=jobs)))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log = open(folder / "yolov5.log", "w")
    script = YOLOV5_SIDE.format(bench=str(Path(__file__).resolve()), config=str(config))
    return subprocess.Popen([opt.yolov5_python, "-c", script], cwd=opt.yolov5, stdout=log, stderr=subprocess.STDOUT,
                            env=env)


# ------------------------------------------------------------------------------------------------- our side

def _project():
    """Our project's dataloader module (imported here, not at the top: YOLOv5's interpreter loads this file)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from utils import dataloaders
    return dataloaders


def our_statistics(source, img: int, hyp: dict, count: int, seed: int = 0, label: str = "",
                   cache_images="ram") -> dict:
    """Our train loader's statistics over `count` samples (collect's arrays, plus files and labels)."""
    dataloaders = _project()
    ds = dataloaders.LoadImagesAndLabels(str(source), img, 16, augment=True, hyp=hyp, seed=seed,
                                         cache_images=cache_images)

    def get_item(k):
        sample = ds[(k // ds.n, k % ds.n)]
        return sample.img.numpy(), sample.targets.numpy()

    with Recorder().installed(dataloaders) as recorder:
        got = collect(get_item, count, recorder, label=label)
    return dict(got, files=np.array(ds.im_files), labels=np.array(sum(len(x) for x in ds.labels)))


# ----------------------------------------------------------------------------------------------- comparison

def box_values(side: dict, name: str) -> np.ndarray:
    w, h = side["box_w"], side["box_h"]
    if name == "box_area":
        return w * h
    if name == "box_aspect":
        return w / np.maximum(h, 1e-9)
    return side[name]


def sample_mean(x: np.ndarray) -> tuple[float, float, int]:
    """(mean, standard error, n) of the finite values."""
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (float(x.mean()) if len(x) else np.nan), np.nan, len(x)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))), len(x)


def clustered_mean(values: np.ndarray, cluster: np.ndarray, clusters: int) -> tuple[float, float, int]:
    """(mean, standard error, n) of per-box values whose boxes come in clusters (samples): the sandwich
    estimator of a ratio mean, sqrt(C / (C - 1) * sum_i (sum of cluster i's residuals)^2) / N."""
    n = len(values)
    if n == 0 or clusters < 2:
        return np.nan, np.nan, n
    mean = float(values.mean())
    residual = np.bincount(cluster, weights=values - mean, minlength=clusters)
    return mean, float(np.sqrt(clusters / (clusters - 1) * (residual ** 2).sum()) / n), n


def ks_distance_of(sorted_is_a: np.ndarray, tie_ends: np.ndarray) -> float:
    """KS distance of the two empirical CDFs, given which of the pooled, sorted values are side a's."""
    n = len(sorted_is_a)
    na = int(sorted_is_a.sum())
    if na == 0 or na == n:
        return np.nan
    ca = np.cumsum(sorted_is_a)[tie_ends]  # CDFs are compared after each run of tied values only
    cb = np.flatnonzero(tie_ends) + 1 - ca
    return float(np.abs(ca / na - cb / (n - na)).max())


def clustered_ks(a: np.ndarray, a_cluster: np.ndarray, a_clusters: int, b: np.ndarray, b_cluster: np.ndarray,
                 b_clusters: int, permutations: int, rng: np.random.Generator) -> tuple[float, float]:
    """(KS distance, permutation p-value) of per-box values, permuting whole samples between the sides."""
    if not len(a) or not len(b):
        return np.nan, np.nan
    values = np.concatenate([a, b])
    cluster = np.concatenate([a_cluster, b_cluster + a_clusters])
    order = np.argsort(values, kind="stable")
    values, cluster = values[order], cluster[order]
    tie_ends = np.r_[values[1:] != values[:-1], True]
    total = a_clusters + b_clusters
    observed = ks_distance_of(cluster < a_clusters, tie_ends)
    at_least = 0
    for _ in range(permutations):
        side_a = rng.permutation(total) < a_clusters
        at_least += ks_distance_of(side_a[cluster], tie_ends) >= observed - 1e-12
    return observed, (1 + at_least) / (1 + permutations)


def class_counts(side: dict, classes: int) -> np.ndarray:
    """(samples, classes) box counts per class of each sample."""
    samples = int(side["samples"])
    flat = side["box_sample"] * classes + side["box_cls"]
    return np.bincount(flat, minlength=samples * classes).reshape(samples, classes)


def chi_square(table: np.ndarray) -> float:
    """Pearson's chi-square of a 2 x K table of counts (classes with no box on either side left out)."""
    from scipy.stats import chi2_contingency  # here, as ks_2samp: YOLOv5's interpreter loads this file too
    return float(chi2_contingency(table[:, table.sum(0) > 0], correction=False).statistic)


def compare_classes(theirs: dict, ours: dict, permutations: int, rng) -> dict:
    """Class shares of all boxes on each side with clustered standard errors, and a permuted chi-square test."""
    classes = int(max(theirs["box_cls"].max(initial=0), ours["box_cls"].max(initial=0))) + 1
    ct, co = class_counts(theirs, classes), class_counts(ours, classes)
    pooled, split = np.concatenate([ct, co]), len(ct)
    observed = chi_square(np.stack([ct.sum(0), co.sum(0)]))
    at_least = 0
    for _ in range(permutations):
        side_a = rng.permutation(len(pooled)) < split
        at_least += chi_square(np.stack([pooled[side_a].sum(0), pooled[~side_a].sum(0)])) >= observed - 1e-9
    shares = []
    for c in range(classes):
        row = dict(cls=c)
        for key, side, counts in (("yolov5", theirs, ct), ("ours", ours, co)):
            indicator = (side["box_cls"] == c).astype(np.float64)
            row[key], row[key + "_se"], _ = clustered_mean(indicator, side["box_sample"], len(counts))
        shares.append(row | judge(row["yolov5"], row["yolov5_se"], row["ours"], row["ours_se"]))
    return dict(classes=classes, chi2=observed, p=(1 + at_least) / (1 + permutations), shares=shares)


def judge(m_theirs, se_theirs, m_ours, se_ours) -> dict:
    """Relative difference, difference in standard errors, resolution, and the flag (> 5% and > 3 SE)."""
    se = float(np.hypot(se_theirs, se_ours))
    rel = m_ours / m_theirs - 1 if m_theirs else np.nan
    z = (m_ours - m_theirs) / se if se > 0 else (0.0 if m_ours == m_theirs else np.inf)
    resolution = SIGMAS * se / abs(m_theirs) if m_theirs else np.nan
    flag = bool(np.isfinite(rel) and abs(rel) > REL_TOLERANCE and abs(z) > SIGMAS)
    return dict(rel=float(rel), z=float(z), resolution=float(resolution), flag=flag)


def compare(theirs: dict, ours: dict, permutations: int = 500, seed: int = 0) -> dict:
    """Every statistic of two sides' collect() arrays: means, standard errors, KS test and flag."""
    from scipy.stats import ks_2samp
    rng = np.random.default_rng(seed)
    rows = []
    for name, what in SAMPLE_STATS:
        a, b = theirs[name], ours[name]
        row = dict(name=name, what=what, per="sample")
        row["yolov5"], row["yolov5_se"], row["yolov5_n"] = sample_mean(a)
        row["ours"], row["ours_se"], row["ours_n"] = sample_mean(b)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if len(a) and len(b):
            ks = ks_2samp(a, b)
            row["ks_d"], row["ks_p"] = float(ks.statistic), float(ks.pvalue)
        rows.append(row | judge(row["yolov5"], row["yolov5_se"], row["ours"], row["ours_se"]))
    for name, what in BOX_STATS:
        row = dict(name=name, what=what, per="box")
        args = []
        for key, side in (("yolov5", theirs), ("ours", ours)):
            values, samples = box_values(side, name), int(side["samples"])
            row[key], row[key + "_se"], row[key + "_n"] = clustered_mean(values, side["box_sample"], samples)
            args += [values, side["box_sample"], samples]
        row["ks_d"], row["ks_p"] = clustered_ks(*args, permutations=permutations, rng=rng)
        rows.append(row | judge(row["yolov5"], row["yolov5_se"], row["ours"], row["ours_se"]))
    return dict(rows=rows, classes=compare_classes(theirs, ours, permutations, rng))


# ------------------------------------------------------------------------------------------------ reporting

def fmt(x: float) -> str:
    if not np.isfinite(x):
        return "-"
    a = abs(x)
    return f"{x:.3g}" if a < 1 else (f"{x:.4g}" if a < 1e4 else f"{x:.0f}")


def comparison_table(result: dict) -> list[str]:
    lines = ["| statistic | per | YOLOv5 mean (SE) | ours mean (SE) | ours / YOLOv5 - 1 | diff / SE | 3 SE / mean "
             "| KS D | KS p | flag |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        flag = "**> 5%, > 3 SE**" if r["flag"] else ""
        lines.append(f"| {r['name']} | {r['per']} | {fmt(r['yolov5'])} ({fmt(r['yolov5_se'])}) | {fmt(r['ours'])} "
                     f"({fmt(r['ours_se'])}) | {r['rel']:+.2%} | {r['z']:+.1f} | {r['resolution']:.1%} | "
                     f"{fmt(r.get('ks_d', np.nan))} | {fmt(r.get('ks_p', np.nan))} | {flag} |")
    c = result["classes"]
    flagged = [s for s in c["shares"] if s["flag"]]
    worst = max(c["shares"], key=lambda s: abs(s["z"]) if np.isfinite(s["z"]) else 0)
    lines.append(f"| class shares ({c['classes']} classes) | box | chi2 {c['chi2']:.1f} | largest: class "
                 f"{worst['cls']} {fmt(worst['yolov5'])} vs {fmt(worst['ours'])} | {worst['rel']:+.2%} | "
                 f"{worst['z']:+.1f} | - | - | {fmt(c['p'])} | "
                 f"{'**' + str(len(flagged)) + ' classes**' if flagged else ''} |")
    return lines


def our_table(side: dict) -> list[str]:
    lines = ["| statistic | per | ours mean (SE) | 3 SE / mean |", "|---|---|---|---|"]
    samples = int(side["samples"])
    for name, _ in SAMPLE_STATS:
        m, se, _ = sample_mean(side[name])
        lines.append(f"| {name} | sample | {fmt(m)} ({fmt(se)}) | {SIGMAS * se / abs(m) if m else np.nan:.1%} |")
    for name, _ in BOX_STATS:
        m, se, _ = clustered_mean(box_values(side, name), side["box_sample"], samples)
        lines.append(f"| {name} | box | {fmt(m)} ({fmt(se)}) | {SIGMAS * se / abs(m) if m else np.nan:.1%} |")
    return lines


def dataset_root(yaml_name: str) -> Path:
    """A dataset's root as `--data NAME.yaml` finds it (looked up like every dataset, never downloaded)."""
    import yaml
    _project()
    from utils.data_config import find_data_yaml, resolve_dataset_root
    yaml_file = find_data_yaml(yaml_name)
    path = yaml.safe_load(yaml_file.read_text(encoding="utf-8")).get("path")
    return resolve_dataset_root(path, yaml_file, download=None, autodownload=False)


def datasets(opt) -> list[tuple[str, Path, int, int]]:
    """(name, image folder, img size, samples per side) of each --datasets entry."""
    out = []
    for entry in opt.datasets:
        if entry == "coco128":
            folder = Path(opt.coco128) if opt.coco128 else dataset_root("coco128.yaml") / "images" / "train2017"
            out.append((entry, folder, 640, opt.samples or DEFAULT_SAMPLES[entry]))
        elif entry == "digits":
            folder = Path(opt.digits) if opt.digits else dataset_root("digits.yaml") / "images" / "train"
            out.append((entry, folder, 64, opt.samples or DEFAULT_SAMPLES[entry]))
        else:
            folder, _, img = entry.rpartition(":")
            if not folder or not img.isdigit():
                sys.exit(f"augmentation_parity: --datasets {entry!r} is neither coco128, digits nor FOLDER:IMG")
            out.append((Path(folder).name, Path(folder), int(img), opt.samples or DEFAULT_SAMPLES["other"]))
    for name, folder, *_ in out:
        if not folder.is_dir():
            sys.exit(f"augmentation_parity: {name}: no image folder at {folder}")
    return out


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--yolov5", default=None, help="a checkout of the YOLOv5 repository (without it: our side only)")
    p.add_argument("--yolov5-python", default=None, help="python with YOLOv5's requirements installed")
    p.add_argument("--datasets", nargs="+", default=["coco128", "digits"], help="coco128, digits or FOLDER:IMG")
    p.add_argument("--coco128", default=None, help="coco128's train image folder (default: found as coco128.yaml is)")
    p.add_argument("--digits", default=None, help="the digits train image folder (default: found as digits.yaml is)")
    p.add_argument("--hyp", default=str(ROOT / "hyp" / "hyp.scratch-low.yaml"))
    p.add_argument("--samples", type=int, default=None,
                   help="samples per dataset per side (default: coco128 24000, digits 60000, a FOLDER:IMG 8000)")
    p.add_argument("--permutations", type=int, default=500, help="permutations of the per-box KS and class tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="48 samples per dataset, 100 permutations: a check that it runs")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    p.add_argument("--keep", default=None, help="a folder to keep both sides' per-sample npz files in")
    opt = p.parse_args(argv)
    if bool(opt.yolov5) != bool(opt.yolov5_python):
        p.error("--yolov5 and --yolov5-python go together")
    if opt.quick:
        opt.samples, opt.permutations = 48, 100
    return opt


def main(opt) -> int:
    import yaml
    dataloaders = _project()
    from utils.log import set_logging
    set_logging(verbose=False)  # the loaders' scan and cache lines would bury the tables
    hyp = yaml.safe_load(Path(opt.hyp).read_text(encoding="utf-8"))
    sets = datasets(opt)
    results, flagged = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(opt.keep) if opt.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [dict(name=name, img=img, count=count, out=str(folder / f"yolov5_{name}.npz"),
                     files=dataloaders.list_image_files(str(source))) for name, source, img, count in sets]
        yolov5 = start_yolov5(opt, hyp, [dict(j) for j in jobs], folder) if opt.yolov5 else None
        start = time.time()
        ours = {}
        for name, source, img, count in sets:
            ours[name] = our_statistics(source, img, hyp, count, seed=opt.seed, label=f"ours {name}")
            np.savez(folder / f"ours_{name}.npz", **ours[name])
        if yolov5 is not None and yolov5.wait():
            log = (folder / "yolov5.log").read_text(errors="replace")
            sys.exit(f"augmentation_parity: YOLOv5's side failed:\n{log[-3000:]}")
        print(f"sampling took {time.time() - start:.0f} s", flush=True)
        for (name, source, img, count), job in zip(sets, jobs):
            o = ours[name]
            head = (f"\n{name} ({source}), --img {img}: {len(o['files'])} images, {int(o['labels'])} labels; "
                    f"{count} samples per side, ours {len(o['box_cls'])} boxes")
            if yolov5 is None:
                print(head + "\n\n" + "\n".join(our_table(o)))
                results[name] = dict(img=img, samples=count, ours_only=our_table(o))
                continue
            with np.load(job["out"]) as z:
                t = {k: z[k] for k in z.files}
            if list(map(str, t["files"])) != list(map(str, o["files"])) or int(t["labels"]) != int(o["labels"]):
                print(f"note: {name}: YOLOv5 reads {len(t['files'])} images, {int(t['labels'])} labels; ours "
                      f"{len(o['files'])}, {int(o['labels'])} (or in another order)")
            if bool(t["albumentations"]):
                print(f"note: {name}: YOLOv5's side applied Albumentations (installed in its environment); "
                      "ours has no such step")
            result = compare(t, o, permutations=opt.permutations, seed=opt.seed)
            print(head + f", YOLOv5 {len(t['box_cls'])} boxes\n\n" + "\n".join(comparison_table(result)))
            for r in result["rows"]:
                if r["flag"]:
                    flagged.append(f"{name} {r['name']}: {r['rel']:+.1%} ({r['z']:+.1f} SE)")
            for s in result["classes"]["shares"]:
                if s["flag"]:
                    flagged.append(f"{name} class {s['cls']} share: {s['rel']:+.1%} ({s['z']:+.1f} SE)")
            unresolved = [r["name"] for r in result["rows"] if not r["resolution"] < REL_TOLERANCE]
            if unresolved:
                print(f"\nmeans this run cannot resolve to 5% at 3 SE: {', '.join(unresolved)}")
            results[name] = dict(img=img, samples=count, **result)
    if yolov5 is not None:
        print("\nflagged (means > 5% apart and > 3 SE): " + ("; ".join(flagged) if flagged else "none"))
    if opt.out:
        Path(opt.out).write_text(json.dumps(dict(hyp=opt.hyp, seed=opt.seed, datasets=results, flagged=flagged),
                                            indent=1, default=float))
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
