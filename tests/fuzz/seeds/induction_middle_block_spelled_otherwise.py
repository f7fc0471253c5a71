# fuzz-seed: subject=program:stacked_blocks world_size=4 dtype=float64 operator=collective_spelling intent=variant found=new_example
# the third of four equal blocks sums the partials by all_gather + sum instead of all_reduce: correct; the other
# blocks are carried by induction, this one is walked and must not be refuted
import torch
import torch.distributed as dist
import torch.nn.functional as F
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"), (2, "float32"))
INT_DOMAIN = "ids"


def sequential(x, *ws):
    for i in range(0, len(ws), 3):
        w1, w2, g = ws[i:i + 3]
        h = F.gelu(F.layer_norm(x, (x.shape[-1],), weight=g) @ w1)
        x = x + h @ w2
    return x


def distributed(x, w1a, w2a, ga, w1b, w2b, gb, w1c, w2c, gc, w1d, w2d, gd):
    # four tensor-parallel blocks written out one by one (column-parallel w1, row-parallel w2)
    h = F.gelu(F.layer_norm(x, (x.shape[-1],), weight=ga) @ w1a)
    y = h @ w2a
    dist.all_reduce(y)
    x = x + y
    h = F.gelu(F.layer_norm(x, (x.shape[-1],), weight=gb) @ w1b)
    y = h @ w2b
    dist.all_reduce(y)
    x = x + y
    h = F.gelu(F.layer_norm(x, (x.shape[-1],), weight=gc) @ w1c)
    y = h @ w2c
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    x = x + torch.stack(parts).sum(0)
    h = F.gelu(F.layer_norm(x, (x.shape[-1],), weight=gd) @ w1d)
    y = h @ w2d
    dist.all_reduce(y)
    x = x + y
    return x


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, generator=g, dtype=dtype)
    ws, placements = [], [gg.Replicate()]
    for _ in range(4):
        ws += [torch.randn(8, 16, generator=g, dtype=dtype) * 0.35, torch.randn(16, 8, generator=g, dtype=dtype) * 0.25,
               1.0 + 0.1 * torch.randn(8, generator=g, dtype=dtype)]
        placements += [gg.Shard(1), gg.Shard(0), gg.Replicate()]
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[x, *ws], placements=placements,
                      world_size=world_size, expect=[gg.Replicate()])
