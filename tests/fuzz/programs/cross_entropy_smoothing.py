import torch
import torch.distributed as dist
import torch.nn.functional as F
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"))
INT_DOMAIN = "targets"


def sequential(logits, target):
    return F.cross_entropy(logits, target, reduction="sum", label_smoothing=0.1)


def distributed(logits, target):
    # batch-parallel loss: every rank owns some rows, the summed loss is reduced over ranks
    loss = F.cross_entropy(logits, target, reduction="sum", label_smoothing=0.1)
    dist.all_reduce(loss)
    return loss


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 5, generator=g, dtype=dtype)
    target = torch.randint(0, 5, (8,), generator=g)
    target[0] = -100
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[logits, target],
                      placements=[gg.Shard(0), gg.Shard(0)], world_size=world_size, expect=[gg.Replicate()])
