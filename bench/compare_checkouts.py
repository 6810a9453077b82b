"""This checkout against another (e.g. main as it was before a change), whole commands timed alternately.

    git worktree add ../baseline <commit>                     # the other checkout, beside this one
    python bench/compare_checkouts.py --baseline ../baseline --rounds 3 --weights path/to/best.pt

Jobs, each the same command line in both checkouts (wall time of the whole process, start-up included):
  coco128  train.py: yolov5n from scratch, coco128, --img 320, --batch-size 16, 3 epochs, 2 workers
  img16    train.py: yolov5n from scratch, the first 16 coco128 images, --img 256, --batch-size 8, 30 epochs
  val      val.py: --weights W on coco128, --img 320, --batch-size 16 (W: trained weights; written for the other
           checkout as a version-1 checkpoint, the format it reads)
Rounds alternate which checkout goes first, so drift in the machine's load hits both alike. Prints every
round's seconds and the ratio this/other per round and of the medians (below 1: this checkout is faster).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.profile_train import subset_yaml  # noqa: E402
from utils.checkpoint import finished_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402


def job_commands(job: str, tmp: Path, weights: dict[str, Path]) -> dict[str, list[str]]:
    """The command line of a job, per checkout ('this', 'other'), without the interpreter."""
    if job == "coco128":
        args = ["train.py", "--data", "coco128.yaml", "--cfg", "yolov5n.yaml", "--weights", "", "--img", "320",
                "--batch-size", "16", "--epochs", "3", "--workers", "2"]
    elif job == "img16":
        args = ["train.py", "--data", str(subset_yaml(16, tmp)), "--cfg", "yolov5n.yaml", "--weights", "", "--img",
                "256", "--batch-size", "8", "--epochs", "30", "--workers", "2"]
    elif job == "val":
        return {side: ["val.py", "--weights", str(weights[side]), "--data", "coco128.yaml", "--img", "320",
                       "--batch-size", "16", "--workers", "2", "--project", str(tmp / side), "--exist-ok"]
                for side in ("this", "other")}
    else:
        raise ValueError(job)
    return {side: args + ["--project", str(tmp / side), "--name", job, "--exist-ok"] for side in ("this", "other")}


def as_version_1(weights: Path, out: Path) -> Path:
    """The finished checkpoint's entries with version 1 (what an older checkout reads; nothing else differs)."""
    ckpt = finished_checkpoint(load_checkpoint(weights))
    ckpt["version"] = 1
    return save_checkpoint(ckpt, out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, help="the other checkout's root folder")
    p.add_argument("--jobs", nargs="+", default=["coco128", "img16", "val"], choices=("coco128", "img16", "val"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--weights", default="", help="trained weights for the val job")
    opt = p.parse_args(argv)
    roots = {"this": ROOT, "other": Path(opt.baseline).resolve()}
    if "val" in opt.jobs and not opt.weights:
        raise SystemExit("--weights is needed for the val job")
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    with tempfile.TemporaryDirectory(prefix="compare_") as tmp:
        tmp = Path(tmp)
        weights = {}
        if opt.weights:
            weights = {"this": Path(opt.weights).resolve(), "other": as_version_1(Path(opt.weights), tmp / "v1.pt")}
        seconds = {job: {"this": [], "other": []} for job in opt.jobs}
        for r in range(opt.rounds):
            for job in opt.jobs:
                commands = job_commands(job, tmp, weights)
                for side in (("other", "this") if r % 2 == 0 else ("this", "other")):
                    t0 = time.perf_counter()
                    out = subprocess.run([sys.executable, *commands[side]], cwd=roots[side], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    seconds[job][side].append(time.perf_counter() - t0)
                    if out.returncode != 0:
                        print(out.stdout[-3000:])
                        raise SystemExit(f"{job} failed in {roots[side]} (exit {out.returncode})")
                    print(f"round {r + 1} {job} {side}: {seconds[job][side][-1]:.1f} s", file=sys.stderr, flush=True)

    print(f"\nWall seconds per round, this checkout ({ROOT.name}) and the other ({roots['other'].name}), "
          f"{opt.rounds} alternating rounds, {torch.get_num_threads()} CPU threads\n")
    print("| job | this (s) | other (s) | this / other per round | this / other of the medians |")
    print("|---|---|---|---|---:|")
    for job, s in seconds.items():
        per_round = [a / b for a, b in zip(s["this"], s["other"])]
        print(f"| {job} | {', '.join(f'{x:.1f}' for x in s['this'])} | {', '.join(f'{x:.1f}' for x in s['other'])} | "
              f"{', '.join(f'{x:.2f}' for x in per_round)} | "
              f"{statistics.median(s['this']) / statistics.median(s['other']):.2f} |")


if __name__ == "__main__":
    main()
