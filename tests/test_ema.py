"""ModelEMA against independent float64 references, closed-form schedules and the training-time situations it
must survive (wrappers, replaced tensors, 16-bit models, NaNs, resume)."""
import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils.ema as ema_module
from utils.ema import ModelEMA, copy_attr, register_schedule


class Net(nn.Module):
    """Conv + BatchNorm + a plain float buffer + a non-persistent buffer, with YOLO-style metadata."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("cache", torch.zeros(2), persistent=False)
        self.nc, self.names, self.stride = 4, ["a", "b", "c", "d"], torch.tensor([8.0])

    def forward(self, x):
        return self.head(F.silu(self.bn(self.conv(x)))) * self.scale.view(1, -1, 1, 1)


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net()


def snapshot(model):
    return {k: v.detach().clone().double() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()}


def perturb(model, gen, scale=0.1):
    """Move every float parameter/buffer in place (as an optimizer or BN would) and run BN in train mode."""
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.dtype) * scale)
        model.train()
        model(torch.randn(2, 3, 6, 6, generator=gen).to(next(model.parameters()).dtype))


def ramp(n, decay=0.9999, tau=2000.0):
    return decay * (1.0 - math.exp(-n / tau))


def reference_step(ref, model_state, d):
    """One EMA step in float64, written out independently of utils.ema."""
    for k, m in model_state.items():
        ref[k] = d * ref[k] + (1.0 - d) * m if m.is_floating_point() else m.clone()


def assert_matches(ema, ref, atol=2e-6):
    state = ema.ema.state_dict()
    assert state.keys() == ref.keys()
    for k, v in state.items():
        if v.is_floating_point():
            assert v.dtype == torch.float32, k
            assert (v.double() - ref[k]).abs().max().item() <= atol, k
        else:
            assert torch.equal(v, ref[k].to(v.dtype)), k


def float_storages(model):
    return {v.untyped_storage().data_ptr() for v in model.state_dict().values() if v.is_floating_point()}


# ------------------------------------------------------------------------------------------------ flat layout
def test_flattening_keeps_values_shapes_strides_names_and_outputs():
    model = make_net().to(memory_format=torch.channels_last)
    model.bn.train()
    twin = copy.deepcopy(model)
    params_before = list(model.parameters())
    before = {k: (v.clone(), v.stride(), v.dtype) for k, v in model.state_dict().items()}
    assert model.conv.weight.stride() != model.conv.weight.contiguous().stride()  # really channels_last

    ema = ModelEMA(model)
    assert ema.path == "flat"
    after = model.state_dict()
    assert list(after) == list(before)
    for k, (value, stride, dtype) in before.items():
        assert torch.equal(after[k], value) and after[k].stride() == stride and after[k].dtype == dtype, k
    assert all(a is b for a, b in zip(model.parameters(), params_before))  # optimizers keep their references
    assert all(p.requires_grad for p in model.parameters())
    assert len(float_storages(model)) == 1 and len(float_storages(ema.ema)) == 1
    assert float_storages(model) != float_storages(ema.ema)
    assert model.cache.untyped_storage().data_ptr() not in float_storages(model)  # non-persistent left alone

    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model(x), twin(x))  # same forward, BN statistics updated the same way
    assert torch.equal(model.bn.running_mean, twin.bn.running_mean)

    assert isinstance(ema.ema, Net) and ema.ema is not model and not ema.ema.training
    assert all(not p.requires_grad for p in ema.ema.parameters())
    assert all(v.dtype == torch.float32 for v in ema.ema.state_dict().values() if v.is_floating_point())


def test_optimizer_steps_on_flat_model_match_plain_model_and_feed_the_ema():
    model, twin = make_net(), make_net()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3) for m in (model, twin)]
    ema = ModelEMA(model, decay=0.9, schedule="constant")  # built after the optimizer, as train.py does
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        expected = {k: 0.9 * e + 0.1 * m for (k, e), m in
                    zip(snapshot(ema.ema).items(), snapshot(model).values())}
        ema.update(model)
        assert ema.path == "flat"
        assert_matches(ema, {k: v if "num_batches" not in k else snapshot(model)[k] for k, v in expected.items()})
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), k
    assert len(float_storages(model)) == 1  # the optimizer wrote through the views


def test_shared_parameters_stay_shared():
    model = make_net()
    model.tied = model.head  # the same module under two names
    ema = ModelEMA(model, decay=0.5, schedule="constant")
    assert ema.path == "flat"
    assert model.tied.weight is model.head.weight and ema.ema.tied.weight is ema.ema.head.weight
    with torch.no_grad():
        model.head.weight.fill_(2.0)
    start = ema.ema.head.weight.clone()
    ema.update(model)
    assert torch.allclose(ema.ema.tied.weight, 0.5 * start + 1.0)


# ------------------------------------------------------------------------------------------------ the update
@pytest.mark.parametrize("n", [1, 7, 100, 2000, 20000])
def test_ramp_decay_matches_closed_form(n):
    model = make_net()
    ema = ModelEMA(model, updates=n - 1)
    assert ema.decay_at(n) == pytest.approx(ramp(n), rel=1e-12)
    with torch.no_grad():
        for v in ema.ema.state_dict().values():
            v.zero_() if v.is_floating_point() else None
        for v in model.state_dict().values():
            v.fill_(1.0) if v.is_floating_point() else None
    ema.update(model)
    assert ema.updates == n
    for k, v in ema.ema.state_dict().items():
        if v.is_floating_point():  # 0 -> d * 0 + (1 - d) * 1
            assert torch.allclose(v.double(), torch.full_like(v, 1.0 - ramp(n), dtype=torch.float64),
                                  rtol=1e-6, atol=1e-9), k


@pytest.mark.parametrize("flat", [True, False])
def test_ema_matches_float64_reference_over_random_updates(flat):
    model, gen = make_net(), torch.Generator().manual_seed(3)
    ema = ModelEMA(model, decay=0.99, tau=10, flat=flat)
    assert ema.path == ("flat" if flat else "foreach")
    ref = snapshot(model)
    for n in range(1, 26):
        perturb(model, gen)
        reference_step(ref, snapshot(model), ramp(n, 0.99, 10))
        ema.update(model)
    assert_matches(ema, ref)
    assert ema.ema.bn.num_batches_tracked.item() == 25 == model.bn.num_batches_tracked.item()
    assert ema.ema.bn.num_batches_tracked.dtype == torch.int64
    assert not torch.equal(ema.ema.bn.running_mean, model.bn.running_mean)  # averaged, not copied


def test_flat_and_foreach_paths_give_identical_results():
    model_a, model_b, gen_a, gen_b = make_net(), make_net(), torch.Generator(), torch.Generator()
    gen_a.manual_seed(5), gen_b.manual_seed(5)
    flat, listed = ModelEMA(model_a, decay=0.95, tau=5), ModelEMA(model_b, decay=0.95, tau=5, flat=False)
    assert (flat.path, listed.path) == ("flat", "foreach")
    for _ in range(10):
        perturb(model_a, gen_a), perturb(model_b, gen_b)
        flat.update(model_a), listed.update(model_b)
    for (k, a), b in zip(flat.ema.state_dict().items(), listed.ema.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("when", ["before", "before-foreach", "after"])
def test_16bit_model_averages_into_fp32(dtype, when):
    model = make_net()
    with torch.no_grad():
        for v in model.state_dict().values():
            v.fill_(1.0) if v.is_floating_point() else None
    if when.startswith("before"):
        model.to(dtype)
    ema = ModelEMA(model, decay=0.999, schedule="constant", flat=when != "before-foreach")
    if when == "after":
        model.to(dtype)
    ulp = torch.finfo(dtype).eps  # the smallest step above 1.0 the model can hold
    with torch.no_grad():
        for v in model.state_dict().values():
            v.fill_(1.0 + ulp) if v.is_floating_point() else None
    for _ in range(5):
        ema.update(model)
    assert ema.path == ("flat" if when == "before" else "foreach")
    expected = 1.0 + ulp * (1.0 - 0.999 ** 5)  # far below a 16-bit ulp: a 16-bit EMA would sit at 1.0
    for k, v in ema.ema.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float32
            assert abs(v.double() - expected).max().item() < 2e-7, k


def test_mixed_dtype_model_gets_one_buffer_per_dtype():
    model, gen = make_net(), torch.Generator().manual_seed(7)
    model.head.half()
    ema = ModelEMA(model, decay=0.9, tau=3)
    assert ema.path == "flat" and len(ema._groups) == 3  # fp32, fp16, int64
    ref = snapshot(model)
    for n in range(1, 6):
        with torch.no_grad():
            for v in model.state_dict().values():
                if v.is_floating_point():
                    v.add_(torch.randn(v.shape, generator=gen).to(v.dtype))
        reference_step(ref, snapshot(model), ramp(n, 0.9, 3))
        ema.update(model)
    assert_matches(ema, ref)


# ------------------------------------------------------------------------------------------------ wrappers
def test_dataparallel_is_unwrapped():
    model = make_net()
    wrapped = nn.DataParallel(model)
    ema = ModelEMA(wrapped, decay=0.5, schedule="constant")
    assert isinstance(ema.ema, Net) and list(ema.ema.state_dict()) == list(model.state_dict())
    ref = snapshot(model)
    perturb(model, torch.Generator().manual_seed(2))
    reference_step(ref, snapshot(model), 0.5)
    ema.update(wrapped)
    assert ema.path == "flat"
    assert_matches(ema, ref)


def test_torch_compile_wrapper_pairs_by_order_not_name():
    model = make_net()
    compiled = torch.compile(model)  # keys become '_orig_mod.conv.weight', ...; nothing is compiled here
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    ema = ModelEMA(compiled, decay=0.5, schedule="constant")
    ref = snapshot(model)
    perturb(model, torch.Generator().manual_seed(4))
    reference_step(ref, snapshot(model), 0.5)
    ema.update(compiled)
    assert ema.path == "flat"
    assert_matches(ema, ref)


def train_through_wrapper(wrap, seed: int, atol: float):
    """Build a model and its EMA, wrap the model (as train.py does, after the EMA flattened it), train the wrapper
    and an eager twin alike for four SGD steps with the EMA following the wrapper; the EMA must stay on the flat
    path, match the float64 reference, and the wrapped model must have trained as the twin did."""
    model, twin = make_net(), make_net()
    ema = ModelEMA(model, decay=0.8, tau=2)
    wrapped = wrap(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (wrapped, twin)]
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    ref = snapshot(model)
    for n in range(1, 5):
        for m, opt in zip((wrapped, twin), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        reference_step(ref, snapshot(model), ramp(n, 0.8, 2))
        ema.update(wrapped)
        assert ema.path == "flat"
    assert_matches(ema, ref)
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(a, b, atol=atol), k
    assert not torch.equal(model.conv.weight, make_net().conv.weight)
    assert not torch.equal(model.bn.running_mean, make_net().bn.running_mean)


def test_flat_ema_follows_a_really_compiled_model():
    """Training through torch.compile (dynamo graph capture and AOTAutograd; the aot_eager backend skips only
    inductor's C++ code generation, which takes minutes on this CPU): the compiled graph's parameter updates and
    BatchNorm statistics land in the flat buffer's views."""
    train_through_wrapper(lambda model: torch.compile(model, backend="aot_eager"), seed=7, atol=1e-5)


def test_ddp_wraps_flattened_model_and_ema_follows(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        train_through_wrapper(DDP, seed=6, atol=1e-6)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ replaced tensors
def _replace(model, how):
    if how == "float64":
        model.to(torch.float64)
    elif how == "channels_last":
        model.to(memory_format=torch.channels_last)
    elif how == "assign":
        model.load_state_dict({k: v.clone() + 1 for k, v in model.state_dict().items()}, assign=True)
    elif how == "data":
        model.conv.weight.data = model.conv.weight.data.clone()


@pytest.mark.parametrize("how", ["float64", "channels_last", "assign", "data", "data-python-check"])
def test_replaced_tensors_switch_to_foreach_and_stay_correct(how, monkeypatch):
    if how == "data-python-check":
        monkeypatch.setattr(ema_module, "_C_PTRS_EQUAL", None)
        how = "data"
    model, gen = make_net(), torch.Generator().manual_seed(8)
    ema = ModelEMA(model, decay=0.7, schedule="constant")
    ref = snapshot(model)
    for step in range(4):
        if step == 1:
            _replace(model, how)
        if step == 3:
            ema.attach(model)  # flattens the new tensors again
            assert ema.path == "flat"
        perturb(model, gen)
        reference_step(ref, snapshot(model), 0.7)
        ema.update(model)
        assert ema.path == ("foreach" if step in (1, 2) else "flat"), step
        assert_matches(ema, ref)


def test_same_device_and_dtype_moves_keep_the_flat_path():
    model = make_net()
    ema = ModelEMA(model)
    storages = float_storages(model)
    model.to("cpu").float().train()
    model.load_state_dict(copy.deepcopy(model.state_dict()))  # in-place copy
    ema.update(model)
    assert ema.path == "flat" and float_storages(model) == storages


def test_second_ema_shares_the_model_buffer():
    model = make_net()
    first, second = ModelEMA(model), ModelEMA(model, decay=0.5)
    perturb(model, torch.Generator().manual_seed(9))
    first.update(model), second.update(model)
    assert first.path == second.path == "flat"
    assert first._groups[0].model_flat.data_ptr() == second._groups[0].model_flat.data_ptr()


def test_other_architecture_is_refused():
    ema = ModelEMA(make_net())
    with pytest.raises(RuntimeError, match="architecture"):
        ema.update(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("schedule", ["constant", "ramp"])
def test_update_every_k_equals_k_single_steps(schedule):
    k, model, gen = 3, make_net(), torch.Generator().manual_seed(10)
    every_step = ModelEMA(model, decay=0.9, tau=4, schedule=schedule)
    every_k = ModelEMA(model, decay=0.9, tau=4, schedule=schedule, update_every=k)
    for step in range(1, 13):
        if step % k == 1:  # the model moves once per window of k steps
            perturb(model, gen)
        assert every_step.update(model)
        assert every_k.update(model) == (step % k == 0)
        if step % k == 0:
            for (key, a), b in zip(every_step.ema.state_dict().items(), every_k.ema.state_dict().values()):
                assert torch.allclose(a, b, rtol=0, atol=1e-6), (step, key)
    assert every_k.updates == 12


def test_update_every_compensates_constant_decay_as_power():
    model = make_net()
    ema = ModelEMA(model, decay=0.9, schedule="constant", update_every=4)
    start = snapshot(ema.ema)["head.bias"]
    with torch.no_grad():
        model.head.bias.fill_(3.0)
    for _ in range(4):
        ema.update(model)
    assert torch.allclose(ema.ema.head.bias.double(), 0.9 ** 4 * start + (1 - 0.9 ** 4) * 3.0, atol=1e-6)


def test_update_after_step_copies_then_starts_the_ramp():
    model, gen = make_net(), torch.Generator().manual_seed(11)
    ema = ModelEMA(model, decay=0.9, tau=2, update_after_step=3)
    for _ in range(3):
        perturb(model, gen)
        ema.update(model)
        for (k, a), b in zip(ema.ema.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), k
    ref = snapshot(model)
    perturb(model, gen)
    reference_step(ref, snapshot(model), ramp(1, 0.9, 2))  # the ramp counts from the first averaged step
    ema.update(model)
    assert_matches(ema, ref)


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_skips_poisoned_updates(flat, bad):
    model = make_net()
    ema = ModelEMA(model, decay=0.5, schedule="constant", flat=flat)
    ema.update(model)
    before = snapshot(ema.ema)
    with torch.no_grad():
        model.head.weight[0, 0, 0, 0] = bad
    assert ema.update(model, check_finite=True) is False
    assert (ema.skipped, ema.updates) == (1, 1)
    assert all(torch.equal(a, before[k]) for k, a in snapshot(ema.ema).items())
    with torch.no_grad():
        model.head.weight[0, 0, 0, 0] = 1.0
    assert ema.update(model, check_finite=True) is True and ema.updates == 2
    assert all(torch.isfinite(v).all() for v in ema.ema.state_dict().values())
    with torch.no_grad():
        model.head.weight[0, 0, 0, 0] = bad
    ema.update(model)  # unguarded: the bad value gets in, which is why the guard exists
    assert not torch.isfinite(ema.ema.head.weight).all()


# ------------------------------------------------------------------------------------------------ schedules
@pytest.fixture
def private_registry(monkeypatch):
    monkeypatch.setattr(ema_module, "_SCHEDULES", dict(ema_module._SCHEDULES))


def test_builtin_schedules_closed_forms():
    model = make_net()
    constant = ModelEMA(model, decay=0.99, schedule="constant")
    threshold = ModelEMA(model, decay=0.99, schedule="threshold")
    exp = ModelEMA(model, decay=0.99, schedule="exp", beta=5, total_steps=300)
    for n in (1, 2, 10, 100, 1000):
        assert constant.decay_at(n) == 0.99
        assert threshold.decay_at(n) == pytest.approx(min(0.99, (1 + n) / (10 + n)))
        assert exp.decay_at(n) == pytest.approx(0.99 * (1 - math.exp(-5 * n / 300)))
    assert threshold.decay_at(1) == pytest.approx(2 / 11) and threshold.decay_at(1000) == 0.99
    with pytest.raises(ValueError, match="total_steps"):
        ModelEMA(model, schedule="exp")
    with pytest.raises(ValueError, match="available"):
        ModelEMA(model, schedule="linear")


def test_user_schedule_registered_by_name(private_registry):
    register_schedule("halfway", lambda decay, step, total: decay * min(1.0, 2 * step / total))
    model = make_net()
    ema = ModelEMA(model, decay=0.8, schedule="halfway", total_steps=10)
    assert [ema.decay_at(n) for n in (1, 5, 9)] == pytest.approx([0.16, 0.8, 0.8])
    start = snapshot(ema.ema)["head.bias"]
    with torch.no_grad():
        model.head.bias.fill_(1.0)
    ema.update(model)
    assert torch.allclose(ema.ema.head.bias.double(), 0.16 * start + 0.84, atol=1e-7)
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("halfway", lambda d, s, t: d)
    with pytest.raises(ValueError, match="built in"):
        register_schedule("ramp", lambda d, s, t: d, overwrite=True)
    register_schedule("broken", lambda d, s, t: 1.5)
    with pytest.raises(ValueError, match="broken"):
        ModelEMA(model, schedule="broken").update(model)


def test_from_hyp_reads_ema_keys():
    hyp = {"lr0": 0.01, "ema_decay": 0.99, "ema_tau": 50, "ema_schedule": "threshold", "ema_update_every": 2,
           "ema_update_after_step": 5, "ema_flat": False}
    ema = ModelEMA.from_hyp(make_net(), hyp, updates=7)
    assert (ema.decay, ema.tau, ema.schedule, ema.update_every, ema.update_after_step, ema.updates, ema.path) == \
           (0.99, 50, "threshold", 2, 5, 7, "foreach")
    default = ModelEMA.from_hyp(make_net(), {"lr0": 0.01})
    assert (default.decay, default.tau, default.schedule, default.path) == (0.9999, 2000, "ramp", "flat")
    with pytest.raises(ValueError, match="ema_decya"):
        ModelEMA.from_hyp(make_net(), {"ema_decya": 0.9})


# ------------------------------------------------------------------------------------------------ state, eval, attrs
def test_state_dict_round_trip_continues_the_same_curve():
    model, gen = make_net(), torch.Generator().manual_seed(12)
    original = ModelEMA(model, decay=0.95, tau=3, schedule="threshold", update_every=2, update_after_step=1)
    for _ in range(5):
        perturb(model, gen)
        original.update(model)
    original.skipped = 2
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert all(v.dtype == torch.float32 for v in state["ema"].values() if v.is_floating_point())

    twin = copy.deepcopy(model)
    resumed = ModelEMA(twin)  # default settings: the state must bring its own
    resumed.load_state_dict(state)
    assert (resumed.updates, resumed.skipped, resumed.schedule, resumed.decay, resumed.tau, resumed.update_every,
            resumed.update_after_step) == (5, 2, "threshold", 0.95, 3.0, 2, 1)
    assert resumed.path == "flat"
    for _ in range(5):
        perturb(model, gen)
        twin.load_state_dict(model.state_dict())
        original.update(model), resumed.update(twin)
    for (k, a), b in zip(original.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b), k


def test_state_dict_is_a_snapshot():
    model = make_net()
    ema = ModelEMA(model)
    state = ema.state_dict()
    state["ema"]["head.bias"].fill_(123.0)
    assert not torch.equal(ema.ema.head.bias, state["ema"]["head.bias"])


def test_apply_to_swaps_in_ema_weights_and_restores_on_exception():
    model = make_net()
    ema = ModelEMA(model, decay=0.5, schedule="constant")
    perturb(model, torch.Generator().manual_seed(13))
    ema.update(model)
    own, averaged, storages = snapshot(model), snapshot(ema.ema), float_storages(model)
    assert any(not torch.equal(own[k], averaged[k]) for k in own)
    with pytest.raises(KeyError):
        with ema.apply_to(model) as inside:
            assert inside is model
            assert all(torch.equal(v, averaged[k]) for k, v in snapshot(model).items())
            assert torch.is_grad_enabled()
            raise KeyError("validation crashed")
    assert all(torch.equal(v, own[k]) for k, v in snapshot(model).items())
    assert all(torch.equal(v, averaged[k]) for k, v in snapshot(ema.ema).items())
    assert float_storages(model) == storages


def test_copy_attr_and_update_attr():
    class Source:
        pass

    src = Source()
    src.nc, src.names, src._hidden, src.process_group, src.other = 3, ["x"], 1, "pg", "o"
    dst = Source()
    copy_attr(dst, src, exclude=("process_group",))
    assert (dst.nc, dst.names, dst.other) == (3, ["x"], "o")
    assert not hasattr(dst, "_hidden") and not hasattr(dst, "process_group")

    model = make_net()
    ema = ModelEMA(model)
    model.nc, model.names, model.hyp, model.yaml, model.class_weights = 2, ["p", "q"], {"lr0": 1}, {"nc": 2}, None
    model.reducer, model.note = "r", "not included"
    ema.update_attr(model)
    assert (ema.ema.nc, ema.ema.names, ema.ema.hyp, ema.ema.yaml, ema.ema.class_weights) == \
           (2, ["p", "q"], {"lr0": 1}, {"nc": 2}, None)
    assert torch.equal(ema.ema.stride, model.stride)
    assert not hasattr(ema.ema, "reducer") and not hasattr(ema.ema, "note")


def test_syncbn_conversion_keeps_the_flat_tensors():
    model, gen = make_net(), torch.Generator().manual_seed(14)
    ema = ModelEMA(model, decay=0.6, schedule="constant")
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # new BN modules holding the same tensors
    assert isinstance(model.bn, nn.SyncBatchNorm)
    ref = snapshot(model)
    with torch.no_grad():
        for v in model.state_dict().values():
            v.add_(torch.randn(v.shape, generator=gen).to(v.dtype)) if v.is_floating_point() else None
    reference_step(ref, snapshot(model), 0.6)
    ema.update(model)
    assert ema.path == "flat"
    assert_matches(ema, ref)


def test_update_with_another_model_of_the_same_architecture_follows_it():
    first, second, gen = make_net(0), make_net(1), torch.Generator().manual_seed(15)
    ema = ModelEMA(first, decay=0.5, schedule="constant")
    ema.update(nn.DataParallel(first))  # remembered wrapper of the bound model
    ref = snapshot(ema.ema)
    perturb(second, gen)
    reference_step(ref, snapshot(second), 0.5)
    ema.update(second)
    assert ema.path == "foreach"
    assert_matches(ema, ref)


@pytest.mark.parametrize("flat", [True, False])
def test_replacing_the_ema_modules_own_tensors_does_not_freeze_the_average(flat, caplog):
    model = make_net(3)
    ema = ModelEMA(model, decay=0.75, schedule="constant", flat=flat)
    gen = torch.Generator().manual_seed(5)
    perturb(model, gen)
    ema.update(model)
    ema.ema.half()  # what YOLOv5's validation does to the EMA module: new tensors, the update buffers orphaned
    ref = snapshot(ema.ema)  # the halved values, as float64
    perturb(model, gen)
    ema.update(model)
    reference_step(ref, snapshot(model), 0.75)
    assert "ema.ema's tensors were replaced" in caplog.text
    got = ema.ema.state_dict()
    for k, v in ref.items():
        assert got[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype), k
        torch.testing.assert_close(got[k].to(v.dtype), v, rtol=0, atol=1e-6, msg=k)
    assert ema.path == ("flat" if flat else "foreach")
    before = {k: v.clone() for k, v in got.items()}
    perturb(model, gen)
    ema.update(model)  # and it keeps averaging afterwards
    assert not torch.equal(ema.ema.state_dict()["conv.weight"], before["conv.weight"])


# ------------------------------------------------------------------------------------------------ power schedule
from utils.ema import SIGMA_REL_MAX, power_gamma, power_sigma_rel  # noqa: E402


class Vec(nn.Module):
    """A model that is one float vector: its EMA is a weighted sum whose weights can be read off directly."""

    def __init__(self, n):
        super().__init__()
        self.v = nn.Parameter(torch.zeros(n))


def set_vec(model, values):
    with torch.no_grad():
        model.v.copy_(torch.as_tensor(values, dtype=torch.float32))


@pytest.mark.parametrize("gamma", [-0.2, 0.0, 1.0, 6.94, 16.97, 50.0])
def test_power_sigma_rel_is_the_profiles_relative_std_and_inverts(gamma):
    # Profile t**gamma on [0, 1], normalised: E[t] = (g+1)/(g+2), E[t^2] = (g+1)/(g+3); sigma_rel is its std.
    g = gamma
    std = math.sqrt((g + 1) / (g + 3) - ((g + 1) / (g + 2)) ** 2)
    assert power_sigma_rel(g) == pytest.approx(std, rel=1e-12)
    assert power_gamma(power_sigma_rel(g)) == pytest.approx(g, rel=1e-9, abs=1e-9)


def test_power_sigma_rel_limits():
    assert SIGMA_REL_MAX == pytest.approx(0.30028, abs=1e-5)
    gammas = [-0.9 + 0.001 * i for i in range(5000)]  # the widest profile on a fine grid
    assert max(power_sigma_rel(g) for g in gammas) == pytest.approx(SIGMA_REL_MAX, abs=1e-7)
    assert power_gamma(SIGMA_REL_MAX) == pytest.approx((math.sqrt(5) - 1) / 2 - 1, abs=1e-5)
    assert power_gamma(0.10) == pytest.approx(6.9372, abs=1e-4) and power_gamma(0.05) == pytest.approx(16.972, abs=1e-3)
    for bad in (0.31, 0.0, -0.05):
        with pytest.raises(ValueError, match="no power-function EMA"):
            power_gamma(bad)
    with pytest.raises(ValueError, match="above -1"):
        power_sigma_rel(-1.0)


@pytest.mark.parametrize("t", [1, 2, 3, 10, 1000, 123456])
def test_power_schedule_closed_form(t):
    ema = ModelEMA(make_net(), schedule="power", gamma=6.94)
    assert ema.decay_at(t) == pytest.approx((1 - 1 / t) ** 7.94, rel=1e-12, abs=0)
    assert ema.decay_at(1) == 0.0  # the first step copies the model
    by_width = ModelEMA(make_net(), schedule="power", sigma_rel=0.1)
    assert by_width.gamma == pytest.approx(power_gamma(0.1)) and by_width.sigma_rel == pytest.approx(0.1)


def test_power_schedule_settings_are_checked():
    model = make_net()
    with pytest.raises(ValueError, match="ema_gamma or ema_sigma_rel"):
        ModelEMA(model, schedule="power")
    with pytest.raises(ValueError, match="not both"):
        ModelEMA(model, schedule="power", gamma=3.0, sigma_rel=0.1)
    with pytest.raises(ValueError, match="0.3003"):
        ModelEMA.from_hyp(model, {"ema_schedule": "power", "ema_sigma_rel": 0.35})
    with pytest.raises(ValueError, match="above -1"):
        ModelEMA(model, schedule="power", gamma=-1.5)
    ema = ModelEMA.from_hyp(model, {"ema_schedule": "power", "ema_sigma_rel": 0.05, "ema_unit": "images", "nbs": 32})
    assert (ema.schedule, ema.unit, ema.nbs) == ("power", "images", 32.0)
    assert ema.gamma == pytest.approx(16.9722, abs=1e-4)
    with pytest.raises(ValueError, match="unit"):
        ModelEMA(model, unit="epochs")


def test_discrete_power_ema_of_linearly_moving_weights():
    T, g, a, b = 1000, 6.94, 0.5, 1e-3
    model = Vec(3)
    ema = ModelEMA(model, schedule="power", gamma=g)
    for t in range(1, T + 1):
        set_vec(model, [a + b * t, -(a + b * t), a])
        ema.update(model)
    # beta_s = (1 - 1/s)**(g+1), so prod_{s>t} beta_s = (t/T)**(g+1) and the weight of step t is
    # (1 - beta_t) (t/T)**(g+1) = (t**(g+1) - (t-1)**(g+1)) / T**(g+1).
    expected = sum((t ** (g + 1) - (t - 1) ** (g + 1)) / T ** (g + 1) * (a + b * t) for t in range(1, T + 1))
    got = ema.ema.v.double()
    # The FP32 lerp rounds once per step (2**-24 relative): 2.3e-6 measured here after 1000 steps.
    tol = 1e-5
    assert got[0].item() == pytest.approx(expected, rel=tol)
    assert got[1].item() == pytest.approx(-expected, rel=tol)
    assert got[2].item() == pytest.approx(a, rel=tol)  # the weights sum to 1
    continuous = a + b * T * (g + 1) / (g + 2)  # the integral: off by ~0.06%, far outside the tolerance above
    assert abs(continuous - expected) / expected > 30 * tol


@pytest.mark.parametrize("k", [2, 3, 5])
def test_power_update_every_k_is_one_minus_k_over_t(k):
    g, model, gen = 6.94, make_net(), torch.Generator().manual_seed(21)
    every_step = ModelEMA(model, schedule="power", gamma=g)
    every_k = ModelEMA(model, schedule="power", gamma=g, update_every=k)
    ref = snapshot(every_k.ema)
    for t in range(1, 6 * k + 1):
        if t % k == 1 or k == 1:  # the model moves once per window of k steps
            perturb(model, gen)
        every_step.update(model)
        if every_k.update(model):
            d = (1 - k / t) ** (g + 1)  # EDM2's beta with k steps (images) per update
            assert every_k._window_decay(t) == pytest.approx(d, rel=1e-12, abs=1e-300)
            assert d == pytest.approx(math.prod((1 - 1 / s) ** (g + 1) for s in range(t - k + 1, t + 1)), rel=1e-12)
            reference_step(ref, snapshot(model), d)
            for (key, x), y in zip(every_step.ema.state_dict().items(), every_k.ema.state_dict().values()):
                assert torch.allclose(x, y, rtol=0, atol=2e-6), (t, key)
    assert_matches(every_k, ref)


# ------------------------------------------------------------------------------------------------ images unit
def images_profile(schedule, batches, nbs=16, unit="images", **settings):
    """Weight per image of an EMA fed with model states that each mark the images of their step: after the
    step covering images [s, e) the model holds 1/(e - s) on them and 0 elsewhere, so the EMA's value on an
    image is its step's weight divided by the step's image count."""
    n = sum(batches)
    model = Vec(n)
    ema = ModelEMA(model, schedule=schedule, unit=unit, nbs=nbs, **settings)
    start = 0
    for b in batches:
        values = torch.zeros(n, dtype=torch.float64)
        values[start:start + b] = 1.0 / b
        set_vec(model, values)
        ema.update(model, images=b)
        start += b
    return ema.ema.v.double(), ema


def expected_image_profile(batches, cumulative):
    """Per-image weight when the step covering images (s, e] gets cumulative(e) - cumulative(s)."""
    out, start = [], 0
    for b in batches:
        out += [(cumulative(start + b) - cumulative(start)) / b] * b
        start += b
    return torch.tensor(out, dtype=torch.float64)


CUTS = {"batch 8": [8] * 12, "batch 24": [24] * 4, "ramping": [8, 16, 24, 8, 40]}  # 96 images, nbs 16


@pytest.mark.parametrize("cut", list(CUTS))
def test_images_unit_profile_over_the_image_stream_is_the_same_for_any_batch_size(cut):
    batches, nbs, total = CUTS[cut], 16, 96
    T = total / nbs  # the clock in nominal batches

    # constant decay d per nominal batch: the weight left on images before x is d**((total - x) / nbs)
    got, _ = images_profile("constant", batches, decay=0.8)
    want = expected_image_profile(batches, lambda x: 0.8 ** ((total - x) / nbs))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)

    # power: the weight on images before x is (x / total)**(gamma + 1) (EDM2's profile in images)
    got, _ = images_profile("power", batches, gamma=3.0)
    want = expected_image_profile(batches, lambda x: (x / total) ** 4.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)

    # ramp d(n) = decay (1 - exp(-n / tau)) holds over nominal batch n, i.e. images ((n-1) nbs, n nbs]:
    # the weight left on images before x is the product over n of d(n) ** (share of batch n after x)
    def ramp_left(x):
        return math.prod(ramp(n, 0.9, 2.0) ** (min(1.0, max(0.0, n - x / nbs))) for n in range(1, int(T) + 1))

    got, _ = images_profile("ramp", batches, decay=0.9, tau=2.0)
    want = expected_image_profile(batches, ramp_left)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_images_unit_blocks_agree_across_cuts_and_steps_unit_does_not():
    block_sums = {}
    for cut, batches in CUTS.items():
        for unit in ("images", "steps"):
            profile, _ = images_profile("ramp", batches, unit=unit, decay=0.9, tau=2.0)
            block_sums[cut, unit] = torch.stack([profile[a:b].sum() for a, b in ((0, 24), (24, 48), (48, 96))])
    for cut in CUTS:
        torch.testing.assert_close(block_sums[cut, "images"], block_sums["batch 8", "images"], rtol=0, atol=1e-7)
    # counting steps, 12 steps of 8 images average over a shorter stretch of images than 4 steps of 24
    assert (block_sums["batch 8", "steps"] - block_sums["batch 24", "steps"]).abs().max() > 0.05


def test_images_unit_with_nominal_batches_equals_steps_unit():
    model_a, model_b, gen_a, gen_b = make_net(), make_net(), torch.Generator(), torch.Generator()
    gen_a.manual_seed(17), gen_b.manual_seed(17)
    steps = ModelEMA(model_a, decay=0.95, tau=5)
    images = ModelEMA(model_b, decay=0.95, tau=5, unit="images", nbs=64)
    for _ in range(10):
        perturb(model_a, gen_a), perturb(model_b, gen_b)
        steps.update(model_a, images=32), images.update(model_b, images=64)
    for (k, a), b in zip(steps.ema.state_dict().items(), images.ema.state_dict().values()):
        assert torch.equal(a, b), k
    assert images.images == 640 and steps.images == 0  # 'steps' ignores images=...
    with pytest.raises(ValueError, match="images=B"):
        images.update(model_b)


def test_images_unit_with_update_every_counts_every_calls_images():
    # update_every=2 with steps of 8 and 24 images: one averaging per 32 images = 2 nominal batches of 16
    profile, ema = images_profile("constant", [8, 24] * 3, decay=0.8, update_every=2)
    total = 96
    want = expected_image_profile([32] * 3, lambda x: 0.8 ** ((total - x) / 16))
    # each averaging folds in the model of its second call (which marks only that call's 24 images)
    got_blocks = torch.stack([profile[i:i + 32].sum() for i in range(0, 96, 32)])
    want_blocks = torch.stack([want[i:i + 32].sum() for i in range(0, 96, 32)])
    torch.testing.assert_close(got_blocks, want_blocks, rtol=0, atol=1e-7)
    assert ema.pending_images == 0 and ema.images == 96


def test_power_and_images_state_round_trip_continues_the_same_profile():
    model, gen = make_net(), torch.Generator().manual_seed(19)
    original = ModelEMA(model, schedule="power", sigma_rel=0.1, unit="images", nbs=16, update_every=3)
    for b in (4, 8, 12, 8):  # ends mid-window: 1 call pending
        perturb(model, gen)
        original.update(model, images=b)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["gamma"] == original.gamma and state["sigma_rel"] == pytest.approx(0.1)
    assert (state["unit"], state["nbs"], state["images"], state["pending_images"]) == ("images", 16.0, 32.0, 8.0)

    twin = copy.deepcopy(model)
    resumed = ModelEMA(twin)  # default settings: the state brings its own
    resumed.load_state_dict(state)
    assert (resumed.schedule, resumed.gamma, resumed.unit, resumed.nbs) == ("power", original.gamma, "images", 16.0)
    for b in (8, 4, 16, 8, 8):
        perturb(model, gen)
        twin.load_state_dict(model.state_dict())
        original.update(model, images=b), resumed.update(twin, images=b)
    for (k, a), b in zip(original.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b), k


def test_schedule_can_take_gamma_param(private_registry):
    register_schedule("scaled_power", lambda d, s, t, gamma: 0.5 * (1 - 1 / s) ** (gamma + 1), params=("gamma",))
    ema = ModelEMA(make_net(), schedule="scaled_power", gamma=1.0)
    assert ema.decay_at(2) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="needs gamma"):
        ModelEMA(make_net(), schedule="scaled_power")
    with pytest.raises(ValueError, match="'gamma', 'sigma_rel'"):
        register_schedule("bad", lambda d, s, t, rho: d, params=("rho",))


def test_failed_load_leaves_weights_and_settings_untouched():
    model, gen = make_net(), torch.Generator().manual_seed(21)
    ema = ModelEMA(model, decay=0.95, schedule="constant")
    perturb(model, gen)
    ema.update(model)
    before = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    moved = {k: v + 1 if v.is_floating_point() else v for k, v in before.items()}
    wrong_shape = dict(moved, **{"head.bias": torch.zeros(5)})  # the last tensor: the others would copy first
    for state, message in (({**ema.state_dict(), "ema": moved, "decay": 1.5}, "decay"),
                           ({**ema.state_dict(), "ema": moved, "schedule": "exp", "total_steps": None}, "total_steps"),
                           ({**ema.state_dict(), "ema": wrong_shape, "decay": 0.5}, "head.bias")):
        with pytest.raises(ValueError, match=message) as e:
            ema.load_state_dict(state)
        assert "\n" not in str(e.value)
        after = ema.ema.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        assert (ema.decay, ema.schedule, ema.total_steps) == (0.95, "constant", None)


def test_exp_schedule_without_a_length_names_the_unit():
    with pytest.raises(ValueError, match="optimizer steps"):
        ModelEMA(make_net(), schedule="exp")
    with pytest.raises(ValueError, match="nominal batches of 32 images") as e:
        ModelEMA(make_net(), schedule="exp", unit="images", nbs=32)
    assert "optimizer steps" not in str(e.value)


def test_end_of_run_plan_states_the_closed_form_decay_horizon_and_the_short_run_alternative():
    # YOLOv5's ramp over a 1,125-step, 30-epoch run: d = 0.9999 * (1 - exp(-1125 / 2000)) at the last step.
    ema = ModelEMA(make_net(), decay=0.9999, tau=2000, total_steps=1125)
    d = 0.9999 * (1 - math.exp(-1125 / 2000))
    horizon = 1 / (1 - d)
    lines = ema_module.end_of_run_plan(ema, epochs=30)
    assert len(lines) == 2
    assert f"decay will be {d:.4f}" in lines[0] and "of the run's 1,125 optimizer steps" in lines[0]
    assert f"about the last {horizon:,.0f} optimizer steps ({horizon / (1125 / 30):,.2f} epochs)" in lines[0]
    share = 1 - math.exp(-1125 / 2000)
    assert f"reaches only {share:.0%} of its ceiling" in lines[1] and "3 x tau = 6,000" in lines[1]
    assert "ema_tau" in lines[1] and "--posthoc" in lines[1] and "docs/ema_quality.md" in lines[1]

    # 12,000 steps are past 3 tau: the ramp averages, one line, its horizon that of d = 0.9999 (1 - exp(-6)).
    long = ModelEMA(make_net(), decay=0.9999, tau=2000, total_steps=12000)
    lines = ema_module.end_of_run_plan(long, epochs=100)
    d = 0.9999 * (1 - math.exp(-6))
    assert len(lines) == 1 and f"decay will be {d:.4f}" in lines[0]
    assert f"about the last {1 / (1 - d):,.0f} optimizer steps ({1 / (1 - d) / 120:,.2f} epochs)" in lines[0]

    # The burn-in delays the ramp; the images clock counts nominal batches; a constant schedule has no ramp line.
    late = ModelEMA(make_net(), decay=0.9999, tau=100, total_steps=400, update_after_step=150, unit="images", nbs=64)
    lines = ema_module.end_of_run_plan(late, epochs=4)
    assert f"decay will be {0.9999 * (1 - math.exp(-250 / 100)):.4f}" in lines[0]
    assert "400 nominal batches of 64 images" in lines[0] and len(lines) == 2 and "in 250 nominal" in lines[1]
    flat = ModelEMA(make_net(), decay=0.999, schedule="constant", total_steps=50)
    assert ema_module.end_of_run_plan(flat, epochs=5) == [
        "EMA: constant schedule, decay 0.999; at the last of the run's 50 optimizer steps its decay will be 0.9990, "
        "averaging over about the last 1,000 optimizer steps (100.00 epochs)"]


@pytest.mark.parametrize("flat", [True, False])
def test_an_ema_built_before_model_to_device_follows_the_model(flat, caplog):
    """The EMA built on the CPU, then the model moved (meta stands in for CUDA): the next update says the EMA sits on
    another device than the model and moves it there, instead of averaging across devices one tensor at a time."""
    model = make_net(3)
    ema = ModelEMA(model, decay=0.75, schedule="constant", flat=flat)
    ema.update(model)
    model.to("meta")
    ema.update(model)
    assert "ModelEMA: the model is on meta but the EMA on cpu" in caplog.text
    assert {t.device.type for t in [*ema.ema.parameters(), *ema.ema.buffers()]} == {"meta"}
    assert ema.path == ("flat" if flat else "foreach") and not ema.storage._cast_ema  # no cross-device pairs
    assert ema.updates == 2
