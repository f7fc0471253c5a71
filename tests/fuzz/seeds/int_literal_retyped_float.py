# fuzz-seed: subject=program:int_token_count world_size=2 dtype=int64 operator=scalar intent=wrong found=false_proof
# scalar 1:int->float at line 17 of the specialized source; verdict then: proved; ground truth: output 0 on rank 0: dtype torch.float32 != torch.int64
import torch
import torch.distributed as dist
import gg_notebook as gg
MUTABLE = ('distributed',)
CONFIGS = ((2, 'int64'), (4, 'int64'))
INT_DOMAIN = 'ids'

def sequential(ids):
    return torch.div(ids * 3, 2, rounding_mode='floor').sum() + 1

def distributed(ids):
    local = torch.div(ids * 3, 2, rounding_mode='floor').sum()
    dist.all_reduce(local)
    return local + 1.0

def make(world_size=2, dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-20, 20, (8,), generator=g, dtype=torch.int64)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[ids], placements=[gg.Shard(0)], world_size=world_size, expect=[gg.Replicate()])
