"""train.py --evolve on a real PostgreSQL server (initdb + pg_ctl on a loopback port, tests/services.py): two
workers, as on two machines (each its own --project), share one postgresql:// study while one of them is SIGKILLed
mid-trial; the trials nest as MLflow runs under the study's one parent run (conftest's mlflow_server)."""
import re

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.services import postgres_server
from tests.test_evolve import (check_outputs_match_storage, evolve_args, evolve_here, start_worker, tiny,  # noqa: F401
                               trained_by, wait_for_line)
from tests.train_helpers import KILL_HOOK_ENV
from utils import evolve


@pytest.fixture(scope="module")
def postgres():
    with postgres_server("evolve") as url:
        yield url


def test_two_workers_share_a_postgresql_study_and_one_killed_mid_trial_is_run_again(tiny, postgres, mlflow_server,
                                                                                     tmp_path, caplog):
    trials = 2
    shared = ("--evolve-storage", postgres, "--evolve-heartbeat", 1, "--mlflow", mlflow_server)
    killed_log = tmp_path / "killed.log"
    # Worker 1 creates the study, starts trial 0 and dies at its second batch (SIGKILL: no chance to say so).
    killed = start_worker(evolve_args(tiny, tmp_path / "machine1", trials, *shared), killed_log, **{KILL_HOOK_ENV: 1})
    wait_for_line(killed, killed_log, r"^evolve: trial 0 \(1 of 2\)")
    # Worker 2 joins while trial 0 runs; it trains its own trial, then the dead one's again once its heartbeat is
    # older than the grace period (2 s).
    here = evolve_here(evolve_args(tiny, tmp_path / "machine2", trials, *shared), caplog)
    assert killed.wait(timeout=60) == -9, killed_log.read_text()[-3000:]

    study = optuna.load_study(study_name="evolve", storage=evolve.open_storage(postgres, heartbeat_s=60))
    states = {t.number: t.state for t in study.get_trials()}
    assert trained_by(killed_log.read_text()) == [0] and states[0] == TrialState.FAIL
    complete = sorted(t.number for t in study.get_trials(states=(TrialState.COMPLETE,)))
    assert len(complete) == trials and set(states) == {0, *complete}  # nothing running, waiting or surplus left
    assert sorted(trained_by(here)) == complete  # every counted trial trained once, by the live worker
    [retried] = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.system_attrs.get("failed_trial") == 0]
    assert retried.params == study.trials[0].params  # the dead trial's hyps, run again
    folder = tmp_path / "machine2" / "exp"
    check_outputs_match_storage(folder, study)  # evolve.csv: a row per completed trial of the storage, as it holds
    assert not (tmp_path / "machine1" / "exp" / "evolve.csv").exists()  # worker 1 never completed a trial

    # MLflow: both workers found one parent run by the study's tag; each trial a run nested under it
    parents = {m for log in (killed_log.read_text(), here)
               for m in re.findall(r"MLflow: study 'evolve' is run (\w+) in ", log)}
    assert len(parents) == 1, parents
    [parent] = parents
    client = MlflowClient(mlflow_server)
    run = client.get_run(parent)
    assert run.data.tags["evolve.study"] == "evolve" and run.data.tags["evolve.trials"] == str(trials)
    assert run.data.metrics["best_fitness"] == pytest.approx(study.best_value, rel=1e-12)
    nested = client.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    finished = {int(r.data.tags["evolve.trial"]): r for r in nested if r.info.status == "FINISHED"}
    assert sorted(finished) == complete
    for number, r in finished.items():
        assert r.data.metrics["fitness"] == pytest.approx(study.trials[number].value, rel=1e-12)
    assert [r.data.tags["evolve.trial"] for r in nested if r.info.status != "FINISHED"] == ["0"]  # the dead trial's
