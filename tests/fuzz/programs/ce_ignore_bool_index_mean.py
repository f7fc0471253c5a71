import torch
import torch.distributed as dist
import torch.nn.functional as F
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"))
INT_DOMAIN = "targets"


def sequential(logits, target):
    return F.cross_entropy(logits, target)  # mean over the targets != -100


def distributed(logits, target):
    part = logits.shape[-1]
    start = dist.get_rank() * part
    row_max = logits.amax(dim=-1, keepdim=True)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    shifted = logits - row_max
    sum_exp = shifted.exp().sum(dim=-1, keepdim=True)
    dist.all_reduce(sum_exp)
    log_probs = shifted - sum_exp.log()
    local = target - start
    outside = (local < 0) | (local >= part)
    local = torch.where(outside, torch.zeros_like(local), local)
    picked = torch.gather(log_probs, -1, local.unsqueeze(-1)).squeeze(-1)
    picked = torch.where(outside, torch.zeros_like(picked), picked)
    dist.all_reduce(picked)
    valid = target != -100
    return (-picked)[valid].mean()  # a boolean-mask selection, reduced at once


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 8, generator=g, dtype=dtype) * 2
    target = torch.randint(0, 8, (6,), generator=g)
    target[2] = -100
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[logits, target],
                      placements=[gg.Shard(1), gg.Replicate()], world_size=world_size, expect=[gg.Replicate()])
