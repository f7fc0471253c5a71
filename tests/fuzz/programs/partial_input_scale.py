import torch
import torch.distributed as dist
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"), (2, "float32"))
INT_DOMAIN = "ids"


def sequential(x, w):
    return torch.relu(x * 2 @ w)


def distributed(x, w):
    y = x * 2 @ w  # linear in the partial input: still a partial sum
    dist.all_reduce(y)
    return torch.relu(y)


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, generator=g, dtype=dtype)
    w = torch.randn(4, 5, generator=g, dtype=dtype)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[x, w],
                      placements=[gg.Partial(), gg.Replicate()], world_size=world_size, expect=[gg.Replicate()])
