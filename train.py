"""Train a YOLOv5-style detector on a detection dataset.

Usage:
    python train.py --data coco128.yaml --cfg yolov5n.yaml --weights '' --img 640 --epochs 100
    python train.py --resume                      # continue the latest run, bit-exact where it stopped
    python train.py --resume runs/train/exp/weights/last.pt --epochs 300   # extend a run
    torchrun --nproc_per_node 2 train.py --data coco128.yaml --cfg yolov5n.yaml --device cpu
    python train.py --data coco128.yaml --cfg yolov5n.yaml --epochs 10 --evolve 300   # hyp search: docs/evolve.md

A run, top to bottom: options -> set-up (seeds, device, processes, data, model, EMA, optimizer, schedule,
resume state) -> epochs (warm-up, autocast forward/backward, gradient accumulation, optimizer step, EMA update
after each step actually taken) -> epoch end (validation of the EMA, results.csv, TensorBoard, best.pt, early
stopping, last.pt) -> finish (resume state stripped, best.pt validated, plots).

Precision: --amp fp16 (the default on CUDA) is fp16 autocast with a GradScaler on whatever device runs, the
CPU included; bf16 is bfloat16 autocast without a scaler; off is FP32. One code path for all of them.

Checkpoints (utils/checkpoint.py format) carry, while a run is unfinished, a `resume` entry with the FP32
model and EMA, GradScaler, scheduler and RNG states, so a run killed at any instant and resumed ends
bit-identical to the same run left alone (given --deterministic and the same hardware).

Test hooks, environment variables naming a global training iteration N (counted from 0, at its start):
    YOLO_TEST_KILL_AT_ITER=N             the process SIGKILLs itself (once the checkpoint writes queued before it are
                                         on disk, so that which epoch last.pt holds is certain; =finish: as the final
                                         validation of best.pt begins)
    YOLO_TEST_INTERRUPT_AT_ITER=N        the process sends itself SIGINT, as Ctrl-C does (=finish: once the last
                                         epoch is done, as finishing begins)
    YOLO_TEST_OVERFLOW_AT_ITER=N[,M...]  the loss of those iterations is multiplied by inf (an fp16 overflow)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

T_IMPORT = time.perf_counter()  # --profile: this module's imports are the first phase of a run

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.cli import HelpFormatter, args_line, exit_process, read_text_file, refuse_bad_flags, shown_path  # noqa: E402

DEFAULT_EPOCHS, DEFAULT_WORKERS = 100, 8
DEFAULT_CFG = "yolov5s.yaml"  # the model when neither --cfg nor --weights is given (YOLOv5 starts from yolov5s)
# The choices of utils.optim.OPTIMIZERS and utils.torch_utils.AMP_DTYPES, spelled out here so that --help
# answers without importing torch (tests check that they agree).
OPTIMIZER_CHOICES = ("SGD", "Adam", "AdamW")
AMP_CHOICES = ("fp16", "bf16", "off")


class TrainError(Exception):
    """A run that cannot start or go on; the message is one line for the user."""


class Interrupted(Exception):
    """Ctrl-C: the message says where the run stopped and how to continue it."""


class NothingTrained(Exception):
    """Ctrl-C before a new run trained its first batch: the message says where it stopped."""


# ------------------------------------------------------------------------------------------------ options
def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    opt = p.parse_args(argv)
    if opt.bf16:
        if opt.amp not in (None, "bf16"):
            p.error(f"--bf16 contradicts --amp {opt.amp}")
        opt.amp = "bf16"
    return opt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--weights", type=str, default="", help="initial weights (our checkpoint or a YOLOv5 .pt); '' for scratch")
    p.add_argument("--cfg", type=str, default="", help=f"model yaml, e.g. yolov5n.yaml ({DEFAULT_CFG} without --weights)")
    p.add_argument("--data", type=str, default="coco128.yaml", help="dataset yaml: a name in data/ or a path")
    p.add_argument("--hyp", type=str, default=str(ROOT / "hyp" / "hyp.scratch-low.yaml"), help="hyperparameter yaml")
    p.add_argument("--epochs", type=int, default=None, help=f"total training epochs (default {DEFAULT_EPOCHS}; "
                                                             "with --resume, the run's own)")
    p.add_argument("--batch-size", type=int, default=16, help="total batch size over all processes")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train and val image size (pixels)")
    p.add_argument("--rect", action="store_true", help="rectangular training batches")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="resume the latest run, or the given last.pt")
    p.add_argument("--nosave", action="store_true", help="only save the final checkpoint")
    p.add_argument("--noval", action="store_true", help="only validate after the final epoch")
    p.add_argument("--noautoanchor", action="store_true", help="keep the model's anchors")
    p.add_argument("--noplots", action="store_true", help="save no plot files")
    p.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard event files")
    p.add_argument("--cache", type=str, nargs="?", const="ram", default="auto", choices=("auto", "ram", "disk", "off"),
                   help="keep decoded images in ram or on disk; auto: in ram when they take at most 10%% of the "
                        "available memory (small datasets), off: decode every time")
    p.add_argument("--device", type=str, default=None,
                   help="cpu, cuda, a GPU index (0) or list (0,1,2,3) (default: the first GPU, else cpu; with "
                        "--resume, the run's own)")
    p.add_argument("--amp", choices=AMP_CHOICES, default=None,
                   help="mixed precision: fp16 autocast with a GradScaler, bf16 autocast, or off "
                        "(default: fp16 on CUDA, off on the CPU)")
    p.add_argument("--bf16", action="store_true", help="same as --amp bf16")
    p.add_argument("--multi-scale", action="store_true", help="vary the image size by +/- 50%% per batch")
    p.add_argument("--single-cls", action="store_true", help="train every class as one class")
    p.add_argument("--optimizer", type=str, choices=OPTIMIZER_CHOICES, default="SGD", help="optimizer")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA DDP only)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"most dataloader workers per process; fewer are used when cores or the batch are fewer "
                        f"(default {DEFAULT_WORKERS}; with --resume, the run's own)")
    p.add_argument("--project", default=str(ROOT / "runs" / "train"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="reuse an existing project/name folder")
    p.add_argument("--cos-lr", action="store_true", help="cosine lr schedule instead of linear")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing epsilon, in [0, 1)")
    p.add_argument("--patience", type=int, default=100, help="early stopping patience in epochs (0 disables)")
    p.add_argument("--freeze", nargs="+", type=int, default=[0],
                   help="freeze layers: the first N (one number) or the listed layer indices")
    p.add_argument("--save-period", type=int, default=-1, help="also save weights/epochN.pt every N epochs (-1 off)")
    p.add_argument("--seed", type=int, default=0, help="global training seed")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (needed for bit-exact resume)")
    p.add_argument("--val-raw", action="store_true", help="also validate the raw (non-EMA) model each epoch")
    p.add_argument("--posthoc", action="store_true",
                   help="keep post-hoc EMA snapshots for posthoc_ema.py without editing the hyp file (widths: hyp "
                        "posthoc_sigma_rels, else 0.05 and 0.1; count: posthoc_snapshots)")
    p.add_argument("--teacher", type=str, default="",
                   help="distil from a frozen teacher (our checkpoint or a YOLOv5 .pt with the student's classes "
                        "and strides), or 'ema' for the student's own EMA; hyp kd_weight, kd_temperature")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model: worth it for long runs only (compiling takes minutes; measure with "
                        "bench/train_speed.py --formats channels_last compiled)")
    p.add_argument("--mlflow", nargs="?", const=True, default=False, metavar="URI",
                   help="log the run to MLflow: at URI, else $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db "
                        "(on too whenever MLFLOW_TRACKING_URI is set; utils/tracking.py)")
    p.add_argument("--profile", action="store_true",
                   help="time every phase of the run; print the table at the end and write profile.json")
    p.add_argument("--evolve", type=int, nargs="?", const=300, default=None,
                   help="search the hyps over N short runs in all (300 without N), continuing the study if it exists")
    p.add_argument("--evolve-storage", default=None, help="Optuna storage URL (sqlite:///, postgresql://, mysql://) or "
                   "journal file path shared by the workers; default project/name/evolve.db")
    p.add_argument("--evolve-study", default="evolve", help="--evolve: the study's name in the storage")
    p.add_argument("--evolve-heartbeat", type=int, default=60,
                   help="--evolve: seconds between a trial's heartbeats; silent for two, it is failed and run again")
    p.add_argument("--local-rank", "--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def check_opt(opt: argparse.Namespace) -> None:
    """Refuse numeric flags outside their meaning, in one line, before anything is created on disk."""
    rules = [
        (opt.epochs is None or opt.epochs >= 1, f"--epochs must be at least 1, got {opt.epochs}"),
        (opt.batch_size >= 1, f"--batch-size must be at least 1, got {opt.batch_size}"),
        (opt.imgsz >= 1, f"--img must be a positive number of pixels, got {opt.imgsz}"),
        (opt.workers is None or opt.workers >= 0, f"--workers must be 0 or more, got {opt.workers}"),
        (opt.patience >= 0, f"--patience must be 0 (off) or a number of epochs, got {opt.patience}"),
        (opt.save_period == -1 or opt.save_period >= 1,
         f"--save-period must be -1 (off) or a number of epochs, got {opt.save_period}"),
        (0 <= opt.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {opt.label_smoothing}"),
        (all(i >= 0 for i in opt.freeze), f"--freeze takes layer counts or indices of 0 or more, got {opt.freeze}"),
        (opt.evolve is None or opt.evolve >= 1, f"--evolve takes a number of trials of at least 1, got {opt.evolve}"),
        (opt.evolve is None or not opt.resume,
         "--evolve cannot be combined with --resume: run the same --evolve command again to continue its study"),
        (opt.evolve_heartbeat >= 1, f"--evolve-heartbeat must be at least 1 second, got {opt.evolve_heartbeat}"),
    ]
    for ok, message in rules:
        if not ok:
            raise TrainError(message)


if __name__ == "__main__":
    CLI_OPT = parse_opt()  # --help and mistyped flags answer here, before the imports below take seconds
    refuse_bad_flags("train", check_opt, CLI_OPT, errors=(TrainError,))

import contextlib  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timedelta, timezone  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

import val as validate  # noqa: E402
from models.yolo import Model, check_img_size, size_multiple  # noqa: E402
from utils.allocator import reuse_freed_memory  # noqa: E402
from utils.autoanchor import check_anchors  # noqa: E402
from utils.bema import ema_from_hyp  # noqa: E402
from utils.bn_recompute import FixedBatches, bn_recompute_batches, recompute_bn_stats  # noqa: E402
from utils.checkpoint import (VERSION, CheckpointError, CheckpointWriter, finished_checkpoint,  # noqa: E402
                              half_state_dict, load_checkpoint, load_optimizer_state, model_from_checkpoint,
                              pack_state_dict, pack_tree, strip_resume_state, unpacked_state_dict)
from utils.data_config import DatasetError, check_dataset  # noqa: E402
from utils.dataloaders import ReplayLoader, create_dataloader, dataloader_workers  # noqa: E402
from utils.distill import HYP_DEFAULTS as KD_HYP_DEFAULTS  # noqa: E402
from utils.distill import Distiller, TeacherError, load_teacher  # noqa: E402
from utils.distill import check_hyp as check_kd_hyp  # noqa: E402
from utils.early_stopping import EarlyStopping  # noqa: E402
from utils.ema import ModelEMA, end_of_run_plan  # noqa: E402
from utils.ema_companions import CHECKPOINT_KEY as COMPANIONS_KEY, CompanionEMAs, companion_taus  # noqa: E402
from utils.environment import version_line  # noqa: E402
from utils.log import LOGGER, set_logging  # noqa: E402
from utils.loss import ComputeLoss  # noqa: E402
from utils.metrics import fitness  # noqa: E402
from utils.optim import (apply_warmup, build_optimizer, build_scheduler, nominal_accumulate,  # noqa: E402
                         planned_optimizer_steps, scaled_weight_decay, warmup_accumulate, warmup_iterations)
from utils.paths import increment_path  # noqa: E402
from utils.plots import plot_images, plot_labels, plot_results  # noqa: E402
from utils.posthoc import PosthocEMA, PosthocError, settings_from_hyp, with_posthoc_on  # noqa: E402
from utils.profiling import PhaseTimer  # noqa: E402
from utils.rng import capture_rng_state, restore_rng_state  # noqa: E402
from utils.switch_ema import switch_ema_enabled, switch_to_average  # noqa: E402
from utils.tensorboard_log import TensorBoardLog  # noqa: E402
from utils.tracking import Tracker  # noqa: E402
from utils.torch_utils import (autocast, check_amp, de_parallel, init_seeds, model_info,  # noqa: E402
                               non_finite_tensors, select_device)

IMPORT_SECONDS = time.perf_counter() - T_IMPORT

HYP_KEYS = ("lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr",
            "box", "cls", "cls_pw", "obj", "obj_pw", "iou_t", "anchor_t", "fl_gamma", "hsv_h", "hsv_s",
            "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud", "fliplr", "mosaic",
            "mixup", "copy_paste")
# What YOLOv5's own hyp files lack, so that they work here unchanged: the nominal batch YOLOv5 hard-codes,
# the settings of its ModelEMA, and torch's GradScaler defaults.
HYP_DEFAULTS = {"nbs": 64, "ema_decay": 0.9999, "ema_tau": 2000, "ema_schedule": "ramp", "ema_update_every": 1,
                "amp_init_scale": 65536.0, "amp_growth_factor": 2.0, "amp_backoff_factor": 0.5,
                "amp_growth_interval": 2000, **KD_HYP_DEFAULTS}
MAX_GRAD_NORM = 10.0
METRIC_COLUMNS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
                  "val/box_loss", "val/obj_loss", "val/cls_loss")
RAW_COLUMNS = ("raw/precision", "raw/recall", "raw/mAP_0.5", "raw/mAP_0.5:0.95")
EMA_ATTRS = ("yaml", "nc", "hyp", "names", "stride", "class_weights")
# What --resume takes from its command line: --epochs, --workers, --device, --mlflow and the switches of the session
# flags (on if the run or the resuming command turned them on); everything else is the run's own, from its checkpoint.
RESUME_SESSION_FLAGS = ("profile", "noplots", "no_tensorboard")
RESUME_OVERRIDES = ("resume", "epochs", "workers", "device", "mlflow")
KILL_HOOK_ENV = "YOLO_TEST_KILL_AT_ITER"
INTERRUPT_HOOK_ENV = "YOLO_TEST_INTERRUPT_AT_ITER"
OVERFLOW_HOOK_ENV = "YOLO_TEST_OVERFLOW_AT_ITER"
DDP_TIMEOUT = timedelta(hours=3)
# The layout oneDNN (CPU) and cuDNN's fp16 tensor-core kernels run fastest: the model and its inputs use it.
MEMORY_FORMAT = torch.channels_last
PLOTTED_TRAIN_BATCHES = 3  # train_batch{0,1,2}.jpg


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


def load_hyp(hyp: str | Path | dict) -> dict:
    """The hyperparameter dict from a yaml path (or a dict): every key training uses, HYP_DEFAULTS filling in
    the ones a YOLOv5 hyp file does not have."""
    if isinstance(hyp, dict):
        d, where = dict(hyp), "hyp dict"
    else:
        path = Path(hyp)
        if not path.is_file() and (ROOT / "hyp" / path.name).is_file():
            path = ROOT / "hyp" / path.name
        if not path.exists():
            raise TrainError(f"hyperparameter file {hyp} not found")
        try:
            text = read_text_file(path, "--hyp")
        except ValueError as e:  # a folder, or a binary file given by mistake
            raise TrainError(str(e)) from None
        try:
            d, where = yaml.safe_load(text) or {}, str(path)
        except yaml.YAMLError as e:
            raise TrainError(f"--hyp {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(d, dict):
            raise TrainError(f"{where} does not hold a mapping of hyperparameters")
    missing = [k for k in HYP_KEYS if k not in d]
    if missing:
        raise TrainError(f"{where}: missing hyperparameter{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    try:
        settings_from_hyp(d)  # post-hoc EMA, Switch EMA and BatchNorm recompute settings: refused here, before
        switch_ema_enabled(d)  # anything is created on disk
        bn_recompute_batches(d)
        companion_taus(d)
        check_kd_hyp(d)  # distillation settings
    except ValueError as e:
        raise TrainError(f"{where}: {e}") from None
    defaulted = {k: v for k, v in HYP_DEFAULTS.items() if k not in d}
    if defaulted:
        LOGGER.info(f"{where}: using the defaults " + ", ".join(f"{k}={v}" for k, v in defaulted.items()))
    d = {**d, **defaulted}
    scaler_checks = {"amp_init_scale": (lambda v: v > 0, "> 0"), "amp_growth_factor": (lambda v: v > 1, "> 1"),
                     "amp_backoff_factor": (lambda v: 0 < v < 1, "in (0, 1)"),
                     "amp_growth_interval": (lambda v: v >= 1 and v == int(v), "a whole number >= 1")}
    for key, (valid, rule) in scaler_checks.items():
        try:
            ok = valid(float(d[key]))
        except (TypeError, ValueError):
            ok = False
        if not ok:  # a zero scale, for one, would skip every step of the run
            raise TrainError(f"{where}: {key} must be {rule}, not {d[key]!r}")
    return d


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
    if "train_state" not in ckpt and "imported_from" not in ckpt:  # best.pt, epochN.pt, posthoc_best.pt
        last = path.parent / "last.pt"
        raise TrainError(f"--resume: {path} is a finished checkpoint for evaluation and fine-tuning: it keeps no "
                         f"resume state; resume from the run's weights/last.pt"
                         + (f": python train.py --resume {shown_path(last)}" if last.is_file() else ""))
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

    defaults = vars(parse_opt([]))
    new = argparse.Namespace(**{**defaults, **saved})
    for flag in RESUME_SESSION_FLAGS:  # how the run reports, not what it trains: the resuming command may add them
        setattr(new, flag, bool(getattr(opt, flag) or getattr(new, flag)))
    ignored = [f"--{k.replace('_', '-')}" for k, v in vars(opt).items()
               if k in defaults and k not in RESUME_SESSION_FLAGS + RESUME_OVERRIDES and v != defaults[k]]
    if ignored:
        LOGGER.warning(f"--resume continues the run with the settings it was started with; ignoring {', '.join(ignored)}")
    new.resume, new.epochs = str(path), opt.epochs or planned
    new.workers = opt.workers if opt.workers is not None else saved.get("workers", DEFAULT_WORKERS)
    new.device = opt.device if opt.device is not None else saved.get("device", "")
    new.mlflow = opt.mlflow or saved.get("mlflow", False)  # a run the checkpoint tracks goes on being tracked anyway
    if saved.get("amp") is None:  # a run saved before --amp existed: what its --bf16 and the device meant
        new.amp = "bf16" if saved.get("bf16") else None
    new.save_dir = str(path.resolve().parent.parent)
    new.data = data.get("yaml_file") or saved["data"]
    return new, ckpt


# ------------------------------------------------------------------------------------------------ set-up
def setup_processes(opt: argparse.Namespace, procs: Processes) -> torch.device:
    """The device of this process (made the current CUDA device) and its precision (opt.amp resolved); under
    torchrun also the process group (gloo on CPU, NCCL on CUDA)."""
    try:
        device = select_device(opt.device, batch_size=opt.batch_size)
        opt.amp = opt.amp or ("fp16" if device.type == "cuda" else "off")
        check_amp(opt.amp, device)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if procs.distributed:
        if opt.batch_size % procs.world_size:
            raise TrainError(f"--batch-size {opt.batch_size} must be a multiple of WORLD_SIZE {procs.world_size}")
        # The other ranks wait in a collective while rank 0 validates and saves; NCCL's default 10-minute
        # timeout would kill the run on a large validation set.
        # device_id binds the NCCL communicator to this rank's GPU up front (without it barriers warn and guess).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DDP_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
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
            weights = unpacked_state_dict(resume["model"])  # FP32: continues bit-exact
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
    n_layers = len(model.model)
    layers = freeze if len(freeze) > 1 else range(freeze[0])
    if len(freeze) == 1 and freeze[0] > n_layers or len(freeze) > 1 and max(freeze) >= n_layers:
        raise TrainError(f"--freeze {' '.join(map(str, freeze))}: the model has {n_layers} layers (0-{n_layers - 1})")
    prefixes = tuple(f"model.{i}." for i in layers)
    frozen = []
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(prefixes)
        if not p.requires_grad:
            frozen.append(name)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainError(f"--freeze {' '.join(map(str, freeze))} freezes every layer: nothing would train")
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
    """The EMA of the model, with decay, tau, schedule and update_every from the hyp file (a BEMA with hyp
    ema_bema); total_steps (the run's planned optimizer steps) is what length-aware schedules such as 'exp' need."""
    try:
        return ema_from_hyp(model, hyp, total_steps=total_steps)
    except ValueError as e:  # an unknown schedule or key, a decay outside [0, 1]...
        raise TrainError(f"hyp: {e}") from None


def ema_planned_steps(hyp: dict, planned_steps: int, images_per_epoch: int, epochs: int) -> int:
    """The run's length on the EMA's clock (what the 'exp' schedule decays by): optimizer steps, or with
    ema_unit 'images' nominal batches of nbs images."""
    if hyp.get("ema_unit", "steps") == "images":
        return max(math.ceil(images_per_epoch * epochs / hyp["nbs"]), 1)
    return planned_steps


def make_posthoc(model: nn.Module, hyp: dict, planned_steps: int, folder: Path) -> PosthocEMA | None:
    """The post-hoc EMA bank (hyp posthoc_sigma_rels; None when off), snapshots spaced over the planned steps."""
    try:
        return PosthocEMA.from_hyp(model, hyp, planned_steps, folder)
    except ValueError as e:
        raise TrainError(f"hyp: {e}") from None


def make_scaler(amp: str, device: torch.device, hyp: dict) -> torch.amp.GradScaler:
    """The GradScaler of the run: enabled for fp16 on any device, its settings from the hyp's amp_* keys (checked
    by load_hyp); for bf16 and FP32 a disabled one, whose calls pass gradients and steps through unchanged."""
    return torch.amp.GradScaler(device.type, init_scale=float(hyp["amp_init_scale"]),
                                growth_factor=float(hyp["amp_growth_factor"]),
                                backoff_factor=float(hyp["amp_backoff_factor"]),
                                growth_interval=int(hyp["amp_growth_interval"]), enabled=amp == "fp16")


# ------------------------------------------------------------------------------------------------ the step
def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   where: str = "") -> bool:
    """Unscale, clip and apply the accumulated gradients; False (and no step) when they are not finite.

    The total gradient norm that clipping computes anyway tells whether every gradient is finite, so
    skipping costs nothing. A skipped step backs the GradScaler's scale off and restarts its growth count,
    whatever made it skip: the scaler itself only notices non-finite gradients, not a norm that overflowed
    while every gradient was finite, and would grow its scale as after a clean step.
    """
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=MAX_GRAD_NORM)
    stepped = bool(torch.isfinite(norm))
    scale = scaler.get_scale() if scaler.is_enabled() else None
    if stepped:
        scaler.step(optimizer)
    scaler.update()
    if not stepped and scaler.is_enabled():
        scaler.load_state_dict({**scaler.state_dict(), "scale": scale * scaler.get_backoff_factor(), "_growth_tracker": 0})
    optimizer.zero_grad()
    if not stepped:
        scaled = f"; GradScaler scale {scale:g} -> {scaler.get_scale():g}" if scale is not None else ""
        LOGGER.warning(f"Skipped the optimizer step{where}: gradient norm is {norm.item()}{scaled}; "
                       "the EMA is not updated")
    return stepped


class TrainStep:
    """One training iteration: the autocast forward pass, the loss and its (scaled) backward pass, and, once
    `accumulate` iterations have gathered gradients, the clipped optimizer step, followed by the EMA update
    only when that step was actually taken (so ``ema.updates`` counts the steps taken).

    The same code for every device and precision: for fp16 the GradScaler is enabled and may skip a step on
    an overflow; otherwise it is disabled and its calls pass everything through. `timer(name)` wraps each
    phase (bench/profile_train.py measures them); `overflow_at` is the test hook named in the module docstring.
    """

    def __init__(self, model: nn.Module, compute_loss, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, ema: ModelEMA | None, amp_dtype: torch.dtype | None,
                 world_size: int = 1, last_opt_step: int = -1, timer=None, overflow_at=(),
                 posthoc: PosthocEMA | None = None, memory_format: torch.memory_format = MEMORY_FORMAT,
                 distiller: Distiller | None = None, companions: CompanionEMAs | None = None):
        self.model, self.compute_loss, self.optimizer, self.scaler, self.ema = model, compute_loss, optimizer, scaler, ema
        self.posthoc, self.memory_format, self.distiller = posthoc, memory_format, distiller
        self.companions = companions
        self.amp_dtype, self.world_size, self.last_opt_step = amp_dtype, world_size, last_opt_step
        self.timer = timer or (lambda name: contextlib.nullcontext())
        self.overflow_at = frozenset(overflow_at)
        self.skipped: list[int] = []  # global iterations whose optimizer step was skipped
        self.window_images = 0  # images (over all processes) whose gradients the next step applies

    def drop_partial_window(self) -> None:
        """Forget gradients gathered since the last step (at an epoch start, as YOLOv5 does)."""
        self.optimizer.zero_grad()
        self.window_images = 0

    def __call__(self, imgs: torch.Tensor, targets: torch.Tensor, ni: int, accumulate: int) -> torch.Tensor:
        """Train on one batch (float images in 0-1) at global iteration ni; returns the loss items (box, obj,
        cls, and kd with a distiller), detached."""
        device = imgs.device
        imgs = imgs.contiguous(memory_format=self.memory_format)  # the model's layout
        with self.timer("forward"), autocast(device, self.amp_dtype):
            pred = self.model(imgs)
        if self.distiller is not None:
            with self.timer("teacher"):
                teacher_pred = self.distiller.teacher_outputs(imgs, self.amp_dtype)
        with self.timer("loss"), autocast(device, self.amp_dtype):
            loss, loss_items = self.compute_loss(pred, targets.to(device))
            if self.distiller is not None:
                kd_loss, kd_item = self.distiller.loss(pred, teacher_pred)
                loss, loss_items = loss + kd_loss, torch.cat((loss_items, kd_item))
            if self.world_size > 1:
                loss = loss * self.world_size  # DDP averages gradients over processes
            if ni in self.overflow_at:
                loss = loss * math.inf
        with self.timer("backward"):
            self.scaler.scale(loss).backward()
        self.window_images += imgs.shape[0] * self.world_size  # DDP's samplers give every process equal shares
        if ni - self.last_opt_step >= accumulate:
            with self.timer("optimizer"):
                stepped = optimizer_step(self.model, self.optimizer, self.scaler, where=f" at iteration {ni}")
            if stepped and self.ema is not None:
                with self.timer("ema"):
                    self.ema.update(self.model, images=self.window_images)
                    if self.posthoc is not None:  # may write its snapshots due at this step
                        self.posthoc.update(self.model, images=self.window_images)
                    if self.companions is not None:  # the same steps as the main EMA: only those taken
                        self.companions.update(self.model, images=self.window_images)
            elif not stepped:
                self.skipped.append(ni)
            self.window_images = 0
            self.last_opt_step = ni
        return loss_items


def multi_scale_size(imgsz: int, stride: int, seed: int, epoch: int, i: int) -> int:
    """This batch's --multi-scale size: a multiple of stride in [0.5, 1.5] x imgsz, a pure function of
    (seed, epoch, i) so that a resumed run and every DDP process pick the same sizes."""
    rng = np.random.default_rng([seed, epoch, i])
    size = int(rng.integers(int(imgsz * 0.5), int(imgsz * 1.5) + stride)) // stride * stride
    return max(size, stride)


# ------------------------------------------------------------------------------------------------ records
def train_loss_names(distilling: bool) -> list[str]:
    return ["box_loss", "obj_loss", "cls_loss"] + (["kd_loss"] if distilling else [])


def results_header(val_raw: bool, distilling: bool = False) -> list[str]:
    cols = ["epoch", *(f"train/{n}" for n in train_loss_names(distilling)), *METRIC_COLUMNS, "x/lr0", "x/lr1", "x/lr2"]
    return cols + list(RAW_COLUMNS) if val_raw else cols


def append_results_row(csv: Path, values: list[float], val_raw: bool, distilling: bool = False) -> None:
    """One fixed-format row per epoch, so identical runs write identical text."""
    header = results_header(val_raw, distilling)
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


def file_size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """What a training run holds: made by setup_run(), used by the epoch loop, the epoch end and finish()."""
    opt: argparse.Namespace
    hyp: dict
    device: torch.device
    procs: Processes
    data: dict
    names: list[str]
    imgsz: int
    gs: int
    batch_size: int  # per process
    model: nn.Module  # DDP-wrapped under torchrun
    ema: ModelEMA | None  # rank 0 only (every process with --teacher ema, whose teacher it is)
    posthoc: PosthocEMA | None  # rank 0 only, when hyp posthoc_sigma_rels is set
    bn_batches: FixedBatches | None  # rank 0 only, with hyp ema_bn_recompute: what the EMA's BatchNorm statistics
                                     # are measured on at every epoch end
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    lf: object  # epoch -> lr factor
    scaler: torch.amp.GradScaler
    stopper: EarlyStopping
    train_loader: object
    val_loader: object | None  # rank 0 only
    compute_loss: ComputeLoss
    step: TrainStep
    timer: PhaseTimer  # --profile; disabled (free) otherwise
    nb: int  # batches per epoch
    nw: int  # warm-up iterations
    accumulate: int
    start_epoch: int = 0
    end_epoch: int = 0
    best_fitness: float = 0.0
    tensorboard: TensorBoardLog | None = None
    tracker: Tracker | None = None  # MLflow (--mlflow), rank 0 only
    saved_epoch: int | None = None  # the epoch last.pt holds
    position: tuple[int, int] = (0, -1)  # (epoch, batch) being trained; batch -1 before the epoch's first
    finishing: bool = False  # every epoch trained: finish() validates best.pt and plots
    results: tuple = (0.0,) * len(METRIC_COLUMNS)
    raw_results: tuple = (0.0,) * len(RAW_COLUMNS)
    unreadable: set = field(default_factory=set)  # image files that could not be read during training
    inference_copies: dict = field(default_factory=dict)  # id(validated model) -> its val.InferenceCopy
    started_batches: tuple | None = None  # (epoch, the train loader's iterator) started by start_epoch_batches
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)  # rank 0's checkpoints, in the background
    companions: CompanionEMAs | None = None  # rank 0 only, when hyp ema_companion_taus lists taus

    @property
    def save_dir(self) -> Path:
        return Path(self.opt.save_dir)

    @property
    def last(self) -> Path:
        return self.save_dir / "weights" / "last.pt"

    @property
    def best(self) -> Path:
        return self.save_dir / "weights" / "best.pt"

    @property
    def results_csv(self) -> Path:
        return self.save_dir / "results.csv"

    @property
    def plots(self) -> bool:
        return not self.opt.noplots

    def resume_hint(self) -> str:
        """Which epoch last.pt holds and the command that continues the run (once pending writes have ended)."""
        with contextlib.suppress(CheckpointError):  # a failed write is the caller's error to report
            self.writer.wait()
        if self.saved_epoch is None or not self.last.exists():
            return "no epoch has been saved yet, so there is nothing to resume: start the run again"
        return (f"{shown_path(self.last)} holds epoch {self.saved_epoch}; continue with: "
                f"python train.py --resume {shown_path(self.last)}")


def setup_run(hyp: dict, opt: argparse.Namespace, device: torch.device, procs: Processes,
              resume_ckpt: dict | None, timer: PhaseTimer) -> Run:
    """Everything before the first epoch: seeds, data, model, run folder, loaders, EMA, optimizer, schedule,
    scaler, and the state of a resumed run (restored last, so nothing here disturbs its RNG state)."""
    init_seeds(opt.seed + 1 + procs.rank, deterministic=opt.deterministic)
    with main_process_first(procs), timer("start-up: dataset yaml"):
        data = check_dataset(opt.data)
    nc = 1 if opt.single_cls else data["nc"]
    names = ["item"] if opt.single_cls and len(data["names"]) != 1 else list(data["names"])
    try:
        with timer("start-up: model build"):
            model, pretrained = build_model(opt, hyp, nc, resume_ckpt, device)
    except (FileNotFoundError, ValueError) as e:  # a missing or malformed --cfg
        raise TrainError(f"{'--cfg ' + opt.cfg if opt.cfg else 'model'}: {e}") from None
    if pretrained is not None and int(pretrained["nc"]) != nc:
        LOGGER.info(f"--weights trained on {pretrained['nc']} classes; the detection head is re-initialised for {nc}")
    freeze_layers(model, opt.freeze)
    try:  # every process its own teacher; refused before the run folder is made
        saved_teacher = resume_ckpt.get("train_state", {}).get("teacher") if resume_ckpt is not None else None
        teacher = load_teacher(opt.teacher, hyp, model, names, device, saved=saved_teacher, memory_format=MEMORY_FORMAT)
    except TeacherError as e:
        raise TrainError(str(e)) from None
    gs = size_multiple(model)
    imgsz = opt.imgsz = check_img_size(opt.imgsz, gs)  # the checkpoints store the size the run used (63 -> 64)
    batch_size = opt.batch_size // procs.world_size  # per process
    with timer("start-up: datasets (label scan, cache, loaders)"):
        train_loader, dataset, val_loader = build_loaders(opt, hyp, data, imgsz, batch_size, gs, procs, device)
    max_label = max((int(lb[:, 0].max()) for lb in dataset.labels if len(lb)), default=-1)
    if max_label >= nc:
        raise TrainError(f"label class {max_label} exceeds nc={nc} in {opt.data}; classes must be 0..{nc - 1}")
    batch_size = clamp_batch_size(opt, len(dataset), procs.world_size)
    if procs.main:  # the run folder, once the data and the model are known to be usable
        make_run_folder(opt, hyp)
    if procs.main and resume_ckpt is None:
        if not opt.noplots:
            with timer("start-up: label plots"):
                plot_labels(np.concatenate([lb for lb in dataset.labels if len(lb)] or [np.zeros((0, 5))], 0),
                            names, Path(opt.save_dir))
        if not opt.noautoanchor:
            with timer("start-up: autoanchor"):
                check_anchors(dataset, model=model, thr=hyp["anchor_t"], imgsz=imgsz, seed=opt.seed)

    # Model attributes the loss, the EMA and the checkpoints use
    model.nc, model.names = nc, names
    model.hyp = loss_gains(hyp, nc, model.model[-1].nl, imgsz, opt.label_smoothing)
    model.class_weights = class_weights_from_labels(dataset.labels, nc).to(device)

    # Converted before the EMA is built, so that its flat buffer keeps these strides (converting later drops it to
    # the foreach path).
    model.to(memory_format=MEMORY_FORMAT)
    nb = len(train_loader)
    nw = warmup_iterations(hyp["warmup_epochs"], nb)
    planned = planned_optimizer_steps(nb, opt.epochs, nw, hyp["nbs"], opt.batch_size)
    ema = posthoc = bn_batches = companions = None
    if procs.main or (teacher is not None and teacher.model is None):  # --teacher ema: each process its own EMA
        ema = make_ema(model, hyp, ema_planned_steps(hyp, planned, nb * opt.batch_size, opt.epochs))
    if procs.main:
        posthoc = make_posthoc(model, hyp, planned, Path(opt.save_dir) / "weights" / "posthoc")
        companions = CompanionEMAs.from_hyp(model, hyp,
                                            ema_planned_steps(hyp, planned, nb * opt.batch_size, opt.epochs))
        if count := bn_recompute_batches(hyp):
            bn_batches = FixedBatches.from_data(data["train"], imgsz, batch_size, gs, count, hyp, seed=opt.seed,
                                                single_cls=opt.single_cls)
    accumulate = nominal_accumulate(hyp["nbs"], opt.batch_size)
    weight_decay = scaled_weight_decay(hyp["weight_decay"], opt.batch_size, accumulate, hyp["nbs"])
    optimizer = build_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"], weight_decay)
    scheduler, lf = build_scheduler(optimizer, opt.epochs, hyp["lrf"], cos=opt.cos_lr)
    scaler = make_scaler(opt.amp, device, hyp)
    stopper = EarlyStopping(patience=opt.patience)
    start_epoch, best_fitness, last_opt_step, rng_state = 0, 0.0, -1, None
    if resume_ckpt is not None:
        start_epoch, best_fitness, last_opt_step, accumulate, rng_state = restore_training_state(
            resume_ckpt, opt, optimizer, scheduler, scaler, stopper, ema, lf, accumulate, posthoc)
        try:
            if companions is not None:
                companions.restore(resume_ckpt)
        except ValueError as e:
            raise TrainError(f"--resume: {e}") from None

    if procs.distributed:
        model = wrap_ddp(model, opt, device)
    if opt.compile:  # after the EMA (it pairs tensors by order through the wrapper) and DDP, as torch advises
        model = torch.compile(model)
    compute_loss = ComputeLoss(de_parallel(model), de_parallel(model).hyp, label_smoothing=opt.label_smoothing)
    overflow_at = [int(n) for n in os.getenv(OVERFLOW_HOOK_ENV, "").split(",") if n.strip()]
    distiller = Distiller(teacher, model, ema, hyp) if teacher is not None else None
    step = TrainStep(model, compute_loss, optimizer, scaler, ema, check_amp(opt.amp, device), procs.world_size,
                     last_opt_step, timer=timer, overflow_at=overflow_at, posthoc=posthoc, distiller=distiller,
                     companions=companions)
    run = Run(opt=opt, hyp=hyp, device=device, procs=procs, data=data, names=names, imgsz=imgsz, gs=gs,
              batch_size=batch_size, model=model, ema=ema, posthoc=posthoc, bn_batches=bn_batches, optimizer=optimizer,
              scheduler=scheduler, lf=lf, scaler=scaler, stopper=stopper, train_loader=train_loader,
              val_loader=val_loader, compute_loss=compute_loss, step=step, timer=timer, nb=nb, nw=nw,
              accumulate=accumulate, start_epoch=start_epoch, end_epoch=opt.epochs, best_fitness=best_fitness,
              saved_epoch=start_epoch - 1 if resume_ckpt is not None else None, position=(start_epoch, -1),
              companions=companions)
    if procs.main:
        log_run_plan(run)
        if not opt.no_tensorboard:
            run.tensorboard = TensorBoardLog(run.save_dir, start_epoch)
    run.tracker = Tracker.start(opt, hyp, resume_ckpt, procs.main)
    if resume_ckpt is not None:
        if procs.main:
            truncate_results(run.results_csv, start_epoch)
        if opt.epochs == int(resume_ckpt["opt"]["epochs"]) and stopper.stopped(start_epoch - 1):
            LOGGER.info(f"The run had stopped early after epoch {start_epoch - 1}; finishing it")
            run.end_epoch = start_epoch  # killed while finishing: train no further than the run left alone did
    if rng_state is not None:
        restore_rng_state(rng_state)  # last, so that nothing above disturbs the restored generators
    return run


def clamp_batch_size(opt: argparse.Namespace, images: int, world_size: int) -> int:
    """The per-process batch size. A --batch-size larger than the training set gives batches of the whole set (the
    loader cannot fill more): opt.batch_size becomes that, said in one line, so that accumulation, weight decay
    and the log follow the batches really trained."""
    real = min(opt.batch_size, math.ceil(images / world_size) * world_size)
    if real < opt.batch_size:
        LOGGER.warning(f"--batch-size {opt.batch_size} is more than the {images} training images: "
                       f"training with batches of {real}")
        opt.batch_size = real
    return opt.batch_size // world_size


def make_run_folder(opt: argparse.Namespace, hyp: dict) -> None:
    save_dir = Path(opt.save_dir)
    (save_dir / "weights").mkdir(parents=True, exist_ok=True)
    (save_dir / "hyp.yaml").write_text(yaml.safe_dump(hyp, sort_keys=False))
    (save_dir / "opt.yaml").write_text(yaml.safe_dump(plain_opt(opt), sort_keys=False))
    LOGGER.info("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in hyp.items()))


def build_loaders(opt, hyp: dict, data: dict, imgsz: int, batch_size: int, gs: int, procs: Processes,
                  device: torch.device):
    """(train loader, its dataset, val loader): every process trains on its share; rank 0 validates."""
    with main_process_first(procs):
        train_loader, dataset = create_dataloader(
            data["train"], imgsz, batch_size, gs, single_cls=opt.single_cls, hyp=hyp, augment=True,
            cache=opt.cache, rect=opt.rect, rank=procs.rank, world_size=procs.world_size, workers=opt.workers,
            shuffle=True, seed=opt.seed, nc=data["nc"], prefix="train: ", pin_memory=device.type == "cuda")
    val_loader = None
    if procs.main:
        val_loader, _ = create_dataloader(
            data["val"], imgsz, batch_size * 2, gs, single_cls=opt.single_cls, hyp=hyp,
            cache=None if opt.noval else opt.cache, rect=True, rank=-1, pad=0.5,
            workers=dataloader_workers(opt.workers * 2, batch_size * 2, procs.world_size),  # rank 0's share of CPUs
            seed=opt.seed, nc=data["nc"], prefix="val: ", pin_memory=device.type == "cuda")
        if ReplayLoader.suits(val_loader):  # the same batches every epoch: collated once, now
            val_loader = ReplayLoader(val_loader)
            val_loader.collate_now()
    return train_loader, dataset, val_loader


def wrap_ddp(model: nn.Module, opt, device: torch.device) -> nn.Module:
    cuda = device.type == "cuda"
    if opt.sync_bn:
        if cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
            LOGGER.info("Using SyncBatchNorm")
        else:
            LOGGER.warning("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernels); ignored on CPU")
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)


def log_run_plan(run: Run) -> None:
    opt, hyp = run.opt, run.hyp
    model_info(de_parallel(run.model), "Model")
    nominal = nominal_accumulate(hyp["nbs"], opt.batch_size)
    first_ni = run.start_epoch * run.nb
    if first_ni > run.nw:
        warmup = f"warm-up of {run.nw} iterations done"
    elif first_ni > 0:
        warmup = (f"warm-up: {run.nw - first_ni} of {run.nw} iterations left, accumulating "
                  f"{run.accumulate} batch{'es' if run.accumulate > 1 else ''} per step now, ramping up")
    else:
        warmup = f"warm-up: {run.nw} iterations, accumulation ramping up from 1 batch per step"
    precision = {"fp16": "fp16 autocast with GradScaler", "bf16": "bf16 autocast", "off": "FP32"}[opt.amp]
    LOGGER.info(f"Image sizes {run.imgsz} train, {run.imgsz} val; {run.train_loader.num_workers} dataloader "
                f"workers; {precision} on {run.device}\n"
                f"Accumulating {nominal} x {opt.batch_size} = {nominal * opt.batch_size} images per optimizer step "
                f"(nominal batch {hyp['nbs']}); {warmup}\nLogging results to {run.save_dir}\n"
                f"Starting training for {opt.epochs} epochs...")
    if run.ema is not None:
        for line in end_of_run_plan(run.ema, opt.epochs):
            LOGGER.info(line)
    if run.posthoc is not None:
        LOGGER.info(run.posthoc.summary())
    if run.companions is not None:
        LOGGER.info(run.companions.summary())
    if run.step.distiller is not None:
        LOGGER.info(run.step.distiller.summary())


def restore_training_state(ckpt: dict, opt, optimizer, scheduler, scaler, stopper, ema, lf, accumulate: int,
                           posthoc: PosthocEMA | None = None):
    """Load the optimizer, schedule, scaler, early stopper, EMA and post-hoc EMAs of a resumed run.

    Returns (start_epoch, best_fitness, last_opt_step, accumulate, rng_state or None). An unfinished run
    continues exactly; a finished run extended with --epochs continues from its FP16 weights.
    """
    start_epoch = int(ckpt["epoch"]) + 1
    state = ckpt.get("train_state", {})
    resume = ckpt.get("resume")
    if ckpt.get("optimizer") is not None:
        load_optimizer_state(optimizer, ckpt["optimizer"])
    if state.get("early_stopping"):
        stopper.load_state_dict(state["early_stopping"])
    if ema is not None:
        if resume is not None:
            planned_steps = ema.total_steps  # of this run, which an --epochs extension makes longer
            ema.load_state_dict({**resume["ema"], "ema": unpacked_state_dict(resume["ema"]["ema"])})
            ema.total_steps = planned_steps
        else:
            weights = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
            ema.load_state_dict({"ema": weights, "updates": int(ckpt["updates"]),
                                 "images": float(state.get("ema_images", int(ckpt["updates"]) * ema.nbs))})
    if posthoc is not None:
        try:
            if resume is not None:
                posthoc.load_state_dict(resume["posthoc"])  # keeps the new plan: an --epochs extension re-spaces
            else:
                posthoc.continue_from_snapshots(int(ckpt["updates"]))  # a finished run, extended
        except (KeyError, ValueError, PosthocError) as e:
            raise TrainError(f"--resume: post-hoc EMA: {e}") from None
    planned = int(ckpt["opt"]["epochs"])
    if resume is not None:
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("scaler") and scaler.is_enabled():  # a disabled scaler saved {}: nothing to restore
            scaler.load_state_dict(resume["scaler"])
    else:
        scheduler.last_epoch = start_epoch - 1
    if opt.epochs != planned:  # extended: follow the schedule stretched to the new length from here on
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * lf(start_epoch - 1)  # epoch e trains at lf(e - 1), see build_scheduler
    LOGGER.info(f"Resuming training from {opt.resume}: epoch {start_epoch} of {opt.epochs}, "
                f"{int(ckpt['updates'])} EMA updates so far")
    return (start_epoch, float(ckpt["best_fitness"]), int(state.get("last_opt_step", -1)),
            int(state.get("accumulate", accumulate)),
            resume["rng"] if resume is not None else None)


def train_epoch(run: Run, epoch: int) -> torch.Tensor:
    """One pass over the training data; returns the mean loss items (box, obj, cls, and kd when distilling)."""
    opt, hyp, procs, device = run.opt, run.hyp, run.procs, run.device
    interrupt_hook = os.getenv(INTERRUPT_HOOK_ENV, "")
    kill_hook = os.getenv(KILL_HOOK_ENV, "")
    kill_at = int(kill_hook) if kill_hook.isdigit() else -1
    interrupt_at = int(interrupt_hook) if interrupt_hook.isdigit() else -1
    run.model.train()
    if run.started_batches is None or run.started_batches[0] != epoch:
        start_epoch_batches(run, epoch)
    batches, run.started_batches = run.started_batches[1], None
    run.step.drop_partial_window()
    loss_names = train_loss_names(run.step.distiller is not None)
    mloss = torch.zeros(len(loss_names), device=device)
    unreadable = set()  # image files this epoch could not read
    if procs.main:
        LOGGER.info(("\n" + "%11s" * (4 + len(loss_names))) % ("Epoch", "GPU_mem", *loss_names, "Instances", "Size"))
    bar = tqdm(enumerate(batches), total=run.nb, disable=not procs.main, bar_format="{l_bar}{bar:10}{r_bar}")
    waited_from = time.perf_counter()
    for i, batch in bar:
        run.timer.add("data wait", time.perf_counter() - waited_from)  # the loader kept the step waiting
        imgs, targets, paths = batch.imgs, batch.targets, batch.paths
        ni = i + run.nb * epoch  # global iteration
        run.position = (epoch, i)
        if ni == kill_at:  # test hooks, see module docstring
            run.writer.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if ni == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        note_unreadable(run, batch)
        unreadable.update(batch.unreadable)
        run.writer.raise_error()  # a checkpoint write of the last epoch that failed (a full disk) ends the run
        # the model's layout while still uint8 (a quarter of the bytes): a no-op for the loader's channels_last
        imgs = imgs.to(device, non_blocking=True).contiguous(memory_format=MEMORY_FORMAT).float().div_(255)
        if ni <= run.nw:
            run.accumulate = warmup_accumulate(ni, run.nw, hyp["nbs"], opt.batch_size)
            apply_warmup(run.optimizer, ni, run.nw, run.lf(epoch), hyp)
        if opt.multi_scale:
            size = multi_scale_size(run.imgsz, run.gs, opt.seed, epoch, i)
            scale = size / max(imgs.shape[2:])
            if scale != 1:
                new_shape = [math.ceil(x * scale / run.gs) * run.gs for x in imgs.shape[2:]]
                imgs = nn.functional.interpolate(imgs, size=new_shape, mode="bilinear", align_corners=False)

        loss_items = run.step(imgs, targets, ni, run.accumulate)

        if procs.main:
            mloss = (mloss * i + loss_items) / (i + 1)
            mem = f"{torch.cuda.memory_reserved(device) / 1e9:.3g}G" if device.type == "cuda" else "0G"
            bar.set_description(("%11s" * 2 + "%11.4g" * (2 + len(loss_names))) % (
                f"{epoch}/{opt.epochs - 1}", mem, *mloss.tolist(), targets.shape[0], imgs.shape[-1]))
            if run.plots and ni < PLOTTED_TRAIN_BATCHES:
                with run.timer("plots"):
                    f = plot_images(imgs, targets, paths, run.save_dir / f"train_batch{ni}.jpg", names=run.names)
                    if run.tensorboard is not None:
                        run.tensorboard.image(f"train_batch{ni}", f)
        waited_from = time.perf_counter()
    if procs.main and unreadable:
        LOGGER.warning(f"epoch {epoch}: {len(unreadable)} image file(s) could not be read and were replaced by other "
                       f"samples ({len(run.unreadable)} in this run so far)")
    return mloss


def start_epoch_batches(run: Run, epoch: int) -> None:
    """Set the train loader's workers loading `epoch`'s first batches. The epoch loop calls it for the next epoch
    as soon as one epoch's training ends, so that they load while the main process validates and saves instead
    of after (a sample is a pure function of (seed, epoch, index): when it is loaded does not change it)."""
    run.train_loader.set_epoch(epoch)
    run.started_batches = (epoch, iter(run.train_loader))


def note_unreadable(run: Run, batch) -> None:
    """Warn once per image file that could not be read (changed or removed since the scan); the loader trained
    on a substitute sample instead."""
    for f in batch.unreadable:
        if f not in run.unreadable:
            run.unreadable.add(f)
            LOGGER.warning(f"WARNING: {f} could not be read (changed or removed since the label scan?); "
                           "training on a substitute sample in its place")


def end_epoch(run: Run, epoch: int, mloss: torch.Tensor) -> bool:
    """Schedule step, and on rank 0 validation of the EMA, results.csv, TensorBoard and checkpoints.
    Returns whether early stopping ends the run."""
    lrs = [g["lr"] for g in run.optimizer.param_groups]
    run.scheduler.step()
    if run.bn_batches is not None:  # averaging weights does not average what their BatchNorm statistics should be
        with run.timer("ema: BatchNorm recompute"):
            recompute_bn_stats(run.ema.ema, run.bn_batches, run.device, check_amp(run.opt.amp, run.device),
                               MEMORY_FORMAT)
    if switch_ema_enabled(run.hyp):  # every process: training goes on from the EMA's weights
        with run.timer("ema: switch into the model"):
            switch_to_average(run.model, run.ema, run.procs.distributed)
    if not run.procs.main:
        return False
    opt, ema = run.opt, run.ema
    final_epoch = epoch + 1 == opt.epochs
    ema.update_attr(de_parallel(run.model), include=EMA_ATTRS)
    with run.timer("non-finite check"):
        bad = non_finite_tensors(ema.ema)
    if bad:
        LOGGER.warning(f"epoch {epoch}: the EMA holds non-finite values; its results are not meaningful")
    if not opt.noval or final_epoch:
        run.results = validate_model(run, ema.ema, compute_loss=run.compute_loss)
        if opt.val_raw:
            run.raw_results = tuple(validate_model(run, de_parallel(run.model))[:4])
    fi = float(fitness(np.array(run.results[:4]).reshape(1, -1))[0])
    stop = run.stopper(epoch, fi)
    run.best_fitness = max(run.best_fitness, fi)
    row = [epoch, *mloss.tolist(), *[float(x) for x in run.results], *lrs]
    row += list(run.raw_results) if opt.val_raw else []
    with run.timer("results.csv, TensorBoard"):
        distilling = run.step.distiller is not None
        append_results_row(run.results_csv, row, opt.val_raw, distilling)
        scalars = dict(zip(results_header(opt.val_raw, distilling)[1:], row[1:]))
        scalars.update({"ema/updates": ema.updates, "ema/decay": ema_decay_now(ema)})
        if run.scaler.is_enabled():
            scalars["amp/scale"] = run.scaler.get_scale()
        if run.tensorboard is not None:
            run.tensorboard.scalars(epoch, scalars)
        if run.tracker is not None:
            run.tracker.epoch(epoch, scalars, run.saved_epoch)
    if not opt.nosave or final_epoch or stop:
        with run.timer("checkpoints"):
            save_epoch_checkpoints(run, epoch, improved=run.best_fitness == fi)
    return stop


def ema_decay_now(ema: ModelEMA) -> float:
    """The decay per step (per nominal batch with ema_unit images) the EMA's schedule has reached: its clock
    counts from the end of the update_after_step copies."""
    clock = math.ceil(ema.images / ema.nbs) if ema.unit == "images" else ema.updates
    return ema.decay_at(clock - ema.update_after_step)


def validate_model(run: Run, model: nn.Module, compute_loss=None) -> tuple:
    """val.run on the run's validation loader, under the run's autocast precision, of the model's inference copy
    (made once, refreshed in place every epoch: the model's own weights are never touched)."""
    copy = run.inference_copies.get(id(model))
    if copy is None:
        copy = run.inference_copies[id(model)] = validate.InferenceCopy(model)
    with run.timer("validation/model refresh"):
        evaluated = copy.refresh()
    results, _, _ = validate.run(run.data, batch_size=run.batch_size * 2, imgsz=run.imgsz, model=evaluated,
                                 copy_model=False, amp_dtype=check_amp(run.opt.amp, run.device),
                                 single_cls=run.opt.single_cls, dataloader=run.val_loader, save_dir=run.save_dir,
                                 plots=False, compute_loss=compute_loss, timer=run.timer)
    return tuple(results)


def build_checkpoint(run: Run, epoch: int) -> dict:
    """last.pt's contents at the end of `epoch`: FP16 weights for use, and the FP32 state an exact resume needs,
    its weights packed into a few contiguous buffers (quicker to copy and write every epoch than ~700 tensors).
    Every tensor is copied to the CPU once, straight into those buffers; the FP16 weights are made there from them."""
    raw, ema = de_parallel(run.model), run.ema
    model_packed, ema_packed = pack_state_dict(raw.state_dict()), pack_state_dict(ema.ema.state_dict())
    ckpt = {
        "format": "yolo-ema", "version": VERSION,
        "epoch": epoch,
        "best_fitness": float(run.best_fitness),
        "model": half_state_dict(unpacked_state_dict(model_packed)),
        "ema": half_state_dict(unpacked_state_dict(ema_packed)),
        "updates": int(ema.updates),
        "optimizer": pack_tree(run.optimizer.state_dict()),  # a copy: the writer's thread saves it while training goes on
        "opt": plain_opt(run.opt),
        "hyp": dict(run.hyp),
        "yaml": raw.yaml,
        "nc": int(raw.nc),
        "names": list(run.names),
        "date": datetime.now(timezone.utc).isoformat(),
        # Small state that continues through an --epochs extension of a finished run too.
        "train_state": {"last_opt_step": int(run.step.last_opt_step), "accumulate": int(run.accumulate),
                        "early_stopping": run.stopper.state_dict(), "ema_images": float(ema.images),
                        "ema_total_steps": ema.total_steps,  # the run's length on the EMA's clock (posthoc_ema.py)
                        **({"teacher": run.step.distiller.teacher.record} if run.step.distiller else {}),
                        **(run.tracker.state() if run.tracker is not None else {})},  # MLflow run id
        # Stripped when the run finishes (strip_resume_state).
        "resume": {
            "model": model_packed,
            "ema": {**ema.state_dict(weights=False), "ema": ema_packed},
            "scaler": run.scaler.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": capture_rng_state(),
        },
    }
    if run.posthoc is not None:
        ckpt["resume"]["posthoc"] = run.posthoc.state_dict()
    if run.companions is not None:  # FP16 for use (kept by finished checkpoints), FP32 for exact resume
        ckpt[COMPANIONS_KEY], ckpt["resume"][COMPANIONS_KEY] = run.companions.checkpoint_entries()
    return ckpt


def save_epoch_checkpoints(run: Run, epoch: int, improved: bool) -> None:
    """best.pt when fitness improved and weights/epochN.pt every --save-period epochs (both finished
    checkpoints, without optimizer or resume state), then last.pt with everything a resume needs.

    last.pt is written last: it is the commit point a resume starts from, so a kill before it repeats this
    epoch and rewrites the files above with identical contents. The files are written on the writer's thread
    while the next epoch trains (the checkpoint holds copies); a failed write (a full disk) ends the run with
    one line saying what last.pt still holds.
    """
    ckpt = build_checkpoint(run, epoch)
    if improved:
        run.writer.submit(finished_checkpoint(ckpt), run.best)
    if run.opt.save_period > 0 and epoch % run.opt.save_period == 0:
        run.writer.submit(finished_checkpoint(ckpt), run.last.parent / f"epoch{epoch}.pt")
    run.writer.submit(ckpt, run.last, on_saved=lambda: setattr(run, "saved_epoch", epoch))


def finish(run: Run, epochs_done: int, t0: float) -> None:
    """Rank 0 after the last epoch: validate best.pt with plots, plot the results, then strip the resume state.

    last.pt is marked finished (its resume state stripped) only once everything else is done, so that a run killed
    while finishing is resumed: --resume then trains no epoch and does what was left."""
    run.finishing = True
    if os.getenv(INTERRUPT_HOOK_ENV) == "finish":  # test hook, see module docstring
        os.kill(os.getpid(), signal.SIGINT)
    if epochs_done:
        LOGGER.info(f"\n{epochs_done} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
    elif run.end_epoch == run.opt.epochs:  # resumed after its last epoch (an early-stopped run has said so)
        LOGGER.info(f"\nAll {run.end_epoch} epochs were trained before the run stopped; finishing it")
    run.writer.close()  # every epoch's files on disk (or the error of one that could not be written)
    if run.posthoc is not None:
        run.posthoc.finish()  # the bank's state at the last step, before the resume state that also holds it goes
    if os.getenv(KILL_HOOK_ENV) == "finish":  # test hook, see module docstring
        os.kill(os.getpid(), signal.SIGKILL)
    if run.best.exists() and not run.opt.noval:
        LOGGER.info(f"\nValidating {run.best}...")
        final = PhaseTimer(run.device, enabled=run.timer.enabled)
        best_model = model_from_checkpoint(load_checkpoint(run.best)).to(run.device)
        run.results, _, _ = validate.run(run.data, batch_size=run.batch_size * 2, imgsz=run.imgsz, model=best_model,
                                         amp_dtype=check_amp(run.opt.amp, run.device), single_cls=run.opt.single_cls,
                                         dataloader=run.val_loader, save_dir=run.save_dir, plots=run.plots,
                                         verbose=True, compute_loss=run.compute_loss, timer=final)
        run.timer.merge(final, prefix="final ")
    if run.plots and run.results_csv.exists():
        with run.timer("plots"):
            plot_results(run.results_csv)
    if run.tensorboard is not None:
        run.tensorboard.close()
    if run.tracker is not None:
        run.tracker.finish(run.save_dir, run.best, run.results)
    if run.last.exists():
        with run.timer("checkpoints"):
            strip_resume_state(run.last)  # keeps the optimizer: --resume --epochs N can extend the run
    sizes = ", ".join(f"{f.name} {file_size(f)}" for f in (run.best, run.last) if f.exists())
    if sizes and getattr(run.opt, "evolve", None) is None:  # an --evolve trial's weights are deleted after it
        LOGGER.info(f"Checkpoints: {sizes} (best.pt without optimizer state: for evaluation and fine-tuning)")
    LOGGER.info(f"Results saved to {shown_path(run.save_dir)}")  # as detect.py, export.py and val.py say it


def train(hyp: dict, opt: argparse.Namespace, device: torch.device, procs: Processes, resume_ckpt: dict | None):
    timer = PhaseTimer(device, enabled=opt.profile and procs.main)
    timer.add("start-up: imports", IMPORT_SECONDS)
    run = setup_run(hyp, opt, device, procs, resume_ckpt, timer)
    # What set-up made (torch's modules, the model, the loaders) lives until the end: frozen, it is no longer walked
    # by the cyclic garbage collector, whose hundreds of collections per run took seconds (bench/profile_train.py).
    gc.collect()
    gc.freeze()
    t0 = time.time()
    epoch = run.start_epoch - 1
    try:
        for epoch in range(run.start_epoch, run.end_epoch):
            mloss = train_epoch(run, epoch)
            if epoch + 1 < run.end_epoch:
                start_epoch_batches(run, epoch + 1)  # loaded during this epoch's validation
            stop = end_epoch(run, epoch, mloss)
            if broadcast(stop, procs):
                break
        if procs.main:
            finish(run, epoch - run.start_epoch + 1, t0)
    except KeyboardInterrupt:
        if run.finishing:  # the weights are final: only best.pt's validation and the plots were left to do
            raise Interrupted(f"interrupted after the last epoch, while validating best.pt and plotting; the trained "
                              f"weights are in {shown_path(run.best)} and {shown_path(run.last)}; finish with: "
                              f"python train.py --resume {shown_path(run.last)}") from None
        at_epoch, batch = run.position
        if batch < 0 and at_epoch == run.start_epoch and run.saved_epoch is None:
            raise NothingTrained(f"interrupted in epoch {at_epoch} before its first batch") from None
        where = f"at batch {batch + 1} of {run.nb}" if batch >= 0 else "before its first batch"
        raise Interrupted(f"interrupted in epoch {at_epoch} {where}; {run.resume_hint()}") from None
    except CheckpointError as e:  # a checkpoint or post-hoc snapshot that could not be written (a full disk)
        raise TrainError(f"{e}; {run.resume_hint()}") from None
    finally:
        gc.unfreeze()  # train() may be called again in this process (tests, notebooks)
        if run.tracker is not None:  # stopped before finish(): what last.pt holds is sent, the run marked KILLED
            run.tracker.end("KILLED", run.saved_epoch)
    if timer.enabled:
        report_profile(run, wall=time.perf_counter() - T_IMPORT, epochs=epoch - run.start_epoch + 1)
    return run.results


def report_profile(run: Run, wall: float, epochs: int) -> None:
    """--profile: the phases of this run (`epochs` of them trained) in a table and in profile.json
    (bench/profile_train.py reads it)."""
    timer = run.timer
    timer.add("other (progress bar, loss averages, schedule...)", max(wall - sum(timer.seconds.values()), 0.0))
    timer.save(run.save_dir / "profile.json", wall=wall, epochs=epochs)
    LOGGER.info(f"\nWhere the {wall:.1f} s of this run went (--profile):\n{timer.table(wall)}")


def main(opt: argparse.Namespace):
    """Run training for parsed options; raises TrainError (one line) for a run that cannot start."""
    procs = Processes.from_env()
    set_logging(procs.rank)
    check_opt(opt)
    resume_ckpt = None
    if opt.resume:
        opt, resume_ckpt = prepare_resume(opt)
    else:
        opt.epochs = DEFAULT_EPOCHS if opt.epochs is None else opt.epochs
        opt.workers = DEFAULT_WORKERS if opt.workers is None else opt.workers
        opt.device = "" if opt.device is None else opt.device
    LOGGER.info(args_line("train", opt))  # what a bug report needs first: the options and the versions
    hyp = load_hyp(resume_ckpt["hyp"] if resume_ckpt is not None else opt.hyp)
    if opt.posthoc:
        hyp = with_posthoc_on(hyp)
    device = setup_processes(opt, procs)
    LOGGER.info(version_line(device))
    new_folder = None  # the run folder, when this run is the one that creates it
    try:
        if opt.evolve is not None:
            return evolve_hyperparameters(opt, hyp, device, procs)
        if not opt.resume:
            save_dir = increment_path(Path(opt.project) / opt.name, opt.exist_ok) if procs.main else None
            opt.save_dir = str(broadcast(save_dir, procs))
            new_folder = Path(opt.save_dir) if procs.main and not Path(opt.save_dir).exists() else None
        return train(hyp, opt, device, procs, resume_ckpt)
    except (KeyboardInterrupt, NothingTrained) as e:
        what = str(e) if isinstance(e, NothingTrained) else "interrupted before training began"
        kept = None if opt.resume else getattr(opt, "save_dir", None)
        raise Interrupted(f"{what}; nothing was saved{discard_run_folder(new_folder, kept)}") from None
    finally:
        if procs.distributed and dist.is_initialized():
            dist.destroy_process_group()


def discard_run_folder(new_folder: Path | None, kept_folder: str | None) -> str:
    """What the message of a run stopped before it trained anything adds about its folder. A folder this run
    created holds only the run's settings and label plots: it is removed, so that the next run takes its name
    again. One that existed before (--exist-ok: kept_folder) is left in place, and said so."""
    if new_folder is not None and new_folder.exists():
        shutil.rmtree(new_folder, ignore_errors=True)
        return f"; removed {shown_path(new_folder)}, which held only the run's settings and label plots"
    if new_folder is None and kept_folder and Path(kept_folder).is_dir():
        return f"; {shown_path(kept_folder)} existed before this run (--exist-ok) and is left in place"
    return ""


def evolve_hyperparameters(opt: argparse.Namespace, hyp: dict, device: torch.device, procs: Processes):
    """--evolve N: an Optuna study of N runs of train() in all, shared by every worker on its storage."""
    from utils.evolve import EvolveError, run_evolution  # optuna and sqlalchemy are imported for --evolve only

    if procs.distributed:
        raise TrainError("--evolve trains each trial in one process: start a worker per machine or GPU, not torchrun")
    project = ROOT / "runs" / "evolve" if opt.project == build_parser().get_default("project") else Path(opt.project)
    try:
        return run_evolution(opt, hyp, project / opt.name, metric_names=METRIC_COLUMNS,
                             train_run=lambda trial_hyp, trial_opt: train(load_hyp(trial_hyp), trial_opt, device,
                                                                          procs, None))
    except EvolveError as e:
        raise TrainError(str(e)) from None
    except (Interrupted, NothingTrained, KeyboardInterrupt):  # in a trial, or between trials
        raise Interrupted("--evolve: interrupted; the trial under way is marked failed and not counted; the same "
                          "command continues the study") from None


def cli(opt: argparse.Namespace) -> int:
    """train.py's exit status: 0 done, 1 a one-line error, 130 interrupted with Ctrl-C."""
    try:
        main(opt)
    except (TrainError, CheckpointError, DatasetError) as e:
        set_logging()
        LOGGER.error(f"train: {e}")
        return 1
    except Interrupted as e:
        if Processes.from_env().main:
            LOGGER.error(f"train: {e}")
        return 130
    except KeyboardInterrupt:  # before the first epoch began
        if Processes.from_env().main:
            LOGGER.error("train: interrupted before training began; nothing was saved")
        return 130
    return 0


if __name__ == "__main__":
    reuse_freed_memory()
    exit_process(cli(CLI_OPT))
