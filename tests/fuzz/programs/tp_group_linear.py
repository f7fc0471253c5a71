import torch
import torch.distributed as dist
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"))
INT_DOMAIN = "ids"


def sequential(x, w1, w2):
    return torch.tanh(x @ w1) @ w2


def distributed(x, w1, w2):
    # the tensor-parallel group spans every rank here (no data parallelism in this test)
    tp_group = dist.new_group(list(range(dist.get_world_size())))
    h = torch.tanh(x @ w1)
    y = h @ w2
    dist.all_reduce(y, group=tp_group)
    return y


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, generator=g, dtype=dtype)
    w1 = torch.randn(4, 8, generator=g, dtype=dtype)
    w2 = torch.randn(8, 4, generator=g, dtype=dtype)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[x, w1, w2],
                      placements=[gg.Replicate(), gg.Shard(1), gg.Shard(0)], world_size=world_size,
                      expect=[gg.Replicate()])
