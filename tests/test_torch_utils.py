"""Device selection (CUDA faked with monkeypatch: CI has no GPU) and de-parallelising."""
import pytest
import torch
import torch.nn as nn

from utils.torch_utils import de_parallel, select_device


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
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
    with pytest.raises(ValueError, match="only 4 CUDA device"):
        select_device("5")


def test_torchrun_processes_take_their_local_rank_gpu(four_gpus):
    four_gpus.setenv("LOCAL_RANK", "1")
    assert select_device("") == torch.device("cuda:1")  # no --device: all visible GPUs, one per process
    assert select_device("2,3") == torch.device("cuda:3")  # the LOCAL_RANK-th of the listed ones
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="LOCAL_RANK 1 has no GPU of its own"):
        select_device("2")


def test_de_parallel_unwraps_data_parallel():
    inner = nn.Linear(2, 2)
    assert de_parallel(nn.DataParallel(inner)) is inner
    assert de_parallel(inner) is inner


def test_non_finite_tensors_names_parameters_and_buffers():
    from utils.torch_utils import non_finite_tensors

    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert non_finite_tensors(m) == []
    with torch.no_grad():
        m[0].bias[1] = float("inf")
        m[1].running_var[2] = float("nan")
    assert non_finite_tensors(m) == ["0.bias", "1.running_var"]
