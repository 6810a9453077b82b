"""Companion EMAs (utils/ema_companions.py): each is the ModelEMA of its tau fed the same optimizer steps, bit for
bit; steps train.py skips are not counted; checkpoint entries and their restore; hyp checks. The checkpoints of a
real run and their bit-exact resume are in tests/test_resume.py."""
import math

import pytest
import torch
import torch.nn as nn

import train
from utils.checkpoint import unpacked_state_dict
from utils.ema import ModelEMA
from utils.ema_companions import CompanionEMAs, companion_checkpoint, companion_taus

ROOT = train.ROOT


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1))


def sgd_steps(net, n, seed=1):
    """n SGD steps on random data, yielding after each (BatchNorm statistics move too)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        net(torch.randn(4, 3, 8, 8, generator=g)).square().mean().backward()
        opt.step()
        yield


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("unit", ["steps", "images"])
def test_each_companion_is_the_model_ema_of_its_tau_bit_for_bit(unit):
    net = small_net()
    hyp = {"ema_decay": 0.999, "ema_tau": 2000, "ema_unit": unit, "nbs": 8, "ema_update_every": 2,
           "ema_companion_taus": [3, 50]}
    main = ModelEMA.from_hyp(net, hyp)
    companions = CompanionEMAs.from_hyp(net, hyp)
    alone = {t: ModelEMA(net, decay=0.999, tau=t, unit=unit, nbs=8, update_every=2) for t in (3, 50)}
    for _ in sgd_steps(net, 9):
        for ema in (main, *alone.values()):
            ema.update(net, images=4)
        companions.update(net, images=4)
    assert companions.names == ["tau3", "tau50"]
    for t, name in ((3, "tau3"), (50, "tau50")):
        c = companions.emas[name]
        assert (c.updates, c.images, c.tau, c.schedule) == (9, alone[t].images, t, "ramp")
        assert state_equal(c.ema, alone[t].ema), name
    # The taus make a difference: tau 3 is far along its ramp after 9 steps, tau 50 barely started.
    w = "0.weight"
    assert not torch.equal(companions.emas["tau3"].ema.state_dict()[w], companions.emas["tau50"].ema.state_dict()[w])
    assert not torch.equal(companions.emas["tau3"].ema.state_dict()[w], main.ema.state_dict()[w])


def test_a_step_train_py_skips_is_not_counted_by_the_companions():
    """TrainStep with an overflow at iterations 1 and 3 (the GradScaler test hook): the main EMA and the
    companions are updated after the 3 steps taken of 5, and each companion equals a ModelEMA fed those 3."""
    net = small_net()
    hyp = {"ema_decay": 0.9999, "ema_tau": 2000, "ema_companion_taus": [2]}
    main, companions = ModelEMA.from_hyp(net, hyp), CompanionEMAs.from_hyp(net, hyp)
    alone = ModelEMA(net, tau=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = train.TrainStep(net, lambda pred, t: (pred.square().mean(), pred.detach().mean().reshape(1)), opt, scaler,
                           main, None, overflow_at=(1, 3), companions=companions)
    g = torch.Generator().manual_seed(0)
    for ni in range(5):
        net.train()
        step(torch.randn(2, 3, 8, 8, generator=g), torch.zeros(0, 6), ni, accumulate=1)
        if ni not in (1, 3):
            alone.update(net)
    assert step.skipped == [1, 3]
    assert main.updates == companions.emas["tau2"].updates == alone.updates == 3
    assert state_equal(companions.emas["tau2"].ema, alone.ema)


def test_checkpoint_entries_are_fp16_for_use_and_fp32_for_resume_and_restore_both_ways():
    net = small_net()
    hyp = {"ema_companion_taus": [4, 40]}
    companions = CompanionEMAs.from_hyp(net, hyp)
    for _ in sgd_steps(net, 5):
        companions.update(net)
    weights, state = companions.checkpoint_weights(), companions.state_dict()
    assert sorted(weights) == sorted(state) == ["tau4", "tau40"]
    for name in weights:
        own = companions.emas[name].ema.state_dict()
        assert all(v.dtype == (torch.float16 if own[k].is_floating_point() else own[k].dtype)
                   for k, v in weights[name].items())
        assert all(torch.equal(v, own[k].half()) for k, v in weights[name].items() if v.is_floating_point())
        packed = unpacked_state_dict(state[name]["ema"])
        assert all(torch.equal(packed[k], v) and packed[k].dtype == v.dtype for k, v in own.items())
        assert state[name]["updates"] == 5 and state[name]["tau"] == float(name[3:])

    # An unfinished run's resume state: FP32, bit-exact, and the continued averages stay equal.
    resumed = CompanionEMAs.from_hyp(small_net(seed=7), hyp, total_steps=99)
    resumed.restore({"resume": {"ema_companions": state}, "updates": 5})
    for name in companions.names:
        assert state_equal(resumed.emas[name].ema, companions.emas[name].ema)
        assert resumed.emas[name].updates == 5 and resumed.emas[name].total_steps == 99  # this run's plan
    # A finished run (no resume state), extended: its FP16 weights at the checkpoint's step count.
    extended = CompanionEMAs.from_hyp(small_net(seed=7), hyp)
    extended.restore({"ema_companions": weights, "updates": 5, "train_state": {"ema_images": 320.0}})
    assert extended.emas["tau4"].updates == 5 and extended.emas["tau4"].images == 320.0
    assert torch.equal(extended.emas["tau4"].ema.state_dict()["0.weight"], weights["tau4"]["0.weight"].float())

    # What the bench loads: the checkpoint with the companion's weights as its EMA; an old checkpoint has none.
    assert companion_checkpoint({"ema": {}, "ema_companions": weights}, "tau40")["ema"] is weights["tau40"]
    with pytest.raises(KeyError, match="holds no companion EMA 'tau200' \\(it holds none\\)"):
        companion_checkpoint({"ema": {}}, "tau200")
    # A resume state of other companions, or none, is refused in one line.
    with pytest.raises(ValueError, match=r"holds companion EMAs \['tau4'\], this run's hyp asks for \['tau4', "):
        extended.restore({"resume": {"ema_companions": {"tau4": state["tau4"]}}, "updates": 5})
    with pytest.raises(ValueError, match=r"the checkpoint holds companion EMAs none"):
        extended.restore({"updates": 5})


def test_hyp_companion_taus_off_by_default_and_bad_values_are_one_line_errors(tmp_path):
    hyp = train.load_hyp(ROOT / "hyp" / "hyp.scratch-low.yaml")
    assert hyp["ema_companion_taus"] == [] and CompanionEMAs.from_hyp(small_net(), hyp) is None
    assert companion_taus({}) == [] and companion_taus({"ema_companion_taus": [200, 2.5e3]}) == [200.0, 2500.0]
    for bad, message in (("200", "must be a list of EMA time constants"), ([0], "every tau must be a positive"),
                         ([math.inf], "every tau must be a positive"), ([True], "every tau must be a positive"),
                         ([200, 200.0], "lists a tau twice")):
        with pytest.raises(train.TrainError, match=f"hyp dict: hyp ema_companion_taus.*{message}"):
            train.load_hyp({**hyp, "ema_companion_taus": bad})
    # The main EMA's hyp check knows the key (an unknown ema_* key is refused there).
    assert train.make_ema(small_net(), {**hyp, "ema_companion_taus": [200]}).tau == 2000
