"""Hyperparameter evolution (train.py --evolve N) on an Optuna study that any number of workers share.

A trial is an ordinary training run: train.py hands in a function that trains one hyp dict into a folder of its
own and returns the run's final validation results (those of the EMA); this module picks the hyps, keeps the
study and writes the outputs. Fitness is YOLOv5's, 0.1 * mAP50 + 0.9 * mAP50-95 (utils.metrics.fitness).

The study lives in an Optuna storage, an SQLite file in the evolve folder unless --evolve-storage names another
(an RDB URL, or a journal file on a shared filesystem). Every command started with the same storage and study name
is a worker of the same search:
- N counts completed trials over all workers; a command stops once N are done, waiting first for trials still
  running elsewhere that would make up the N (so that it can take over one whose worker dies).
- A worker records a heartbeat while it trains; a RUNNING trial whose heartbeat is older than the grace period
  (two heartbeat intervals) is marked failed by the next worker that looks, and its hyps are queued again as a
  new trial. Failed trials are never counted.
- Two workers may ask for a trial at the same moment when one would have made up the N; the trial with the
  higher number then sees N counted trials before it and is marked failed without training (user attr surplus).
- The study's user attrs hold the flags and the hyp file it was created with; a command with others is refused.

After each trial the worker rewrites, from the storage (so with every worker's trials), evolve.csv (a row per
completed trial: its metrics, fitness and every hyp value) and hyp_evolve.yaml (the best trial's hyps) in its
evolve folder; evolve.png (each searched hyp against fitness) at most every PLOT_EVERY_S and when it ends.

With --mlflow (or MLFLOW_TRACKING_URI set) each trial is an MLflow run nested under the study's one parent run,
which every worker finds by the study's name (utils/tracking.py).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import random
import re
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import sqlalchemy.exc  # noqa: E402
import yaml  # noqa: E402
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution  # noqa: E402
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning  # noqa: E402
from optuna.storages import (BaseStorage, JournalStorage, RDBStorage,  # noqa: E402
                             RetryHeartbeatStaleTrialCallback, fail_stale_trials)
# Not exported by optuna.storages, but the class its heartbeat machinery (fail_stale_trials, study.optimize's
# heartbeat thread) looks for; RDBStorage implements it and JournalHeartbeatStorage below does too.
from optuna.storages._heartbeat import BaseHeartbeat  # noqa: E402
from optuna.storages.journal import JournalFileBackend  # noqa: E402
from optuna.trial import FrozenTrial, Trial, TrialState  # noqa: E402

from utils.cli import shown_path  # noqa: E402
from utils.ema import SIGMA_REL_MAX, UNITS, schedule_params  # noqa: E402
from utils.log import LOGGER  # noqa: E402
from utils.metrics import fitness  # noqa: E402
from utils.tracking import StudyTracking, wanted  # noqa: E402

# YOLOv5 v7.0's train.py `meta`: the keys its --evolve mutates (those with a non-zero mutation gain) and the bounds
# it clips them to. Not searched: iou_t, fl_gamma, perspective and fliplr (gain 0 there), anchors (no such hyp
# key here) and copy_paste (it needs segment labels, which YOLO box labels lack: the data loader ignores it).
YOLOV5_BOUNDS = {
    "lr0": (1e-5, 1e-1), "lrf": (0.01, 1.0), "momentum": (0.6, 0.98), "weight_decay": (0.0, 0.001),
    "warmup_epochs": (0.0, 5.0), "warmup_momentum": (0.0, 0.95), "warmup_bias_lr": (0.0, 0.2),
    "box": (0.02, 0.2), "cls": (0.2, 4.0), "cls_pw": (0.5, 2.0), "obj": (0.2, 4.0), "obj_pw": (0.5, 2.0),
    "anchor_t": (2.0, 8.0), "hsv_h": (0.0, 0.1), "hsv_s": (0.0, 0.9), "hsv_v": (0.0, 0.9),
    "degrees": (0.0, 45.0), "translate": (0.0, 0.9), "scale": (0.0, 0.9), "shear": (0.0, 10.0),
    "flipud": (0.0, 1.0), "mosaic": (0.0, 1.0), "mixup": (0.0, 1.0),
}
# This project's own: the EMA ramp's time constant (YOLOv5's 2000 leaves a small dataset's EMA near its first
# weights for many epochs), and the width of a power EMA where the hyp file uses one (ema_schedule: power with
# ema_sigma_rel). The post-hoc bank's widths (posthoc_sigma_rels) are not searched: they change what is kept for
# posthoc_ema.py, not the EMA a trial is validated on.
EMA_TAU_BOUNDS = (1.0, 10000.0)
EMA_SIGMA_REL_BOUNDS = (0.01, SIGMA_REL_MAX)
LOG_SCALE = ("lr0", "ema_tau")  # bounds decades apart: sampled on a log scale

COUNTED = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)  # trials that are, or will be, counted
# Flags that say how or where a worker runs, not what a trial trains: workers of one study may differ in them.
SESSION_FLAGS = ("evolve", "evolve_storage", "evolve_study", "evolve_heartbeat", "device", "workers", "project",
                 "name", "exist_ok", "profile", "noplots", "no_tensorboard", "local_rank", "resume", "cache",
                 "nosave", "noval", "save_dir", "hyp", "bf16", "save_period", "val_raw", "sync_bn", "compile", "mlflow")
STUDY_ATTR_FLAGS, STUDY_ATTR_HYP = "evolve_flags", "evolve_hyp"
CREATOR_WAIT_S = 30.0  # how long a joining worker waits for the creator to store the study's flags
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
HEARTBEAT_ATTR = "evolve_heartbeat"  # journal storage: the time of a running trial's last heartbeat
SCHEMA_ATTEMPTS = 5  # opening a new RDB storage: workers racing to create its tables try this often
WAIT_POLL_S = 2.0  # a worker waiting for the last trials elsewhere looks this often whether they have ended
PLOT_EVERY_S = 300  # evolve.png is redrawn after a trial this long after the last drawing, and when a worker ends
MAX_RETRIES = 3  # a trial whose worker keeps dying (out of memory, say) is queued again this many times at most
WORKER = f"{socket.gethostname()}:{os.getpid()}"


class EvolveError(Exception):
    """A search that cannot start or go on; the message is one line for the user."""


class SurplusTrial(Exception):
    """The study already had its N trials when this one was asked for: it is failed without training."""


# ------------------------------------------------------------------------------------------------ search space
def search_space(hyp: dict) -> dict[str, BaseDistribution]:
    """The distributions searched for this hyp file: YOLOv5's keys and bounds, then the EMA's."""
    space: dict[str, BaseDistribution] = {
        k: FloatDistribution(lo, hi, log=k in LOG_SCALE) for k, (lo, hi) in YOLOV5_BOUNDS.items()}
    uses = schedule_params(hyp.get("ema_schedule", "ramp"))
    if "tau" in uses:
        space["ema_tau"] = FloatDistribution(*EMA_TAU_BOUNDS, log=True)
    if "gamma" in uses and "ema_sigma_rel" in hyp and "ema_gamma" not in hyp:
        space["ema_sigma_rel"] = FloatDistribution(*EMA_SIGMA_REL_BOUNDS)
    space["ema_unit"] = CategoricalDistribution(UNITS)
    return space


def hyp_params(hyp: dict, space: dict[str, BaseDistribution]) -> dict:
    """The searched values of a hyp dict, as the study's parameters (the EMA's unit defaults to steps)."""
    return {k: hyp.get(k, "steps") if k == "ema_unit" else float(hyp[k]) for k in space}


def suggest(trial: Trial, name: str, dist: BaseDistribution):
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


# ------------------------------------------------------------------------------------------------ storage
class JournalHeartbeatStorage(JournalStorage, BaseHeartbeat):
    """A journal file storage with Optuna's heartbeat, which only its RDB storage has: a running trial's heartbeat
    is a system attr holding the worker's clock (machines sharing a journal must keep their clocks in step, to
    well within the grace period, as NTP does)."""

    def __init__(self, path: str, heartbeat_interval: int, grace_period: int,
                 stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None) -> None:
        super().__init__(JournalFileBackend(path))
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            # A retried trial inherits its predecessor's system attrs, heartbeat included: its own start counts too.
            started = t.datetime_start.timestamp() if t.datetime_start is not None else now
            if now - max(float(t.system_attrs.get(HEARTBEAT_ATTR, now)), started) > self.grace_period:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.stale_trial_callback


def masked(url: str) -> str:
    """The storage URL with its password hidden, for messages and files."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def open_storage(url: str, heartbeat_s: int) -> BaseStorage:
    """The Optuna storage of --evolve-storage: an RDB URL (sqlite:///, postgresql://, mysql://, with or without
    +driver) or else the path of a journal file. EvolveError (one line) when it cannot be opened."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # the heartbeat and its retry callback
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
        return _open_storage(url, heartbeat_s, retry)


def _open_storage(url: str, heartbeat_s: int, retry: RetryHeartbeatStaleTrialCallback) -> BaseStorage:
    shown = masked(url)
    if "://" not in url and re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", url):  # sqlite:/x.db; not a path, nor C:\x
        raise EvolveError(f"--evolve-storage {shown}: malformed URL; an RDB URL reads scheme://..., e.g. "
                          f"sqlite:///path/evolve.db or postgresql://user:password@host:5432/database")
    if "://" not in url:
        path = Path(url).expanduser()
        if not path.parent.is_dir():
            raise EvolveError(f"--evolve-storage {url}: folder {path.parent} does not exist")
        if path.is_file():
            with path.open("rb") as f:
                if f.read(16) == b"SQLite format 3\x00":
                    raise EvolveError(f"--evolve-storage {url} is an SQLite database; pass it as sqlite:///{path}")
        try:
            return JournalHeartbeatStorage(str(path), heartbeat_s, 2 * heartbeat_s, retry)
        except (OSError, ValueError) as e:
            raise EvolveError(f"--evolve-storage {url}: not a readable Optuna journal file ({one_line(e)})") from None
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in RDB_SCHEMES:
        raise EvolveError(f"--evolve-storage {shown}: unsupported scheme {scheme!r}; use one of "
                          f"{', '.join(s + '://' for s in RDB_SCHEMES)} or the path of a journal file")
    # SQLite: several local workers wait for each other's writes instead of failing; servers: an unreachable host
    # fails in seconds rather than after the operating system's TCP timeout.
    connect_args = {"timeout": 60} if scheme == "sqlite" else {"connect_timeout": 10}
    url = with_installed_driver(url)
    try:
        for attempt in range(SCHEMA_ATTEMPTS):
            try:
                return RDBStorage(url, engine_kwargs={"connect_args": connect_args}, heartbeat_interval=heartbeat_s,
                                  grace_period=2 * heartbeat_s, heartbeat_stale_trial_callback=retry)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as e:
                # Workers started together on a new database race to create its tables (and the schema version
                # row); the losers find them made on a second look. An unreachable server is not retried.
                racing = isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in str(e)
                if not racing or attempt + 1 == SCHEMA_ATTEMPTS:
                    raise
                time.sleep(0.5 + random.random())
    except ImportError as e:
        raise EvolveError(f"--evolve-storage {shown}: no database driver for {scheme} ({one_line(e)}); install "
                          f"one, e.g. pip install psycopg2-binary (PostgreSQL) or PyMySQL (mysql+pymysql://)") from None
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, OSError, RuntimeError) as e:
        raise EvolveError(f"--evolve-storage {shown}: cannot open it ({one_line(e)})") from None


def with_installed_driver(url: str) -> str:
    """A postgresql:// URL without a driver, made to name the one installed. SQLAlchemy 2.1 reads it as psycopg 3's
    (2.0 as psycopg2's), so with only psycopg2 installed the same URL would fail there for want of a driver."""
    scheme, rest = url.split("://", 1)
    if scheme.lower() != "postgresql" or importlib.util.find_spec("psycopg") is not None:
        return url
    return f"postgresql+psycopg2://{rest}" if importlib.util.find_spec("psycopg2") is not None else url


def one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# ------------------------------------------------------------------------------------------------ the study
def study_flags(opt: argparse.Namespace) -> dict:
    """The flags that decide what a trial trains (SESSION_FLAGS left out), as the study stores them."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(opt).items()) if k not in SESSION_FLAGS}


def join_study(storage: BaseStorage, name: str, flags: dict, hyp: dict, space: dict, where: str) -> optuna.Study:
    """Create the study (its first trial the hyp file as given) or join it after checking that it searches the
    same runs."""
    sampler = optuna.samplers.TPESampler(constant_liar=True)  # workers in parallel steer clear of running trials
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler)
    except DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        check_same_search(study, flags, hyp, where)
        return study
    first = hyp_params(hyp, space)
    study.enqueue_trial(first)
    for k, v in first.items():
        if isinstance(space[k], FloatDistribution) and not space[k].low <= v <= space[k].high:
            LOGGER.warning(f"evolve: the hyp file's {k}={v:g} lies outside the searched range "
                           f"[{space[k].low:g}, {space[k].high:g}]; the first trial uses it, the others stay within")
    study.set_user_attr(STUDY_ATTR_HYP, hyp)
    study.set_user_attr(STUDY_ATTR_FLAGS, flags)  # last: a joining worker waits for it
    LOGGER.info(f"evolve: created study {name!r} in {where}; its first trial is the hyp file as given")
    return study


def check_same_search(study: optuna.Study, flags: dict, hyp: dict, where: str) -> None:
    deadline = time.monotonic() + CREATOR_WAIT_S
    while STUDY_ATTR_FLAGS not in (attrs := study.user_attrs) and time.monotonic() < deadline:
        time.sleep(0.5)  # created a moment ago by another worker, which is storing its flags
    if STUDY_ATTR_FLAGS not in attrs:
        raise EvolveError(f"study {study.study_name!r} in {where} was not created by train.py --evolve; "
                          f"pass another --evolve-study")
    theirs, their_hyp = attrs[STUDY_ATTR_FLAGS], attrs.get(STUDY_ATTR_HYP, {})
    differ = [f"--{k.replace('_', '-')} {theirs.get(k)!r} (this command: {flags.get(k)!r})"
              for k in sorted(set(theirs) | set(flags)) if theirs.get(k) != flags.get(k)]
    hyp_keys = sorted(k for k in set(their_hyp) | set(hyp) if their_hyp.get(k) != hyp.get(k))
    if hyp_keys:
        differ.append("hyp " + ", ".join(f"{k}={their_hyp.get(k)!r} (this command: {hyp.get(k)!r})" for k in hyp_keys))
    if differ:
        raise EvolveError(f"study {study.study_name!r} in {where} was created with other settings: "
                          f"{'; '.join(differ)}; use the same ones, or another --evolve-study")


# ------------------------------------------------------------------------------------------------ the search
class Evolution:
    """One worker of the search: trials until the study has `trials` completed ones, then the outputs."""

    def __init__(self, study: optuna.Study, trials: int, space: dict, hyp: dict, folder: Path,
                 train_trial: Callable[[dict, Path, int], Sequence[float]], metric_names: Sequence[str], where: str,
                 poll_s: float):
        self.study, self.trials, self.space, self.hyp, self.folder = study, trials, space, hyp, folder
        self.train_trial, self.metric_names, self.where, self.poll_s = train_trial, list(metric_names), where, poll_s
        self.ran: list[int] = []  # the trials this worker trained
        self.plotted_at = time.monotonic()

    def run(self) -> None:
        waiting = False
        while True:
            fail_stale_trials(self.study)  # a dead worker's trial: failed, and queued again as a new trial
            done, running = (len(self.study.get_trials(deepcopy=False, states=(s,)))
                             for s in (TrialState.COMPLETE, TrialState.RUNNING))
            if done >= self.trials:
                break
            if done + running >= self.trials:  # the rest are under way elsewhere; one of them may yet fail
                if not waiting:
                    LOGGER.info(f"evolve: {done} of {self.trials} trials done and {running} running elsewhere; "
                                f"waiting for them (a trial whose worker dies is run here)")
                    waiting = True
                time.sleep(self.poll_s)
                continue
            waiting = False
            try:
                self.study.optimize(self.objective, n_trials=1, callbacks=[self.trial_done])
            except SurplusTrial as e:
                LOGGER.info(f"evolve: {e}")
        self.write_outputs(plot=True)
        best = self.study.best_trial
        LOGGER.info(f"\nevolve: study {self.study.study_name!r} has its {self.trials} trials (this worker ran "
                    f"{len(self.ran)}); best trial {best.number}, fitness {best.value:.5f}\nResults saved to "
                    f"{shown_path(self.folder)}; train with them: python train.py --hyp {self.folder / 'hyp_evolve.yaml'}")

    def objective(self, trial: Trial) -> float:
        ahead = sum(t.number < trial.number for t in self.study.get_trials(deepcopy=False, states=COUNTED))
        if ahead >= self.trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number} not run: the study had its {self.trials} trials when it began")
        hyp = {**self.hyp, **{k: suggest(trial, k, d) for k, d in self.space.items()}}
        folder = self.folder / "trials" / f"{safe_name(self.study.study_name)}-{trial.number}"
        if folder.exists():  # left by a study of the same name in another storage: its results.csv would grow
            shutil.rmtree(folder)
        trial.set_user_attr("hyp", hyp)
        trial.set_user_attr("worker", WORKER)
        trial.set_user_attr("folder", str(folder))
        changed = ", ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in hyp.items()
                            if k in self.space)
        LOGGER.info(f"\nevolve: trial {trial.number} ({ahead + 1} of {self.trials}) by {WORKER} in {folder}: {changed}")
        results = [float(x) for x in self.train_trial(hyp, folder, trial.number)]
        shutil.rmtree(folder / "weights", ignore_errors=True)  # a trial keeps no checkpoints (nor does YOLOv5's)
        trial.set_user_attr("metrics", dict(zip(self.metric_names, results)))
        self.ran.append(trial.number)
        return float(fitness(np.array(results[:4])))

    def trial_done(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state != TrialState.COMPLETE:
            return
        self.write_outputs()
        best = study.best_trial
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        took = trial.duration.total_seconds() if trial.duration is not None else math.nan
        LOGGER.info(f"evolve: trial {trial.number} fitness {trial.value:.5f} in {took:.1f} s; best so far: trial "
                    f"{best.number} (fitness {best.value:.5f}); {done} of {self.trials} trials done")

    # -------------------------------------------------------------------------------------------- outputs
    def completed(self) -> list[FrozenTrial]:
        return sorted((t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                       if "hyp" in t.user_attrs and "metrics" in t.user_attrs), key=lambda t: t.number)

    def write_outputs(self, plot: bool = False) -> None:
        """evolve.csv and hyp_evolve.yaml; evolve.png too when asked or PLOT_EVERY_S after the last (1-3 s here)."""
        trials = self.completed()
        if not trials:
            return
        table = evolve_table(trials, self.metric_names)
        write_atomically(self.folder / "evolve.csv", lambda f: table.to_csv(f, index=False))
        best = max(trials, key=lambda t: t.value)
        header = (f"# train.py --evolve: the best of {len(trials)} completed trials of study "
                  f"{self.study.study_name!r} in {self.where}\n"
                  f"# trial {best.number}, fitness {best.value:.5f} (0.1 * mAP50 + 0.9 * mAP50-95 of the EMA); "
                  + ", ".join(f"{k} {v:.5g}" for k, v in best.user_attrs["metrics"].items()) + "\n")
        text = header + yaml.safe_dump(best.user_attrs["hyp"], sort_keys=False)
        write_atomically(self.folder / "hyp_evolve.yaml", lambda f: Path(f).write_text(text, encoding="utf-8"))
        if plot or time.monotonic() - self.plotted_at >= PLOT_EVERY_S:
            write_atomically(self.folder / "evolve.png", lambda f: plot_evolve(table, list(self.space), best.number, f))
            self.plotted_at = time.monotonic()


def evolve_table(trials: list[FrozenTrial], metric_names: Sequence[str]) -> pd.DataFrame:
    """evolve.csv's rows: trial number, the metrics, fitness and every hyp value of each completed trial."""
    rows = [{"trial": t.number, **{k: t.user_attrs["metrics"].get(k) for k in metric_names}, "fitness": t.value,
             **t.user_attrs["hyp"]} for t in trials]
    return pd.DataFrame(rows)


def plot_evolve(table: pd.DataFrame, keys: list[str], best_trial: int, file: str) -> None:
    """Each searched hyp against fitness, a point per trial, the best trial starred."""
    cols = math.ceil(math.sqrt(len(keys)))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), squeeze=False)
    best = table[table["trial"] == best_trial].iloc[0]
    for ax, key in zip(axes.flat, keys):
        x, best_x = table[key], best[key]
        if x.dtype == object:  # a categorical hyp: its choices side by side
            choices = sorted(set(x))
            x, best_x = x.map(choices.index), choices.index(best_x)
            ax.set_xticks(range(len(choices)), choices)
        elif key in LOG_SCALE:
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(plt.NullLocator())  # labelled minor ticks: most of the drawing time
        else:
            ax.xaxis.set_major_locator(plt.MaxNLocator(4))
        ax.yaxis.set_major_locator(plt.MaxNLocator(4))
        ax.scatter(x, table["fitness"], c=table["trial"], cmap="viridis", s=12, alpha=0.8, edgecolors="none")
        ax.plot(best_x, best["fitness"], "r*", markersize=12)
        ax.set_title(f"{key} = {best[key]:.3g}" if not isinstance(best[key], str) else f"{key} = {best[key]}",
                     fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    fig.supylabel("fitness")
    # Fixed margins: tight_layout measured every tick label of the 25 panels, 5 s of a 6 s drawing here.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.05, top=0.95, wspace=0.35, hspace=0.6)
    fig.savefig(file, dpi=100)
    plt.close(fig)


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """write(temp path) then os.replace: workers on one machine rewrite the same files, and readers never see half
    of one."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    write(str(tmp))
    os.replace(tmp, path)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ------------------------------------------------------------------------------------------------ entry point
def run_evolution(opt: argparse.Namespace, hyp: dict, folder: Path,
                  train_run: Callable[[dict, argparse.Namespace], Sequence[float]],
                  metric_names: Sequence[str]) -> optuna.Study:
    """train.py --evolve: join (or create) the study and run trials until it has opt.evolve completed ones.

    `train_run(hyp, opt)` trains one run with those options (opt.save_dir its folder) and returns its final
    results, the first four P, R, mAP50, mAP50-95 (named by `metric_names`)."""
    folder.mkdir(parents=True, exist_ok=True)
    url = opt.evolve_storage or f"sqlite:///{(folder / 'evolve.db').resolve()}"
    heartbeat = int(opt.evolve_heartbeat)
    where = masked(url)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # this module logs each trial; Optuna's lines would repeat them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # fail_stale_trials
        # A hyp file value outside its searched range: join_study says so once, Optuna would at every look.
        warnings.filterwarnings("ignore", "Fixed parameter", UserWarning)
        storage = open_storage(url, heartbeat)
        space = search_space(hyp)
        study = join_study(storage, opt.evolve_study, study_flags(opt), hyp, space, where)

        tracking = StudyTracking(opt, opt.evolve_study) if wanted(opt) else None

        def train_trial(trial_hyp: dict, trial_folder: Path, number: int) -> Sequence[float]:
            # An ordinary run in its own folder, validated and saved at its last epoch only (YOLOv5's --evolve too).
            trial_opt = argparse.Namespace(**{**vars(opt), "save_dir": str(trial_folder), "noval": True,
                                              "nosave": True, "noplots": True, "no_tensorboard": True})
            with tracking.trial(number) if tracking is not None else contextlib.nullcontext():
                return train_run(trial_hyp, trial_opt)

        LOGGER.info(f"evolve: {opt.evolve} trials in all, study {opt.evolve_study!r} in {where}, worker {WORKER}, "
                    f"searching {', '.join(space)}")
        Evolution(study, opt.evolve, space, hyp, folder, train_trial, metric_names, where,
                  poll_s=min(WAIT_POLL_S, heartbeat / 2)).run()
        if tracking is not None:
            tracking.finish(study.best_value, study.best_trial.number, opt.evolve)
    return study
