import torch
import torch.distributed as dist
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"), (2, "float32"))
INT_DOMAIN = "ids"


def sequential(x):
    return x.mean(dim=-1) + 1.0


def distributed(x):
    total = x.sum(dim=-1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    n = x.shape[-1] * dist.get_world_size()
    mean = total / n
    mean = mean + 1.0
    return mean


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 8, generator=g, dtype=dtype)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[x],
                      placements=[gg.Shard(1)], world_size=world_size, expect=[gg.Replicate()])
