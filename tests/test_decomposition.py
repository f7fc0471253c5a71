"""Decomposition where no lemma exists (issue #8, item 5): fused operators on shards are proved
through their definitions in known operators, on both sides, and wrong twins are refuted at the
user's line. See gg_notebook/ir/decompose.py.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import gg_notebook as gg
from gg_notebook.capture.tracing import trace_program
from gg_notebook.ir import decompose as D
from gg_notebook.ir.lower import lower

R = gg.Replicate()
aten = torch.ops.aten


def _rn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _line(fn, marker: str) -> str:
    """"file:line" of the line of ``fn``'s source containing ``marker``."""
    import inspect

    lines, start = inspect.getsourcelines(fn)
    k = next(i for i, text in enumerate(lines) if marker in text)
    return f"{inspect.getsourcefile(fn).rsplit('/', 1)[-1]}:{start + k}"


def _proved(problem, **kw):
    r = gg.verify(problem, **kw)
    assert r.status == "proved", str(r)
    return r


def _refuted_at(problem, fn, marker):
    r = gg.verify(problem)
    assert r.status == "refuted", str(r)
    where = {r.culprit.source} | {n.split(" at ")[-1] for n in r.culprit.nearby}
    assert any((w or "").endswith("/" + _line(fn, marker)) or w == _line(fn, marker) for w in where), str(r)
    return r


# ------------------------------------------------------------------------------ tensor-parallel SDPA
B, S, E, H = 2, 8, 16, 4


def attn_seq(x, wq, wk, wv, wo, *, mask=None):
    b, s, e = x.shape
    q = (x @ wq).view(b, s, H, e // H).transpose(1, 2)
    k = (x @ wk).view(b, s, H, e // H).transpose(1, 2)
    v = (x @ wv).view(b, s, H, e // H).transpose(1, 2)
    if mask is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.matmul(o.transpose(1, 2).reshape(b, s, e), wo)


def attn_tp(x, wq, wk, wv, wo, *, causal=True):
    """Heads sharded: this rank's columns of wq/wk/wv, its rows of wo; the output all-reduced."""
    b, s, _ = x.shape
    h = H // dist.get_world_size()
    d = wq.shape[1] // h
    q = torch.matmul(x, wq).reshape(b, s, h, d).permute(0, 2, 1, 3)
    k = torch.matmul(x, wk).reshape(b, s, h, d).permute(0, 2, 1, 3)
    v = torch.matmul(x, wv).reshape(b, s, h, d).permute(0, 2, 1, 3)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # gg: tp-sdpa
    out = o.permute(0, 2, 1, 3).reshape(b, s, h * d) @ wo
    dist.all_reduce(out)
    return out


def attn_tp_mask(x, wq, wk, wv, wo, mask, *, use_mask=True):
    b, s, _ = x.shape
    h = H // dist.get_world_size()
    q, k, v = (torch.matmul(x, w).view(b, s, h, -1).transpose(1, 2) for w in (wq, wk, wv))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if use_mask else None)  # gg: tp-sdpa-mask
    out = o.transpose(1, 2).reshape(b, s, -1) @ wo
    dist.all_reduce(out)
    return out


def _attn_inputs():
    return [_rn(B, S, E)] + [_rn(E, E, seed=i, scale=E ** -0.5) for i in (1, 2, 3, 4)]


TP = [R, gg.Shard(1), gg.Shard(1), gg.Shard(1), gg.Shard(0)]


def test_tp_sdpa_causal_proved():
    _proved(gg.Problem(attn_seq, attn_tp, _attn_inputs(), TP, 2, expect=[R]))


def test_tp_sdpa_not_causal_on_ranks_refuted_at_the_call():
    p = gg.Problem(attn_seq, functools.partial(attn_tp, causal=False), _attn_inputs(), TP, 2, expect=[R])
    _refuted_at(p, attn_tp, "gg: tp-sdpa")


def _mask_inputs(bool_mask: bool):
    m = torch.rand(S, S, generator=torch.Generator().manual_seed(9)) > 0.3 if bool_mask else _rn(S, S, seed=9)
    if bool_mask:
        m[:, 0] = True  # no row entirely masked
    return _attn_inputs() + [m]


@pytest.mark.parametrize("bool_mask", [False, True], ids=["additive", "bool"])
def test_tp_sdpa_explicit_mask_proved(bool_mask):
    def seq(x, wq, wk, wv, wo, mask):
        return attn_seq(x, wq, wk, wv, wo, mask=mask)

    _proved(gg.Problem(seq, attn_tp_mask, _mask_inputs(bool_mask), TP + [R], 2, expect=[R]))


def test_tp_sdpa_mask_dropped_refuted():
    def seq(x, wq, wk, wv, wo, mask):
        return attn_seq(x, wq, wk, wv, wo, mask=mask)

    p = gg.Problem(seq, functools.partial(attn_tp_mask, use_mask=False), _mask_inputs(False), TP + [R], 2, expect=[R])
    _refuted_at(p, attn_tp_mask, "gg: tp-sdpa-mask")


def gqa_seq(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def gqa_tp(q, k, v):
    # query heads and key/value heads sharded alike: rank r's query heads use rank r's kv heads
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def test_tp_sdpa_gqa_proved():
    q, k, v = _rn(2, 4, S, 8), _rn(2, 2, S, 8, seed=1), _rn(2, 2, S, 8, seed=2)
    _proved(gg.Problem(gqa_seq, gqa_tp, [q, k, v], [gg.Shard(1)] * 3, 2, expect=[gg.Shard(1)]))


def test_tp_sdpa_gqa_wrong_kv_sharding_refuted():
    # each rank holds all kv heads but only half the query heads: GQA pairs query heads with the
    # wrong kv heads (rank 0's heads 0,1 now share kv head 0 and 1 instead of both kv head 0)
    q, k, v = _rn(2, 4, S, 8), _rn(2, 2, S, 8, seed=1), _rn(2, 2, S, 8, seed=2)
    p = gg.Problem(gqa_seq, gqa_tp, [q, k, v], [gg.Shard(1), R, R], 2, expect=[gg.Shard(1)])
    assert gg.verify(p).status == "refuted"


# forward + backward: the program differentiates itself (SDPA's fused backward, decomposed)
def heads_fb(x, wq, wk, wv, *, causal=True):
    """Attention over this program's heads and the gradients of its squared norm w.r.t. the
    projections (for the ranks: their heads' columns; the loss splits over heads)."""
    b, s, _ = x.shape
    h = H // (dist.get_world_size() if dist.is_initialized() else 1)
    q, k, v = (torch.matmul(x, w).view(b, s, h, -1).transpose(1, 2) for w in (wq, wk, wv))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # gg: fb-sdpa
    o = o.transpose(1, 2).reshape(b, s, -1)
    grads = torch.autograd.grad((o * o).sum(), [wq, wk, wv])
    return (o,) + grads


def _grad_inputs():
    return [t.requires_grad_(i > 0) for i, t in enumerate(_attn_inputs()[:4])]


FB = dict(placements=TP[:4], world_size=2, expect=[gg.Shard(2), gg.Shard(1), gg.Shard(1), gg.Shard(1)])


def test_tp_sdpa_forward_backward_proved():
    r = _proved(gg.Problem(heads_fb, heads_fb, _grad_inputs(), **FB))
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward.default" in r.stats["decomposed"]


def test_tp_sdpa_forward_backward_not_causal_refuted():
    p = gg.Problem(heads_fb, functools.partial(heads_fb, causal=False), _grad_inputs(), **FB)
    _refuted_at(p, heads_fb, "gg: fb-sdpa")


# ------------------------------------------------------------------------------ sequence-parallel SDPA
def sp_seq(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sp_ranks(q, k, v, *, offset=True):
    """Queries sharded on the sequence; keys and values all-gathered; the causal mask shifted by
    this rank's first query position."""
    W, r = dist.get_world_size(), dist.get_rank()
    ks = [torch.empty_like(k) for _ in range(W)]
    vs = [torch.empty_like(v) for _ in range(W)]
    dist.all_gather(ks, k)
    dist.all_gather(vs, v)
    k, v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
    L, Sk = q.shape[2], k.shape[2]
    rows = torch.arange(L) + (r * L if offset else 0)
    mask = torch.arange(Sk)[None, :] <= rows[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_sp_sdpa_causal_proved():
    q, k, v = (_rn(2, 2, S, 8, seed=i) for i in range(3))
    _proved(gg.Problem(sp_seq, sp_ranks, [q, k, v], [gg.Shard(2)] * 3, 2, expect=[gg.Shard(2)]))


def test_sp_sdpa_mask_not_shifted_refuted():
    q, k, v = (_rn(2, 2, S, 8, seed=i) for i in range(3))
    p = gg.Problem(sp_seq, functools.partial(sp_ranks, offset=False), [q, k, v], [gg.Shard(2)] * 3, 2,
                   expect=[gg.Shard(2)])
    assert gg.verify(p).status == "refuted"


# ------------------------------------------------------------------------------ RMSNorm, sequence parallel
def rms_f(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, eps=1e-6)


def rms_manual(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def rms_sp_fb(norm):
    def seq(x, w):
        y = norm(x, w)
        (gw,) = torch.autograd.grad((y * y).sum(), [w])
        return y, gw

    def ranks(x, w):
        y = norm(x, w)
        (gw,) = torch.autograd.grad((y * y).sum(), [w])
        dist.all_reduce(gw)  # sequence-parallel weight gradient: a sum over the ranks' rows
        return y, gw

    return seq, ranks


@pytest.mark.parametrize("norm", [rms_f, rms_manual], ids=["F.rms_norm", "written out"])
def test_rms_norm_sequence_parallel(norm):
    x, w = _rn(2, S, E), _rn(E, seed=1).requires_grad_()
    _proved(gg.Problem(norm, norm, [x, w], [gg.Shard(1), R], 2, expect=[gg.Shard(1)]))
    seq, ranks = rms_sp_fb(norm)
    _proved(gg.Problem(seq, ranks, [x, w], [gg.Shard(1), R], 2, expect=[gg.Shard(1), R]))


def test_nn_rmsnorm_sequence_parallel():
    norm = nn.RMSNorm(E, eps=1e-5, dtype=torch.float64)

    def prog(x, w):
        return torch.func.functional_call(norm, {"weight": w}, (x,))

    _proved(gg.Problem(prog, prog, [_rn(2, S, E), _rn(E, seed=3)], [gg.Shard(1), R], 2, expect=[gg.Shard(1)]))


def test_rms_norm_over_the_sharded_dim_refuted():
    # sharding the hidden dim instead: each rank normalizes by its half's mean square
    def prog(x, w):
        return F.rms_norm(x, (x.shape[-1],), w)  # gg: rms-hidden

    x, w = _rn(2, S, E), _rn(E, seed=1)
    p = gg.Problem(prog, prog, [x, w], [gg.Shard(2), gg.Shard(0)], 2, expect=[gg.Shard(2)])
    _refuted_at(p, prog, "gg: rms-hidden")


def test_rms_norm_weight_gradient_not_reduced_refuted():
    seq, _ = rms_sp_fb(rms_f)

    def ranks(x, w):
        y = rms_f(x, w)
        (gw,) = torch.autograd.grad((y * y).sum(), [w])
        return y, gw

    x, w = _rn(2, S, E), _rn(E, seed=1).requires_grad_()
    assert gg.verify(gg.Problem(seq, ranks, [x, w], [gg.Shard(1), R], 2, expect=[gg.Shard(1), R])).status == "refuted"


# ------------------------------------------------------------------------------ group norm, batch norm
def gn_seq(x, w, b):
    return F.group_norm(x, 4, w, b)


def gn_ranks(x, w, b, *, groups=None):
    """Channels sharded by whole groups: each rank normalizes its own groups."""
    return F.group_norm(x, groups or 4 // dist.get_world_size(), w, b)  # gg: gn


def _gn_inputs(grad=False):
    return [_rn(3, 8, 5).requires_grad_(grad), _rn(8, seed=1).requires_grad_(grad), _rn(8, seed=2).requires_grad_(grad)]


GN = [gg.Shard(1), gg.Shard(0), gg.Shard(0)]


def test_group_norm_channels_sharded_by_groups_proved():
    r = _proved(gg.Problem(gn_seq, gn_ranks, _gn_inputs(), GN, 2, expect=[gg.Shard(1)]))
    assert "aten.native_group_norm.default" in r.stats["decomposed"]


def test_group_norm_global_group_count_refuted():
    p = gg.Problem(gn_seq, functools.partial(gn_ranks, groups=4), _gn_inputs(), GN, 2, expect=[gg.Shard(1)])
    _refuted_at(p, gn_ranks, "gg: gn")


def test_group_norm_forward_backward_proved():
    def seq(x, w, b):
        y = gn_seq(x, w, b)
        return (y,) + torch.autograd.grad((y * y).sum(), [x, w])

    def ranks(x, w, b):
        y = gn_ranks(x, w, b)
        return (y,) + torch.autograd.grad((y * y).sum(), [x, w])

    _proved(gg.Problem(seq, ranks, _gn_inputs(True), GN, 2, expect=[gg.Shard(1), gg.Shard(1), gg.Shard(0)]))


def test_batch_norm_eval_channels_sharded():
    def prog(x, w, b, mean, var):
        return F.batch_norm(x, mean, var, w, b, training=False, eps=1e-5)

    ins = [_rn(4, 8, 5), _rn(8, seed=1), _rn(8, seed=2), _rn(8, seed=3), _rn(8, seed=4).abs() + 0.5]
    _proved(gg.Problem(prog, prog, ins, [gg.Shard(1)] + [gg.Shard(0)] * 4, 2, expect=[gg.Shard(1)]))

    def wrong(x, w, b, mean, var):
        return F.batch_norm(x, mean, var, w, b, training=False, eps=1e-3)  # gg: bn-eps

    _refuted_at(gg.Problem(prog, wrong, ins, [gg.Shard(1)] + [gg.Shard(0)] * 4, 2, expect=[gg.Shard(1)]),
                wrong, "gg: bn-eps")


# ------------------------------------------------------------------------------ a user library's fused op
@torch.library.custom_op("gg_test::fused_ln", mutates_args=())
def fused_ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


@fused_ln.register_fake
def _(x, w, b, eps):
    return torch.empty_like(x)


def fused_ln_definition(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ln_seq(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def ln_sp(x, w, b):
    return torch.ops.gg_test.fused_ln(x, w, b, 1e-5)  # gg: fused-ln


def _ln_inputs():
    return [_rn(2, S, E), _rn(E, seed=1), _rn(E, seed=2)]


def _ln_problem(seq, decompositions=None):
    return gg.Problem(seq, ln_sp, _ln_inputs(), [gg.Shard(1), R, R], 2, expect=[gg.Shard(1)],
                      decompositions=decompositions)


def test_custom_op_with_user_definition_proved():
    # the library's fused layer norm in both programs, defined by its formula
    r = _proved(_ln_problem(ln_sp, {torch.ops.gg_test.fused_ln.default: fused_ln_definition}))
    assert r.stats["decomposed"]["gg_test.fused_ln.default"] == 3  # the sequential call and one per rank
    # against F.layer_norm: defined as layer norm (a packet key covers every overload)
    as_ln = {torch.ops.gg_test.fused_ln: lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps)}
    _proved(_ln_problem(ln_seq, as_ln))


def test_custom_op_definition_checked_against_its_kernel():
    def wrong(x, w, b, eps):
        return fused_ln_definition(x, w, b, eps) + b  # the bias twice

    with pytest.raises(D.CustomOpError, match="disagrees with the operator's own kernel") as e:
        gg.verify(_ln_problem(ln_seq, {torch.ops.gg_test.fused_ln.default: wrong}))
    assert "/" + _line(ln_sp, "gg: fused-ln") in str(e.value)


def test_custom_op_without_definition_is_a_clear_error():
    with pytest.raises(D.CustomOpError) as e:
        gg.verify(_ln_problem(ln_seq))
    msg = str(e.value)
    assert "gg_test.fused_ln.default" in msg and "rank 0" in msg and "/" + _line(ln_sp, "gg: fused-ln") in msg
    assert "decompositions={torch.ops.gg_test.fused_ln.default: fn}" in msg
    assert e.value.rank == 0 and isinstance(e.value, gg.ProblemError)


@pytest.mark.parametrize("kw", [dict(capture="inprocess"), dict(capture="processes"),
                                dict(capture="processes", capture_once=False)])
def test_custom_op_error_names_the_lowest_rank_however_captured(kw):
    # derived ranks are lowered after their representative: the error is rank 0's, as when every rank is traced
    with pytest.raises(D.CustomOpError) as e:
        gg.verify(_ln_problem(ln_seq), **kw)
    assert e.value.rank == 0 and "rank 0's program" in str(e.value)


def test_custom_op_definition_with_wrong_shape_is_refused():
    with pytest.raises(D.CustomOpError, match="did not apply"):
        gg.verify(_ln_problem(ln_seq, {torch.ops.gg_test.fused_ln.default: lambda x, w, b, eps: x.sum(-1)}))


def test_custom_op_kept_opaque_relates_by_identity_only():
    opaque = {torch.ops.gg_test.fused_ln.default: None}
    _proved(gg.Problem(ln_sp, ln_sp, _ln_inputs(), [R, R, R], 2, expect=[R], decompositions=opaque))
    assert gg.verify(_ln_problem(ln_seq, opaque)).status == "unknown"


@pytest.mark.parametrize("bad, match", [
    ({"fused_ln": fused_ln_definition}, "not an operator"),
    ({torch.ops.gg_test.fused_ln.default: 3}, "give a function"),
])
def test_bad_decompositions_argument(bad, match):
    p = gg.Problem(ln_seq, ln_sp, _ln_inputs(), [gg.Shard(1), R, R], 2, decompositions=bad)
    with pytest.raises(gg.ProblemError, match=match):
        gg.verify(p)


# ------------------------------------------------------------------------------ what is decomposed
def _lowered(fn, inputs, decompositions):
    p = gg.Problem(fn, fn, inputs, [R] * len(inputs), 2)
    gm, _ = trace_program(p, None)
    return lower(gm, None, None, decompositions)


def _generic(graph):
    return {n.target for n in D._stuck_calls(graph)}


def _ln_with_stats(x, w, b):
    # the statistics are read (as a backward reads them): the fused operator stays (a forward-only
    # layer norm is written out by the pointwise normal form, see test_layer_norm_forward_written_out)
    out, mean, rstd = torch.ops.aten.native_layer_norm(x, [E], w, b, 1e-5)
    return out, mean * rstd


KNOWN = {
    "layer_norm": (_ln_with_stats, [_rn(2, S, E), _rn(E), _rn(E)], "native_layer_norm"),
    "softmax": (lambda x: torch.softmax(x, -1), [_rn(2, S, E)], "_softmax"),
    "log_softmax + nll": (lambda x, t: F.cross_entropy(x, t), [_rn(6, E), torch.arange(6)], "nll_loss_forward"),
    "embedding": (lambda w, i: F.embedding(i, w), [_rn(E, 4), torch.arange(6)], "embedding"),
    "mm": (lambda a, b: a @ b, [_rn(3, 4), _rn(4, 5)], "mm"),
    "gelu tanh": (lambda x: F.gelu(x, approximate="tanh"), [_rn(3, 4)], "gelu"),
}


@pytest.mark.parametrize("name", KNOWN)
def test_operators_with_lemmas_stay_whole(name):
    fn, inputs, op = KNOWN[name]
    g = _lowered(fn, inputs, {})
    assert g.decomposed == {}
    assert any(op in n.target for n in g.nodes if n.op == "call")


def test_layer_norm_forward_written_out():
    """A forward-only layer norm is not decomposed (it has lemmas) but written out by the pointwise
    normal form (gg_notebook/ir/pointwise_normal.py): mean, centred square, mean, + eps, rsqrt."""
    g = _lowered(lambda x, w, b: F.layer_norm(x, (E,), w, b), [_rn(2, S, E), _rn(E), _rn(E)], {})
    assert g.decomposed == {}
    targets = [n.target for n in g.nodes if n.op == "call"]
    assert not any("native_layer_norm" in t for t in targets)
    assert any("rsqrt" in t for t in targets) and sum("mean" in t for t in targets) == 2


UNKNOWN = {
    "sdpa causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), 3),
    "sdpa gqa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), 3),
    "group_norm": (lambda x: F.group_norm(x.flatten(2), 2), 1),
    "normalize": (lambda x: F.normalize(x, dim=-1), 1),
    "mish": (lambda x: F.mish(x), 1),
    "softplus": (lambda x: F.softplus(x, beta=2.0), 1),
    "var / std": (lambda x: x.var(-1) + x.std(1, keepdim=True).sum(-1) + torch.var_mean(x, (0, 2))[0].sum(), 1),
}


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", UNKNOWN)
def test_nothing_generic_is_left(name, grad):
    fn, n = UNKNOWN[name]
    inputs = [_rn(2, 4 if i == 0 or "gqa" not in name else 2, S, 8, seed=i).requires_grad_(grad) for i in range(n)]
    prog = fn
    if grad:
        def prog(*xs):
            y = fn(*xs)
            return (y,) + torch.autograd.grad(y.pow(2).sum(), xs)
    before = _generic(_lowered(prog, inputs, None))
    after = _generic(_lowered(prog, inputs, {}))
    assert not after, (before, after)
    assert before or (name in ("mish", "softplus") and not grad)  # their backward only has no lemma


def test_exact_bitwise_does_not_decompose():
    # a definition equals its operator over the reals only: in bitwise mode the group norm stays whole
    r = gg.verify(gg.Problem(gn_seq, gn_ranks, _gn_inputs(), GN, 2, expect=[gg.Shard(1)]), exact="bitwise")
    assert r.status != "proved" and "decomposed" not in r.stats


# ------------------------------------------------------------------------------ random operators
def drop_attn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


def test_sdpa_dropout_keeps_the_random_policy():
    q, k, v = (_rn(2, 4, S, 8, seed=i) for i in range(3))
    p = gg.Problem(drop_attn, drop_attn, [q, k, v], [gg.Shard(1)] * 3, 2, expect=[gg.Shard(1)])
    with pytest.raises(gg.RandomOpError):
        gg.verify(p)
    p.random = "identity"
    assert gg.verify(p).status == "assumed"


# ------------------------------------------------------------------------------ the definitions themselves
def test_flash_backward_definition_matches_the_kernel():
    g = torch.Generator().manual_seed(0)
    for causal, mask, hk in ((True, None, 4), (False, torch.randn(8, 8, generator=g), 4), (True, None, 2)):
        q = torch.randn(2, 4, 8, 16, generator=g, requires_grad=True)
        k = torch.randn(2, hk, 8, 16, generator=g, requires_grad=True)
        v = torch.randn(2, hk, 8, 16, generator=g, requires_grad=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=hk != 4, scale=0.3)
        go = torch.randn_like(out)
        ref = torch.autograd.grad(out, (q, k, v), go)
        got = D._sdpa_grads(go, q.detach(), k.detach(), v.detach(), mask, causal, 0.3)
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    fwd = aten._scaled_dot_product_flash_attention_for_cpu.default(q.detach(), k.detach(), v.detach(), 0.0, True)
    assert D._flash_cpu_backward(go, q, k, v, fwd[0], fwd[1], 0.5, True) is NotImplemented


def test_reduction_definitions_match_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    for dim, corr, keep in (((1,), 1, False), ((0, 2), 0, True), (None, 1, False), ((-1,), 2, True)):
        v, m = D._var_mean(x, dim, correction=corr, keepdim=keep)
        rv, rm = torch.var_mean(x, dim, correction=corr, keepdim=keep)
        torch.testing.assert_close((v, m), (rv, rm))
        torch.testing.assert_close(D._std(x, dim, correction=corr, keepdim=keep), torch.std(x, dim, correction=corr, keepdim=keep))
    assert D._var_mean(torch.arange(4), None) is NotImplemented
    b = torch.rand(4, 6, generator=g) > 0.5
    b[0] = True
    b[1] = False
    for d in (0, 1, -1):
        for keep in (False, True):
            assert torch.equal(D._all_dim(b, d, keep), b.all(d, keep))
            assert torch.equal(D._any_dim(b, d, keep), b.any(d, keep))
    assert torch.equal(D._all_dims(b), b.all()) and torch.equal(D._any_dims(b, (0, 1)), b.any((0, 1)))
    assert D._all_dim(x, 0) is NotImplemented


def test_safe_softmax_definition_matches_torch():
    x = torch.randn(3, 5, dtype=torch.float64)
    x[1] = float("-inf")
    x[2, :2] = float("-inf")
    torch.testing.assert_close(D._safe_softmax(x, -1), aten._safe_softmax.default(x, -1))


def test_as_strided_definition_only_for_contiguous_reads():
    x = torch.randn(4, 6)
    torch.testing.assert_close(D._as_strided(x, (2, 12), (12, 1)), x.as_strided((2, 12), (12, 1)))
    torch.testing.assert_close(D._as_strided(x, (24, 1), (1, 1)), x.as_strided((24, 1), (1, 1)))
    assert D._as_strided(x, (2, 6), (6, 1)) is NotImplemented  # a part of the storage
    assert D._as_strided(x, (6, 4), (1, 6)) is NotImplemented  # a transposed read
    assert D._as_strided(x.t(), (6, 4), (4, 1)) is NotImplemented  # not contiguous
    assert D._as_strided(x[1:], (3, 6), (6, 1)) is NotImplemented  # an offset
