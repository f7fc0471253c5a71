# fuzz-seed: subject=program:int_scaled_sum world_size=2 dtype=int64 operator=move_collective intent=wrong found=false_proof
# move_collective two later at line 17 of the specialized source; verdict then: proved; ground truth: output 0 on rank 0: integer values differ
import torch
import torch.distributed as dist
import gg_notebook as gg
MUTABLE = ('distributed',)
CONFIGS = ((2, 'int64'), (4, 'int64'), (2, 'int32'))
INT_DOMAIN = 'ids'

def sequential(counts):
    total = counts.sum(dim=0)
    return total * 2 + 1

def distributed(counts):
    total = counts.sum(dim=0)
    total = total * 2
    total = total + 1
    dist.all_reduce(total)
    return total

def make(world_size=2, dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(-5, 6, (8, 3), generator=g, dtype=dtype)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[counts], placements=[gg.Shard(0)], world_size=world_size, expect=[gg.Replicate()])
