"""A GPT-style pre-LN transformer block with Megatron tensor parallelism, forward and forward+backward.

``x -> LN -> head-parallel attention -> + x -> LN -> TP MLP -> +``. Every tensor-parallel region is
entered through ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of the input
gradient backward) and left through ``reduce_from_tensor_model_parallel_region`` (all-reduce
forward, identity backward), as in Megatron-LM; LayerNorms and residuals are replicated. The
forward+backward example returns the output and the gradients of the block input and of every
parameter: sharded weights get sharded gradients, replicated parameters replicated ones.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard

from gg_notebook.problem import Problem

from ._common import check_bug, randn, seeded
from ._tp import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region
from ._types import Bug, Example

PARAM_NAMES = ("ln1_w", "ln1_b", "wq", "wk", "wv", "wo", "bo", "ln2_w", "ln2_b", "w1", "b1", "w2", "b2")
# How each parameter is split across the tensor-parallel ranks (and so how its gradient is).
PARAM_PLACEMENTS = (Replicate(), Replicate(), Shard(1), Shard(1), Shard(1), Shard(0), Replicate(),
                    Replicate(), Replicate(), Shard(1), Shard(0), Shard(0), Replicate())


def gpt_block(x, ln1_w, ln1_b, wq, wk, wv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2, *, num_heads):
    """Single-device pre-LN GPT block; x: [batch, seq, hidden]."""
    B, S, H = x.shape
    D = H // num_heads
    h = F.layer_norm(x, (H,), ln1_w, ln1_b)
    q = (h @ wq).view(B, S, num_heads, D).transpose(1, 2)
    k = (h @ wk).view(B, S, num_heads, D).transpose(1, 2)
    v = (h @ wv).view(B, S, num_heads, D).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D)
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    ctx = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, H)
    x = x + (ctx @ wo + bo)  # gg: attn_out_bias
    h = F.layer_norm(x, (H,), ln2_w, ln2_b)  # gg: ln2
    h = F.gelu(h @ w1 + b1)
    return x + (h @ w2 + b2)


def parallel_attention(h, wq, wk, wv, wo, bo, *, num_heads, bug=None):
    """Head-parallel causal attention of a replicated input; returns the replicated output (with bias)."""
    world_size = dist.get_world_size()
    B, S, _ = h.shape
    heads = num_heads // world_size
    h = copy_to_tensor_model_parallel_region(h)
    q, k, v = h @ wq, h @ wk, h @ wv
    D = q.shape[-1] // heads
    q = q.view(B, S, heads, D).transpose(1, 2)
    k = k.view(B, S, heads, D).transpose(1, 2)
    v = v.view(B, S, heads, D).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D)
    causal = torch.ones(S, S, dtype=torch.bool, device=h.device).triu(1)
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    ctx = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, heads * D)
    out = ctx @ wo
    if bug != "missing_allreduce":
        out = reduce_from_tensor_model_parallel_region(out)
    return out + bo


def parallel_mlp(h, w1, b1, w2, b2, *, bug=None):
    """Column-parallel -> GeLU -> row-parallel MLP of a replicated input; returns the replicated output."""
    if bug != "unreduced_replicated_grad":
        h = copy_to_tensor_model_parallel_region(h)
    # with the bug the input is used as is: identical in forward, but the gradient that flows back
    # to the replicated LayerNorm is only this rank's partial sum
    h = F.gelu(h @ w1 + b1)
    out = reduce_from_tensor_model_parallel_region(h @ w2)
    return out + b2


def gpt_block_tp(x, ln1_w, ln1_b, wq, wk, wv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2, *, num_heads, bug=None):
    """One rank of a tensor-parallel GPT block (Megatron): x, LayerNorms, bo and b2 replicated;
    wq/wk/wv/w1 [.., ../W] column-parallel, b1 [ffn/W], wo/w2 [../W, hidden] row-parallel."""
    H = x.shape[-1]
    h = F.layer_norm(x, (H,), ln1_w, ln1_b)
    x = x + parallel_attention(h, wq, wk, wv, wo, bo, num_heads=num_heads, bug=bug)
    h = F.layer_norm(x, (H,), ln2_w, ln2_b)
    return x + parallel_mlp(h, w1, b1, w2, b2, bug=bug)


def gpt_block_fwd_bwd(x, ln1_w, ln1_b, wq, wk, wv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2, dout, *, num_heads):
    """Single-device forward and backward: ``(out, d x, d ln1_w, ..., d b2)`` for ``loss = (out * dout).sum()``."""
    params = (x, ln1_w, ln1_b, wq, wk, wv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2)
    out = gpt_block(*params, num_heads=num_heads)
    loss = (out * dout).sum()
    return (out, *torch.autograd.grad(loss, params))


def gpt_block_fwd_bwd_tp(x, ln1_w, ln1_b, wq, wk, wv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2, dout, *,
                         num_heads, bug=None):
    """One rank's forward and backward of the tensor-parallel block: output and local gradients."""
    params = (x, ln1_w, ln1_b, wq, wk, wv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2)
    out = gpt_block_tp(*params, num_heads=num_heads, bug=bug)
    loss = (out * dout).sum()
    return (out, *torch.autograd.grad(loss, params))


FWD_BUGS = {
    b.name: b
    for b in (
        Bug("missing_allreduce",
            "The attention's row-parallel output projection is not all-reduced (the "
            "reduce_from_tensor_model_parallel_region call is missing) before the bias and residual.",
            "aten.add", "attn_out_bias"),
    )
}
FWD_BWD_BUGS = {
    **FWD_BUGS,
    **{
        b.name: b
        for b in (
            Bug("unreduced_replicated_grad",
                "The MLP input skips copy_to_tensor_model_parallel_region (it is the identity in "
                "forward, so the output is right) and the input gradient of the column-parallel "
                "matmul is never all-reduced: the replicated LayerNorm-2 and everything before it "
                "receive only this rank's partial gradient. LayerNorm backward is linear in its "
                "incoming gradient, so the partial sum survives it; the first operator that cannot "
                "be related is the accumulation of that partial gradient with the replicated "
                "residual gradient (attributed to the ln2 line).",
                "aten.add", "ln2"),
        )
    },
}


def _inputs(world_size, *, batch, seq, hidden, heads, ffn, seed, dtype, device, requires_grad):
    g = seeded(seed)
    rg = requires_grad
    x = randn(g, batch, seq, hidden, dtype=dtype, device=device, requires_grad=rg)
    s_h, s_f = hidden ** -0.5, ffn ** -0.5
    params = (
        1.0 + randn(g, hidden, dtype=dtype, device=device, scale=0.1),
        randn(g, hidden, dtype=dtype, device=device, scale=0.1),
        randn(g, hidden, hidden, dtype=dtype, device=device, scale=s_h),
        randn(g, hidden, hidden, dtype=dtype, device=device, scale=s_h),
        randn(g, hidden, hidden, dtype=dtype, device=device, scale=s_h),
        randn(g, hidden, hidden, dtype=dtype, device=device, scale=s_h),
        randn(g, hidden, dtype=dtype, device=device, scale=0.1),
        1.0 + randn(g, hidden, dtype=dtype, device=device, scale=0.1),
        randn(g, hidden, dtype=dtype, device=device, scale=0.1),
        randn(g, hidden, ffn, dtype=dtype, device=device, scale=s_h),
        randn(g, ffn, dtype=dtype, device=device, scale=0.1),
        randn(g, ffn, hidden, dtype=dtype, device=device, scale=s_f),
        randn(g, hidden, dtype=dtype, device=device, scale=0.1),
    )
    params = tuple(p.detach().requires_grad_(rg) for p in params)
    return (x, *params), g


def make(world_size: int = 2, bug: str | None = None, *, batch: int = 2, seq: int = 8, hidden: int = 16,
         heads: int = 4, ffn: int = 64, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("gpt_block", bug, FWD_BUGS)
    inputs, _ = _inputs(world_size, batch=batch, seq=seq, hidden=hidden, heads=heads, ffn=ffn, seed=seed,
                        dtype=dtype, device=device, requires_grad=False)
    return Problem(
        sequential=functools.partial(gpt_block, num_heads=heads),
        distributed=functools.partial(gpt_block_tp, num_heads=heads, bug=bug),
        inputs=inputs,
        placements=(Replicate(), *PARAM_PLACEMENTS),
        world_size=world_size,
        expect=(Replicate(),),
        name="gpt_block" if bug is None else f"gpt_block[{bug}]",
        input_names=("x", *PARAM_NAMES),
    )


def make_fwd_bwd(world_size: int = 2, bug: str | None = None, *, batch: int = 2, seq: int = 8,
                 hidden: int = 16, heads: int = 4, ffn: int = 64, seed: int = 0, dtype=torch.float64,
                 device="cpu") -> Problem:
    check_bug("gpt_block_fwd_bwd", bug, FWD_BWD_BUGS)
    inputs, g = _inputs(world_size, batch=batch, seq=seq, hidden=hidden, heads=heads, ffn=ffn, seed=seed,
                        dtype=dtype, device=device, requires_grad=True)
    dout = randn(g, batch, seq, hidden, dtype=dtype, device=device)
    return Problem(
        sequential=functools.partial(gpt_block_fwd_bwd, num_heads=heads),
        distributed=functools.partial(gpt_block_fwd_bwd_tp, num_heads=heads, bug=bug),
        inputs=(*inputs, dout),
        placements=(Replicate(), *PARAM_PLACEMENTS, Replicate()),
        world_size=world_size,
        # output, then d x (replicated) and each parameter's gradient, split like the parameter
        expect=(Replicate(), Replicate(), *PARAM_PLACEMENTS),
        name="gpt_block_fwd_bwd" if bug is None else f"gpt_block_fwd_bwd[{bug}]",
        input_names=("x", *PARAM_NAMES, "dout"),
    )


EXAMPLES = [
    Example("gpt_block", "Megatron tensor-parallel pre-LN GPT block (head-parallel attention, TP MLP, "
            "conjugate copy/reduce regions), forward.", make, FWD_BUGS),
    Example("gpt_block_fwd_bwd", "The tensor-parallel GPT block's forward and backward: output, input "
            "gradient and every parameter's (sharded or replicated) gradient.", make_fwd_bwd, FWD_BWD_BUGS,
            backward=True),
]
