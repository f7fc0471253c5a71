import torch
import torch.distributed as dist
import torch.nn.functional as F
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"))
INT_DOMAIN = "targets"


def sequential(logits, target):
    return F.cross_entropy(logits, target, reduction="none")  # ignore_index=-100 by default


def distributed(logits, target):
    part = logits.shape[-1]
    start = dist.get_rank() * part
    end = start + part
    row_max = torch.max(logits, dim=-1)[0]
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    shifted = logits - row_max.unsqueeze(dim=-1)
    foreign = (target < start) | (target >= end)
    local_target = target.clone() - start
    local_target[foreign] = 0
    rows = torch.arange(start=0, end=shifted.size(0))
    picked = shifted[rows, local_target].clone()
    picked[foreign] = 0.0
    dist.all_reduce(picked)
    sum_exp = torch.exp(shifted).sum(dim=-1)
    dist.all_reduce(sum_exp)
    loss = torch.log(sum_exp) - picked
    return torch.where(target == -100, torch.zeros_like(loss), loss)  # ignored tokens cost nothing


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 8, generator=g, dtype=dtype) * 2
    target = torch.randint(0, 8, (6,), generator=g)
    target[2] = -100
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[logits, target],
                      placements=[gg.Shard(1), gg.Replicate()], world_size=world_size, expect=[gg.Replicate()])
