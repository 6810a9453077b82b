"""The CUDA paths, run where a GPU is present (`pytest -m cuda`, or bench/cuda_check.py): device strings and the
current device, the fp16 step and its skip on CUDA, the EMA's flat path as one lerp_ kernel, the non-finite check
as one synchronisation, and val's fp16 autocast leaving the EMA untouched. Skipped where there is no GPU: CI runs
their CPU twins (tests/test_amp.py, tests/test_torch_utils.py, tests/test_val.py)."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

import train
import val
from models.yolo import Model
from tests.train_helpers import make_dataset, run_train, tiny_model_yaml, tiny_run_args
from utils.checkpoint import load_checkpoint
from utils.ema import ModelEMA
from utils.torch_utils import non_finite_tensors, select_device

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1))


def test_device_strings_and_the_current_device():
    last = torch.cuda.device_count() - 1
    assert select_device("cuda") == select_device("CUDA") == torch.device("cuda:0")
    assert torch.cuda.current_device() == 0
    assert select_device(str(last)) == torch.device(f"cuda:{last}")
    assert torch.cuda.current_device() == last  # pinned-memory threads and synchronize() now use this GPU
    select_device("0")


def test_fp16_step_and_overflow_skip_on_cuda():
    device = select_device("0")
    net = small_net().to(device)
    ema = ModelEMA(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    hyp = {**train.HYP_DEFAULTS, "amp_init_scale": 1024.0}
    scaler = train.make_scaler("fp16", device, hyp)
    step = train.TrainStep(net, lambda pred, targets: (pred.float().pow(2).mean(), torch.zeros(3, device=device)),
                           opt, scaler, ema, torch.float16, overflow_at={1})
    imgs = torch.rand(4, 3, 32, 32, device=device)
    step(imgs, torch.zeros(0, 6), 0, 1)
    assert ema.updates == 1 and scaler.get_scale() == 1024.0
    before = [t.clone() for t in ema.ema.state_dict().values()]
    step(imgs, torch.zeros(0, 6), 1, 1)  # the overflow
    assert ema.updates == 1 and scaler.get_scale() == 512.0 and step.skipped == [1]
    assert all(torch.equal(a, b) for a, b in zip(before, ema.ema.state_dict().values()))
    step(imgs, torch.zeros(0, 6), 2, 1)
    assert ema.updates == 2 and all(torch.isfinite(t).all() for t in ema.ema.state_dict().values())


def test_ema_update_is_one_lerp_kernel_on_cuda():
    model = Model("yolov5s.yaml", nc=80, verbose=False).to(select_device("0"))
    ema = ModelEMA(model)
    assert ema.path == "flat"
    ema.update(model)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ema.update(model)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("lerp" in k.lower() for k in kernels) == 1, kernels


def test_non_finite_check_synchronises_once():
    model = Model("yolov5n.yaml", nc=80, verbose=False).to(select_device("0"))
    ema = ModelEMA(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            assert non_finite_tensors(ema.ema) == []
            ema_syncs = len(caught)
            caught.clear()
            assert non_finite_tensors(model) == []
            model_syncs = len(caught)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert ema_syncs == 1 and model_syncs == 1, (ema_syncs, model_syncs)


def test_val_half_is_autocast_and_leaves_the_ema_alone(tmp_path):
    device = select_device("0")
    data = make_dataset(tmp_path / "data", n=4)
    model = Model("yolov5n.yaml", nc=2, verbose=False).to(device)
    ema = ModelEMA(model)
    before = {k: (v.clone(), v.dtype, v.data_ptr()) for k, v in ema.ema.state_dict().items()}
    dtypes = []
    hook = ema.ema.model[0].conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    val.run(str(data), model=ema.ema, imgsz=64, batch_size=4, workers=0, half=True, plots=False, save_dir=tmp_path)
    hook.remove()
    assert set(dtypes) == {torch.float16}
    after = ema.ema.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == d and after[k].data_ptr() == p
               for k, (v, d, p) in before.items())


def test_a_short_fp16_run_on_cuda(tmp_path):
    data, cfg = make_dataset(tmp_path / "data", n=8), tiny_model_yaml(tmp_path)
    out = run_train(tiny_run_args(data, cfg, tmp_path, "gpu", 2, "--device", "0"))
    assert out.returncode == 0, out.stdout[-3000:]
    assert "fp16 autocast with GradScaler on cuda:0" in out.stdout  # the default precision on CUDA
    ckpt = load_checkpoint(tmp_path / "gpu" / "weights" / "last.pt")
    assert ckpt["opt"]["amp"] == "fp16" and ckpt["updates"] > 0 and not math.isnan(ckpt["best_fitness"])
