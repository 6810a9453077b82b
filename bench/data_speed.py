"""Per-image cost of the data pipeline, this tree against another checkout of the project, in one run.

    python bench/data_speed.py                                  # against ../baseline, coco128, --img 320 and 640
    python bench/data_speed.py --baseline /path/to/checkout --rounds 7 --images 64

Two long-lived processes, one per checkout, each importing `utils` from its checkout only and running
single-threaded as a DataLoader worker does, build the same samples ((epoch, index) pairs, seed 0) batch
by batch, taking turns (who goes first alternates), so that both see the same state of a shared machine:
  train  LoadImagesAndLabels with hyp.scratch-low's augmentation: load_image, mosaic4, random_perspective,
         augment_hsv, random_flips, to_chw_rgb where it exists, the rest of __getitem__ (labels, and the
         CHW/RGB conversion where to_chw_rgb does not exist), then collate_fn over the batch of 16;
  val    the rect letterbox that val.py builds: load_image, letterbox, the rest, collate over 32.
Collate is measured as a DataLoader worker pays for it: the batch ends in shared memory (the worker's queue
moves it there otherwise).

Times are CPU time of the measuring thread (time.thread_time) in ms per image: on a shared machine, wall
time mostly measures the other processes. Stage times come from wrapping the functions of the measured
checkout's `utils.dataloaders` with timers; "rest" is the sample's time outside them; page_faults counts
minor page faults per image (fresh memory costs more here than the copies that fill it). The table gives,
per stage, the median over rounds of each checkout's figure and the median of the per-round ratios
(baseline / this tree: above 1 is faster or fewer here). A digest of every sample (image and targets)
tells whether the two checkouts produce identical data.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("load_image", "mosaic4", "random_perspective", "augment_hsv", "random_flips", "mixup", "letterbox",
          "to_chw_rgb")
BATCH = {"train": 16, "val": 32}
clock = time.thread_time


# ---------------------------------------------------------------------------------------- the measuring process

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


def _one_batch(spent: dict, dataset, items: list, digest) -> dict:
    """Seconds of CPU per stage, in the rest of the samples and in collate, for one batch of items."""
    for k in spent:
        spent[k] = 0.0
    samples, total = [], 0.0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for item in items:
        t0 = clock()
        sample = dataset[tuple(item)]
        total += clock() - t0
        digest.update(sample[0].numpy().tobytes())
        digest.update(sample[1].numpy().tobytes())
        samples.append(sample)
    t0 = clock()
    collated = dataset.collate_fn(samples)
    for tensor in collated[:2]:
        tensor.share_memory_()  # what the worker's queue does; nothing left to do if already there
    collate = clock() - t0
    out = {k: v for k, v in spent.items() if v > 0}
    out.update(rest=total - sum(out.values()), sample=total, collate=collate,
               page_faults=1e-3 * (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))  # shown x 1000
    return out


def serve(checkout: Path, data: str, hyp_file: Path, sizes: list[int]) -> None:
    """Answer one JSON request per stdin line: {"size", "split", "items"} -> stage seconds of that batch;
    {"digests": true} -> the digest of all samples built so far, per size and split."""
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
    datasets, digests = {}, {}
    for size in sizes:
        datasets[f"{size} train"] = dl.LoadImagesAndLabels(d["train"], size, BATCH["train"], augment=True, hyp=hyp,
                                                           seed=0, nc=d["nc"])
        datasets[f"{size} val"] = dl.LoadImagesAndLabels(d["val"], size, BATCH["val"], rect=True, pad=0.5, stride=32,
                                                         nc=d["nc"])
    spent = _wrap_stages(dl)
    for key, ds in datasets.items():  # first calls, page cache
        for i in range(4):
            ds[(0, i)]
        digests[key] = hashlib.sha256()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("digests"):
            print(json.dumps({k: v.hexdigest() for k, v in digests.items()}), flush=True)
            continue
        key = f"{request['size']} {request['split']}"
        print(json.dumps(_one_batch(spent, datasets[key], request["items"], digests[key])), flush=True)


# ---------------------------------------------------------------------------------------- the comparison

class Measurer:
    """A serving process for one checkout."""

    def __init__(self, checkout: Path, opt):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", str(checkout), "--data", opt.data,
               "--hyp", str(opt.hyp), "--sizes", *map(str, opt.sizes)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.checkout = checkout
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(checkout), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.ask(None)  # wait until ready

    def ask(self, request):
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the measuring process of {self.checkout} ended (exit status {self.proc.wait()})")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def compare(opt) -> tuple[dict, dict]:
    """({(size, split): {"ours"/"base": [per-round {stage: ms per image}]}}, {"ours"/"base": digests})."""
    measurers = {"ours": Measurer(ROOT, opt), "base": Measurer(opt.baseline, opt)}
    results = {}
    try:
        for r in range(opt.rounds):
            t0 = time.perf_counter()
            for size in opt.sizes:
                for split, batch in BATCH.items():
                    sums = {"ours": {}, "base": {}}
                    items = [(r, i) for i in range(opt.images)]  # another epoch each round: other samples
                    for b, start in enumerate(range(0, len(items), batch)):
                        order = ["ours", "base"] if (b + r) % 2 == 0 else ["base", "ours"]
                        for key in order:
                            req = {"size": size, "split": split, "items": items[start:start + batch]}
                            for stage, sec in measurers[key].ask(req).items():
                                sums[key][stage] = sums[key].get(stage, 0.0) + sec
                    for key, s in sums.items():
                        results.setdefault((size, split), {"ours": [], "base": []})[key].append(
                            {stage: 1e3 * sec / len(items) for stage, sec in s.items()})
            print(f"round {r + 1}/{opt.rounds}: {time.perf_counter() - t0:.1f} s", flush=True)
        digests = {key: m.ask({"digests": True}) for key, m in measurers.items()}
    finally:
        for m in measurers.values():
            m.close()
    return results, digests


def report(results: dict, digests: dict, opt) -> None:
    print(f"\nData pipeline, CPU ms per image: median of {opt.rounds} rounds of {opt.images} samples per split and "
          f"size, single-threaded; ratio = baseline / this tree, median of the per-round ratios")
    print(f"this tree: {ROOT}\nbaseline:  {opt.baseline}\n")
    print("| --img | split | stage | baseline | this tree | ratio |\n|---:|---|---|---:|---:|---:|")
    for (size, split), runs in results.items():
        stages = [s for s in (*STAGES, "rest", "sample", "collate", "page_faults")
                  if any(s in r for r in runs["ours"] + runs["base"])]
        for stage in stages:
            b = [r.get(stage) for r in runs["base"]]
            o = [r.get(stage) for r in runs["ours"]]
            cell = lambda v: f"{statistics.median(v):.3f}" if None not in v else "-"  # noqa: E731
            ratios = [x / y for x, y in zip(b, o) if x is not None and y is not None and y > 1e-6]
            ratio = f"{statistics.median(ratios):.2f}" if len(ratios) == len(b) else "-"
            name = f"**{stage}**" if stage in ("sample", "collate") else stage
            print(f"| {size} | {split} | {name} | {cell(b)} | {cell(o)} | {ratio} |")
    print()
    for key in digests["ours"]:
        same = digests["ours"][key] == digests["base"][key]
        print(f"--img {key}: samples {'identical' if same else 'DIFFERENT'} in both checkouts")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, default=ROOT.parent / "baseline", help="the other checkout")
    p.add_argument("--data", default="coco128.yaml", help="dataset yaml")
    p.add_argument("--hyp", type=Path, default=ROOT / "hyp" / "hyp.scratch-low.yaml",
                   help="augmentation hyperparameters, the same file for both checkouts")
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 640], help="--img values")
    p.add_argument("--images", type=int, default=128, help="samples per split, size and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds (each takes another epoch's samples)")
    p.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)  # internal: a measuring process
    opt = p.parse_args(argv)
    opt.hyp = opt.hyp.resolve()
    if opt.serve is not None:
        serve(opt.serve.resolve(), opt.data, opt.hyp, opt.sizes)
        return 0
    opt.baseline = opt.baseline.resolve()
    if not (opt.baseline / "utils" / "dataloaders.py").is_file():
        raise SystemExit(f"--baseline {opt.baseline} is not a checkout of this project (no utils/dataloaders.py); "
                         f"make one with: git worktree add {opt.baseline} <commit>")
    report(*compare(opt), opt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
