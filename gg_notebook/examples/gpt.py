"""A Megatron-style tensor-parallel GPT, parametrized for benchmarks.

Vocab-parallel token embedding + replicated positional embedding, ``layers`` tensor-parallel
pre-LN blocks (see ``gpt_block``), a final LayerNorm, a vocab-parallel LM head (column-parallel: each
rank produces the logits of its vocabulary slice) and the vocab-parallel cross-entropy, so the full
[tokens, vocab] logits never exist on one rank. The forward returns the per-token loss; the backward
variant also returns the gradients of every parameter of ``loss.mean()``.
With ``device="meta"`` all inputs are meta tensors (nothing is allocated), for benchmark-sized shapes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard

from gg_notebook.problem import Problem

from ._common import check_bug, randint, randn, seeded
from ._tp import copy_to_tensor_model_parallel_region
from ._types import Bug, Example
from .gpt_block import PARAM_NAMES, PARAM_PLACEMENTS, gpt_block, gpt_block_tp
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


def gpt_loss_tp(ids, targets, wte, wpe, *params, num_heads, layers, bug=None):
    """One rank of the tensor-parallel GPT: wte [vocab/W, hidden] and w_lm [vocab/W, hidden] split by
    vocabulary, block weights as in ``gpt_block_tp``, positional embedding and LayerNorms replicated."""
    blocks, lnf_w, lnf_b, w_lm = _split_params(params, layers)
    x = vocab_parallel_embedding(ids, wte, bug=bug) + wpe
    for block in blocks:
        x = gpt_block_tp(x, *block, num_heads=num_heads)
    x = F.layer_norm(x, (x.shape[-1],), lnf_w, lnf_b)
    x = copy_to_tensor_model_parallel_region(x)
    logits = x @ w_lm.t()  # [batch, seq, vocab/W]
    return vocab_parallel_cross_entropy(logits, targets).view(-1)


def gpt_fwd_bwd(ids, targets, wte, wpe, *params, num_heads, layers):
    """Single-device forward and backward: ``(loss per token, d wte, d wpe, d params...)`` of ``loss.mean()``."""
    weights = (wte, wpe, *params)
    loss = gpt_loss(ids, targets, wte, wpe, *params, num_heads=num_heads, layers=layers)
    return (loss, *torch.autograd.grad(loss.mean(), weights))


def gpt_fwd_bwd_tp(ids, targets, wte, wpe, *params, num_heads, layers, bug=None):
    """One rank's forward and backward of the tensor-parallel GPT: loss and local gradients."""
    weights = (wte, wpe, *params)
    loss = gpt_loss_tp(ids, targets, wte, wpe, *params, num_heads=num_heads, layers=layers, bug=bug)
    return (loss, *torch.autograd.grad(loss.mean(), weights))


BUGS = {
    b.name: b
    for b in (
        Bug("wrong_rank_offset",
            "The vocab-parallel embedding computes its vocabulary range from a 1-based rank.",
            "aten.embedding", "embedding"),
    )
}


def make(world_size: int = 2, bug: str | None = None, *, layers: int = 1, hidden: int = 16, heads: int = 4,
         vocab: int = 64, seq: int = 8, batch: int = 2, ffn: int | None = None, backward: bool = False,
         device="cpu", seed: int = 0, dtype=torch.float64) -> Problem:
    check_bug("gpt", bug, BUGS)
    if heads % world_size or hidden % heads:
        raise ValueError(f"a Megatron split needs heads % world_size == 0 and hidden % heads == 0; got "
                         f"hidden={hidden}, heads={heads}, world_size={world_size}")
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
        seq_fn, dist_fn, expect = gpt_fwd_bwd, gpt_fwd_bwd_tp, (Replicate(), *weight_placements)
    else:
        seq_fn, dist_fn, expect = gpt_loss, gpt_loss_tp, (Replicate(),)
    name = "gpt_fwd_bwd" if backward else "gpt"
    return Problem(
        sequential=functools.partial(seq_fn, **kw),
        distributed=functools.partial(dist_fn, **kw, bug=bug),
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
              "batch": batch, "ffn": ffn, "backward": backward},
    )


EXAMPLES = [
    Example("gpt", "Megatron-style tensor-parallel GPT (vocab-parallel embedding, blocks, vocab-parallel "
            "LM head and cross-entropy); make(..., layers=, hidden=, backward=, device='meta').", make, BUGS),
    Example("gpt_fwd_bwd", "The tensor-parallel GPT's forward and backward (per-token loss and every "
            "parameter's gradient).", functools.partial(make, backward=True), BUGS, backward=True),
]
