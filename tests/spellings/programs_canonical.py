"""Pattern 4, canonical spellings: one value, many ways to write it.

Linear layers (addmm on flattened batch, matmul + bias, F.linear), sums over several dims, vocab-
parallel embedding lookups (Megatron and torchtitan styles, ``weight[ids]``), scaled ``baddbmm``
into an empty buffer, writes into preallocated buffers, and programs decorated with asserts,
size-1 collectives and dead code. Each group has one realistic bug.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg

from ._case import SpellingCase, ri, rn

R = gg.Replicate()
S0, S1, S2 = gg.Shard(0), gg.Shard(1), gg.Shard(2)


# --- row-parallel linear with bias: addmm / matmul + bias / F.linear ----------------------------
# x: [batch, seq, in] split along in; w: [out, in] split along in; b: [out] replicated

def linear(x, w, b):
    return F.linear(x, w, b)  # gg: linear


def rp_addmm_flat(x, w, b):
    y = torch.mm(x.reshape(-1, x.shape[-1]), w.t())
    dist.all_reduce(y)
    return (y + b).view(*x.shape[:-1], -1)


def rp_matmul_bias(x, w, b):
    y = x @ w.t()
    dist.all_reduce(y)
    return y + b


def rp_linear_then_bias(x, w, b):
    y = F.linear(x, w)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return torch.add(y, b)


def rp_bias_on_rank0(x, w, b):
    # Megatron trick: only one rank adds the bias before the all-reduce
    y = F.linear(x, w, b if dist.get_rank() == 0 else None)
    dist.all_reduce(y)
    return y


def rp_addmm_bias_rank0(x, w, b):
    bias = b if dist.get_rank() == 0 else torch.zeros_like(b)
    y = torch.addmm(bias, x.flatten(0, 1), w.T).unflatten(0, x.shape[:2])
    dist.all_reduce(y)
    return y


def rp_bias_every_rank(x, w, b):
    y = F.linear(x, w, b)  # BUG: every rank adds the bias, the all-reduce sums it world_size times
    dist.all_reduce(y)
    return y


def _linear_inputs():
    return [rn(2, 3, 8), rn(5, 8, seed=1), rn(5, seed=2)]


# column-parallel: x replicated, w [out, in] split along out, b split -> output split along features

def cp_addmm_flat(x, w, b):
    return torch.addmm(b, x.view(-1, x.shape[-1]), w.t()).view(x.shape[0], x.shape[1], -1)


def cp_matmul_bias(x, w, b):
    return torch.matmul(x, w.transpose(0, 1)) + b


def cp_linear(x, w, b):
    return F.linear(x, w, b)


def cp_einsum(x, w, b):
    return torch.einsum("bsi,oi->bso", x, w) + b


def cp_bias_wrong_shard(x, w, b):
    full_b = torch.empty(b.shape[0] * dist.get_world_size(), dtype=b.dtype)
    dist.all_gather_into_tensor(full_b, b)
    return x @ w.t() + full_b[: w.shape[0]]  # BUG: every rank adds the first rank's bias slice


def _cp_inputs():
    return [rn(2, 3, 4), rn(6, 4, seed=1), rn(6, seed=2)]


# --- sums over several dims vs view + sum; negative vs positive dims ----------------------------
# x: [batch, seq, hidden] split along hidden; per-sample total -> [batch], replicated

def per_sample_total(x):
    return x.sum(dim=(1, 2))  # gg: total


def total_view_sum(x):
    t = x.reshape(x.shape[0], -1).sum(-1)
    dist.all_reduce(t)
    return t


def total_negative_dims(x):
    t = torch.sum(x, dim=[-2, -1])
    dist.all_reduce(t)
    return t


def total_twice(x):
    t = x.sum(2).sum(1)
    dist.all_reduce(t)
    return t


def total_flatten_keepdim(x):
    t = x.flatten(1).sum(dim=1, keepdim=True)
    dist.all_reduce(t)
    return t.squeeze(-1)


def total_wrong_reshape(x):
    t = x.transpose(0, 1).reshape(x.shape[0], -1).sum(-1)  # BUG: the reshape after transpose mixes samples
    dist.all_reduce(t)
    return t


def _total_inputs():
    return [rn(4, 3, 6)]


# --- vocab-parallel embedding lookup --------------------------------------------------------------
# ids: [batch, seq] replicated; weight: [vocab, hidden] split along vocab

VOCAB, HIDDEN = 32, 8


def embed(ids, weight):
    return F.embedding(ids, weight)  # gg: lookup


def embed_index(ids, weight):
    return weight[ids]  # gg: lookup


def vp_megatron(ids, weight):
    rank = dist.get_rank()
    per_partition = weight.shape[0]
    start, end = rank * per_partition, (rank + 1) * per_partition
    mask = (ids < start) | (ids >= end)
    local = ids.clone() - start
    local[mask] = 0
    out = F.embedding(local, weight)
    out[mask, :] = 0.0
    dist.all_reduce(out)
    return out


def vp_torchtitan_clamp(ids, weight):
    rank, n = dist.get_rank(), weight.size(0)
    start = rank * n
    mask = (ids < start) | (ids >= start + n)
    local = (ids - start).clamp(0, n - 1)
    out = weight[local]
    out = out.masked_fill(mask.unsqueeze(-1), 0.0)
    dist.all_reduce(out)
    return out


def vp_where_index(ids, weight):
    rank, n = dist.get_rank(), weight.shape[0]
    start = rank * n
    in_range = (ids >= start) & (ids < start + n)
    local = torch.where(in_range, ids - start, torch.zeros_like(ids))
    out = F.embedding(local, weight) * in_range.unsqueeze(-1).to(weight.dtype)
    dist.all_reduce(out)
    return out


def vp_wrong_offset(ids, weight):
    rank, n = dist.get_rank(), weight.shape[0]
    start = rank * weight.shape[1]  # BUG: the hidden size, not the rows per rank
    mask = (ids < start) | (ids >= start + n)
    local = (ids - start).clamp(0, n - 1)
    out = F.embedding(local, weight).masked_fill(mask[..., None], 0.0)
    dist.all_reduce(out)
    return out


def _embed_inputs():
    return [ri(0, VOCAB, 2, 5, seed=3), rn(VOCAB, HIDDEN, seed=4)]


# --- scaled scores: baddbmm into an empty buffer, beta=0 -----------------------------------------
# q, k: [batch*heads, seq, d] split along batch*heads (head-parallel)

def scores(q, k):
    return torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])  # gg: scores


def hp_baddbmm_empty(q, k):
    bh, s, d = q.shape
    buf = torch.empty(bh, s, s, dtype=q.dtype)
    return torch.baddbmm(buf, q, k.transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(d))


def hp_scale_query(q, k):
    return (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)


def hp_matmul_mul(q, k):
    return torch.matmul(q, k.mT).mul(1.0 / math.sqrt(q.size(-1)))


def hp_bmm_div(q, k):
    return torch.bmm(q, k.permute(0, 2, 1)) / math.sqrt(q.shape[-1])


def hp_wrong_scale(q, k):
    bh, s, d = q.shape
    buf = torch.empty(bh, s, s, dtype=q.dtype)
    return torch.baddbmm(buf, q, k.transpose(1, 2), beta=0.0, alpha=1.0 / d)  # BUG: 1/d instead of 1/sqrt(d)


def _scores_inputs():
    return [rn(4, 3, 4), rn(4, 3, 4, seed=1)]


# --- writes into preallocated buffers: gathering a column-parallel output ---------------------
# x replicated, w: [in, out] split along out; output replicated

def gelu_proj(x, w):
    return F.gelu(x @ w)  # gg: proj


def gather_copy_into_empty(x, w):
    y = F.gelu(x @ w)
    world = dist.get_world_size()
    parts = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(parts, y)
    out = torch.empty(x.shape[0], y.shape[1] * world, dtype=y.dtype)
    out.copy_(torch.cat(parts, dim=1))
    return out


def gather_slice_assign(x, w):
    y = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype)
    torch.matmul(x, w, out=y)
    y = F.gelu(y)
    world = dist.get_world_size()
    gathered = torch.empty(world, *y.shape, dtype=y.dtype)
    dist.all_gather_into_tensor(gathered, y.unsqueeze(0))
    out = torch.empty(x.shape[0], world * y.shape[1], dtype=y.dtype)
    out[:] = gathered.permute(1, 0, 2).reshape(x.shape[0], -1)
    return out


def gather_zero_buffer_allreduce(x, w):
    y = F.gelu(x @ w)
    n, rank = y.shape[1], dist.get_rank()
    out = torch.zeros(x.shape[0], n * dist.get_world_size(), dtype=y.dtype)
    out[:, rank * n:(rank + 1) * n] = y
    dist.all_reduce(out)
    return out


def gather_cat_out(x, w):
    y = F.gelu(torch.mm(x, w))
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    out = torch.empty(y.shape[0], y.shape[1] * len(parts), dtype=y.dtype)
    torch.cat(parts, dim=-1, out=out)
    return out


def gather_zero_buffer_no_offset(x, w):
    y = F.gelu(x @ w)
    n = y.shape[1]
    out = torch.zeros(x.shape[0], n * dist.get_world_size(), dtype=y.dtype)
    out[:, :n] = y  # BUG: every rank writes its columns at offset 0
    dist.all_reduce(out)
    return out


def gather_zeros_narrow_copy(x, w):
    # zeros in the output's dtype, then copy_ into a narrowed view of this rank's columns
    y = F.gelu(torch.matmul(x, w))
    world, rank = dist.get_world_size(), dist.get_rank()
    out = y.new_zeros(y.shape[0], y.shape[1] * world)
    out.narrow(1, rank * y.shape[1], y.shape[1]).copy_(y)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_zero_buffer_reversed(x, w):
    y = F.gelu(x @ w)
    n, world = y.shape[1], dist.get_world_size()
    slot = world - 1 - dist.get_rank()
    out = torch.zeros(x.shape[0], n * world, dtype=y.dtype)
    out[:, slot * n:(slot + 1) * n] = y  # BUG: the ranks' column blocks land in reverse order
    dist.all_reduce(out)
    return out


def total_keepdim_both(x):
    t = x.sum(-1, keepdim=True).sum(-2, keepdim=True)
    dist.all_reduce(t)
    return t.view(-1)


def total_mean_times_count(x):
    t = x.mean(dim=(1, 2)) * x.shape[1]  # BUG: multiplied by the seq length only, not seq * local hidden
    dist.all_reduce(t)
    return t


def _proj_inputs():
    return [rn(3, 4), rn(4, 6, seed=1)]


def _proj_inputs_tp4():
    return [rn(3, 4), rn(4, 8, seed=1)]


# --- asserts, size-1 collectives, dead code around a row-parallel MLP ----------------------------
# x replicated, w1 split by columns, w2 by rows

def mlp(x, w1, w2):
    return torch.relu(x @ w1) @ w2  # gg: mlp


def _groups():
    """A tensor-parallel group over every rank and a data-parallel group of size 1 per rank."""
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = dist.new_group(list(range(world)))
    dp = None
    for r in range(world):
        g = dist.new_group([r])
        if r == rank:
            dp = g
    return tp, dp


def mlp_asserts(x, w1, w2):
    assert x.shape[-1] == w1.shape[0], "hidden size mismatch"
    h = torch.relu(x @ w1)
    torch._assert_async(torch.isfinite(h).all())
    y = h @ w2
    dist.all_reduce(y)
    return y


def mlp_size1_group(x, w1, w2):
    tp, dp = _groups()
    y = torch.relu(x @ w1) @ w2
    dist.all_reduce(y, group=tp)
    dist.all_reduce(y, group=dp)  # data-parallel group of one rank: the identity
    return y


def mlp_dead_code(x, w1, w2):
    h = x @ w1
    unused = torch.softmax(h, dim=-1).sum()  # noqa: F841  (debug leftover)
    norm = h.norm()  # noqa: F841
    y = torch.relu(h) @ w2
    dist.all_reduce(y)
    return y


def mlp_all_three(x, w1, w2):
    tp, dp = _groups()
    torch._assert_async(torch.tensor(x.shape[0] > 0))
    h = torch.relu(x @ w1)
    _ = h.mean()
    y = h @ w2
    dist.all_reduce(y, group=dp)
    dist.all_reduce(y, group=tp)
    return y


def mlp_reduce_wrong_group(x, w1, w2):
    tp, dp = _groups()
    y = torch.relu(x @ w1) @ w2
    dist.all_reduce(y, group=dp)  # BUG: the partial sums must be reduced over the tensor-parallel group
    return y


def _mlp_inputs():
    return [rn(3, 4), rn(4, 8, seed=1), rn(8, 4, seed=2)]


def _c(name, seq, dist_fn, inputs, placements, expect, *, missing=None, world_size=2, culprit=None, twin=None,
       note="", domains=None):
    return SpellingCase(name=name, pattern="canonical", sequential=seq, distributed=dist_fn, inputs=inputs,
                        placements=placements, world_size=world_size, expect=expect, bug=twin is not None,
                        missing=missing or MISSING.get(name), culprit=culprit, twin=twin, note=note,
                        domains=domains)


# Why each case is not proved (or its bug not localized) yet: the missing engine mechanism.
_BIAS0 = ("partial sums: bias added on rank 0 only before the all-reduce: sum(mm@r0 + b, mm@r1) = "
          "sum(mm@r0, mm@r1) + b is not derived (a term added on exactly one rank; zeros on the others)")
_INDEX = ("canonical spellings: weight[local] (aten.index.Tensor, one index) is not treated as "
          "embedding(local, weight); the same clamp-and-mask program with F.embedding is proved")
MISSING = {
}

CASES = [
    _c("row-linear/addmm-flat", linear, rp_addmm_flat, _linear_inputs, [S2, S1, R], [R]),
    _c("row-linear/matmul-bias", linear, rp_matmul_bias, _linear_inputs, [S2, S1, R], [R]),
    _c("row-linear/linear-then-add", linear, rp_linear_then_bias, _linear_inputs, [S2, S1, R], [R]),
    _c("row-linear/bias-on-rank0", linear, rp_bias_on_rank0, _linear_inputs, [S2, S1, R], [R]),
    _c("row-linear/addmm-bias-rank0-zeros", linear, rp_addmm_bias_rank0, _linear_inputs, [S2, S1, R], [R]),
    _c("row-linear/bug-bias-every-rank", linear, rp_bias_every_rank, _linear_inputs, [S2, S1, R], [R],
       culprit="linear", twin="row-linear/bias-on-rank0"),
    _c("col-linear/addmm-flat", linear, cp_addmm_flat, _cp_inputs, [R, S0, S0], [S2]),
    _c("col-linear/matmul-bias", linear, cp_matmul_bias, _cp_inputs, [R, S0, S0], [S2]),
    _c("col-linear/F-linear", linear, cp_linear, _cp_inputs, [R, S0, S0], [S2]),
    _c("col-linear/einsum", linear, cp_einsum, _cp_inputs, [R, S0, S0], [S2]),
    _c("col-linear/bug-bias-wrong-shard", linear, cp_bias_wrong_shard, _cp_inputs, [R, S0, S0], [S2],
       culprit="linear", twin="col-linear/matmul-bias"),
    _c("multi-dim-sum/view-sum", per_sample_total, total_view_sum, _total_inputs, [S2], [R]),
    _c("multi-dim-sum/negative-dims", per_sample_total, total_negative_dims, _total_inputs, [S2], [R]),
    _c("multi-dim-sum/sum-twice", per_sample_total, total_twice, _total_inputs, [S2], [R]),
    _c("multi-dim-sum/flatten-keepdim", per_sample_total, total_flatten_keepdim, _total_inputs, [S2], [R]),
    _c("multi-dim-sum/bug-wrong-reshape", per_sample_total, total_wrong_reshape, _total_inputs, [S2], [R],
       culprit="total", twin="multi-dim-sum/view-sum"),
    _c("multi-dim-sum/keepdim-both", per_sample_total, total_keepdim_both, _total_inputs, [S2], [R]),
    _c("multi-dim-sum/bug-mean-times-count", per_sample_total, total_mean_times_count, _total_inputs, [S2], [R],
       culprit="total", twin="multi-dim-sum/keepdim-both"),
    _c("vocab-embed/megatron", embed, vp_megatron, _embed_inputs, [R, S0], [R]),
    _c("vocab-embed/torchtitan-clamp", embed, vp_torchtitan_clamp, _embed_inputs, [R, S0], [R]),
    _c("vocab-embed/where-multiply", embed, vp_where_index, _embed_inputs, [R, S0], [R]),
    # weight[ids] wraps a negative id where Megatron's masked lookup gives zeros: one value only for
    # ids in [0, V), which the user declares (without it the programs really differ)
    _c("vocab-embed/spec-index-megatron", embed_index, vp_megatron, _embed_inputs, [R, S0], [R],
       domains={"ids": range(0, VOCAB)}),
    _c("vocab-embed/tp4-torchtitan-clamp", embed, vp_torchtitan_clamp, _embed_inputs, [R, S0], [R], world_size=4),
    _c("vocab-embed/bug-wrong-offset", embed, vp_wrong_offset, _embed_inputs, [R, S0], [R],
       culprit="lookup", twin="vocab-embed/torchtitan-clamp"),
    _c("scores/baddbmm-empty-beta0", scores, hp_baddbmm_empty, _scores_inputs, [S0, S0], [S0]),
    _c("scores/scale-query-first", scores, hp_scale_query, _scores_inputs, [S0, S0], [S0]),
    _c("scores/matmul-mul-reciprocal", scores, hp_matmul_mul, _scores_inputs, [S0, S0], [S0]),
    _c("scores/bmm-permute-div", scores, hp_bmm_div, _scores_inputs, [S0, S0], [S0]),
    _c("scores/bug-wrong-scale", scores, hp_wrong_scale, _scores_inputs, [S0, S0], [S0],
       culprit="scores", twin="scores/baddbmm-empty-beta0"),
    _c("buffers/copy-into-empty", gelu_proj, gather_copy_into_empty, _proj_inputs, [R, S1], [R]),
    _c("buffers/matmul-out-slice-assign", gelu_proj, gather_slice_assign, _proj_inputs, [R, S1], [R]),
    _c("buffers/zero-buffer-allreduce", gelu_proj, gather_zero_buffer_allreduce, _proj_inputs, [R, S1], [R]),
    _c("buffers/cat-out", gelu_proj, gather_cat_out, _proj_inputs, [R, S1], [R]),
    _c("buffers/bug-no-offset", gelu_proj, gather_zero_buffer_no_offset, _proj_inputs, [R, S1], [R],
       culprit="proj", twin="buffers/zero-buffer-allreduce"),
    _c("buffers/zeros-narrow-copy", gelu_proj, gather_zeros_narrow_copy, _proj_inputs, [R, S1], [R]),
    _c("buffers/zero-buffer-tp4", gelu_proj, gather_zero_buffer_allreduce, _proj_inputs_tp4, [R, S1], [R], world_size=4),
    _c("buffers/bug-reversed-slots", gelu_proj, gather_zero_buffer_reversed, _proj_inputs, [R, S1], [R],
       culprit="proj", twin="buffers/zeros-narrow-copy"),
    _c("decorated/asserts", mlp, mlp_asserts, _mlp_inputs, [R, S1, S0], [R]),
    _c("decorated/size1-group", mlp, mlp_size1_group, _mlp_inputs, [R, S1, S0], [R]),
    _c("decorated/dead-code", mlp, mlp_dead_code, _mlp_inputs, [R, S1, S0], [R]),
    _c("decorated/all-three", mlp, mlp_all_three, _mlp_inputs, [R, S1, S0], [R]),
    _c("decorated/bug-wrong-group", mlp, mlp_reduce_wrong_group, _mlp_inputs, [R, S1, S0], [R],
       culprit="mlp", twin="decorated/size1-group"),
]
