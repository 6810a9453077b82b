"""Train a YOLOv5-style detector on a detection dataset.

Usage:
    python train.py --data coco128.yaml --cfg yolov5n.yaml --weights '' --img 640 --epochs 100
    python train.py --resume                      # continue the latest run, bit-exact where it stopped
    python train.py --resume runs/train/exp/weights/last.pt --epochs 300   # extend a run
    torchrun --nproc_per_node 2 train.py --data coco128.yaml --cfg yolov5n.yaml --device cpu

A run, top to bottom: options -> set-up (seeds, device, processes, data, model, EMA, optimizer, schedule,
resume state) -> epochs (warm-up, AMP forward/backward, gradient accumulation, optimizer step, EMA update
after each step actually taken) -> epoch end (validation of the EMA, results.csv, best.pt, early stopping,
last.pt) -> finish (resume state stripped, best.pt validated, plots).

Checkpoints (utils/checkpoint.py format) carry, while a run is unfinished, a `resume` entry with the FP32
model and EMA, GradScaler, scheduler and RNG states, so a run killed at any instant and resumed ends
bit-identical to the same run left alone (given --deterministic and the same hardware).

Test hook: the environment variable YOLO_TEST_KILL_AT_ITER=N makes the process SIGKILL itself at the
start of global training iteration N (the tests use it to interrupt a run mid-epoch).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import val as validate  # noqa: E402
from models.yolo import Model, check_img_size  # noqa: E402
from utils.autoanchor import check_anchors  # noqa: E402
from utils.checkpoint import (CheckpointError, half_state_dict, load_checkpoint, model_from_checkpoint,  # noqa: E402
                              save_checkpoint, strip_resume_state)
from utils.data_config import DatasetError, check_dataset  # noqa: E402
from utils.dataloaders import create_dataloader  # noqa: E402
from utils.early_stopping import EarlyStopping  # noqa: E402
from utils.ema import ModelEMA  # noqa: E402
from utils.log import LOGGER, set_logging  # noqa: E402
from utils.paths import increment_path  # noqa: E402
from utils.loss import ComputeLoss  # noqa: E402
from utils.metrics import fitness  # noqa: E402
from utils.optim import (OPTIMIZERS, apply_warmup, build_optimizer, build_scheduler, nominal_accumulate,  # noqa: E402
                         planned_optimizer_steps, scaled_weight_decay, warmup_accumulate, warmup_iterations)
from utils.plots import plot_images, plot_labels, plot_results  # noqa: E402
from utils.rng import capture_rng_state, restore_rng_state  # noqa: E402
from utils.torch_utils import de_parallel, init_seeds, model_info, non_finite_tensors, select_device  # noqa: E402

HYP_KEYS = ("lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr",
            "box", "cls", "cls_pw", "obj", "obj_pw", "iou_t", "anchor_t", "fl_gamma", "hsv_h", "hsv_s",
            "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud", "fliplr", "mosaic",
            "mixup", "copy_paste")
# What YOLOv5's own hyp files lack, so that they work here unchanged: the nominal batch YOLOv5 hard-codes
# and the settings of its ModelEMA.
HYP_DEFAULTS = {"nbs": 64, "ema_decay": 0.9999, "ema_tau": 2000, "ema_schedule": "ramp", "ema_update_every": 1}
DEFAULT_EPOCHS, DEFAULT_WORKERS = 100, 8
DEFAULT_CFG = "yolov5s.yaml"  # the model when neither --cfg nor --weights is given (YOLOv5 starts from yolov5s)
MAX_GRAD_NORM = 10.0
METRIC_COLUMNS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
                  "val/box_loss", "val/obj_loss", "val/cls_loss")
RAW_COLUMNS = ("raw/precision", "raw/recall", "raw/mAP_0.5", "raw/mAP_0.5:0.95")
EMA_ATTRS = ("yaml", "nc", "hyp", "names", "stride", "class_weights")
KILL_HOOK_ENV = "YOLO_TEST_KILL_AT_ITER"
DDP_TIMEOUT = timedelta(hours=3)


class TrainError(Exception):
    """A run that cannot start or resume; the message is one line for the user."""


@dataclass(frozen=True)
class Processes:
    """Where this process stands in a (possibly single-process) run, from torchrun's environment."""
    rank: int = -1  # -1: not distributed
    local_rank: int = -1
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank in (-1, 0)

    @property
    def distributed(self) -> bool:
        return self.rank != -1

    @classmethod
    def from_env(cls) -> "Processes":
        return cls(int(os.getenv("RANK", -1)), int(os.getenv("LOCAL_RANK", -1)), int(os.getenv("WORLD_SIZE", 1)))


# ------------------------------------------------------------------------------------------------ options
def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=str, default="", help="initial weights (our checkpoint or a YOLOv5 .pt); '' for scratch")
    p.add_argument("--cfg", type=str, default="", help=f"model yaml, e.g. yolov5n.yaml (default {DEFAULT_CFG} without --weights)")
    p.add_argument("--data", type=str, default="coco128.yaml", help="dataset yaml")
    p.add_argument("--hyp", type=str, default=str(ROOT / "hyp" / "hyp.scratch-low.yaml"), help="hyperparameter yaml")
    p.add_argument("--epochs", type=int, default=None, help=f"total training epochs (default {DEFAULT_EPOCHS})")
    p.add_argument("--batch-size", type=int, default=16, help="total batch size over all processes")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train and val image size (pixels)")
    p.add_argument("--rect", action="store_true", help="rectangular training batches")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="resume the latest run, or the given last.pt")
    p.add_argument("--nosave", action="store_true", help="only save the final checkpoint")
    p.add_argument("--noval", action="store_true", help="only validate after the final epoch")
    p.add_argument("--noautoanchor", action="store_true", help="keep the model's anchors")
    p.add_argument("--noplots", action="store_true", help="save no plot files")
    p.add_argument("--cache", type=str, nargs="?", const="ram", choices=("ram", "disk"), help="cache images in ram or on disk")
    p.add_argument("--device", type=str, default=None, help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    p.add_argument("--multi-scale", action="store_true", help="vary the image size by +/- 50%% per batch")
    p.add_argument("--single-cls", action="store_true", help="train every class as one class")
    p.add_argument("--optimizer", type=str, choices=OPTIMIZERS, default="SGD", help="optimizer")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (DDP only)")
    p.add_argument("--workers", type=int, default=None, help=f"dataloader workers per process (default {DEFAULT_WORKERS})")
    p.add_argument("--project", default=str(ROOT / "runs" / "train"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="reuse an existing project/name folder")
    p.add_argument("--cos-lr", action="store_true", help="cosine lr schedule instead of linear")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing epsilon")
    p.add_argument("--patience", type=int, default=100, help="early stopping patience in epochs (0 disables)")
    p.add_argument("--freeze", nargs="+", type=int, default=[0], help="freeze layers: first N (one number) or the listed indices")
    p.add_argument("--save-period", type=int, default=-1, help="also save weights/epochN.pt every N epochs (<1 off)")
    p.add_argument("--seed", type=int, default=0, help="global training seed")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (needed for bit-exact resume)")
    p.add_argument("--val-raw", action="store_true", help="also validate the raw (non-EMA) model each epoch")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU or CUDA; no GradScaler)")
    p.add_argument("--local-rank", "--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_hyp(hyp: str | Path | dict) -> dict:
    """The hyperparameter dict from a yaml path (or a dict): every key training uses, HYP_DEFAULTS filling in
    the ones a YOLOv5 hyp file does not have."""
    if isinstance(hyp, dict):
        d, where = dict(hyp), "hyp dict"
    else:
        path = Path(hyp)
        if not path.is_file() and (ROOT / "hyp" / path.name).is_file():
            path = ROOT / "hyp" / path.name
        if not path.is_file():
            raise TrainError(f"hyperparameter file {hyp} not found")
        d, where = yaml.safe_load(path.read_text(encoding="utf-8")) or {}, str(path)
        if not isinstance(d, dict):
            raise TrainError(f"{where} does not hold a mapping of hyperparameters")
    missing = [k for k in HYP_KEYS if k not in d]
    if missing:
        raise TrainError(f"{where}: missing hyperparameter{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    defaulted = {k: v for k, v in HYP_DEFAULTS.items() if k not in d}
    if defaulted:
        LOGGER.info(f"{where}: using the defaults " + ", ".join(f"{k}={v}" for k, v in defaulted.items()))
    return {**d, **defaulted}


# ------------------------------------------------------------------------------------------------ resume
def find_latest_checkpoint(search_dir: Path) -> Path:
    runs = sorted(Path(search_dir).glob("**/last.pt"), key=lambda f: f.stat().st_mtime)
    if not runs:
        raise TrainError(f"--resume: no last.pt found under {search_dir}; pass --resume path/to/last.pt")
    return runs[-1]


def prepare_resume(opt: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """The run's saved options (with a larger --epochs, --workers and --device taken from the command line)
    and its checkpoint; refuses, with one line and without touching the disk, what cannot be resumed."""
    path = Path(opt.resume) if isinstance(opt.resume, str) else find_latest_checkpoint(Path(opt.project))
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise TrainError(f"--resume: {e}") from None
    saved = ckpt.get("opt")
    if not isinstance(saved, dict) or not {"data", "epochs", "imgsz", "batch_size"} <= set(saved):
        raise TrainError(f"--resume: {path} is not a training checkpoint of this project (it holds no run options)")
    if "train_state" not in ckpt:
        raise TrainError(f"--resume: {path} was not written by this project's train.py (an imported YOLOv5 file?); "
                         f"start a new run from it with --weights {path}")
    finished = "resume" not in ckpt
    done, planned = int(ckpt["epoch"]) + 1, int(saved["epochs"])
    if opt.epochs is not None and opt.epochs != planned:
        if opt.epochs <= done or opt.epochs < planned:
            raise TrainError(f"--resume: --epochs {opt.epochs} cannot shorten a run of {planned} epochs "
                             f"({done} done); pass a larger --epochs to extend it")
        LOGGER.info(f"Extending {path} from {planned} to {opt.epochs} epochs")
    elif finished:
        what = f"finished all {planned} epochs" if done == planned else f"stopped early after {done} of {planned} epochs"
        raise TrainError(f"--resume: {path} {what}; pass --epochs larger than {planned} to train it further")
    try:
        data = check_dataset(saved["data"], autodownload=False)
    except DatasetError as e:
        raise TrainError(f"--resume: the run's data is not available: {e}") from None

    new = argparse.Namespace(**{**vars(parse_opt([])), **saved})
    new.resume, new.epochs = str(path), opt.epochs or planned
    new.workers = opt.workers if opt.workers is not None else saved.get("workers", DEFAULT_WORKERS)
    new.device = opt.device if opt.device is not None else saved.get("device", "")
    new.save_dir = str(path.resolve().parent.parent)
    new.data = data.get("yaml_file") or saved["data"]
    return new, ckpt


# ------------------------------------------------------------------------------------------------ set-up
def setup_processes(opt: argparse.Namespace, procs: Processes) -> torch.device:
    """The device of this process; under torchrun also the process group (gloo on CPU, NCCL on CUDA)."""
    try:
        device = select_device(opt.device, batch_size=opt.batch_size)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if procs.distributed:
        if opt.batch_size % procs.world_size:
            raise TrainError(f"--batch-size {opt.batch_size} must be a multiple of WORLD_SIZE {procs.world_size}")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # The other ranks wait in a collective while rank 0 validates and saves; NCCL's default 10-minute
        # timeout would kill the run on a large validation set.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DDP_TIMEOUT)
    return device


def broadcast(value, procs: Processes):
    """Rank 0's value on every process (the value itself when not distributed)."""
    if not procs.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_process_first(procs: Processes):
    """Let rank 0 do something first (e.g. build the label cache), then the others."""
    if procs.distributed and not procs.main:
        dist.barrier()
    yield
    if procs.distributed and procs.main:
        dist.barrier()


def build_model(opt: argparse.Namespace, hyp: dict, nc: int, resume_ckpt: dict | None, device: torch.device
                ) -> tuple[Model, dict | None]:
    """The model in FP32 on device: the resumed run's exact weights, pretrained weights, or from scratch.
    Returns the model and, for --weights, the loaded checkpoint."""
    if resume_ckpt is not None:
        model = Model(resume_ckpt["yaml"], ch=3, nc=nc, verbose=False)
        resume = resume_ckpt.get("resume")
        if resume is not None:
            weights = resume["model"]  # FP32: continues bit-exact
        else:
            LOGGER.warning("Continuing a finished run from its FP16 weights: training goes on, "
                           "but not bit-identical to a run that had never stopped")
            weights = {k: v.float() if v.is_floating_point() else v for k, v in resume_ckpt["model"].items()}
        model.load_state_dict(weights, strict=True)
        return model.to(device), None
    if opt.weights:
        try:
            ckpt = load_checkpoint(opt.weights)
        except CheckpointError as e:
            raise TrainError(f"--weights: {e}") from None
        model = Model(opt.cfg or ckpt["yaml"], ch=3, nc=nc, anchors=hyp.get("anchors"), verbose=False)
        source = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
        # The anchors of a given --cfg (or hyp) win over the checkpoint's; autoanchor may replace them later.
        exclude = ("anchors",) if (opt.cfg or hyp.get("anchors")) else ()
        own = model.state_dict()
        matched = {k: v.float() if v.is_floating_point() else v for k, v in source.items()
                   if k in own and v.shape == own[k].shape and not any(x in k for x in exclude)}
        model.load_state_dict(matched, strict=False)
        LOGGER.info(f"Transferred {len(matched)}/{len(own)} items from {opt.weights}")
        return model.to(device), ckpt
    if not opt.cfg:
        opt.cfg = DEFAULT_CFG
        LOGGER.info(f"No --cfg or --weights given: training {DEFAULT_CFG} from scratch")
    return Model(opt.cfg, ch=3, nc=nc, anchors=hyp.get("anchors"), verbose=False).to(device), None


def freeze_layers(model: nn.Module, freeze: list[int]) -> list[str]:
    """Turn off gradients for layers model.0 .. model.N-1 (one number N) or the listed layer indices."""
    layers = freeze if len(freeze) > 1 else range(freeze[0])
    prefixes = tuple(f"model.{i}." for i in layers)
    frozen = []
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(prefixes)
        if not p.requires_grad:
            frozen.append(name)
    if frozen:
        LOGGER.info(f"Frozen {len(frozen)} parameter tensors in layers {list(layers)}")
    return frozen


def loss_gains(hyp: dict, nc: int, nl: int, imgsz: int, label_smoothing: float) -> dict:
    """hyp with loss gains scaled to the class count, detection levels and image size (YOLOv5's rule)."""
    scaled = dict(hyp)
    scaled["box"] = hyp["box"] * 3 / nl
    scaled["cls"] = hyp["cls"] * nc / 80 * 3 / nl
    scaled["obj"] = hyp["obj"] * (imgsz / 640) ** 2 * 3 / nl
    scaled["label_smoothing"] = label_smoothing
    return scaled


def class_weights_from_labels(labels: list[np.ndarray], nc: int) -> torch.Tensor:
    """Inverse class frequency of the training labels, normalised to sum to nc (empty classes count 1)."""
    classes = np.concatenate([lb[:, 0] for lb in labels if len(lb)]).astype(int) if any(len(lb) for lb in labels) \
        else np.zeros(0, dtype=int)
    counts = np.bincount(classes, minlength=nc).astype(np.float64)
    counts[counts == 0] = 1
    weights = 1 / counts
    return torch.from_numpy(weights / weights.sum() * nc).float()


def make_ema(model: nn.Module, hyp: dict, total_steps: int | None = None) -> ModelEMA:
    """The EMA of the model, with decay, tau, schedule and update_every from the hyp file; total_steps (the
    run's planned optimizer steps) is what length-aware schedules such as 'exp' need."""
    try:
        return ModelEMA.from_hyp(model, hyp, total_steps=total_steps)
    except ValueError as e:  # an unknown schedule or key, a decay outside [0, 1]...
        raise TrainError(f"hyp: {e}") from None


# ------------------------------------------------------------------------------------------------ steps
def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """Unscale, clip and apply the accumulated gradients; False (and no step) when they are not finite.

    The total gradient norm that clipping computes anyway tells whether every gradient is finite, so
    skipping costs nothing. The GradScaler still sees the overflow and lowers its scale.
    """
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=MAX_GRAD_NORM)
    stepped = bool(torch.isfinite(norm))
    if stepped:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    if not stepped:
        LOGGER.warning(f"Skipped an optimizer step: gradient norm is {norm.item()}")
    return stepped


def multi_scale_size(imgsz: int, stride: int, seed: int, epoch: int, i: int) -> int:
    """This batch's --multi-scale size: a multiple of stride in [0.5, 1.5] x imgsz, a pure function of
    (seed, epoch, i) so that a resumed run and every DDP process pick the same sizes."""
    rng = np.random.default_rng([seed, epoch, i])
    size = int(rng.integers(int(imgsz * 0.5), int(imgsz * 1.5) + stride)) // stride * stride
    return max(size, stride)


# ------------------------------------------------------------------------------------------------ records
def results_header(val_raw: bool) -> list[str]:
    cols = ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", *METRIC_COLUMNS, "x/lr0", "x/lr1", "x/lr2"]
    return cols + list(RAW_COLUMNS) if val_raw else cols


def append_results_row(csv: Path, values: list[float], val_raw: bool) -> None:
    """One fixed-format row per epoch, so identical runs write identical text."""
    header = results_header(val_raw)
    assert len(values) == len(header), (len(values), len(header))
    lines = [] if csv.exists() else [",".join(f"{c:>20s}" for c in header)]
    lines.append(",".join(f"{v:20.5g}" for v in values))
    with open(csv, "a") as f:
        f.write("\n".join(lines) + "\n")


def truncate_results(csv: Path, start_epoch: int) -> None:
    """Drop rows of epochs that a resumed run will train again (written after its last checkpoint)."""
    if not csv.exists():
        return
    lines = csv.read_text().splitlines()
    kept = lines[:1] + [ln for ln in lines[1:] if ln.strip() and int(float(ln.split(",")[0])) < start_epoch]
    if kept != lines:
        csv.write_text("\n".join(kept) + "\n")


def plain_opt(opt: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opt).items()}


def build_checkpoint(*, epoch: int, best_fitness: float, model: nn.Module, ema: ModelEMA, optimizer, scaler,
                     scheduler, stopper: EarlyStopping, last_opt_step: int, accumulate: int, opt, hyp: dict,
                     names: list[str], finished: bool) -> dict:
    """The checkpoint dict: FP16 weights for use, plus (while unfinished) FP32 state for exact resume."""
    raw = de_parallel(model)
    ckpt = {
        "format": "yolo-ema", "version": 1,
        "epoch": epoch,
        "best_fitness": float(best_fitness),
        "model": half_state_dict(raw.state_dict()),
        "ema": half_state_dict(ema.ema.state_dict()),
        "updates": int(ema.updates),
        "optimizer": optimizer.state_dict(),
        "opt": plain_opt(opt),
        "hyp": dict(hyp),
        "yaml": raw.yaml,
        "nc": int(raw.nc),
        "names": list(names),
        "date": datetime.now(timezone.utc).isoformat(),
        # Small state that continues through an --epochs extension of a finished run too.
        "train_state": {"last_opt_step": int(last_opt_step), "accumulate": int(accumulate),
                        "early_stopping": stopper.state_dict()},
    }
    if not finished:
        ckpt["resume"] = {
            "model": {k: v.detach().clone() for k, v in raw.state_dict().items()},
            "ema": ema.state_dict(),
            "scaler": scaler.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": capture_rng_state(),
        }
    return ckpt


# ------------------------------------------------------------------------------------------------ the run
def train(hyp: dict, opt: argparse.Namespace, device: torch.device, procs: Processes, resume_ckpt: dict | None):
    save_dir = Path(opt.save_dir)
    weights_dir = save_dir / "weights"
    last, best = weights_dir / "last.pt", weights_dir / "best.pt"
    results_csv = save_dir / "results.csv"
    plots = not opt.noplots
    cuda = device.type == "cuda"
    kill_at = int(os.getenv(KILL_HOOK_ENV, -1))

    # ---- seeds and data description
    init_seeds(opt.seed + 1 + procs.rank, deterministic=opt.deterministic)
    with main_process_first(procs):
        data = check_dataset(opt.data)
    nc = 1 if opt.single_cls else data["nc"]
    names = ["item"] if opt.single_cls and len(data["names"]) != 1 else list(data["names"])

    # ---- model
    try:
        model, pretrained = build_model(opt, hyp, nc, resume_ckpt, device)
    except (FileNotFoundError, ValueError) as e:  # a missing or malformed --cfg
        raise TrainError(f"model: {e}") from None
    if pretrained is not None and int(pretrained["nc"]) != nc:
        LOGGER.info(f"--weights trained on {pretrained['nc']} classes; the detection head is re-initialised for {nc}")
    freeze_layers(model, opt.freeze)
    gs = max(int(model.stride.max()), 32)
    imgsz = check_img_size(opt.imgsz, gs)
    batch_size = opt.batch_size // procs.world_size  # per process

    # ---- the run folder, once the data and the model are known to be usable
    if procs.main:
        weights_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "hyp.yaml").write_text(yaml.safe_dump(hyp, sort_keys=False))
        (save_dir / "opt.yaml").write_text(yaml.safe_dump(plain_opt(opt), sort_keys=False))
        LOGGER.info("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in hyp.items()))

    # ---- data
    with main_process_first(procs):
        train_loader, dataset = create_dataloader(
            data["train"], imgsz, batch_size, gs, single_cls=opt.single_cls, hyp=hyp, augment=True,
            cache=opt.cache, rect=opt.rect, rank=procs.rank, world_size=procs.world_size, workers=opt.workers,
            shuffle=True, seed=opt.seed, nc=data["nc"], prefix="train: ")
    max_label = max((int(lb[:, 0].max()) for lb in dataset.labels if len(lb)), default=-1)
    if max_label >= nc:
        raise TrainError(f"label class {max_label} exceeds nc={nc} in {opt.data}; classes must be 0..{nc - 1}")
    nb = len(train_loader)
    val_loader = None
    if procs.main:
        val_loader, _ = create_dataloader(
            data["val"], imgsz, batch_size * 2, gs, single_cls=opt.single_cls, hyp=hyp,
            cache=None if opt.noval else opt.cache, rect=True, rank=-1, workers=opt.workers * 2, pad=0.5,
            seed=opt.seed, nc=data["nc"], prefix="val: ")
        if resume_ckpt is None:
            if plots:
                plot_labels(np.concatenate([lb for lb in dataset.labels if len(lb)] or [np.zeros((0, 5))], 0),
                            names, save_dir)
            if not opt.noautoanchor:
                check_anchors(dataset, model=model, thr=hyp["anchor_t"], imgsz=imgsz)

    # ---- model attributes the loss, EMA and checkpoints use
    nl = model.model[-1].nl
    model.nc, model.names = nc, names
    model.hyp = loss_gains(hyp, nc, nl, imgsz, opt.label_smoothing)
    model.class_weights = class_weights_from_labels(dataset.labels, nc).to(device)

    # ---- EMA (rank 0), optimizer, schedule
    nw = warmup_iterations(hyp["warmup_epochs"], nb)
    ema = make_ema(model, hyp, planned_optimizer_steps(nb, opt.epochs, nw, hyp["nbs"], opt.batch_size)) \
        if procs.main else None
    accumulate = nominal_accumulate(hyp["nbs"], opt.batch_size)
    weight_decay = scaled_weight_decay(hyp["weight_decay"], opt.batch_size, accumulate, hyp["nbs"])
    optimizer = build_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"], weight_decay)
    scheduler, lf = build_scheduler(optimizer, opt.epochs, hyp["lrf"], cos=opt.cos_lr)
    use_scaler = cuda and not opt.bf16
    amp_dtype = torch.bfloat16 if opt.bf16 else torch.float16
    autocast_on = cuda or opt.bf16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    stopper = EarlyStopping(patience=opt.patience)

    # ---- resume state
    start_epoch, best_fitness, last_opt_step, rng_state = 0, 0.0, -1, None
    if resume_ckpt is not None:
        start_epoch, best_fitness, last_opt_step, accumulate, rng_state = restore_training_state(
            resume_ckpt, opt, optimizer, scheduler, scaler, stopper, ema, lf, accumulate)

    # ---- processes
    if procs.distributed:
        if opt.sync_bn:
            if cuda:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
                LOGGER.info("Using SyncBatchNorm")
            else:
                LOGGER.warning("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernels); ignored on CPU")
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    compute_loss = ComputeLoss(de_parallel(model), de_parallel(model).hyp, label_smoothing=opt.label_smoothing)

    if procs.main:
        model_info(de_parallel(model), "Model")
        LOGGER.info(f"Image sizes {imgsz} train, {imgsz} val; {opt.workers} dataloader workers; "
                    f"accumulating to a nominal batch of {hyp['nbs']} ({accumulate} x {opt.batch_size}); "
                    f"{nw} warm-up iterations\nLogging results to {save_dir}\n"
                    f"Starting training for {opt.epochs} epochs...")
    end_epoch = opt.epochs
    if resume_ckpt is not None:
        if procs.main:
            truncate_results(results_csv, start_epoch)
        if opt.epochs == int(resume_ckpt["opt"]["epochs"]) and stopper.stopped(start_epoch - 1):
            LOGGER.info(f"The run had stopped early after epoch {start_epoch - 1}; finishing it")
            end_epoch = start_epoch  # killed while finishing: train no further than the run left alone did
    if rng_state is not None:
        restore_rng_state(rng_state)  # last, so that nothing above disturbs the restored generators

    # ---- epochs
    results = (0.0,) * len(METRIC_COLUMNS)
    raw_results = (0.0,) * len(RAW_COLUMNS)
    t0 = time.time()
    epoch = start_epoch - 1
    for epoch in range(start_epoch, end_epoch):
        model.train()
        train_loader.set_epoch(epoch)
        mloss = torch.zeros(3, device=device)
        optimizer.zero_grad()  # a partial accumulation window from the last epoch is dropped
        if procs.main:
            LOGGER.info(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size"))
        bar = tqdm(enumerate(train_loader), total=nb, disable=not procs.main, bar_format="{l_bar}{bar:10}{r_bar}")
        for i, (imgs, targets, paths, _) in bar:
            ni = i + nb * epoch  # global iteration
            if ni == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook, see module docstring
            imgs = imgs.to(device, non_blocking=True).float() / 255

            if ni <= nw:
                accumulate = warmup_accumulate(ni, nw, hyp["nbs"], opt.batch_size)
                apply_warmup(optimizer, ni, nw, lf(epoch), hyp)

            if opt.multi_scale:
                size = multi_scale_size(imgsz, gs, opt.seed, epoch, i)
                scale = size / max(imgs.shape[2:])
                if scale != 1:
                    new_shape = [math.ceil(x * scale / gs) * gs for x in imgs.shape[2:]]
                    imgs = nn.functional.interpolate(imgs, size=new_shape, mode="bilinear", align_corners=False)

            with torch.autocast(device.type, dtype=amp_dtype, enabled=autocast_on):
                pred = model(imgs)
                loss, loss_items = compute_loss(pred, targets.to(device))
                if procs.distributed:
                    loss = loss * procs.world_size  # DDP averages gradients over processes
            scaler.scale(loss).backward()

            if ni - last_opt_step >= accumulate:
                if optimizer_step(model, optimizer, scaler) and ema is not None:
                    ema.update(model)  # only after a step actually taken: updates == steps
                last_opt_step = ni

            if procs.main:
                mloss = (mloss * i + loss_items) / (i + 1)
                mem = f"{torch.cuda.memory_reserved(device) / 1e9:.3g}G" if cuda else "0G"
                bar.set_description(("%11s" * 2 + "%11.4g" * 5) % (
                    f"{epoch}/{opt.epochs - 1}", mem, *mloss.tolist(), targets.shape[0], imgs.shape[-1]))
                if plots and ni < 3:
                    plot_images(imgs, targets, paths, save_dir / f"train_batch{ni}.jpg", names=names)

        lrs = [g["lr"] for g in optimizer.param_groups]
        scheduler.step()

        stop = False
        if procs.main:
            final_epoch = epoch + 1 == opt.epochs
            ema.update_attr(de_parallel(model), include=EMA_ATTRS)
            if non_finite_tensors(ema.ema):
                LOGGER.warning(f"epoch {epoch}: the EMA holds non-finite values; its results are not meaningful")
            if not opt.noval or final_epoch:
                results, _, _ = validate.run(data, batch_size=batch_size * 2, imgsz=imgsz, half=cuda and not opt.bf16,
                                             model=ema.ema, single_cls=opt.single_cls, dataloader=val_loader,
                                             save_dir=save_dir, plots=False, compute_loss=compute_loss)
                if opt.val_raw:
                    raw, _, _ = validate.run(data, batch_size=batch_size * 2, imgsz=imgsz, half=cuda and not opt.bf16,
                                             model=de_parallel(model), single_cls=opt.single_cls,
                                             dataloader=val_loader, save_dir=save_dir, plots=False)
                    raw_results = tuple(raw[:4])
            fi = float(fitness(np.array(results[:4]).reshape(1, -1))[0])
            stop = stopper(epoch, fi)
            best_fitness = max(best_fitness, fi)
            row = [epoch, *mloss.tolist(), *[float(x) for x in results], *lrs]
            append_results_row(results_csv, row + (list(raw_results) if opt.val_raw else []), opt.val_raw)

            if not opt.nosave or final_epoch or stop:
                ckpt = build_checkpoint(epoch=epoch, best_fitness=best_fitness, model=model, ema=ema,
                                        optimizer=optimizer, scaler=scaler, scheduler=scheduler, stopper=stopper,
                                        last_opt_step=last_opt_step, accumulate=accumulate, opt=opt, hyp=hyp,
                                        names=names, finished=False)
                # last.pt is written last: it is the commit point a resume starts from, so a kill before
                # it repeats this epoch and rewrites the files above with identical contents.
                if best_fitness == fi:
                    save_checkpoint(ckpt, best)
                if opt.save_period > 0 and epoch % opt.save_period == 0:
                    save_checkpoint({k: v for k, v in ckpt.items() if k != "resume"}, weights_dir / f"epoch{epoch}.pt")
                save_checkpoint(ckpt, last)
                del ckpt
        stop = broadcast(stop, procs)
        if stop:
            break

    # ---- finish
    if procs.main:
        LOGGER.info(f"\n{epoch - start_epoch + 1} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
        for f in (best, last):  # last.pt last: while it holds resume state, a resume can finish the job
            if f.exists():
                strip_resume_state(f)
        if best.exists() and not opt.noval:
            LOGGER.info(f"\nValidating {best}...")
            best_model = model_from_checkpoint(load_checkpoint(best)).to(device)
            results, _, _ = validate.run(data, batch_size=batch_size * 2, imgsz=imgsz, model=best_model,
                                         half=cuda and not opt.bf16, single_cls=opt.single_cls,
                                         dataloader=val_loader, save_dir=save_dir, plots=plots, verbose=True,
                                         compute_loss=compute_loss)
        if plots and results_csv.exists():
            plot_results(results_csv)
        LOGGER.info(f"Results saved to {save_dir}")
    return results


def restore_training_state(ckpt: dict, opt, optimizer, scheduler, scaler, stopper, ema, lf, accumulate: int):
    """Load the optimizer, schedule, scaler, early stopper and EMA of a resumed run.

    Returns (start_epoch, best_fitness, last_opt_step, accumulate, rng_state or None). An unfinished run
    continues exactly; a finished run extended with --epochs continues from its FP16 weights.
    """
    start_epoch = int(ckpt["epoch"]) + 1
    state = ckpt.get("train_state", {})
    resume = ckpt.get("resume")
    if ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if state.get("early_stopping"):
        stopper.load_state_dict(state["early_stopping"])
    if ema is not None:
        if resume is not None:
            planned_steps = ema.total_steps  # of this run, which an --epochs extension makes longer
            ema.load_state_dict(resume["ema"])
            ema.total_steps = planned_steps
        else:
            ema.ema.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["ema"].items()})
            ema.updates = int(ckpt["updates"])
    planned = int(ckpt["opt"]["epochs"])
    if resume is not None:
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
    else:
        scheduler.last_epoch = start_epoch - 1
    if opt.epochs != planned:  # extended: follow the schedule stretched to the new length from here on
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * lf(start_epoch)
    LOGGER.info(f"Resuming training from {opt.resume}: epoch {start_epoch} of {opt.epochs}, "
                f"{int(ckpt['updates'])} EMA updates so far")
    return (start_epoch, float(ckpt["best_fitness"]), int(state.get("last_opt_step", -1)),
            int(state.get("accumulate", accumulate)),
            resume["rng"] if resume is not None else None)


def main(opt: argparse.Namespace):
    """Run training for parsed options; raises TrainError (one line) for a run that cannot start."""
    procs = Processes.from_env()
    set_logging(procs.rank)
    resume_ckpt = None
    if opt.resume:
        opt, resume_ckpt = prepare_resume(opt)
    else:
        opt.epochs = DEFAULT_EPOCHS if opt.epochs is None else opt.epochs
        opt.workers = DEFAULT_WORKERS if opt.workers is None else opt.workers
        opt.device = "" if opt.device is None else opt.device
    hyp = load_hyp(resume_ckpt["hyp"] if resume_ckpt is not None else opt.hyp)
    if opt.batch_size < 1:
        raise TrainError(f"--batch-size must be at least 1, got {opt.batch_size}")
    device = setup_processes(opt, procs)
    try:
        if not opt.resume:
            save_dir = increment_path(Path(opt.project) / opt.name, opt.exist_ok) if procs.main else None
            opt.save_dir = str(broadcast(save_dir, procs))
        return train(hyp, opt, device, procs, resume_ckpt)
    finally:
        if procs.distributed and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parse_opt())
    except (TrainError, CheckpointError, DatasetError) as e:
        set_logging()
        LOGGER.error(f"train: {e}")
        sys.exit(1)
