"""MLflow tracking against a real `mlflow server` (conftest's mlflow_server): what a run holds, read back with
MlflowClient; a run SIGKILLed and resumed is one run whose history equals the run left alone; a tracker that
cannot be reached or fails mid-run costs one warning, not the run."""
import argparse
import math
import subprocess
import sys

import pytest
import torch
import yaml
from mlflow import MlflowClient

import train
from tests.train_helpers import (KILL_HOOK_ENV, ROOT, in_process_args, make_dataset, one_intra_op_thread,
                                 results_columns, run_train, tiny_model_yaml, tiny_run_args, train_env)
from tests.services import free_port
from utils import tracking
from utils.checkpoint import load_checkpoint
from utils.environment import project_commit

EPOCHS = 2  # 8 images in batches of 4: 2 batches an epoch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    return make_dataset(root / "data", n=8), tiny_model_yaml(root), root / "runs"


def tracked_args(tiny, name, uri, *extra):
    data, cfg, project = tiny
    args = tiny_run_args(data, cfg, project, name, EPOCHS, "--val-raw", "--mlflow", uri, *extra)
    args.remove("--noplots")  # the plots are artifacts too
    return args


def run_id_of(folder) -> str:
    return load_checkpoint(folder / "weights" / "last.pt")["train_state"]["mlflow"]["run_id"]


def history(client, run_id) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}


def test_killed_and_resumed_run_is_one_mlflow_run_equal_to_the_run_left_alone(tiny, mlflow_server, tmp_path):
    project = tiny[2]
    ref_args = tracked_args(tiny, "ref", mlflow_server)
    with (tmp_path / "ref.log").open("w") as log:  # trains beside the killed run: two cores, half the wait
        ref = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, ref_args)], env=train_env(),
                               cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT)
    killed_args = tracked_args(tiny, "killed", mlflow_server)
    killed = run_train(killed_args, **{KILL_HOOK_ENV: 3})  # epoch 1's second batch: last.pt holds epoch 0
    assert killed.returncode == -9, killed.stdout[-3000:]
    client = MlflowClient(mlflow_server)
    run_id = run_id_of(project / "killed")
    assert client.get_run(run_id).info.status == "RUNNING"
    assert client.get_run(run_id).data.metrics == {}  # epoch 0 was waiting for the epoch after it
    resumed = run_train(["--resume", project / "killed" / "weights" / "last.pt"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]

    assert run_id_of(project / "killed") == run_id
    ref_id = run_id_of(project / "ref")
    runs = client.search_runs([client.get_run(run_id).info.experiment_id])
    assert sorted(r.info.run_name for r in runs if r.info.run_name in ("ref", "killed")) == ["killed", "ref"]
    got, want = history(client, run_id), history(client, ref_id)
    assert got == want  # every epoch once, at its step, with the values of the run left alone (bit-exact resume)
    assert client.get_run(run_id).info.status == "FINISHED"

    # The metrics are results.csv's columns (names MLflow takes on every server: no colon), per epoch ...
    columns = results_columns(project / "ref" / "results.csv")
    assert "raw/mAP_0.5:0.95" in columns and "metrics/mAP_0.5:0.95" in columns
    for name, values in columns.items():
        key = name.replace(":", "_")
        assert [s for s, _ in want[key]] == list(range(EPOCHS)), name
        assert [v for _, v in want[key]] == pytest.approx(values, rel=1e-4, abs=1e-9), name
    # ... and the EMA's: its update count (last.pt's at the end) and the ramp's decay d * (1 - exp(-updates / tau))
    ckpt, hyp = load_checkpoint(project / "ref" / "weights" / "last.pt"), yaml.safe_load(
        (project / "ref" / "hyp.yaml").read_text())
    updates = [v for _, v in want["ema/updates"]]
    assert updates[-1] == ckpt["updates"] and updates[0] < updates[-1]
    assert [v for _, v in want["ema/decay"]] == pytest.approx(
        [hyp["ema_decay"] * (1 - math.exp(-u / hyp["ema_tau"])) for u in updates], rel=1e-12)
    assert set(want) == {n.replace(":", "_") for n in columns} | {"ema/updates", "ema/decay"}

    # Params: every option and hyperparameter as the run folder's opt.yaml and hyp.yaml hold them
    run = client.get_run(ref_id)
    opt = yaml.safe_load((project / "ref" / "opt.yaml").read_text())
    assert {k: run.data.params[k] for k in opt} == {k: str(v) for k, v in opt.items()}
    assert {k: run.data.params[k] for k in hyp} == {k: str(v) for k, v in hyp.items()}
    assert run.data.params["epochs"] == str(EPOCHS) and run.data.params["mlflow"] == mlflow_server
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == project_commit() and tags["torch"] == torch.__version__
    assert tags["python"] == sys.version.split()[0] and tags["mlflow.runName"] == "ref"

    # Artifacts: results.csv, the plots, best.pt, each the run folder's file
    names = {a.path for a in client.list_artifacts(ref_id)} | {a.path for a in client.list_artifacts(ref_id, "weights")}
    assert {"results.csv", "results.png", "labels.jpg", "train_batch0.jpg", "confusion_matrix.png", "opt.yaml",
            "hyp.yaml", "weights/best.pt"} <= names
    for name in ("weights/best.pt", "results.csv"):
        local = client.download_artifacts(ref_id, name, str(tmp_path))
        assert open(local, "rb").read() == (project / "ref" / name).read_bytes(), name


@pytest.mark.parametrize("failure", ["unreachable", "fails-mid-run"])
def test_a_tracker_that_fails_costs_one_warning_not_the_run(tiny, mlflow_server, tmp_path, monkeypatch, caplog,
                                                            failure):
    data, cfg, _ = tiny
    uri = f"http://127.0.0.1:{free_port()}" if failure == "unreachable" else mlflow_server  # nothing listens there
    if failure == "fails-mid-run":  # the server takes the run and its params, then refuses the first metrics
        from mlflow.entities import Metric

        real = MlflowClient.log_batch

        def log_batch(self, run_id, metrics=(), *args, **kwargs):
            if any(isinstance(m, Metric) for m in metrics):
                raise OSError("connection reset by peer")
            return real(self, run_id, metrics, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once instead of after retries
    args = tiny_run_args(data, cfg, tmp_path, "exp", 1, "--mlflow", uri)
    with one_intra_op_thread(), caplog.at_level("INFO", logger="yolo"):
        assert train.cli(train.parse_opt(in_process_args(args))) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "MLflow" in r.getMessage()]
    assert len(warnings) == 1, warnings
    what = "starting the run" if failure == "unreachable" else "logging metrics"
    assert warnings[0].startswith(f"MLflow: {what} failed at {uri} (") and "training goes on" in warnings[0]
    assert "\n" not in warnings[0]
    ckpt = load_checkpoint(tmp_path / "exp" / "weights" / "last.pt")
    assert ckpt["epoch"] == 0 and "resume" not in ckpt  # the run finished, its checkpoint whole
    assert len((tmp_path / "exp" / "results.csv").read_text().splitlines()) == 2
    assert ("mlflow" in ckpt["train_state"]) == (failure == "fails-mid-run")  # a run exists only when it started


def test_only_rank_0_tracks_and_nothing_tracks_unasked(mlflow_server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    opt = argparse.Namespace(mlflow=mlflow_server, nosave=False, save_dir="x", project="rank1")
    assert tracking.Tracker.start(opt, {}, None, main=False) is None
    assert tracking.Tracker.start(argparse.Namespace(mlflow=False), {}, None, main=True) is None
    assert MlflowClient(mlflow_server).get_experiment_by_name("rank1") is None  # nothing was created
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent-folder-30/m.db")
    assert tracking.wanted(argparse.Namespace(mlflow=False))
    assert tracking.tracking_uri(argparse.Namespace(mlflow=True)) == "sqlite:////nonexistent-folder-30/m.db"
    assert tracking.tracking_uri(argparse.Namespace(mlflow=mlflow_server)) == mlflow_server  # the flag's URI wins
