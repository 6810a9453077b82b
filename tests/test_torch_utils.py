"""Device selection and AMP checks (CUDA faked with monkeypatch: CI has no GPU), de-parallelising, the
non-finite weight check."""
import os

import pytest
import torch
import torch.nn as nn

from utils.ema import ModelEMA
from utils.torch_utils import check_amp, de_parallel, init_seeds, non_finite_tensors, select_device


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.current = current  # every device made current, in order
    return monkeypatch


def test_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available; use --device cpu"):
        select_device("0")


def test_single_process_takes_the_first_listed_gpu(four_gpus):
    assert select_device("") == torch.device("cuda:0")
    assert select_device("2") == torch.device("cuda:2")
    assert select_device("cuda:3") == torch.device("cuda:3")
    assert select_device("cuda") == select_device("CUDA") == select_device(" Cuda ") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="only 4 CUDA device"):
        select_device("5")


def test_the_chosen_gpu_becomes_the_current_device(four_gpus):
    """Without set_device, pinned-memory threads and synchronize() of a process on --device 2 use GPU 0."""
    select_device("2")
    select_device("cuda:3")
    four_gpus.setenv("LOCAL_RANK", "1")
    select_device("cuda")
    assert four_gpus.current == [torch.device("cuda:2"), torch.device("cuda:3"), torch.device("cuda:1")]
    select_device("cpu")
    assert len(four_gpus.current) == 3


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "0,a", "mps0", ",", " , "])
def test_device_strings_that_name_no_device_are_one_line_errors(four_gpus, spec):
    with pytest.raises(ValueError, match=r"is not a device: use cpu, cuda, a GPU index such as 0"):
        select_device(spec)


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "CUDA", "0", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available; use --device cpu"):
            select_device(spec)


def test_bf16_refused_on_a_gpu_without_native_bf16(monkeypatch):
    asked = []

    def supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # an older GPU: bf16 only through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"^--amp bf16: Tesla T4 has no native bfloat16; use --amp fp16$"):
        check_amp("bf16", torch.device("cuda:0"))
    assert asked == [False]  # emulation must not count as support
    assert check_amp("fp16", torch.device("cuda:0")) is torch.float16
    assert check_amp("bf16", torch.device("cpu")) is torch.bfloat16 and check_amp("off", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="--amp 'fp8' is not one of fp16, bf16, off"):
        check_amp("fp8", torch.device("cpu"))


def test_torchrun_processes_take_their_local_rank_gpu(four_gpus):
    four_gpus.setenv("LOCAL_RANK", "1")
    assert select_device("") == torch.device("cuda:1")  # no --device: all visible GPUs, one per process
    assert select_device("2,3") == torch.device("cuda:3")  # the LOCAL_RANK-th of the listed ones
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="LOCAL_RANK 1 has no GPU of its own"):
        select_device("2")


def test_de_parallel_unwraps_data_parallel_and_compile():
    inner = nn.Linear(2, 2)
    assert de_parallel(nn.DataParallel(inner)) is inner
    assert de_parallel(inner) is inner
    assert de_parallel(torch.compile(inner)) is inner  # torch.compile's wrapper: no '_orig_mod.' keys on save
    assert de_parallel(torch.compile(nn.DataParallel(inner))) is inner


def test_non_finite_tensors_names_parameters_and_buffers():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert non_finite_tensors(m) == []
    with torch.no_grad():
        m[0].bias[1] = float("inf")
        m[1].running_var[2] = float("nan")
    assert non_finite_tensors(m) == ["0.bias", "1.running_var"]


def test_non_finite_tensors_of_a_flat_ema_and_an_fp16_model():
    """ema.ema's tensors are views into one flat buffer, checked as that buffer: every tensor is still seen,
    the first and the last included; FP16 values near the top of the range are finite, not overflows."""
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    ema = ModelEMA(m)
    assert ema.path == "flat" and non_finite_tensors(ema.ema) == []
    names = [n for n, t in list(ema.ema.named_parameters()) + list(ema.ema.named_buffers()) if t.is_floating_point()]
    for name in (names[0], names[-1], "1.running_mean"):
        t = dict(list(ema.ema.named_parameters()) + list(ema.ema.named_buffers()))[name]
        with torch.no_grad():
            saved = t.clone()
            t.view(-1)[-1] = float("nan")
        assert non_finite_tensors(ema.ema) == [name]
        with torch.no_grad():
            t.copy_(saved)
    half = nn.Conv2d(3, 4, 1).half()
    with torch.no_grad():
        half.weight.fill_(65504.0)  # the largest FP16 value
    assert non_finite_tensors(half) == []


def test_non_finite_tensors_pass_over_empty_tensors():
    """A tensor with no elements holds nothing to check (and the fused max-abs norm refuses it)."""
    m = nn.Sequential(nn.Conv2d(3, 4, 1))
    m.register_buffer("empty", torch.zeros(0))
    assert non_finite_tensors(m) == []
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    assert non_finite_tensors(m) == ["0.weight"]
    only_empty = nn.Module()
    only_empty.register_buffer("empty", torch.zeros(0))
    assert non_finite_tensors(only_empty) == []


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_seeding_sets_what_cuda_needs(monkeypatch, deterministic):
    """cuBLAS is deterministic only with CUBLAS_WORKSPACE_CONFIG set, and cuDNN only without benchmarking."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)  # keep the process as it is
    for flag in ("deterministic", "benchmark"):
        monkeypatch.setattr(torch.backends.cudnn, flag, torch.backends.cudnn.__dict__.get(flag, False))
    init_seeds(0, deterministic=deterministic)
    assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") is deterministic
    assert torch.backends.cudnn.benchmark is (not deterministic)


def test_kernels_without_a_deterministic_implementation_are_said_once_each(monkeypatch, caplog):
    """--deterministic runs torch in warn_only mode: Tensor.put_ (no deterministic CPU kernel) only warns. Each such
    kernel is logged once, as one line saying the run may not resume bit-exactly, and counted; deterministic ops are
    not. init_seeds(deterministic=True) installs the process's watch."""
    import logging
    import warnings

    import utils.torch_utils as torch_utils
    from utils.determinism import DeterminismWatch

    watch = DeterminismWatch()
    watch.install()
    try:
        with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="yolo"):
            warnings.simplefilter("always")
            torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                x = torch.zeros(5)
                for _ in range(3):
                    x.put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
                x.add_(1).sum()
            finally:
                torch.use_deterministic_algorithms(False)
    finally:
        watch.uninstall()
    assert watch.kernels == ["put_"]
    assert [r.getMessage() for r in caplog.records] == [
        "WARNING: --deterministic: put_ has no deterministic implementation (torch only warns); 1 such kernel(s) so "
        "far: this run may not resume bit-exactly"]
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)
    monkeypatch.setattr(torch_utils.WATCH, "install", lambda: watch.kernels.append("installed"))
    init_seeds(0, deterministic=True)
    assert watch.kernels[-1] == "installed"
