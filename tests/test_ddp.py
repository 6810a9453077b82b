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
