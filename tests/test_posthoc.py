"""Post-hoc EMA: the bank and its snapshots during training (schedule, files, resume), the least-squares
reconstruction against numerical integrals and directly tracked EMAs, and posthoc_ema.py on a fake run."""
import copy
import io
import logging
import math

import numpy as np
import pytest
import torch
import yaml

import posthoc_ema
from models.yolo import Model
from tests.test_ema import Vec, make_net, perturb, set_vec
from tests.train_helpers import make_dataset
from utils.checkpoint import FINISHED_KEYS, half_state_dict, load_checkpoint, save_checkpoint
from utils.ema import SIGMA_REL_MAX, ModelEMA, power_gamma
from utils.posthoc import (MAX_FIT_ERROR, PosthocEMA, PosthocError, ProfileFit, Snapshot, check_architecture,
                           find_snapshots, profile_inner, settings_from_hyp, synthesize)

# ------------------------------------------------------------------------------------------------ the fit


def stored_bank(total=3200, n=32, sigma_rels=(0.05, 0.10)):
    """Snapshot records (no files) of a bank like the training one: n evenly spaced per EMA."""
    return [Snapshot(None, s, power_gamma(s), round(i * total / n), float(round(i * total / n)), "steps")
            for s in sigma_rels for i in range(1, n + 1)]


def profile(gamma, end, t):
    """p(t) = (g + 1) t**g / T**(g + 1) on (0, T], written out on a grid."""
    return np.where(t <= end, (gamma + 1) * np.power(t / end, gamma) / end, 0.0)


def test_profile_inner_products_match_numerical_integrals():
    t = np.linspace(0, 1, 2_000_001)[1:]
    dt = t[1] - t[0]
    for (ga, ta), (gb, tb) in [((6.94, 1.0), (16.97, 0.5)), ((16.97, 0.3), (6.94, 0.9)), ((30.3, 1.0), (30.3, 1.0)),
                               ((0.5, 0.7), (2.0, 0.7)), ((-0.3, 0.4), (3.0, 1.0))]:
        numeric = np.sum(profile(ga, ta, t) * profile(gb, tb, t)) * dt
        assert profile_inner(ga, ta, gb, tb) == pytest.approx(numeric, rel=2e-3), (ga, ta, gb, tb)
        assert profile_inner(gb, tb, ga, ta) == pytest.approx(profile_inner(ga, ta, gb, tb), rel=1e-14)
    # long runs and narrow profiles: T**g overflows a float; the log form does not
    assert np.isfinite(profile_inner(200.0, 1e6, 150.0, 3e5)) and profile_inner(200.0, 1e6, 150.0, 3e5) > 0


@pytest.mark.parametrize("target, bound, about", [(0.03, 0.05, 0.011), (0.07, 0.02, 0.001), (0.15, 0.02, 0.002)])
def test_reconstruction_profile_errors_with_two_stored_emas(target, bound, about):
    fitter = ProfileFit(stored_bank())
    fit = fitter.fit(target)
    assert fit.error <= bound
    assert fit.error == pytest.approx(about, abs=0.001)  # the independent computation
    # the same error measured on a grid, from the coefficients alone
    t = np.linspace(0, 1, 400_001)[1:]
    fitted = sum(c * profile(s.gamma, s.position / 3200, t) for c, s in zip(fit.coeffs, fitter.snapshots))
    wanted = profile(fit.gamma, 1.0, t)
    numeric = math.sqrt(np.sum((fitted - wanted) ** 2) / np.sum(wanted ** 2))
    assert fit.error == pytest.approx(numeric, rel=0.02, abs=2e-4)


def test_stored_widths_reconstruct_exactly_and_unreachable_ones_are_refused():
    fitter = ProfileFit(stored_bank())
    for stored in (0.05, 0.10):
        fit = fitter.fit(stored)
        assert fit.error < 1e-5
        last = max((i for i, s in enumerate(fitter.snapshots) if s.sigma_rel == stored),
                   key=lambda i: fitter.snapshots[i].step)
        assert fit.coeffs[last] == pytest.approx(1.0, abs=1e-4)
    assert fitter.fit(0.25).error == pytest.approx(0.034, abs=0.002)
    with pytest.raises(PosthocError, match=r"sigma_rel 0\.005 is outside .*0\.05, 0\.1.* profile error .*reachable"):
        fitter.fit(0.005)
    low, high = fitter.reachable()
    assert 0.01 < low < 0.02 and 0.25 < high < 0.3
    assert fitter.fit(low * 1.01).error <= MAX_FIT_ERROR < fitter.fit(low * 0.97, max_error=None).error
    with pytest.raises(PosthocError, match="no power-function EMA"):
        fitter.fit(0.35)


def test_end_decay_is_the_power_emas_last_step_decay():
    fit = ProfileFit(stored_bank()).fit(0.07)
    assert fit.end_decay == pytest.approx((1 - 1 / 3200) ** (power_gamma(0.07) + 1))


# ------------------------------------------------------------------------------------------------ training side
def run_bank(model, bank, steps, gen, images=None, direct=()):
    trajectory = []
    for _ in range(steps):
        with torch.no_grad():
            model.v.add_(torch.randn(model.v.shape, generator=gen) * 0.1)
        trajectory.append(model.v.detach().double().clone())
        bank.update(model, images=images)
        for ema in direct:
            ema.update(model, images=images)
    return torch.stack(trajectory)


def step_weights(gamma, end, steps):
    """Weight a power EMA read at step `end` puts on the model of each step 1..steps: the integral of its
    profile over (t - 1, t], (min(t, T)**(g+1) - min(t-1, T)**(g+1)) / T**(g+1)."""
    t = np.arange(1, steps + 1, dtype=np.float64)
    return (np.minimum(t, end) / end) ** (gamma + 1) - (np.minimum(t - 1, end) / end) ** (gamma + 1)


@pytest.mark.parametrize("target", [0.03, 0.07, 0.15])
def test_synthesized_weights_match_an_ema_tracked_directly_on_a_random_walk(tmp_path, target):
    steps, dim = 640, 48
    model = Vec(dim)
    bank = PosthocEMA(model, [0.05, 0.10], steps, tmp_path / "posthoc", snapshots=32)
    direct = ModelEMA(model, schedule="power", sigma_rel=target)
    theta = run_bank(model, bank, steps, torch.Generator().manual_seed(1), direct=[direct]).numpy()
    snapshots = find_snapshots(tmp_path / "posthoc")
    fit = ProfileFit(snapshots).fit(target)
    got = synthesize(snapshots, fit.coeffs)["v"].double().numpy()
    delta = got - direct.ema.v.double().numpy()

    # Exactly: every EMA is sum_t w(t) theta_t with w(t) its profile integrated over step t, so
    # delta = sum_t g_t theta_t with g_t = sum_i c_i w_i(t) - w*(t).
    g = sum(c * step_weights(s.gamma, s.step, steps) for c, s in zip(fit.coeffs, snapshots))
    g = g - step_weights(fit.gamma, steps, steps)
    predicted = g @ theta
    scale = np.abs(theta).max() * np.abs(fit.coeffs).sum()
    np.testing.assert_allclose(delta, predicted, rtol=0, atol=2e-6 * scale)  # FP32 EMAs and snapshots

    # The bound. g_t = integral over (t-1, t] of (f - p*), so g_t**2 <= integral over (t-1, t] of (f - p*)**2
    # (Cauchy-Schwarz on a unit interval) and sum_t g_t**2 <= ||f - p*||**2 = (error * ||p*||)**2, where
    # ||p*||**2 = integral_0^T (g+1)**2 t**(2g) / T**(2g+2) dt = (g+1)**2 / ((2g+1) T). Then, per value j,
    # |delta_j| = |sum_t g_t theta_tj| <= ||g|| ||theta_j|| <= error * ||p*|| * ||theta_j|| (Cauchy-Schwarz).
    p_norm = (fit.gamma + 1) / math.sqrt((2 * fit.gamma + 1) * steps)
    assert np.linalg.norm(g) <= fit.error * p_norm * (1 + 1e-6)
    bound = fit.error * p_norm * np.linalg.norm(theta, axis=0)
    assert np.all(np.abs(delta) <= bound + 2e-6 * scale)
    # ...and the bound is tight enough to matter: the stored EMA nearest in width misses it on most values
    nearest = min((s for s in snapshots if s.step == steps), key=lambda s: abs(math.log(s.sigma_rel / target)))
    miss = torch.load(nearest.path, weights_only=True)["ema"]["v"].double().numpy() - direct.ema.v.double().numpy()
    assert np.mean(np.abs(miss) > bound) > 0.5


def test_snapshots_fall_due_evenly_and_load_with_weights_only(tmp_path):
    model, gen = make_net(), torch.Generator().manual_seed(2)
    folder = tmp_path / "weights" / "posthoc"
    bank = PosthocEMA.from_hyp(model, {"posthoc_sigma_rels": [0.05, 0.1], "posthoc_snapshots": 4, "nbs": 64},
                               total_steps=20, folder=folder)
    assert bank.planned_steps() == [5, 10, 15, 20]
    expected_bytes = bank.disk_bytes()
    for step in range(1, 21):
        perturb(model, gen)
        bank.update(model)
        assert bank.written == [s for s in (5, 10, 15, 20) if s <= step]
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(f"sr{s}_step{t:08d}.pt" for s in ("0.05", "0.1") for t in (5, 10, 15, 20))
    assert sum(p.stat().st_size for p in folder.iterdir()) == expected_bytes
    snap = torch.load(folder / "sr0.1_step00000015.pt", weights_only=True)
    assert set(snap) == {"format", "version", "sigma_rel", "gamma", "step", "position", "unit", "nbs", "images", "ema"}
    assert (snap["step"], snap["position"], snap["unit"], snap["sigma_rel"]) == (15, 15.0, "steps", 0.1)
    assert snap["gamma"] == pytest.approx(6.9372, abs=1e-4)
    assert list(snap["ema"]) == list(model.state_dict())
    assert all(v.dtype == torch.float32 for v in snap["ema"].values() if v.is_floating_point())
    assert snap["ema"]["bn.num_batches_tracked"].dtype == torch.int64
    assert bank.finish() == []  # the last step is a snapshot already
    perturb(model, gen)
    bank.update(model)  # a step beyond the plan (the plan is an estimate): finish() keeps it
    assert [p.name for p in bank.finish()] == ["sr0.05_step00000021.pt", "sr0.1_step00000021.pt"]
    assert "2 power EMAs (sigma_rel 0.05, 0.1), 4 snapshots each" in bank.summary()


def test_synthesis_combines_every_float_tensor_and_takes_integer_buffers_from_the_last(tmp_path):
    model, gen = make_net(), torch.Generator().manual_seed(3)
    bank = PosthocEMA(model, [0.05, 0.1], 6, tmp_path, snapshots=3)
    for _ in range(6):
        perturb(model, gen)
        bank.update(model)
    snapshots = find_snapshots(tmp_path)
    coeffs = np.linspace(-1.0, 2.0, len(snapshots))
    got = synthesize(snapshots, coeffs)
    states = [torch.load(s.path, weights_only=True)["ema"] for s in snapshots]
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            want = sum(c * st[k].double() for c, st in zip(coeffs, states))
            torch.testing.assert_close(got[k].double(), want, rtol=0, atol=1e-5)
            assert got[k].dtype == torch.float32
        else:
            assert torch.equal(got[k], model.state_dict()[k])  # num_batches_tracked of the last step
    assert list(got) == list(model.state_dict())


def test_killed_and_resumed_bank_writes_identical_snapshots(tmp_path):
    steps, checkpoint_at, killed_at = 30, 13, 17

    def perturbations():
        gen = torch.Generator().manual_seed(4)
        return [torch.randn(12, generator=gen) for _ in range(steps)]

    moves = perturbations()
    model = Vec(12)
    left_alone = PosthocEMA(model, [0.05, 0.1], steps, tmp_path / "ref", snapshots=6, unit="images", nbs=8)
    for i in range(steps):
        set_vec(model, model.v.detach() + moves[i])
        left_alone.update(model, images=4 + i % 3)

    model = Vec(12)
    first = PosthocEMA(model, [0.05, 0.1], steps, tmp_path / "run", snapshots=6, unit="images", nbs=8)
    for i in range(killed_at):
        set_vec(model, model.v.detach() + moves[i])
        first.update(model, images=4 + i % 3)
        if i + 1 == checkpoint_at:
            buffer = io.BytesIO()
            torch.save({"posthoc": first.state_dict(), "model": copy.deepcopy(model.state_dict())}, buffer)
    assert first.written == [5, 10, 15]  # 15 was written after the checkpoint, then the process died
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model = Vec(12)
    model.load_state_dict(saved["model"])
    resumed = PosthocEMA(model, [0.05, 0.1], steps, tmp_path / "run", snapshots=6, unit="images", nbs=8)
    resumed.load_state_dict(saved["posthoc"])
    assert resumed.written == [5, 10] and resumed.updates == checkpoint_at
    for i in range(checkpoint_at, steps):
        set_vec(model, model.v.detach() + moves[i])
        resumed.update(model, images=4 + i % 3)
    ref_files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert ref_files == sorted(p.name for p in (tmp_path / "run").iterdir()) and len(ref_files) == 12
    for name in ref_files:
        a = torch.load(tmp_path / "ref" / name, weights_only=True)
        b = torch.load(tmp_path / "run" / name, weights_only=True)
        assert {k: v for k, v in a.items() if k != "ema"} == {k: v for k, v in b.items() if k != "ema"}, name
        assert torch.equal(a["ema"]["v"], b["ema"]["v"]), name
    with pytest.raises(ValueError, match="sigma_rels"):
        PosthocEMA(Vec(12), [0.05], steps, tmp_path / "x").load_state_dict(saved["posthoc"])


def test_epochs_extension_spaces_the_remaining_snapshots_over_the_new_plan(tmp_path):
    model, gen = Vec(4), torch.Generator().manual_seed(5)
    bank = PosthocEMA(model, [0.1], 20, tmp_path, snapshots=4)
    run_bank(model, bank, 12, gen)
    state = bank.state_dict()
    extended = PosthocEMA(model, [0.1], 40, tmp_path, snapshots=4)  # train.py builds it with the new plan
    extended.load_state_dict(state)
    assert extended.total_steps == 40 and extended.written == [5, 10]
    assert [s for s in extended.planned_steps() if s > 10] == [20, 30, 40]
    run_bank(model, extended, 28, gen)
    assert extended.written == [5, 10, 20, 30, 40]


def test_finished_run_extension_continues_from_the_last_snapshots(tmp_path):
    model, gen = Vec(6), torch.Generator().manual_seed(6)
    bank = PosthocEMA(model, [0.05, 0.1], 10, tmp_path, snapshots=2)
    run_bank(model, bank, 11, gen)  # one step past the plan
    bank.finish()
    twin = copy.deepcopy(model)
    continued = PosthocEMA(twin, [0.05, 0.1], 30, tmp_path, snapshots=2)
    continued.continue_from_snapshots(updates=11)
    assert continued.written == [5, 10, 11] and continued.updates == 11
    for a, b in zip(bank.emas, continued.emas):
        assert torch.equal(a.ema.v, b.ema.v) and a.images == b.images
    run_bank(model, bank, 5, torch.Generator().manual_seed(7))
    run_bank(twin, continued, 5, torch.Generator().manual_seed(7))  # writes step 15 of the new plan
    for a, b in zip(bank.emas, continued.emas):
        assert torch.equal(a.ema.v, b.ema.v)
    with pytest.raises(ValueError, match="run is at step 12 but its last snapshot is at step 15"):
        PosthocEMA(Vec(6), [0.05, 0.1], 30, tmp_path, snapshots=2).continue_from_snapshots(updates=12)


def test_hyp_settings_are_validated_in_one_line():
    assert settings_from_hyp({"lr0": 0.01}) is None
    assert settings_from_hyp({"posthoc_sigma_rels": []}) is None
    assert settings_from_hyp({"posthoc_sigma_rels": [0.05, 0.1]}) == ([0.05, 0.1], 32)
    assert PosthocEMA.from_hyp(Vec(2), {"posthoc_sigma_rels": None}, 10, "x") is None
    bad = [({"posthoc_sigma_rels": 0.05}, "must be a list"),
           ({"posthoc_sigma_rels": [0.05, 0.4]}, r"0\.4 is not a relative width in \(0, 0\.3003\]"),
           ({"posthoc_sigma_rels": [0.05, "0.1"]}, "'0.1' is not a relative width"),
           ({"posthoc_sigma_rels": [0.05, 0.05]}, "twice"),
           ({"posthoc_sigma_rels": [0.05], "posthoc_snapshots": 0}, "posthoc_snapshots must be a whole number"),
           ({"posthoc_sigma_rels": [0.05], "posthoc_snapshots": 8.5}, "posthoc_snapshots must be a whole number"),
           ({"posthoc_sigma_rel": [0.05]}, r"unknown post-hoc EMA hyperparameter\(s\) \['posthoc_sigma_rel'\]")]
    for hyp, message in bad:
        with pytest.raises(ValueError, match=message) as e:
            settings_from_hyp(hyp)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="planned optimizer steps"):
        PosthocEMA.from_hyp(Vec(2), {"posthoc_sigma_rels": [0.1]}, None, "x")


# ------------------------------------------------------------------------------------------------ posthoc_ema.py
def perturb_detector(model, gen, scale=0.002):
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                step = torch.randn(v.shape, generator=gen) * scale
                v.add_(step.abs() if "running_var" in k else step)
            else:
                v.add_(1)


def micro_detector_yaml(root, width=8):
    """A detector of three convs and a one-level head: the whole pipeline, 21 tensors (snapshots load fast)."""
    cfg = {"nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": [[10, 13, 16, 30, 33, 23]],
           "backbone": [[-1, 1, "Conv", [width, 3, 2]], [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [16, 3, 2]]],
           "head": [[[2], 1, "Detect", ["nc", "anchors"]]]}
    file = root / f"micro{width}.yaml"
    file.write_text(yaml.safe_dump(cfg))
    return file


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A run folder as train.py leaves it with posthoc_sigma_rels [0.05, 0.1]: weights/last.pt, best.pt,
    opt.yaml and 2 x 16 snapshots of a small detector moved by a random walk for 48 optimizer steps."""
    root = tmp_path_factory.mktemp("posthoc_run")
    data, cfg = make_dataset(root / "data", n=8), micro_detector_yaml(root)
    torch.manual_seed(0)
    model = Model(cfg, ch=3, nc=2, verbose=False)
    run, steps = root / "exp", 48
    hyp = {"lr0": 0.01, "nbs": 64, "ema_decay": 0.9999, "ema_tau": 2000, "ema_schedule": "ramp",
           "posthoc_sigma_rels": [0.05, 0.1], "posthoc_snapshots": 16,
           "mosaic": 1.0, "hsv_v": 0.4, "translate": 0.1, "scale": 0.5}  # training's augmentation (--bn-recal)
    main_ema = ModelEMA.from_hyp(model, hyp, total_steps=steps)
    bank = PosthocEMA.from_hyp(model, hyp, steps, run / "weights" / "posthoc")
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        perturb_detector(model, gen)
        main_ema.update(model)
        bank.update(model)
    bank.finish()
    opt = {"data": str(data), "imgsz": 64, "batch_size": 4, "single_cls": False, "epochs": 10}
    ckpt = {"format": "yolo-ema", "version": 1, "epoch": 9, "best_fitness": 0.0,
            "model": half_state_dict(model.state_dict()), "ema": half_state_dict(main_ema.ema.state_dict()),
            "updates": steps, "optimizer": None, "opt": opt, "hyp": hyp, "yaml": model.yaml, "nc": 2,
            "names": ["c0", "c1"], "date": "2026-01-01T00:00:00+00:00",
            "train_state": {"last_opt_step": 95, "accumulate": 16}}
    save_checkpoint(ckpt, run / "weights" / "last.pt")
    save_checkpoint({k: ckpt[k] for k in FINISHED_KEYS}, run / "weights" / "best.pt")
    (run / "opt.yaml").write_text(yaml.safe_dump(opt))
    return {"run": run, "data": data, "model": model, "snapshots": find_snapshots(run / "weights" / "posthoc")}


def error_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_posthoc_ema_sweep_end_to_end(fake_run, caplog):
    caplog.set_level(logging.INFO, logger="yolo")
    run = fake_run["run"]
    assert posthoc_ema.main(["--run", str(run), "--sigma-rel", "0.04", "0.2", "--num", "3", "--workers", "0",
                             "--device", "cpu", "--batch-size", "4"]) == 0
    text = caplog.text
    assert "relative profile error" in text and "Post-hoc EMA sweep" in text
    table = text[text.index("Post-hoc EMA sweep"):].splitlines()
    assert table[1].split() == ["candidate", "sigma_rel", "decay_at_end", "fit_error", "mAP50", "mAP50-95", "fitness"]
    assert [line.split()[0] for line in table[2:7]] == ["posthoc"] * 3 + ["EMA", "raw"]
    assert (run / "posthoc_ema.png").stat().st_size > 10_000
    rows = (run / "posthoc_ema.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 + 2  # best.pt has last.pt's epoch: no separate row
    sigmas = [float(r.split(",")[1]) for r in rows[1:4]]
    np.testing.assert_allclose(sigmas, np.geomspace(0.04, 0.2, 3), rtol=1e-9)

    best = torch.load(run / "weights" / "posthoc_best.pt", weights_only=True)
    assert set(best) == set(FINISHED_KEYS)
    assert all(v.dtype == torch.float16 for v in best["ema"].values() if v.is_floating_point())
    fitnesses = [float(r.split(",")[-1]) for r in rows[1:4]]
    errors = [float(r.split(",")[3]) for r in rows[1:4]]
    tied = [i for i in range(3) if fitnesses[i] == max(fitnesses)]
    chosen = sigmas[min(tied, key=lambda i: errors[i])]  # ties go to the closer fit
    assert best["best_fitness"] == pytest.approx(max(fitnesses))
    fit = ProfileFit(fake_run["snapshots"]).fit(chosen)
    want = half_state_dict(synthesize(fake_run["snapshots"], fit.coeffs))
    assert all(torch.equal(best["ema"][k], v) for k, v in want.items())
    last = load_checkpoint(run / "weights" / "last.pt")
    assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items())  # the raw model stays
    assert best["updates"] == 48 and best["yaml"] == last["yaml"] and best["names"] == ["c0", "c1"]

    import detect
    import val
    results, _, _ = val.run(str(fake_run["data"]), weights=str(run / "weights" / "posthoc_best.pt"), imgsz=64,
                            batch_size=4, workers=0, device="cpu", project=str(run.parent / "val"), plots=False)
    assert len(results) == 7 and all(math.isfinite(x) for x in results)
    images = fake_run["data"].parent / "images" / "train"
    out = detect.run(str(images), weights=str(run / "weights" / "posthoc_best.pt"), imgsz=(64, 64), device="cpu",
                     project=str(run.parent / "detect"), conf_thres=0.0, save_txt=True, nosave=True)
    assert len(list((out / "labels").glob("*.txt"))) == 8


def test_posthoc_ema_keeps_the_candidate_of_best_fitness(fake_run, monkeypatch, caplog):
    # val.run stood in for by a fitness that peaks at sigma_rel 0.07 (known from the weights themselves)
    snapshots = fake_run["snapshots"]
    peak = synthesize(snapshots, ProfileFit(snapshots).fit(0.07).coeffs)

    def fake_evaluate(model, opt, device):
        distance = sum((v.float() - peak[k]).norm().item() for k, v in model.state_dict().items()
                       if v.is_floating_point())
        return 0.5, 0.3, 1.0 / (1.0 + distance)

    monkeypatch.setattr(posthoc_ema, "evaluate", fake_evaluate)
    caplog.set_level(logging.INFO, logger="yolo")
    assert posthoc_ema.main(["--run", str(fake_run["run"]), "--sigma-rel", "0.03", "0.07", "0.15"]) == 0
    best = torch.load(fake_run["run"] / "weights" / "posthoc_best.pt", weights_only=True)
    assert all(torch.equal(best["ema"][k], v) for k, v in half_state_dict(peak).items())
    assert "Saved sigma_rel 0.07 " in caplog.text
    assert "Best overall: post-hoc sigma_rel 0.07 (fitness " in caplog.text


def test_posthoc_ema_saves_no_width_that_the_runs_own_ema_beats(fake_run, tmp_path, monkeypatch, caplog):
    """val.run stood in for by a fitness that peaks at the run's main EMA (last.pt's): it wins overall, that is said,
    and the best post-hoc width is saved under its own name, not as posthoc_best.pt; one from an earlier sweep is left
    as it was, and said so."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fake_run["run"], run)
    for old in (run / "weights").glob("posthoc_*.pt"):
        old.unlink()
    main_ema = load_checkpoint(run / "weights" / "last.pt")["ema"]

    def fake_evaluate(model, opt, device):
        distance = sum((v.float() - main_ema[k].float()).norm().item() for k, v in model.state_dict().items()
                       if v.is_floating_point())
        return 0.5, 0.3, 1.0 / (1.0 + distance)

    monkeypatch.setattr(posthoc_ema, "evaluate", fake_evaluate)
    caplog.set_level(logging.INFO, logger="yolo")
    argv = ["--run", str(run), "--sigma-rel", "0.03", "0.15", "--num", "2"]
    assert posthoc_ema.main(argv) == 0
    assert not (run / "weights" / "posthoc_best.pt").exists()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Best overall: "))
    assert line.startswith("Best overall: EMA last (fitness 1), in weights/last.pt; no post-hoc width beats it, so "
                           "none is saved as posthoc_best.pt (the best width, sigma_rel ")
    rows = [r.split(",") for r in (run / "posthoc_ema.csv").read_text().splitlines()[1:] if r.startswith("posthoc")]
    top = max(rows, key=lambda r: float(r[-1]))
    named = run / "weights" / f"posthoc_sigma{float(top[1]):.4g}.pt"  # the best width, under its own name
    assert f"Saved sigma_rel {float(top[1]):.4g} " in caplog.text and named.is_file()
    assert sorted(f.name for f in (run / "weights").glob("posthoc_*.pt")) == [named.name]

    save_checkpoint(load_checkpoint(run / "weights" / "best.pt"), run / "weights" / "posthoc_best.pt")
    caplog.clear()
    assert posthoc_ema.main(argv) == 0
    assert "of an earlier sweep is left as it was" in caplog.text


def test_posthoc_ema_single_width_synthesizes_and_saves_it(fake_run, caplog):
    caplog.set_level(logging.INFO, logger="yolo")
    out = fake_run["run"] / "weights" / "posthoc_sigma0.12.pt"  # its own name: not a sweep's best
    best_before = (fake_run["run"] / "weights" / "posthoc_best.pt")
    before = best_before.read_bytes() if best_before.exists() else None
    assert posthoc_ema.main(["--run", str(fake_run["run"]), "--sigma-rel", "0.12"]) == 0
    assert (best_before.read_bytes() if best_before.exists() else None) == before  # untouched
    best = torch.load(out, weights_only=True)
    fit = ProfileFit(fake_run["snapshots"]).fit(0.12)
    want = half_state_dict(synthesize(fake_run["snapshots"], fit.coeffs))
    assert set(best) == set(FINISHED_KEYS) and all(torch.equal(best["ema"][k], v) for k, v in want.items())
    assert "Post-hoc EMA sweep" not in caplog.text  # nothing validated


def test_posthoc_ema_bad_input_is_one_line(fake_run, tmp_path, caplog):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(fake_run["run"], bare)
    shutil.rmtree(bare / "weights" / "posthoc")
    other = tmp_path / "other"
    shutil.copytree(fake_run["run"], other)
    wider = Model(micro_detector_yaml(tmp_path, width=12), ch=3, nc=2, verbose=False)  # a wider first layer
    save_checkpoint({"format": "yolo-ema-posthoc", "version": 1, "sigma_rel": 0.05, "gamma": power_gamma(0.05),
                     "step": 48, "position": 48.0, "unit": "steps", "nbs": 64.0, "images": 3072.0,
                     "ema": wider.state_dict()}, other / "weights" / "posthoc" / "sr0.05_step00000048.pt")
    cases = [(["--run", str(bare)], "no post-hoc EMA snapshots"),
             (["--run", str(other)], "snapshot of another architecture than the run's model"),
             (["--run", str(fake_run["run"]), "--sigma-rel", "0.002"], "sigma_rel 0.002 is outside what the "
                                                                    "stored EMAs"),
             (["--run", str(fake_run["run"]), "--sigma-rel", "0.001", "0.004"], "no width to validate: sigma_rel "
                                                                            "0.001, "),
             (["--run", str(fake_run["run"]), "--sigma-rel", "0.5"], "no power-function EMA has that relative width"),
             (["--run", str(tmp_path / "nowhere")], "not found")]
    for argv, message in cases:
        caplog.clear()
        assert posthoc_ema.main(argv) == 1, argv
        errors = error_lines(caplog)
        assert len(errors) == 1 and "\n" not in errors[0] and message in errors[0], (argv, errors)
        assert errors[0].startswith("posthoc_ema: ")


def test_check_architecture_names_the_tensor(fake_run):
    reference = fake_run["model"].state_dict()
    reference.pop("model.0.conv.weight")
    with pytest.raises(PosthocError, match="it has 'model.0.conv.weight'"):
        check_architecture(fake_run["snapshots"][:1], reference, "the reference")


# ------------------------------------------------------------------------------------------------ review fixes
def test_resume_removes_snapshots_written_after_the_checkpoint(tmp_path, caplog):
    # Killed at step 17 with last.pt at 13: step 15's files are on disk but the resumed run (plan extended from
    # 30 to 60 steps, so its snapshots fall at 10, 20, ...) never rewrites them; left there they would enter the fit.
    folder = tmp_path / "posthoc"
    model, gen = Vec(5), torch.Generator().manual_seed(8)
    first = PosthocEMA(model, [0.05, 0.1], 30, folder, snapshots=6)
    run_bank(model, first, 13, gen)
    state = copy.deepcopy(first.state_dict())
    run_bank(model, first, 4, gen)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"sr{s}_step{t:08d}.pt" for s in ("0.05", "0.1") for t in (5, 10, 15))

    caplog.set_level(logging.INFO, logger="yolo")
    resumed = PosthocEMA(Vec(5), [0.05, 0.1], 60, folder, snapshots=6)
    resumed.load_state_dict(state)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"sr{s}_step{t:08d}.pt" for s in ("0.05", "0.1") for t in (5, 10))
    removed = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert len(removed) == 1 and "removed 2 snapshot files" in removed[0] and "\n" not in removed[0]
    run_bank(model, resumed, 47, gen)
    assert sorted({s.step for s in find_snapshots(folder)}) == [5, 10, 20, 30, 40, 50, 60]


def test_widths_that_share_a_file_name_are_refused():
    assert f"{0.1000001:g}" == "0.1"  # what the snapshot names hold
    same = r"twice: 0\.1 and 0\.1000001 would write the same snapshot files \(sr0\.1_step"
    with pytest.raises(ValueError, match=same) as e:
        settings_from_hyp({"posthoc_sigma_rels": [0.1, 0.1000001]})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="post-hoc EMA sigma_rels lists a width twice"):
        PosthocEMA(Vec(2), [0.05, 0.1, 0.1000001], 10, "unused")
    assert settings_from_hyp({"posthoc_sigma_rels": [0.1, 0.10001]}) == ([0.1, 0.10001], 32)  # sr0.1, sr0.10001


def write_snapshot(path, gamma, step=4):
    save_checkpoint({"format": "yolo-ema-posthoc", "version": 1, "sigma_rel": 0.3, "gamma": gamma, "step": step,
                     "position": float(step), "unit": "steps", "nbs": 64.0, "images": 64.0 * step,
                     "ema": {"v": torch.zeros(3)}}, path)


@pytest.mark.parametrize("gamma", [-0.39, -0.5, -0.6])
def test_snapshot_with_a_gamma_no_power_ema_has_is_refused(tmp_path, gamma):
    # The Gram entries hold 1 / (g_i + g_j + 1): at g = -0.5 it is infinite, below it negative. No power EMA is
    # wider than at g = (sqrt(5) - 1) / 2 - 1 = -0.381966, so anything below that is not a real snapshot.
    write_snapshot(tmp_path / "sr0.1_step00000004.pt", power_gamma(0.1))
    write_snapshot(tmp_path / "sr0.3_step00000004.pt", gamma)
    with pytest.raises(PosthocError, match=r"sr0\.3_step00000004\.pt has gamma .*-0\.382") as e:
        find_snapshots(tmp_path)
    assert "\n" not in str(e.value)


def test_snapshot_of_the_widest_power_ema_is_accepted(tmp_path):
    widest = (math.sqrt(5) - 1) / 2 - 1
    write_snapshot(tmp_path / "sr0.3003_step00000004.pt", power_gamma(SIGMA_REL_MAX))
    write_snapshot(tmp_path / "sr0.3_step00000008.pt", widest, step=8)
    found = find_snapshots(tmp_path)
    assert len(found) == 2 and all(np.isfinite(ProfileFit(found)._gram).ravel())


def test_single_width_stores_no_unmeasured_fitness(fake_run):
    assert posthoc_ema.main(["--run", str(fake_run["run"]), "--sigma-rel", "0.09"]) == 0
    best = torch.load(fake_run["run"] / "weights" / "posthoc_sigma0.09.pt", weights_only=True)
    assert math.isnan(best["best_fitness"])  # never validated: no number pretends it was


def exp_hyp(**extra):
    return {"nbs": 16, "warmup_epochs": 0.0, "ema_decay": 0.9999, "ema_schedule": "exp", "ema_beta": 15.0, **extra}


def run_ckpt(hyp, epochs, batch_size, done, updates, **extra):
    return {"hyp": hyp, "opt": {"epochs": epochs, "batch_size": batch_size}, "epoch": done - 1, "updates": updates,
            **extra}


def test_main_ema_decay_of_an_early_stopped_exp_run_in_optimizer_steps():
    # 500 optimizer steps planned (train.py records them in train_state), stopped early after 150: the 'exp'
    # schedule's decay there was 0.9999 (1 - exp(-15 * 150 / 500)); best.pt, at step 100, is read at its own step
    # in the same run (it records no length: last.pt's is used).
    last = run_ckpt(exp_hyp(), epochs=10, batch_size=16, done=3, updates=150, train_state={"ema_total_steps": 500})
    best = run_ckpt(exp_hyp(), epochs=10, batch_size=16, done=2, updates=100)
    total = posthoc_ema.ema_run_length(best, last)
    assert total == 500
    assert posthoc_ema.main_ema_decay(last, Vec(2), [], total) == pytest.approx(0.9999 * (1 - math.exp(-4.5)), rel=1e-12)
    assert posthoc_ema.main_ema_decay(best, Vec(2), [], total) == pytest.approx(0.9999 * (1 - math.exp(-3.0)), rel=1e-12)
    # An unfinished last.pt holds the EMA's own setting in its resume state; files that record neither: nan
    assert posthoc_ema.ema_run_length(run_ckpt(exp_hyp(), 10, 16, 3, 150, resume={"ema": {"total_steps": 320}})) == 320
    assert posthoc_ema.ema_run_length(best, None) is None
    assert math.isnan(posthoc_ema.main_ema_decay(best, Vec(2), [], None))


def test_main_ema_decay_in_nominal_batches():
    # ema_unit images, nbs 16: a run planned as 1000 nominal batches. last.pt after 4800 images: position 300.
    hyp = exp_hyp(ema_unit="images")
    last = run_ckpt(hyp, epochs=10, batch_size=32, done=3, updates=150,
                    train_state={"ema_images": 4800.0, "ema_total_steps": 1000})
    total = posthoc_ema.ema_run_length(last)
    assert posthoc_ema.main_ema_decay(last, Vec(2), [], total) == pytest.approx(0.9999 * (1 - math.exp(-4.5)), rel=1e-12)
    # best.pt (a finished checkpoint: no image count) at step 100: its position comes from the snapshots'
    # (step, position) pairs, 200 here.
    snaps = [Snapshot(None, 0.1, power_gamma(0.1), s, 2.0 * s, "images") for s in (50, 150)]
    best = run_ckpt(hyp, epochs=10, batch_size=32, done=2, updates=100)
    assert posthoc_ema.main_ema_decay(best, Vec(2), snaps, total) == pytest.approx(0.9999 * (1 - math.exp(-3.0)),
                                                                                   rel=1e-12)
    assert math.isnan(posthoc_ema.main_ema_decay(best, Vec(2), [], total))  # nowhere to tell its position from


def test_sweep_reports_each_checkpoints_exp_decay_at_its_own_step(fake_run, tmp_path, monkeypatch):
    # The run rewritten as an exp-schedule run stopped early: 48 of the 80 planned steps (last.pt records the
    # plan); best.pt from epoch 3, step 24.
    import shutil

    run = tmp_path / "exp"
    shutil.copytree(fake_run["run"], run)
    last = load_checkpoint(run / "weights" / "last.pt")
    hyp = {**last["hyp"], **exp_hyp(nbs=4)}
    train_state = {**last.get("train_state", {}), "ema_total_steps": 80}
    save_checkpoint({**last, "hyp": hyp, "epoch": 5, "train_state": train_state}, run / "weights" / "last.pt")
    save_checkpoint({k: v for k, v in {**last, "hyp": hyp, "epoch": 2, "updates": 24}.items() if k in FINISHED_KEYS},
                    run / "weights" / "best.pt")
    monkeypatch.setattr(posthoc_ema, "evaluate", lambda model, opt, device: (0.5, 0.3, 0.4))
    assert posthoc_ema.main(["--run", str(run), "--sigma-rel", "0.05", "0.1", "--num", "2"]) == 0
    rows = {r.split(",")[0]: r.split(",") for r in (run / "posthoc_ema.csv").read_text().splitlines()[1:]}
    assert float(rows["EMA last"][2]) == pytest.approx(0.9999 * (1 - math.exp(-15 * 48 / 80)), rel=1e-9)
    assert float(rows["EMA best"][2]) == pytest.approx(0.9999 * (1 - math.exp(-15 * 24 / 80)), rel=1e-9)


# ------------------------------------------------------------------------------------------------ the sweep's reach
def constant_evaluate(model, opt, device):
    return 0.5, 0.25, 0.275  # every candidate ties


def test_unreachable_widths_are_skipped_with_one_warning_naming_the_reachable_range(fake_run, monkeypatch, caplog):
    monkeypatch.setattr(posthoc_ema, "evaluate", constant_evaluate)
    caplog.set_level(logging.INFO, logger="yolo")
    run = fake_run["run"]
    assert posthoc_ema.main(["--run", str(run), "--sigma-rel", "0.002", "0.1", "--num", "5"]) == 0
    low, high = ProfileFit(fake_run["snapshots"]).reachable()
    widths = np.geomspace(0.002, 0.1, 5)
    fitter = ProfileFit(fake_run["snapshots"])
    out_of_reach = [w for w in widths if fitter.fit(w, max_error=None).error > MAX_FIT_ERROR]
    assert out_of_reach == list(widths[:3])  # the fake run's 16 snapshots of 0.05/0.1 reach down to about 0.022
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    named = ", ".join(f"{w:.4g}" for w in out_of_reach)
    assert len(warnings) == 1 and warnings[0].startswith(f"Skipping 3 of 5 widths, sigma_rel {named}: beyond")
    assert f"they reach about {low:.3g}-{high:.3g}" in warnings[0]
    rows = (run / "posthoc_ema.csv").read_text().splitlines()[1:]
    sigmas = [float(r.split(",")[1]) for r in rows if r.startswith("posthoc")]
    np.testing.assert_allclose(sigmas, widths[3:], rtol=1e-9)
    # one labelled line per candidate (the two widths in reach, the main EMA, the raw model); the data scanned once
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("post-hoc sigma_rel", "EMA ", "raw "))]
    assert len(lines) == 4 and all("mAP50-95 0.25" in line for line in lines)
    assert caplog.text.count("Scanning") == 1 and "summary:" not in caplog.text


def test_sweep_defaults_to_the_reachable_range_and_ties_go_to_the_closer_fit(fake_run, monkeypatch):
    monkeypatch.setattr(posthoc_ema, "evaluate", constant_evaluate)
    run = fake_run["run"]
    assert posthoc_ema.main(["--run", str(run), "--num", "4"]) == 0
    fitter = ProfileFit(fake_run["snapshots"])
    rows = [r.split(",") for r in (run / "posthoc_ema.csv").read_text().splitlines()[1:] if r.startswith("posthoc")]
    np.testing.assert_allclose([float(r[1]) for r in rows], np.geomspace(*fitter.reachable(), 4), rtol=1e-9)
    errors = [float(r[3]) for r in rows]
    closest = float(rows[int(np.argmin(errors))][1])
    assert errors.index(min(errors)) not in (0, len(errors) - 1)  # the ends of the range fit worst: not the first
    best = torch.load(run / "weights" / "posthoc_best.pt", weights_only=True)
    want = half_state_dict(synthesize(fake_run["snapshots"], fitter.fit(closest).coeffs))
    assert all(torch.equal(best["ema"][k], v) for k, v in want.items())


def test_bn_recal_recomputes_the_statistics_of_every_averaged_candidate(fake_run, monkeypatch):
    from utils.bn_recompute import FixedBatches, recompute_bn_stats

    seen = []

    def recording_evaluate(model, opt, device):
        seen.append({k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k})
        return 0.5, 0.25, 0.275

    monkeypatch.setattr(posthoc_ema, "evaluate", recording_evaluate)
    run = fake_run["run"]
    assert posthoc_ema.main(["--run", str(run), "--sigma-rel", "0.05", "0.1", "--num", "2", "--bn-recal", "1",
                             "--batch-size", "4", "--workers", "0"]) == 0
    assert len(seen) == 4  # two widths, the main EMA (best.pt has last.pt's epoch), the raw model
    last = load_checkpoint(run / "weights" / "last.pt")
    assert all(torch.equal(v, last["model"][k].float()) for k, v in seen[3].items())  # the raw model keeps its own
    snapshots, fitter = fake_run["snapshots"], ProfileFit(fake_run["snapshots"])
    # The statistics are those of training batches augmented with the run's own hyp, as its training saw them.
    batches = FixedBatches.from_data(fake_run["data"].parent / "images" / "train", 64, 4, 32, count=1,
                                     hyp=last["hyp"])
    plain = FixedBatches.from_data(fake_run["data"].parent / "images" / "train", 64, 4, 32, count=1, hyp=None)
    for width, recorded in zip((0.05, 0.1), seen):
        model = posthoc_ema.model_from_checkpoint({**load_checkpoint(run / "weights" / "last.pt"),
                                                   "ema": synthesize(snapshots, fitter.fit(width).coeffs)})
        before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
        recompute_bn_stats(model, batches)
        for k, v in recorded.items():
            torch.testing.assert_close(v, model.state_dict()[k])
            assert not torch.allclose(v, before[k])
        recompute_bn_stats(model, plain)  # letterboxed, unaugmented images give other statistics
        assert not all(torch.allclose(v, model.state_dict()[k]) for k, v in recorded.items())
    errors = [float(r.split(",")[3]) for r in (run / "posthoc_ema.csv").read_text().splitlines()[1:3]]
    best = torch.load(run / "weights" / "posthoc_best.pt", weights_only=True)  # the one saved has them too
    assert all(torch.equal(best["ema"][k], v.half()) for k, v in seen[int(np.argmin(errors))].items())


def test_start_of_run_line_counts_the_snapshots_really_written(tmp_path):
    """A 16-step run asked for 32 snapshots writes one per step: 16, one every optimizer step."""
    model, gen = make_net(), torch.Generator().manual_seed(4)
    bank = PosthocEMA(model, [0.05, 0.1], 16, tmp_path, snapshots=32)
    line = bank.summary()
    assert "16 snapshots each (32 asked for, one per optimizer step at most), one every 1 optimizer steps of 16" in line
    for _ in range(16):
        perturb(model, gen)
        bank.update(model)
    bank.finish()
    assert len(list(tmp_path.glob("sr0.05_*.pt"))) == 16
    assert "32 snapshots each, one every 10 optimizer steps of 320" in PosthocEMA(make_net(), [0.1], 320, tmp_path / "b",
                                                                                   snapshots=32).summary()
