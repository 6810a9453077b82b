"""CPU inference time of one model as PyTorch weights, ONNX Runtime and OpenVINO (FP32 and --half), through
utils/inference.py's load_model, the path detect.py, val.py and the hub model share.

    OMP_NUM_THREADS=1 python bench/export_speed.py                    # yolov5n and yolov5s at 320 and 640, batch 1
    OMP_NUM_THREADS=2 python bench/export_speed.py --cfg yolov5n --img 640 --repeats 50

Each backend gets torch.get_num_threads() threads (OMP_NUM_THREADS where set: PyTorch reads it, and load_model
passes the number on to ONNX Runtime's intra-op pool and to OpenVINO's INFERENCE_NUM_THREADS). Untrained weights
(inference time does not depend on the values), exported with export.py at the measured size; each figure is the
median of --repeats timed forward passes after --warmup untimed ones, and the backends take turns pass by pass,
so load from other processes hits them alike. Times are the model's forward only (no letterbox, no NMS).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import export  # noqa: E402
from bench.val_speed import random_checkpoint  # noqa: E402
from utils.inference import load_model  # noqa: E402
from utils.log import set_logging  # noqa: E402


def measure(cfg: str, img: int, repeats: int, warmup: int, folder: Path) -> dict[str, float]:
    """Median ms per forward pass of each backend for one model at img x img, batch 1."""
    weights = random_checkpoint(cfg, [str(i) for i in range(80)], folder / f"{cfg}.pt", busy_head=False)
    export.run(weights=weights, include=("onnx", "openvino"), imgsz=[img])
    half = folder / "half" / f"{cfg}.pt"
    half.parent.mkdir(exist_ok=True)
    half.write_bytes(weights.read_bytes())
    export.run(weights=half, include=("openvino",), imgsz=[img], half=True)
    models = {"PyTorch": load_model(weights), "ONNX Runtime": load_model(weights.with_suffix(".onnx")),
              "OpenVINO": load_model(folder / f"{cfg}_openvino_model"),
              "OpenVINO --half": load_model(half.parent / f"{cfg}_openvino_model")}
    x = torch.rand(1, 3, img, img)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for k in range(warmup + repeats):
            for name, model in models.items():
                t = time.perf_counter()
                model(x)
                if k >= warmup:
                    times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", nargs="+", default=["yolov5n", "yolov5s"])
    p.add_argument("--img", nargs="+", type=int, default=[320, 640])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    opt = p.parse_args(argv)
    set_logging(verbose=False)
    print(f"threads: {torch.get_num_threads()} (torch.get_num_threads()), batch 1, median of {opt.repeats} passes, ms")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in opt.cfg:
            for img in opt.img:
                folder = Path(tmp) / f"{cfg}-{img}"
                folder.mkdir()
                rows.append((cfg, img, measure(cfg, img, opt.repeats, opt.warmup, folder)))
    names = list(rows[0][2])
    print("| model | size | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for cfg, img, res in rows:
        print(f"| {cfg} | {img} | " + " | ".join(f"{res[n]:.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
