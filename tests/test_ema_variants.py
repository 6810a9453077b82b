"""The averaging variants around the main EMA, against closed forms on scalar sequences and independently
computed statistics: Switch EMA (Li et al. 2024), BEMA (Block and Zhang 2025), BatchNorm statistics recomputed
for averaged weights, and train.py --posthoc."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.bema import BEMA, ema_from_hyp
from utils.bn_recompute import FixedBatches, bn_recompute_batches, recompute_bn_stats
from utils.ema import ModelEMA
from utils.posthoc import DEFAULT_SIGMA_RELS, settings_from_hyp, with_posthoc_on
from utils.switch_ema import switch_ema_enabled, switch_to_average


class Scalar(nn.Module):
    """A one-parameter model: its weight is the sequence under test."""

    def __init__(self, w=0.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([float(w)]))


# ------------------------------------------------------------------------------------------------ Switch EMA
def test_switch_ema_follows_its_closed_form_on_a_linear_trajectory():
    """Training adds g to the weight every step; a constant-decay EMA; the EMA copied into the model after every
    k steps. Within an epoch that starts at e (model = EMA = e), step j puts the model at e + j g and the EMA at
    e + g sum_{i<=j} (1 - d) d^(j - i) i, so after k steps both sit at e + g S with
    S = k - d (1 - d^k) / (1 - d): after E epochs, w0 + E g S."""
    d, g, k, epochs, w0 = 0.8, 0.5, 7, 4, 1.25
    model = Scalar(w0)
    ema = ModelEMA(model, decay=d, schedule="constant")
    for _ in range(epochs):
        for _ in range(k):
            with torch.no_grad():
                model.w.add_(g)
            ema.update(model)
        switch_to_average(model, ema)
        assert model.w.item() == ema.ema.w.item()
    s = k - d * (1 - d ** k) / (1 - d)
    assert model.w.item() == pytest.approx(w0 + epochs * g * s, rel=1e-6)
    # Without the switch the model would be at w0 + epochs * k * g: the switch is what held it back.
    assert model.w.item() < w0 + epochs * k * g - 1.0


def test_switch_ema_copies_buffers_casts_to_the_model_dtype_and_keeps_the_flat_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = ModelEMA(model, decay=0.5, schedule="constant")
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(1.0)
        model[1].num_batches_tracked.fill_(5)
    ema.update(model)
    before = model[1].num_batches_tracked.item()
    switch_to_average(model, ema)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema.ema.state_dict()[k]), k
    assert model[1].num_batches_tracked.item() == before
    assert ema.path == "flat" and not ema.storage._model_changed(model)  # copied in place: still the flat views

    half = nn.Linear(3, 2).half()
    ema16 = ModelEMA(half, decay=0.5, schedule="constant")
    with torch.no_grad():
        half.weight.add_(1.0)
    ema16.update(half)
    switch_to_average(half, ema16)
    assert half.weight.dtype == torch.float16
    assert torch.equal(half.weight, ema16.ema.weight.half())


def test_switch_ema_under_ddp_gives_every_process_rank_0s_average(tmp_path):
    import torch.multiprocessing as mp

    from tests.switch_ema_worker import switch_in_a_process_group  # a small module: each process imports it

    mp.spawn(switch_in_a_process_group, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.all(second["0.weight"] == 7.0) and torch.all(second["1.running_var"] == 3.0)


def test_switch_ema_hyp_key_is_checked():
    assert switch_ema_enabled({}) is False and switch_ema_enabled({"ema_switch": True}) is True
    with pytest.raises(ValueError, match="ema_switch must be true or false, got 'yes'"):
        switch_ema_enabled({"ema_switch": "yes"})


# ------------------------------------------------------------------------------------------------ BEMA
def bema_reference(thetas, power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0, burn_in=0):
    """The paper's recursion in float64, written out: theta_0 is the weight where the burn-in ends (the
    initial one without burn-in); steps after it average with beta_t and correct with alpha_t."""
    out, anchor, ema = [], thetas[burn_in], thetas[burn_in]
    for step in range(1, len(thetas)):
        t = step - burn_in
        if t <= 0:
            anchor = ema = thetas[step]
            out.append(thetas[step])
            continue
        beta, alpha = (lag + multiplier * t) ** -power, (lag + multiplier * t) ** -bias_power
        ema = (1 - beta) * ema + beta * thetas[step]
        out.append(alpha * (thetas[step] - anchor) + ema)
    return out


def run_bema(thetas, **kwargs):
    model = Scalar(thetas[0])
    bema = BEMA(model, **kwargs)
    seen = []
    for theta in thetas[1:]:
        with torch.no_grad():
            model.w.fill_(theta)
        bema.update(model)
        seen.append(bema.ema.w.item())
    return bema, seen


def test_bema_first_step_by_hand():
    """theta 0 then 1, lag 10, multiplier 1: beta_1 = 11**-0.5, alpha_1 = 11**-0.2, so
    mu_1 = alpha_1 * (1 - 0) + beta_1 * 1 = 0.619044 + 0.301511 = 0.920555."""
    _, seen = run_bema([0.0, 1.0])
    assert seen[0] == pytest.approx(0.920555, abs=1e-6)


@pytest.mark.parametrize("flat", [True, False])
def test_bema_follows_the_papers_recursion_on_a_scalar_sequence(flat):
    thetas = [math.sin(0.3 * n) + 0.05 * n for n in range(40)]
    bema, seen = run_bema(thetas, power=0.6, bias_power=0.3, lag=4.0, multiplier=2.0, flat=flat)
    assert bema.path == ("flat" if flat else "foreach")
    assert seen == pytest.approx(bema_reference(thetas, 0.6, 0.3, 4.0, 2.0), rel=1e-5, abs=1e-6)
    assert bema.average.shadow.w.item() != pytest.approx(seen[-1])  # the output is not the plain EMA


def test_bema_burn_in_is_the_model_and_sets_theta_0_where_it_ends():
    thetas = [0.5 * n * n for n in range(12)]
    bema, seen = run_bema(thetas, update_after_step=3)
    assert seen[:3] == thetas[1:4]  # the model itself during the burn-in
    assert bema.anchor.shadow.w.item() == thetas[3]
    assert seen == pytest.approx(bema_reference(thetas, burn_in=3), rel=1e-6)


def test_bema_on_a_16_bit_model_and_with_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).half()
    bema = BEMA(model)
    start = {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(1.0)
        model[1].num_batches_tracked.fill_(3)
    moved = {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}  # rounded to fp16
    bema.update(model)
    beta, alpha = 11 ** -0.5, 11 ** -0.2
    buffers = {"1.running_mean", "1.running_var"}
    for k, v in bema.ema.state_dict().items():
        if k in start:
            assert v.dtype == torch.float32
            plain = (1 - beta) * start[k] + beta * moved[k]
            expected = plain if k in buffers else alpha * (moved[k] - start[k]) + plain  # buffers: no correction
            torch.testing.assert_close(v.double(), expected, rtol=0, atol=1e-6)
    assert bema.ema[1].num_batches_tracked.item() == 3


@pytest.mark.parametrize("flat", [True, False])
def test_bema_keeps_batchnorm_statistics_a_plain_ema_never_a_negative_variance(flat):
    """A running variance that falls from 1 to 0.01: the correction alpha_t * (0.01 - 1) pulls it down by more than
    half (0.089 instead of 0.70 at the first step), and over a run past zero (the digits bench saw negative
    variances in 55 of 57 layers). BEMA must hold the plain EMA of the statistics, (1 - beta_1) * 1 + beta_1 *
    0.01, while its weights are still corrected."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    bema = BEMA(model, flat=flat)
    with torch.no_grad():
        model[1].running_var.fill_(0.01)
        model[0].weight.add_(1.0)
    start_weight = bema.anchor.shadow[0].weight.clone()
    bema.update(model)
    beta, alpha = 11 ** -0.5, 11 ** -0.2
    torch.testing.assert_close(bema.ema[1].running_var, torch.full((2,), (1 - beta) * 1 + beta * 0.01))
    assert (bema.ema[1].running_var > 0).all()
    moved = model[0].weight.detach()
    torch.testing.assert_close(bema.ema[0].weight, alpha * (moved - start_weight) + (1 - beta) * start_weight + beta * moved)


def test_bema_state_round_trip_continues_bit_for_bit():
    thetas = [math.cos(0.2 * n) * n for n in range(30)]
    model = Scalar(thetas[0])
    bema = BEMA(model, update_after_step=2)
    for theta in thetas[1:15]:
        with torch.no_grad():
            model.w.fill_(theta)
        bema.update(model)
    state = bema.state_dict(weights=False) | {"ema": {k: v.clone() for k, v in bema.ema.state_dict().items()}}
    assert {"bema_average", "bema_anchor", "bema_power", "bema_bias_power", "bema_lag", "bema_multiplier"} <= set(state)
    twin_model = Scalar(123.0)
    twin = BEMA(twin_model, power=0.9)  # settings come from the state
    twin.load_state_dict(state)
    assert twin.bema_power == 0.5 and twin.updates == 14
    for theta in thetas[15:]:
        for m, e in ((model, bema), (twin_model, twin)):
            with torch.no_grad():
                m.w.fill_(theta)
            e.update(m)
        assert twin.ema.w.item() == bema.ema.w.item()


def test_bema_restarts_its_correction_from_a_state_without_its_copies():
    model = Scalar(2.0)
    bema = BEMA(model)
    bema.load_state_dict({"ema": {"w": torch.tensor([5.0])}, "updates": 7})
    assert bema.average.shadow.w.item() == 5.0 and bema.anchor.shadow.w.item() == 2.0 and bema.updates == 7
    with torch.no_grad():
        model.w.fill_(3.0)
    bema.update(model)
    beta, alpha = (10 + 8) ** -0.5, (10 + 8) ** -0.2
    assert bema.ema.w.item() == pytest.approx(alpha * (3.0 - 2.0) + (1 - beta) * 5.0 + beta * 3.0, rel=1e-6)


def test_bema_from_hyp_and_its_refusals():
    hyp = {"ema_bema": True, "ema_bema_power": 0.7, "ema_bema_lag": 2, "ema_update_after_step": 5, "ema_decay": 0.9999,
           "ema_tau": 2000, "ema_schedule": "ramp", "ema_switch": False, "nbs": 32, "ema_unit": "images"}
    bema = ema_from_hyp(Scalar(), hyp, total_steps=50)
    assert isinstance(bema, BEMA) and bema.schedule == "bema" and bema.unit == "images" and bema.nbs == 32
    assert (bema.bema_power, bema.bema_bias_power, bema.bema_lag, bema.bema_multiplier) == (0.7, 0.2, 2.0, 1.0)
    assert bema.update_after_step == 5 and bema.decay_at(3) == pytest.approx(1 - (2 + 3) ** -0.7)
    assert type(ema_from_hyp(Scalar(), {"ema_bema": False})) is ModelEMA
    with pytest.raises(ValueError, match="utils.bema.ema_from_hyp"):
        ModelEMA.from_hyp(Scalar(), {"ema_bema": True})
    with pytest.raises(ValueError, match="remove ema_schedule: power"):
        ema_from_hyp(Scalar(), {"ema_bema": True, "ema_schedule": "power", "ema_sigma_rel": 0.1})
    with pytest.raises(ValueError, match="ema_bema_lagg"):
        ema_from_hyp(Scalar(), {"ema_bema": True, "ema_bema_lagg": 3})
    with pytest.raises(ValueError, match="power > 0"):
        ema_from_hyp(Scalar(), {"ema_bema": True, "ema_bema_power": 0})
    with pytest.raises(ValueError, match="lag \\+ multiplier >= 1"):
        BEMA(Scalar(), lag=0.0, multiplier=0.5)
    with pytest.raises(ValueError, match="true or false"):
        ema_from_hyp(Scalar(), {"ema_bema": "yes"})


# ------------------------------------------------------------------------------------------------ BatchNorm
class TwoNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2, momentum=0.2)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


def channel_stats(x):
    """Mean and unbiased variance per channel over (N, H, W), in float64."""
    x = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return x.mean(1), x.var(1, unbiased=True)


def test_recomputed_statistics_equal_the_batch_statistics_computed_independently():
    torch.manual_seed(0)
    model = TwoNorms().eval()
    with torch.no_grad():  # statistics far from the truth, as an average of running statistics can be
        model.bn1.running_mean.fill_(5.0)
        model.bn2.running_var.fill_(9.0)
    batches = [torch.randint(0, 256, (3, 3, 9, 9), dtype=torch.uint8) for _ in range(2)]
    seen = recompute_bn_stats(model, batches, memory_format=torch.contiguous_format)
    assert seen == 6

    means, variances, means2, variances2 = [], [], [], []
    with torch.no_grad():
        for b in batches:
            h = F.conv2d(b.double() / 255, model.conv1.weight.double())
            m, v = channel_stats(h)
            means.append(m)
            variances.append(v)
            # bn1 in training mode normalises with the batch's own (biased) statistics
            biased = h.transpose(0, 1).reshape(4, -1).var(1, unbiased=False)
            z = (h - m.view(1, -1, 1, 1)) / torch.sqrt(biased.view(1, -1, 1, 1) + model.bn1.eps)
            z = F.relu(z * model.bn1.weight.double().view(1, -1, 1, 1) + model.bn1.bias.double().view(1, -1, 1, 1))
            m2, v2 = channel_stats(F.conv2d(z, model.conv2.weight.double(), model.conv2.bias.double()))
            means2.append(m2)
            variances2.append(v2)
    # momentum None: the plain average over the batches
    torch.testing.assert_close(model.bn1.running_mean.double(), sum(means) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var.double(), sum(variances) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn2.running_mean.double(), sum(means2) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn2.running_var.double(), sum(variances2) / 2, rtol=1e-5, atol=1e-5)
    # the modules come back as they were
    assert not model.training and not model.bn1.training
    assert model.bn1.momentum == 0.1 and model.bn2.momentum == 0.2
    assert model.bn1.num_batches_tracked.item() == 2


def test_recompute_on_an_ema_keeps_its_flat_views_and_refuses_no_batches():
    torch.manual_seed(0)
    model = TwoNorms()
    ema = ModelEMA(model)
    storage = ema.ema.bn1.running_mean.untyped_storage().data_ptr()
    recompute_bn_stats(ema.ema, [torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)])
    assert ema.ema.bn1.running_mean.untyped_storage().data_ptr() == storage
    assert not ema.storage._shadow_replaced() and ema.path == "flat"
    before = ema.ema.bn1.running_mean.clone()
    with pytest.raises(ValueError, match="no batches"):
        recompute_bn_stats(ema.ema, [])
    assert torch.equal(ema.ema.bn1.running_mean, before)  # refused before anything was reset
    assert recompute_bn_stats(nn.Linear(2, 2), [torch.zeros(1, 3, 4, 4, dtype=torch.uint8)]) == 0


def test_fixed_batches_read_once_and_replay_the_same_images():
    reads = []

    def loader():
        for i in range(5):
            reads.append(i)
            yield torch.full((1, 3, 2, 2), i, dtype=torch.uint8), None

    class Loader:
        def __iter__(self):
            return loader()

    fixed = FixedBatches(Loader(), 2)
    first, second = list(fixed), list(fixed)
    assert [b[0, 0, 0, 0].item() for b in first] == [0, 1] and reads == [0, 1]
    assert all(a is b for a, b in zip(first, second)) and len(fixed) == 2


def test_bn_recompute_hyp_key_is_checked():
    assert bn_recompute_batches({}) == 0 and bn_recompute_batches({"ema_bn_recompute": 8}) == 8
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="ema_bn_recompute must be a whole number"):
            bn_recompute_batches({"ema_bn_recompute": bad})


# ------------------------------------------------------------------------------------------------ --posthoc
def test_posthoc_flag_turns_snapshots_on_keeping_the_hyp_widths_and_count():
    assert settings_from_hyp(with_posthoc_on({"posthoc_sigma_rels": []})) == (list(DEFAULT_SIGMA_RELS), 32)
    assert settings_from_hyp(with_posthoc_on({"posthoc_snapshots": 8})) == (list(DEFAULT_SIGMA_RELS), 8)
    own = {"posthoc_sigma_rels": [0.07], "posthoc_snapshots": 4}
    assert with_posthoc_on(own) is own
