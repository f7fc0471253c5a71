import torch
import torch.distributed as dist
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"), (2, "float32"))
INT_DOMAIN = "ids"


def sequential(logits):
    return torch.softmax(logits, dim=-1)


def distributed(logits):
    row_max = logits.max(dim=-1, keepdim=True).values
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    e = torch.exp(logits - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    dist.all_reduce(denom)
    return e / denom


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 8, generator=g, dtype=dtype) * 3
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[logits],
                      placements=[gg.Shard(-1)], world_size=world_size, expect=[gg.Shard(-1)])
