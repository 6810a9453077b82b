"""Exact resume: a run SIGKILLed mid-epoch and resumed ends bit-identical to the same run left alone (FP32 and
fp16 with its GradScaler); its TensorBoard curves continue without duplicates; extension with --epochs;
refusals that leave the disk untouched."""
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tests.train_helpers import (KILL_HOOK_ENV, checkpoint_differences, make_dataset, results_columns, run_train,
                                 refused_run, tensorboard_scalars, tiny_model_yaml, tiny_run_args, tree_digest,
                                 walked_optimizer_steps)
import val
from tests.train_helpers import ROOT, train_env
from train import OVERFLOW_HOOK_ENV, TrainError, load_hyp, parse_opt, prepare_resume
from utils.checkpoint import FINISHED_KEYS, load_checkpoint, save_checkpoint, unpacked_state_dict

N_IMAGES, BATCH, EPOCHS = 12, 4, 3
NB = N_IMAGES // BATCH  # 3 batches per epoch


def expected_optimizer_steps(epochs):
    return walked_optimizer_steps(NB, epochs, nw=max(round(3.0 * NB), 100), nbs=64, batch=BATCH)


# The fp16 runs: a small growth interval and an overflow before and after the kill, so the GradScaler's scale and
# growth tracker at the kill differ from their start and decide how the resumed run goes on.
# They also keep post-hoc EMAs: a killed and resumed run must write the same snapshots as the run left alone.
FP16_HYP = {"amp_init_scale": 1024.0, "amp_growth_interval": 2, "posthoc_sigma_rels": [0.05, 0.1], "posthoc_snapshots": 4}
FP16_ENV = {OVERFLOW_HOOK_ENV: "1,7"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data, cfg = make_dataset(root / "data", n=N_IMAGES), tiny_model_yaml(root)
    project = root / "runs"
    ref = run_train(tiny_run_args(data, cfg, project, "ref", EPOCHS))
    assert ref.returncode == 0, ref.stdout[-3000:]
    fp16_hyp = root / "fp16_hyp.yaml"
    fp16_hyp.write_text(yaml.safe_dump({**load_hyp(str(parse_opt([]).hyp)), **FP16_HYP}))
    fp16_args = ["--amp", "fp16", "--hyp", fp16_hyp]
    ref16 = run_train(tiny_run_args(data, cfg, project, "ref16", EPOCHS, *fp16_args), **FP16_ENV)
    assert ref16.returncode == 0, ref16.stdout[-3000:]
    assert ref16.stdout.count("Skipped the optimizer step") == 2
    return {"root": root, "data": data, "cfg": cfg, "project": project, "ref": project / "ref",
            "ref16": project / "ref16", "fp16_args": fp16_args}


def test_reference_run_checkpoint_contents(setup):
    ckpt = torch.load(setup["ref"] / "weights" / "last.pt", weights_only=True)
    assert "resume" not in ckpt, "resume state must be stripped when the run finishes"
    assert "resume" not in torch.load(setup["ref"] / "weights" / "best.pt", weights_only=True)
    assert type(ckpt["best_fitness"]) is float and ckpt["epoch"] == EPOCHS - 1
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values() if v.is_floating_point())
    assert all(v.dtype == torch.float16 for v in ckpt["ema"].values() if v.is_floating_point())
    # Steps by hand: accumulate is 1 for ni 0-3 and 2 for ni 4-8 -> steps at ni 0, 1, 2, 3, 5, 7.
    assert ckpt["updates"] == expected_optimizer_steps(EPOCHS) == 6
    assert set(ckpt) == {"format", "version", "epoch", "best_fitness", "model", "ema", "updates", "optimizer", "opt",
                         "hyp", "yaml", "nc", "names", "date", "train_state"}
    rows = (setup["ref"] / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + EPOCHS and rows[0].split(",")[0].strip() == "epoch"
    assert [h.strip() for h in rows[0].split(",")][-3:] == ["x/lr0", "x/lr1", "x/lr2"]
    # Every iteration is in warm-up (100 of them): the lr logged after epoch e's last iteration ni = 3e + 2
    # is on the way from 0.1 (biases) or 0 (other groups) to lr0 * lf(e), lf linear from 1 to lrf = 0.01.
    for e, row in enumerate(rows[1:]):
        ni, target = NB * e + NB - 1, 0.01 * (1 - 0.99 * e / EPOCHS)
        lrs = [float(v) for v in row.split(",")[-3:]]
        assert lrs == pytest.approx([0.1 + ni / 100 * (target - 0.1)] + [ni / 100 * target] * 2, rel=1e-4), e


@pytest.mark.parametrize("kill_at, workers, resume_workers, amp", [(4, 0, None, "off"), (7, 2, 2, "off"),
                                                                   (5, 0, None, "fp16")],
                         ids=["kill-epoch1-workers0-v1file", "kill-epoch2-workers2", "kill-epoch1-fp16"])
def test_sigkill_mid_epoch_then_resume_is_bit_exact(setup, kill_at, workers, resume_workers, amp):
    name = f"killed{kill_at}-{amp}"
    fp16 = amp == "fp16"
    env = FP16_ENV if fp16 else {}
    args = tiny_run_args(setup["data"], setup["cfg"], setup["project"], name, EPOCHS, *(setup["fp16_args"] if fp16 else []))
    args[args.index("--workers") + 1] = workers
    killed = run_train(args, **env, **{KILL_HOOK_ENV: kill_at})
    assert killed.returncode == -9, killed.stdout[-3000:]  # died by SIGKILL, mid-epoch
    last = setup["project"] / name / "weights" / "last.pt"
    interrupted = load_checkpoint(last)
    assert interrupted["epoch"] == kill_at // NB - 1 and "resume" in interrupted
    assert unpacked_state_dict(interrupted["resume"]["model"])["model.0.conv.weight"].dtype == torch.float32
    if fp16:  # the scaler had moved away from its start: restoring it is what keeps the resumed run exact
        scaler = interrupted["resume"]["scaler"]
        assert (scaler["scale"], scaler["_growth_tracker"]) != (FP16_HYP["amp_init_scale"], 0), scaler
    assert interrupted["version"] == 2 and set(interrupted["resume"]["model"]) == {"packed", "layout"}
    if workers == 0 and not fp16:  # a checkpoint of version 1 (plain state dicts in the resume state) resumes too
        interrupted["version"] = 1
        interrupted["resume"]["model"] = {k: v.clone() for k, v in unpacked_state_dict(interrupted["resume"]["model"]).items()}
        ema_state = interrupted["resume"]["ema"]
        ema_state["ema"] = {k: v.clone() for k, v in unpacked_state_dict(ema_state["ema"]).items()}
        save_checkpoint(interrupted, last)
    # A kill between writing an epoch's results row and its last.pt leaves a row that the resumed run writes
    # again; stand one in for it.
    csv = setup["project"] / name / "results.csv"
    last_row = csv.read_text().splitlines()[-1]
    csv.write_text(csv.read_text() + f"{interrupted['epoch'] + 1:20.5g}" + last_row[20:] + "\n")

    resume_args = ["--resume", last] + ([] if resume_workers is None else ["--workers", resume_workers])
    resumed = run_train(resume_args, **env)
    assert resumed.returncode == 0, resumed.stdout[-3000:]

    ref_dir, run_dir = setup["ref16" if fp16 else "ref"], setup["project"] / name
    for f in ("last.pt", "best.pt"):
        a = torch.load(ref_dir / "weights" / f, weights_only=True)
        b = torch.load(run_dir / "weights" / f, weights_only=True)
        assert checkpoint_differences(a, b) == [], f  # model, ema, updates, optimizer (FP32 momenta), ...
    assert (run_dir / "results.csv").read_text() == (ref_dir / "results.csv").read_text()
    # TensorBoard: the killed process's records of the epochs trained again are purged, so every curve holds
    # one value per epoch, equal to results.csv's (and, for fp16, the scaler's scale is the reference's).
    scalars, columns = tensorboard_scalars(run_dir), results_columns(run_dir / "results.csv")
    for tag, values in columns.items():
        assert [step for step, _ in scalars[tag]] == list(range(EPOCHS)), tag
        assert [v for _, v in scalars[tag]] == pytest.approx(values, rel=1e-4, abs=1e-9), tag
    if fp16:
        assert scalars["amp/scale"] == tensorboard_scalars(ref_dir)["amp/scale"]
        snapshots = sorted(p.name for p in (ref_dir / "weights" / "posthoc").glob("*.pt"))
        # 4 planned over the 6 planned steps (2, 3, 4, 6); the two overflows leave 4 steps taken, the last one is
        # also the final snapshot: steps 2, 3, 4 for each of the two widths
        assert [n.split("_")[1] for n in snapshots] == ["step00000002.pt", "step00000003.pt", "step00000004.pt"] * 2
        assert snapshots == sorted(p.name for p in (run_dir / "weights" / "posthoc").glob("*.pt"))
        for name in snapshots:
            a = torch.load(ref_dir / "weights" / "posthoc" / name, weights_only=True)
            b = torch.load(run_dir / "weights" / "posthoc" / name, weights_only=True)
            assert checkpoint_differences(a, b, ignore=()) == [], name


def test_resume_extends_a_finished_run(setup, tmp_path):
    run = tmp_path / "ext"
    shutil.copytree(setup["ref"], run)
    before = load_checkpoint(run / "weights" / "last.pt")
    out = run_train(["--resume", run / "weights" / "last.pt", "--epochs", EPOCHS + 1])
    assert out.returncode == 0, out.stdout[-3000:]
    assert "FP16 weights" in out.stdout  # a finished run keeps no FP32 state: says it is not bit-exact
    after = load_checkpoint(run / "weights" / "last.pt")
    assert after["epoch"] == EPOCHS and after["opt"]["epochs"] == EPOCHS + 1 and "resume" not in after
    assert after["updates"] == expected_optimizer_steps(EPOCHS + 1) == before["updates"] + 1
    assert type(after["best_fitness"]) is float and after["best_fitness"] >= before["best_fitness"]
    ref_rows = (setup["ref"] / "results.csv").read_text().splitlines()
    rows = (run / "results.csv").read_text().splitlines()
    assert rows[:len(ref_rows)] == ref_rows and len(rows) == len(ref_rows) + 1
    assert not torch.equal(after["ema"]["model.0.conv.weight"], before["ema"]["model.0.conv.weight"])



def test_resume_refusals_change_nothing(setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(setup["ref"], run)
    last = run / "weights" / "last.pt"
    before = tree_digest(run)
    line = refused_run(["--resume", last], run)  # finished, no larger --epochs
    assert "finished all 3 epochs" in line and "--epochs" in line
    with pytest.raises(TrainError, match="cannot shorten"):
        prepare_resume(parse_opt(["--resume", str(last), "--epochs", "2"]))
    assert tree_digest(run) == before

    latest, _ = prepare_resume(parse_opt(["--resume", "--project", str(tmp_path), "--epochs", "4"]))
    assert latest.resume == str(last) and latest.epochs == 4 and latest.save_dir == str(run.resolve())

    with pytest.raises(TrainError) as e:  # best.pt: written by train.py, but finished
        prepare_resume(parse_opt(["--resume", str(run / "weights" / "best.pt")]))
    assert str(e.value) == (f"--resume: {run / 'weights' / 'best.pt'} is a finished checkpoint for evaluation and "
                            f"fine-tuning: it keeps no resume state; resume from the run's weights/last.pt: "
                            f"python train.py --resume {last}")

    (run / "notes.pt").write_text("not a checkpoint\n")
    line = refused_run(["--resume", run / "notes.pt"], run)
    assert "notes.pt" in line and "not a checkpoint" in line

    # A run whose dataset is gone: its checkpoint points at a dataset copy whose images were deleted.
    gone = tmp_path / "gone"
    shutil.copytree(setup["data"].parent, gone)
    (gone / "data.yaml").write_text((gone / "data.yaml").read_text().replace(str(setup["data"].parent), str(gone)))
    ckpt = load_checkpoint(last)
    ckpt["opt"]["data"] = str(gone / "data.yaml")
    save_checkpoint(ckpt, last)
    shutil.rmtree(gone / "images")
    line = refused_run(["--resume", last, "--epochs", 5], tmp_path)
    assert "data" in line and str(gone / "images" / "train") in line


def test_a_run_killed_while_stopping_early_is_finished_not_trained_further(setup, tmp_path):
    """Early stopping writes last.pt with its resume state and strips that state only afterwards; a resume of
    a run killed in between must finish it, not train another epoch. Such a checkpoint is made from one
    killed after epoch 1 by giving it a patience of 1 spent since a better epoch 0."""
    args = tiny_run_args(setup["data"], setup["cfg"], tmp_path, "stop", EPOCHS)
    assert run_train(args, **{KILL_HOOK_ENV: 2 * NB + 1}).returncode == -9
    last = tmp_path / "stop" / "weights" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 1 and "resume" in ckpt
    ckpt["opt"]["patience"] = 1
    ckpt["train_state"]["early_stopping"] = {"best_fitness": 1.0, "best_epoch": 0}
    save_checkpoint(ckpt, last)

    out = run_train(["--resume", last])
    assert out.returncode == 0, out.stdout[-3000:]
    assert "stopped early after epoch 1" in out.stdout
    after = load_checkpoint(last)
    assert after["epoch"] == 1 and after["updates"] == ckpt["updates"] and "resume" not in after
    assert len((tmp_path / "stop" / "results.csv").read_text().splitlines()) == 1 + 2
    with pytest.raises(TrainError, match="stopped early after 2 of 3 epochs; pass --epochs larger than 3"):
        prepare_resume(parse_opt(["--resume", str(last)]))


def test_a_run_killed_while_finishing_is_resumed_to_its_end(setup, tmp_path):
    """SIGKILL after the last epoch's checkpoint, as the final validation of best.pt begins: last.pt still holds its
    resume state, and --resume trains nothing more, validates best.pt, writes the closing lines, exits 0 and only then
    marks last.pt finished. The run was started at --img 63: its files store the 64 it really used (stride 32)."""
    args = tiny_run_args(setup["data"], setup["cfg"], tmp_path, "late", 1, "--img", 63)
    assert run_train(args, **{KILL_HOOK_ENV: "finish"}).returncode == -9
    weights = tmp_path / "late" / "weights"
    killed = load_checkpoint(weights / "last.pt")
    assert killed["epoch"] == 0 and "resume" in killed
    assert killed["opt"]["imgsz"] == load_checkpoint(weights / "best.pt")["opt"]["imgsz"] == 64
    assert yaml.safe_load((tmp_path / "late" / "opt.yaml").read_text())["imgsz"] == 64

    out = run_train(["--resume", weights / "last.pt"])
    assert out.returncode == 0, out.stdout[-3000:]
    assert "WARNING" not in out.stdout  # 64 needs no rounding
    lines = out.stdout.splitlines()
    assert "All 1 epochs were trained before the run stopped; finishing it" in lines
    assert f"Validating {weights / 'best.pt'}..." in lines and lines[-1] == f"Results saved to {tmp_path / 'late'}"
    after = load_checkpoint(weights / "last.pt")
    assert "resume" not in after and after["updates"] == killed["updates"]
    assert len((tmp_path / "late" / "results.csv").read_text().splitlines()) == 1 + 1  # no epoch trained again
    with pytest.raises(TrainError, match="finished all 1 epochs"):
        prepare_resume(parse_opt(["--resume", str(weights / "last.pt")]))


def test_posthoc_ema_on_a_trained_run(setup, tmp_path):
    """A run with posthoc_sigma_rels, then posthoc_ema.py: the sweep (widths 3 snapshots of 0.05 and 0.1 can
    reach) is validated, the winner overall named, and the best width saved as a finished checkpoint that val.py
    loads when it is that winner (under its own name when the run's own EMA or raw model wins)."""
    run = tmp_path / "ref16"
    shutil.copytree(setup["ref16"], run)
    out = subprocess.run([sys.executable, str(ROOT / "posthoc_ema.py"), "--run", str(run), "--sigma-rel", "0.04",
                          "0.14", "--num", "3", "--workers", "0"], env=train_env(), cwd=str(ROOT),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    rows = [ln.split() for ln in out.stdout.splitlines()]
    assert [r[1] for r in rows if r[:1] == ["posthoc"]] == ["0.04", "0.07483", "0.14"], out.stdout[-3000:]
    assert any(r[:2] == ["EMA", "last"] for r in rows) and any(r[:2] == ["raw", "last"] for r in rows)
    assert (run / "posthoc_ema.png").is_file()
    # The winner overall is the row of highest fitness in posthoc_ema.csv (full precision), a post-hoc width on a tie
    table = [ln.split(",") for ln in (run / "posthoc_ema.csv").read_text().splitlines()[1:]]
    top = max(float(r[-1]) for r in table)
    winners = [r[0] for r in table if float(r[-1]) == top]
    said = next(ln for ln in out.stdout.splitlines() if ln.startswith("Best overall: "))
    saved = run / "weights" / "posthoc_best.pt"
    if "posthoc" in winners:
        assert said.startswith("Best overall: post-hoc sigma_rel ")
        best = torch.load(saved, weights_only=True)
        assert set(best) == set(FINISHED_KEYS)
        assert val.run(str(setup["data"]), weights=saved, imgsz=64, workers=0, plots=False,
                       project=tmp_path / "val")[0][3] >= 0
    else:  # one of the run's own models is better: no post-hoc width is called best
        assert said.startswith(f"Best overall: {winners[0]} (fitness "), (said, winners)
        assert not saved.exists() and list((run / "weights").glob("posthoc_sigma*.pt"))


def test_sigkill_then_resume_is_bit_exact_with_switch_ema_bema_and_bn_recompute(setup, tmp_path):
    """The EMA variants keep state a resume must restore (BEMA's average and theta_0, the companion EMAs) or change
    the trained model every epoch (Switch EMA, the recomputed BatchNorm statistics): killed mid-epoch 1 and resumed,
    the run ends as the same run left alone, its epoch checkpoints included."""
    hyp = tmp_path / "variants.yaml"
    hyp.write_text(yaml.safe_dump({**load_hyp(str(parse_opt([]).hyp)), "ema_switch": True, "ema_bema": True,
                                   "ema_bn_recompute": 2, "ema_update_after_step": 1,
                                   "ema_companion_taus": [3, 300]}))
    runs = {}
    for name, env in (("ref", {}), ("killed", {KILL_HOOK_ENV: NB + 1})):
        runs[name] = run_train(tiny_run_args(setup["data"], setup["cfg"], tmp_path, name, EPOCHS, "--hyp", hyp,
                                             "--save-period", 1), **env)
    assert runs["ref"].returncode == 0, runs["ref"].stdout[-3000:]
    assert runs["killed"].returncode == -9, runs["killed"].stdout[-3000:]
    interrupted = load_checkpoint(tmp_path / "killed" / "weights" / "last.pt")
    assert interrupted["epoch"] == 0 and {"bema_average", "bema_anchor"} <= set(interrupted["resume"]["ema"])
    # The companions' FP32 state in the resume state, their FP16 weights beside 'ema' (ramp EMAs beside a BEMA)
    companions = interrupted["resume"]["ema_companions"]
    assert sorted(companions) == sorted(interrupted["ema_companions"]) == ["tau3", "tau300"]
    for name, state in companions.items():
        assert state["updates"] == interrupted["updates"] and state["schedule"] == "ramp"
        fp32 = unpacked_state_dict(state["ema"])
        assert fp32["model.0.conv.weight"].dtype == torch.float32
        assert torch.equal(interrupted["ema_companions"][name]["model.0.conv.weight"],
                           fp32["model.0.conv.weight"].half())
    resumed = run_train(["--resume", tmp_path / "killed" / "weights" / "last.pt"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    for f in ("last.pt", "best.pt", *(f"epoch{e}.pt" for e in range(EPOCHS))):
        a = torch.load(tmp_path / "ref" / "weights" / f, weights_only=True)
        b = torch.load(tmp_path / "killed" / "weights" / f, weights_only=True)
        assert checkpoint_differences(a, b) == [], f
        held = a["ema_companions"]  # every finished checkpoint holds the companions, FP16 like 'ema'
        assert sorted(held) == ["tau3", "tau300"], f
        assert all(v.dtype == torch.float16 for sd in held.values() for v in sd.values() if v.is_floating_point())
        assert not torch.equal(held["tau3"]["model.0.conv.weight"], held["tau300"]["model.0.conv.weight"])
    last = torch.load(tmp_path / "ref" / "weights" / "last.pt", weights_only=True)
    # Switch EMA: the model ends as the (BEMA) average, BatchNorm statistics (recomputed) included
    assert all(torch.equal(last["model"][k], v) for k, v in last["ema"].items() if v.is_floating_point())
    assert (tmp_path / "killed" / "results.csv").read_text() == (tmp_path / "ref" / "results.csv").read_text()
