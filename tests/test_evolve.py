"""train.py --evolve: an Optuna study shared by worker processes, its outputs and its one-line errors."""
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

import train
from tests.train_helpers import (INTERRUPT_HOOK_ENV, KILL_HOOK_ENV, ROOT, in_process_args, make_dataset,
                                 one_intra_op_thread, tiny_model_yaml, train_env)
from utils import evolve

HYP = ROOT / "hyp" / "hyp.scratch-low.yaml"
# YOLOv5 v7.0's train.py meta, written out by hand: (mutation gain, lower, upper); gain 0 = never mutated.
YOLOV5_META = {
    "lr0": (1, 1e-5, 1e-1), "lrf": (1, 0.01, 1.0), "momentum": (0.3, 0.6, 0.98), "weight_decay": (1, 0.0, 0.001),
    "warmup_epochs": (1, 0.0, 5.0), "warmup_momentum": (1, 0.0, 0.95), "warmup_bias_lr": (1, 0.0, 0.2),
    "box": (1, 0.02, 0.2), "cls": (1, 0.2, 4.0), "cls_pw": (1, 0.5, 2.0), "obj": (1, 0.2, 4.0),
    "obj_pw": (1, 0.5, 2.0), "iou_t": (0, 0.1, 0.7), "anchor_t": (1, 2.0, 8.0), "anchors": (2, 2.0, 10.0),
    "fl_gamma": (0, 0.0, 2.0), "hsv_h": (1, 0.0, 0.1), "hsv_s": (1, 0.0, 0.9), "hsv_v": (1, 0.0, 0.9),
    "degrees": (1, 0.0, 45.0), "translate": (1, 0.0, 0.9), "scale": (1, 0.0, 0.9), "shear": (1, 0.0, 10.0),
    "perspective": (0, 0.0, 0.001), "flipud": (1, 0.0, 1.0), "fliplr": (0, 0.0, 1.0), "mosaic": (1, 0.0, 1.0),
    "mixup": (1, 0.0, 1.0), "copy_paste": (1, 0.0, 1.0)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evolve_data")
    return make_dataset(root, n=8, size=64), tiny_model_yaml(root)


def evolve_args(tiny, project: Path, trials: int, *extra) -> list[str]:
    data, cfg = tiny
    return [str(a) for a in ("--data", data, "--cfg", cfg, "--img", 64, "--epochs", 1, "--batch-size", 4,
                             "--workers", 0, "--project", project, "--name", "exp", "--evolve", trials, *extra)]


def start_worker(args: list[str], log: Path, **env) -> subprocess.Popen:
    """train.py *args in another process, its output going to the file `log`."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=train_env(**env), cwd=str(ROOT),
                                stdout=out, stderr=subprocess.STDOUT, text=True)


def wait_for_line(worker: subprocess.Popen, log: Path, pattern: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text(), flags=re.M):
        assert worker.poll() is None, f"the worker ended before logging {pattern!r}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {pattern!r} after {timeout} s:\n{log.read_text()}"
        time.sleep(0.1)


def evolve_here(args: list[str], caplog) -> str:
    """train.py *args in this process (a worker as any other); returns what it logged."""
    caplog.clear()
    with one_intra_op_thread(), caplog.at_level("INFO", logger="yolo"):
        assert train.cli(train.parse_opt(in_process_args(args))) == 0
    return "\n".join(r.getMessage() for r in caplog.records)


def load(folder: Path, name: str = "evolve") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'evolve.db'}")


def trained_by(log: str) -> list[int]:
    """The trial numbers a worker's log says it started training."""
    return [int(n) for n in re.findall(r"^evolve: trial (\d+) \(\d+ of \d+\) by ", log, flags=re.M)]


def check_outputs_match_storage(folder: Path, study: optuna.Study, hyp_file: Path = HYP) -> None:
    """evolve.csv: a row per completed trial, in trial order, with the storage's fitness, the metrics it came from
    and every hyp value; hyp_evolve.yaml: the best row's hyps; evolve.png written."""
    complete = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    table = pd.read_csv(folder / "evolve.csv")
    assert table["trial"].tolist() == [t.number for t in complete]
    hyp_keys = list(yaml.safe_load(hyp_file.read_text()))
    assert set(hyp_keys) <= set(table.columns)
    for (_, row), t in zip(table.iterrows(), complete):
        assert row["fitness"] == pytest.approx(t.value, rel=1e-12)
        assert row["fitness"] == pytest.approx(0.1 * row["metrics/mAP_0.5"] + 0.9 * row["metrics/mAP_0.5:0.95"],
                                               rel=1e-9)
        for k, v in t.params.items():  # what the sampler chose is what the trial trained with
            assert row[k] == v if isinstance(v, str) else row[k] == pytest.approx(v, rel=1e-12)
        assert row["iou_t"] == t.user_attrs["hyp"]["iou_t"] == 0.2  # a hyp not searched: the file's value
    best = max(complete, key=lambda t: t.value)
    assert yaml.safe_load((folder / "hyp_evolve.yaml").read_text()) == best.user_attrs["hyp"]
    assert (folder / "evolve.png").stat().st_size > 10_000


def test_search_space_is_yolov5s_mutated_keys_within_its_bounds_plus_the_ema():
    hyp = train.load_hyp(HYP)
    space = evolve.search_space(hyp)
    mutated = {k for k, (gain, _, _) in YOLOV5_META.items() if gain > 0} - {"anchors", "copy_paste"}
    assert set(space) == mutated | {"ema_tau", "ema_unit"}
    for k in mutated:
        assert (space[k].low, space[k].high) == YOLOV5_META[k][1:]
    assert space["lr0"].log and space["ema_tau"].log and not space["momentum"].log
    assert space["ema_unit"].choices == ("steps", "images")
    # A power EMA has no ramp time constant; its width is searched where the hyp file gives one.
    power = evolve.search_space({**hyp, "ema_schedule": "power", "ema_sigma_rel": 0.1})
    assert "ema_tau" not in power
    assert (power["ema_sigma_rel"].low, power["ema_sigma_rel"].high) == pytest.approx((0.01, 0.3003), abs=1e-4)
    assert "ema_sigma_rel" not in evolve.search_space({**hyp, "ema_schedule": "power", "ema_gamma": 6.94})


def test_two_workers_on_one_sqlite_study_share_its_trials(tiny, tmp_path, caplog):
    """This process and another train the study's trials together: the other creates it and starts its first
    trial; this one joins then (so that both have trials to train)."""
    trials = 4
    args = evolve_args(tiny, tmp_path, trials)
    other = start_worker(args, tmp_path / "other.log")
    wait_for_line(other, tmp_path / "other.log", r"^evolve: trial 0 \(1 of 4\)")
    here = evolve_here(args, caplog)
    assert other.wait(timeout=300) == 0, (tmp_path / "other.log").read_text()
    logs = [(tmp_path / "other.log").read_text(), here]
    folder = tmp_path / "exp"
    study = load(folder)
    complete = [t.number for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert len(complete) == trials
    ran = [trained_by(log) for log in logs]
    assert all(ran), f"each worker should have trained some of the trials: {ran}"
    assert sorted(ran[0] + ran[1]) == sorted(complete)  # every trial trained once, by one worker
    host = evolve.WORKER.split(":")[0]
    workers = {n: t.user_attrs["worker"] for t in study.get_trials(states=(TrialState.COMPLETE,)) for n in [t.number]}
    assert workers == {**{n: f"{host}:{other.pid}" for n in ran[0]}, **{n: evolve.WORKER for n in ran[1]}}
    for n in complete:  # a folder per trial, trained for exactly its one epoch, checkpoints removed
        rows = (folder / "trials" / f"evolve-{n}" / "results.csv").read_text().splitlines()
        assert len(rows) == 2 and not (folder / "trials" / f"evolve-{n}" / "weights").exists()
    assert len(list((folder / "trials").iterdir())) == trials
    assert all("Checkpoints: " not in log for log in logs)  # no sizes of weights that are deleted straight after
    first = min(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    assert first.params == evolve.hyp_params(train.load_hyp(HYP), evolve.search_space(train.load_hyp(HYP)))
    check_outputs_match_storage(folder, study)
    best = study.best_trial
    last = rf"best so far: trial {best.number} \(fitness {best.value:.5f}\); {trials} of {trials} trials done"
    assert any(re.search(last, log) for log in logs)


def test_a_killed_worker_leaves_a_study_the_next_command_continues(tiny, tmp_path, caplog):
    trials = 2
    args = evolve_args(tiny, tmp_path, trials, "--evolve-heartbeat", 1)
    killed = start_worker(args, tmp_path / "killed.log", **{KILL_HOOK_ENV: 1})  # SIGKILL: first trial, 2nd batch
    assert killed.wait(timeout=300) == -9, (tmp_path / "killed.log").read_text()
    folder = tmp_path / "exp"
    [dead] = load(folder).get_trials()
    assert dead.state == TrialState.RUNNING and trained_by((tmp_path / "killed.log").read_text()) == [dead.number]
    log = evolve_here(args, caplog)  # waits for the dead trial's heartbeat to go stale (2 s), then retries it
    study = load(folder)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[dead.number] == TrialState.FAIL
    complete = [t for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert len(complete) == trials
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].params == dead.params  # the dead trial's hyps, run again
    assert sorted(trained_by(log)) == sorted(t.number for t in complete)
    check_outputs_match_storage(folder, study)
    # The study is complete: the same command again trains nothing and leaves it as it is.
    assert "has its 2 trials (this worker ran 0)" in evolve_here(args, caplog)
    assert len(load(folder).get_trials()) == len(study.get_trials())


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_journal_storage_heartbeat_fails_a_silent_trial_and_queues_it_again(tmp_path, monkeypatch):
    storage = evolve.open_storage(str(tmp_path / "evolve.journal"), heartbeat_s=5)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    silent, alive = study.ask(), study.ask()
    for trial in (silent, alive):
        trial.suggest_float("lr0", 1e-5, 1e-1, log=True)
    storage.record_heartbeat(silent._trial_id)
    assert storage._get_stale_trial_ids(study._study_id) == []
    later = time.time() + 11  # past the grace period, two heartbeats of 5 s
    monkeypatch.setattr(evolve.time, "time", lambda: later)
    storage.record_heartbeat(alive._trial_id)
    assert storage._get_stale_trial_ids(study._study_id) == [silent._trial_id]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {silent.number: TrialState.FAIL, alive.number: TrialState.RUNNING, 2: TrialState.WAITING}
    [queued] = study.get_trials(states=(TrialState.WAITING,))
    assert queued.params == study.trials[silent.number].params and queued.system_attrs["failed_trial"] == silent.number


def test_surplus_trial_fails_without_training(tmp_path):
    """Two workers that ask at once when one trial was missing: the later-numbered trial sees N before it."""
    study = optuna.create_study(direction="maximize")
    study.ask(), study.ask()  # running elsewhere
    trained = []
    search = evolve.Evolution(study, 2, {"lr0": FloatDistribution(1e-5, 1e-1)}, {"lr0": 0.01}, tmp_path,
                              lambda hyp, folder, number: trained.append(hyp) or [0.0] * 7, train.METRIC_COLUMNS,
                              "memory", poll_s=0.01)
    with pytest.raises(evolve.SurplusTrial, match="trial 2 not run: the study had its 2 trials"):
        search.objective(study.ask())
    assert trained == []
    one_short = optuna.create_study(direction="maximize")
    one_short.ask()
    value = evolve.Evolution(one_short, 2, {"lr0": FloatDistribution(1e-5, 1e-1)}, {"lr0": 0.01}, tmp_path,
                             lambda hyp, folder, number: [0.5, 0.5, 0.4, 0.2, 0, 0, 0], train.METRIC_COLUMNS, "memory",
                             poll_s=0.01).objective(one_short.ask())
    assert value == pytest.approx(0.1 * 0.4 + 0.9 * 0.2)


@pytest.mark.parametrize("extra, message", [
    (["--evolve", "0"], r"--evolve takes a number of trials of at least 1, got 0"),
    (["--evolve", "-3"], r"--evolve takes a number of trials of at least 1, got -3"),
    (["--evolve", "2", "--resume"], r"--evolve cannot be combined with --resume"),
    (["--evolve", "2", "--evolve-storage", "sqlite:////nonexistent-folder-20/e.db"],
     r"--evolve-storage sqlite:////nonexistent-folder-20/e.db: cannot open it \(OperationalError: .*unable to open"),
    (["--evolve", "2", "--evolve-storage", "postgresql://me:secret@host:notaport/db"],
     r"--evolve-storage postgresql://me:\*\*\*@host:notaport/db: cannot open it \(ValueError"),
    (["--evolve", "2", "--evolve-storage", "sqlite:/e.db"], r"--evolve-storage sqlite:/e.db: malformed URL"),
    (["--evolve", "2", "--evolve-storage", "redis://host/0"], r"unsupported scheme 'redis'"),
    (["--evolve", "2", "--evolve-storage", "/nonexistent-folder-20/e.journal"],
     r"--evolve-storage /nonexistent-folder-20/e.journal: folder /nonexistent-folder-20 does not exist"),
])
def test_bad_evolve_input_is_one_line(tiny, tmp_path, extra, message):
    args = evolve_args(tiny, tmp_path, 1)[:-2] + extra  # the trial count replaced
    with pytest.raises(train.TrainError, match=message) as e:
        train.main(train.parse_opt(args))
    assert "\n" not in str(e.value) and "secret" not in str(e.value)
    assert not (tmp_path / "exp" / "trials").exists()


def test_a_study_created_with_other_settings_is_refused(tiny, tmp_path, monkeypatch):
    journal = str(tmp_path / "evolve.journal")  # the journal storage, end to end
    args = evolve_args(tiny, tmp_path, 1, "--evolve-storage", journal)
    with one_intra_op_thread():
        assert train.cli(train.parse_opt(in_process_args(args))) == 0
    study = optuna.load_study(study_name="evolve", storage=evolve.open_storage(journal, 60))
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
    check_outputs_match_storage(tmp_path / "exp", study)
    with pytest.raises(train.TrainError, match=r"study 'evolve' in .*evolve.journal was created with other "
                                               r"settings: --epochs 1 \(this command: 2\); use the same ones"):
        train.main(train.parse_opt([*args, "--epochs", "2"]))
    hyp = yaml.safe_load(HYP.read_text())
    (tmp_path / "hyp.yaml").write_text(yaml.safe_dump({**hyp, "lr0": 0.02}))
    with pytest.raises(train.TrainError, match=r"settings: hyp lr0=0.01 \(this command: 0.02\)"):
        train.main(train.parse_opt([*args, "--hyp", str(tmp_path / "hyp.yaml")]))
    optuna.create_study(storage=evolve.open_storage(journal, 60), study_name="other")
    monkeypatch.setattr(evolve, "CREATOR_WAIT_S", 0.2)
    with pytest.raises(train.TrainError, match=r"study 'other' in .* was not created by train.py --evolve"):
        train.main(train.parse_opt([*args, "--evolve-study", "other"]))


def test_ctrl_c_fails_the_trial_under_way_and_the_command_says_how_to_continue(tiny, tmp_path, monkeypatch, caplog):
    args = evolve_args(tiny, tmp_path, 2)
    monkeypatch.setenv(INTERRUPT_HOOK_ENV, "1")  # Ctrl-C at the first trial's second batch
    with one_intra_op_thread(), caplog.at_level("INFO", logger="yolo"):
        assert train.cli(train.parse_opt(in_process_args(args))) == 130
    assert caplog.records[-1].getMessage() == ("train: --evolve: interrupted; the trial under way is marked failed "
                                               "and not counted; the same command continues the study")
    assert [t.state for t in load(tmp_path / "exp").get_trials()] == [TrialState.FAIL]


def test_evolve_refuses_torchrun():
    with pytest.raises(train.TrainError, match="start a worker per machine or GPU, not torchrun"):
        train.evolve_hyperparameters(train.parse_opt(["--evolve", "2"]), {}, None, train.Processes(0, 0, 2))


@pytest.mark.filterwarnings("ignore:Fixed parameter lr0")  # Optuna says it too; train.py filters it
def test_the_first_trial_is_the_hyp_file_even_outside_the_searched_range(caplog):
    hyp = {**train.load_hyp(HYP), "lr0": 0.5, "ema_unit": "images"}
    space = evolve.search_space(hyp)
    with caplog.at_level("INFO", logger="yolo"):
        study = evolve.join_study(optuna.storages.InMemoryStorage(), "s", {"epochs": 1}, hyp, space, "memory")
    first = study.ask()  # the queued trial: what the sampler gives it is the hyp file's values
    assert {k: evolve.suggest(first, k, d) for k, d in space.items()} == {
        **{k: float(hyp[k]) for k in space if k != "ema_unit"}, "ema_unit": "images"}
    assert "the hyp file's lr0=0.5 lies outside the searched range [1e-05, 0.1]" in caplog.text
    assert study.user_attrs == {evolve.STUDY_ATTR_FLAGS: {"epochs": 1}, evolve.STUDY_ATTR_HYP: hyp}
