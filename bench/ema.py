"""Cost of one EMA update on YOLOv5 models: per-tensor loop vs ModelEMA vs the memory floor.

    python bench/ema.py                      # yolov5n, yolov5s, yolov5l on CPU
    python bench/ema.py --models s --device 0 --reps 200
    python bench/ema.py --models n --posthoc-precision   # + FP16 vs FP32 post-hoc snapshots

For each model, in one run and interleaved (so machine noise hits all three alike), the median milliseconds of:
  (a) the YOLOv5-style update: rebuild both state dicts, then `v *= d; v += (1 - d) * m` per float tensor;
  (b) utils.ema.ModelEMA.update;
  (c) the floor: one lerp_ between two standalone flat FP32 tensors with as many elements as the model's
      floating-point state (12 bytes per element moved: read model, read EMA, write EMA).
  (d) utils.posthoc.PosthocEMA.update with two power EMAs (sigma_rel 0.05, 0.10) on the same flattened model:
      the post-hoc bank's extra cost per optimizer step (no snapshot falls due while timing; writing one
      snapshot of both EMAs is timed apart, it happens posthoc_snapshots times per run).
  (e) utils.bema.BEMA.update (hyp ema_bema) on the same flattened model: its EMA's lerp_ plus the corrected
      output, alpha * (model - theta_0) + EMA, written into ema.ema.
Targets (issue 3): yolov5s (a)/(b) >= 3 and (b)/(c) <= 1.3; yolov5l (b)/(c) <= 1.15; on a GPU GPU_TARGETS. The exit
status is 1 when a target is missed.
What (b) pays above (c) is mostly the per-update check that the model's ~350 tensors still are the flat views
(one address each, read with cold caches: 0.1-0.25 ms); on yolov5n, whose two buffers fit in the L3 cache,
that fixed cost is a large part of a 0.3 ms floor.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.yolo import Model  # noqa: E402
from utils.bema import BEMA  # noqa: E402
from utils.ema import ModelEMA, power_gamma  # noqa: E402
from utils.posthoc import PosthocEMA, ProfileFit, Snapshot  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402

DECAY, TAU = 0.9999, 2000
TARGETS = {"yolov5s": {"a/b": 3.0, "b/c": 1.3}, "yolov5l": {"b/c": 1.15}}
# On a GPU the floor is tens of microseconds (a data-centre GPU moves yolov5s's 84 MB in ~30 us), so (b)'s fixed host
# cost, the per-update address check, is most of it: (b)/(c) is bounded loosely there; the loop's ~700 kernel
# launches make (a)/(b) larger than on the CPU. Not yet measured on a GPU: bounds from that arithmetic.
GPU_TARGETS = {"yolov5s": {"a/b": 3.0, "b/c": 10.0}, "yolov5l": {"b/c": 3.0}}


class LoopEMA:
    """The per-tensor update as YOLOv5 does it, re-expressed here as the baseline."""

    def __init__(self, model: torch.nn.Module):
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = DECAY * (1 - math.exp(-self.updates / TAU))
        model_state = model.state_dict()
        for key, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value *= d
                value += (1 - d) * model_state[key].detach()


def float_elements(model: torch.nn.Module) -> int:
    return sum(v.numel() for v in model.state_dict().values() if v.dtype.is_floating_point)


def measure(name: str, device: torch.device, reps: int, warmup: int, folder: Path) -> dict:
    torch.manual_seed(0)
    model_a = Model(ROOT / "models" / f"{name}.yaml", ch=3, nc=80).to(device)
    with torch.no_grad():  # move the weights away from the EMA's start so the averages have work to do
        for p in model_a.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
    model_b = copy.deepcopy(model_a)
    loop = LoopEMA(model_a)
    ema = ModelEMA(model_b, decay=DECAY, tau=TAU)
    bank = PosthocEMA(model_b, [0.05, 0.10], total_steps=10**9, folder=folder / name)  # nothing falls due
    bema = BEMA(model_b)
    n = float_elements(model_a)
    floor_ema = torch.zeros(n, device=device)
    floor_model = torch.randn(n, device=device)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {
        "a": lambda: loop.update(model_a),
        "b": lambda: ema.update(model_b),
        "c": lambda: floor_ema.lerp_(floor_model, 1e-4),
        "d": lambda: bank.update(model_b),
        "e": lambda: bema.update(model_b),
    }
    times = {k: [] for k in runs}
    order = list(runs)
    for rep in range(warmup + reps):
        for key in order[rep % len(order):] + order[: rep % len(order)]:  # rotate who goes first
            sync()
            t0 = time.perf_counter()
            runs[key]()
            sync()
            if rep >= warmup:
                times[key].append((time.perf_counter() - t0) * 1e3)

    # the two EMAs saw the same models and the same decays: they must agree
    ema_state, loop_state = ema.ema.state_dict(), loop.ema.state_dict()
    max_diff = max((ema_state[k].float() - loop_state[k].float()).abs().max().item() for k in loop_state)
    med = {k: statistics.median(v) for k, v in times.items()}
    writes = []
    for _ in range(3):
        t0 = time.perf_counter()
        bank.written.clear()
        bank.save()
        writes.append((time.perf_counter() - t0) * 1e3)
    return {"name": name, "elements": n, "path": ema.path, "max_diff": max_diff, **med,
            "b/c": med["b"] / med["c"], "a/b": med["a"] / med["b"], "d/b": med["d"] / med["b"],
            "write": statistics.median(writes), "bank_path": bank.emas[0].path, "e/b": med["e"] / med["b"],
            "bema_path": bema.path}


def posthoc_precision(name: str, values: int = 100_000, steps: int = 3200, snapshots: int = 32) -> None:
    """How much FP16 post-hoc snapshots would cost the reconstruction: a random walk from the model's initial
    weights (moving them by about half their size over the run), two power EMAs (0.05, 0.10) in float64,
    snapshots kept in FP32 and FP16, and each fit's RMS error from FP16 snapshots against one FP16 rounding of
    the reconstructed weights."""
    torch.manual_seed(0)
    model = Model(ROOT / "models" / f"{name}.yaml", ch=3, nc=80)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    theta = weights[torch.randperm(weights.numel())[:values]].double()
    step_size = theta.abs().mean() * 0.5 / math.sqrt(steps)
    gammas = {s: power_gamma(s) for s in (0.05, 0.10)}
    emas = {s: theta.clone() for s in gammas}
    taken = []
    for t in range(1, steps + 1):
        theta += torch.randn_like(theta) * step_size
        for s, e in emas.items():
            beta = (1 - 1 / t) ** (gammas[s] + 1)
            e.mul_(beta).add_(theta, alpha=1 - beta)
        if t % (steps // snapshots) == 0:
            taken += [(Snapshot(Path(), s, gammas[s], t, float(t), "steps"), e.float().clone()) for s, e in emas.items()]
    taken.sort(key=lambda x: (x[0].sigma_rel, x[0].step))
    fitter = ProfileFit([s for s, _ in taken])
    print(f"\nPost-hoc snapshots in FP16 instead of FP32 ({name}, {values:,} weights, {steps} steps, 2 x {snapshots} "
          "snapshots)")
    print(f"{'sigma_rel':>10}{'fit error':>11}{'sum|c|':>9}{'FP16 RMS err / weights RMS':>28}{'x one FP16 rounding':>21}")
    for target in (0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.25):
        fit = fitter.fit(target, max_error=None)
        exact = sum(c * x.double() for c, (_, x) in zip(fit.coeffs, taken))
        from_fp16 = sum(c * x.half().double() for c, (_, x) in zip(fit.coeffs, taken))
        one_rounding = (exact.float().half().double() - exact).norm()
        err = (from_fp16 - exact).norm()
        print(f"{target:>10.2f}{fit.error:>11.2%}{np.abs(fit.coeffs).sum():>9.2f}{err / exact.norm():>28.2e}"
              f"{err / one_rounding:>21.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["n", "s", "l"], help="sizes: n s m l x")
    parser.add_argument("--device", default="cpu", help="cpu, 0, cuda:0")
    parser.add_argument("--reps", type=int, default=0, help="timed updates per method (0: by model size)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--posthoc-precision", action="store_true",
                        help="also measure what FP16 post-hoc snapshots would cost the reconstruction")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    default_reps = {"n": 200, "s": 120, "m": 50, "l": 30, "x": 15}
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"EMA update, median ms per update ({where}, torch {torch.__version__}, load average {load})")
    print(f"{'model':<9}{'floats':>12}{'(a) loop':>11}{'(b) ModelEMA':>14}{'(c) floor':>11}{'(b)/(c)':>9}"
          f"{'(a)/(b)':>9}  path  max|a-b|")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.models:
            name = f"yolov5{size}"
            r = measure(name, device, args.reps or default_reps.get(size, 30), args.warmup, Path(folder))
            results.append(r)
            print(f"{name:<9}{r['elements']:>12,}{r['a']:>11.3f}{r['b']:>14.3f}{r['c']:>11.3f}{r['b/c']:>9.2f}"
                  f"{r['a/b']:>9.2f}  {r['path']:<5} {r['max_diff']:.1e}", flush=True)
    print("\nPost-hoc EMA bank (two power EMAs, sigma_rel 0.05 and 0.10), median ms per optimizer step")
    print(f"{'model':<9}{'(b) ModelEMA':>14}{'(d) bank':>10}{'(d)/(b)':>9}{'(d)/(c)':>9}  path   snapshot write ms")
    for r in results:
        print(f"{r['name']:<9}{r['b']:>14.3f}{r['d']:>10.3f}{r['d/b']:>9.2f}{r['d'] / r['c']:>9.2f}  "
              f"{r['bank_path']:<5}  {r['write']:.1f} (both EMAs, FP32; posthoc_snapshots times per run)")
    print("\nBEMA (hyp ema_bema), median ms per optimizer step")
    print(f"{'model':<9}{'(b) ModelEMA':>14}{'(e) BEMA':>10}{'(e)/(b)':>9}{'(e)/(c)':>9}  path")
    for r in results:
        print(f"{r['name']:<9}{r['b']:>14.3f}{r['e']:>10.3f}{r['e/b']:>9.2f}{r['e'] / r['c']:>9.2f}  {r['bema_path']}")
    missed = 0
    targets = GPU_TARGETS if device.type == "cuda" else TARGETS
    for r in results:
        for ratio, bound in targets.get(r["name"], {}).items():
            ok = r[ratio] >= bound if ratio == "a/b" else r[ratio] <= bound
            sign = ">=" if ratio == "a/b" else "<="
            verdict = "met" if ok else "MISSED"
            missed += not ok
            print(f"target {r['name']} ({ratio[0]})/({ratio[2]}) {sign} {bound}: {r[ratio]:.2f} {verdict}")
    if args.posthoc_precision:
        posthoc_precision(f"yolov5{args.models[0]}")
    return 1 if missed else 0  # a missed target is a failed check (bench/cuda_check.py reads the exit status)


if __name__ == "__main__":
    sys.exit(main())
