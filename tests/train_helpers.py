"""Tiny datasets and models for the training tests: made in a temporary folder, seconds to train."""
import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

# train.py's test hooks: at this global iteration it SIGKILLs itself / sends itself SIGINT (Ctrl-C)
from train import INTERRUPT_HOOK_ENV, KILL_HOOK_ENV, OVERFLOW_HOOK_ENV, ROOT


def make_dataset(root: Path, n: int = 12, size: int = 64, nc: int = 2, seed: int = 0) -> Path:
    """n images of coloured rectangles (class 0 red-ish, class 1 blue-ish) with YOLO labels; returns the yaml."""
    rng = np.random.default_rng(seed)
    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        h, w = size, int(size * rng.choice([1.0, 1.25]))
        img = np.full((h, w, 3), rng.integers(90, 160), np.uint8)
        rows = []
        for _ in range(int(rng.integers(1, 4))):
            cls = int(rng.integers(nc))
            bw, bh = int(rng.integers(w // 6, w // 2)), int(rng.integers(h // 6, h // 2))
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            color = (40, 40, 220) if cls == 0 else (220, 60, 40)  # BGR
            cv2.rectangle(img, (x0, y0), (x0 + bw - 1, y0 + bh - 1), color, -1)
            rows.append(f"{cls} {(x0 + bw / 2) / w:.6f} {(y0 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
        cv2.imwrite(str(images / f"im{k:03d}.jpg"), img)
        (labels / f"im{k:03d}.txt").write_text("\n".join(rows) + "\n")
    data = {"path": str(root), "train": "images/train", "val": "images/train", "names": [f"c{i}" for i in range(nc)]}
    file = root / "data.yaml"
    file.write_text(yaml.safe_dump(data))
    return file


def tiny_model_yaml(root: Path) -> Path:
    """yolov5n's layers at an eighth of yolov5s's width: the real architecture, a fraction of the work."""
    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text())
    cfg["width_multiple"] = 0.125
    file = root / "tiny.yaml"
    file.write_text(yaml.safe_dump(cfg))
    return file


def train_env(**extra) -> dict:
    """Environment for a training subprocess: one intra-op thread (fast and steady on a busy machine)."""
    hooks = (KILL_HOOK_ENV, INTERRUPT_HOOK_ENV, OVERFLOW_HOOK_ENV)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", *hooks)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_train(args: list, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """`python train.py *args` in a subprocess; returns it with stdout+stderr captured as text."""
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, args)]
    return subprocess.run(cmd, env=train_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, cwd=str(ROOT))


def tiny_run_args(data: Path, cfg: Path, project: Path, name: str, epochs: int = 3, *extra) -> list:
    return ["--data", data, "--cfg", cfg, "--img", 64, "--epochs", epochs, "--batch-size", 4, "--workers", 0,
            "--project", project, "--name", name, "--deterministic", "--noplots", *extra]


def in_process_args(args: list) -> list[str]:
    """tiny_run_args for a run in this process: strings, and without --deterministic, which would leave torch's
    global deterministic switch set for the tests that follow."""
    return [str(a) for a in args if a != "--deterministic"]


@contextlib.contextmanager
def one_intra_op_thread():
    """One intra-op thread for a run in this process, as train_env gives the subprocesses; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def walked_optimizer_steps(nb: int, epochs: int, nw: int, nbs: int, batch: int) -> int:
    """Optimizer steps of YOLOv5's accumulation rule, walked iteration by iteration: a step when
    ni - last_step >= accumulate, where accumulate ramps from 1 to nbs/batch over the nw warm-up iterations."""
    last, steps, accumulate = -1, 0, max(round(nbs / batch), 1)
    for ni in range(nb * epochs):
        if ni <= nw:
            accumulate = max(1, int(np.interp(ni, [0, nw], [1, nbs / batch]).round()))
        if ni - last >= accumulate:
            last, steps = ni, steps + 1
    return steps


def refused_run(args: list, folder: Path) -> str:
    """Run train.py and expect a refusal: exit 1, no traceback, one 'train: ...' error line besides the line of
    arguments a run starts with, and nothing under folder changed. Returns the error line."""
    digest = tree_digest(folder)
    out = run_train(args)
    assert out.returncode == 1 and "Traceback" not in out.stdout, out.stdout[-3000:]
    errors = [ln for ln in out.stdout.splitlines() if ln.startswith("train: ") and not ln.startswith("train: weights=")]
    assert len(errors) == 1, out.stdout
    assert tree_digest(folder) == digest
    return errors[0]


def tree_digest(folder: Path) -> dict:
    """{relative path: (size, sha256)} of every file under folder: proof that nothing on disk changed."""
    out = {}
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file():
            out[str(f.relative_to(folder))] = (f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest())
    return out


def results_columns(csv: Path) -> dict[str, list[float]]:
    """results.csv as {column: values per epoch}, without the epoch column."""
    lines = [ln.split(",") for ln in Path(csv).read_text().splitlines()]
    header = [h.strip() for h in lines[0]]
    return {h: [float(row[j]) for row in lines[1:]] for j, h in enumerate(header) if h != "epoch"}


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for a run folder, as {tag: [(step, value), ...]} (purged events excluded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def checkpoint_differences(a: dict, b: dict, ignore=("date", "opt")) -> list[str]:
    """Key paths at which two checkpoints differ: tensors compared bitwise (dtype, shape and values)."""

    def walk(x, y, path):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            same = (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and x.shape == y.shape and torch.equal(x, y))
            return [] if same else [path]
        if isinstance(x, dict) and isinstance(y, dict):
            diffs = [f"{path}.{k} (only in one)" for k in set(x) ^ set(y)]
            for k in x:
                if k in y and not (path == "" and k in ignore):
                    diffs += walk(x[k], y[k], f"{path}.{k}")
            return diffs
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y):
            return [d for i, (u, v) in enumerate(zip(x, y)) for d in walk(u, v, f"{path}[{i}]")]
        return [] if x == y else [f"{path}: {x!r} != {y!r}"]

    return walk(a, b, "")
