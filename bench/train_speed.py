"""Training throughput and the EMA's share of it: yolov5n, coco128, --img 320, batch 16.

Runs train.py's step (mosaic dataloader, forward, loss, backward, accumulation to the nominal batch,
clipped optimizer step, EMA update after each step taken) for a few warm-up iterations, then times a few
dozen. Prints a markdown table: images per second end to end, milliseconds per iteration, per optimizer
step and per EMA update, and the share of the training time spent in ema.update.

    python bench/train_speed.py [--iters 24] [--warmup 3] [--device cpu] [--workers 2]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.yolo import Model  # noqa: E402
from train import load_hyp, loss_gains, make_ema, optimizer_step  # noqa: E402
from utils.data_config import check_dataset  # noqa: E402
from utils.dataloaders import create_dataloader  # noqa: E402
from utils.loss import ComputeLoss  # noqa: E402
from utils.optim import build_optimizer, nominal_accumulate, scaled_weight_decay  # noqa: E402
from utils.torch_utils import init_seeds, select_device  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cfg", default="yolov5n.yaml")
    p.add_argument("--data", default="coco128.yaml")
    p.add_argument("--imgsz", "--img", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=24, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--device", default="")
    p.add_argument("--workers", type=int, default=2)
    opt = p.parse_args(argv)

    init_seeds(0)
    device = select_device(opt.device)
    hyp = load_hyp(ROOT / "hyp" / "hyp.scratch-low.yaml")
    data = check_dataset(opt.data)
    model = Model(opt.cfg, nc=data["nc"], verbose=False).to(device)
    model.hyp = loss_gains(hyp, data["nc"], model.model[-1].nl, opt.imgsz, 0.0)
    loader, _ = create_dataloader(data["train"], opt.imgsz, opt.batch_size, 32, hyp=hyp, augment=True,
                                  workers=opt.workers, shuffle=True, seed=0, nc=data["nc"], prefix="bench: ")
    ema = make_ema(model, hyp)
    accumulate = nominal_accumulate(hyp["nbs"], opt.batch_size)  # the post-warm-up accumulation of train.py
    optimizer = build_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"],
                                scaled_weight_decay(hyp["weight_decay"], opt.batch_size, accumulate, hyp["nbs"]))
    compute_loss = ComputeLoss(model, model.hyp)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    model.train()

    total = opt.warmup + opt.iters
    epochs = math.ceil(total / len(loader))
    t_ema = t_step = 0.0
    n_ema = n_step = 0
    it, t_start = 0, None
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for imgs, targets, _, _, _ in loader:
            if it == opt.warmup:
                sync(device)
                t_start = time.perf_counter()
            timed = it >= opt.warmup
            imgs = imgs.to(device, non_blocking=True).float() / 255
            with torch.autocast(device.type, enabled=cuda):
                loss, _ = compute_loss(model(imgs), targets.to(device))
            scaler.scale(loss).backward()
            if (it + 1) % accumulate == 0:
                sync(device)
                t0 = time.perf_counter()
                stepped = optimizer_step(model, optimizer, scaler)
                sync(device)
                t1 = time.perf_counter()
                if stepped:
                    ema.update(model)
                sync(device)
                t2 = time.perf_counter()
                if timed:
                    t_step += t1 - t0
                    n_step += 1
                    t_ema += t2 - t1
                    n_ema += int(stepped)
            it += 1
            if it == total:
                break
        if it == total:
            break
    sync(device)
    elapsed = time.perf_counter() - t_start
    images = opt.iters * opt.batch_size
    r = {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)",
        "images_per_s": images / elapsed,
        "ms_per_iter": 1000 * elapsed / opt.iters,
        "ms_per_opt_step": 1000 * t_step / max(n_step, 1),
        "ms_per_ema_update": 1000 * t_ema / max(n_ema, 1),
        "ema_share": t_ema / elapsed,
        "ema_updates": n_ema,
        "ema_path": ema.path,
    }
    print(f"\nyolov5n training, coco128, --img {opt.imgsz}, batch {opt.batch_size}, accumulate {accumulate} "
          f"(nominal batch {hyp['nbs']}), {opt.iters} timed iterations after {opt.warmup}, {opt.workers} workers\n")
    print("| device | images/s | ms/iteration | ms/optimizer step | ms/EMA update | EMA updates | EMA share of time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {r['device']} | {r['images_per_s']:.1f} | {r['ms_per_iter']:.0f} | {r['ms_per_opt_step']:.2f} | "
          f"{r['ms_per_ema_update']:.2f} ({r['ema_path']}) | {n_ema} | {100 * r['ema_share']:.2f}% |")
    return r


if __name__ == "__main__":
    main()
