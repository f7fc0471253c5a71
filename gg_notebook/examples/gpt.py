"""A Megatron-style tensor-parallel GPT, parametrized for benchmarks.

Vocab-parallel token embedding + replicated positional embedding, ``layers`` tensor-parallel
pre-LN blocks (see ``gpt_block``), a final LayerNorm, a vocab-parallel LM head (column-parallel: each
rank produces the logits of its vocabulary slice) and the vocab-parallel cross-entropy, so the full
[tokens, vocab] logits never exist on one rank. The forward returns the per-token loss; the backward
variant also returns the gradients of every parameter of ``loss.mean()``.
With ``device="meta"`` all inputs are meta tensors (nothing is allocated), for benchmark-sized shapes.

``make(..., sequence_parallel=True)`` adds Megatron sequence parallelism (TP + SP): between the
tensor-parallel regions each rank holds its block of the sequence; the sequential program and the
problem's inputs and outputs are unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.distributed.tensor import Partial, Replicate, Shard

from gg_notebook.problem import Problem

from ._common import check_bug, randint, randn, seeded
from ._tp import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from ._types import Bug, Example
from .gpt_block import (
    PARAM_NAMES,
    PARAM_PLACEMENTS,
    SEQ_DIM,
    SEQUENCE_PARALLEL_PARAMS,
    allreduce_sequence_parallel_grads,
    gpt_block,
    gpt_block_tp,
)
from .vocab_cross_entropy import vocab_parallel_cross_entropy
from .vocab_embedding import vocab_parallel_embedding

N_BLOCK_PARAMS = len(PARAM_NAMES)


def _split_params(params, layers):
    blocks = [params[i * N_BLOCK_PARAMS:(i + 1) * N_BLOCK_PARAMS] for i in range(layers)]
    lnf_w, lnf_b, w_lm = params[layers * N_BLOCK_PARAMS:]
    return blocks, lnf_w, lnf_b, w_lm


def gpt_loss(ids, targets, wte, wpe, *params, num_heads, layers):
    """Single-device GPT: per-token cross-entropy [batch*seq]; w_lm: [vocab, hidden]."""
    blocks, lnf_w, lnf_b, w_lm = _split_params(params, layers)
    x = F.embedding(ids, wte) + wpe  # gg: embedding
    for block in blocks:
        x = gpt_block(x, *block, num_heads=num_heads)
    x = F.layer_norm(x, (x.shape[-1],), lnf_w, lnf_b)
    logits = x @ w_lm.t()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), reduction="none")


def _param_names(layers):
    return ("wte", "wpe", *(f"layers.{i}.{n}" for i in range(layers) for n in PARAM_NAMES), "lnf_w", "lnf_b", "w_lm")


def gpt_loss_tp(ids, targets, wte, wpe, *params, num_heads, layers, bug=None, sequence_parallel=False,
                sp_embedding="scatter"):
    """One rank of the tensor-parallel GPT: wte [vocab/W, hidden] and w_lm [vocab/W, hidden] split by
    vocabulary, block weights as in ``gpt_block_tp``, positional embedding and LayerNorms replicated.

    With ``sequence_parallel`` (Megatron-SP) the activations between the blocks are this rank's block
    of the sequence [batch, seq/W, hidden]; the blocks run their LayerNorms and residuals on sequence
    blocks, and the final LayerNorm's output is all-gathered along the sequence before the LM head.
    The embedding enters the sequence-parallel region as megatron-core does for a model with learned
    absolute positions (``sp_embedding="scatter"``: all-reduce, add the positions, keep this rank's
    block; megatron-core reduce-scatters the embedding only without learned positions), or with
    ``sp_embedding="reduce_scatter"``: the partial lookups are reduce-scattered along the sequence and
    each rank adds its block of the positions."""
    blocks, lnf_w, lnf_b, w_lm = _split_params(params, layers)
    sp = sequence_parallel
    if sp and sp_embedding == "reduce_scatter":
        # the partial lookups reduce-scattered along the sequence, plus this rank's positions
        x = vocab_parallel_embedding(ids, wte, bug=bug, sequence_parallel=True)
        x = x + scatter_to_sequence_parallel_region(wpe, 0)  # wpe: [seq, hidden]
    elif sp:
        # megatron-core with learned absolute positions: all-reduce the lookups, add the positions,
        # then keep this rank's block of the sequence (its backward all-gathers the gradient)
        x = vocab_parallel_embedding(ids, wte, bug=bug) + wpe
        x = scatter_to_sequence_parallel_region(x, SEQ_DIM)
    else:
        x = vocab_parallel_embedding(ids, wte, bug=bug) + wpe
    block_bug = bug if bug in _BLOCK_BUGS else None
    for block in blocks:
        x = gpt_block_tp(x, *block, num_heads=num_heads, bug=block_bug, sequence_parallel=sp)
    x = F.layer_norm(x, (x.shape[-1],), lnf_w, lnf_b)
    if sp:
        x = gather_from_sequence_parallel_region(x, SEQ_DIM)
    else:
        x = copy_to_tensor_model_parallel_region(x)
    logits = x @ w_lm.t()  # [batch, seq, vocab/W]
    return vocab_parallel_cross_entropy(logits, targets).view(-1)


def gpt_fwd_bwd(ids, targets, wte, wpe, *params, num_heads, layers):
    """Single-device forward and backward: ``(loss per token, d wte, d wpe, d params...)`` of ``loss.mean()``."""
    weights = (wte, wpe, *params)
    loss = gpt_loss(ids, targets, wte, wpe, *params, num_heads=num_heads, layers=layers)
    return (loss, *torch.autograd.grad(loss.mean(), weights))


def gpt_fwd_bwd_tp(ids, targets, wte, wpe, *params, num_heads, layers, bug=None, sequence_parallel=False,
                   reduce_sp_grads=True, sp_embedding="scatter"):
    """One rank's forward and backward of the tensor-parallel GPT: loss and local gradients. Under
    sequence parallelism the LayerNorm weights and the row-parallel biases get partial gradients (sums
    over this rank's sequence rows); they are all-reduced here as megatron-core's finalize step does,
    unless ``reduce_sp_grads=False``."""
    weights = (wte, wpe, *params)
    loss = gpt_loss_tp(ids, targets, wte, wpe, *params, num_heads=num_heads, layers=layers, bug=bug,
                       sequence_parallel=sequence_parallel, sp_embedding=sp_embedding)
    grads = torch.autograd.grad(loss.mean(), weights)
    if sequence_parallel and reduce_sp_grads:
        grads = allreduce_sequence_parallel_grads(grads, _param_names(layers), bug=bug)
    return (loss, *grads)


BUGS = {
    b.name: b
    for b in (
        Bug("wrong_rank_offset",
            "The vocab-parallel embedding computes its vocabulary range from a 1-based rank.",
            "aten.embedding", "embedding"),
    )
}
# bugs of the sequence-parallel blocks (gpt_block.SP_FWD_BWD_BUGS) and of the SP gradient all-reduce
_BLOCK_BUGS = ("allreduce_wrong_chunk", "split_grad_of_gather")
SP_BUGS = {
    **BUGS,
    **{
        b.name: b
        for b in (
            Bug("allreduce_wrong_chunk",
                "The attention's reduce-scatter is written as an all-reduce followed by the block of a "
                "1-based rank (rank 0 keeps the last block).",
                "aten.add", "gpt_block:attn_out_bias"),
        )
    },
}
SP_FWD_BWD_BUGS = {
    **SP_BUGS,
    **{
        b.name: b
        for b in (
            Bug("split_grad_of_gather",
                "The MLPs' sequence all-gather splits its gradient in backward instead of "
                "reduce-scattering it (tensor_parallel_output_grad=False).",
                "aten.native_layer_norm_backward", "gpt_block:ln2"),
            Bug("unreduced_layernorm_grads",
                "The sequence-parallel gradient all-reduce skips the LayerNorm weights and biases, "
                "which are declared replicated.",
                "aten.native_layer_norm_backward", "gpt_block:ln1"),
        )
    },
}


def make(world_size: int = 2, bug: str | None = None, *, layers: int = 1, hidden: int = 16, heads: int = 4,
         vocab: int = 64, seq: int = 8, batch: int = 2, ffn: int | None = None, backward: bool = False,
         device="cpu", seed: int = 0, dtype=torch.float64, sequence_parallel: bool = False,
         reduce_sp_grads: bool = True, sp_embedding: str = "scatter") -> Problem:
    """The GPT's forward (per-token loss) or, with ``backward``, forward and backward.

    ``sequence_parallel=True``: Megatron-SP on top of the tensor parallelism (the inputs, outputs and
    the sequential program are unchanged; only the rank program differs). The gradients of the
    LayerNorm weights/biases and of the row-parallel biases are then partial sums on each rank; by
    default the rank program all-reduces them (megatron-core's ``finalize_model_grads``) and they are
    expected replicated, like the optimizer sees them; ``reduce_sp_grads=False`` returns the partial
    sums and expects them ``Partial()``. ``sp_embedding``: how the embedding enters the sequence-parallel
    region (see ``gpt_loss_tp``).
    """
    if sp_embedding not in ("scatter", "reduce_scatter"):
        raise ValueError(f"sp_embedding must be 'scatter' or 'reduce_scatter', not {sp_embedding!r}")
    sp = sequence_parallel
    bugs = (SP_FWD_BWD_BUGS if backward else SP_BUGS) if sp else BUGS
    check_bug("gpt (sequence parallel)" if sp else "gpt", bug, bugs)
    if heads % world_size or hidden % heads:
        raise ValueError(f"a Megatron split needs heads % world_size == 0 and hidden % heads == 0; got "
                         f"hidden={hidden}, heads={heads}, world_size={world_size}")
    if sp and seq % world_size:
        raise ValueError(f"sequence parallelism splits the sequence over the ranks: seq={seq} is not a "
                         f"multiple of world_size={world_size}")
    ffn = 4 * hidden if ffn is None else ffn
    g = seeded(seed)
    rg = backward
    s_h, s_f = hidden ** -0.5, ffn ** -0.5

    def p(*shape, scale=1.0, one=False):
        t = randn(g, *shape, dtype=dtype, device=device, scale=scale)
        return (t + 1.0 if one else t).detach().requires_grad_(rg)

    ids = randint(g, vocab, batch, seq, device=device)
    targets = randint(g, vocab, batch, seq, device=device)
    wte = p(vocab, hidden, scale=1.0)
    wpe = p(seq, hidden, scale=0.1)
    params, names, placements = [], [], []
    for i in range(layers):
        block = (
            p(hidden, scale=0.1, one=True), p(hidden, scale=0.1),
            p(hidden, hidden, scale=s_h), p(hidden, hidden, scale=s_h), p(hidden, hidden, scale=s_h),
            p(hidden, hidden, scale=s_h), p(hidden, scale=0.1),
            p(hidden, scale=0.1, one=True), p(hidden, scale=0.1),
            p(hidden, ffn, scale=s_h), p(ffn, scale=0.1), p(ffn, hidden, scale=s_f), p(hidden, scale=0.1),
        )
        params += block
        names += [f"layers.{i}.{n}" for n in PARAM_NAMES]
        placements += PARAM_PLACEMENTS
    params += [p(hidden, scale=0.1, one=True), p(hidden, scale=0.1), p(vocab, hidden, scale=s_h)]
    names += ["lnf_w", "lnf_b", "w_lm"]
    placements += [Replicate(), Replicate(), Shard(0)]

    weight_placements = (Shard(0), Replicate(), *placements)
    kw = dict(num_heads=heads, layers=layers)
    if backward:
        grad_placements = weight_placements
        dist_kw = dict(bug=bug)
        if sp:
            dist_kw.update(sequence_parallel=True, reduce_sp_grads=reduce_sp_grads, sp_embedding=sp_embedding)
            if not reduce_sp_grads:
                partial = {i for i, n in enumerate(("wte", "wpe", *names))
                           if n.rsplit(".", 1)[-1] in SEQUENCE_PARALLEL_PARAMS or n in ("lnf_w", "lnf_b")}
                grad_placements = tuple(Partial() if i in partial else p for i, p in enumerate(weight_placements))
        seq_fn, dist_fn, expect = gpt_fwd_bwd, gpt_fwd_bwd_tp, (Replicate(), *grad_placements)
    else:
        dist_kw = dict(bug=bug, sequence_parallel=True, sp_embedding=sp_embedding) if sp else dict(bug=bug)
        seq_fn, dist_fn, expect = gpt_loss, gpt_loss_tp, (Replicate(),)
    name = ("gpt_sp" if sp else "gpt") + ("_fwd_bwd" if backward else "")
    return Problem(
        sequential=functools.partial(seq_fn, **kw),
        distributed=functools.partial(dist_fn, **kw, **dist_kw),
        inputs=(ids, targets, wte, wpe, *params),
        placements=(Replicate(), Replicate(), *weight_placements),
        world_size=world_size,
        expect=expect,
        name=name if bug is None else f"{name}[{bug}]",
        input_names=("ids", "targets", "wte", "wpe", *names),
        # Megatron's vocab-parallel loss has no ignore_index: targets are token ids (see
        # vocab_cross_entropy.make)
        domains={"targets": range(0, vocab)},
        meta={"layers": layers, "hidden": hidden, "heads": heads, "vocab": vocab, "seq": seq,
              "batch": batch, "ffn": ffn, "backward": backward, "sequence_parallel": sp,
              "sp_embedding": sp_embedding if sp else None},
    )


EXAMPLES = [
    Example("gpt", "Megatron-style tensor-parallel GPT (vocab-parallel embedding, blocks, vocab-parallel "
            "LM head and cross-entropy); make(..., layers=, hidden=, backward=, device='meta').", make, BUGS),
    Example("gpt_fwd_bwd", "The tensor-parallel GPT's forward and backward (per-token loss and every "
            "parameter's gradient).", functools.partial(make, backward=True), BUGS, backward=True),
]
