"""SWA for a trained detector (Zhang et al. 2020): cyclical-lr epochs from its raw model, averaged, BN recomputed.

"SWA Object Detection": extra epochs with a cyclical learning rate from a run's final raw model, their epoch-end
checkpoints averaged uniformly, BatchNorm statistics recomputed.

    python swa.py --weights runs/train/exp/weights/last.pt                 # 12 extra epochs, the paper's recipe
    python swa.py --weights runs/train/exp/weights/last.pt --epochs 6 --anneal linear --bn-batches 32

The extra epochs train through train.py's own set-up and step (train.setup_run, train.TrainStep): the run's data,
image size, batch, nominal batch, optimizer, loss gains, augmentation and seed, from the checkpoint. What differs
is the learning rate (utils/swa.py: every epoch anneals from --lr0, default the run's lr0, to --ratio of it, one
value per iteration; no warm-up), a fresh optimizer (no momentum carried over, as the paper's code builds its own
SWA optimizer), no EMA, and no validation. Written under --project/--name:
    weights/epoch{k}.pt   each extra epoch's raw model (finished checkpoints, FP16; val.py reads them)
    weights/swa.pt        their uniform average (torch.optim.swa_utils.AveragedModel) with BatchNorm statistics
                          measured on --bn-batches augmented training batches, as 'model' and 'ema'
    swa_lr.csv            the learning rate of every iteration
The statistics are measured with utils/bn_recompute.py rather than torch.optim.swa_utils.update_bn: the loaders
give uint8 images in Batch records, which update_bn would feed to the model as they are; bn_recompute converts
them as training does (/255, channels_last, the run's autocast), restores every module's mode and momentum, and
reads the same batches the bench's other BatchNorm recompute rows use.
The run starts from the checkpoint's raw weights: FP32 from an unfinished run's resume state, else its FP16 copy.
"""
from __future__ import annotations

import argparse
import csv
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.cli import HelpFormatter, exit_process, shown_path  # noqa: E402

PAPER_EPOCHS, PAPER_RATIO = 12, 0.01  # utils.swa's, here so that --help answers without importing torch


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--weights", required=True, help="a run's last.pt (train.py's checkpoint)")
    p.add_argument("--epochs", type=int, default=PAPER_EPOCHS, help="extra epochs, each one checkpoint averaged")
    p.add_argument("--lr0", type=float, default=None,
                   help="learning rate at each epoch's start (default: the run's lr0)")
    p.add_argument("--ratio", type=float, default=PAPER_RATIO,
                   help="each epoch's last learning rate, a fraction of --lr0")
    p.add_argument("--anneal", choices=("cos", "linear"), default="cos",
                   help="shape of each epoch's decay (cos: MMCV's cyclic policy, which the paper's code uses)")
    p.add_argument("--bn-batches", type=int, default=16, help="training batches to recompute BatchNorm statistics on")
    p.add_argument("--workers", type=int, default=0, help="dataloader workers")
    p.add_argument("--device", default="", help="cuda device (0) or cpu; default: the first GPU, else cpu")
    p.add_argument("--project", default=str(ROOT / "runs" / "swa"), help="where the SWA folder goes")
    p.add_argument("--name", default="exp", help="the SWA folder under --project")
    p.add_argument("--exist-ok", action="store_true", help="write into an existing --project/--name")
    return p.parse_args(argv)


if __name__ == "__main__":
    CLI_OPT = parse_opt()

import torch  # noqa: E402

import train  # noqa: E402
from utils.bn_recompute import FixedBatches, recompute_bn_stats  # noqa: E402
from utils.checkpoint import (FINISHED_KEYS, CheckpointError, half_state_dict, load_checkpoint,  # noqa: E402
                              save_checkpoint, unpacked_state_dict)
from utils.data_config import DatasetError  # noqa: E402
from utils.log import LOGGER, set_logging  # noqa: E402
from utils.paths import increment_path  # noqa: E402
from utils.profiling import PhaseTimer  # noqa: E402
from utils.swa import UniformAverage, cyclic_lr_factor  # noqa: E402
from utils.torch_utils import check_amp, de_parallel  # noqa: E402

# What the extra epochs leave off from the run's hyp: they keep no EMA of any kind (the average is SWA's own).
QUIET_HYP = {"posthoc_sigma_rels": [], "ema_companion_taus": [], "ema_bn_recompute": 0, "ema_switch": False,
             "ema_bema": False}
# What the run's options lose for the extra epochs: validation, plots, logs, autoanchor (the anchors are trained),
# multi-scale and distillation (not SWA's recipe), resume and hyperparameter search.
TRAIN_OVERRIDES = {"cfg": "", "resume": False, "evolve": None, "noautoanchor": True, "noplots": True,
                   "no_tensorboard": True, "noval": True, "val_raw": False, "posthoc": False, "multi_scale": False,
                   "teacher": None, "profile": False}


class SWAError(Exception):
    """An SWA run that cannot start; one line for the user."""


def check_opt(opt: argparse.Namespace) -> None:
    rules = [(opt.epochs >= 1, f"--epochs must be at least 1, got {opt.epochs}"),
             (0 < opt.ratio <= 1, f"--ratio must be in (0, 1], got {opt.ratio}"),
             (opt.lr0 is None or opt.lr0 > 0, f"--lr0 must be positive, got {opt.lr0}"),
             (opt.bn_batches >= 1, f"--bn-batches must be at least 1, got {opt.bn_batches}"),
             (opt.workers >= 0, f"--workers must be 0 or more, got {opt.workers}")]
    for ok, message in rules:
        if not ok:
            raise SWAError(message)


def read_run(weights: Path) -> dict:
    try:
        ckpt = load_checkpoint(weights)
    except CheckpointError as e:
        raise SWAError(str(e)) from None
    if not isinstance(ckpt.get("opt"), dict) or not isinstance(ckpt.get("hyp"), dict) or "train_state" not in ckpt:
        raise SWAError(f"{weights} is not a checkpoint of this project's train.py (it holds no run options)")
    if ckpt.get("model") is None:
        raise SWAError(f"{weights} holds no raw model to continue training")
    return ckpt


def start_checkpoint(ckpt: dict, path: Path) -> Path:
    """The run's raw model as a checkpoint train.py's --weights loads (it loads 'ema' when there is one)."""
    resume = ckpt.get("resume")
    raw = unpacked_state_dict(resume["model"]) if resume is not None else ckpt["model"]
    start = {k: ckpt[k] for k in FINISHED_KEYS if k in ckpt}
    return save_checkpoint({**start, "model": {k: v.clone() for k, v in raw.items()}, "ema": None}, path)


def train_options(ckpt: dict, opt: argparse.Namespace, start: Path, save_dir: Path) -> argparse.Namespace:
    saved = ckpt["opt"]
    for flag, what in (("multi_scale", "--multi-scale"), ("teacher", "--teacher")):
        if saved.get(flag):
            LOGGER.warning(f"swa: the run trained with {what}; the extra epochs train without it")
    o = argparse.Namespace(**{**vars(train.parse_opt([])), **saved, **TRAIN_OVERRIDES})
    o.weights, o.epochs, o.workers, o.device = str(start), opt.epochs, opt.workers, opt.device
    o.project, o.name, o.exist_ok, o.save_dir = str(save_dir.parent), save_dir.name, True, str(save_dir)
    if saved.get("amp") is None:
        o.amp = "bf16" if saved.get("bf16") else None
    return o


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def run(opt: argparse.Namespace) -> Path:
    """Train the extra epochs, average them, recompute BatchNorm; returns swa.pt's path."""
    check_opt(opt)
    weights = Path(opt.weights)
    ckpt = read_run(weights)
    save_dir = increment_path(Path(opt.project) / opt.name, opt.exist_ok)
    (save_dir / "weights").mkdir(parents=True, exist_ok=True)
    start = start_checkpoint(ckpt, save_dir / "weights" / "start.pt")
    topt = train_options(ckpt, opt, start, save_dir)
    hyp = train.load_hyp({**ckpt["hyp"], **QUIET_HYP})
    lr0 = float(hyp["lr0"] if opt.lr0 is None else opt.lr0)
    procs = train.Processes()
    try:
        device = train.setup_processes(topt, procs)
        r = train.setup_run(hyp, topt, device, procs, None, PhaseTimer(device, enabled=False))
    except (train.TrainError, DatasetError) as e:
        raise SWAError(str(e)) from None
    amp_dtype = check_amp(topt.amp, device)
    step = train.TrainStep(r.model, r.compute_loss, r.optimizer, r.scaler, None, amp_dtype)
    average, lrs = UniformAverage(), []
    info = {"from": str(weights), "epochs": int(opt.epochs), "lr0": lr0, "ratio": float(opt.ratio),
            "anneal": opt.anneal, "bn_batches": int(opt.bn_batches), "run_epochs": int(ckpt["epoch"]) + 1}
    first_epoch = int(ckpt["epoch"]) + 1  # the loader's epoch numbers go on from the run's (new augmentation draws)
    steps = 0
    LOGGER.info(f"SWA: {opt.epochs} extra epochs of {r.nb} iterations from {shown_path(weights)}'s raw model, "
                f"learning rate {lr0:g} -> {lr0 * opt.ratio:g} ({opt.anneal}) in every epoch")
    for k in range(opt.epochs):
        r.model.train()
        r.train_loader.set_epoch(first_epoch + k)
        step.drop_partial_window()
        for i, batch in enumerate(r.train_loader):
            lr = lr0 * cyclic_lr_factor(i, r.nb, opt.ratio, opt.anneal)
            set_lr(r.optimizer, lr)
            ni = k * r.nb + i
            imgs = batch.imgs.to(device, non_blocking=True).contiguous(memory_format=train.MEMORY_FORMAT)
            imgs = imgs.float().div_(255)
            tried = ni - step.last_opt_step >= r.accumulate  # TrainStep's rule: this iteration ends a window
            loss = step(imgs, batch.targets, ni, r.accumulate)
            steps += tried and ni not in step.skipped
            lrs.append({"epoch": k, "iteration": i, "lr": lr, "loss": float(loss.sum())})
        average.add(r.model)
        state = de_parallel(r.model).state_dict()
        save_checkpoint(swa_checkpoint(ckpt, state, first_epoch + k, steps, {**info, "averaged": 1}),
                        save_dir / "weights" / f"epoch{k}.pt")
        LOGGER.info(f"SWA epoch {k + 1}/{opt.epochs}: mean loss {sum(x['loss'] for x in lrs[-r.nb:]) / r.nb:.4g}; "
                    f"{average.count} checkpoint(s) averaged")
    batches = FixedBatches.from_data(r.data["train"], r.imgsz, r.batch_size, r.gs, opt.bn_batches, hyp,
                                     seed=int(topt.seed), single_cls=bool(topt.single_cls))
    recompute_bn_stats(average.module, batches, device, amp_dtype, train.MEMORY_FORMAT)
    with open(save_dir / "swa_lr.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "iteration", "lr", "loss"])
        writer.writeheader()
        writer.writerows(lrs)
    final = swa_checkpoint(ckpt, average.module.state_dict(), first_epoch + opt.epochs - 1, steps,
                           {**info, "averaged": average.count})
    final["ema"] = final["model"]
    path = save_checkpoint(final, save_dir / "weights" / "swa.pt")
    r.writer.close()
    LOGGER.info(f"SWA: the average of {average.count} epoch checkpoints, BatchNorm statistics recomputed on "
                f"{len(batches)} training batches, saved to {shown_path(path)}")
    return path


def swa_checkpoint(ckpt: dict, state: dict, epoch: int, steps: int, info: dict) -> dict:
    """A finished checkpoint of the run's kind holding ``state`` (FP16) as its model, and what SWA did ('swa':
    the settings, the run's own epochs and how many checkpoints the weights average; 'updates': SWA's steps)."""
    out = {k: ckpt[k] for k in FINISHED_KEYS if k in ckpt}
    out.update(epoch=int(epoch), model=half_state_dict(state), ema=None, updates=int(steps),
               date=datetime.now(timezone.utc).isoformat(), swa=info)
    return out


def main(argv=None) -> int:
    opt = parse_opt(argv) if not isinstance(argv, argparse.Namespace) else argv
    set_logging()
    try:
        run(opt)
    except SWAError as e:
        LOGGER.error(f"swa: {e}")
        return 1
    return 0


if __name__ == "__main__":
    exit_process(main(CLI_OPT))
