"""Anchor search side by side with YOLOv5's kmean_anchors: fitness and recall over seeds, per dataset.

    OMP_NUM_THREADS=1 python bench/autoanchor.py --yolov5 ../yolov5 --yolov5-python ../yolov5-venv/bin/python \
        --digits /tmp/digits --seeds 8

Both searches get the same label sizes (each dataset's shapes and labels, passed to YOLOv5's interpreter as
arrays), the same anchor count (9), threshold (anchor_t 4.0) and generations (1000, as both check_anchors use).
YOLOv5's side seeds `random` and `numpy.random` with the seed, as its train.py's init_seeds does; ours takes it
as `seed`. Both sides' anchors are scored here by one and the same code: fitness is the evolution's objective
(mean best side ratio over labels of at least 2 px that fit, 0 for the rest), recall (BPR) the share of all
labels some anchor fits. Datasets:

  img16     the first 16 coco128 train images at --img 256 (the 16-image recipe)
  coco128   coco128's train split at 640
  digits    the digits train split (data/make_digits.py; --digits names its folder) at 64, its recipe's --img
  thin      synthetic: squares beside long thin boxes of about 1:30 and 30:1, at 640

A row passes when our mean fitness is at least YOLOv5's mean minus one standard deviation (the issue's bar).
YOLOv5 is never a dependency of this project: its side runs in a separate interpreter with its requirements.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.autoanchor import anchor_fit, anchor_fitness, kmean_anchors, label_wh  # noqa: E402
from utils.data_config import DatasetError, find_data_yaml, resolve_dataset_root  # noqa: E402
from utils.dataloaders import LoadImagesAndLabels, list_image_files  # noqa: E402
from utils.log import set_logging  # noqa: E402

N_ANCHORS, THR, GENERATIONS = 9, 4.0, 1000  # what check_anchors runs with on a default model and hyp

# Inside YOLOv5's interpreter, from its checkout: its kmean_anchors on our arrays, one seed after another.
YOLOV5_SEARCH = """
import json, random, sys
import numpy as np
from types import SimpleNamespace
sys.path.insert(0, '.')
from utils.autoanchor import kmean_anchors
d = np.load({arrays!r})
labels = np.split(d['labels'], np.cumsum(d['counts'])[:-1])
ds = SimpleNamespace(shapes=d['shapes'], labels=labels)
for seed in {seeds!r}:
    random.seed(seed)
    np.random.seed(seed)
    k = kmean_anchors(ds, n={n}, img_size={img}, thr={thr}, gen={gen}, verbose=False)
    print('ANCHORS ' + json.dumps(k.tolist()))
"""


def coco128_root() -> Path:
    """coco128's root as `--data coco128.yaml` finds it (looked up like every dataset, never downloaded)."""
    yaml_file = find_data_yaml("coco128.yaml")
    path = yaml.safe_load(yaml_file.read_text(encoding="utf-8")).get("path")
    return resolve_dataset_root(path, yaml_file, download=None, autodownload=False)


def image_dataset(files) -> SimpleNamespace:
    ds = LoadImagesAndLabels(files, 640)  # only shapes and labels are read; the size here does not matter
    return SimpleNamespace(shapes=np.asarray(ds.shapes), labels=list(ds.labels))


def thin_boxes(seed: int = 0, images: int = 60) -> SimpleNamespace:
    """640 x 640 images with 10 labels each: a third squares (12-300 px), a third about 1:30, a third 30:1."""
    rng = np.random.default_rng(seed)
    n = images * 10
    long_side = np.exp(rng.uniform(np.log(150), np.log(600), n))
    aspect = 30 * np.exp(0.15 * rng.standard_normal(n))
    square = np.exp(rng.uniform(np.log(12), np.log(300), n))
    kind = np.arange(n) % 3
    w = np.where(kind == 0, square, np.where(kind == 1, long_side, long_side / aspect))
    h = np.where(kind == 0, square * np.exp(0.1 * rng.standard_normal(n)), np.where(kind == 1, long_side / aspect,
                                                                                      long_side))
    wh = np.column_stack([w, h]) / 640
    rows = np.column_stack([np.zeros(n), np.full((n, 2), 0.5), wh]).astype(np.float32)
    labels = [rows[i:i + 10] for i in range(0, n, 10)]
    return SimpleNamespace(shapes=np.tile([640, 640], (images, 1)), labels=labels)


def datasets(opt) -> list[tuple[str, SimpleNamespace, int]]:
    out = []
    root = coco128_root()
    train = list_image_files(root / "images" / "train2017")
    for name in opt.datasets:
        if name == "img16":
            out.append((name, image_dataset(train[:16]), 256))
        elif name == "coco128":
            out.append((name, image_dataset(train), 640))
        elif name == "digits":
            folder = Path(opt.digits) / "images" / "train"
            if not folder.is_dir():
                sys.exit(f"autoanchor bench: no digits train split at {folder}; make it with "
                         f"python data/make_digits.py --out {opt.digits}")
            out.append((name, image_dataset(folder), 64))
        elif name == "thin":
            out.append((name, thin_boxes(), 640))
    return out


def yolov5_anchors(opt, ds, img: int, folder: Path) -> list[np.ndarray]:
    arrays = folder / "labels.npz"
    labels = [np.asarray(lb, np.float32).reshape(-1, 5) for lb in ds.labels]
    np.savez(arrays, shapes=np.asarray(ds.shapes), labels=np.concatenate(labels), counts=[len(x) for x in labels])
    script = YOLOV5_SEARCH.format(arrays=str(arrays), seeds=list(opt.seeds), n=N_ANCHORS, img=img, thr=THR,
                                  gen=GENERATIONS)
    done = subprocess.run([opt.yolov5_python, "-c", script], cwd=opt.yolov5, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"autoanchor bench: YOLOv5's side failed:\n{done.stderr[-3000:]}")
    return [np.array(json.loads(x[len("ANCHORS "):]), np.float32) for x in done.stdout.splitlines()
            if x.startswith("ANCHORS ")]


def score(k: np.ndarray, ds, img: int) -> tuple[float, float]:
    """(fitness, recall) of pixel anchors k on the dataset's label sizes at img, as both searches see them."""
    wh0 = torch.from_numpy(label_wh(ds, img))
    fitness = anchor_fitness(torch.from_numpy(k), wh0[(wh0 >= 2.0).any(1)], THR)
    return fitness, anchor_fit(torch.from_numpy(k), wh0, THR)[0]


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--yolov5", required=True, help="a checkout of the YOLOv5 repository")
    p.add_argument("--yolov5-python", required=True, help="python with YOLOv5's requirements installed")
    p.add_argument("--digits", default="../shared/datasets/digits", help="the digits dataset folder")
    p.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 on each side")
    p.add_argument("--datasets", nargs="+", default=["img16", "coco128", "digits", "thin"],
                   choices=("img16", "coco128", "digits", "thin"))
    opt = p.parse_args(argv)
    opt.seeds = list(range(opt.seeds))
    return opt


def main(opt) -> int:
    set_logging(verbose=False)  # the searches' own progress lines would bury the table
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sets = datasets(opt)
        except DatasetError as e:
            sys.exit(f"autoanchor bench: {e}")
        for name, ds, img in sets:
            n = sum(len(lb) for lb in ds.labels)
            theirs = [score(k, ds, img) for k in yolov5_anchors(opt, ds, img, Path(tmp))]
            ours = [score(kmean_anchors(ds, n=N_ANCHORS, img_size=img, thr=THR, gen=GENERATIONS, seed=s,
                                        verbose=False), ds, img) for s in opt.seeds]
            t, o = np.array(theirs), np.array(ours)
            ok = o[:, 0].mean() >= t[:, 0].mean() - t[:, 0].std(ddof=1)
            failed += [] if ok else [name]
            rows.append(f"| {name} | {img} | {n} | {t[:, 0].mean():.3f} ({t[:, 0].std(ddof=1):.3f}) "
                        f"{t[:, 0].min():.3f}-{t[:, 0].max():.3f} | {o[:, 0].mean():.3f} ({o[:, 0].std(ddof=1):.3f}) "
                        f"{o[:, 0].min():.3f}-{o[:, 0].max():.3f} | {t[:, 1].mean():.3f} | {o[:, 1].mean():.3f} | "
                        f"{'yes' if ok else 'NO'} |")
            print(rows[-1], flush=True)
    print(f"\nseeds {opt.seeds[0]}-{opt.seeds[-1]} per side; fitness: mean (sd) min-max\n")
    print("| dataset | img | labels | YOLOv5 fitness | ours fitness | YOLOv5 BPR | ours BPR "
          "| ours >= YOLOv5 mean - sd |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
