"""Per-image cost of the data pipeline, this tree against another checkout of the project, in one run.

    python bench/data_speed.py                                  # against ../baseline, coco128, --img 320 and 640
    python bench/data_speed.py --baseline /path/to/checkout --rounds 7 --images 64

Each measurement runs in a fresh process that imports `utils` from one checkout only, single-threaded as a
DataLoader worker is: the training sample (LoadImagesAndLabels with hyp.scratch-low's augmentation:
load_image, mosaic4, random_perspective, augment_hsv, random_flips, to_chw_rgb where it exists, the rest
of __getitem__ such as the labels and, before to_chw_rgb, the CHW/RGB conversion) and collate_fn over
batches of 16, then the validation sample (rect letterbox as val.py builds it: load_image, letterbox, the
rest) and its collate over batches of 32. Collate is measured as a DataLoader worker pays for it: the batch
ends in shared memory (the worker's queue moves it there otherwise).

Times are the CPU time of the measuring thread (time.thread_time), in ms per image: on a shared machine
wall time mostly measures the other processes. Stage times come from wrapping the functions of the
measured checkout's `utils.dataloaders` with timers; "rest" is the sample's time outside them. The two
checkouts alternate over several rounds (the first measured one changes each round); the table gives
each stage's median per checkout and the median of the per-round ratios (baseline / this tree, > 1 is
faster here). Both processes build the same samples ((epoch, index) pairs, seed 0), and a digest of all of
them (images and targets) shows whether the two checkouts produce identical data.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("load_image", "mosaic4", "random_perspective", "augment_hsv", "random_flips", "mixup", "letterbox",
          "to_chw_rgb")
clock = time.thread_time
TRAIN_BATCH, VAL_BATCH = 16, 32


# ---------------------------------------------------------------------------------------- one measurement

def _wrap_stages(dl) -> dict:
    """Replace the pipeline functions that the measured utils.dataloaders calls by timed wrappers."""
    spent = dict.fromkeys(STAGES, 0.0)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += clock() - t0
        return wrapper

    for name in STAGES:
        if name == "load_image":
            dl.LoadImagesAndLabels.load_image = timed(name, dl.LoadImagesAndLabels.load_image)
        elif hasattr(dl, name):
            setattr(dl, name, timed(name, getattr(dl, name)))
    return spent


@contextlib.contextmanager
def _as_worker():
    """Collate as in a DataLoader worker process (torch's default_collate checks get_worker_info)."""
    import torch.utils.data

    real = torch.utils.data.get_worker_info
    torch.utils.data.get_worker_info = lambda: True
    try:
        yield
    finally:
        torch.utils.data.get_worker_info = real


def _measure_split(dl, spent: dict, dataset, n_images: int, batch: int) -> tuple[dict, str]:
    """ms per image of each stage, the rest, the sample total and collate; and a digest of the samples."""
    items = [(0, i % dataset.n) for i in range(n_images)]
    for item in items[:4]:  # first calls, page cache
        dataset[item]
    for k in spent:
        spent[k] = 0.0
    digest, samples, total = hashlib.sha256(), [], 0.0
    for item in items:
        t0 = clock()
        sample = dataset[item]
        total += clock() - t0
        digest.update(sample[0].numpy().tobytes())
        digest.update(sample[1].numpy().tobytes())
        samples.append(sample)
    collate = 0.0
    with _as_worker():
        for b in range(0, len(samples), batch):
            t0 = clock()
            collated = dataset.collate_fn(samples[b:b + batch])
            for tensor in collated[:2]:
                tensor.share_memory_()  # what the worker's queue does; nothing left to do if already there
            collate += clock() - t0
    ms = {k: 1e3 * v / n_images for k, v in spent.items() if v > 0}
    ms["rest"] = 1e3 * total / n_images - sum(ms.values())
    ms["sample"] = 1e3 * total / n_images
    ms["collate"] = 1e3 * collate / n_images
    return ms, digest.hexdigest()


def measure(checkout: Path, data: str, hyp_file: Path, sizes: list[int], n_images: int) -> dict:
    sys.path.insert(0, str(checkout))
    import torch
    import yaml

    from utils import dataloaders as dl
    from utils.data_config import check_dataset

    if not Path(dl.__file__).resolve().is_relative_to(checkout):
        raise RuntimeError(f"imported {dl.__file__}, not the checkout {checkout}")
    torch.set_num_threads(1)  # as in a DataLoader worker
    d = check_dataset(data)
    hyp = yaml.safe_load(hyp_file.read_text())
    spent = _wrap_stages(dl)
    out = {"checkout": str(checkout), "sizes": {}}
    for size in sizes:
        train = dl.LoadImagesAndLabels(d["train"], size, TRAIN_BATCH, augment=True, hyp=hyp, seed=0, nc=d["nc"])
        val = dl.LoadImagesAndLabels(d["val"], size, VAL_BATCH, rect=True, pad=0.5, stride=32, nc=d["nc"])
        t_ms, t_digest = _measure_split(dl, spent, train, n_images, TRAIN_BATCH)
        v_ms, v_digest = _measure_split(dl, spent, val, n_images, VAL_BATCH)
        out["sizes"][str(size)] = {"train": t_ms, "val": v_ms, "digest": {"train": t_digest, "val": v_digest}}
    return out


# ---------------------------------------------------------------------------------------- the comparison

def run_measurement(checkout: Path, opt) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", str(checkout), "--data", opt.data,
           "--hyp", str(opt.hyp), "--images", str(opt.images), "--sizes", *map(str, opt.sizes)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(checkout))
    if r.returncode:
        raise SystemExit(f"measurement of {checkout} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(runs: dict, opt) -> None:
    ours, base = runs["ours"], runs["base"]
    print(f"\nData pipeline, CPU ms per image (median of {opt.rounds} rounds, single-threaded, {opt.images} "
          f"samples per split and size); ratio = baseline / this tree, median of the per-round ratios")
    print(f"this tree: {ROOT}\nbaseline:  {opt.baseline}\n")
    print(f"| --img | split | stage | baseline | this tree | ratio |\n|---:|---|---|---:|---:|---:|")
    for size in map(str, opt.sizes):
        for split in ("train", "val"):
            stages = [s for s in (*STAGES, "rest", "sample", "collate")
                      if any(s in r["sizes"][size][split] for r in (*ours, *base))]
            for stage in stages:
                b = [r["sizes"][size][split].get(stage) for r in base]
                o = [r["sizes"][size][split].get(stage) for r in ours]
                cell = lambda v: f"{statistics.median(v):.3f}" if None not in v else "-"  # noqa: E731
                ratios = [x / y for x, y in zip(b, o) if x is not None and y is not None and y > 1e-6]
                ratio = f"{statistics.median(ratios):.2f}" if len(ratios) == len(b) else "-"
                name = f"**{stage}**" if stage == "sample" else stage
                print(f"| {size} | {split} | {name} | {cell(b)} | {cell(o)} | {ratio} |")
    print()
    for size in map(str, opt.sizes):
        for split in ("train", "val"):
            digests = {r["sizes"][size]["digest"][split] for r in (*ours, *base)}
            print(f"--img {size} {split}: samples {'identical' if len(digests) == 1 else 'DIFFERENT'} "
                  f"in both checkouts and all rounds")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, default=ROOT.parent / "baseline", help="the other checkout")
    p.add_argument("--data", default="coco128.yaml", help="dataset yaml")
    p.add_argument("--hyp", type=Path, default=ROOT / "hyp" / "hyp.scratch-low.yaml",
                   help="augmentation hyperparameters, the same file for both checkouts")
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 640], help="--img values")
    p.add_argument("--images", type=int, default=128, help="samples per split and size")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    p.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one measurement
    opt = p.parse_args(argv)
    opt.hyp = opt.hyp.resolve()
    if opt.measure is not None:
        print(json.dumps(measure(opt.measure.resolve(), opt.data, opt.hyp, opt.sizes, opt.images)))
        return 0
    opt.baseline = opt.baseline.resolve()
    if not (opt.baseline / "utils" / "dataloaders.py").is_file():
        raise SystemExit(f"--baseline {opt.baseline} is not a checkout of this project (no utils/dataloaders.py); "
                         f"make one with: git worktree add {opt.baseline} <commit>")
    runs = {"ours": [], "base": []}
    for r in range(opt.rounds):
        order = [("ours", ROOT), ("base", opt.baseline)]
        for key, checkout in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            runs[key].append(run_measurement(checkout, opt))
            print(f"round {r + 1}/{opt.rounds}: {key:4s} {time.perf_counter() - t0:5.1f} s", flush=True)
    report(runs, opt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
