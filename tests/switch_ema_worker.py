"""One process of a two-process gloo group for tests/test_ema_variants.py: Switch EMA under DDP. Kept apart from
the test module so that the spawned processes import only torch and utils.ema."""
import torch
import torch.distributed as dist
import torch.nn as nn

from utils.ema import ModelEMA
from utils.switch_ema import switch_to_average


def switch_in_a_process_group(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # the replicas start apart: only the broadcast can make them equal
        model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
        ema = None
        if rank == 0:  # as in train.py, only rank 0 holds the EMA
            ema = ModelEMA(model, decay=0.5, schedule="constant")
            with torch.no_grad():
                ema.ema[0].weight.fill_(7.0)
                ema.ema[1].running_var.fill_(3.0)
        switch_to_average(model, ema, distributed=True)
        torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
