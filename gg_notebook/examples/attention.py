"""Head-parallel causal self-attention (Megatron ParallelAttention without the fused kernels).

Q, K and V projections are column-parallel (each rank owns ``num_heads / W`` whole heads), the
attention itself is computed head by head with no communication, and the output projection is
row-parallel: its partial sums are all-reduced and the replicated bias is added once.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard

from gg_notebook.problem import Problem

from ._common import check_bug, randn, seeded
from ._types import Bug, Example


def attention(x, wq, wk, wv, wo, bo, *, num_heads):
    """Single-device causal multi-head self-attention; x: [batch, seq, hidden]."""
    B, S, H = x.shape
    D = H // num_heads
    q = (x @ wq).view(B, S, num_heads, D).transpose(1, 2)  # [B, heads, S, D]
    k = (x @ wk).view(B, S, num_heads, D).transpose(1, 2)
    v = (x @ wv).view(B, S, num_heads, D).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-2, -1))  # gg: scores
    scores = scores * (1.0 / math.sqrt(D))  # gg: scale
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    ctx = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, H)
    out = ctx @ wo
    return out + bo  # gg: output_bias


def attention_tp(x, wq, wk, wv, wo, bo, *, num_heads, bug=None):
    """One rank of head-parallel attention.

    x: [batch, seq, hidden] replicated; wq/wk/wv: [hidden, hidden/W] (column-parallel, this rank's
    heads); wo: [hidden/W, hidden] (row-parallel); bo: [hidden] replicated.
    """
    world_size = dist.get_world_size()
    B, S, _ = x.shape
    if bug == "global_head_count":
        heads = num_heads
    else:
        heads = num_heads // world_size
    q = x @ wq
    k = x @ wk
    v = x @ wv
    D = q.shape[-1] // heads
    q = q.view(B, S, heads, D).transpose(1, 2)
    k = k.view(B, S, heads, D).transpose(1, 2)
    v = v.view(B, S, heads, D).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-2, -1))
    if bug != "missing_scale":
        scores = scores * (1.0 / math.sqrt(D))
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    ctx = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, heads * D)
    out = ctx @ wo  # partial sum over this rank's heads
    if bug != "missing_allreduce":
        dist.all_reduce(out)
    return out + bo


BUGS = {
    b.name: b
    for b in (
        Bug("global_head_count",
            "Each rank reshapes its hidden/W projection with the global number of heads (instead of "
            "num_heads / world_size): heads get a smaller head dim and the softmax scale changes.",
            "aten.bmm", "scores"),
        Bug("missing_scale",
            "The 1/sqrt(head_dim) softmax scale is dropped (e.g. when swapping in a custom kernel).",
            "aten.mul", "scale"),
        Bug("missing_allreduce",
            "The row-parallel output projection is not all-reduced before the bias.",
            "aten.add", "output_bias"),
    )
}


def make(world_size: int = 2, bug: str | None = None, *, batch: int = 2, seq: int = 8, hidden: int = 16,
         heads: int = 4, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("attention", bug, BUGS)
    g = seeded(seed)
    x = randn(g, batch, seq, hidden, dtype=dtype, device=device)
    wq, wk, wv, wo = (randn(g, hidden, hidden, dtype=dtype, device=device, scale=hidden ** -0.5)
                      for _ in range(4))
    bo = randn(g, hidden, dtype=dtype, device=device, scale=0.1)
    return Problem(
        sequential=functools.partial(attention, num_heads=heads),
        distributed=functools.partial(attention_tp, num_heads=heads, bug=bug),
        inputs=(x, wq, wk, wv, wo, bo),
        placements=(Replicate(), Shard(1), Shard(1), Shard(1), Shard(0), Replicate()),
        world_size=world_size,
        expect=(Replicate(),),
        name="attention" if bug is None else f"attention[{bug}]",
        input_names=("x", "wq", "wk", "wv", "wo", "bo"),
    )


EXAMPLES = [
    Example("attention", "Head-parallel causal self-attention: column-parallel Q/K/V, local heads, "
            "row-parallel output projection + all-reduce.", make, BUGS),
]
