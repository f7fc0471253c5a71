import torch
import torch.distributed as dist
import torch.nn.functional as F
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"))
INT_DOMAIN = "targets"


def sequential(logits, target):
    return F.cross_entropy(logits, target)  # mean over the targets != -100: 0/0 = NaN if none is kept


def distributed(logits, target):
    part = logits.shape[-1]
    start = dist.get_rank() * part
    end = start + part
    lse_local = torch.logsumexp(logits, dim=-1)
    lses = [torch.empty_like(lse_local) for _ in range(dist.get_world_size())]
    dist.all_gather(lses, lse_local)
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    mine = (target >= start) & (target < end)
    idx = (target - start).clamp(0, part - 1)
    tgt = logits.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * mine
    dist.all_reduce(tgt)
    valid = target.ne(-100)
    loss = torch.where(valid, lse - tgt, torch.zeros_like(lse))
    return loss.sum() / valid.sum().clamp(min=1)  # 0, not NaN, when every target is ignored: "assumed"


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 8, generator=g, dtype=dtype) * 2
    target = torch.randint(0, 8, (6,), generator=g)
    target[2] = -100
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[logits, target],
                      placements=[gg.Shard(1), gg.Replicate()], world_size=world_size, expect=[gg.Replicate()])
