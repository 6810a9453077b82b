"""Does the EMA make a better detector on images it never trained on? Test-split mAP of every averaged model.

    python bench/ema_quality.py --regime short           # 1,950 optimizer steps a run, 3 seeds, every variant
    python bench/ema_quality.py --regime long            # 10,500 optimizer steps a run
    python bench/ema_quality.py --seeds 0 1 2 3 4 --epochs 80 --variants ramp switch
    python bench/ema_quality.py --quick                  # one seed, 2 epochs, a tiny digits set (a smoke test)

One recipe (data, model, image size, batch, epochs, hyp) is trained once per seed and per variant with train.py
(as a subprocess, `--save-period 1 --deterministic`; --jobs N runs N at a time). --regime picks a recipe from
REGIMES (flags given on the command line still win); without it the flags' defaults are the recipe. Each variant
differs from the recipe's hyp by its own keys:
  ramp    the recipe's EMA (YOLOv5's ramp, tau 2000), with post-hoc snapshots and the raw model validated
          every epoch (train.py --posthoc --val-raw), and a companion EMA per --companion-taus (the same ramp
          with another tau, utils/ema_companions.py): every tau from the one raw trajectory, no run of its own
  switch  Switch EMA (`ema_switch: true`: the EMA copied into the model at every epoch end)
  bema    BEMA (bias-corrected EMA) (`ema_bema: true`)
  images  the ramp EMA with `ema_unit: images` (its horizon counted in images)
  swa     SWA for detectors (swa.py: --swa-epochs extra epochs from the ramp run's final raw model with a cyclical
          learning rate, their checkpoints averaged uniformly, BatchNorm recomputed); the table states its extra
          training
A variant whose hyp key this checkout does not know is skipped, and the output says so.

Every model below is evaluated on the data's `test` split (val.run, task test), which nothing here ever chooses
with; choices (best epoch, post-hoc width) are made on `val`:
  raw model at the end, and at its best val epoch (the epoch whose raw val fitness, results.csv, is highest);
  each variant's averaged model at the end and at its best val epoch (best.pt);
  each companion EMA at the end and at its best val epoch (its val mAP measured here from the epoch checkpoints);
  SWA's average (its statistics recomputed as SWA prescribes);
  the post-hoc EMA whose width posthoc_ema.py picked on val (ramp runs);
  each averaged model again with its BatchNorm statistics recomputed on --bn-batches training batches
  (utils.bn_recompute): averaging weights does not average what the statistics should be.
The table gives, per model, the mean and the sample standard deviation over seeds of test mAP50-95 and mAP50, and
of its mAP50-95 minus the raw model's at the end of the same seed's run (the paired gain);
`ema_quality.csv` holds every seed's figures, `ema_quality.png` test mAP against epoch for the raw model and the
EMA of the ramp runs (every seed, and their mean).

Finished runs are reused (a bench that was stopped continues: an unfinished run is resumed with
train.py --resume); a run folder made with another recipe is refused, --fresh trains again.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.cli import HelpFormatter, exit_process, shown_path  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    hyp: dict  # keys set on top of the recipe's hyp
    label: str  # what the table calls its averaged model
    flags: tuple = ()  # extra train.py flags


VARIANTS = {
    "ramp": Variant("ramp", {}, "EMA", ("--posthoc", "--val-raw")),
    "switch": Variant("switch", {"ema_switch": True}, "Switch EMA"),
    "bema": Variant("bema", {"ema_bema": True}, "BEMA"),
    # BEMA's burn-in (the paper's tau): theta_0 is the model half-way through the default 30-epoch recipe
    # (1,125 steps) instead of the random initialisation its correction otherwise extrapolates from.
    "bema_burnin": Variant("bema_burnin", {"ema_bema": True, "ema_update_after_step": 560}, "BEMA burn-in 560"),
    "images": Variant("images", {"ema_unit": "images"}, "EMA images"),
    # Not a train.py run: swa.py's extra epochs on top of the ramp run of the same seed (trained first if need be).
    "swa": Variant("swa", {}, "SWA"),
}
# The recipes users train: a short run (1,000-2,000 optimizer steps, what a small custom dataset gets) and a long one
# (>= 10,000 steps: YOLOv5's tau-2000 ramp is past 1 - exp(-5) and really averages). nbs equal to the batch makes
# every batch one optimizer step, so steps = epochs x 2,400 / 16 on the digits set. `hyp` is set on top of --hyp
# (a key given with --set wins): with YOLOv5's scale 0.5 and class gain 0.5 yolov5n localises the digits but its
# class loss stays at chance for thousands of steps; scale 0.2 (no digit drawn under the 8x8 source's resolution)
# with class gain 4.0 (YOLOv5's nc / 80 scaling still applied) reads them within ~700 steps; neither alone does
# (docs/ema_quality.md, "A recipe whose detector reads the digits").
READS_THE_DIGITS = {"nbs": 16, "scale": 0.2, "cls": 4.0}
REGIMES = {
    "short": {"data": "digits.yaml", "img": 64, "batch_size": 16, "epochs": 13, "hyp": READS_THE_DIGITS},  # 1,950 steps
    "long": {"data": "digits.yaml", "img": 64, "batch_size": 16, "epochs": 70, "hyp": READS_THE_DIGITS},  # 10,500
}
# fliplr: a mirrored 2, 3 or 7 is not that digit (YOLOv5 users train text without flips). ema_tau: the ramp variant
# is YOLOv5's EMA, tau 2000 steps, whatever the hyp file says.
RECIPE_HYP = ("fliplr=0.0", "ema_tau=2000")
QUICK = {"epochs": 2, "seeds": [0], "img": 64, "batch_size": 8, "bn_batches": 2, "plot_points": 2,
         "sigma_rel": [0.05, 0.15], "posthoc_num": 3, "name": "quick", "swa_epochs": 2, "companion_taus": [200]}
QUICK_DIGITS = {"canvas": 64, "train": 48, "val": 16, "test": 24, "min_digits": 1, "max_digits": 3, "min_size": 12,
                "max_size": 30}
COLUMNS = ("model", "mAP50-95", "mAP50-95 sd", "mAP50", "mAP50 sd", "gain vs raw end", "gain sd", "seeds",
           "chosen on val", "extra training")


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", default="digits.yaml", help="dataset yaml with train, val and test splits")
    p.add_argument("--cfg", default="yolov5n.yaml", help="model yaml")
    p.add_argument("--hyp", default=str(ROOT / "hyp" / "hyp.scratch-low.yaml"), help="the recipe's hyp file")
    p.add_argument("--set", nargs="*", default=list(RECIPE_HYP), metavar="KEY=VALUE", dest="hyp_set",
                   help="hyp keys changed from --hyp for every run (values read as YAML); the default turns "
                        "off horizontal flips, which turn digits into other glyphs, and sets YOLOv5's tau")
    p.add_argument("--img", type=int, default=64, help="train, val and test image size")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (the hyp's nbs sets the nominal batch)")
    p.add_argument("--epochs", type=int, default=30, help="epochs per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS), help="EMA variants")
    p.add_argument("--first-seed-only", nargs="*", choices=tuple(VARIANTS), default=[], metavar="VARIANT",
                   help="variants trained on the first of --seeds only (when the budget holds one seed of those "
                        "that need runs of their own); the table's seeds column says so")
    p.add_argument("--regime", choices=tuple(REGIMES), default=None,
                   help="a recipe of REGIMES: data, --img, --batch-size, --epochs and hyp keys (nbs, scale, cls: "
                        "--set on top of the defaults)")
    p.add_argument("--companion-taus", type=float, nargs="*", default=[200, 500],
                   help="taus of the companion EMAs the ramp runs keep (hyp ema_companion_taus)")
    p.add_argument("--swa-epochs", type=int, default=12, help="SWA's extra epochs (swa.py --epochs; the paper's 12)")
    p.add_argument("--bn-batches", type=int, default=16, help="training batches to recompute BatchNorm statistics on")
    p.add_argument("--sigma-rel", type=float, nargs="+", default=None,
                   help="post-hoc widths to sweep on val (posthoc_ema.py --sigma-rel; default: its own)")
    p.add_argument("--posthoc-num", type=int, default=7, help="widths in the post-hoc sweep (posthoc_ema.py --num)")
    p.add_argument("--plot-points", type=int, default=6, help="epochs per run whose test mAP is plotted")
    p.add_argument("--workers", type=int, default=1, help="dataloader workers per run")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (evaluation goes on meanwhile)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch/OpenMP threads for training and evaluation (0: torch's default); 1 is much "
                        "faster than 2 on a machine whose cores other jobs share")
    p.add_argument("--project", default=str(ROOT / "runs" / "ema_quality"), help="where the runs go")
    p.add_argument("--name", default="digits", help="the recipe's folder under --project (digits-REGIME with --regime)")
    p.add_argument("--train-only", action="store_true",
                   help="train (or wait for) the runs without evaluating them: another bench process reports")
    p.add_argument("--fresh", action="store_true", help="train every run again instead of reusing finished ones")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test of the bench: one seed, 2 epochs, batch 8, one companion tau, 2 SWA epochs, a "
                        "tiny digits set made under --project/quick (flags given on the command line still win)")
    opt = p.parse_args(argv)
    if opt.quick and opt.regime:
        p.error("--quick is a recipe of its own: leave out --regime")
    if opt.quick:  # its own sizes, where the command line left the defaults
        for key, value in QUICK.items():
            if getattr(opt, key) == p.get_default(key):
                setattr(opt, key, value)
    if opt.regime:  # the regime's recipe, where the command line left the defaults
        regime = REGIMES[opt.regime]
        for key in ("data", "img", "batch_size", "epochs"):
            if getattr(opt, key) == p.get_default(key):
                setattr(opt, key, regime[key])
        given = {pair.split("=", 1)[0] for pair in opt.hyp_set}
        opt.hyp_set = [*opt.hyp_set, *(f"{k}={v}" for k, v in regime["hyp"].items() if k not in given)]
        if opt.name == p.get_default("name"):
            opt.name = f"digits-{opt.regime}"
    return opt


if __name__ == "__main__":
    CLI_OPT = parse_opt()

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import posthoc_ema  # noqa: E402
import val as validate  # noqa: E402
from data import make_digits  # noqa: E402
from models.yolo import size_multiple  # noqa: E402
from utils.bn_recompute import FixedBatches, recompute_bn_stats  # noqa: E402
from utils.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from utils.data_config import DatasetError, check_dataset  # noqa: E402
from utils.ema import HYP_KEYS as EMA_HYP_KEYS  # noqa: E402
from utils.ema_companions import companion_checkpoint, companion_name  # noqa: E402
from utils.log import LOGGER, set_logging  # noqa: E402
from utils.metrics import fitness  # noqa: E402


class BenchError(Exception):
    """A bench that cannot run as asked; one line for the user."""


@dataclass
class Recipe:
    """What every run of the bench shares; stored beside the runs so that reuse never mixes recipes."""
    data: str
    cfg: str
    hyp: dict
    img: int
    batch_size: int
    epochs: int
    bn_batches: int


@dataclass
class Score:
    model: str
    seed: int
    map50_95: float
    map50: float
    chosen: str = ""  # what val chose: an epoch, a width
    extra: str = ""  # training beyond the recipe's run that the model needed (SWA's epochs)


@dataclass
class Bench:
    opt: argparse.Namespace
    recipe: Recipe
    data: dict  # check_dataset's dict
    folder: Path
    scores: list[Score] = field(default_factory=list)
    curves: list[dict] = field(default_factory=list)  # per-epoch test mAP of the ramp runs
    skipped: list[str] = field(default_factory=list)
    train_seconds: dict = field(default_factory=dict)
    refreshed: set = field(default_factory=set)  # run folders --fresh has trained again in this process already


# ------------------------------------------------------------------------------------------------ training
def variant_hyp(bench: Bench, variant: Variant) -> dict:
    """The hyp a variant's run trains with: the recipe's, the variant's keys, and the ramp runs' companion EMAs."""
    hyp = {**bench.recipe.hyp, **variant.hyp}
    if variant.name == "ramp" and bench.opt.companion_taus:
        hyp["ema_companion_taus"] = [int(t) if float(t).is_integer() else t for t in bench.opt.companion_taus]
    return hyp


def variant_available(variant: Variant, base_hyp: dict) -> str | None:
    """None when this checkout's train.py knows the variant's hyp keys (they are in its shipped hyp file or
    among the EMA's optional keys), else why not."""
    shipped = yaml.safe_load((ROOT / "hyp" / "hyp.scratch-low.yaml").read_text())
    unknown = [k for k in variant.hyp if k not in shipped and k not in base_hyp and k not in EMA_HYP_KEYS]
    return f"hyp key {', '.join(unknown)} is not known to this checkout" if unknown else None


def run_folder(bench: Bench, variant: Variant, seed: int) -> Path:
    return bench.folder / f"{variant.name}-s{seed}"


def finished(last: Path, epochs: int) -> bool | None:
    """True: last.pt of a run that trained all its epochs; False: a run that can be resumed; None: no run."""
    if not last.exists():
        return None
    ckpt = load_checkpoint(last)
    return "resume" not in ckpt and int(ckpt["epoch"]) + 1 == epochs


def train(bench: Bench, variant: Variant, seed: int) -> Path:
    """The run of this variant and seed: reused when finished, resumed when stopped, else trained. Another bench
    process training the same run is waited for (a lock file beside the runs), so benches can share runs. SWA
    trains on top of the ramp run of its seed, which it gets (or waits for) first."""
    ramp = train(bench, VARIANTS["ramp"], seed) if variant.name == "swa" else None
    folder = run_folder(bench, variant, seed)
    with open(bench.folder / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a killed holder's process ends
        return train_swa(bench, seed, ramp, folder) if ramp is not None else train_locked(bench, variant, seed, folder)


def swa_finished(swa_pt: Path, ramp_last: Path, epochs: int) -> bool:
    """Whether swa_pt is SWA of this many epochs from the ramp run's last.pt as it is now."""
    if not swa_pt.exists() or swa_pt.stat().st_mtime < ramp_last.stat().st_mtime:
        return False
    info = load_checkpoint(swa_pt).get("swa") or {}
    return info.get("epochs") == epochs and Path(info.get("from", "")).resolve() == ramp_last.resolve()


def train_swa(bench: Bench, seed: int, ramp: Path, folder: Path) -> Path:
    """swa.py on the ramp run's final model (a subprocess, as train.py's runs): reused when done for this run."""
    last, epochs = ramp / "weights" / "last.pt", bench.opt.swa_epochs
    if swa_finished(folder / "weights" / "swa.pt", last, epochs):
        LOGGER.info(f"swa seed {seed}: reusing {shown_path(folder)}")
        return folder
    env = dict(os.environ)
    if bench.opt.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(bench.opt.threads)
    cmd = [sys.executable, str(ROOT / "swa.py"), "--weights", str(last), "--epochs", str(epochs),
           "--bn-batches", str(bench.recipe.bn_batches), "--workers", str(bench.opt.workers), "--device", "cpu",
           "--project", str(folder.parent), "--name", folder.name, "--exist-ok"]
    LOGGER.info(f"swa seed {seed}: {epochs} extra epochs from {shown_path(last)} into {shown_path(folder)}")
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(folder / "swa.log", "a") as log:
        status = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    bench.train_seconds[folder.name] = time.time() - t0
    if status != 0:
        raise BenchError(f"swa.py failed ({status}) for seed {seed}; see {shown_path(folder / 'swa.log')}")
    return folder


def train_locked(bench: Bench, variant: Variant, seed: int, folder: Path) -> Path:
    stamp = folder / "bench_recipe.json"
    hyp = variant_hyp(bench, variant)
    wanted = {**asdict(bench.recipe), "hyp": hyp, "seed": seed, "variant": variant.name}
    if bench.opt.fresh and folder.exists() and folder.name not in bench.refreshed:  # SWA asks for its ramp run too
        shutil.rmtree(folder)
    bench.refreshed.add(folder.name)
    if folder.exists():
        if not stamp.exists() or json.loads(stamp.read_text()) != wanted:
            raise BenchError(f"{shown_path(folder)} holds a run of another recipe; pass --fresh or another --name")
        state = finished(folder / "weights" / "last.pt", bench.recipe.epochs)
        if state:
            LOGGER.info(f"{variant.name} seed {seed}: reusing the finished run in {shown_path(folder)}")
            return folder
    else:
        folder.mkdir(parents=True)
        stamp.write_text(json.dumps(wanted, indent=1))
        state = None
    env = dict(os.environ)
    if bench.opt.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(bench.opt.threads)
    if state is False:
        cmd = ["--resume", str(folder / "weights" / "last.pt")]
        LOGGER.info(f"{variant.name} seed {seed}: resuming the stopped run in {shown_path(folder)}")
    else:
        hyp_file = folder / "hyp_in.yaml"
        hyp_file.write_text(yaml.safe_dump(hyp, sort_keys=False))
        cmd = ["--data", bench.recipe.data, "--cfg", bench.recipe.cfg, "--weights", "", "--hyp", str(hyp_file),
               "--img", str(bench.recipe.img), "--batch-size", str(bench.recipe.batch_size),
               "--epochs", str(bench.recipe.epochs), "--seed", str(seed), "--deterministic",
               "--save-period", "1", "--project", str(folder.parent), "--name", folder.name, "--exist-ok",
               "--noplots", "--no-tensorboard", *variant.flags]
        LOGGER.info(f"{variant.name} seed {seed}: training into {shown_path(folder)}")
    cmd += ["--workers", str(bench.opt.workers), "--device", "cpu"]
    t0 = time.time()
    with open(folder / "train.log", "a") as log:
        status = subprocess.run([sys.executable, str(ROOT / "train.py"), *cmd], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT).returncode
    bench.train_seconds[folder.name] = time.time() - t0
    if status != 0:
        raise BenchError(f"train.py failed ({status}) for {variant.name} seed {seed}; see {shown_path(folder / 'train.log')}")
    return folder


# ------------------------------------------------------------------------------------------------ evaluation
def test_map(bench: Bench, model: torch.nn.Module, task: str = "test") -> tuple[float, float]:
    """(mAP50-95, mAP50) of a model on the test split (or the one `task` names)."""
    results, _, _ = validate.run(bench.data, model=model, task=task, imgsz=bench.recipe.img,
                                 batch_size=2 * bench.recipe.batch_size, workers=bench.opt.workers, plots=False)
    return float(results[3]), float(results[2])


def with_bn_recomputed(bench: Bench, model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The model with its BatchNorm statistics measured again on training batches (chosen by the seed)."""
    stride = size_multiple(model)
    batches = FixedBatches.from_data(bench.data["train"], bench.recipe.img, bench.recipe.batch_size, stride,
                                     bench.recipe.bn_batches, bench.recipe.hyp, seed=seed)
    recompute_bn_stats(model, batches)
    return model


def weights_map(bench: Bench, weights: Path, use_ema: bool, bn: bool, seed: int, companion: str | None = None,
                split: str = "test") -> tuple[float, float]:
    """Test (or val) (mAP50-95, mAP50) of a checkpoint's EMA, raw or companion EMA weights, optionally with
    BatchNorm recomputed; kept in the run's test_map_cache.json (keyed by the file's size and time), so that
    reporting again costs nothing."""
    cache_file = weights.parent.parent / "test_map_cache.json" if weights.parent.name == "weights" else None
    stat = weights.stat()
    bn_kind = "bn-augmented" if bn else "-"  # the recompute's batches are augmented since this bench's first run
    which = companion or ("ema" if use_ema else "raw")
    key = f"{weights.name}|{which}|{bn_kind}|{stat.st_size}|{stat.st_mtime_ns}"
    key += "" if split == "test" else f"|{split}"  # test keys as before: caches of earlier runs stay valid
    cache = json.loads(cache_file.read_text()) if cache_file and cache_file.exists() else {}
    if key not in cache:
        ckpt = load_checkpoint(weights)
        model = model_from_checkpoint(companion_checkpoint(ckpt, companion) if companion else ckpt, use_ema=use_ema)
        cache[key] = test_map(bench, with_bn_recomputed(bench, model, seed) if bn else model, split)
        if cache_file:
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, cache_file)
    return tuple(cache[key])


def score(bench: Bench, name: str, seed: int, weights: Path, use_ema: bool = True, chosen: str = "",
          bn: bool = False, companion: str | None = None, extra: str = "") -> None:
    """Test mAP of a checkpoint's model (and, with bn, of the same weights with recomputed BatchNorm statistics)."""
    bench.scores.append(Score(name, seed, *weights_map(bench, weights, use_ema, False, seed, companion), chosen, extra))
    if bn:
        bench.scores.append(Score(f"{name} + BN recompute", seed,
                                  *weights_map(bench, weights, use_ema, True, seed, companion), chosen, extra))


def results_table(run: Path) -> pd.DataFrame:
    df = pd.read_csv(run / "results.csv", skipinitialspace=True)
    df.columns = [c.strip() for c in df.columns]
    return df


def best_epoch(df: pd.DataFrame, prefix: str) -> int:
    """The epoch whose val fitness (0.1 mAP50 + 0.9 mAP50-95) is highest, for the EMA ('metrics') or raw model."""
    fi = fitness(np.stack([np.zeros(len(df)), np.zeros(len(df)), df[f"{prefix}/mAP_0.5"], df[f"{prefix}/mAP_0.5:0.95"]], 1))
    return int(df["epoch"].iloc[int(np.argmax(fi))])


def companion_label(name: str) -> str:
    """'EMA tau 200' for the companion 'tau200': the rows a separate tau-200 run once had."""
    return f"EMA tau {name[len('tau'):]}"


def companion_val_table(bench: Bench, run: Path, name: str, seed: int) -> pd.DataFrame:
    """Per epoch, the companion's val mAPs (results.csv's columns for it), measured from the epoch checkpoints:
    train.py validates only the main EMA."""
    rows = []
    for epoch in range(bench.recipe.epochs):
        m, m50 = weights_map(bench, run / "weights" / f"epoch{epoch}.pt", True, False, seed, name, split="val")
        rows.append({"epoch": epoch, f"{name}/mAP_0.5": m50, f"{name}/mAP_0.5:0.95": m})
    return pd.DataFrame(rows)


def evaluate_companions(bench: Bench, seed: int, run: Path) -> None:
    """Each companion EMA of a ramp run at the end and at its best val epoch, as the main EMA."""
    for tau in bench.opt.companion_taus:
        name = companion_name(tau)
        label = companion_label(name)
        score(bench, f"{label}, end", seed, run / "weights" / "last.pt", bn=True, companion=name)
        k = best_epoch(companion_val_table(bench, run, name, seed), name)
        score(bench, f"{label}, best val epoch", seed, run / "weights" / f"epoch{k}.pt", chosen=f"epoch {k}",
              bn=True, companion=name)


def swa_label(bench: Bench) -> str:
    return f"SWA ({bench.opt.swa_epochs} extra epochs)"


def swa_extra(bench: Bench) -> str:
    """SWA's training beyond the recipe's run: its epochs, and what they are as a share of the run's."""
    n, e = bench.opt.swa_epochs, bench.recipe.epochs
    return f"+{n} epochs (+{n / e:.0%} of the run's {e})"


def evaluate_run(bench: Bench, variant: Variant, seed: int, run: Path) -> None:
    weights = run / "weights"
    if variant.name == "swa":  # its statistics are recomputed already: SWA's own last step
        score(bench, swa_label(bench), seed, weights / "swa.pt", extra=swa_extra(bench))
        return
    df = results_table(run)
    label = variant.label
    if variant.name == "ramp":
        score(bench, "raw, end", seed, weights / "last.pt", use_ema=False)
        k = best_epoch(df, "raw")
        score(bench, "raw, best val epoch", seed, weights / f"epoch{k}.pt", use_ema=False, chosen=f"epoch {k}")
    score(bench, f"{label}, end", seed, weights / "last.pt", bn=True)
    k = best_epoch(df, "metrics")
    score(bench, f"{label}, best val epoch", seed, weights / f"epoch{k}.pt", chosen=f"epoch {k}", bn=True)
    if variant.name == "ramp":
        evaluate_posthoc(bench, seed, run)
        evaluate_companions(bench, seed, run)
        plot_points(bench, seed, run, df)


def evaluate_posthoc(bench: Bench, seed: int, run: Path) -> None:
    """posthoc_ema.py's sweep on the run (every width validated on val; done once per run), then its choice on test."""
    best = run / "weights" / "posthoc_best.pt"
    sweep_file = run / "posthoc_ema.csv"
    if not (sweep_file.exists() and sweep_file.stat().st_mtime > (run / "weights" / "last.pt").stat().st_mtime):
        argv = ["--run", str(run), "--workers", str(bench.opt.workers), "--device", "cpu",
                "--num", str(bench.opt.posthoc_num)]
        if bench.opt.sigma_rel:
            argv += ["--sigma-rel", *map(str, bench.opt.sigma_rel)]
        if posthoc_ema.main(argv) != 0:  # one run's sweep failing leaves every other figure standing
            bench.skipped.append(f"post-hoc EMA of {run.name}: posthoc_ema.py failed (its message is in the log above)")
            return
    rows = pd.read_csv(sweep_file)
    sweep = rows[rows["candidate"] == "posthoc"]
    chosen = sweep.iloc[int(np.argmax(sweep["fitness"].to_numpy()))]
    # posthoc_ema.py calls the width posthoc_best.pt only when the run's own models do not beat it
    if chosen["fitness"] < rows["fitness"].max():
        best = posthoc_ema.width_file(run / "weights", float(chosen["sigma_rel"]))
    score(bench, "post-hoc EMA, width chosen on val", seed, best, chosen=f"sigma_rel {chosen['sigma_rel']:.3g}",
          bn=True)


def plot_epochs(bench: Bench) -> list[int]:
    """The epochs of a run whose test mAP is plotted: evenly spaced, the first and the last included."""
    return [int(e) for e in np.unique(np.linspace(0, bench.recipe.epochs - 1, max(bench.opt.plot_points, 2)).round())]


def plot_points(bench: Bench, seed: int, run: Path, df: pd.DataFrame) -> None:
    """Test mAP of the raw model and the EMA at evenly spaced epochs of a ramp run (and the last)."""
    for epoch in plot_epochs(bench):
        row = df[df["epoch"] == epoch].iloc[0]
        for which, use_ema, prefix in (("raw", False, "raw"), ("EMA", True, "metrics")):
            m, m50 = weights_map(bench, run / "weights" / f"epoch{epoch}.pt", use_ema, False, seed)
            bench.curves.append({"seed": seed, "epoch": epoch, "model": which, "test mAP50-95": m,
                                 "test mAP50": m50, "val mAP50-95": float(row[f"{prefix}/mAP_0.5:0.95"])})


# ------------------------------------------------------------------------------------------------ report
def row_order(companion_taus=(), swa_epochs: int = 0) -> list[str]:
    """The table's rows in reading order: the raw model, then each variant's averaged models as VARIANTS lists them
    (the ramp's post-hoc EMA and companion EMAs after its own)."""
    def both(label):
        return [f"{label}, {kind}{bn}" for kind in ("end", "best val epoch") for bn in ("", " + BN recompute")]
    rows = ["raw, end", "raw, best val epoch"]
    for v in VARIANTS.values():
        if v.name == "swa":
            rows.append(f"SWA ({swa_epochs} extra epochs)")
            continue
        rows += both(v.label)
        if v.name == "ramp":
            rows += ["post-hoc EMA, width chosen on val", "post-hoc EMA, width chosen on val + BN recompute"]
            for tau in companion_taus:
                rows += both(companion_label(companion_name(tau)))
    return rows


def summary(scores: list[Score], order: list[str] | None = None) -> pd.DataFrame:
    """One row per model: mean and sample sd over seeds, the gain over the raw model at the end of the same seed's
    run (paired by seed: the runs of one seed share their data order, so the difference is less noisy than either),
    and what val chose for each seed, in seed order."""
    df = pd.DataFrame([asdict(s) for s in scores]).sort_values("seed", kind="stable")  # runs finish in any order
    raw_end = df[df["model"] == "raw, end"].set_index("seed")["map50_95"]
    order = row_order() if order is None else order
    rows = []
    for name, g in sorted(df.groupby("model"), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        def sd(x):
            return float(x.std(ddof=1)) if len(x) > 1 else float("nan")
        gain = g.set_index("seed")["map50_95"] - raw_end.reindex(g["seed"]).to_numpy()
        rows.append({"model": name, "mAP50-95": g["map50_95"].mean(), "mAP50-95 sd": sd(g["map50_95"]),
                     "mAP50": g["map50"].mean(), "mAP50 sd": sd(g["map50"]), "gain vs raw end": gain.mean(),
                     "gain sd": sd(gain), "seeds": len(g), "chosen on val": ", ".join(c for c in g["chosen"] if c),
                     "extra training": next((x for x in g["extra"] if x), "-")})
    return pd.DataFrame(rows, columns=COLUMNS)


def markdown(table: pd.DataFrame) -> str:
    def cell(v):  # three significant digits: mAPs of a barely trained model are ~1e-4, of a good one ~0.5
        return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def plot_curves(curves: list[dict], path: Path, title: str) -> Path:
    df = pd.DataFrame(curves)
    fig, ax = plt.subplots(figsize=(7, 4.5), tight_layout=True)
    for which, colour in (("raw", "tab:orange"), ("EMA", "tab:blue")):
        d = df[df["model"] == which]
        for _, g in d.groupby("seed"):
            ax.plot(g["epoch"], g["test mAP50-95"], color=colour, alpha=0.3, linewidth=1)
        mean = d.groupby("epoch")[["test mAP50-95", "val mAP50-95"]].mean()
        ax.plot(mean.index, mean["test mAP50-95"], "o-", color=colour, label=f"{which}: test (mean over seeds)")
        ax.plot(mean.index, mean["val mAP50-95"], "--", color=colour, label=f"{which}: val (mean over seeds)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mAP50-95")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(bench: Bench) -> pd.DataFrame:
    table = summary(bench.scores, row_order(bench.opt.companion_taus, bench.opt.swa_epochs))
    out = bench.folder
    pd.DataFrame([asdict(s) for s in bench.scores]).to_csv(out / "ema_quality.csv", index=False)
    table.to_csv(out / "ema_quality_summary.csv", index=False)
    if bench.curves:
        pd.DataFrame(bench.curves).to_csv(out / "ema_quality_curves.csv", index=False)
        r = bench.recipe
        plot_curves(bench.curves, out / "ema_quality.png",
                    f"{Path(r.cfg).stem}, {Path(r.data).stem}, --img {r.img}, batch {r.batch_size}, {r.epochs} epochs: "
                    f"raw model and EMA (ramp, tau {r.hyp.get('ema_tau')})")
    seeds = sorted({s.seed for s in bench.scores})
    LOGGER.info(f"\nTest split ({bench.data['test']}), seeds {seeds}; mean and sample sd over seeds\n" + markdown(table))
    for note in bench.skipped:
        LOGGER.info(f"Skipped: {note}")
    if bench.train_seconds:
        LOGGER.info("Training wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in bench.train_seconds.items()))
    LOGGER.info(f"Per-seed figures in {shown_path(out / 'ema_quality.csv')}" +
                (f", plot in {shown_path(out / 'ema_quality.png')}" if bench.curves else ""))
    return table


# ------------------------------------------------------------------------------------------------ the bench
def quick_data(folder: Path) -> Path:
    """A tiny digits set and its yaml under folder (made once)."""
    root = folder / "digits"
    if not root.exists():
        make_digits.make(root, make_digits.Settings(seed=0, **QUICK_DIGITS))
    cfg = folder / "digits.yaml"
    shipped = yaml.safe_load((ROOT / "data" / "digits.yaml").read_text())
    cfg.write_text(yaml.safe_dump({**shipped, "path": str(root)}, sort_keys=False))
    return cfg


def hyp_overrides(pairs: list[str], known: dict, hyp_file: str) -> dict:
    """--set KEY=VALUE pairs as a dict; a key the hyp file's dict `known` lacks is refused (a typo would go
    unused)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BenchError(f"--set takes KEY=VALUE, got {pair!r}")
        if key not in known:
            raise BenchError(f"--set {key}: {shown_path(Path(hyp_file))} has no key {key!r}")
        out[key] = yaml.safe_load(value)
    return out


def check_opt(opt: argparse.Namespace) -> None:
    rules = [(opt.epochs >= 1, f"--epochs must be at least 1, got {opt.epochs}"),
             (opt.jobs >= 1, f"--jobs must be at least 1, got {opt.jobs}"),
             (opt.bn_batches >= 1, f"--bn-batches must be at least 1, got {opt.bn_batches}"),
             (opt.plot_points >= 2, f"--plot-points must be at least 2, got {opt.plot_points}"),
             (opt.swa_epochs >= 1, f"--swa-epochs must be at least 1, got {opt.swa_epochs}"),
             (all(t > 0 for t in opt.companion_taus), f"--companion-taus must be positive, got {opt.companion_taus}"),
             (len({companion_name(t) for t in opt.companion_taus}) == len(opt.companion_taus),
              f"--companion-taus lists a tau twice: {opt.companion_taus}"),
             (len(set(opt.seeds)) == len(opt.seeds), f"--seeds lists a seed twice: {opt.seeds}")]
    for ok, message in rules:
        if not ok:
            raise BenchError(message)


def run(opt: argparse.Namespace) -> pd.DataFrame:
    """Train (or reuse) every run, evaluate every model on test, print and write the table; returns it."""
    check_opt(opt)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    file_hyp = yaml.safe_load(Path(opt.hyp).read_text())
    base_hyp = {**file_hyp, **hyp_overrides(opt.hyp_set, file_hyp, opt.hyp)}
    folder = Path(opt.project) / opt.name
    folder.mkdir(parents=True, exist_ok=True)
    if opt.quick:
        opt.data = str(quick_data(folder))
    try:
        data = check_dataset(opt.data, autodownload=False)
    except DatasetError as e:
        raise BenchError(str(e)) from None
    if not data.get("test"):
        raise BenchError(f"{opt.data} has no 'test' split: the bench reports only on images nothing was chosen with")
    recipe = Recipe(data=str(data["yaml_file"]), cfg=opt.cfg, hyp=base_hyp, img=opt.img, batch_size=opt.batch_size,
                    epochs=opt.epochs, bn_batches=opt.bn_batches)
    bench = Bench(opt, recipe, data, folder)
    variants = []
    for name in opt.variants:
        why = variant_available(VARIANTS[name], base_hyp)
        if why:
            bench.skipped.append(f"{name}: {why}")
        else:
            variants.append(VARIANTS[name])
    # Every variant's seeds before the next variant's: the first rows of the table are complete soonest. Each run
    # is evaluated (and the table so far written) as soon as it is trained, while the next ones train.
    order = [(variant, seed) for variant in variants
             for seed in (opt.seeds[:1] if variant.name in opt.first_seed_only else opt.seeds)]
    table = None
    with ThreadPoolExecutor(opt.jobs) as pool:
        futures = {pool.submit(train, bench, variant, seed): (variant, seed) for variant, seed in order}
        try:
            for future in as_completed(futures):
                variant, seed = futures[future]
                folder = future.result()
                if not opt.train_only:
                    evaluate_run(bench, variant, seed, folder)
                    table = report(bench)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return table


def main(argv=None) -> int:
    opt = parse_opt(argv) if not isinstance(argv, argparse.Namespace) else argv
    set_logging()
    try:
        run(opt)
    except BenchError as e:
        LOGGER.error(f"ema_quality: {e}")
        return 1
    return 0


if __name__ == "__main__":
    exit_process(main(CLI_OPT))
