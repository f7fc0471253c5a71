"""A GPT-style pre-LN transformer block with Megatron tensor parallelism, forward and forward+backward.

``x -> LN -> head-parallel attention -> + x -> LN -> TP MLP -> +``. Every tensor-parallel region is entered
through ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of the input gradient backward)
and left through ``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity backward), as in
Megatron-LM; LayerNorms and residuals are replicated (``sequence_parallel=True``: on sequence blocks, see
``gpt_block_tp``). Forward+backward: the output and every gradient, placed like the input or parameter.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Partial, Replicate, Shard

from gg_notebook.problem import Problem

from ._common import check_bug, randn, seeded
from ._tp import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region
from ._tp import gather_from_sequence_parallel_region, reduce_scatter_to_sequence_parallel_region
from ._types import Bug, Example

PARAM_NAMES = ("ln1_w", "ln1_b", "wq", "wk", "wv", "wo", "bo", "ln2_w", "ln2_b", "w1", "b1", "w2", "b2")
# How each parameter is split across the tensor-parallel ranks (and so how its gradient is).
PARAM_PLACEMENTS = (Replicate(), Replicate(), Shard(1), Shard(1), Shard(1), Shard(0), Replicate(),
                    Replicate(), Replicate(), Shard(1), Shard(0), Shard(0), Replicate())


def gpt_block(x, ln1_w, ln1_b, wq, wk, wv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2, *, num_heads):
    """Single-device pre-LN GPT block; x: [batch, seq, hidden]."""
    B, S, H = x.shape
    D = H // num_heads
    h = F.layer_norm(x, (H,), ln1_w, ln1_b)  # gg: ln1
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


# Under sequence parallelism these replicated parameters act on sequence shards (LayerNorms, and the
# row-parallel biases added after the reduce-scatter), so each rank's gradient is a partial sum over
# its sequence rows (megatron-core marks them ``sequence_parallel`` and all-reduces their gradients
# in ``finalize_model_grads``).
SEQUENCE_PARALLEL_PARAMS = ("ln1_w", "ln1_b", "bo", "ln2_w", "ln2_b", "b2")
# The sequence dimension of the [batch, seq, hidden] activations.
SEQ_DIM = 1


def _enter_tensor_parallel_region(h, *, sequence_parallel, tensor_parallel_output_grad=True):
    """Input of the column-parallel linears: replicated (TP: gradient all-reduced in backward) or,
    under SP, all-gathered along the sequence (gradient reduce-scattered in backward)."""
    if sequence_parallel:
        return gather_from_sequence_parallel_region(h, SEQ_DIM, tensor_parallel_output_grad)
    return copy_to_tensor_model_parallel_region(h)


def _leave_tensor_parallel_region(out, *, sequence_parallel, bug=None):
    """Output of the row-parallel linears (partial sums): all-reduced (TP) or, under SP,
    reduce-scattered to this rank's sequence block."""
    if not sequence_parallel:
        return reduce_from_tensor_model_parallel_region(out)
    if bug == "allreduce_wrong_chunk":
        # hand-written reduce-scatter: all-reduce, then the rank's block of a 1-based rank (index -1
        # silently picks the last block on rank 0)
        out = reduce_from_tensor_model_parallel_region(out)
        return out.chunk(dist.get_world_size(), dim=SEQ_DIM)[dist.get_rank() - 1]
    return reduce_scatter_to_sequence_parallel_region(out, SEQ_DIM)


def parallel_attention(h, wq, wk, wv, wo, bo, *, num_heads, bug=None, sequence_parallel=False):
    """Head-parallel causal attention; returns the output with bias, replicated (TP) or this rank's
    sequence block (SP: ``h`` is then this rank's sequence block too)."""
    world_size = dist.get_world_size()
    h = _enter_tensor_parallel_region(h, sequence_parallel=sequence_parallel)
    B, S, _ = h.shape
    heads = num_heads // world_size
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
        out = _leave_tensor_parallel_region(out, sequence_parallel=sequence_parallel, bug=bug)
    return out + bo


def parallel_mlp(h, w1, b1, w2, b2, *, bug=None, sequence_parallel=False):
    """Column-parallel -> GeLU -> row-parallel MLP; input and output replicated (TP) or this rank's
    sequence block (SP)."""
    if sequence_parallel:
        # with the bug the gather's backward only splits the gradient (megatron-core's
        # tensor_parallel_output_grad=False, meant for computations duplicated on every rank): the
        # LayerNorm-2 input gradient is this rank's partial sum over the column-parallel shards
        h = _enter_tensor_parallel_region(h, sequence_parallel=True,
                                          tensor_parallel_output_grad=bug != "split_grad_of_gather")
    elif bug != "unreduced_replicated_grad":
        h = copy_to_tensor_model_parallel_region(h)
    # with the bug the input is used as is: identical in forward, but the gradient that flows back
    # to the replicated LayerNorm is only this rank's partial sum
    h = F.gelu(h @ w1 + b1)
    out = _leave_tensor_parallel_region(h @ w2, sequence_parallel=sequence_parallel)
    return out + b2


def gpt_block_tp(x, ln1_w, ln1_b, wq, wk, wv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2, *, num_heads, bug=None,
                 sequence_parallel=False):
    """One rank of a tensor-parallel GPT block (Megatron): LayerNorms, bo and b2 replicated;
    wq/wk/wv/w1 [.., ../W] column-parallel, b1 [ffn/W], wo/w2 [../W, hidden] row-parallel.
    x is replicated (TP) or, with ``sequence_parallel``, this rank's block of the sequence
    [batch, seq/W, hidden] (Megatron-SP: LayerNorms, biases and residuals on sequence blocks)."""
    H = x.shape[-1]
    sp = sequence_parallel
    h = F.layer_norm(x, (H,), ln1_w, ln1_b)
    x = x + parallel_attention(h, wq, wk, wv, wo, bo, num_heads=num_heads, bug=bug, sequence_parallel=sp)
    h = F.layer_norm(x, (H,), ln2_w, ln2_b)
    return x + parallel_mlp(h, w1, b1, w2, b2, bug=bug, sequence_parallel=sp)


def allreduce_sequence_parallel_grads(grads, names, *, bug=None):
    """megatron-core's ``finalize_model_grads`` step for sequence parallelism: the gradients of
    replicated parameters used on sequence blocks (``SEQUENCE_PARALLEL_PARAMS``) are summed over
    the tensor-parallel ranks, so every rank holds the full (replicated) gradient."""
    grads = list(grads)
    for i, name in enumerate(names):
        if name.rsplit(".", 1)[-1] in SEQUENCE_PARALLEL_PARAMS or name in ("lnf_w", "lnf_b"):
            if bug == "unreduced_layernorm_grads" and "ln" in name:
                continue  # only the biases are reduced: the LayerNorm gradients stay partial sums
            g = grads[i].contiguous()
            dist.all_reduce(g)
            grads[i] = g
    return tuple(grads)


def gpt_block_fwd_bwd(x, ln1_w, ln1_b, wq, wk, wv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2, dout, *, num_heads):
    """Single-device forward and backward: ``(out, d x, d ln1_w, ..., d b2)`` for ``loss = (out * dout).sum()``."""
    params = (x, ln1_w, ln1_b, wq, wk, wv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2)
    out = gpt_block(*params, num_heads=num_heads)
    loss = (out * dout).sum()
    return (out, *torch.autograd.grad(loss, params))


def gpt_block_fwd_bwd_tp(x, ln1_w, ln1_b, wq, wk, wv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2, dout, *,
                         num_heads, bug=None, sequence_parallel=False, reduce_sp_grads=True):
    """One rank's forward and backward of the tensor-parallel block: output and local gradients
    (under SP, x, dout, the output and d x are this rank's sequence blocks; the sequence-parallel
    parameters' gradients are all-reduced unless ``reduce_sp_grads=False``)."""
    params = (x, ln1_w, ln1_b, wq, wk, wv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2)
    out = gpt_block_tp(*params, num_heads=num_heads, bug=bug, sequence_parallel=sequence_parallel)
    loss = (out * dout).sum()
    grads = torch.autograd.grad(loss, params)
    if sequence_parallel and reduce_sp_grads:
        grads = allreduce_sequence_parallel_grads(grads, ("x", *PARAM_NAMES), bug=bug)
    return (out, *grads)


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


SP_FWD_BUGS = {
    b.name: b
    for b in (
        Bug("allreduce_wrong_chunk",
            "The attention's reduce-scatter is written by hand as an all-reduce followed by the rank's "
            "block of the sequence, indexed with a 1-based rank: rank r keeps block r-1 (rank 0 the last "
            "one, Python's index -1), so the residual adds the wrong rows.",
            "aten.add", "attn_out_bias"),
    )
}
SP_FWD_BWD_BUGS = {
    **SP_FWD_BUGS,
    **{
        b.name: b
        for b in (
            Bug("split_grad_of_gather",
                "The MLP's all-gather along the sequence is called with tensor_parallel_output_grad="
                "False: its backward only splits the gradient instead of reduce-scattering it, so "
                "LayerNorm-2 and everything before it receive this rank's partial input gradient of "
                "the column-parallel matmul (the forward is exact); LayerNorm-2's backward is the first "
                "operator whose incoming gradient no rank holds.",
                "aten.native_layer_norm_backward", "ln2"),
            Bug("unreduced_layernorm_grads",
                "The sequence-parallel gradient all-reduce (megatron-core's finalize_model_grads step) "
                "skips the LayerNorm weights and biases: each rank returns the partial sum over its "
                "sequence block while the gradients are declared replicated (the first such output is "
                "LayerNorm-1's weight gradient: the ranks hold partial sums).",
                "aten.native_layer_norm_backward", "ln1"),
        )
    },
}


def _placements(sequence_parallel, reduce_sp_grads=True):
    """(x / activation placement, parameter placements, parameter-gradient placements)."""
    if not sequence_parallel:
        return Replicate(), PARAM_PLACEMENTS, PARAM_PLACEMENTS
    grads = tuple(Partial() if (n in SEQUENCE_PARALLEL_PARAMS and not reduce_sp_grads) else p
                  for n, p in zip(PARAM_NAMES, PARAM_PLACEMENTS))
    return Shard(SEQ_DIM), PARAM_PLACEMENTS, grads


def make(world_size: int = 2, bug: str | None = None, *, batch: int = 2, seq: int = 8, hidden: int = 16,
         heads: int = 4, ffn: int = 64, seed: int = 0, dtype=torch.float64, device="cpu",
         sequence_parallel: bool = False) -> Problem:
    """The block's forward; ``sequence_parallel=True``: x and the output split along the sequence."""
    name = "gpt_block_sp" if sequence_parallel else "gpt_block"
    check_bug(name, bug, SP_FWD_BUGS if sequence_parallel else FWD_BUGS)
    inputs, _ = _inputs(world_size, batch=batch, seq=seq, hidden=hidden, heads=heads, ffn=ffn, seed=seed,
                        dtype=dtype, device=device, requires_grad=False)
    act, params, _ = _placements(sequence_parallel)
    return Problem(
        sequential=functools.partial(gpt_block, num_heads=heads),
        distributed=functools.partial(gpt_block_tp, num_heads=heads, bug=bug, sequence_parallel=sequence_parallel),
        inputs=inputs,
        placements=(act, *params),
        world_size=world_size,
        expect=(act,),
        name=name if bug is None else f"{name}[{bug}]",
        input_names=("x", *PARAM_NAMES),
    )


def make_fwd_bwd(world_size: int = 2, bug: str | None = None, *, batch: int = 2, seq: int = 8,
                 hidden: int = 16, heads: int = 4, ffn: int = 64, seed: int = 0, dtype=torch.float64,
                 device="cpu", sequence_parallel: bool = False, reduce_sp_grads: bool = True) -> Problem:
    """The block's forward and backward. With ``sequence_parallel=True`` x, dout, the output and d x
    are split along the sequence; the gradients of ``SEQUENCE_PARALLEL_PARAMS`` are all-reduced in
    the rank program (expected replicated) or, with ``reduce_sp_grads=False``, left as the ranks'
    partial sums and expected ``Partial()``."""
    name = "gpt_block_sp_fwd_bwd" if sequence_parallel else "gpt_block_fwd_bwd"
    check_bug(name, bug, SP_FWD_BWD_BUGS if sequence_parallel else FWD_BWD_BUGS)
    inputs, g = _inputs(world_size, batch=batch, seq=seq, hidden=hidden, heads=heads, ffn=ffn, seed=seed,
                        dtype=dtype, device=device, requires_grad=True)
    dout = randn(g, batch, seq, hidden, dtype=dtype, device=device)
    act, params, grads = _placements(sequence_parallel, reduce_sp_grads)
    return Problem(
        sequential=functools.partial(gpt_block_fwd_bwd, num_heads=heads),
        distributed=functools.partial(gpt_block_fwd_bwd_tp, num_heads=heads, bug=bug,
                                      sequence_parallel=sequence_parallel, reduce_sp_grads=reduce_sp_grads),
        inputs=(*inputs, dout),
        placements=(act, *params, act),
        world_size=world_size,
        # output, then d x (placed like x) and each parameter's gradient, split like the parameter
        expect=(act, act, *grads),
        name=name if bug is None else f"{name}[{bug}]",
        input_names=("x", *PARAM_NAMES, "dout"),
    )


EXAMPLES = [
    Example("gpt_block", "Megatron tensor-parallel pre-LN GPT block (head-parallel attention, TP MLP, "
            "conjugate copy/reduce regions), forward.", make, FWD_BUGS),
    Example("gpt_block_fwd_bwd", "The tensor-parallel GPT block's forward and backward: output, input "
            "gradient and every parameter's (sharded or replicated) gradient.", make_fwd_bwd, FWD_BWD_BUGS,
            backward=True),
]
