"""Pattern 2, input-independent values: positions, causal masks and rotary tables built in the program.

Sequence parallel: the sequence is split over the ranks (rank r holds positions
``[r * S/W, (r + 1) * S/W)``), so everything a rank derives from positions (position ids, mask rows,
cos/sin rows) must start at its offset. Those values depend on no input: each spelling computes
them differently (arange with an offset, a slice of the global table, a comparison of aranges) and
they must be compared by value. The bug in each group forgets the rank offset.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg

from ._case import SpellingCase, rn

R, S0, S1 = gg.Replicate(), gg.Shard(0), gg.Shard(1)


# --- position ids: learned absolute position embeddings (GPT-2's wpe) under sequence parallel ---
# x: [batch, seq, hidden] split along seq; wpe: [max_positions, hidden] replicated

def add_positions(x, wpe):
    pos = torch.arange(x.shape[1])
    return x + F.embedding(pos, wpe)  # gg: positions


def sp_positions_arange_start_end(x, wpe):
    s_local = x.shape[1]
    start = dist.get_rank() * s_local
    pos = torch.arange(start, start + s_local)
    return x + F.embedding(pos, wpe)


def sp_positions_offset_added(x, wpe):
    s_local = x.size(1)
    pos = torch.arange(s_local, dtype=torch.long) + dist.get_rank() * s_local
    return x + wpe[pos]


def sp_positions_chunk_of_global(x, wpe):
    world, rank = dist.get_world_size(), dist.get_rank()
    pos = torch.arange(x.shape[1] * world).chunk(world)[rank]
    return x + F.embedding(pos.unsqueeze(0).expand(x.shape[0], -1), wpe)


def sp_positions_slice_table(x, wpe):
    s_local = x.shape[1]
    rank = dist.get_rank()
    return x + wpe[rank * s_local:(rank + 1) * s_local]


def sp_positions_no_offset(x, wpe):
    pos = torch.arange(x.shape[1])  # BUG: every rank uses positions 0..S/W-1
    return x + F.embedding(pos, wpe)


def sp_positions_narrow_table(x, wpe):
    s_local = x.size(1)
    return x + wpe.narrow(0, dist.get_rank() * s_local, s_local).unsqueeze(0)


def sp_positions_off_by_one(x, wpe):
    s_local, rank = x.shape[1], dist.get_rank()
    return x + wpe[rank * s_local + 1:(rank + 1) * s_local + 1]  # BUG: rows shifted by one position


def _pos_inputs():
    return [rn(2, 8, 6), rn(16, 6, seed=1)]


# --- causal mask rows for the local queries (sequence-parallel queries, full keys) --------------
# q: [seq, d] split along seq; k: [seq, d] replicated (already gathered)

def causal_probs(q, k):
    s = q.shape[0]
    scores = q @ k.t() / math.sqrt(q.shape[-1])
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1)  # gg: masked


def cp_mask_rows_of_global(q, k):
    s_local, s = q.shape[0], k.shape[0]
    start = dist.get_rank() * s_local
    scores = q @ k.t() / math.sqrt(q.shape[-1])
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)[start:start + s_local]
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


def cp_mask_triu_diagonal(q, k):
    s_local, s = q.shape[0], k.shape[0]
    start = dist.get_rank() * s_local
    scores = torch.matmul(q, k.transpose(0, 1)) / math.sqrt(q.shape[-1])
    mask = torch.triu(torch.ones(s_local, s, dtype=torch.bool), diagonal=1 + start)
    return torch.softmax(scores.masked_fill(mask, -math.inf), dim=-1)


def cp_mask_arange_compare(q, k):
    s_local, s = q.shape[0], k.shape[0]
    start = dist.get_rank() * s_local
    q_pos = torch.arange(start, start + s_local)[:, None]
    k_pos = torch.arange(s)[None, :]
    scores = q @ k.t() / math.sqrt(q.shape[-1])
    return scores.masked_fill(k_pos > q_pos, float("-inf")).softmax(dim=-1)


def cp_mask_tril_where(q, k):
    s_local, s = q.shape[0], k.shape[0]
    start = dist.get_rank() * s_local
    keep = torch.tril(torch.ones(s_local, s), diagonal=start).bool()
    scores = q @ k.t() / math.sqrt(q.shape[-1])
    scores = torch.where(keep, scores, torch.full_like(scores, float("-inf")))
    return scores.softmax(-1)


def cp_mask_no_offset(q, k):
    s_local, s = q.shape[0], k.shape[0]
    scores = q @ k.t() / math.sqrt(q.shape[-1])
    mask = torch.ones(s_local, s, dtype=torch.bool).triu(1)  # BUG: the diagonal ignores the rank's offset
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


def cp_mask_additive_zeros_masked_fill(q, k):
    # an additive float mask: zeros with -inf above this rank's diagonal
    s_local, s = q.shape[0], k.shape[0]
    start = dist.get_rank() * s_local
    rows = torch.arange(start, start + s_local).unsqueeze(1)
    bias = torch.zeros(s_local, s, dtype=q.dtype).masked_fill(torch.arange(s) > rows, float("-inf"))
    return (q @ k.t() / math.sqrt(q.shape[-1]) + bias).softmax(-1)


def cp_mask_see_one_ahead(q, k):
    s_local, s = q.shape[0], k.shape[0]
    start = dist.get_rank() * s_local
    mask = torch.ones(s_local, s, dtype=torch.bool).triu(2 + start)  # BUG: each query also sees the next key
    return (q @ k.t() / math.sqrt(q.shape[-1])).masked_fill(mask, float("-inf")).softmax(-1)


def _mask_inputs():
    return [rn(8, 4), rn(8, 4, seed=1)]


# --- rotary cos/sin tables computed inside the program (sequence parallel) ---------------------
# x: [batch, seq, heads, head_dim] split along seq

def _inv_freq(d):
    return 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))


def rope_seq(x):
    d = x.shape[-1]
    t = torch.arange(x.shape[1], dtype=torch.float64)
    freqs = torch.outer(t, _inv_freq(d))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]  # gg: tables
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin  # gg: rope


def sp_rope_positions_offset(x):
    d, s_local = x.shape[-1], x.shape[1]
    start = dist.get_rank() * s_local
    t = torch.arange(start, start + s_local, dtype=torch.float64)
    freqs = torch.outer(t, _inv_freq(d))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def sp_rope_slice_cache(x):
    # a rotary cache for the whole (global) sequence, sliced to this rank's positions
    d, s_local = x.shape[-1], x.shape[1]
    world, rank = dist.get_world_size(), dist.get_rank()
    t = torch.arange(s_local * world, dtype=torch.float64)
    freqs = torch.einsum("i,j->ij", t, _inv_freq(d))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos_cached, sin_cached = emb.cos(), emb.sin()
    cos = cos_cached[rank * s_local:(rank + 1) * s_local].unsqueeze(1)
    sin = sin_cached[rank * s_local:(rank + 1) * s_local].unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def sp_rope_position_ids(x):
    # position ids as a [batch, seq] tensor (transformers' LlamaRotaryEmbedding style)
    b, s_local, _, d = x.shape
    position_ids = (torch.arange(s_local) + dist.get_rank() * s_local).unsqueeze(0).expand(b, -1)
    inv_freq = _inv_freq(d)
    freqs = (inv_freq[None, :, None] @ position_ids[:, None, :].to(torch.float64)).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().unsqueeze(2), emb.sin().unsqueeze(2)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return (x * cos) + (torch.cat((-x2, x1), dim=-1) * sin)


def sp_rope_no_offset(x):
    d, s_local = x.shape[-1], x.shape[1]
    t = torch.arange(s_local, dtype=torch.float64)  # BUG: positions 0..S/W-1 on every rank
    freqs = torch.outer(t, _inv_freq(d))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def sp_rope_table_expanded(x):
    # the tables broadcast explicitly to the activations' shape
    d, s_local = x.shape[-1], x.shape[1]
    t = torch.arange(s_local, dtype=torch.float64) + dist.get_rank() * s_local
    freqs = t[:, None] * _inv_freq(d)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :].expand_as(x)
    x1, x2 = x.chunk(2, -1)
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def sp_rope_offset_by_world(x):
    d, s_local = x.shape[-1], x.shape[1]
    start = dist.get_rank() * dist.get_world_size()  # BUG: offset by the world size, not the local length
    t = torch.arange(start, start + s_local, dtype=torch.float64)
    emb = torch.cat((torch.outer(t, _inv_freq(d)),) * 2, dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos()[:, None, :] + torch.cat((-x2, x1), dim=-1) * emb.sin()[:, None, :]


def _rope_inputs():
    return [rn(2, 8, 2, 4)]


def _c(name, seq, dist_fn, inputs, placements, expect, *, missing=None, world_size=2, culprit=None, twin=None,
       note=""):
    return SpellingCase(name=name, pattern="constants", sequential=seq, distributed=dist_fn, inputs=inputs,
                        placements=placements, world_size=world_size, expect=expect, bug=twin is not None,
                        missing=missing or MISSING.get(name), culprit=culprit, twin=twin, note=note)


# Why each case is not proved (or its bug not localized) yet: the missing engine mechanism.
_LOCALIZE = "localization needs the correct twin proved first (both stop at the same operator today)"
MISSING = {
}

CASES = [
    _c("positions/arange-start-end", add_positions, sp_positions_arange_start_end, _pos_inputs, [S1, R], [S1]),
    _c("positions/arange-plus-offset-index", add_positions, sp_positions_offset_added, _pos_inputs, [S1, R], [S1]),
    _c("positions/chunk-of-global-arange", add_positions, sp_positions_chunk_of_global, _pos_inputs, [S1, R], [S1]),
    _c("positions/slice-of-table", add_positions, sp_positions_slice_table, _pos_inputs, [S1, R], [S1]),
    _c("positions/sp4-arange-start-end", add_positions, sp_positions_arange_start_end, _pos_inputs, [S1, R], [S1],
       world_size=4),
    _c("positions/bug-no-offset", add_positions, sp_positions_no_offset, _pos_inputs, [S1, R], [S1],
       culprit="positions", twin="positions/arange-start-end"),
    _c("positions/narrow-table", add_positions, sp_positions_narrow_table, _pos_inputs, [S1, R], [S1]),
    _c("positions/bug-slice-off-by-one", add_positions, sp_positions_off_by_one, _pos_inputs, [S1, R], [S1],
       culprit="positions", twin="positions/slice-of-table"),
    _c("causal-mask/rows-of-global", causal_probs, cp_mask_rows_of_global, _mask_inputs, [S0, R], [S0]),
    _c("causal-mask/triu-diagonal-offset", causal_probs, cp_mask_triu_diagonal, _mask_inputs, [S0, R], [S0]),
    _c("causal-mask/arange-compare", causal_probs, cp_mask_arange_compare, _mask_inputs, [S0, R], [S0]),
    _c("causal-mask/tril-where", causal_probs, cp_mask_tril_where, _mask_inputs, [S0, R], [S0]),
    _c("causal-mask/additive-zeros-masked_fill", causal_probs, cp_mask_additive_zeros_masked_fill, _mask_inputs,
       [S0, R], [S0]),
    _c("causal-mask/bug-sees-one-key-ahead", causal_probs, cp_mask_see_one_ahead, _mask_inputs, [S0, R], [S0],
       culprit="masked", twin="causal-mask/triu-diagonal-offset"),
    _c("causal-mask/bug-no-offset", causal_probs, cp_mask_no_offset, _mask_inputs, [S0, R], [S0],
       culprit="masked", twin="causal-mask/triu-diagonal-offset"),
    _c("rope-tables/positions-offset", rope_seq, sp_rope_positions_offset, _rope_inputs, [S1], [S1]),
    _c("rope-tables/slice-of-cache", rope_seq, sp_rope_slice_cache, _rope_inputs, [S1], [S1]),
    _c("rope-tables/position-ids-matmul", rope_seq, sp_rope_position_ids, _rope_inputs, [S1], [S1]),
    _c("rope-tables/sp4-positions-offset", rope_seq, sp_rope_positions_offset, _rope_inputs, [S1], [S1], world_size=4),
    _c("rope-tables/table-expanded-to-activations", rope_seq, sp_rope_table_expanded, _rope_inputs, [S1], [S1]),
    _c("rope-tables/bug-offset-by-world-size", rope_seq, sp_rope_offset_by_world, _rope_inputs, [S1], [S1],
       culprit="rope", twin="rope-tables/positions-offset"),
    _c("rope-tables/bug-no-offset", rope_seq, sp_rope_no_offset, _rope_inputs, [S1], [S1],
       culprit="rope", twin="rope-tables/positions-offset"),
]
