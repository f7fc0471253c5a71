# fuzz-seed: subject=program:scalar_after_reduce world_size=2 dtype=float64 operator=move_collective intent=wrong found=false_proof
# move_collective later at line 16 of the specialized source; verdict then: proved; ground truth: output 0 on rank 0: max abs error 0.5 (scale 2.49)
import torch
import torch.distributed as dist
import gg_notebook as gg
MUTABLE = ('distributed',)
CONFIGS = ((2, 'float64'), (4, 'float64'), (2, 'float32'))
INT_DOMAIN = 'ids'

def sequential(x):
    return (x.sum(0) + 1.0) * 0.5

def distributed(x):
    s = x.sum(0)
    s = s + 1.0
    dist.all_reduce(s)
    s = s * 0.5
    return s

def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=g, dtype=dtype)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[x], placements=[gg.Shard(0)], world_size=world_size, expect=[gg.Replicate()])
