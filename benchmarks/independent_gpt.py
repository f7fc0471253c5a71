"""An independent Megatron-style GPT, written from scratch as a Megatron user writes one.

Nothing here is imported from (or modelled on) ``gg_notebook.examples``: it is the yardstick for
"correct code that nobody on the team wrote". It follows Megatron-LM's own structure:

* ``VocabParallelEmbedding``: each rank owns rows ``[start, end)`` of the token table; ids outside
  that range are masked, shifted by ``start``, looked up, their rows zeroed, then all-reduced;
* learned position embeddings (replicated);
* ``layers`` pre-LN blocks: fused QKV (Megatron's per-head ``[q | k | v]`` layout) as a
  ``ColumnParallelLinear``, causal softmax attention over the rank's heads, the output projection
  as a ``RowParallelLinear`` (all-reduce, then bias), and a GELU MLP (column- then row-parallel);
* final LayerNorm, LM head tied to the token table (``parallel_lm_logits``) or untied;
* ``_VocabParallelCrossEntropy`` written out as Megatron writes it (``calculate_logits_max``,
  MAX all-reduce, in-place subtraction, target mask and masked target gather through
  ``arange``-indexing of the flattened logits, SUM all-reduces of the predicted logit and of the
  summed exponentials, ``loss = log(sum_exp) - predicted``; its hand-written backward), and the
  mean over tokens.

``make_problem(world_size, layers, backward)`` builds the `gg.Problem`: the forward returns the
scalar loss; the forward+backward variant also returns ``torch.autograd.grad`` of the loss with
respect to every weight (replicated weights get replicated gradients, sharded weights sharded ones).
``bug=`` injects one of `BUGS` into the rank program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard

LAYER_PARAMS = (
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
    "self_attention.dense.weight", "self_attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
)
# how Megatron shards each of them over the tensor-parallel group (weights are [out, in])
LAYER_PLACEMENTS = (
    Replicate(), Replicate(),
    Shard(0), Shard(0),          # ColumnParallelLinear: output rows (whole heads)
    Shard(1), Replicate(),       # RowParallelLinear: input columns; bias added after the reduction
    Replicate(), Replicate(),
    Shard(0), Shard(0),
    Shard(1), Replicate(),
)

BUGS = {
    "no_sum_exp_allreduce": "the SUM all-reduce of sum_exp_logits is missing (each rank normalizes by its own slice)",
    "no_target_offset": "the target is not shifted by vocab_start_index before the gather",
    "no_predicted_allreduce": "predicted_logits is not all-reduced (only the owning rank has the target logit)",
    "wrong_vocab_start": "the loss's vocabulary range is computed from the global vocabulary size instead of "
                         "the partition size (every rank but 0 thinks it owns no target)",
}


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 64
    hidden: int = 16
    heads: int = 4
    layers: int = 1
    seq: int = 8
    batch: int = 2
    ffn: int = 64
    tie: bool = True
    fused_qkv: bool = True  # Megatron's per-head [q|k|v] layout; False: q, k, v weights stacked
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# ==================================================================================== sequential
def _split(params, cfg: GPTConfig):
    n = len(LAYER_PARAMS)
    layers = [params[i * n:(i + 1) * n] for i in range(cfg.layers)]
    rest = params[cfg.layers * n:]
    final_w, final_b = rest[0], rest[1]
    head = rest[2] if not cfg.tie else None
    return layers, final_w, final_b, head


def _self_attention(h, qkv_w, qkv_b, head_dim, fused=True):
    """Causal attention over the heads present in ``qkv_w``: Megatron's fused layout
    ``[n_heads * (q|k|v) * head_dim, hidden]``, or (``fused=False``) the three projections stacked
    as ``[3, n_heads * head_dim, hidden]`` (sharded along dim 1)."""
    b, s, _ = h.shape
    if fused:
        mixed = F.linear(h, qkv_w, qkv_b)                           # [b, s, n * 3 * d]
        n_heads = mixed.size(-1) // (3 * head_dim)
        mixed = mixed.view(b, s, n_heads, 3 * head_dim)
        query, key, value = torch.split(mixed, head_dim, dim=-1)    # each [b, s, n, d]
    else:
        wq, wk, wv = qkv_w.unbind(0)                                # qkv_w: [3, n * d, hidden]
        bq, bk, bv = qkv_b.unbind(0)
        n_heads = wq.size(0) // head_dim
        query, key, value = (F.linear(h, w_, b_).view(b, s, n_heads, head_dim)
                             for w_, b_ in ((wq, bq), (wk, bk), (wv, bv)))
    query, key, value = (t.permute(0, 2, 1, 3) for t in (query, key, value))
    scores = torch.matmul(query, key.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
    future = torch.triu(torch.ones(s, s, dtype=torch.bool, device=h.device), diagonal=1)
    scores = scores.masked_fill(future, -10000.0)
    probs = torch.softmax(scores, dim=-1)
    ctx = torch.matmul(probs, value)                                 # [b, n, s, d]
    return ctx.permute(0, 2, 1, 3).reshape(b, s, n_heads * head_dim)


def gpt_forward_loss(ids, targets, word_emb, pos_emb, *params, cfg: GPTConfig):
    """Single device: mean token cross-entropy of the GPT."""
    layers, final_w, final_b, head = _split(params, cfg)
    positions = torch.arange(ids.size(1), device=ids.device)
    hidden = F.embedding(ids, word_emb) + F.embedding(positions, pos_emb).unsqueeze(0)
    for (ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b) in layers:
        normed = F.layer_norm(hidden, (cfg.hidden,), ln1_w, ln1_b, cfg.eps)
        attn = _self_attention(normed, qkv_w, qkv_b, cfg.head_dim, cfg.fused_qkv)
        hidden = hidden + F.linear(attn, proj_w, proj_b)
        normed = F.layer_norm(hidden, (cfg.hidden,), ln2_w, ln2_b, cfg.eps)
        hidden = hidden + F.linear(F.gelu(F.linear(normed, fc1_w, fc1_b)), fc2_w, fc2_b)
    hidden = F.layer_norm(hidden, (cfg.hidden,), final_w, final_b, cfg.eps)
    logits = F.linear(hidden, word_emb if head is None else head)   # [b, s, vocab]
    return F.cross_entropy(logits.view(-1, cfg.vocab), targets.view(-1))


def gpt_forward_backward(ids, targets, word_emb, pos_emb, *params, cfg: GPTConfig):
    weights = (word_emb, pos_emb) + tuple(params)
    loss = gpt_forward_loss(ids, targets, word_emb, pos_emb, *params, cfg=cfg)
    return (loss,) + tuple(torch.autograd.grad(loss, weights))


# ==================================================================================== tensor parallel
class _CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        dist.all_reduce(grad)
        return grad


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def _vocab_range(per_partition: int, rank: int):
    first = rank * per_partition
    return first, first + per_partition


def vocab_parallel_embedding(ids, weight_shard):
    """Megatron's VocabParallelEmbedding.forward on this rank's rows of the token table."""
    start, end = _vocab_range(weight_shard.size(0), dist.get_rank())
    input_mask = (ids < start) | (ids >= end)
    masked_input = ids.clone() - start
    masked_input[input_mask] = 0
    output_parallel = F.embedding(masked_input, weight_shard)
    output_parallel[input_mask, :] = 0.0
    return _ReduceFromTensorParallelRegion.apply(output_parallel)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron-LM's vocab-parallel cross-entropy (no label smoothing)."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, bug=None):
        # calculate_logits_max
        vocab_parallel_logits = vocab_parallel_logits.float()
        logits_max = torch.max(vocab_parallel_logits, dim=-1)[0]
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX)

        partition_vocab_size = vocab_parallel_logits.size()[-1]
        vocab_start_index, vocab_end_index = _vocab_range(partition_vocab_size, dist.get_rank())
        if bug == "wrong_vocab_start":  # rank * global vocabulary size
            vocab_start_index = dist.get_rank() * partition_vocab_size * dist.get_world_size()
            vocab_end_index = vocab_start_index + partition_vocab_size

        # calculate_predicted_logits
        vocab_parallel_logits -= logits_max.unsqueeze(dim=-1)
        target_mask = (target < vocab_start_index) | (target >= vocab_end_index)
        masked_target = target.clone()
        if bug != "no_target_offset":
            masked_target = masked_target - vocab_start_index
        masked_target[target_mask] = 0
        logits_2d = vocab_parallel_logits.view(-1, partition_vocab_size)
        masked_target_1d = masked_target.view(-1)
        arange_1d = torch.arange(start=0, end=logits_2d.size()[0], device=logits_2d.device)
        predicted_logits_1d = logits_2d[arange_1d, masked_target_1d]
        predicted_logits_1d = predicted_logits_1d.clone().contiguous()
        predicted_logits = predicted_logits_1d.view_as(target)
        predicted_logits[target_mask] = 0.0
        exp_logits = vocab_parallel_logits
        torch.exp(vocab_parallel_logits, out=exp_logits)
        sum_exp_logits = exp_logits.sum(dim=-1)

        if bug != "no_predicted_allreduce":
            dist.all_reduce(predicted_logits, op=dist.ReduceOp.SUM)
        if bug != "no_sum_exp_allreduce":
            dist.all_reduce(sum_exp_logits, op=dist.ReduceOp.SUM)

        # calculate_cross_entropy_loss
        loss = torch.log(sum_exp_logits) - predicted_logits
        exp_logits.div_(sum_exp_logits.unsqueeze(dim=-1))

        ctx.save_for_backward(exp_logits, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        # prepare_gradient_calculation_operands
        grad_input = softmax
        partition_vocab_size = softmax.size()[-1]
        grad_2d = grad_input.view(-1, partition_vocab_size)
        arange_1d = torch.arange(start=0, end=grad_2d.size()[0], device=grad_2d.device)
        softmax_update = 1.0 - target_mask.view(-1).float()
        # calculate_gradients
        grad_2d[arange_1d, masked_target_1d] -= softmax_update
        grad_input.mul_(grad_output.unsqueeze(dim=-1))
        return grad_input, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits, target, bug=None):
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, bug)


def _column_parallel(x, weight, bias):
    return F.linear(_CopyToTensorParallelRegion.apply(x), weight, bias)


def _row_parallel(x, weight, bias):
    return _ReduceFromTensorParallelRegion.apply(F.linear(x, weight)) + bias


def gpt_forward_loss_tp(ids, targets, word_emb, pos_emb, *params, cfg: GPTConfig, bug=None):
    """One tensor-parallel rank: mean token cross-entropy (replicated on every rank)."""
    layers, final_w, final_b, head = _split(params, cfg)
    positions = torch.arange(ids.size(1), device=ids.device)
    hidden = vocab_parallel_embedding(ids, word_emb) + F.embedding(positions, pos_emb).unsqueeze(0)
    for (ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b) in layers:
        normed = F.layer_norm(hidden, (cfg.hidden,), ln1_w, ln1_b, cfg.eps)
        mixed_in = _CopyToTensorParallelRegion.apply(normed)
        attn = _self_attention(mixed_in, qkv_w, qkv_b, cfg.head_dim, cfg.fused_qkv)  # this rank's heads
        hidden = hidden + _row_parallel(attn, proj_w, proj_b)
        normed = F.layer_norm(hidden, (cfg.hidden,), ln2_w, ln2_b, cfg.eps)
        hidden = hidden + _row_parallel(F.gelu(_column_parallel(normed, fc1_w, fc1_b)), fc2_w, fc2_b)
    hidden = F.layer_norm(hidden, (cfg.hidden,), final_w, final_b, cfg.eps)
    # parallel_lm_logits: copy to the tensor-parallel region, then this rank's vocabulary slice
    logits_parallel = F.linear(_CopyToTensorParallelRegion.apply(hidden), word_emb if head is None else head)
    losses = vocab_parallel_cross_entropy(logits_parallel, targets, bug)   # [b, s]
    return losses.mean()


def gpt_forward_backward_tp(ids, targets, word_emb, pos_emb, *params, cfg: GPTConfig, bug=None):
    weights = (word_emb, pos_emb) + tuple(params)
    loss = gpt_forward_loss_tp(ids, targets, word_emb, pos_emb, *params, cfg=cfg, bug=bug)
    return (loss,) + tuple(torch.autograd.grad(loss, weights))


# ==================================================================================== the problem
def make_inputs(cfg: GPTConfig, *, seed: int = 0, dtype=torch.float32, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.2, offset=0.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale + offset).requires_grad_(requires_grad)

    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g)
    targets = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g)
    targets[:, -1] = cfg.vocab - 1  # the last id of the vocabulary (last shard's last row) occurs
    h, f = cfg.hidden, cfg.ffn
    inputs = [ids, targets, w(cfg.vocab, h, scale=1.0), w(cfg.seq, h, scale=0.1)]
    names = ["input_ids", "labels", "word_embeddings.weight", "position_embeddings.weight"]
    placements = [Replicate(), Replicate(), Shard(0), Replicate()]
    for i in range(cfg.layers):
        qkv = (3 * h,) if cfg.fused_qkv else (3, h)
        inputs += [w(h, scale=0.1, offset=1.0), w(h, scale=0.1),
                   w(*qkv, h, scale=h ** -0.5), w(*qkv, scale=0.1),
                   w(h, h, scale=h ** -0.5), w(h, scale=0.1),
                   w(h, scale=0.1, offset=1.0), w(h, scale=0.1),
                   w(f, h, scale=h ** -0.5), w(f, scale=0.1),
                   w(h, f, scale=f ** -0.5), w(h, scale=0.1)]
        names += [f"layers.{i}.{n}" for n in LAYER_PARAMS]
        placements += list(LAYER_PLACEMENTS) if cfg.fused_qkv else \
            list(LAYER_PLACEMENTS[:2]) + [Shard(1), Shard(1)] + list(LAYER_PLACEMENTS[4:])
    inputs += [w(h, scale=0.1, offset=1.0), w(h, scale=0.1)]
    names += ["final_layernorm.weight", "final_layernorm.bias"]
    placements += [Replicate(), Replicate()]
    if not cfg.tie:
        inputs.append(w(cfg.vocab, h, scale=h ** -0.5))
        names.append("output_layer.weight")
        placements.append(Shard(0))
    return inputs, names, placements


def make_problem(world_size: int = 2, *, layers: int = 1, backward: bool = False, tie: bool = True,
                 fused_qkv: bool = True, bug: str | None = None, seed: int = 0, dtype=torch.float32, **sizes):
    """The `gg.Problem` of the independent GPT on ``world_size`` tensor-parallel ranks."""
    import functools

    import gg_notebook as gg

    if bug is not None and bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}; known: {', '.join(BUGS)}")
    cfg = GPTConfig(layers=layers, tie=tie, fused_qkv=fused_qkv, **sizes)
    if cfg.heads % world_size or cfg.vocab % world_size or cfg.ffn % world_size:
        raise ValueError("heads, vocab and ffn must be divisible by the tensor-parallel size")
    inputs, names, placements = make_inputs(cfg, seed=seed, dtype=dtype, requires_grad=backward)
    if backward:
        seq_fn, tp_fn = gpt_forward_backward, gpt_forward_backward_tp
        expect = [Replicate()] + placements[2:]
    else:
        seq_fn, tp_fn = gpt_forward_loss, gpt_forward_loss_tp
        expect = [Replicate()]
    kind = "fwd_bwd" if backward else "fwd"
    return gg.Problem(
        sequential=functools.partial(seq_fn, cfg=cfg),
        distributed=functools.partial(tp_fn, cfg=cfg, bug=bug),
        inputs=inputs,
        placements=placements,
        world_size=world_size,
        expect=expect,
        name=f"independent_gpt[{kind},tp{world_size},L{layers}" + ("" if fused_qkv else ",qkv-stacked")
             + ("" if tie else ",untied") + "]" + (f"[{bug}]" if bug else ""),
        input_names=names,
        # Megatron's vocab-parallel cross-entropy has no ignore_index: every label is a token id
        domains={"labels": range(0, cfg.vocab)},
    )
