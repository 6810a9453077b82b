"""Two-process DDP training on CPU (gloo) through torchrun: to completion, and stopped with Ctrl-C."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train_helpers import ROOT, make_dataset, tiny_model_yaml, tiny_run_args, train_env
from utils.checkpoint import load_checkpoint


def test_torchrun_two_processes_on_cpu(tmp_path):
    data, cfg = make_dataset(tmp_path / "data", n=12), tiny_model_yaml(tmp_path)
    args = tiny_run_args(data, cfg, tmp_path / "runs", "ddp", 2, "--device", "cpu", "--sync-bn")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *map(str, args)]
    out = subprocess.run(cmd, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=300, cwd=str(ROOT))
    assert out.returncode == 0, out.stdout[-4000:]
    assert "--sync-bn needs CUDA" in out.stdout  # said, not silently ignored

    run = tmp_path / "runs" / "ddp"
    assert sorted(p.name for p in tmp_path.joinpath("runs").iterdir()) == ["ddp"]  # one run folder, not one per rank
    ckpt = torch.load(run / "weights" / "last.pt", weights_only=True)
    assert "resume" not in ckpt and ckpt["epoch"] == 1
    # The global batch is 4 (2 per process), as in one process: 3 iterations per epoch, steps at ni 0-3 and 5.
    assert ckpt["updates"] == 5
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped
    assert all(torch.isfinite(v.float()).all() for v in ckpt["ema"].values())
    rows = (run / "results.csv").read_text().splitlines()
    assert len(rows) == 3  # header + 2 epochs, written by rank 0 only
    assert out.stdout.count("Starting training for 2 epochs") == 1  # rank 0 logs, the other rank is quiet


def test_ctrl_c_under_torchrun_ends_every_rank(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group: torchrun and every rank. All of
    them must end (none left waiting in a collective), rank 0 saying once how to resume."""
    data, cfg = make_dataset(tmp_path / "data", n=12), tiny_model_yaml(tmp_path)
    args = tiny_run_args(data, cfg, tmp_path / "runs", "ddp", 50, "--device", "cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *map(str, args)]
    last = tmp_path / "runs" / "ddp" / "weights" / "last.pt"
    proc = subprocess.Popen(cmd, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(ROOT), start_new_session=True)  # its own process group, as in a terminal
    try:
        deadline = time.time() + 240
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert last.exists(), "the run saved no epoch"
        time.sleep(1.0)  # into the next epoch
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    with pytest.raises(ProcessLookupError):  # nothing of the run is left, neither rank nor dataloader worker
        os.killpg(proc.pid, 0)
    lines = [ln for ln in out.splitlines() if "train: interrupted" in ln]
    assert len(lines) == 1, out[-4000:]
    assert f"continue with: python train.py --resume {last}" in lines[0]
    assert load_checkpoint(last)["epoch"] >= 0


def test_the_process_group_is_bound_to_the_ranks_gpu(monkeypatch):
    """Under NCCL, init_process_group gets device_id (the rank's GPU): without it every barrier warns that the
    device is unknown and guesses one. A CUDA device is stood in for by select_device's answer; gloo gets None."""
    import argparse

    import train

    calls = []
    monkeypatch.setattr(train.dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    procs = train.Processes(rank=0, local_rank=0, world_size=1)
    for device in (torch.device("cuda:0"), torch.device("cpu")):
        monkeypatch.setattr(train, "select_device", lambda *a, _device=device, **k: _device)
        opt = argparse.Namespace(device=str(device), batch_size=2, amp="off")
        assert train.setup_processes(opt, procs) == device
    assert [a for a, _ in calls] == [("nccl",), ("gloo",)]
    assert [k["device_id"] for _, k in calls] == [torch.device("cuda:0"), None]


def test_rank_0s_val_loader_takes_its_share_of_the_cpus(tmp_path, monkeypatch):
    """The val loader is built on rank 0 alone (rank -1 for its sampler), but its workers share the machine with
    every rank's training workers: with 8 CPUs and 2 ranks it gets 8 // 2 = 4 workers of the 2 * 4 asked, as each
    rank's train loader does, not 8."""
    import argparse

    import yaml

    import train
    import utils.dataloaders as dataloaders

    monkeypatch.setattr(dataloaders, "usable_cpus", lambda: 8)
    monkeypatch.setattr(train.dist, "barrier", lambda *a, **k: None)  # main_process_first, without a group
    make_dataset(tmp_path / "data", n=8)
    images = str(tmp_path / "data" / "images" / "train")
    data = {"train": images, "val": images, "nc": 2}
    opt = argparse.Namespace(single_cls=False, cache=None, rect=False, workers=4, seed=0, noval=False)
    hyp = yaml.safe_load((ROOT / "hyp" / "hyp.scratch-low.yaml").read_text())
    procs = train.Processes(rank=0, local_rank=0, world_size=2)
    train_loader, _, val_loader = train.build_loaders(opt, hyp, data, 64, 4, 32, procs, torch.device("cpu"))
    assert train_loader.num_workers == 4 and val_loader.num_workers == 4
