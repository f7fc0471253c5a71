import torch
import torch.distributed as dist
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"), (2, "float32"))
INT_DOMAIN = "ids"


def sequential(x, w):
    return (x @ w).to(torch.bfloat16)


def distributed(x, w):
    y = x @ w
    dist.all_reduce(y)  # reduce in full precision, then round once
    y = y.to(torch.bfloat16)
    return y


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, generator=g, dtype=dtype)
    w = torch.randn(8, 4, generator=g, dtype=dtype)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[x, w],
                      placements=[gg.Shard(1), gg.Shard(0)], world_size=world_size, expect=[gg.Replicate()])
