"""Optimizer groups, schedules, warm-up, RNG snapshots and early stopping, against hand-computed values."""
import io
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.train_helpers import walked_optimizer_steps
from utils.early_stopping import EarlyStopping
from utils.optim import (BIAS_GROUP, DECAY_GROUP, NORM_GROUP, apply_warmup, build_optimizer, build_scheduler,
                         lr_factor, nominal_accumulate, planned_optimizer_steps, scaled_weight_decay,
                         split_parameters, warmup_accumulate, warmup_iterations)
from utils.rng import capture_rng_state, restore_rng_state


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.GroupNorm(1, 2))


def test_split_parameters_puts_each_parameter_in_the_right_group():
    net = tiny_net()
    net[0].weight.requires_grad_(False)  # frozen parameters are not optimised
    biases, decayed, norm_weights = split_parameters(net)
    ids = lambda ps: {id(p) for p in ps}
    assert ids(biases) == ids([net[1].bias, net[2].bias, net[3].bias])
    assert ids(decayed) == ids([net[2].weight])
    assert ids(norm_weights) == ids([net[1].weight, net[3].weight])


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_build_optimizer_groups_and_decay(name):
    net = tiny_net()
    opt = build_optimizer(net, name, lr=0.01, momentum=0.9, weight_decay=0.002)
    decays = [g["weight_decay"] for g in opt.param_groups]
    assert decays[BIAS_GROUP] == 0 and decays[DECAY_GROUP] == 0.002 and decays[NORM_GROUP] == 0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))
    if name == "SGD":
        assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
    else:
        assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match="RMSprop"):
        build_optimizer(net, "RMSprop")


def test_weight_decay_scaled_by_nominal_batch():
    # batch 16 accumulating 4 steps = 64 images = nbs: unchanged; batch 32 with accumulate 1 is half of nbs.
    assert scaled_weight_decay(5e-4, 16, 4, 64) == pytest.approx(5e-4)
    assert scaled_weight_decay(5e-4, 32, 1, 64) == pytest.approx(2.5e-4)
    assert scaled_weight_decay(5e-4, 16, 1, 16) == pytest.approx(5e-4)
    assert nominal_accumulate(64, 16) == 4 and nominal_accumulate(64, 128) == 1 and nominal_accumulate(64, 24) == 3


def test_lr_schedules_closed_form():
    lin = lr_factor(10, 0.01, cos=False)
    assert lin(0) == 1 and lin(10) == pytest.approx(0.01) and lin(5) == pytest.approx(0.505)
    cos = lr_factor(10, 0.01, cos=True)
    assert cos(0) == pytest.approx(1) and cos(10) == pytest.approx(0.01) and cos(5) == pytest.approx(0.505)
    assert cos(2) == pytest.approx(1 + (0.01 - 1) * (1 - math.cos(0.2 * math.pi)) / 2)
    opt = build_optimizer(tiny_net(), "SGD", lr=0.1)
    sched, lf = build_scheduler(opt, 10, 0.01)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * (1 - 0.99 * 2 / 10))  # epoch 3 at lf(2), see below


@pytest.mark.parametrize("cos", [False, True])
def test_epoch_e_trains_at_lf_of_e_minus_1_as_in_yolov5(cos):
    """YOLOv5's train.py builds LambdaLR(optimizer, lf), then sets scheduler.last_epoch = start_epoch - 1 (-1 for a
    fresh run) and steps it at every epoch end; epoch e >= 1 then trains at lr0 * lf(e - 1). The same rule, run
    here on a second optimizer, against ours, epoch by epoch."""
    epochs, lrf, lr0 = 12, 0.01, 0.1
    ours = build_optimizer(tiny_net(), "SGD", lr=lr0)
    sched, lf = build_scheduler(ours, epochs, lrf, cos=cos)
    theirs = torch.optim.SGD(tiny_net().parameters(), lr=lr0)
    yolov5 = torch.optim.lr_scheduler.LambdaLR(theirs, lr_lambda=lf)
    yolov5.last_epoch = 0 - 1  # start_epoch - 1
    for epoch in range(1, epochs):
        for o in (ours, theirs):
            o.step()
        sched.step()
        yolov5.step()
        assert [g["lr"] for g in ours.param_groups] == pytest.approx([theirs.param_groups[0]["lr"]] * 3)
        assert theirs.param_groups[0]["lr"] == pytest.approx(lr0 * lr_factor(epochs, lrf, cos)(epoch - 1))


def test_warmup_lr_momentum_and_accumulation():
    hyp = {"warmup_bias_lr": 0.1, "warmup_momentum": 0.8, "momentum": 0.937}
    opt = build_optimizer(tiny_net(), "SGD", lr=0.01, momentum=0.937)
    build_scheduler(opt, 10, 0.01)  # sets initial_lr
    nw = warmup_iterations(3, 10)
    assert nw == 100 and warmup_iterations(3.0, 200) == 600
    apply_warmup(opt, 0, nw, 1.0, hyp)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.0, 0.0]
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.8)
    apply_warmup(opt, 25, nw, 0.9, hyp)  # a quarter of the way, toward the epoch lr 0.01*0.9
    assert opt.param_groups[BIAS_GROUP]["lr"] == pytest.approx(0.1 + 0.25 * (0.009 - 0.1))
    assert opt.param_groups[DECAY_GROUP]["lr"] == pytest.approx(0.25 * 0.009)
    assert opt.param_groups[NORM_GROUP]["momentum"] == pytest.approx(0.8 + 0.25 * 0.137)
    # accumulation ramps 1 -> 64/16 = 4 over warm-up
    assert [warmup_accumulate(ni, 100, 64, 16) for ni in (0, 16, 17, 50, 84, 100, 150)] == [1, 1, 2, 2, 4, 4, 4]


def test_rng_state_round_trip_with_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # leave a cached Gaussian in both
    state = capture_rng_state()
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(), torch.rand(4))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(loaded)
    again = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(), torch.rand(4))
    assert expected[0] == again[0] and expected[1] == again[1]
    assert np.array_equal(expected[2], again[2]) and expected[3] == again[3]
    assert torch.equal(expected[4], again[4])


def test_early_stopping_counts_patience_and_round_trips():
    stopper = EarlyStopping(patience=3)
    fits = [0.1, 0.2, 0.15, 0.19, 0.2, 0.18, 0.17]  # best 0.2 at epoch 4 (>= keeps the later tie)
    stops = [stopper(e, f) for e, f in enumerate(fits)]
    assert stops == [False] * 6 + [False] and stopper.best_epoch == 4
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(stopper.state_dict())
    assert resumed(7, 0.1) is True  # 3 epochs since epoch 4
    assert not any(EarlyStopping(patience=0)(e, 0.0 if e else 1.0) for e in range(50))


def test_planned_optimizer_steps_matches_hand_count_and_a_full_walk():
    # 3 batches/epoch of 4 images, nbs 64, 100 warm-up iterations: accumulate 1 for ni 0-3, then 2 up to ni 8
    # (steps at 0, 1, 2, 3, 5, 7) -> 5 steps in 2 epochs, 6 in 3.
    assert planned_optimizer_steps(3, 2, 100, 64, 4) == 5 and planned_optimizer_steps(3, 3, 100, 64, 4) == 6

    for case in [(50, 10, 150, 64, 16), (8, 30, 100, 64, 16), (7, 40, 100, 64, 5), (20, 3, 100, 64, 64),
                 (13, 11, 100, 64, 3), (1, 500, 100, 64, 16)]:
        assert planned_optimizer_steps(*case) == walked_optimizer_steps(*case), case
