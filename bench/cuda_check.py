"""The GPU check: everything the CPU-only CI cannot run, in one command that fits in 8 minutes on one GPU.

    python bench/cuda_check.py [--wheels DIR] [--data coco128.yaml] [--device 0] [--out DIR]

Uses the python and torch already installed (torch 2.11 or newer with CUDA). Of the project's other
requirements it installs only what is missing, and only from wheels in --wheels (pip --no-index), e.g.
pycocotools. Then, timing each:
  1. pytest -m cuda: device strings and the current device, the fp16 step and its overflow skip on CUDA, the
     EMA flat path as one lerp_ kernel (torch.profiler), one synchronisation for the non-finite check, val's
     fp16 autocast leaving the EMA untouched, a short training run;
  2. a 3-epoch coco128 run (yolov5n, --img 320, --amp fp16, --deterministic) left alone, and the same run
     SIGKILLed in epoch 1 and resumed: their last.pt and best.pt must be identical;
  3. val.py --half on that best.pt;
  4. bench/ema.py --device N (yolov5n/s/l update cost against the lerp_ floor).
Prints one summary table (step, result, seconds) and exits non-zero if any step failed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = {"yaml": "pyyaml", "tqdm": "tqdm", "cv2": "opencv-python-headless", "matplotlib": "matplotlib",
          "pycocotools": "pycocotools", "pytest": "pytest", "tensorboard": "tensorboard"}


def install_missing(wheels: str | None) -> list[str]:
    missing = []
    for module, package in NEEDED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        if not wheels:
            raise SystemExit(f"cuda_check: missing {', '.join(missing)}; pass --wheels DIR holding their wheels")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, *missing],
                       check=True)
    return missing


def run(cmd: list, log: Path, env: dict | None = None, timeout: float = 300) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env={**os.environ, **(env or {})}, stdout=f,
                                stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wheels", default=None, help="folder of wheels for packages missing here (pip --no-index)")
    p.add_argument("--data", default="coco128.yaml")
    p.add_argument("--device", default="0")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "runs" / "cuda_check")))
    opt = p.parse_args(argv)
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    installed = install_missing(opt.wheels)

    import torch  # after the installs

    if not torch.cuda.is_available():
        print("cuda_check: no CUDA GPU visible; nothing to check")
        return 1
    sys.path.insert(0, str(ROOT))
    from tests.train_helpers import checkpoint_differences

    rows = []
    py = sys.executable
    rc, s = run([py, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"],
                out / "pytest_cuda.log", timeout=240)
    tail = (out / "pytest_cuda.log").read_text().strip().splitlines()[-1:]
    rows.append(("pytest -m cuda", "ok" if rc == 0 else f"FAILED: {tail}", s))

    common = ["train.py", "--data", opt.data, "--cfg", "yolov5n.yaml", "--weights", "", "--img", 320, "--epochs", 3,
              "--batch-size", 16, "--device", opt.device, "--amp", "fp16", "--deterministic", "--workers", 4,
              "--project", out / "runs", "--exist-ok", "--noplots"]
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    rc_ref, s = run([py, *common, "--name", "ref"], out / "train_ref.log", env)
    rows.append(("train 3 epochs fp16 (coco128, yolov5n, 320)", "ok" if rc_ref == 0 else f"FAILED rc={rc_ref}", s))
    rc_kill, s1 = run([py, *common, "--name", "killed"], out / "train_killed.log",
                      {**env, "YOLO_TEST_KILL_AT_ITER": "12"})  # 8 batches per epoch: in epoch 1
    killed_last = out / "runs" / "killed" / "weights" / "last.pt"
    rc_res, s2 = run([py, "train.py", "--resume", killed_last], out / "train_resumed.log", env)
    verdict = f"FAILED kill rc={rc_kill} resume rc={rc_res}"
    if rc_kill == -9 and rc_res == 0 and rc_ref == 0:
        diffs = []
        for f in ("last.pt", "best.pt"):
            a = torch.load(out / "runs" / "ref" / "weights" / f, weights_only=True)
            b = torch.load(out / "runs" / "killed" / "weights" / f, weights_only=True)
            diffs += checkpoint_differences(a, b)
        verdict = "bit-identical to the run left alone" if not diffs else f"DIFFERS at {diffs[:3]}"
    rows.append(("SIGKILL in epoch 1, --resume", verdict, s1 + s2))

    best = out / "runs" / "ref" / "weights" / "best.pt"
    rc, s = run([py, "val.py", "--weights", best, "--data", opt.data, "--half", "--device", opt.device,
                 "--project", out / "val", "--exist-ok"], out / "val_half.log")
    all_row = [ln for ln in (out / "val_half.log").read_text().splitlines() if ln.strip().startswith("all ")]
    rows.append(("val.py --half on best.pt", (all_row[-1].strip() if all_row else "") if rc == 0 else f"FAILED rc={rc}", s))

    rc, s = run([py, "bench/ema.py", "--device", opt.device], out / "bench_ema.log")
    rows.append(("bench/ema.py", "ok (table in bench_ema.log)" if rc == 0 else f"FAILED rc={rc}", s))

    name = torch.cuda.get_device_name(int(opt.device.split(",")[0]))
    print(f"\nGPU check: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}"
          + (f"; installed {', '.join(installed)}" if installed else ""))
    print("| step | result | s |\n|---|---|---:|")
    for step, result, secs in rows:
        print(f"| {step} | {result} | {secs:.0f} |")
    print((out / "bench_ema.log").read_text()[-2500:])
    shutil.rmtree(out / "runs" / "killed" / "weights", ignore_errors=True)  # keep what comes back small
    return 0 if all(not r[1].startswith(("FAILED", "DIFFERS")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
