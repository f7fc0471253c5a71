"""Spelling suite, pattern 5: decomposition where no lemma exists.

Norms (RMSNorm, LayerNorm), activations (SiLU / SwiGLU, tanh-GELU) and attention's math form written
the way people write them: the fused functional (``F.rms_norm``, ``F.layer_norm``, ``F.silu``,
``F.gelu(approximate="tanh")``, ``F.scaled_dot_product_attention``), the ``torch.nn`` module called
functionally, and the formula written out by hand. The spec and the rank program deliberately use
*different* spellings of the same math, under sequence parallelism (norm on a sequence shard, weights
replicated), a hidden-sharded norm (sum of squares all-reduced), and tensor-parallel MLPs.

Activations are ``[seq, batch, hidden]`` (Megatron layout) unless said otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import gg_notebook as gg

from ._case import SpellingCase, rn

S, B, H, FF = 8, 2, 16, 32
EPS = 1e-6
LN_EPS = 1e-5

# modules as a model holds them; the programs call them functionally with the problem's weights
_RMS = nn.RMSNorm(H, eps=EPS, dtype=torch.float64)
_LN = nn.LayerNorm(H, eps=LN_EPS, dtype=torch.float64)
_GELU_TANH = nn.GELU(approximate="tanh")


def _x(scale=1.0, seed=0):
    return rn(S, B, H, seed=seed) * scale


def _norm_w(seed=1):
    return 1.0 + 0.1 * rn(H, seed=seed)


# ---------------------------------------------------------------------------------------------
# RMSNorm on a sequence shard (weights replicated)


def rmsnorm_fn(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, eps=EPS)


def rmsnorm_written(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def rmsnorm_sp_written(x, w):
    # this rank's sequence shard; the norm is over hidden, which every rank holds whole
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def rmsnorm_sp_module(x, w):
    return functional_call(_RMS, {"weight": w}, (x,))


def rmsnorm_sp_sqrt_div(x, w):
    ms = torch.mean(x * x, dim=2, keepdim=True)
    return w * (x / torch.sqrt(ms + EPS))


def rmsnorm_sp_fn(x, w):
    return F.rms_norm(x, [H], weight=w, eps=EPS)


def rmsnorm_spec_eps(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w  # gg: eps-outside-sqrt


def rmsnorm_sp_eps_outside(x, w):
    # eps added after the square root (a common hand-port mistake from other frameworks)
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + EPS) * w  # BUG


def rmsnorm_sp_pow_minus_half(x, w):
    # (ms + eps) ** -0.5 instead of rsqrt; the weight first
    ms = x.square().mean(dim=-1, keepdim=True)
    return w * (x * (ms + EPS) ** -0.5)


def rmsnorm_spec_mean(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w  # gg: mean-of-squares


def rmsnorm_sp_sum_of_squares(x, w):
    ss = (x * x).sum(-1, keepdim=True)  # BUG: sum where the norm takes the mean of the squares
    return x / torch.sqrt(ss + EPS) * w


# RMSNorm over a hidden dim that is sharded (e.g. a QK-norm over tensor-parallel heads, or a norm
# applied inside the TP region): the sum of squares has to be all-reduced.


def rmsnorm_hidden_spec(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, eps=EPS)


def rmsnorm_hidden_spec_bug(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, eps=EPS)  # gg: local-norm


def rmsnorm_hidden_allreduce(x, w):
    # x: [S, B, H/W], w: [H/W]
    ss = x.pow(2).sum(-1, keepdim=True)
    dist.all_reduce(ss)
    ms = ss / (x.shape[-1] * dist.get_world_size())
    return x * torch.rsqrt(ms + EPS) * w


def rmsnorm_hidden_gather_stats(x, w):
    world = dist.get_world_size()
    ms_local = x.pow(2).mean(-1, keepdim=True)
    parts = [torch.empty_like(ms_local) for _ in range(world)]
    dist.all_gather(parts, ms_local)
    ms = torch.stack(parts).mean(0)  # equal shards: the mean of the shard means
    return (x * torch.rsqrt(ms + EPS)) * w


def rmsnorm_hidden_sqrt(x, w):
    ss = (x * x).sum(dim=-1, keepdim=True)
    dist.all_reduce(ss, op=dist.ReduceOp.SUM)
    rms = torch.sqrt(ss / H + EPS)
    return x / rms * w


def rmsnorm_hidden_local(x, w):
    # norm over the local hidden shard only: the statistics never see the other ranks' columns
    return F.rms_norm(x, (x.shape[-1],), w, eps=EPS)  # BUG


# ---------------------------------------------------------------------------------------------
# LayerNorm on a sequence shard


def layernorm_fn(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, LN_EPS)


def layernorm_written(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + LN_EPS) * w + b


def layernorm_sp_module(x, w, b):
    return functional_call(_LN, {"weight": w, "bias": b}, (x,))


def layernorm_sp_written(x, w, b):
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    var = xc.pow(2).mean(-1, keepdim=True)
    return xc * torch.rsqrt(var + LN_EPS) * w + b


def layernorm_sp_var_mean(x, w, b):
    var, mu = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    return torch.addcmul(b, (x - mu) / torch.sqrt(var + LN_EPS), w)


def layernorm_sp_fn(x, w, b):
    return F.layer_norm(x, [H], weight=w, bias=b, eps=LN_EPS)


def layernorm_sp_var_biased_rsqrt(x, w, b):
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    mu = torch.mean(x, dim=2, keepdim=True)
    return b + w * ((x - mu) * (var + LN_EPS).rsqrt())


def layernorm_sp_var_mean_pow(x, w, b):
    var, mu = torch.var_mean(x, -1, correction=0, keepdim=True)
    return (x - mu) * torch.pow(var + LN_EPS, -0.5) * w + b


def layernorm_spec_center(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, LN_EPS)  # gg: ln-center


def layernorm_sp_uncentered_var(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = (x * x).mean(-1, keepdim=True)  # BUG: E[x^2], not E[(x - mu)^2]
    return (x - mu) * torch.rsqrt(var + LN_EPS) * w + b


def layernorm_spec_bug(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, LN_EPS)  # gg: unbiased-var


def layernorm_sp_unbiased(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True)  # BUG: torch.var defaults to the unbiased (N-1) estimator
    return (x - mu) / torch.sqrt(var + LN_EPS) * w + b


# ---------------------------------------------------------------------------------------------
# SwiGLU tensor-parallel MLP: gate/up column-parallel, down row-parallel + all-reduce


def swiglu_spec(x, wg, wu, wd):
    return (F.silu(x @ wg) * (x @ wu)) @ wd


def swiglu_spec_linear(x, wg, wu, wd):
    # nn.Linear weights: wg, wu [FF, H], wd [H, FF]
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def swiglu_spec_bug(x, wg, wu, wd):
    return (F.silu(x @ wg) * (x @ wu)) @ wd  # gg: wrong-activation


def swiglu_tp_sigmoid(x, wg, wu, wd):
    g = x @ wg
    u = x @ wu
    y = (g * torch.sigmoid(g) * u) @ wd
    dist.all_reduce(y)
    return y


def swiglu_tp_exp(x, wg, wu, wd):
    g = torch.matmul(x, wg)
    h = g / (1.0 + torch.exp(-g)) * torch.matmul(x, wu)
    y = torch.matmul(h, wd)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def swiglu_tp_reciprocal(x, wg, wu, wd):
    g, u = x @ wg, x @ wu
    gate = g * (1.0 / (1.0 + torch.exp(-g)))
    y = torch.matmul(u * gate, wd)
    dist.all_reduce(y)
    return y


def swiglu_tp_sigmoid_of_up(x, wg, wu, wd):
    g, u = x @ wg, x @ wu
    y = (g * torch.sigmoid(u) * u) @ wd  # BUG: the sigmoid of the up projection, not of the gate
    dist.all_reduce(y)
    return y


def swiglu_tp_linear_t(x, wg, wu, wd):
    # wg, wu: [FF/W, H] (row shard of nn.Linear weight = column parallel); wd: [H, FF/W]
    h = F.silu(x @ wg.t()) * (x @ wu.t())
    y = h @ wd.t()
    dist.all_reduce(y)
    return y


def swiglu_tp_nn_silu(x, wg, wu, wd):
    act = nn.SiLU()
    y = F.linear(act(F.linear(x, wg)) * F.linear(x, wu), wd)
    dist.all_reduce(y)
    return y


def swiglu_tp_silu(x, wg, wu, wd):
    g = x @ wg
    y = (F.silu(g) * (x @ wu)) @ wd
    dist.all_reduce(y)
    return y


def swiglu_tp_gelu(x, wg, wu, wd):
    g = x @ wg
    y = (F.gelu(g) * (x @ wu)) @ wd  # BUG: GeGLU where the model is SwiGLU
    dist.all_reduce(y)
    return y


# ---------------------------------------------------------------------------------------------
# tanh-GELU tensor-parallel MLP


def _gelu_tanh_formula(h):
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3))))


def gelu_mlp_spec(x, w1, b1, w2):
    return F.gelu(x @ w1 + b1, approximate="tanh") @ w2


def gelu_mlp_spec_written(x, w1, b1, w2):
    h = x @ w1 + b1
    h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))
    return h @ w2


def gelu_mlp_spec_bug(x, w1, b1, w2):
    return F.gelu(x @ w1 + b1, approximate="tanh") @ w2  # gg: erf-gelu


def gelu_mlp_tp_written(x, w1, b1, w2):
    h = _gelu_tanh_formula(x @ w1 + b1)
    y = h @ w2
    dist.all_reduce(y)
    return y


def gelu_mlp_tp_products(x, w1, b1, w2):
    h = torch.addmm(b1, x.flatten(0, 1), w1)
    g = h * 0.5 * (1 + torch.tanh((2 / math.pi) ** 0.5 * (h + 0.044715 * h * h * h)))
    y = g @ w2
    dist.all_reduce(y)
    return y.unflatten(0, x.shape[:2])


def gelu_mlp_tp_square(x, w1, b1, w2):
    h = x @ w1 + b1
    h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 2)))  # BUG: h**2, not h**3
    y = h @ w2
    dist.all_reduce(y)
    return y


def gelu_mlp_tp_fn(x, w1, b1, w2):
    y = F.gelu(torch.addmm(b1, x.view(-1, x.shape[-1]), w1), approximate="tanh") @ w2
    dist.all_reduce(y)
    return y.view(x.shape[0], x.shape[1], -1)


def gelu_mlp_tp_module(x, w1, b1, w2):
    h = _GELU_TANH(F.linear(x, w1.t(), b1))
    y = torch.matmul(h, w2)
    dist.all_reduce(y)
    return y


def gelu_mlp_tp_erf(x, w1, b1, w2):
    h = F.gelu(x @ w1 + b1)  # BUG: exact (erf) GELU where the model was trained with the tanh one
    y = h @ w2
    dist.all_reduce(y)
    return y


# ---------------------------------------------------------------------------------------------
# Llama-style sequence-parallel block: RMSNorm on the sequence shard, all-gather, SwiGLU TP MLP,
# reduce-scatter back to sequence shards


def sp_rms_swiglu_spec(x, wn, wg, wu, wd):
    h = F.rms_norm(x, (x.shape[-1],), wn, eps=EPS)
    return x + (F.silu(h @ wg) * (h @ wu)) @ wd


def sp_rms_swiglu_rank(x, wn, wg, wu, wd):
    world = dist.get_world_size()
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * wn
    full = torch.empty((h.shape[0] * world, *h.shape[1:]), dtype=h.dtype)
    dist.all_gather_into_tensor(full, h.contiguous())
    g = full @ wg
    y = (g * torch.sigmoid(g) * (full @ wu)) @ wd
    out = torch.empty_like(x)
    dist.reduce_scatter_tensor(out, y.contiguous())
    return x + out


def sp_ln_gelu_spec(x, lw, lb, w1, b1, w2, b2):
    h = F.layer_norm(x, (x.shape[-1],), lw, lb, LN_EPS)
    return F.gelu(h @ w1 + b1, approximate="tanh") @ w2 + b2


def sp_ln_gelu_rank(x, lw, lb, w1, b1, w2, b2):
    h = functional_call(_LN, {"weight": lw, "bias": lb}, (x,))
    parts = [torch.empty_like(h) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, h)
    full = torch.cat(parts, dim=0)
    y = F.gelu(full @ w1 + b1, approximate="tanh") @ w2
    out = torch.empty_like(x)
    dist.reduce_scatter_tensor(out, y.contiguous())
    return out + b2


def sp_ln_gelu_spec_bug(x, lw, lb, w1, b1, w2, b2):
    h = F.layer_norm(x, (x.shape[-1],), lw, lb, LN_EPS)
    return F.gelu(h @ w1 + b1, approximate="tanh") @ w2 + b2  # gg: sp-out


def sp_ln_gelu_rank_chunk0(x, lw, lb, w1, b1, w2, b2):
    h = functional_call(_LN, {"weight": lw, "bias": lb}, (x,))
    parts = [torch.empty_like(h) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, h)
    y = F.gelu(torch.cat(parts, dim=0) @ w1 + b1, approximate="tanh") @ w2
    dist.all_reduce(y)
    out = y.chunk(dist.get_world_size(), dim=0)[0]  # BUG: every rank keeps the first chunk
    return out + b2


def sp_ln_gelu_rank_rs_list(x, lw, lb, w1, b1, w2, b2):
    h = F.layer_norm(x, (x.shape[-1],), lw, lb, LN_EPS)
    parts = [torch.empty_like(h) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, h)
    y = F.gelu(torch.cat(parts, dim=0) @ w1 + b1, approximate="tanh") @ w2
    chunks = list(y.chunk(dist.get_world_size(), dim=0))
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks)  # the list form
    return out + b2


# ---------------------------------------------------------------------------------------------
# SDPA's math form vs F.scaled_dot_product_attention, heads sharded (q, k, v: [B, heads, S, D])

NH, D = 4, 8


def sdpa_math(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return torch.softmax(scores, dim=-1) @ v


def sdpa_fn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_causal_math(q, k, v):
    L = q.size(-2)
    mask = torch.triu(torch.full((L, L), float("-inf"), dtype=q.dtype), diagonal=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.size(-1))) + mask
    return torch.matmul(F.softmax(scores, dim=-1), v)


def sdpa_causal_fn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_heads_fn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_heads_math(q, k, v):
    attn = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    attn = attn.softmax(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", attn, v)


def sdpa_heads_causal_fn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_heads_causal_math(q, k, v):
    L = q.shape[2]
    keep = torch.ones(L, L, dtype=torch.bool).tril()
    s = (q @ k.transpose(2, 3)) / math.sqrt(q.shape[3])
    s = s.masked_fill(~keep, float("-inf"))
    return s.softmax(-1) @ v


def sdpa_spec_bug(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)  # gg: softmax-dim


def sdpa_math_spec_bug(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return torch.softmax(scores, dim=-1) @ v  # gg: softmax-dim


def sdpa_heads_math_wrong_dim(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return torch.softmax(s, dim=-2) @ v  # BUG: normalizes over queries instead of keys


def sdpa_heads_scaled_qk(q, k, v):
    # scale q and k by d**-1/4 each (fp16-friendly; what SDPA's own math form does)
    c = q.size(-1) ** -0.25
    return torch.softmax((q * c) @ (k * c).transpose(-2, -1), dim=-1) @ v


def sdpa_heads_explicit_scale(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=1.0 / math.sqrt(q.shape[-1]))


def sdpa_math_spec_scale(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # gg: scale
    return torch.softmax(scores, dim=-1) @ v


def sdpa_heads_scale_q_only(q, k, v):
    c = q.size(-1) ** -0.25
    return torch.softmax((q * c) @ k.transpose(-2, -1), dim=-1) @ v  # BUG: k is never scaled


def sdpa_heads_scale_without_sqrt(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=1.0 / q.shape[-1])  # BUG: 1/d instead of 1/sqrt(d)


def sdpa_math_spec_probs(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return torch.softmax(scores, dim=-1) @ v  # gg: probs


def sdpa_heads_causal_by_mistake(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # BUG: the spec is not causal


def _qkv():
    return [rn(B, NH, S, D, seed=0), rn(B, NH, S, D, seed=1), rn(B, NH, S, D, seed=2)]


# ---------------------------------------------------------------------------------------------

R, SH0, SH1, SHL = gg.Replicate(), gg.Shard(0), gg.Shard(1), gg.Shard(2)


def _c(name, spec, rank, inputs, placements, expect, *, bug=False, world_size=2, note="", marker="# BUG",
       missing=None, culprit=None, twin=None):
    return SpellingCase(name=name, pattern="decomposition", sequential=spec, distributed=rank, inputs=inputs,
                        placements=placements, world_size=world_size, expect=expect, bug=bug, note=note,
                        marker=marker, missing=missing, culprit=culprit, twin=twin)


_sp_norm = lambda: [_x(), _norm_w()]  # noqa: E731
_ln_in = lambda: [_x(), _norm_w(), 0.1 * rn(H, seed=2)]  # noqa: E731
_mlp_w = lambda: [_x(), rn(H, FF, seed=1) / 4, rn(H, FF, seed=2) / 4, rn(FF, H, seed=3) / 6]  # noqa: E731
_mlp_w_lin = lambda: [_x(), rn(FF, H, seed=1) / 4, rn(FF, H, seed=2) / 4, rn(H, FF, seed=3) / 6]  # noqa: E731
_sp_ln_in = lambda: [_x(), _norm_w(), 0.1 * rn(H, seed=2), rn(H, FF, seed=3) / 4, 0.1 * rn(FF, seed=4),  # noqa: E731
                     rn(FF, H, seed=5) / 6, 0.1 * rn(H, seed=6)]
_gelu_w = lambda: [_x(), rn(H, FF, seed=1) / 4, 0.1 * rn(FF, seed=2), rn(FF, H, seed=3) / 6]  # noqa: E731

CASES = [
    # RMSNorm, sequence parallel
    _c("rmsnorm-sp/written-vs-F.rms_norm", rmsnorm_fn, rmsnorm_sp_written, _sp_norm, [SH0, R], [SH0]),
    _c("rmsnorm-sp/module-vs-written", rmsnorm_written, rmsnorm_sp_module, _sp_norm, [SH0, R], [SH0]),
    _c("rmsnorm-sp/sqrt-div-vs-F.rms_norm", rmsnorm_fn, rmsnorm_sp_sqrt_div, _sp_norm, [SH0, R], [SH0]),
    _c("rmsnorm-sp/F.rms_norm-vs-written", rmsnorm_written, rmsnorm_sp_fn, _sp_norm, [SH0, R], [SH0],
       world_size=4),
    _c("rmsnorm-sp/bug-eps-outside-sqrt", rmsnorm_spec_eps, rmsnorm_sp_eps_outside,
       lambda: [_x(scale=1e-3), _norm_w()], [SH0, R], [SH0], bug=True, culprit="eps-outside-sqrt", twin="rmsnorm-sp/module-vs-written",
       note="x / (sqrt(ms) + eps) instead of x * rsqrt(ms + eps); activations of scale 1e-3 make eps matter"),
    _c("rmsnorm-sp/pow-minus-half-vs-F.rms_norm", rmsnorm_fn, rmsnorm_sp_pow_minus_half, _sp_norm, [SH0, R], [SH0]),
    _c("rmsnorm-sp/bug-sum-of-squares", rmsnorm_spec_mean, rmsnorm_sp_sum_of_squares, _sp_norm, [SH0, R], [SH0],
       bug=True, culprit="mean-of-squares", twin="rmsnorm-sp/sqrt-div-vs-F.rms_norm",
       note="the sum of squares where RMSNorm takes their mean"),
    # RMSNorm over a sharded hidden dim
    _c("rmsnorm-tp-hidden/sumsq-allreduce", rmsnorm_hidden_spec, rmsnorm_hidden_allreduce, _sp_norm,
       [SHL, SH0], [SHL]),
    _c("rmsnorm-tp-hidden/gather-shard-means", rmsnorm_hidden_spec, rmsnorm_hidden_gather_stats, _sp_norm,
       [SHL, SH0], [SHL]),
    _c("rmsnorm-tp-hidden/sumsq-allreduce-sqrt-div", rmsnorm_hidden_spec, rmsnorm_hidden_sqrt, _sp_norm,
       [SHL, SH0], [SHL]),
    _c("rmsnorm-tp-hidden/bug-local-norm", rmsnorm_hidden_spec_bug, rmsnorm_hidden_local, _sp_norm,
       [SHL, SH0], [SHL], bug=True, culprit="local-norm", twin="rmsnorm-tp-hidden/sumsq-allreduce",
       note="F.rms_norm over the local hidden shard: the mean of squares misses the other ranks' columns"),
    # LayerNorm, sequence parallel
    _c("layernorm-sp/module-vs-F.layer_norm", layernorm_fn, layernorm_sp_module, _ln_in, [SH0, R, R], [SH0]),
    _c("layernorm-sp/written-vs-F.layer_norm", layernorm_fn, layernorm_sp_written, _ln_in, [SH0, R, R], [SH0]),
    _c("layernorm-sp/var_mean-addcmul-vs-written", layernorm_written, layernorm_sp_var_mean, _ln_in,
       [SH0, R, R], [SH0]),
    _c("layernorm-sp/F.layer_norm-vs-written", layernorm_written, layernorm_sp_fn, _ln_in, [SH0, R, R], [SH0],
       world_size=4),
    _c("layernorm-sp/bug-unbiased-var", layernorm_spec_bug, layernorm_sp_unbiased, _ln_in, [SH0, R, R], [SH0],
       bug=True, culprit="unbiased-var", twin="layernorm-sp/module-vs-F.layer_norm", note="x.var(-1) is the unbiased estimator; LayerNorm uses 1/N"),
    _c("layernorm-sp/var-unbiased-False-rsqrt-vs-F.layer_norm", layernorm_fn, layernorm_sp_var_biased_rsqrt, _ln_in,
       [SH0, R, R], [SH0]),
    _c("layernorm-sp/var_mean-pow-vs-written", layernorm_written, layernorm_sp_var_mean_pow, _ln_in, [SH0, R, R],
       [SH0], world_size=4),
    _c("layernorm-sp/bug-uncentered-var", layernorm_spec_center, layernorm_sp_uncentered_var, _ln_in, [SH0, R, R],
       [SH0], bug=True, culprit="ln-center", twin="layernorm-sp/written-vs-F.layer_norm",
       note="the variance as E[x^2] without subtracting the mean"),
    # SwiGLU TP MLP
    _c("swiglu-tp/sigmoid-product", swiglu_spec, swiglu_tp_sigmoid, _mlp_w, [R, SH1, SH1, SH0], [R]),
    _c("swiglu-tp/exp-division", swiglu_spec, swiglu_tp_exp, _mlp_w, [R, SH1, SH1, SH0], [R]),
    _c("swiglu-tp/linear-weights-transposed", swiglu_spec_linear, swiglu_tp_linear_t, _mlp_w_lin,
       [R, SH0, SH0, SH1], [R]),
    _c("swiglu-tp/nn.SiLU-module", swiglu_spec_linear, swiglu_tp_nn_silu, _mlp_w_lin, [R, SH0, SH0, SH1], [R]),
    _c("swiglu-tp/F.silu-matmul", swiglu_spec, swiglu_tp_silu, _mlp_w, [R, SH1, SH1, SH0], [R]),
    _c("swiglu-tp/bug-gelu-gate", swiglu_spec_bug, swiglu_tp_gelu, _mlp_w, [R, SH1, SH1, SH0], [R], bug=True,
       culprit="wrong-activation", twin="swiglu-tp/F.silu-matmul", note="GELU on the gate where the model is SwiGLU"),
    _c("swiglu-tp/reciprocal-sigmoid", swiglu_spec, swiglu_tp_reciprocal, _mlp_w, [R, SH1, SH1, SH0], [R]),
    _c("swiglu-tp/bug-sigmoid-of-up", swiglu_spec_bug, swiglu_tp_sigmoid_of_up, _mlp_w, [R, SH1, SH1, SH0], [R],
       bug=True, culprit="wrong-activation", twin="swiglu-tp/sigmoid-product",
       note="g * sigmoid(u) * u: the activation gates the wrong projection"),
    # tanh-GELU TP MLP
    _c("gelu-tanh-tp/written-vs-F.gelu", gelu_mlp_spec, gelu_mlp_tp_written, _gelu_w, [R, SH1, SH0, SH0], [R]),
    _c("gelu-tanh-tp/F.gelu-addmm-vs-written", gelu_mlp_spec_written, gelu_mlp_tp_fn, _gelu_w,
       [R, SH1, SH0, SH0], [R]),
    _c("gelu-tanh-tp/nn.GELU-module", gelu_mlp_spec, gelu_mlp_tp_module, _gelu_w, [R, SH1, SH0, SH0], [R]),
    _c("gelu-tanh-tp/bug-erf-gelu", gelu_mlp_spec_bug, gelu_mlp_tp_erf, _gelu_w, [R, SH1, SH0, SH0], [R],
       bug=True, culprit="erf-gelu", twin="gelu-tanh-tp/nn.GELU-module", note="exact GELU in the rank, tanh approximation in the model"),
    _c("gelu-tanh-tp/cube-products-addmm-vs-F.gelu", gelu_mlp_spec, gelu_mlp_tp_products, _gelu_w,
       [R, SH1, SH0, SH0], [R]),
    _c("gelu-tanh-tp/bug-square-not-cube", gelu_mlp_spec_bug, gelu_mlp_tp_square, _gelu_w, [R, SH1, SH0, SH0], [R],
       bug=True, culprit="erf-gelu", twin="gelu-tanh-tp/written-vs-F.gelu",
       note="h ** 2 where the tanh approximation has h ** 3"),
    # sequence-parallel blocks
    _c("sp-block/rmsnorm-allgather-swiglu-reducescatter", sp_rms_swiglu_spec, sp_rms_swiglu_rank,
       lambda: [_x(), _norm_w(), rn(H, FF, seed=2) / 4, rn(H, FF, seed=3) / 4, rn(FF, H, seed=4) / 6],
       [SH0, R, SH1, SH1, SH0], [SH0]),
    _c("sp-block/layernorm-module-allgather-list-gelu-reducescatter", sp_ln_gelu_spec, sp_ln_gelu_rank,
       _sp_ln_in, [SH0, R, R, SH1, SH0, SH0, R], [SH0]),
    _c("sp-block/bug-allreduce-then-first-chunk", sp_ln_gelu_spec_bug, sp_ln_gelu_rank_chunk0, _sp_ln_in,
       [SH0, R, R, SH1, SH0, SH0, R], [SH0], bug=True, culprit="sp-out",
       twin="sp-block/layernorm-module-allgather-list-gelu-reducescatter",
       note="all_reduce + chunk instead of reduce_scatter, but the chunk index is not the rank"),
    _c("sp-block/layernorm-allgather-list-gelu-reducescatter-list", sp_ln_gelu_spec, sp_ln_gelu_rank_rs_list,
       _sp_ln_in, [SH0, R, R, SH1, SH0, SH0, R], [SH0]),
    # SDPA math form vs the fused call, heads sharded
    _c("sdpa-heads/F.sdpa-vs-math", sdpa_math, sdpa_heads_fn, _qkv, [SH1, SH1, SH1], [SH1]),
    _c("sdpa-heads/einsum-math-vs-F.sdpa", sdpa_fn, sdpa_heads_math, _qkv, [SH1, SH1, SH1], [SH1]),
    _c("sdpa-heads/F.sdpa-causal-vs-triu-mask", sdpa_causal_math, sdpa_heads_causal_fn, _qkv, [SH1, SH1, SH1],
       [SH1]),
    _c("sdpa-heads/tril-masked_fill-vs-F.sdpa-causal", sdpa_causal_fn, sdpa_heads_causal_math, _qkv,
       [SH1, SH1, SH1], [SH1], world_size=4),
    _c("sdpa-heads/einsum-math-vs-math", sdpa_math, sdpa_heads_math, _qkv, [SH1, SH1, SH1], [SH1]),
    _c("sdpa-heads/bug-math-softmax-over-queries", sdpa_math_spec_bug, sdpa_heads_math_wrong_dim, _qkv,
       [SH1, SH1, SH1], [SH1], bug=True, culprit="softmax-dim", twin="sdpa-heads/einsum-math-vs-math",
       note="softmax(dim=-2): normalized over the queries"),
    _c("sdpa-heads/bug-softmax-over-queries", sdpa_spec_bug, sdpa_heads_math_wrong_dim, _qkv, [SH1, SH1, SH1],
       [SH1], bug=True, culprit="softmax-dim", twin="sdpa-heads/einsum-math-vs-F.sdpa", note="softmax(dim=-2): normalized over the queries"),
    _c("sdpa-heads/q-and-k-scaled-by-fourth-root", sdpa_math, sdpa_heads_scaled_qk, _qkv, [SH1, SH1, SH1], [SH1]),
    _c("sdpa-heads/F.sdpa-explicit-scale", sdpa_math, sdpa_heads_explicit_scale, _qkv, [SH1, SH1, SH1], [SH1]),
    _c("sdpa-heads/bug-only-q-scaled", sdpa_math_spec_scale, sdpa_heads_scale_q_only, _qkv, [SH1, SH1, SH1],
       [SH1], bug=True, culprit="scale", twin="sdpa-heads/q-and-k-scaled-by-fourth-root",
       note="q * d**-1/4 but k unscaled: scores off by d**-1/4 (an irrational factor)"),
    _c("sdpa-heads/bug-F.sdpa-scale-without-sqrt", sdpa_math_spec_scale, sdpa_heads_scale_without_sqrt, _qkv,
       [SH1, SH1, SH1], [SH1], bug=True, culprit="scale", twin="sdpa-heads/F.sdpa-explicit-scale",
       note="scale=1/d instead of 1/sqrt(d)"),
    _c("sdpa-heads/bug-F.sdpa-causal-spec-not", sdpa_math_spec_probs, sdpa_heads_causal_by_mistake, _qkv,
       [SH1, SH1, SH1], [SH1], bug=True, culprit="probs", twin="sdpa-heads/F.sdpa-vs-math",
       note="is_causal=True on the ranks, the spec attends to every key"),
]

# Correct spellings the engine cannot prove yet (and bugs it cannot localize yet): the missing
# mechanism, one line each (tests/test_spellings.py marks them xfail(strict=True)).
_MISSING = {
}

import dataclasses as _dc  # noqa: E402

CASES = [_dc.replace(c, missing=_MISSING[c.name]) if c.name in _MISSING else c for c in CASES]
assert set(_MISSING) <= {c.name for c in CASES}
