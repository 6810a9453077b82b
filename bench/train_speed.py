"""Training-step throughput, channels_last against contiguous (and torch.compile), in one run: yolov5n, coco128,
--img 320, batch 16.

Times train.py's own TrainStep (autocast forward, loss, backward, accumulation to the nominal batch, clipped
optimizer step, EMA update after each step taken) on the same mosaic batches for each memory format,
alternating rounds so that machine noise hits every format alike. The batches are drawn once from the
training loader and kept in memory, so the figures are the step's alone; the loader's own cost per batch is
measured separately (bench/data_speed.py and bench/profile_train.py cover it in depth).

    python bench/train_speed.py [--iters 8] [--rounds 3] [--formats channels_last contiguous] [--amp fp16] [--device 0]
    python bench/train_speed.py --formats channels_last compiled     # train.py --compile: compile time and gain
    python bench/train_speed.py --malloc both                        # glibc's defaults against reuse_freed_memory
    python bench/train_speed.py --formats channels_last --teacher yolov5s.yaml   # the step with a distillation teacher

--malloc reuse (the default) sets the C allocator as train.py does (utils/allocator.py); 'default' leaves glibc's
settings; 'both' runs the step under each in its own process (the setting is process-wide), alternating rounds,
and prints their times, page faults per iteration and ratio.

'compiled' is channels_last with torch.compile (inductor); its first round, which compiles, is reported apart.

--teacher (a checkpoint, 'ema', or a model yaml for an untrained teacher of that architecture: the cost is the same)
times every format twice, without and with the teacher (train.py --teacher: its forward pass under no_grad and the
distillation loss), alternating, and prints the ratio.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.yolo import Model  # noqa: E402
from train import TrainStep, load_hyp, loss_gains, make_ema, make_scaler  # noqa: E402
from utils.allocator import reuse_freed_memory  # noqa: E402
from utils.data_config import check_dataset  # noqa: E402
from utils.dataloaders import create_dataloader  # noqa: E402
from utils.distill import TEACHER_EMA, Distiller, Teacher, load_teacher  # noqa: E402
from utils.loss import ComputeLoss  # noqa: E402
from utils.optim import build_optimizer, nominal_accumulate, scaled_weight_decay  # noqa: E402
from utils.profiling import PhaseTimer  # noqa: E402
from utils.torch_utils import check_amp, init_seeds, select_device  # noqa: E402

FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format, "compiled": torch.channels_last}


def make_teacher(spec: str, hyp: dict, student: torch.nn.Module, names: list[str], device: torch.device,
                 memory_format) -> Teacher:
    """--teacher: 'ema', a checkpoint (loaded as train.py does), or a model yaml built untrained and frozen."""
    if spec == TEACHER_EMA or not spec.endswith((".yaml", ".yml")):
        return load_teacher(spec, hyp, student, names, device, memory_format=memory_format)
    init_seeds(1)
    model = Model(spec, nc=len(names), verbose=False).to(device).to(memory_format=memory_format).eval()
    model.requires_grad_(False)
    return Teacher(spec, model)


def make_step(opt, hyp: dict, nc: int, device: torch.device, memory_format, compiled: bool = False,
              teacher: str = "", names: list[str] | None = None) -> tuple[TrainStep, PhaseTimer]:
    """A fresh model (same seed for every format), its EMA, optimizer and scaler, in train.py's order; with
    `teacher`, the distiller train.py --teacher builds."""
    init_seeds(0)
    model = Model(opt.cfg, nc=nc, verbose=False).to(device)
    model.hyp = loss_gains(hyp, nc, model.model[-1].nl, opt.imgsz, 0.0)
    model.to(memory_format=memory_format)  # before the EMA, as train.py does: the flat buffer keeps the layout
    ema = make_ema(model, hyp)
    accumulate = nominal_accumulate(hyp["nbs"], opt.batch_size)
    optimizer = build_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"],
                                scaled_weight_decay(hyp["weight_decay"], opt.batch_size, accumulate, hyp["nbs"]))
    timer = PhaseTimer(device)
    trained = torch.compile(model) if compiled else model  # after the EMA, as train.py --compile does
    distiller = None
    if teacher:
        distiller = Distiller(make_teacher(teacher, hyp, model, names, device, memory_format), model, ema, hyp)
    step = TrainStep(trained, ComputeLoss(model, model.hyp), optimizer, make_scaler(opt.amp, device, hyp), ema,
                     check_amp(opt.amp, device), timer=timer, memory_format=memory_format, distiller=distiller)
    model.train()
    return step, timer


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cfg", default="yolov5n.yaml")
    p.add_argument("--data", default="coco128.yaml")
    p.add_argument("--imgsz", "--img", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=8, help="timed iterations per format and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median round is reported")
    p.add_argument("--formats", nargs="+", choices=tuple(FORMATS), default=["channels_last", "contiguous"])
    p.add_argument("--amp", choices=("fp16", "bf16", "off"), default=None, help="default: fp16 on CUDA, off on CPU")
    p.add_argument("--device", default="")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--malloc", choices=("reuse", "default", "both"), default="reuse",
                   help="the C allocator's settings: train.py's (reuse), glibc's own (default), or each in turn")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line (for --malloc both)")
    p.add_argument("--teacher", default="", help="also time each format with this distillation teacher: a checkpoint, "
                                                 "'ema', or a model yaml (untrained)")
    opt = p.parse_args(argv)
    if opt.malloc == "both":
        return compare_malloc(opt)
    if opt.malloc == "reuse":
        reuse_freed_memory()

    device = select_device(opt.device)
    opt.amp = opt.amp or ("fp16" if device.type == "cuda" else "off")
    hyp = load_hyp(ROOT / "hyp" / "hyp.scratch-low.yaml")
    data = check_dataset(opt.data)
    loader, _ = create_dataloader(data["train"], opt.imgsz, opt.batch_size, 32, hyp=hyp, augment=True,
                                  workers=opt.workers, shuffle=True, seed=0, nc=data["nc"], prefix="bench: ")
    t0, batches = time.perf_counter(), []
    for batch in loader:  # one epoch's worth at most
        batches.append((batch.imgs.to(device).float() / 255, batch.targets.to(device)))
        if len(batches) == opt.iters:
            break
    data_ms = 1000 * (time.perf_counter() - t0) / len(batches)

    variants = [(name, "") for name in opt.formats] + [(name, opt.teacher) for name in opt.formats if opt.teacher]
    steps = {name + ("+teacher" if teacher else ""): make_step(opt, hyp, data["nc"], device, FORMATS[name],
                                                                compiled=name == "compiled", teacher=teacher,
                                                                names=list(data["names"]))
             for name, teacher in variants}
    accumulate = nominal_accumulate(hyp["nbs"], opt.batch_size)
    ms = {name: [] for name in steps}
    faults = {name: 0 for name in steps}
    ni = 0
    for r in range(opt.rounds + 1):  # the first round warms up (allocator, kernel selection) and is not counted
        for name, (step, timer) in steps.items():
            if r == 1:
                timer.reset()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, faulted = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for imgs, targets in batches:
                step(imgs, targets, ni, accumulate)
                ni += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ms[name].append(1000 * (time.perf_counter() - start) / len(batches))
            if r > 0:
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{Path(opt.cfg).stem} training step, {Path(opt.data).stem}, --img {opt.imgsz}, batch {opt.batch_size}, "
          f"accumulate {accumulate}, --amp {opt.amp}, {where}: median of {opt.rounds} alternating rounds of "
          f"{len(batches)} iterations; the loader took {data_ms:.0f} ms per batch with {opt.workers} workers; "
          f"--malloc {opt.malloc}\n")
    print("| memory format | ms/iteration | images/s | forward | teacher | loss | backward | optimizer | EMA "
          "| page faults/iteration |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    result = {}
    for name, (step, timer) in steps.items():
        per_iter = statistics.median(ms[name][1:])
        n = timer.counts.get("forward", 1)
        phases = [1000 * timer.total(k) / max(timer.counts.get(k, 1), 1)
                  for k in ("forward", "teacher", "loss", "backward", "optimizer", "ema")]
        faults_per_iter = faults[name] / (opt.rounds * len(batches))
        print(f"| {name} | {per_iter:.0f} | {opt.batch_size * 1000 / per_iter:.1f} | "
              + " | ".join(f"{v:.1f}" for v in phases) + f" | {faults_per_iter:.0f} |")
        result[name] = {"ms_per_iter": per_iter, "iterations": n, "ema_path": step.ema.path, "first_round_s":
                        ms[name][0] * len(batches) / 1000, "faults_per_iter": faults_per_iter}
    if {"channels_last", "contiguous"} <= set(result):
        ratio = result["contiguous"]["ms_per_iter"] / result["channels_last"]["ms_per_iter"]
        print(f"\ncontiguous / channels_last time per iteration: {ratio:.2f} "
              f"(EMA path: {result['channels_last']['ema_path']} and {result['contiguous']['ema_path']})")
        result["ratio"] = ratio
    for name in opt.formats:
        if f"{name}+teacher" in result:
            ratio = result[f"{name}+teacher"]["ms_per_iter"] / result[name]["ms_per_iter"]
            print(f"\n{name}: with the teacher {opt.teacher} / without: {ratio:.2f} time per iteration")
            result[f"{name}+teacher"]["ratio"] = ratio
    if "compiled" in result and "channels_last" in result:
        r = result["compiled"]
        saving = result["channels_last"]["ms_per_iter"] - r["ms_per_iter"]
        extra = r["first_round_s"] - result["channels_last"]["first_round_s"]
        print(f"\ntorch.compile: first round {r['first_round_s']:.0f} s (compiling), then {r['ms_per_iter']:.0f} ms per "
              f"iteration against {result['channels_last']['ms_per_iter']:.0f}; pays off after about "
              f"{extra * 1000 / saving:.0f} iterations" if saving > 0 else
              f"\ntorch.compile: first round {r['first_round_s']:.0f} s (compiling), and no faster afterwards")
    if opt.json:
        print(json.dumps(result))
    return result


def compare_malloc(opt: argparse.Namespace) -> dict:
    """--malloc both: the step under glibc's defaults and under reuse_freed_memory, each in its own process
    (channels_last, one timed round per process), alternating which goes first."""
    base = ["--cfg", opt.cfg, "--data", opt.data, "--imgsz", opt.imgsz, "--batch-size", opt.batch_size, "--iters",
            opt.iters, "--device", opt.device, "--workers", opt.workers, *(["--amp", opt.amp] if opt.amp else [])]
    runs = {"default": [], "reuse": []}
    for r in range(opt.rounds):
        for mode in (("default", "reuse") if r % 2 == 0 else ("reuse", "default")):
            cmd = [sys.executable, __file__, *map(str, base), "--malloc", mode, "--rounds", "1",
                   "--formats", "channels_last", "--json"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1])["channels_last"])
            print(f"round {r + 1} --malloc {mode}: {runs[mode][-1]['ms_per_iter']:.0f} ms/iteration, "
                  f"{runs[mode][-1]['faults_per_iter']:.0f} page faults/iteration", flush=True)
    median = {m: statistics.median(x["ms_per_iter"] for x in v) for m, v in runs.items()}
    faults = {m: statistics.median(x["faults_per_iter"] for x in v) for m, v in runs.items()}
    ratios = [d["ms_per_iter"] / u["ms_per_iter"] for d, u in zip(runs["default"], runs["reuse"])]
    print(f"\n| --malloc | ms/iteration (median of {opt.rounds}) | page faults/iteration |\n|---|---:|---:|")
    for m in runs:
        print(f"| {m} | {median[m]:.0f} | {faults[m]:.0f} |")
    print(f"\ndefault / reuse time per iteration, per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"median {statistics.median(ratios):.2f}")
    return {"ms_per_iter": median, "faults_per_iter": faults, "ratios": ratios}


if __name__ == "__main__":
    main()
