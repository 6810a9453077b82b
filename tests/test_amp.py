"""The fp16 GradScaler path as users run it on GPUs, run here end to end on the CPU (`--amp fp16`): overflow
skips, scale halving and growth, and EMA updates only after steps actually taken."""
import logging
import math

import re

import pytest
import torch
import torch.nn as nn
import yaml

import train
from tests.train_helpers import in_process_args, make_dataset, one_intra_op_thread, tiny_model_yaml, tiny_run_args
from utils.checkpoint import load_checkpoint, unpacked_tree
from utils.log import LOGGER
from utils.optim import OPTIMIZERS
from utils.torch_utils import AMP_DTYPES

N_IMAGES, BATCH, EPOCHS = 8, 2, 2
NB = N_IMAGES // BATCH  # 4 iterations per epoch, 8 in all
INIT_SCALE, GROWTH_INTERVAL = 1024.0, 3
OVERFLOW_AT = (1, 6)  # global iterations whose loss is multiplied by inf


def expected_scales(iterations: int, overflow_at, init: float, interval: int) -> list[float]:
    """GradScaler's rule walked by hand: halve on an overflow (and restart counting), double after `interval`
    overflow-free steps in a row. Returns the scale after each iteration's step."""
    scale, clean, out = init, 0, []
    for ni in range(iterations):
        if ni in overflow_at:
            scale, clean = scale / 2, 0
        else:
            clean += 1
            if clean == interval:
                scale, clean = scale * 2, 0
        out.append(scale)
    return out


@pytest.fixture(scope="module")
def amp_run(tmp_path_factory):
    """One in-process fp16 run (accumulate 1: nbs equals the batch), every TrainStep call observed."""
    root = tmp_path_factory.mktemp("amp")
    data, cfg = make_dataset(root / "data", n=N_IMAGES), tiny_model_yaml(root)
    hyp = {**train.load_hyp(train.ROOT / "hyp" / "hyp.scratch-low.yaml"), "nbs": BATCH,
           "amp_init_scale": INIT_SCALE, "amp_growth_interval": GROWTH_INTERVAL}
    (root / "hyp.yaml").write_text(yaml.safe_dump(hyp))
    args = tiny_run_args(data, cfg, root / "runs", "fp16", EPOCHS, "--amp", "fp16", "--optimizer", "Adam",
                         "--hyp", root / "hyp.yaml", "--batch-size", BATCH)

    calls = []
    real_call = train.TrainStep.__call__

    def observed(self, imgs, targets, ni, accumulate):
        ema_before = [t.clone() for t in self.ema.ema.state_dict().values()]
        updates_before = self.ema.updates
        out = real_call(self, imgs, targets, ni, accumulate)
        calls.append({"ni": ni, "accumulate": accumulate, "scale": self.scaler.get_scale(),
                      "scaler_enabled": self.scaler.is_enabled(), "autocast_dtype": self.amp_dtype,
                      "ema_same": all(torch.equal(a, b) for a, b in zip(ema_before, self.ema.ema.state_dict().values())),
                      "updates": (updates_before, self.ema.updates)})
        return out

    log = []
    handler = logging.Handler()
    handler.emit = lambda record: log.append(record.getMessage())
    mp = pytest.MonkeyPatch()
    mp.setattr(train.TrainStep, "__call__", observed)
    mp.setenv(train.OVERFLOW_HOOK_ENV, ",".join(map(str, OVERFLOW_AT)))
    LOGGER.addHandler(handler)
    try:
        with one_intra_op_thread():
            train.main(train.parse_opt(in_process_args(args)))
    finally:
        LOGGER.removeHandler(handler)
        mp.undo()
    return {"calls": calls, "run": root / "runs" / "fp16", "log": log}


def test_the_fp16_path_is_the_gpu_path(amp_run):
    calls = amp_run["calls"]
    assert [c["ni"] for c in calls] == list(range(NB * EPOCHS))
    assert all(c["scaler_enabled"] and c["autocast_dtype"] is torch.float16 for c in calls)
    assert all(c["accumulate"] == 1 for c in calls)  # every iteration ends in an optimizer step (or its skip)
    assert yaml.safe_load((amp_run["run"] / "opt.yaml").read_text())["amp"] == "fp16"


def test_overflows_skip_the_step_halve_the_scale_and_leave_the_ema_alone(amp_run):
    calls = amp_run["calls"]
    scales = expected_scales(NB * EPOCHS, OVERFLOW_AT, INIT_SCALE, GROWTH_INTERVAL)
    assert [c["scale"] for c in calls] == scales
    assert scales[:6] == [1024, 512, 512, 512, 1024, 1024]  # the hand walk itself: halved at 1, doubled at 4
    for c in calls:
        before, after = c["updates"]
        if c["ni"] in OVERFLOW_AT:
            assert c["ema_same"] and after == before, c  # bitwise unchanged, not counted
        else:
            assert not c["ema_same"] and after == before + 1, c


def test_updates_equal_the_steps_actually_taken(amp_run):
    ckpt = load_checkpoint(amp_run["run"] / "weights" / "last.pt")
    adam_steps = {int(s["step"]) for s in unpacked_tree(ckpt["optimizer"])["state"].values()}  # Adam's own count of its steps
    taken = NB * EPOCHS - len(OVERFLOW_AT)
    assert adam_steps == {taken} and ckpt["updates"] == taken
    assert all(torch.isfinite(v.float()).all() for v in ckpt["ema"].values())
    rows = (amp_run["run"] / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + EPOCHS  # training went on after the overflows and validated (under fp16 autocast)


def test_the_log_names_each_skipped_step(amp_run):
    skipped = [line for line in amp_run["log"] if line.startswith("Skipped the optimizer step")]
    assert [line.split(":")[0] for line in skipped] == [f"Skipped the optimizer step at iteration {n}" for n in OVERFLOW_AT]
    assert "GradScaler scale 1024 -> 512" in skipped[0]


def test_skip_warning_names_iteration_and_scale(caplog):
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    (scaler.scale(net(torch.ones(1, 3)).sum()) * math.inf).backward()
    with caplog.at_level("WARNING", logger="yolo"):
        assert train.optimizer_step(net, opt, scaler, where=" at iteration 6") is False
    assert "Skipped the optimizer step at iteration 6: gradient norm is" in caplog.text
    assert "GradScaler scale 64 -> 32; the EMA is not updated" in caplog.text


def test_a_step_skipped_for_an_overflowing_norm_backs_the_scale_off():
    """Every gradient finite but their norm inf (squares past float32's range): the step is skipped, so the scale
    is halved and its growth count restarted, as after non-finite gradients; a clean step would have doubled it
    (growth_interval 1)."""
    net = nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0, growth_interval=1)
    # d(sum)/dw = x times the scale 64: 2.6e38, finite in float32; unscaled 4e36, whose square overflows
    scaler.scale(net(torch.full((1, 2), 4e36)).sum()).backward()
    assert torch.isfinite(net.weight.grad).all()
    before = net.weight.detach().clone()
    assert train.optimizer_step(net, opt, scaler) is False
    assert torch.equal(net.weight.detach(), before)
    assert scaler.get_scale() == 32.0 and scaler.state_dict()["_growth_tracker"] == 0
    scaler.scale(net(torch.ones(1, 2)).sum()).backward()  # a clean step now grows the scale again
    assert train.optimizer_step(net, opt, scaler) is True and scaler.get_scale() == 64.0


def test_one_step_code_for_every_precision():
    """fp16, bf16 and FP32 go through the same TrainStep; only fp16 enables the scaler."""
    hyp = train.load_hyp(train.ROOT / "hyp" / "hyp.scratch-low.yaml")
    cpu = torch.device("cpu")
    assert train.make_scaler("fp16", cpu, hyp).is_enabled()
    assert not train.make_scaler("bf16", cpu, hyp).is_enabled() and not train.make_scaler("off", cpu, hyp).is_enabled()
    s = train.make_scaler("fp16", cpu, {**hyp, "amp_init_scale": 8.0, "amp_growth_interval": 5})
    assert s.get_scale() == 8.0 and s.get_growth_interval() == 5
    for key, value, rule in [("amp_init_scale", 0, "> 0"), ("amp_growth_factor", 0.5, "> 1"),
                             ("amp_backoff_factor", 1.0, "in (0, 1)"), ("amp_growth_interval", 2.5, "a whole number >= 1"),
                             ("amp_growth_interval", "often", "a whole number >= 1")]:
        with pytest.raises(train.TrainError, match=rf"^hyp dict: {key} must be {re.escape(rule)}, not {value!r}$"):
            train.load_hyp({**hyp, key: value})  # refused with the hyp, before any run folder exists
    assert train.OPTIMIZER_CHOICES == OPTIMIZERS and train.AMP_CHOICES == tuple(AMP_DTYPES)  # --help's copies
