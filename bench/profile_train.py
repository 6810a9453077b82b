"""Where the wall time of a real training run goes: runs `train.py ... --profile` and prints its phases.

    python bench/profile_train.py                                   # the 16-image job: yolov5n, --img 256, 30 epochs
    python bench/profile_train.py --images 128 --img 320 --batch-size 16 --epochs 3     # coco128, 3 epochs
    python bench/profile_train.py -- --amp fp16                     # anything after -- goes to train.py

The run is the real command (a subprocess, workers and all); train.py's PhaseTimer charges each phase:
start-up (imports, dataset yaml, label scan/cache/loaders, model build, autoanchor, label plots), per
iteration the data wait (the main process blocked on the loader), forward, loss, backward, optimizer step
and EMA update, per epoch the validation (its loader wait, pre-process, inference, NMS, metrics, loss), the
non-finite check, results.csv/TensorBoard, checkpoint writes, and the final best.pt validation and plots.
The table gives each phase in ms and as a share of the process's wall time measured from outside, so the
interpreter's own start-up shows as the difference.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.data_config import check_dataset  # noqa: E402


def subset_yaml(images: int, folder: Path) -> Path:
    """A dataset yaml training and validating on the first `images` images of coco128 (a list file)."""
    data = check_dataset("coco128.yaml", autodownload=False)
    files = sorted(Path(data["train"]).glob("*.jpg"))[:images]
    (folder / "images.txt").write_text("\n".join(map(str, files)) + "\n")
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(data["names"]))
    yaml_file = folder / f"coco{images}.yaml"
    yaml_file.write_text(f"path: {data['path']}\ntrain: {folder / 'images.txt'}\nval: {folder / 'images.txt'}\n"
                         f"names:\n{names}")
    return yaml_file


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=16, help="first N coco128 images (128: all of coco128)")
    p.add_argument("--img", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cfg", default="yolov5n.yaml")
    opt = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    with tempfile.TemporaryDirectory(prefix="profile_train_") as tmp:
        tmp = Path(tmp)
        data = "coco128.yaml" if opt.images >= 128 else subset_yaml(opt.images, tmp)
        cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--cfg", opt.cfg, "--weights", "",
               "--img", str(opt.img), "--batch-size", str(opt.batch_size), "--epochs", str(opt.epochs),
               "--workers", str(opt.workers), "--project", str(tmp), "--name", "run", "--profile", *extra]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            print(out.stdout[-3000:])
            raise SystemExit(f"train.py failed with exit status {out.returncode}")
        profile = json.loads((tmp / "run" / "profile.json").read_text())

    seconds = dict(profile["seconds"])
    seconds["interpreter start-up (outside train.py)"] = max(wall - profile["wall"], 0.0)
    counts = profile["counts"]
    print(f"\n{opt.cfg}, {opt.images} coco128 images, --img {opt.img}, --batch-size {opt.batch_size}, "
          f"{opt.epochs} epochs, {opt.workers} workers {' '.join(extra)}: {wall:.1f} s wall\n")
    print("| phase | ms | % of wall | times |\n|---|---:|---:|---:|")
    for name, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {1000 * s:.0f} | {100 * s / wall:.1f} | {counts.get(name, 1)} |")
    return {"wall": wall, "seconds": seconds}


if __name__ == "__main__":
    main()
