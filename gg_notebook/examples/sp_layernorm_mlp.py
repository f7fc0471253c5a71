"""Sequence parallelism (Megatron-SP): LayerNorm on sequence shards around a tensor-parallel MLP.

The activations [seq, batch, hidden] stay split along the sequence outside the tensor-parallel
region. LayerNorm runs on the local shard, an all-gather along the sequence enters the
column-parallel matmul, and the row-parallel matmul's partial sums leave through a reduce-scatter
back to sequence shards; the replicated output bias is added after the reduce-scatter.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard

from gg_notebook.problem import Problem

from ._common import check_bug, randn, seeded
from ._types import Bug, Example


def layernorm_mlp(x, ln_w, ln_b, w1, b1, w2, b2):
    """Single-device pre-LN MLP: ``gelu(layer_norm(x) @ w1 + b1) @ w2 + b2``; x: [seq, batch, hidden]."""
    h = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b)
    h = F.gelu(h @ w1 + b1)
    y = h @ w2
    return y + b2  # gg: output_bias


def sp_layernorm_mlp(x, ln_w, ln_b, w1, b1, w2, b2, *, bug=None):
    """One rank of a sequence-parallel LayerNorm + tensor-parallel MLP.

    x: [seq/W, batch, hidden] (this rank's sequence shard); ln_w, ln_b, b2 replicated; w1: [hidden, ffn/W];
    b1: [ffn/W]; w2: [ffn/W, hidden]. Returns this rank's sequence shard of the output.
    """
    world_size = dist.get_world_size()
    h = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b)
    total = torch.empty((h.shape[0] * world_size, *h.shape[1:]), dtype=h.dtype, device=h.device)
    dist.all_gather_into_tensor(total, h.contiguous())  # [seq, batch, hidden]
    h = F.gelu(total @ w1 + b1)
    y = h @ w2  # partial sums, full sequence
    if bug == "bias_before_reduce_scatter":
        y = y + b2
    out = torch.empty(x.shape, dtype=y.dtype, device=y.device)
    dist.reduce_scatter_tensor(out, y.contiguous())
    if bug != "bias_before_reduce_scatter":
        out = out + b2
    return out


BUGS = {
    b.name: b
    for b in (
        Bug("bias_before_reduce_scatter",
            "The row-parallel bias is added to the partial sums before the reduce-scatter, so it is "
            "summed world_size times.",
            "aten.add", "output_bias"),
    )
}


def layernorm_mlp_inputs(x_shape, ffn: int, *, seed: int = 0, dtype=torch.float64, device="cpu") -> tuple:
    """Seeded ``(x, ln_w, ln_b, w1, b1, w2, b2)`` for a pre-LN MLP on activations of ``x_shape``."""
    hidden = x_shape[-1]
    g = seeded(seed)
    x = randn(g, *x_shape, dtype=dtype, device=device)
    ln_w = 1.0 + randn(g, hidden, dtype=dtype, device=device, scale=0.1)
    ln_b = randn(g, hidden, dtype=dtype, device=device, scale=0.1)
    w1 = randn(g, hidden, ffn, dtype=dtype, device=device, scale=hidden ** -0.5)
    b1 = randn(g, ffn, dtype=dtype, device=device, scale=0.1)
    w2 = randn(g, ffn, hidden, dtype=dtype, device=device, scale=ffn ** -0.5)
    b2 = randn(g, hidden, dtype=dtype, device=device, scale=0.1)
    return x, ln_w, ln_b, w1, b1, w2, b2


def make(world_size: int = 2, bug: str | None = None, *, batch: int = 2, seq: int = 8, hidden: int = 16,
         ffn: int = 64, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("sp_layernorm_mlp", bug, BUGS)
    return Problem(
        sequential=layernorm_mlp,
        distributed=functools.partial(sp_layernorm_mlp, bug=bug),
        inputs=layernorm_mlp_inputs((seq, batch, hidden), ffn, seed=seed, dtype=dtype, device=device),
        placements=(Shard(0), Replicate(), Replicate(), Shard(1), Shard(0), Shard(0), Replicate()),
        world_size=world_size,
        expect=(Shard(0),),
        name="sp_layernorm_mlp" if bug is None else f"sp_layernorm_mlp[{bug}]",
        input_names=("x", "ln_w", "ln_b", "w1", "b1", "w2", "b2"),
    )


EXAMPLES = [
    Example("sp_layernorm_mlp", "Megatron sequence parallelism: LayerNorm on sequence shards, "
            "all-gather, TP MLP, reduce-scatter back to sequence shards.", make, BUGS),
]
