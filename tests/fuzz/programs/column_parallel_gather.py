import torch
import torch.distributed as dist
import torch.nn.functional as F
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"), (2, "float32"))
INT_DOMAIN = "ids"


def sequential(x, w):
    return F.gelu(torch.matmul(x, w))


def distributed(x, w):
    world = dist.get_world_size()
    y = F.gelu(torch.matmul(x, w))  # this rank's output columns
    parts = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(parts, y.contiguous())
    return torch.cat(parts, dim=-1)


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, generator=g, dtype=dtype)
    w = torch.randn(8, 8, generator=g, dtype=dtype)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[x, w],
                      placements=[gg.Replicate(), gg.Shard(1)], world_size=world_size,
                      expect=[gg.Replicate()])
