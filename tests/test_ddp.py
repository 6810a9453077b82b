"""Two-process DDP training on CPU (gloo) through torchrun, to completion; the GPU each CUDA process takes."""
import subprocess
import sys

import torch

from tests.train_helpers import ROOT, make_dataset, tiny_model_yaml, tiny_run_args, train_env


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
