"""MLflow tracking of training runs: train.py --mlflow [URI], or MLFLOW_TRACKING_URI set in the environment.

Opt-in, unlike ultralytics (which logs whenever mlflow is installed): a run then talks to a server the user may
not know about, and a tracker is one more thing that can slow or stall a training. The store is the URI given
to --mlflow, else MLFLOW_TRACKING_URI, else an SQLite file runs/mlflow.db (MLflow 3's own default backend; see
it with `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`).

What a run holds: the options and hyperparameters as params; per epoch (step = epoch) every results.csv column
and the EMA's decay and update count (what TensorBoard gets); the project's commit and the versions as tags; at the
end results.csv, the plots, opt.yaml, hyp.yaml and weights/best.pt as artifacts.

An epoch's metrics are sent once the last.pt that holds that epoch is on disk, and last.pt's train_state keeps
the run's id with the epochs it holds that were not sent yet. A killed run resumed with --resume therefore goes
on in the same MLflow run, sends what the dead process had not, and never sends an epoch twice: its history
equals that of the run left alone.

With --evolve every trial is a run nested under the study's parent run, which carries the tag evolve.study: the
first worker creates it and the others find it by that tag.

The tracker never costs the training: the first call that fails (an unreachable server, a refused value) logs
one warning and tracking stops for the rest of the run. Only rank 0 of a DDP run tracks.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.environment import project_commit
from utils.log import LOGGER
from utils.metrics import fitness

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_URI = f"sqlite:///{ROOT / 'runs' / 'mlflow.db'}"
STATE_KEY = "mlflow"  # last.pt's train_state entry: {"tracking_uri", "run_id", "pending": [[epoch, ms, {..}], ...]}
STUDY_TAG, STUDY_KEY_TAG, TRIAL_TAG = "evolve.study", "evolve.study_key", "evolve.trial"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI shows the run nested under that one
# MLflow's client retries a failed request 7 times with growing waits (minutes in all) and waits 120 s for an answer:
# a training would stall that long on a dead server. These apply unless the environment sets its own.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
BATCH = 100  # params and tags per log_batch call (MLflow's limit); metrics go 1000 at a time
ARTIFACT_PATTERNS = ("results.csv", "*.png", "*.jpg", "opt.yaml", "hyp.yaml")


@dataclass(frozen=True)
class TrialLink:
    """What a trial's run is nested under: the study's parent run (None: tracking failed for the study)."""
    parent: str | None
    experiment_id: str | None
    trial: int
    study: str


_TRIAL: contextvars.ContextVar[TrialLink | None] = contextvars.ContextVar("mlflow_trial", default=None)


def wanted(opt) -> bool:
    return bool(getattr(opt, "mlflow", False)) or bool(os.getenv("MLFLOW_TRACKING_URI"))


def tracking_uri(opt) -> str:
    given = getattr(opt, "mlflow", False)
    return given if isinstance(given, str) and given else os.getenv("MLFLOW_TRACKING_URI") or DEFAULT_URI


def sanitized(name: str) -> str:
    """A metric or param name MLflow accepts on any server: colons (refused on Windows) and other characters
    outside letters, digits, _ - . / and space become _."""
    return re.sub(r"[^/\w.\- ]", "_", name)


def one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def _client(uri: str):
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    from mlflow import MlflowClient  # seconds to import: only for runs that track

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, uri: str) -> str:
    """The id of the experiment `name`, created if missing (a local SQLite store keeps its artifacts beside the
    database rather than in ./mlruns of whatever folder train.py was started from)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).expanduser().resolve().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another worker created it a moment ago
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _version_tags() -> dict[str, str]:
    import mlflow
    import torch

    tags = {"python": platform.python_version(), "torch": torch.__version__, "mlflow": mlflow.__version__,
            "mlflow.source.name": "train.py", "mlflow.source.type": "LOCAL"}
    commit = project_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _warn_off(what: str, uri: str, e: BaseException) -> None:
    LOGGER.warning(f"MLflow: {what} failed at {_masked(uri)} ({one_line(e)}); training goes on without tracking")


def _masked(uri: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", uri)


class Tracker:
    """One training run's MLflow run. Every method is a no-op once a call has failed (after its one warning)."""

    def __init__(self, client, uri: str, run_id: str, checkpointed: bool, trial: TrialLink | None):
        self.client, self.uri, self.run_id, self.trial = client, uri, run_id, trial
        self.checkpointed = checkpointed  # each epoch's last.pt is written: its metrics wait for it
        self.pending: list = []  # [epoch, time in ms, {name: value}] not sent yet
        self.ended = False

    # -------------------------------------------------------------------------------------------- start
    @classmethod
    def start(cls, opt, hyp: dict, resume_ckpt: dict | None, main: bool) -> Tracker | None:
        """The tracker of a run (None: not asked for, not rank 0, or the tracker failed with its warning). A
        resumed run whose last.pt names an MLflow run continues that run."""
        trial = _TRIAL.get()
        saved = resume_ckpt.get("train_state", {}).get(STATE_KEY) if resume_ckpt is not None else None
        if not main or not (wanted(opt) or saved) or (trial is not None and trial.parent is None):
            return None
        uri = tracking_uri(opt) if wanted(opt) or not saved else saved["tracking_uri"]
        try:
            client = _client(uri)
            if saved and saved.get("tracking_uri") == uri and _run_exists(client, saved["run_id"]):
                tracker = cls(client, uri, saved["run_id"], not opt.nosave, trial)
                tracker._continue(saved.get("pending", []))
                return tracker
            if saved:
                LOGGER.info(f"MLflow: the run of {opt.resume} is not in {_masked(uri)}: continuing in a new run")
            return cls._new(client, uri, opt, hyp, trial)
        except Exception as e:  # any failure of the tracker: the training goes on
            _warn_off("starting the run", uri, e)
            return None

    @classmethod
    def _new(cls, client, uri: str, opt, hyp: dict, trial: TrialLink | None) -> Tracker:
        from mlflow.entities import Param, RunTag

        name = Path(opt.save_dir).name
        if trial is not None:
            experiment = trial.experiment_id
            tags = {PARENT_TAG: trial.parent, TRIAL_TAG: str(trial.trial), STUDY_TAG: trial.study}
        else:
            experiment = _experiment_id(client, os.getenv("MLFLOW_EXPERIMENT_NAME") or Path(opt.project).name, uri)
            tags = {}
        run = client.create_run(experiment, run_name=name, tags={**_version_tags(), **tags})
        params = {**dict(sorted(vars(opt).items())), **hyp}
        entries = [Param(sanitized(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(entries), BATCH):
            client.log_batch(run.info.run_id, params=entries[i:i + BATCH])
        client.log_batch(run.info.run_id, tags=[RunTag("save_dir", str(Path(opt.save_dir).resolve()))])
        LOGGER.info(f"MLflow: run {run.info.run_id} in {_masked(uri)}, experiment {experiment}"
                    + (f", nested under the study's run {trial.parent}" if trial is not None else ""))
        return cls(client, uri, run.info.run_id, not opt.nosave, trial)

    def _continue(self, saved_pending: list) -> None:
        """Reopen the run and send the epochs last.pt holds that the dead process had not sent."""
        self.client.update_run(self.run_id, status="RUNNING")
        if saved_pending:  # every record holds the same names: one of them tells which epochs were sent
            name = sanitized(next(iter(saved_pending[0][2])))
            last = max((m.step for m in self.client.get_metric_history(self.run_id, name)), default=-1)
            self._send([rec for rec in saved_pending if rec[0] > last])
        LOGGER.info(f"MLflow: continuing run {self.run_id} in {_masked(self.uri)}")

    # -------------------------------------------------------------------------------------------- hooks
    def epoch(self, epoch: int, values: dict, saved_epoch: int | None) -> None:
        """An epoch's metrics; sent now if its last.pt will not be written, else with the next call after it is."""
        if self.client is None:
            return
        self.pending.append([int(epoch), int(time.time() * 1000), {k: float(v) for k, v in values.items()}])
        self.flush(saved_epoch if self.checkpointed else math.inf)

    def flush(self, saved_epoch: float | None) -> None:
        """Send the pending epochs that last.pt (holding saved_epoch) has made final."""
        if self.client is None:
            return
        due = [rec for rec in self.pending if saved_epoch is not None and rec[0] <= saved_epoch]
        if due:
            self._guard("logging metrics", self._send, due)
            self.pending = [rec for rec in self.pending if rec not in due]

    def state(self) -> dict:
        """last.pt's train_state entry: where the run is and the epochs not sent yet."""
        return {STATE_KEY: {"tracking_uri": self.uri, "run_id": self.run_id, "pending": list(self.pending)}}

    def finish(self, save_dir: Path, best: Path, results) -> None:
        """The run is done: every epoch sent, the artifacts uploaded, the run FINISHED (a trial also logs its
        fitness, the study's objective)."""
        if self.client is None:
            return
        self.flush(math.inf)
        self._guard("uploading the artifacts", self._artifacts, Path(save_dir), Path(best))
        if self.trial is not None and self.client is not None:
            value = float(fitness(np.array(results[:4]).reshape(1, -1))[0])
            self._guard("logging the fitness", self.client.log_metric, self.run_id, "fitness", value)
        self.end("FINISHED")

    def end(self, status: str, saved_epoch: int | None = None) -> None:
        """End the run (idempotent); an interrupted run first sends what its last.pt holds."""
        if self.client is None or self.ended:
            return
        if status != "FINISHED":
            self.flush(saved_epoch)
        self.ended = True
        self._guard("ending the run", self.client.set_terminated, self.run_id, status)

    # -------------------------------------------------------------------------------------------- internals
    def _send(self, records: list) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(sanitized(k), v, ms, epoch) for epoch, ms, values in records for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _artifacts(self, save_dir: Path, best: Path) -> None:
        files = sorted({f for pattern in ARTIFACT_PATTERNS for f in save_dir.glob(pattern) if f.is_file()})
        for f in files:
            self.client.log_artifact(self.run_id, str(f))
        if best.is_file():
            self.client.log_artifact(self.run_id, str(best), artifact_path="weights")

    def _guard(self, what: str, fn, *args) -> None:
        if self.client is None:
            return
        try:
            fn(*args)
        except Exception as e:  # the one warning; nothing more is sent
            _warn_off(what, self.uri, e)
            self.client = None


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


# ------------------------------------------------------------------------------------------------ --evolve
class StudyTracking:
    """A study's parent run, shared by every worker of the study: found by its study-key tag in the experiment
    `evolve` (or $MLFLOW_EXPERIMENT_NAME; the same on every machine, whatever its --project), else created. Two
    workers that create one at the same moment both keep the oldest (the other is deleted)."""

    def __init__(self, opt, study: str, experiment: str = "evolve"):
        self.study, self.uri = study, tracking_uri(opt)
        self.client = self.parent = self.experiment_id = None
        try:
            self.client = _client(self.uri)
            self.experiment_id = _experiment_id(self.client, os.getenv("MLFLOW_EXPERIMENT_NAME") or experiment,
                                                self.uri)
            self.parent = self._parent_run()
            LOGGER.info(f"MLflow: study {study!r} is run {self.parent} in {_masked(self.uri)}; its trials nest "
                        f"under it")
        except Exception as e:
            _warn_off(f"finding the run of study {study!r}", self.uri, e)
            self.client = self.parent = None

    def _parent_run(self) -> str:
        key = hashlib.sha1(self.study.encode()).hexdigest()  # a tag safe in a filter, whatever the name holds
        mine = None
        for _ in range(2):
            runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{STUDY_KEY_TAG}` = '{key}'")
            runs = sorted((r for r in runs if PARENT_TAG not in r.data.tags),
                          key=lambda r: (r.info.start_time, r.info.run_id))
            if runs:
                oldest = runs[0].info.run_id
                if mine is not None and mine != oldest:
                    self.client.delete_run(mine)
                return oldest
            mine = self.client.create_run(self.experiment_id, run_name=f"study {self.study}",
                                          tags={STUDY_TAG: self.study, STUDY_KEY_TAG: key, **_version_tags()}
                                          ).info.run_id
        return mine

    @contextlib.contextmanager
    def trial(self, number: int):
        """Trainings inside nest their runs under the study's run as trial `number`."""
        token = _TRIAL.set(TrialLink(self.parent, self.experiment_id, number, self.study))
        try:
            yield
        finally:
            _TRIAL.reset(token)

    def finish(self, best_fitness: float, best_trial: int, trials: int) -> None:
        if self.client is None:
            return
        try:
            self.client.log_metric(self.parent, "best_fitness", float(best_fitness))
            self.client.set_tag(self.parent, "evolve.best_trial", str(best_trial))
            self.client.set_tag(self.parent, "evolve.trials", str(trials))
            self.client.set_terminated(self.parent, "FINISHED")
        except Exception as e:
            _warn_off(f"updating the run of study {self.study!r}", self.uri, e)
