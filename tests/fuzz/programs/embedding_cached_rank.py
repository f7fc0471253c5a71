import torch
import torch.distributed as dist
import torch.nn.functional as F
import gg_notebook as gg

MUTABLE = ("distributed", "my_rank")
CONFIGS = ((2, "float64"), (4, "float64"))
INT_DOMAIN = "ids"
# correct on real processes; its mutants would all inherit the verdict on the baseline, so only it runs
BASELINE_ONLY = True

_RANK = None


def my_rank():
    """This process's rank, looked up once (a common micro-optimisation in training loops)."""
    global _RANK
    if _RANK is None:
        _RANK = dist.get_rank()
    return _RANK


def sequential(ids, weight):
    return F.embedding(ids, weight)


def distributed(ids, weight):
    part = weight.shape[0]
    start = my_rank() * part
    mask = (ids < start) | (ids >= start + part)
    local = ids.clone() - start
    local[mask] = 0
    out = F.embedding(local, weight)
    out[mask, :] = 0.0
    dist.all_reduce(out)
    return out


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8, (2, 5), generator=g)
    weight = torch.randn(8, 3, generator=g, dtype=dtype)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[ids, weight],
                      placements=[gg.Replicate(), gg.Shard(0)], world_size=world_size, expect=[gg.Replicate()])
