"""Spelling suite, pattern 7: the attention family.

Multi-head attention with heads sharded across ranks (column-parallel Q/K/V, row-parallel output
projection + all-reduce), written with matmul / einsum / one head per rank; GQA and MQA with
``repeat_kv`` (expand + reshape) and ``repeat_interleave``; causal masks as an additive
``triu(full(-inf), 1)`` or a ``masked_fill`` with a ``tril`` bool mask; RoPE in real form
(``rotate_half``) and complex form (``view_as_complex`` / ``torch.polar``, Llama style), heads sharded
or sequence sharded (positions offset by the rank). ``x``: [batch, seq, hidden].
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gg_notebook as gg

from ._case import SpellingCase, rn

B, S, H = 2, 8, 16
NH = 4  # heads
D = H // NH


def _x():
    return rn(B, S, H, seed=0)


def _w(rows, cols, seed):
    return rn(rows, cols, seed=seed) / math.sqrt(rows)


# ---------------------------------------------------------------------------------------------
# MHA, heads sharded


def mha_spec(x, wq, wk, wv, wo):
    b, s, _ = x.shape
    q = (x @ wq).view(b, s, NH, D).transpose(1, 2)
    k = (x @ wk).view(b, s, NH, D).transpose(1, 2)
    v = (x @ wv).view(b, s, NH, D).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    mask = torch.triu(torch.full((s, s), float("-inf"), dtype=x.dtype), 1)
    p = torch.softmax(scores + mask, dim=-1)
    return (p @ v).transpose(1, 2).reshape(b, s, NH * D) @ wo


def mha_spec_bug_scale(x, wq, wk, wv, wo):
    b, s, _ = x.shape
    q = (x @ wq).view(b, s, NH, D).transpose(1, 2)
    k = (x @ wk).view(b, s, NH, D).transpose(1, 2)
    v = (x @ wv).view(b, s, NH, D).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # gg: scale
    mask = torch.triu(torch.full((s, s), float("-inf"), dtype=x.dtype), 1)
    p = torch.softmax(scores + mask, dim=-1)
    return (p @ v).transpose(1, 2).reshape(b, s, NH * D) @ wo


def mha_spec_bug_mask(x, wq, wk, wv, wo):
    b, s, _ = x.shape
    q = (x @ wq).view(b, s, NH, D).transpose(1, 2)
    k = (x @ wk).view(b, s, NH, D).transpose(1, 2)
    v = (x @ wv).view(b, s, NH, D).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    mask = torch.triu(torch.full((s, s), float("-inf"), dtype=x.dtype), 1)
    p = torch.softmax(scores + mask, dim=-1)  # gg: mask
    return (p @ v).transpose(1, 2).reshape(b, s, NH * D) @ wo


def mha_tp_masked_fill(x, wq, wk, wv, wo):
    heads = NH // dist.get_world_size()
    b, s, _ = x.shape
    q = torch.matmul(x, wq).reshape(b, s, heads, D).permute(0, 2, 1, 3)
    k = torch.matmul(x, wk).reshape(b, s, heads, D).permute(0, 2, 1, 3)
    v = torch.matmul(x, wv).reshape(b, s, heads, D).permute(0, 2, 1, 3)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D)
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    scores = scores.masked_fill(~causal, float("-inf"))
    ctx = torch.matmul(scores.softmax(dim=-1), v)
    out = ctx.permute(0, 2, 1, 3).reshape(b, s, heads * D) @ wo
    dist.all_reduce(out)
    return out


def mha_tp_einsum(x, wq, wk, wv, wo):
    heads = wq.shape[1] // D
    q = torch.einsum("bsh,hd->bsd", x, wq).unflatten(-1, (heads, D))
    k = torch.einsum("bsh,hd->bsd", x, wk).unflatten(-1, (heads, D))
    v = torch.einsum("bsh,hd->bsd", x, wv).unflatten(-1, (heads, D))
    scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(D)
    s = x.shape[1]
    scores = scores + torch.full((s, s), float("-inf"), dtype=x.dtype).triu(1)
    p = F.softmax(scores, dim=-1)
    ctx = torch.einsum("bnqk,bknd->bqnd", p, v).flatten(2)
    out = torch.einsum("bsd,dh->bsh", ctx, wo)
    dist.all_reduce(out)
    return out


def mha_tp_head_loop(x, wq, wk, wv, wo):
    """A loop over this rank's heads, each a plain 2-D-per-batch attention, concatenated."""
    heads = NH // dist.get_world_size()
    s = x.shape[1]
    mask = torch.triu(torch.full((s, s), float("-inf"), dtype=x.dtype), diagonal=1)
    outs = []
    for h in range(heads):
        cols = slice(h * D, (h + 1) * D)
        q, k, v = x @ wq[:, cols], x @ wk[:, cols], x @ wv[:, cols]
        p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D) + mask, dim=-1)
        outs.append(p @ v)
    out = torch.cat(outs, dim=-1) @ wo
    dist.all_reduce(out)
    return out


def mha_tp_sdpa(x, wq, wk, wv, wo):
    heads = NH // dist.get_world_size()
    b, s, _ = x.shape
    q, k, v = ((x @ w).view(b, s, heads, D).transpose(1, 2) for w in (wq, wk, wv))
    ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = ctx.transpose(1, 2).reshape(b, s, -1) @ wo
    dist.all_reduce(out)
    return out


def mha_tp_local_head_dim(x, wq, wk, wv, wo):
    b, s, _ = x.shape
    heads = NH // dist.get_world_size()
    head_dim = wq.shape[1] // NH  # BUG: this rank's columns divided by the *global* head count
    q = (x @ wq).view(b, s, heads, D).transpose(1, 2)
    k = (x @ wk).view(b, s, heads, D).transpose(1, 2)
    v = (x @ wv).view(b, s, heads, D).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    mask = torch.triu(torch.full((s, s), float("-inf"), dtype=x.dtype), 1)
    ctx = torch.softmax(scores + mask, dim=-1) @ v
    out = ctx.transpose(1, 2).reshape(b, s, heads * D) @ wo
    dist.all_reduce(out)
    return out


def mha_tp_where_arange(x, wq, wk, wv, wo):
    heads = NH // dist.get_world_size()
    b, s, _ = x.shape
    q, k, v = (torch.matmul(x, w).view(b, s, heads, D).transpose(1, 2) for w in (wq, wk, wv))
    scores = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5
    pos = torch.arange(s)
    scores = torch.where(pos[None, :] <= pos[:, None], scores, float("-inf"))  # keys up to the query
    out = torch.matmul(F.softmax(scores, dim=-1), v).transpose(1, 2).flatten(2) @ wo
    dist.all_reduce(out)
    return out


def mha_tp_sees_next(x, wq, wk, wv, wo):
    b, s, _ = x.shape
    heads = NH // dist.get_world_size()
    q = (x @ wq).view(b, s, heads, D).transpose(1, 2)
    k = (x @ wk).view(b, s, heads, D).transpose(1, 2)
    v = (x @ wv).view(b, s, heads, D).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    mask = torch.triu(torch.full((s, s), float("-inf"), dtype=x.dtype), 2)  # BUG: diagonal=2 lets a query see the next key
    ctx = torch.softmax(scores + mask, dim=-1) @ v
    out = ctx.transpose(1, 2).reshape(b, s, heads * D) @ wo
    dist.all_reduce(out)
    return out


def mha_tp_no_mask(x, wq, wk, wv, wo):
    b, s, _ = x.shape
    heads = NH // dist.get_world_size()
    q = (x @ wq).view(b, s, heads, D).transpose(1, 2)
    k = (x @ wk).view(b, s, heads, D).transpose(1, 2)
    v = (x @ wv).view(b, s, heads, D).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    ctx = torch.softmax(scores, dim=-1) @ v  # BUG: the causal mask is never applied
    out = ctx.transpose(1, 2).reshape(b, s, heads * D) @ wo
    dist.all_reduce(out)
    return out


def _mha_in():
    return [_x(), _w(H, H, 1), _w(H, H, 2), _w(H, H, 3), _w(H, H, 4)]


# one head per rank: NH1 = world size heads

NH1, D1 = 2, H // 2


def mha1_spec(x, wq, wk, wv, wo):
    b, s, _ = x.shape
    q = (x @ wq).view(b, s, NH1, D1).transpose(1, 2)
    k = (x @ wk).view(b, s, NH1, D1).transpose(1, 2)
    v = (x @ wv).view(b, s, NH1, D1).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D1), dim=-1)
    return (p @ v).transpose(1, 2).reshape(b, s, H) @ wo


def mha1_rank(x, wq, wk, wv, wo):
    q, k, v = x @ wq, x @ wk, x @ wv  # [B, S, D1]: this rank's single head, no head dim at all
    p = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * D1 ** -0.5, dim=-1)
    out = torch.bmm(p, v) @ wo
    dist.all_reduce(out)
    return out


# ---------------------------------------------------------------------------------------------
# GQA / MQA: Q heads sharded, KV heads sharded consistently (or replicated for MQA)

GQ, GKV, GD = 8, 4, 2  # 8 query heads, 4 kv heads, head dim 2 (hidden 16)


def repeat_kv(x, n_rep):
    """Llama's repeat_kv: [b, kv, s, d] -> [b, kv * n_rep, s, d] by expand + reshape."""
    b, kv, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


def _gqa(x, wq, wk, wv, wo, q_heads, kv_heads, expand):
    b, s, _ = x.shape
    q = (x @ wq).view(b, s, q_heads, GD).transpose(1, 2)
    k = (x @ wk).view(b, s, kv_heads, GD).transpose(1, 2)
    v = (x @ wv).view(b, s, kv_heads, GD).transpose(1, 2)
    k, v = expand(k, q_heads // kv_heads), expand(v, q_heads // kv_heads)
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(GD), dim=-1)
    return (p @ v).transpose(1, 2).reshape(b, s, q_heads * GD) @ wo


def gqa_spec_repeat_kv(x, wq, wk, wv, wo):
    return _gqa(x, wq, wk, wv, wo, GQ, GKV, repeat_kv)


def gqa_spec_interleave(x, wq, wk, wv, wo):
    return _gqa(x, wq, wk, wv, wo, GQ, GKV, lambda t, n: t.repeat_interleave(n, dim=1))


def gqa_spec_bug(x, wq, wk, wv, wo):
    b, s, _ = x.shape
    q = (x @ wq).view(b, s, GQ, GD).transpose(1, 2)
    k = repeat_kv((x @ wk).view(b, s, GKV, GD).transpose(1, 2), GQ // GKV)
    v = repeat_kv((x @ wv).view(b, s, GKV, GD).transpose(1, 2), GQ // GKV)
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(GD), dim=-1)  # gg: kv-tiling
    return (p @ v).transpose(1, 2).reshape(b, s, GQ * GD) @ wo


def gqa_tp_interleave(x, wq, wk, wv, wo):
    w = dist.get_world_size()
    y = _gqa(x, wq, wk, wv, wo, GQ // w, GKV // w, lambda t, n: torch.repeat_interleave(t, n, dim=1))
    dist.all_reduce(y)
    return y


def gqa_tp_repeat_kv(x, wq, wk, wv, wo):
    w = dist.get_world_size()
    y = _gqa(x, wq, wk, wv, wo, GQ // w, GKV // w, repeat_kv)
    dist.all_reduce(y)
    return y


def gqa_tp_grouped_view(x, wq, wk, wv, wo):
    """No repeat at all: the query heads are viewed as [kv, group] and broadcast against K/V."""
    w = dist.get_world_size()
    qh, kvh = GQ // w, GKV // w
    b, s, _ = x.shape
    q = (x @ wq).view(b, s, kvh, qh // kvh, GD).permute(0, 2, 3, 1, 4)  # [b, kv, g, s, d]
    k = (x @ wk).view(b, s, kvh, 1, GD).permute(0, 2, 3, 1, 4)  # [b, kv, 1, s, d]
    v = (x @ wv).view(b, s, kvh, 1, GD).permute(0, 2, 3, 1, 4)
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(GD), dim=-1)
    ctx = (p @ v).permute(0, 3, 1, 2, 4).reshape(b, s, qh * GD)
    y = ctx @ wo
    dist.all_reduce(y)
    return y


def gqa_tp_tiled(x, wq, wk, wv, wo):
    w = dist.get_world_size()
    # k.repeat tiles the kv heads (0,1,0,1) where each query head group needs its own (0,0,1,1)
    y = _gqa(x, wq, wk, wv, wo, GQ // w, GKV // w, lambda t, n: t.repeat(1, n, 1, 1))  # BUG
    dist.all_reduce(y)
    return y


def _gqa_in():
    return [_x(), _w(H, GQ * GD, 1), _w(H, GKV * GD, 2), _w(H, GKV * GD, 3), _w(GQ * GD, H, 4)]


MQ, MD = 4, 4  # MQA: 4 query heads, one shared kv head of dim 4


def mqa_spec(x, wq, wk, wv, wo):
    b, s, _ = x.shape
    q = (x @ wq).view(b, s, MQ, MD).transpose(1, 2)
    k = (x @ wk).view(b, s, 1, MD).transpose(1, 2).expand(b, MQ, s, MD)
    v = (x @ wv).view(b, s, 1, MD).transpose(1, 2).expand(b, MQ, s, MD)
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(MD), dim=-1)
    return (p @ v).transpose(1, 2).reshape(b, s, MQ * MD) @ wo


def mqa_tp(x, wq, wk, wv, wo):
    heads = MQ // dist.get_world_size()
    b, s, _ = x.shape
    q = (x @ wq).view(b, s, heads, MD).transpose(1, 2)
    k = (x @ wk).unsqueeze(1)  # [b, 1, s, d]: broadcast over this rank's query heads
    v = (x @ wv).unsqueeze(1)
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(MD), dim=-1)
    y = torch.matmul(p, v).transpose(1, 2).flatten(2) @ wo
    dist.all_reduce(y)
    return y


def _mqa_in():
    return [_x(), _w(H, MQ * MD, 1), _w(H, MD, 2), _w(H, MD, 3), _w(MQ * MD, H, 4)]


# ---------------------------------------------------------------------------------------------
# RoPE; q: [B, S, heads, RD]

RH, RD = 4, 8
THETA = 10000.0


def _inv_freq(dim):
    return 1.0 / (THETA ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_real_spec(q):
    s = q.shape[1]
    t = torch.arange(s, dtype=torch.float64)
    freqs = torch.outer(t, _inv_freq(q.shape[-1]))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    return q * cos + rotate_half(q) * sin


def rope_real_spec_bug(q):
    s = q.shape[1]
    t = torch.arange(s, dtype=torch.float64)
    freqs = torch.outer(t, _inv_freq(q.shape[-1]))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    return q * cos + rotate_half(q) * sin  # gg: positions


def rope_real_heads(q):
    # heads sharded; the rotation acts on the last dim only
    half = q.shape[-1] // 2
    pos = torch.arange(q.size(1), dtype=torch.float64).unsqueeze(1)
    freqs = pos * _inv_freq(q.shape[-1]).unsqueeze(0)
    cos = torch.cat([freqs.cos(), freqs.cos()], -1).view(1, q.size(1), 1, -1)
    sin = torch.cat([freqs.sin(), freqs.sin()], -1).view(1, q.size(1), 1, -1)
    rot = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return q * cos + rot * sin


def rope_real_seq(q):
    # sequence sharded (context parallel): positions start at this rank's offset
    s_local = q.shape[1]
    start = dist.get_rank() * s_local
    t = torch.arange(start, start + s_local, dtype=torch.float64)
    freqs = torch.einsum("i,j->ij", t, _inv_freq(q.shape[-1]))
    emb = torch.cat((freqs, freqs), dim=-1)
    return q * emb.cos()[:, None, :] + rotate_half(q) * emb.sin()[:, None, :]


def rope_real_seq_no_offset(q):
    s_local = q.shape[1]
    t = torch.arange(s_local, dtype=torch.float64)  # BUG: every rank restarts at position 0
    freqs = torch.einsum("i,j->ij", t, _inv_freq(q.shape[-1]))
    emb = torch.cat((freqs, freqs), dim=-1)
    return q * emb.cos()[:, None, :] + rotate_half(q) * emb.sin()[:, None, :]


def precompute_freqs_cis(dim, end):
    freqs = _inv_freq(dim)
    t = torch.arange(end, dtype=torch.float64)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)  # complex128


def rope_complex_spec(q):
    """Llama's apply_rotary_emb: consecutive pairs (x0, x1) as complex numbers."""
    freqs_cis = precompute_freqs_cis(q.shape[-1], q.shape[1])
    q_ = torch.view_as_complex(q.reshape(*q.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, q.shape[1], 1, q_.shape[-1])
    return torch.view_as_real(q_ * freqs_cis).flatten(3)


def rope_complex_heads(q):
    freqs_cis = precompute_freqs_cis(q.shape[-1], q.shape[1])
    q_ = torch.view_as_complex(q.reshape(*q.shape[:-1], -1, 2))
    return torch.view_as_real(q_ * freqs_cis[None, :, None, :]).flatten(3)


def rope_interleaved_real_heads(q):
    """The complex rotation written in real arithmetic on the even / odd lanes."""
    s = q.shape[1]
    ang = torch.outer(torch.arange(s, dtype=torch.float64), _inv_freq(q.shape[-1]))
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x0, x1 = q[..., 0::2], q[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def rope_complex_spec_tagged(q):
    freqs_cis = precompute_freqs_cis(q.shape[-1], q.shape[1])
    q_ = torch.view_as_complex(q.reshape(*q.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, q.shape[1], 1, q_.shape[-1])
    return torch.view_as_real(q_ * freqs_cis).flatten(3)  # gg: rotate


def rope_pairs_unbind_seq(q):
    """Even / odd lanes as pairs (unflatten + unbind), sequence sharded with this rank's positions."""
    s_local = q.shape[1]
    start = dist.get_rank() * s_local
    ang = torch.outer(torch.arange(start, start + s_local, dtype=torch.float64), _inv_freq(q.shape[-1]))
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x0, x1 = q.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(3)


def rope_interleaved_real_heads_sin_sign(q):
    s = q.shape[1]
    ang = torch.outer(torch.arange(s, dtype=torch.float64), _inv_freq(q.shape[-1]))
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x0, x1 = q[..., 0::2], q[..., 1::2]
    even = x0 * cos + x1 * sin  # BUG: the rotation's sin term has the wrong sign
    return torch.stack((even, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def rope_complex_seq(q):
    s_local = q.shape[1]
    rank = dist.get_rank()
    freqs_cis = precompute_freqs_cis(q.shape[-1], s_local * dist.get_world_size())
    freqs_cis = freqs_cis[rank * s_local:(rank + 1) * s_local]  # this rank's rows of the table
    q_ = torch.view_as_complex(q.reshape(*q.shape[:-1], -1, 2))
    return torch.view_as_real(q_ * freqs_cis[None, :, None, :]).flatten(3)


def _rope_in():
    return [rn(B, S, RH, RD, seed=5)]


# RoPE inside heads-sharded attention (Llama-style attention without GQA)


def _rope_attn(x, wq, wk, wv, wo, heads):
    b, s, _ = x.shape
    q = rope_real_spec((x @ wq).view(b, s, heads, D)).transpose(1, 2)
    k = rope_real_spec((x @ wk).view(b, s, heads, D)).transpose(1, 2)
    v = (x @ wv).view(b, s, heads, D).transpose(1, 2)
    mask = torch.full((s, s), float("-inf"), dtype=x.dtype).triu(1)
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D) + mask, dim=-1)
    return (p @ v).transpose(1, 2).reshape(b, s, heads * D) @ wo


def rope_attn_spec(x, wq, wk, wv, wo):
    return _rope_attn(x, wq, wk, wv, wo, NH)


def rope_attn_tp(x, wq, wk, wv, wo):
    y = _rope_attn(x, wq, wk, wv, wo, NH // dist.get_world_size())
    dist.all_reduce(y)
    return y


# ---------------------------------------------------------------------------------------------

R, S0, S1, S2 = gg.Replicate(), gg.Shard(0), gg.Shard(1), gg.Shard(2)
_MHA_PL = [R, S1, S1, S1, S0]


def _c(name, spec, rank, inputs, placements, expect, *, bug=False, world_size=2, note="", marker="# BUG",
       missing=None, culprit=None, twin=None):
    return SpellingCase(name=name, pattern="attention", sequential=spec, distributed=rank, inputs=inputs,
                        placements=placements, world_size=world_size, expect=expect, bug=bug, note=note,
                        marker=marker, missing=missing, culprit=culprit, twin=twin)


CASES = [
    # MHA, heads sharded
    _c("mha-tp/triu-spec-vs-tril-masked_fill", mha_spec, mha_tp_masked_fill, _mha_in, _MHA_PL, [R]),
    _c("mha-tp/einsum-unflatten", mha_spec, mha_tp_einsum, _mha_in, _MHA_PL, [R]),
    _c("mha-tp/per-head-loop", mha_spec, mha_tp_head_loop, _mha_in, _MHA_PL, [R]),
    _c("mha-tp/F.sdpa-is_causal", mha_spec, mha_tp_sdpa, _mha_in, _MHA_PL, [R]),
    _c("mha-tp/tril-masked_fill-tp4", mha_spec, mha_tp_masked_fill, _mha_in, _MHA_PL, [R], world_size=4),
    _c("mha-tp/one-head-per-rank-bmm", mha1_spec, mha1_rank,
       lambda: [_x(), _w(H, H, 1), _w(H, H, 2), _w(H, H, 3), _w(H, H, 4)], _MHA_PL, [R]),
    _c("mha-tp/bug-scale-by-local-head-dim", mha_spec_bug_scale, mha_tp_local_head_dim, _mha_in, _MHA_PL, [R],
       bug=True, culprit="scale", twin="mha-tp/triu-spec-vs-tril-masked_fill",
       note="head_dim = local columns / global heads = D / world_size: scores scaled by the wrong sqrt"),
    _c("mha-tp/bug-mask-not-applied", mha_spec_bug_mask, mha_tp_no_mask, _mha_in, _MHA_PL, [R], bug=True,
       culprit="mask", twin="mha-tp/triu-spec-vs-tril-masked_fill", note="the causal mask is dropped on the ranks"),
    _c("mha-tp/where-arange-compare", mha_spec, mha_tp_where_arange, _mha_in, _MHA_PL, [R]),
    _c("mha-tp/bug-mask-sees-next-key", mha_spec_bug_mask, mha_tp_sees_next, _mha_in, _MHA_PL, [R], bug=True,
       culprit="mask", twin="mha-tp/triu-spec-vs-tril-masked_fill", note="triu(-inf, diagonal=2): one future key visible"),
    # GQA / MQA
    _c("gqa-tp/repeat_kv-spec-vs-repeat_interleave", gqa_spec_repeat_kv, gqa_tp_interleave, _gqa_in,
       _MHA_PL, [R]),
    _c("gqa-tp/repeat_interleave-spec-vs-repeat_kv", gqa_spec_interleave, gqa_tp_repeat_kv, _gqa_in,
       _MHA_PL, [R]),
    _c("gqa-tp/grouped-broadcast-no-repeat", gqa_spec_repeat_kv, gqa_tp_grouped_view, _gqa_in, _MHA_PL, [R]),
    _c("gqa-tp/repeat_kv-tp4", gqa_spec_repeat_kv, gqa_tp_repeat_kv, _gqa_in, _MHA_PL, [R], world_size=4),
    _c("gqa-tp/mqa-expand-spec-vs-broadcast-unsqueeze", mqa_spec, mqa_tp, _mqa_in, [R, S1, R, R, S0], [R]),
    _c("gqa-tp/bug-kv-heads-tiled", gqa_spec_bug, gqa_tp_tiled, _gqa_in, _MHA_PL, [R], bug=True,
       culprit="kv-tiling", twin="gqa-tp/repeat_kv-spec-vs-repeat_interleave",
       note="k.repeat(1, n_rep, 1, 1) tiles the kv heads: query head i meets kv head i % kv instead of i // n_rep"),
    # RoPE
    _c("rope/real-rotate_half-heads-sharded", rope_real_spec, rope_real_heads, _rope_in, [S2], [S2]),
    _c("rope/real-rotate_half-seq-sharded-offset", rope_real_spec, rope_real_seq, _rope_in, [S1], [S1]),
    _c("rope/complex-polar-heads-sharded", rope_complex_spec, rope_complex_heads, _rope_in, [S2], [S2]),
    _c("rope/complex-spec-vs-real-even-odd", rope_complex_spec, rope_interleaved_real_heads, _rope_in, [S2],
       [S2]),
    _c("rope/complex-spec-vs-real-pairs-unbind-seq-sharded", rope_complex_spec, rope_pairs_unbind_seq, _rope_in,
       [S1], [S1]),
    _c("rope/bug-even-odd-sin-sign-flipped", rope_complex_spec_tagged, rope_interleaved_real_heads_sin_sign, _rope_in,
       [S2], [S2], bug=True, culprit="rotate", twin="rope/complex-spec-vs-real-even-odd",
       note="the even lane adds x_odd * sin instead of subtracting it: a rotation by the wrong angle"),
    _c("rope/complex-seq-sharded-table-rows", rope_complex_spec, rope_complex_seq, _rope_in, [S1], [S1]),
    _c("rope/bug-seq-sharded-no-offset", rope_real_spec_bug, rope_real_seq_no_offset, _rope_in, [S1], [S1],
       bug=True, culprit="positions", twin="rope/real-rotate_half-seq-sharded-offset",
       note="sequence shards rotate with positions 0..S/W-1 on every rank (the rank offset is forgotten)"),
    _c("rope/attention-heads-sharded-causal", rope_attn_spec, rope_attn_tp, _mha_in, _MHA_PL, [R]),
]

_MISSING: dict = {}

import dataclasses as _dc  # noqa: E402

CASES = [_dc.replace(c, missing=_MISSING[c.name]) if c.name in _MISSING else c for c in CASES]
assert set(_MISSING) <= {c.name for c in CASES}
