"""Both trainers step by step from the same start: YOLOv5's train.py beside ours, iteration by iteration.

    OMP_NUM_THREADS=1 python bench/yolov5_train_parity.py --yolov5 ../yolov5 --yolov5-python ../yolov5-venv/bin/python

The start is made identical: one yolov5n initialisation (YOLOv5's Model, seeded) saved as a YOLOv5 .pt is
`--weights` for both (with `--noautoanchor`, so both keep its anchors); both train on the first 16 coco128
images at --img 256, batch 8, YOLOv5's hyp.no-augmentation.yaml with nbs 8 (one optimizer step per batch; YOLOv5's
train.py hard-codes nbs 64, so its source is run with that one line changed), in file order (each side's
train loader built with shuffle off), one thread, on the CPU, for --epochs (75 epochs = 150 optimizer steps: past
warm-up's 100 iterations and many epoch ends after it).

Each side runs in its own interpreter with the same recorder installed (hooks on the model's training
forward, the loss, clip_grad_norm_, SGD.step and the EMA's update), which writes per iteration: the batch
(sum and sum of squares of the images, the targets), the loss items, the gradient norm before clipping,
each parameter group's lr, momentum and weight decay used by the step, and after the step the weights, the
BatchNorm running statistics and the EMA, each tensor as two fixed gaussian projections (so that
||a - b|| / ||b|| per tensor is estimated without storing every step's weights). The report lists, in the
order a step computes them, the first iteration where each quantity differs beyond its tolerance and by how
much, and where it is first not bit-identical; then the first of all. Tensors are compared as ||a - b|| / ||b||
over the whole model (the tensor that differs most relative to its own norm is named: BatchNorm biases start
at 0, so theirs is the largest share). --contiguous trains our side in YOLOv5's memory layout instead of our
channels_last, to tell the layout's rounding apart from everything else. Results: docs/training.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.data_config import find_data_yaml, resolve_dataset_root  # noqa: E402
from utils.dataloaders import list_image_files  # noqa: E402
from bench.yolov5_checkout import provide_font, train_source_with_nbs  # noqa: E402

# The recorder, run in both interpreters: install(model class, loss class, EMA class, output file).
RECORDER = r'''
import json, zlib
import numpy as np
import torch

_records, _cur, _proj = [], {}, {}


def _projection(key, n):
    key = str(key)
    if (key, n) not in _proj:
        g = np.random.default_rng(zlib.crc32(key.encode())).standard_normal((2, n))
        _proj[key, n] = torch.from_numpy(g)
    return _proj[key, n]


def _fingerprint(state):
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            continue
        x = v.detach().double().reshape(-1).cpu()
        out[str(k)] = (_projection(k, x.numel()) @ x).tolist()
    return out


def install(model_cls, loss_cls, ema_cls, path):
    forward, call, update = model_cls.forward, loss_cls.__call__, ema_cls.update
    clip, sgd_step = torch.nn.utils.clip_grad_norm_, torch.optim.SGD.step

    def rec_forward(self, x, *a, **k):
        global _cur
        if self.training and torch.is_grad_enabled():
            _cur = {}
            _records.append(_cur)
            xd = x.detach().double()
            _cur["images"] = [float(xd.sum()), float((xd * xd).sum()), *x.shape]
        return forward(self, x, *a, **k)

    def rec_call(self, p, targets, *a, **k):
        loss, items = call(self, p, targets, *a, **k)
        if "images" in _cur and "loss" not in _cur:
            t = targets.detach().double()
            _cur["targets"] = [float(t.sum()), float((t * t).sum()), len(t)]
            _cur["predictions"] = _fingerprint({f"level{j}": x for j, x in enumerate(p)})
            _cur["loss"] = [float(v) for v in items.detach().reshape(-1)] + [float(loss.detach().sum())]
        return loss, items

    def rec_clip(params, max_norm, *a, **k):
        params = list(params)
        _cur["weights_before"] = _fingerprint(dict(enumerate(params)))
        _cur["grads"] = _fingerprint({i: q.grad for i, q in enumerate(params) if q.grad is not None})
        norm = clip(params, max_norm, *a, **k)
        _cur["grad_norm"] = [float(norm)]
        return norm

    def rec_step(self, *a, **k):
        _cur["groups"] = [[float(g["lr"]), float(g["momentum"]), float(g["weight_decay"])] for g in self.param_groups]
        return sgd_step(self, *a, **k)

    def rec_update(self, model, *a, **k):
        out = update(self, model, *a, **k)
        sd = model.state_dict()
        _cur["weights"] = _fingerprint({k: v for k, v in sd.items() if "running_" not in k})
        _cur["bn_stats"] = _fingerprint({k: v for k, v in sd.items() if "running_" in k})
        _cur["ema"] = _fingerprint(self.ema.state_dict())
        return out

    model_cls.forward, loss_cls.__call__, ema_cls.update = rec_forward, rec_call, rec_update
    torch.nn.utils.clip_grad_norm_, torch.optim.SGD.step = rec_clip, rec_step
    import atexit
    # iterations only: the forward passes that build a model (its stride probe) compute no loss
    atexit.register(lambda: open(path, "w").write(json.dumps([r for r in _records if "loss" in r])))
'''

# In YOLOv5's interpreter: a seeded yolov5n initialisation, saved as YOLOv5 saves its checkpoints (FP16: both
# sides then start from the same rounded values).
YOLOV5_INIT = """
import sys, torch
sys.path.insert(0, '.')
from models.yolo import Model
from utils.general import init_seeds
init_seeds({seed})
model = Model('models/yolov5n.yaml', ch=3, nc=80)
torch.save(dict(model=model.half(), ema=None, epoch=-1, best_fitness=None, optimizer=None, updates=None), {out!r})
"""

# --float64: both trainers in double precision, so that float32 rounding (which parts two runs of one trainer as
# surely as two trainers) no longer hides whether they compute the same thing. Every `.float()` (the model's, the
# images') gives float64, new tensors default to it, and on our side the modules that name torch.float32 on purpose
# (the loss, the EMA's storage, the model's anchors) see float64 under that name.
FLOAT64 = r'''
import torch, types
torch.set_default_dtype(torch.float64)
torch.Tensor.float = lambda self, memory_format=torch.preserve_format: self.to(torch.float64,
                                                                               memory_format=memory_format)


def float64_torch_for(*modules):
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    proxy.float32 = torch.float64
    for m in modules:
        m.torch = proxy
'''

YOLOV5_TRAIN = """
import os, sys, types
sys.path.insert(0, '.')
exec({recorder!r})
exec({float64!r})
src = {train_src!r}
mod = types.ModuleType('train')
mod.__file__ = os.path.abspath('train.py')
sys.modules['train'] = mod
exec(compile(src, mod.__file__, 'exec'), mod.__dict__)
real = mod.create_dataloader
mod.create_dataloader = lambda *a, **k: real(*a, **dict(k, shuffle=False))
import models.yolo, utils.loss, utils.torch_utils
install(models.yolo.DetectionModel, utils.loss.ComputeLoss, utils.torch_utils.ModelEMA, {out!r})
mod.run(data={data!r}, weights={weights!r}, cfg='', hyp={hyp!r}, imgsz={img}, batch_size={batch}, epochs={epochs},
        noval=True, noplots=True, noautoanchor=True, nosave=True, workers=0, device='cpu', seed={seed},
        project={project!r}, name='yolov5', exist_ok=True)
"""

OURS_TRAIN = """
import sys
sys.path.insert(0, {root!r})
exec({recorder!r})
exec({float64!r})
import torch, train, models.yolo, utils.loss, utils.ema
if {float64_on}:
    float64_torch_for(utils.loss, utils.ema, models.yolo)
if {contiguous}:  # the layout YOLOv5 trains in, instead of ours (channels_last), to tell its rounding apart
    train.MEMORY_FORMAT = torch.contiguous_format
    d = train.TrainStep.__init__.__defaults__
    train.TrainStep.__init__.__defaults__ = d[:-2] + (torch.contiguous_format,) + d[-1:]
real = train.create_dataloader
train.create_dataloader = lambda *a, **k: real(*a, **dict(k, shuffle=False))
install(models.yolo.Model, utils.loss.ComputeLoss, utils.ema.ModelEMA, {out!r})
rc = train.cli(train.parse_opt(['--data', {data!r}, '--weights', {weights!r}, '--hyp', {hyp!r}, '--img', '{img}',
    '--batch-size', '{batch}', '--epochs', '{epochs}', '--noval', '--noplots', '--noautoanchor', '--nosave',
    '--workers', '0', '--device', 'cpu', '--seed', '{seed}', '--project', {project!r}, '--name', 'ours',
    '--exist-ok', '--no-tensorboard']))
sys.exit(rc)
"""

# (quantity, tolerance on the relative difference), in the order one iteration computes them
QUANTITIES = [("images", 1e-7), ("targets", 1e-7), ("weights_before", 1e-4), ("predictions", 1e-5), ("loss", 1e-5),
              ("grads", 1e-4), ("grad_norm", 1e-5), ("groups", 1e-9),
              ("weights", 1e-4), ("bn_stats", 1e-4), ("ema", 1e-4)]


def rel_diff(ours, theirs) -> tuple[float, str]:
    """Relative difference, and where. Tensors (fingerprints): ||a - b|| / ||b|| over the whole set, naming the
    tensor that differs most relative to its own norm (a BatchNorm bias that starts at 0 differs most that way).
    Lists: the largest element-wise relative difference."""
    if isinstance(theirs, dict):
        num = den = worst = 0.0
        where = ""
        for k, b in theirs.items():
            a = ours.get(k)
            if a is None:
                return float("inf"), f"{k} missing on our side"
            d2, n2 = float(np.sum(np.subtract(a, b) ** 2)), float(np.sum(np.square(b)))
            num, den = num + d2, den + n2
            if d2 > 0 and (d2 / max(n2, 1e-24)) ** 0.5 > worst:
                worst, where = (d2 / max(n2, 1e-24)) ** 0.5, k
        return (num / max(den, 1e-24)) ** 0.5, (f"most in {where}: {worst:.2e} of its norm" if where else "")
    a, b = np.asarray(ours, dtype=np.float64).ravel(), np.asarray(theirs, dtype=np.float64).ravel()
    if a.shape != b.shape:
        return float("inf"), f"shapes {a.shape} and {b.shape}"
    if not len(b):
        return 0.0, ""
    d = np.abs(a - b) / np.maximum(np.abs(b), 1e-12)
    i = int(d.argmax())
    return float(d[i]), f"element {i}: ours {a[i]:.8g}, YOLOv5 {b[i]:.8g}"


def compare(ours: list[dict], theirs: list[dict]) -> list[str]:
    lines = [f"iterations recorded: ours {len(ours)}, YOLOv5 {len(theirs)}; optimizer steps: ours "
             f"{sum('weights' in r for r in ours)}, YOLOv5 {sum('weights' in r for r in theirs)}"]
    first = None
    for name, tol in QUANTITIES:
        found, nonzero, worst = None, None, (0.0, -1, "")
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if (name in a) != (name in b):
                found = found or (i, float("inf"), f"recorded on {'our' if name in a else 'YOLOv5s'} side only")
                continue
            if name not in a:
                continue
            d, where = rel_diff(a[name], b[name])
            if d > 0 and nonzero is None:
                nonzero = (i, d)
            if d > worst[0]:
                worst = (d, i, where)
            if d > tol and found is None:
                found = (i, d, where)
        exact = "identical on every iteration" if nonzero is None else \
            f"first not identical at iteration {nonzero[0]} ({nonzero[1]:.1e})"
        if found is None:
            lines.append(f"{name:14s} within {tol:g} on every iteration (largest {worst[0]:.2e}, iteration "
                         f"{worst[1]}); {exact}")
        else:
            lines.append(f"{name:14s} beyond {tol:g} from iteration {found[0]}: {found[1]:.3e} relative ({found[2]}); "
                         f"{exact}")
            if first is None or found[0] < first[0]:
                first = (found[0], name, found[1], found[2])
    lines.append("first difference beyond tolerance: " + ("none" if first is None else
                 f"{first[1]} at iteration {first[0]}, {first[2]:.3e} relative ({first[3]})"))
    return lines


def run(python: str, script: str, cwd: str, what: str, config: Path) -> None:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "YOLOV5_CONFIG_DIR": str(config)}
    done = subprocess.run([python, "-c", script], cwd=cwd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"yolov5_train_parity: {what} failed:\n{(done.stdout + done.stderr)[-4000:]}")


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--yolov5", required=True, help="a checkout of the YOLOv5 repository")
    p.add_argument("--yolov5-python", required=True, help="python with YOLOv5's requirements installed")
    p.add_argument("--epochs", type=int, default=75, help="epochs of 2 batches (75: 150 optimizer steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contiguous", action="store_true", help="our side in YOLOv5's memory layout, not channels_last")
    p.add_argument("--float64", action="store_true",
                   help="both trainers in double precision: what differs then is the rule, not float32 rounding")
    p.add_argument("--rounding-floor", action="store_true",
                   help="also train our side in the other memory layout and print, every 5 iterations, ours vs "
                        "YOLOv5 beside ours vs ours: how fast a rounding-level difference grows in this recipe")
    p.add_argument("--keep", default=None, help="a folder to keep the runs and records in (default: a temporary one)")
    return p.parse_args(argv)


def main(opt) -> int:
    yaml_file = find_data_yaml("coco128.yaml")
    coco = yaml.safe_load(yaml_file.read_text(encoding="utf-8"))
    root = resolve_dataset_root(coco.get("path"), yaml_file, download=None, autodownload=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(opt.keep or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        images = work / "train16.txt"
        images.write_text("\n".join(list_image_files(root / "images" / "train2017")[:16]) + "\n")
        data = work / "coco16.yaml"
        data.write_text(yaml.safe_dump({"path": str(work), "train": str(images), "val": str(images),
                                        "names": coco["names"]}))
        hyp = yaml.safe_load((Path(opt.yolov5) / "data" / "hyps" / "hyp.no-augmentation.yaml").read_text())
        hyp_file = work / "hyp.no-augmentation-nbs8.yaml"
        hyp_file.write_text(yaml.safe_dump({**hyp, "nbs": 8}))
        weights = work / "yolov5n_init.pt"
        config = work / "yolov5_config"
        provide_font(config, opt.yolov5_python)
        run(opt.yolov5_python, YOLOV5_INIT.format(seed=opt.seed, out=str(weights)), opt.yolov5, "YOLOv5's init", config)
        float64 = FLOAT64 if opt.float64 else ""
        common = dict(recorder=RECORDER, float64=float64, data=str(data), weights=str(weights), hyp=str(hyp_file),
                      img=256, batch=8, epochs=opt.epochs, seed=opt.seed, project=str(work / "runs"))
        try:
            train_src = train_source_with_nbs((Path(opt.yolov5) / "train.py").read_text(), 8,
                                              "bench/yolov5_train_parity.py")
        except ValueError as e:
            sys.exit(f"yolov5_train_parity: {e}")
        run(opt.yolov5_python, YOLOV5_TRAIN.format(train_src=train_src, out=str(work / "yolov5.json"), **common),
            opt.yolov5, "YOLOv5's train.py", config)
        run(sys.executable, OURS_TRAIN.format(root=str(ROOT), out=str(work / "ours.json"), contiguous=opt.contiguous,
                                            float64_on=opt.float64, **common), str(ROOT), "our train.py", config)
        ours = json.loads((work / "ours.json").read_text())
        theirs = json.loads((work / "yolov5.json").read_text())
        print("\n".join(compare(ours, theirs)))
        if opt.rounding_floor:
            run(sys.executable, OURS_TRAIN.format(root=str(ROOT), out=str(work / "ours_other_layout.json"),
                                                contiguous=not opt.contiguous, float64_on=opt.float64,
                                                **dict(common, project=str(work / "runs_other_layout"))),
                str(ROOT), "our train.py in the other memory layout", config)
            other = json.loads((work / "ours_other_layout.json").read_text())
            print("\n".join(growth_table(ours, theirs, other)))
    return 0


def growth_table(ours: list[dict], theirs: list[dict], other: list[dict], every: int = 5) -> list[str]:
    """Per iteration, how far ours is from YOLOv5 beside how far ours is from itself in the other memory layout
    (the same rules, rounded differently): if the two grow alike, what parts the trainers is rounding."""
    names = ("loss", "grads", "weights", "ema")
    lines = ["", "iteration | " + " | ".join(f"{n}: ours vs YOLOv5 | {n}: ours vs ours, other layout" for n in names),
             "|".join(["---"] * (1 + 2 * len(names)))]
    for i in range(0, min(len(ours), len(theirs), len(other)), every):
        cells = []
        for n in names:
            cells += [f"{rel_diff(ours[i][n], theirs[i][n])[0]:.1e}", f"{rel_diff(ours[i][n], other[i][n])[0]:.1e}"]
        lines.append(f"{i} | " + " | ".join(cells))
    return lines


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
