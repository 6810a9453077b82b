"""The averaging variants around the main EMA, against closed forms on scalar sequences and independently
computed statistics: Switch EMA (Li et al. 2024), BatchNorm statistics recomputed for averaged weights, and
train.py's hooks for them."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

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


def test_switch_ema_hyp_key_is_checked():
    assert switch_ema_enabled({}) is False and switch_ema_enabled({"ema_switch": True}) is True
    with pytest.raises(ValueError, match="ema_switch must be true or false, got 'yes'"):
        switch_ema_enabled({"ema_switch": "yes"})


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
