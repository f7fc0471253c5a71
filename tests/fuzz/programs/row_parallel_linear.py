import torch
import torch.distributed as dist
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"), (2, "float32"))
INT_DOMAIN = "ids"


def sequential(x, w, b):
    return x @ w + b


def distributed(x, w, b):
    y = x @ w  # this rank's partial sum
    dist.all_reduce(y)
    return y + b


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, generator=g, dtype=dtype)
    w = torch.randn(8, 6, generator=g, dtype=dtype)
    b = torch.randn(6, generator=g, dtype=dtype)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[x, w, b],
                      placements=[gg.Shard(1), gg.Shard(0), gg.Replicate()], world_size=world_size,
                      expect=[gg.Replicate()])
