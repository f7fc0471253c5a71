import torch
import torch.distributed as dist
import torch.nn.functional as F
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"), (2, "float32"))
INT_DOMAIN = "ids"


def sequential(x, w1, w2):
    return F.gelu(x @ w1.t()) @ w2.t()


def distributed(x, w1, w2):
    # ZeRO-3 by hand: each weight is gathered into a buffer's chunks and swapped in through .data,
    # used, and the local shard is put back
    world = dist.get_world_size()
    shards = []
    for p in (w1, w2):
        shards.append(p.data)
        buf = torch.empty((p.shape[0] * world, *p.shape[1:]), dtype=p.dtype)
        dist.all_gather(list(buf.chunk(world)), p.data)
        p.data = buf
    y = F.gelu(x @ w1.t()) @ w2.t()
    w1.data, w2.data = shards
    return y


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 8, generator=g, dtype=dtype)
    w1 = torch.randn(8, 8, generator=g, dtype=dtype)
    w2 = torch.randn(4, 8, generator=g, dtype=dtype)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[x, w1, w2],
                      placements=[gg.Replicate(), gg.Shard(0), gg.Shard(0)], world_size=world_size,
                      expect=[gg.Replicate()])
