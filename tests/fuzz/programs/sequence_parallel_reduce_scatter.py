import torch
import torch.distributed as dist
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"), (2, "float32"))
INT_DOMAIN = "ids"


def sequential(x, w):
    return torch.relu(x) @ w


def distributed(x, w):
    world = dist.get_world_size()
    y = torch.relu(x) @ w  # partial sums over this rank's hidden slice, full sequence
    out = torch.empty(y.shape[0] // world, y.shape[1], dtype=y.dtype)
    dist.reduce_scatter_tensor(out, y.contiguous())
    return out


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 8, generator=g, dtype=dtype)
    w = torch.randn(8, 3, generator=g, dtype=dtype)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[x, w],
                      placements=[gg.Shard(1), gg.Shard(0)], world_size=world_size, expect=[gg.Shard(0)])
