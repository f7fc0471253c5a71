import torch
import torch.distributed as dist
import torch.nn.functional as F
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"))
INT_DOMAIN = "ids"


def sequential(ids, weight, dout):
    out = F.embedding(ids, weight, scale_grad_by_freq=True)
    (grad,) = torch.autograd.grad((out * dout).sum(), weight)
    return out, grad


def distributed(ids, weight, dout):
    part = weight.shape[0]
    start = dist.get_rank() * part
    foreign = (ids < start) | (ids >= start + part)
    # foreign ids look up an extra all-zero row: they add nothing and do not inflate local counts
    table = torch.cat([weight, torch.zeros(1, weight.shape[1], dtype=weight.dtype)])
    local_ids = (ids - start).masked_fill(foreign, part)
    local_out = F.embedding(local_ids, table, scale_grad_by_freq=True)
    (grad,) = torch.autograd.grad((local_out * dout).sum(), weight)
    out = local_out.detach().clone()
    dist.all_reduce(out)
    return out, grad


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8, (2, 6), generator=g)
    ids[0, :3] = 5  # a repeated id: frequency scaling matters
    weight = torch.randn(8, 3, generator=g, dtype=dtype).requires_grad_()
    dout = torch.randn(2, 6, 3, generator=g, dtype=dtype)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[ids, weight, dout],
                      placements=[gg.Replicate(), gg.Shard(0), gg.Replicate()], world_size=world_size,
                      expect=[gg.Replicate(), gg.Shard(0)])
