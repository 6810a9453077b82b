"""bench/ema_quality.py --quick: one seed of every variant trained by train.py on a tiny digits set, every model
evaluated on the test split, the table and its files written."""
import math

import pandas as pd
import pytest

from bench import ema_quality

AVERAGED = ("EMA, end", "EMA, best val epoch", "post-hoc EMA, width chosen on val", "EMA images, end",
            "EMA images, best val epoch", "Switch EMA, end", "Switch EMA, best val epoch", "BEMA, end",
            "BEMA, best val epoch")
ROWS = ("raw, end", "raw, best val epoch", *[m for a in AVERAGED for m in (a, f"{a} + BN recompute")])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    project = tmp_path_factory.mktemp("bench")
    status = ema_quality.main(["--quick", "--project", str(project), "--jobs", "2", "--threads", "1", "--workers", "0"])
    assert status == 0
    return project / "quick"


def test_quick_table_has_every_model_and_sane_numbers(quick):
    table = pd.read_csv(quick / "ema_quality_summary.csv")
    assert tuple(table.columns) == ema_quality.COLUMNS
    assert sorted(table["model"]) == sorted(ROWS)
    for column in ("mAP50-95", "mAP50"):
        values = table[column].to_numpy()
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in values), (column, values)
        assert table[f"{column} sd"].isna().all()  # one seed: no spread to report
    assert (table["seeds"] == 1).all()
    # The gain is each model's mAP50-95 minus the raw model's at the end of the same run.
    raw_end = table.loc[table["model"] == "raw, end", "mAP50-95"].item()
    assert table["gain vs raw end"].to_numpy() == pytest.approx(table["mAP50-95"].to_numpy() - raw_end, abs=1e-12)
    assert list(table["model"]) == [m for m in ema_quality.row_order() if m in ROWS]  # reading order
    chosen = dict(zip(table["model"], table["chosen on val"].fillna("")))
    assert chosen["raw, best val epoch"] in ("epoch 0", "epoch 1")
    assert chosen["post-hoc EMA, width chosen on val"].startswith("sigma_rel ")


def test_quick_writes_per_seed_figures_and_the_plot(quick):
    per_seed = pd.read_csv(quick / "ema_quality.csv")
    assert len(per_seed) == len(ROWS) and set(per_seed["seed"]) == {0}
    curves = pd.read_csv(quick / "ema_quality_curves.csv")
    assert set(curves["model"]) == {"raw", "EMA"} and sorted(set(curves["epoch"])) == [0, 1]
    assert (quick / "ema_quality.png").stat().st_size > 10_000
    # The runs are train.py's own: the ramp run kept post-hoc snapshots and validated the raw model.
    results = pd.read_csv(quick / "ramp-s0" / "results.csv", skipinitialspace=True)
    assert "raw/mAP_0.5:0.95" in [c.strip() for c in results.columns]
    assert any((quick / "ramp-s0" / "weights" / "posthoc").iterdir())


def test_a_run_folder_of_another_recipe_is_refused(quick, caplog):
    status = ema_quality.main(["--quick", "--project", str(quick.parent), "--variants", "ramp", "--epochs", "3"])
    assert status == 1
    assert "holds a run of another recipe; pass --fresh or another --name" in caplog.text


def test_bad_options_are_one_line_before_anything_trains(tmp_path, caplog):
    assert ema_quality.main(["--jobs", "0", "--project", str(tmp_path)]) == 1
    assert "--jobs must be at least 1, got 0" in caplog.text
    assert ema_quality.main(["--seeds", "1", "1", "--project", str(tmp_path)]) == 1
    assert "--seeds lists a seed twice" in caplog.text
    assert not any(tmp_path.rglob("*.pt"))
