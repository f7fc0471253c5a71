# fuzz-seed: subject=program:layernorm_gather world_size=2 dtype=float64 operator=scalar intent=wrong found=false_proof
# scalar 1:+1 at line 18 of the specialized source; verdict then: proved; ground truth: RuntimeError: rank 0 failed: RuntimeError('ProcessGroupGloo::allgather: invalid tensor size at index 0 (expected (4, 2, 6), got (4, 6))')
import torch
import torch.distributed as dist
import torch.nn.functional as F
import gg_notebook as gg
MUTABLE = ('distributed',)
CONFIGS = ((2, 'float64'), (4, 'float64'), (2, 'float32'))
INT_DOMAIN = 'ids'

def sequential(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias)

def distributed(x, weight, bias):
    world = dist.get_world_size()
    h = F.layer_norm(x, (x.shape[-1],), weight, bias)
    full = torch.empty((h.shape[0] * world, *h.shape[2:]), dtype=h.dtype)
    dist.all_gather_into_tensor(full, h.contiguous())
    return full

def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 2, 6, generator=g, dtype=dtype)
    weight = 1 + 0.1 * torch.randn(6, generator=g, dtype=dtype)
    bias = 0.1 * torch.randn(6, generator=g, dtype=dtype)
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[x, weight, bias], placements=[gg.Shard(0), gg.Replicate(), gg.Replicate()], world_size=world_size, expect=[gg.Replicate()])
