"""Head-parallel causal self-attention with a fused QKV weight stored as ``[wq | wk | wv]``.

The checkpoint keeps one ``[hidden, 3*hidden]`` weight with the Q, K and V blocks side by side. Each
rank receives its heads' columns of each block, concatenated (a custom ``Layout``), computes its fused
projection with a single matmul and splits it into thirds. Output projection is row-parallel with an
all-reduce, as in ``attention``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard

from gg_notebook.problem import Layout, Problem

from ._common import check_bug, randn, seeded
from ._types import Bug, Example


def fused_qkv_attention(x, wqkv, wo, bo, *, num_heads):
    """Single-device causal self-attention with a fused ``[wq | wk | wv]`` projection."""
    B, S, H = x.shape
    D = H // num_heads
    q, k, v = (x @ wqkv).split(H, dim=-1)
    q = q.reshape(B, S, num_heads, D).transpose(1, 2)
    k = k.reshape(B, S, num_heads, D).transpose(1, 2)
    v = v.reshape(B, S, num_heads, D).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-2, -1))  # gg: scores
    scores = scores / math.sqrt(D)
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    ctx = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, H)
    return ctx @ wo + bo  # gg: output_bias


def qkv_column_shard(wqkv, rank, world_size):
    """Rank ``rank``'s fused weight: its columns of the Q, K and V blocks, concatenated."""
    return torch.cat([block.chunk(world_size, dim=1)[rank] for block in wqkv.chunk(3, dim=1)], dim=1)


def fused_qkv_attention_tp(x, wqkv, wo, bo, *, num_heads, bug=None):
    """One rank of head-parallel attention with a fused, column-parallel QKV projection.

    wqkv: [hidden, 3*hidden/W] = [wq_r | wk_r | wv_r]; wo: [hidden/W, hidden]; x, bo replicated.
    """
    world_size = dist.get_world_size()
    B, S, _ = x.shape
    heads = num_heads // world_size
    qkv = x @ wqkv  # [B, S, 3 * hidden/W]
    if bug == "interleaved_qkv_split":
        # Megatron's own checkpoint layout interleaves q, k, v per head: [heads, 3 * head_dim]
        qkv = qkv.view(B, S, heads, 3 * (qkv.shape[-1] // (3 * heads)))
        q, k, v = qkv.chunk(3, dim=-1)
        q, k, v = (t.reshape(B, S, -1) for t in (q, k, v))
    else:
        q, k, v = qkv.chunk(3, dim=-1)
    D = q.shape[-1] // heads
    q = q.reshape(B, S, heads, D).transpose(1, 2)
    k = k.reshape(B, S, heads, D).transpose(1, 2)
    v = v.reshape(B, S, heads, D).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D)
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    ctx = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, heads * D)
    out = ctx @ wo
    if bug != "missing_allreduce":
        dist.all_reduce(out)
    return out + bo


BUGS = {
    b.name: b
    for b in (
        Bug("interleaved_qkv_split",
            "The rank splits its fused projection with Megatron's per-head interleaved layout "
            "([heads, 3*head_dim]) although the weight is stored as [wq | wk | wv] blocks, so queries "
            "and keys mix columns of q, k and v (visible once a rank holds 2+ heads).",
            "aten.bmm", "scores"),
        Bug("missing_allreduce",
            "The row-parallel output projection is not all-reduced before the bias.",
            "aten.add", "output_bias"),
    )
}


def make(world_size: int = 2, bug: str | None = None, *, batch: int = 2, seq: int = 8, hidden: int = 32,
         heads: int = 8, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("attention_fused_qkv", bug, BUGS)
    g = seeded(seed)
    x = randn(g, batch, seq, hidden, dtype=dtype, device=device)
    wqkv = randn(g, hidden, 3 * hidden, dtype=dtype, device=device, scale=hidden ** -0.5)
    wo = randn(g, hidden, hidden, dtype=dtype, device=device, scale=hidden ** -0.5)
    bo = randn(g, hidden, dtype=dtype, device=device, scale=0.1)
    return Problem(
        sequential=functools.partial(fused_qkv_attention, num_heads=heads),
        distributed=functools.partial(fused_qkv_attention_tp, num_heads=heads, bug=bug),
        inputs=(x, wqkv, wo, bo),
        placements=(Replicate(), Layout(qkv_column_shard, "qkv_column_shard"), Shard(0), Replicate()),
        world_size=world_size,
        expect=(Replicate(),),
        name="attention_fused_qkv" if bug is None else f"attention_fused_qkv[{bug}]",
        input_names=("x", "wqkv", "wo", "bo"),
    )


EXAMPLES = [
    Example("attention_fused_qkv", "Head-parallel attention whose fused [wq|wk|wv] weight is sharded "
            "with a custom Layout (each rank: its columns of every block).", make, BUGS),
]
