# fuzz-seed: subject=program:cross_entropy_gathered world_size=2 dtype=float64 operator=scalar intent=wrong found=false_proof
# scalar 0:+1 at line 18 of the specialized source; verdict then: proved; ground truth: RuntimeError: rank 0 failed: RuntimeError('ProcessGroupGloo::allgather: invalid tensor size at index 0 (expected (4, 6), got (6, 6))')
import torch
import torch.distributed as dist
import torch.nn.functional as F
import gg_notebook as gg
MUTABLE = ('distributed',)
CONFIGS = ((2, 'float64'), (4, 'float64'), (2, 'float32'))
INT_DOMAIN = 'targets'

def sequential(logits, target):
    return F.cross_entropy(logits, target, ignore_index=-100, reduction='mean')

def distributed(logits, target):
    world = dist.get_world_size()
    local = logits.t().contiguous()
    full_t = torch.empty(local.shape[1] * world, local.shape[1], dtype=local.dtype)
    dist.all_gather_into_tensor(full_t, local)
    return F.cross_entropy(full_t.t(), target, ignore_index=-100, reduction='mean')

def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 8, generator=g, dtype=dtype) * 2
    target = torch.randint(0, 8, (6,), generator=g)
    target[1] = -100
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[logits, target], placements=[gg.Shard(1), gg.Replicate()], world_size=world_size, expect=[gg.Replicate()])
