"""bench/ema_quality.py --quick: one seed of every variant trained by train.py on a tiny digits set (the taus other
than the ramp's as companion EMAs of its run, SWA on top of it), every model evaluated on the test split, the table
and its files written; the regimes' recipes."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from bench import ema_quality

ROOT = Path(__file__).resolve().parents[1]

AVERAGED = ("EMA, end", "EMA, best val epoch", "post-hoc EMA, width chosen on val", "EMA tau 200, end",
            "EMA tau 200, best val epoch", "EMA images, end", "EMA images, best val epoch", "Switch EMA, end",
            "Switch EMA, best val epoch", "BEMA, end", "BEMA, best val epoch", "BEMA burn-in 560, end",
            "BEMA burn-in 560, best val epoch")
SWA_ROW = "SWA (2 extra epochs)"  # its statistics recomputed as part of SWA: no separate BN row
ROWS = ("raw, end", "raw, best val epoch", *[m for a in AVERAGED for m in (a, f"{a} + BN recompute")], SWA_ROW)


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
    assert list(table["model"]) == [m for m in ema_quality.row_order([200], 2) if m in ROWS]  # reading order
    chosen = dict(zip(table["model"], table["chosen on val"].fillna("")))
    assert chosen["raw, best val epoch"] in ("epoch 0", "epoch 1")
    assert chosen["post-hoc EMA, width chosen on val"].startswith("sigma_rel ")
    assert chosen["EMA tau 200, best val epoch"] in ("epoch 0", "epoch 1")
    extra = dict(zip(table["model"], table["extra training"]))
    assert extra[SWA_ROW] == "+2 epochs (+100% of the run's 2)"
    assert {v for m, v in extra.items() if m != SWA_ROW} == {"-"}


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


def test_each_run_trains_the_recipe_hyp_with_the_variant_keys_on_top(quick):
    ramp = json.loads((quick / "ramp-s0" / "bench_recipe.json").read_text())["hyp"]
    switch = yaml.safe_load((quick / "switch-s0" / "hyp_in.yaml").read_text())
    shipped = yaml.safe_load((ROOT / "hyp" / "hyp.scratch-low.yaml").read_text())
    assert shipped["fliplr"] == 0.5 and ramp["fliplr"] == 0.0  # the bench's default --set
    assert ramp["ema_tau"] == 2000 and ramp["ema_companion_taus"] == [200]  # YOLOv5's tau, another beside
    assert switch["ema_switch"] is True and switch["ema_companion_taus"] == []  # companions: the ramp runs' only
    own = ("ema_switch", "ema_companion_taus")
    assert {k: v for k, v in switch.items() if k not in own} == {k: v for k, v in ramp.items() if k not in own}
    # train.py trained with what hyp_in.yaml says (its own record of the hyp in the run folder), and kept the
    # companions in every epoch checkpoint; no run of its own trains another tau.
    assert yaml.safe_load((quick / "ramp-s0" / "hyp.yaml").read_text())["ema_companion_taus"] == [200]
    assert sorted(torch.load(quick / "ramp-s0" / "weights" / "epoch0.pt", weights_only=True)["ema_companions"]) == \
        ["tau200"]
    assert not (quick / "tau200-s0").exists()
    # SWA: swa.py's extra epochs from the ramp run's last.pt
    swa = torch.load(quick / "swa-s0" / "weights" / "swa.pt", weights_only=True)["swa"]
    assert swa["epochs"] == swa["averaged"] == 2 and swa["from"] == str(quick / "ramp-s0" / "weights" / "last.pt")
    burnin = yaml.safe_load((quick / "bema_burnin-s0" / "hyp.yaml").read_text())
    assert burnin["ema_bema"] is True and burnin["ema_update_after_step"] == 560  # a key no shipped hyp file holds


def test_set_refuses_a_key_the_hyp_file_lacks_and_a_pair_without_value(tmp_path, caplog):
    assert ema_quality.main(["--set", "flip_lr=0", "--project", str(tmp_path)]) == 1
    assert "--set flip_lr: " in caplog.text and "has no key 'flip_lr'" in caplog.text
    assert ema_quality.main(["--set", "fliplr", "--project", str(tmp_path)]) == 1
    assert "--set takes KEY=VALUE, got 'fliplr'" in caplog.text
    assert not any(tmp_path.rglob("*.pt"))


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


def test_summary_pairs_gains_by_seed_and_lists_choices_in_seed_order():
    # Scores arrive in the order runs finish, not by seed.
    S = ema_quality.Score
    scores = [S("raw, end", 2, 0.30, 0.5), S("EMA, best val epoch", 2, 0.36, 0.6, "epoch 9"),
              S("raw, end", 0, 0.10, 0.2), S("EMA, best val epoch", 0, 0.13, 0.3, "epoch 4"),
              S("EMA, best val epoch", 1, 0.24, 0.4, "epoch 7"), S("raw, end", 1, 0.20, 0.3)]
    table = ema_quality.summary(scores).set_index("model")
    ema = table.loc["EMA, best val epoch"]
    assert ema["chosen on val"] == "epoch 4, epoch 7, epoch 9"
    gains = [0.03, 0.04, 0.06]  # per seed, each against its own raw model
    assert ema["gain vs raw end"] == pytest.approx(sum(gains) / 3)
    assert ema["gain sd"] == pytest.approx(float(pd.Series(gains).std(ddof=1)))
    assert ema["mAP50-95"] == pytest.approx((0.13 + 0.24 + 0.36) / 3) and ema["seeds"] == 3


def test_regimes_set_the_recipe_where_the_command_line_left_the_defaults():
    short = ema_quality.parse_opt(["--regime", "short"])
    assert (short.data, short.img, short.batch_size, short.epochs, short.name) == ("digits.yaml", 64, 16, 13,
                                                                                  "digits-short")
    # nbs = batch: every batch one optimizer step; the scale and class gain at which the classes are learned
    assert short.hyp_set == [*ema_quality.RECIPE_HYP, "nbs=16", "scale=0.2", "cls=4.0"]
    long = ema_quality.parse_opt(["--regime", "long", "--epochs", "80", "--set", "nbs=32", "cls=2"])
    assert (long.epochs, long.hyp_set, long.name) == (80, ["nbs=32", "cls=2", "scale=0.2"], "digits-long")
    # The steps the issue asks for on the 2,400 training canvases: 1,000-2,000 short, at least 10,000 long.
    for name, (low, high) in (("short", (1000, 2000)), ("long", (10000, math.inf))):
        r = ema_quality.REGIMES[name]
        assert r["hyp"]["nbs"] == r["batch_size"] and low <= r["epochs"] * 2400 // r["batch_size"] <= high, name
    with pytest.raises(SystemExit):
        ema_quality.parse_opt(["--quick", "--regime", "short"])
