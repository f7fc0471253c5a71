import torch
import torch.distributed as dist
import torch.nn.functional as F
import gg_notebook as gg

MUTABLE = ("distributed",)
CONFIGS = ((2, "float64"), (4, "float64"), (2, "float32"))
INT_DOMAIN = "ids"

EPS = 1e-6


def sequential(x, wn, wg, wu, wd):
    h = F.rms_norm(x, (x.shape[-1],), wn, eps=EPS)
    return x + (F.silu(h @ wg) * (h @ wu)) @ wd


def distributed(x, wn, wg, wu, wd):
    # RMSNorm on this rank's sequence shard, written with sqrt and a division
    world = dist.get_world_size()
    ms = (x * x).mean(dim=-1, keepdim=True)
    h = wn * (x / torch.sqrt(ms + EPS))
    full = torch.empty((h.shape[0] * world, *h.shape[1:]), dtype=h.dtype)
    dist.all_gather_into_tensor(full, h.contiguous())
    # SwiGLU on this rank's ffn columns, the gate written as g / (1 + exp(-g))
    g = full @ wg
    act = g / (1.0 + torch.exp(-g)) * (full @ wu)
    y = act @ wd
    out = torch.empty_like(x)
    dist.reduce_scatter_tensor(out, y.contiguous())
    return x + out


def make(world_size=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, b, hid, ff = 8, 2, 8, 16
    x = torch.randn(s, b, hid, generator=g, dtype=dtype)
    wn = 1 + 0.1 * torch.randn(hid, generator=g, dtype=dtype)
    wg = torch.randn(hid, ff, generator=g, dtype=dtype) / 3
    wu = torch.randn(hid, ff, generator=g, dtype=dtype) / 3
    wd = torch.randn(ff, hid, generator=g, dtype=dtype) / 4
    return gg.Problem(sequential=sequential, distributed=distributed, inputs=[x, wn, wg, wu, wd],
                      placements=[gg.Shard(0), gg.Replicate(), gg.Shard(1), gg.Shard(1), gg.Shard(0)],
                      world_size=world_size, expect=[gg.Shard(0)])
