"""Throughput of a whole val.run on coco128: dataloading + pre-processing + inference + NMS + metrics.

    python bench/val_speed.py                              # yolov5n, yolov5s at 320 and 640 (CPU: 32 images)
    python bench/val_speed.py --images 128 --device 0      # the full coco128 on a GPU
    python bench/val_speed.py --weights-dir runs/train/exp/weights   # trained yolov5{n,s}.pt from there
    python bench/val_speed.py --busy-head                  # untrained head forced to propose boxes everywhere
    python bench/val_speed.py --formats channels_last contiguous   # both layouts, alternating, with their ratio

Images per second = images / wall time of the val.run call (median of --repeats runs), which builds its dataloader (label cache
already warm), loads the checkpoint, fuses, evaluates and scores. The per-stage columns are val's own
per-image timings. With several --formats the runs of each configuration alternate between the memory
formats, so machine noise hits them alike, and the last column is the time ratio to the first format.

Untrained weights: the YOLOv5 bias priors make a random-init head score every anchor below the default
--conf-thres 0.001, so NMS and matching get (almost) nothing to do and the figures show the model plus
data pipeline only. A trained model keeps up to --max-det 300 boxes per image; --busy-head (objectness and
class 0 at 0.5 for every anchor) gives NMS its worst case instead. Use trained checkpoints for figures
that represent real use.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import val  # noqa: E402
from models.yolo import Model  # noqa: E402
from utils.checkpoint import half_state_dict, save_checkpoint  # noqa: E402
from utils.data_config import check_dataset  # noqa: E402
from utils.dataloaders import list_image_files  # noqa: E402
from utils.log import LOGGER, set_logging  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402


def random_checkpoint(cfg: str, names: list[str], path: Path, busy_head: bool) -> Path:
    torch.manual_seed(0)
    model = Model(f"{cfg}.yaml", nc=len(names), verbose=False)
    if busy_head:
        detect = model.model[-1]
        with torch.no_grad():
            for conv in detect.m:
                b = conv.bias.view(detect.na, -1)
                b[:, 4], b[:, 5:], b[:, 5] = 0.0, -12.0, 0.0
    sd = half_state_dict(model.state_dict())
    ckpt = dict(format="yolo-ema", version=1, epoch=-1, best_fitness=0.0, model=sd, ema=sd, updates=0,
                optimizer=None, opt={}, hyp={}, yaml=model.yaml, nc=len(names), names=names, date="")  # fmt: skip
    return save_checkpoint(ckpt, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="coco128.yaml")
    p.add_argument("--models", nargs="+", default=["yolov5n", "yolov5s"])
    p.add_argument("--sizes", nargs="+", type=int, default=[320, 640])
    p.add_argument("--images", type=int, default=0, help="first N val images (default: all on CUDA, 32 on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration; the median is reported")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--half", action="store_true", help="FP16 on CUDA")
    p.add_argument("--weights-dir", default="", help="folder with <model>.pt checkpoints to use instead of random init")
    p.add_argument("--busy-head", action="store_true", help="random init biased to propose a box at every anchor")
    p.add_argument("--formats", nargs="+", choices=("channels_last", "contiguous"), default=["channels_last"],
                   help="memory formats of the model and its inputs")
    opt = p.parse_args()
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    set_logging()
    device = select_device(opt.device)
    data = check_dataset(opt.data)
    n_images = opt.images or (10**9 if device.type == "cuda" else 32)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = list_image_files(data["val"])[:n_images]
        (tmp / "val.txt").write_text("\n".join(images) + "\n")
        subset = dict(path=data["path"], train=str(tmp / "val.txt"), val=str(tmp / "val.txt"), names=data["names"])
        (tmp / "data.yaml").write_text(yaml.safe_dump(subset))
        rows = []

        def timed_run(weights, size, fmt=opt.formats[0]):
            LOGGER.setLevel(logging.WARNING)
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # progress bars
                _, _, times = val.run(str(tmp / "data.yaml"), weights=str(weights), batch_size=opt.batch_size,
                                      imgsz=size, device=opt.device, workers=opt.workers, half=opt.half,
                                      project=str(tmp / "runs"), plots=False, memory_format=formats[fmt])  # fmt: skip
            wall = time.perf_counter() - t0
            LOGGER.setLevel(logging.INFO)
            return wall, times

        for i, cfg in enumerate(opt.models):
            if opt.weights_dir:
                weights, kind = Path(opt.weights_dir) / f"{cfg}.pt", "trained"
            else:
                weights = random_checkpoint(cfg, list(data["names"]), tmp / f"{cfg}.pt", opt.busy_head)
                kind = "random init, busy head" if opt.busy_head else "random init"
            if i == 0:  # untimed: builds the label cache, fills the file cache, initialises kernels
                timed_run(weights, min(opt.sizes))
            for size in opt.sizes:
                runs = {fmt: [] for fmt in opt.formats}
                for _ in range(max(opt.repeats, 1)):
                    for fmt in opt.formats:  # alternating
                        runs[fmt].append(timed_run(weights, size, fmt))
                first = None
                for fmt in opt.formats:
                    wall, times = sorted(runs[fmt])[len(runs[fmt]) // 2]  # the median run, whole
                    first = first or wall
                    rows.append((cfg, size, len(images), wall, times, kind, fmt, wall / first))
                    print(f"{cfg} {size} {fmt}: {len(images) / wall:.1f} img/s", file=sys.stderr, flush=True)

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nval.run throughput on {Path(opt.data).stem}, {dev}, batch {opt.batch_size}, "
          f"{'FP16' if opt.half and device.type == 'cuda' else 'FP32'}, conf 0.001, iou 0.6\n")  # fmt: skip
    print("| model | --img | images | weights | format | wall s | images/s | pre-process ms/img | inference ms/img | "
          f"NMS ms/img | time / {opt.formats[0]} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for cfg, size, n, wall, (pre, inf, nms), kind, fmt, ratio in rows:
        print(f"| {cfg} | {size} | {n} | {kind} | {fmt} | {wall:.1f} | {n / wall:.1f} | {pre:.1f} | {inf:.1f} | {nms:.1f} | "
              f"{ratio:.2f} |")


if __name__ == "__main__":
    main()
