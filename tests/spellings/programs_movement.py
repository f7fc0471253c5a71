"""Pattern 3, data movement: rotate_half, fused QKV and up-gate splits, interleaved layouts, Ulysses.

Every program only moves data between the pieces the ranks hold (slices, concatenations, views,
all-to-all), so each correct spelling is an exact identity on the same leaves and must be proved.
The bugs put a half, a third or a chunk in the wrong place.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg

from ._case import SpellingCase, rn

R = gg.Replicate()
S0, S1, S2 = gg.Shard(0), gg.Shard(1), gg.Shard(2)


# --- RoPE rotate_half under head-sharded tensor parallelism ------------------------------------
# x: [batch, seq, heads, head_dim] split along heads; cos, sin: [seq, 1, head_dim] replicated

def rope_rotate_half(x, cos, sin):
    d = x.shape[-1]
    x1 = x[..., : d // 2]
    x2 = x[..., d // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)  # gg: rotate
    return x * cos + rotated * sin  # gg: rope


def tp_rotate_half_slices(x, cos, sin):
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def tp_rotate_half_chunk(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos) + (torch.cat([x2.neg(), x1], dim=x.dim() - 1) * sin)


def tp_rotate_half_stack_flatten(x, cos, sin):
    x1, x2 = torch.split(x, x.shape[-1] // 2, dim=3)
    rotated = torch.stack((-x2, x1), dim=-2).flatten(-2)
    return torch.addcmul(x * cos, rotated, sin)


def tp_rotate_half_roll_sign(x, cos, sin):
    half = x.shape[-1] // 2
    sign = torch.cat([-torch.ones(half, dtype=x.dtype), torch.ones(half, dtype=x.dtype)])
    return x * cos + torch.roll(x, shifts=half, dims=-1) * sign * sin


def tp_rotate_half_roll_sign_tensor(x, cos, sin):
    # the sign vector from a Python list, the roll as a method with a negative shift (same rotation)
    half = x.shape[-1] // 2
    sign = torch.tensor([-1.0] * half + [1.0] * half, dtype=x.dtype)
    return x * cos + x.roll(-half, -1) * sign * sin


def tp_rotate_half_addcmul_inplace(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    out = x * cos
    out.addcmul_(torch.cat((-x2, x1), dim=-1), sin)
    return out


def tp_rotate_half_roll_sign_flipped(x, cos, sin):
    half = x.shape[-1] // 2
    sign = torch.cat([torch.ones(half, dtype=x.dtype), -torch.ones(half, dtype=x.dtype)])  # BUG: signs flipped
    return x * cos + torch.roll(x, shifts=half, dims=-1) * sign * sin


def tp_rotate_half_addcmul_negated(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((-x2, x1), dim=-1), sin, value=-1.0)  # BUG: value=-1 subtracts


def tp_rotate_half_swapped(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((x2, -x1), dim=-1)  # BUG: the halves' signs swapped: rotates the other way
    return x * cos + rotated * sin


def _rope_inputs():
    return [rn(2, 4, 4, 6), rn(4, 1, 6, seed=1), rn(4, 1, 6, seed=2)]


# --- fused QKV projection, column-sharded per block --------------------------------------------
# wqkv: [hidden, 3*hidden] = [wq | wk | wv]; each rank holds its columns of each block (a Layout)

def qkv_block_shard(w, rank, world_size):
    return torch.cat([blk.chunk(world_size, dim=1)[rank] for blk in w.chunk(3, dim=1)], dim=1)


QKV_LAYOUT = gg.Layout(qkv_block_shard, name="qkv-blocks")


def fused_qkv(x, wqkv):
    h = x.shape[-1]
    q, k, v = (x @ wqkv).split(h, dim=-1)  # gg: split
    return q * torch.sigmoid(k) + v  # gg: combine


def tp_qkv_chunk(x, wqkv):
    q, k, v = (x @ wqkv).chunk(3, dim=-1)
    return q * torch.sigmoid(k) + v


def tp_qkv_split_sizes(x, wqkv):
    n = wqkv.shape[1] // 3
    q, k, v = torch.split(torch.matmul(x, wqkv), [n, n, n], dim=2)
    return q * k.sigmoid() + v


def tp_qkv_view_unbind(x, wqkv):
    b, s, _ = x.shape
    q, k, v = F.linear(x, wqkv.t()).view(b, s, 3, -1).unbind(dim=2)
    return torch.sigmoid(k).mul(q).add(v)


def tp_qkv_shard_in_program(x, wqkv):
    # the rank receives the full fused weight and cuts its own columns of each block
    world, rank = dist.get_world_size(), dist.get_rank()
    wq, wk, wv = wqkv.chunk(3, dim=1)
    local = torch.cat([w.chunk(world, dim=1)[rank] for w in (wq, wk, wv)], dim=1)
    qkv = x @ local
    n = local.shape[1] // 3
    q, k, v = qkv[..., :n], qkv[..., n:2 * n], qkv[..., 2 * n:]
    return q * torch.sigmoid(k) + v


def tp_qkv_interleaved_split(x, wqkv):
    b, s, _ = x.shape
    q, k, v = (x @ wqkv).view(b, s, -1, 3).unbind(-1)  # BUG: per-column interleaved split of a block layout
    return q * torch.sigmoid(k) + v


def _qkv_inputs():
    return [rn(2, 3, 8), rn(8, 24, seed=1)]


# --- SwiGLU with a fused up-gate projection -----------------------------------------------------
# w_ug: [hidden, 2*ffn] = [w_up | w_gate]; w_down: [ffn, hidden] split by rows

def swiglu(x, w_ug, w_down):
    up, gate = (x @ w_ug).chunk(2, dim=-1)  # gg: glu
    act = up * F.silu(gate)  # gg: act
    return act @ w_down


def _local_up_gate(w_ug):
    world, rank = dist.get_world_size(), dist.get_rank()
    return torch.cat([half.chunk(world, dim=1)[rank] for half in w_ug.chunk(2, dim=1)], dim=1)


def glu_halves_shard(w, rank, world_size):
    return torch.cat([half.chunk(world_size, dim=1)[rank] for half in w.chunk(2, dim=1)], dim=1)


GLU_LAYOUT = gg.Layout(glu_halves_shard, name="up|gate halves")


def tp_swiglu_layout_chunk(x, w_ug, w_down):
    # w_ug arrives already sharded per half (GLU_LAYOUT): [w_up_r | w_gate_r]
    up, gate = torch.chunk(x @ w_ug, 2, dim=-1)
    out = (up * F.silu(gate)) @ w_down
    dist.all_reduce(out)
    return out


def tp_swiglu_chunk(x, w_ug, w_down):
    up, gate = (x @ _local_up_gate(w_ug)).chunk(2, dim=-1)
    out = (up * F.silu(gate)) @ w_down
    dist.all_reduce(out)
    return out


def tp_swiglu_split_halves(x, w_ug, w_down):
    w_up, w_gate = w_ug.split(w_ug.shape[1] // 2, dim=1)
    world, rank = dist.get_world_size(), dist.get_rank()
    up = x @ w_up.chunk(world, dim=1)[rank]
    gate = x @ w_gate.chunk(world, dim=1)[rank]
    out = torch.matmul(up * torch.sigmoid(gate) * gate, w_down)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def tp_swiglu_sigmoid_first(x, w_ug, w_down):
    # silu written out, factors in another order, the local halves cut with narrow
    w_up, w_gate = w_ug.chunk(2, dim=1)
    world, rank = dist.get_world_size(), dist.get_rank()
    n = w_up.shape[1] // world
    up = torch.matmul(x, w_up.narrow(1, rank * n, n))
    gate = torch.matmul(x, w_gate.narrow(1, rank * n, n))
    out = (torch.sigmoid(gate) * gate * up) @ w_down
    dist.all_reduce(out)
    return out


def tp_swiglu_missing_gate_factor(x, w_ug, w_down):
    w_up, w_gate = w_ug.chunk(2, dim=1)
    world, rank = dist.get_world_size(), dist.get_rank()
    up = x @ w_up.chunk(world, dim=1)[rank]
    gate = x @ w_gate.chunk(world, dim=1)[rank]
    out = (up * torch.sigmoid(gate)) @ w_down  # BUG: sigmoid(gate) is not silu(gate) = gate * sigmoid(gate)
    dist.all_reduce(out)
    return out


def tp_swiglu_view_unbind(x, w_ug, w_down):
    h = x @ _local_up_gate(w_ug)
    up, gate = h.view(*h.shape[:-1], 2, -1).unbind(-2)
    out = torch.mm((F.silu(gate) * up).flatten(0, 1), w_down).view(*x.shape[:-1], -1)
    dist.all_reduce(out)
    return out


def tp_swiglu_narrow(x, w_ug, w_down):
    h = x @ _local_up_gate(w_ug)
    n = h.shape[-1] // 2
    out = (h.narrow(-1, 0, n) * F.silu(h.narrow(-1, n, n))) @ w_down
    dist.all_reduce(out)
    return out


def tp_swiglu_naive_column_shard(x, w_ug, w_down):
    world, rank = dist.get_world_size(), dist.get_rank()
    local = w_ug.chunk(world, dim=1)[rank]  # BUG: a plain column shard of the fused weight mixes up and gate
    up, gate = (x @ local).chunk(2, dim=-1)
    out = (up * F.silu(gate)) @ w_down
    dist.all_reduce(out)
    return out


def _swiglu_inputs():
    return [rn(2, 3, 4), rn(4, 16, seed=1), rn(8, 4, seed=2)]


# --- stride-2 / interleaved layouts -------------------------------------------------------------
# GPT-J style interleaved RoPE (pairs (x[2i], x[2i+1])), heads split over the ranks

def rope_interleaved(x, cos, sin):
    x_even = x[..., ::2]
    x_odd = x[..., 1::2]
    out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)  # gg: pairs
    return out.flatten(-2)


def tp_rope_interleaved_stride(x, cos, sin):
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), -1).flatten(-2)


def tp_rope_interleaved_unflatten(x, cos, sin):
    pairs = x.unflatten(-1, (-1, 2))
    x_even, x_odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], dim=-1)
    return out.reshape(x.shape)


def tp_rope_interleaved_view_unbind(x, cos, sin):
    x_even, x_odd = x.view(*x.shape[:-1], x.shape[-1] // 2, 2).unbind(-1)
    out = torch.empty_like(x)
    out[..., ::2] = x_even * cos - x_odd * sin
    out[..., 1::2] = x_even * sin + x_odd * cos
    return out


def tp_rope_interleaved_halves(x, cos, sin):
    x_even, x_odd = x.chunk(2, dim=-1)  # BUG: halves, not even/odd pairs (the Llama layout on GPT-J weights)
    return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), -1).flatten(-2)


def _interleaved_inputs():
    return [rn(2, 4, 4, 6), rn(4, 1, 3, seed=1), rn(4, 1, 3, seed=2)]


# rows dealt round-robin to the ranks (rank r holds rows r, r+W, r+2W, ...), gathered back in order

def row_cyclic(t, rank, world_size):
    # t[rank::world_size], written with a view and a select (a Layout may not use a strided slice)
    return t.view(-1, world_size, *t.shape[1:])[:, rank]


CYCLIC = gg.Layout(row_cyclic, name="rows round-robin")


def scale_rows(x, w):
    return torch.tanh(x @ w)  # gg: rows


def cyclic_gather_stack(x, w):
    y = torch.tanh(x @ w)
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.stack(parts, dim=1).flatten(0, 1)


def cyclic_gather_transpose(x, w):
    y = torch.tanh(x @ w)
    world = dist.get_world_size()
    out = torch.empty(world * y.shape[0], y.shape[1], dtype=y.dtype)
    dist.all_gather_into_tensor(out, y)
    return out.view(world, -1, y.shape[1]).transpose(0, 1).reshape(-1, y.shape[1])


def cyclic_gather_strided_writes(x, w):
    y = torch.tanh(x @ w)
    world = dist.get_world_size()
    parts = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(parts, y)
    out = y.new_empty(world * y.shape[0], y.shape[1])
    for r, p in enumerate(parts):
        out[r::world] = p
    return out


def cyclic_gather_cat(x, w):
    y = torch.tanh(x @ w)
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts, dim=0)  # BUG: concatenated in rank order, rows stay dealt round-robin


def _cyclic_inputs():
    return [rn(8, 4), rn(4, 3, seed=1)]


# --- Ulysses: all_to_all re-layout sequence <-> heads --------------------------------------------
# x: [seq, heads, head_dim] split along seq; a per-head operation that needs the whole sequence

def softmax_over_seq(x):
    return torch.softmax(x, dim=0)  # gg: softmax


def _seq_to_heads(x, world):
    s_local, heads, d = x.shape
    send = x.reshape(s_local, world, heads // world, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return recv.reshape(world * s_local, heads // world, d)


def _heads_to_seq(y, world):
    s, heads_local, d = y.shape
    send = y.reshape(world, s // world, heads_local, d).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return recv.transpose(0, 1).reshape(s // world, world * heads_local, d)


def ulysses_reshape_transpose(x):
    world = dist.get_world_size()
    y = _seq_to_heads(x, world).softmax(dim=0)
    return _heads_to_seq(y, world)


def ulysses_chunk_cat(x):
    world = dist.get_world_size()
    send = torch.cat([c.unsqueeze(0) for c in x.chunk(world, dim=1)], dim=0)  # [W, s/W, H/W, d]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    y = torch.cat(list(recv.unbind(0)), dim=0).softmax(0)
    back = torch.stack(y.chunk(world, dim=0))
    out = torch.empty_like(back)
    dist.all_to_all_single(out, back)
    return torch.cat(list(out.unbind(0)), dim=1)


def ulysses_heads_first(x):
    # heads-first layout internally: [heads, seq, d]
    world = dist.get_world_size()
    xt = x.permute(1, 0, 2).contiguous()  # [H, s/W, d]
    recv = torch.empty_like(xt)
    dist.all_to_all_single(recv, xt)  # recv[j*H/W:(j+1)*H/W] is rank j's sequence chunk of my heads
    h_local = xt.shape[0] // world
    y = recv.view(world, h_local, -1, xt.shape[-1]).permute(1, 0, 2, 3).reshape(h_local, -1, xt.shape[-1])
    y = torch.softmax(y, dim=1)
    send = y.view(h_local, world, -1, xt.shape[-1]).permute(1, 0, 2, 3).contiguous()
    back = torch.empty_like(send)
    dist.all_to_all_single(back, send)
    return back.reshape(-1, back.shape[2], back.shape[3]).permute(1, 0, 2)


def ulysses_missing_transpose_back(x):
    world = dist.get_world_size()
    y = _seq_to_heads(x, world).softmax(dim=0)
    s, heads_local, d = y.shape
    send = y.reshape(world, s // world, heads_local, d).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return recv.reshape(s // world, world * heads_local, d)  # BUG: [W, s/W, ...] viewed as [s/W, W*...]


def _ulysses_inputs():
    return [rn(8, 4, 3)]


def _c(name, seq, dist_fn, inputs, placements, expect, *, missing=None, world_size=2, culprit=None, twin=None,
       note=""):
    return SpellingCase(name=name, pattern="movement", sequential=seq, distributed=dist_fn, inputs=inputs,
                        placements=placements, world_size=world_size, expect=expect, bug=twin is not None,
                        missing=missing or MISSING.get(name), culprit=culprit, twin=twin, note=note)


# Why each case is not proved (or its bug not localized) yet: the missing engine mechanism.
_STRIDE = ("data movement: stride-2 slice x[..., ::2] of a head-sharded tensor has no lemma (slice with step 2 on "
           "an unsharded dim); unflatten+select and strided writes not normalized to the same index map")
_CYCLIC = ("data movement: the engine relates seq tanh to the round-robin concat(tanh@r0[0:1], tanh@r1[0:1], ...), "
           "but the ranks' re-interleaving (all_gather + stack/transpose/strided writes) is not normalized to it")
_ULY = ("data movement: all_to_all re-layout: seq softmax(dim 0) of concat(x@r, dim=0) must be re-related to the "
        "heads tiling the ranks hold after all_to_all_single, and the return all_to_all normalized back to dim 0")
MISSING: dict = {}

CASES = [
    _c("rotate-half/slices", rope_rotate_half, tp_rotate_half_slices, _rope_inputs, [S2, R, R], [S2]),
    _c("rotate-half/chunk-neg", rope_rotate_half, tp_rotate_half_chunk, _rope_inputs, [S2, R, R], [S2]),
    _c("rotate-half/split-stack-flatten-addcmul", rope_rotate_half, tp_rotate_half_stack_flatten, _rope_inputs,
       [S2, R, R], [S2]),
    _c("rotate-half/roll-times-sign", rope_rotate_half, tp_rotate_half_roll_sign, _rope_inputs, [S2, R, R], [S2]),
    _c("rotate-half/bug-swapped-halves", rope_rotate_half, tp_rotate_half_swapped, _rope_inputs, [S2, R, R], [S2],
       culprit="rotate", twin="rotate-half/chunk-neg"),
    _c("rotate-half/roll-sign-tensor", rope_rotate_half, tp_rotate_half_roll_sign_tensor, _rope_inputs, [S2, R, R],
       [S2]),
    _c("rotate-half/addcmul-inplace", rope_rotate_half, tp_rotate_half_addcmul_inplace, _rope_inputs, [S2, R, R],
       [S2]),
    _c("rotate-half/bug-roll-sign-flipped", rope_rotate_half, tp_rotate_half_roll_sign_flipped, _rope_inputs,
       [S2, R, R], [S2], culprit="rotate", twin="rotate-half/roll-times-sign"),
    _c("rotate-half/bug-addcmul-negated", rope_rotate_half, tp_rotate_half_addcmul_negated, _rope_inputs,
       [S2, R, R], [S2], culprit="rope", twin="rotate-half/split-stack-flatten-addcmul"),
    _c("fused-qkv/chunk", fused_qkv, tp_qkv_chunk, _qkv_inputs, [R, QKV_LAYOUT], [S2]),
    _c("fused-qkv/split-sizes", fused_qkv, tp_qkv_split_sizes, _qkv_inputs, [R, QKV_LAYOUT], [S2]),
    _c("fused-qkv/view-unbind", fused_qkv, tp_qkv_view_unbind, _qkv_inputs, [R, QKV_LAYOUT], [S2]),
    _c("fused-qkv/shard-in-program", fused_qkv, tp_qkv_shard_in_program, _qkv_inputs, [R, R], [S2]),
    _c("fused-qkv/tp4-chunk", fused_qkv, tp_qkv_chunk, _qkv_inputs, [R, QKV_LAYOUT], [S2], world_size=4),
    _c("fused-qkv/bug-interleaved-split", fused_qkv, tp_qkv_interleaved_split, _qkv_inputs, [R, QKV_LAYOUT], [S2],
       culprit="combine", twin="fused-qkv/chunk"),
    _c("swiglu/layout-chunk", swiglu, tp_swiglu_layout_chunk, _swiglu_inputs, [R, GLU_LAYOUT, S0], [R]),
    _c("swiglu/chunk", swiglu, tp_swiglu_chunk, _swiglu_inputs, [R, R, S0], [R]),
    _c("swiglu/split-halves-unfused", swiglu, tp_swiglu_split_halves, _swiglu_inputs, [R, R, S0], [R]),
    _c("swiglu/sigmoid-first-narrow", swiglu, tp_swiglu_sigmoid_first, _swiglu_inputs, [R, R, S0], [R]),
    _c("swiglu/bug-missing-gate-factor", swiglu, tp_swiglu_missing_gate_factor, _swiglu_inputs, [R, R, S0], [R],
       culprit="act", twin="swiglu/split-halves-unfused"),
    _c("swiglu/view-unbind-2d-mm", swiglu, tp_swiglu_view_unbind, _swiglu_inputs, [R, R, S0], [R]),
    _c("swiglu/narrow", swiglu, tp_swiglu_narrow, _swiglu_inputs, [R, R, S0], [R]),
    _c("swiglu/bug-naive-column-shard", swiglu, tp_swiglu_naive_column_shard, _swiglu_inputs, [R, R, S0], [R],
       culprit="act", twin="swiglu/chunk"),
    _c("interleaved-rope/stride-2", rope_interleaved, tp_rope_interleaved_stride, _interleaved_inputs,
       [S2, R, R], [S2]),
    _c("interleaved-rope/unflatten-pairs", rope_interleaved, tp_rope_interleaved_unflatten, _interleaved_inputs,
       [S2, R, R], [S2]),
    _c("interleaved-rope/view-unbind-strided-writes", rope_interleaved, tp_rope_interleaved_view_unbind,
       _interleaved_inputs, [S2, R, R], [S2]),
    _c("interleaved-rope/bug-halves", rope_interleaved, tp_rope_interleaved_halves, _interleaved_inputs,
       [S2, R, R], [S2], culprit="pairs", twin="interleaved-rope/stride-2"),
    _c("cyclic-rows/gather-stack", scale_rows, cyclic_gather_stack, _cyclic_inputs, [CYCLIC, R], [R]),
    _c("cyclic-rows/gather-into-tensor-transpose", scale_rows, cyclic_gather_transpose, _cyclic_inputs,
       [CYCLIC, R], [R]),
    _c("cyclic-rows/strided-writes", scale_rows, cyclic_gather_strided_writes, _cyclic_inputs, [CYCLIC, R], [R]),
    _c("cyclic-rows/bug-cat", scale_rows, cyclic_gather_cat, _cyclic_inputs, [CYCLIC, R], [R],
       culprit="rows", twin="cyclic-rows/gather-stack"),
    _c("ulysses/reshape-transpose", softmax_over_seq, ulysses_reshape_transpose, _ulysses_inputs, [S0], [S0]),
    _c("ulysses/chunk-cat", softmax_over_seq, ulysses_chunk_cat, _ulysses_inputs, [S0], [S0]),
    _c("ulysses/heads-first", softmax_over_seq, ulysses_heads_first, _ulysses_inputs, [S0], [S0]),
    _c("ulysses/sp4-reshape-transpose", softmax_over_seq, ulysses_reshape_transpose, _ulysses_inputs, [S0], [S0],
       world_size=4),
    _c("ulysses/bug-missing-transpose-back", softmax_over_seq, ulysses_missing_transpose_back, _ulysses_inputs,
       [S0], [S0], culprit="softmax", twin="ulysses/reshape-transpose"),
]
