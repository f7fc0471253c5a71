"""Mechanisms of the loss family added for issue #8 item 6: one-hot row masks of targets
(`gg_notebook.lemmas.onehot`), decided over the whole id domain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gg_notebook.ir.specs import ew_spec
from gg_notebook.lemmas.onehot import eval_rows, onehot_rows
from gg_notebook.relations.expr import ExprStore

aten = torch.ops.aten


def _const(S, value):
    from gg_notebook.ir.lower import _Full  # noqa: F401  (const helper used by the lemma cases)
    from gg_notebook.relations.expr import OpSpec

    v = torch.as_tensor(value)
    return S.const(OpSpec("const", f"c{v.tolist()}", lambda *_a, v=v: v.clone(), ((), ())), tuple(v.shape), v.dtype)


def test_eval_rows_one_hot_of_shifted_ids():
    S = ExprStore()
    t = S.atom("t", (2, 3), torch.int64)
    start, part = 4, 4
    local = S.call(ew_spec(aten.sub.Tensor, 2), [t, _const(S, start)])
    eq = S.call(ew_spec(aten.eq.Tensor, 2), [S.view(local, (2, 3, 1)), _const(S, torch.arange(part))])
    dom = torch.arange(-1, 12)
    got = eval_rows(eq, t, dom)
    assert got is not None and got.shape == (13, part)
    want = F.one_hot((dom - start).clamp(0, part - 1), part).bool() & ((dom >= start) & (dom < start + part))[:, None]
    assert torch.equal(got, want)  # eq(t - start, j) is zero on out-of-shard ids
    # with the ids clamped into the shard, the out-of-shard rows are not zero
    cl = S.call(ew_spec(aten.maximum.default, 2), [local, _const(S, 0)])
    eq2 = S.call(ew_spec(aten.eq.Tensor, 2), [S.view(cl, (2, 3, 1)), _const(S, torch.arange(part))])
    got2 = eval_rows(eq2, t, dom)
    inside = (dom >= start) & (dom < start + part)
    assert not torch.equal(got2, want) and torch.equal(got2[inside], want[inside])
    assert torch.equal(onehot_rows(dom, start, part, torch.bool, masked=True), want)


def test_eval_rows_declines_what_mixes_rows():
    S = ExprStore()
    t = S.atom("t", (2, 3), torch.int64)
    eq = S.call(ew_spec(aten.eq.Tensor, 2), [S.view(t, (2, 3, 1)), _const(S, torch.arange(4))])
    dom = torch.arange(8)
    # a permutation of the rows (another position's id decides the row): declined
    assert eval_rows(S.call(ew_spec(aten.eq.Tensor, 2), [S.view(S.permute(t, (1, 0)), (2, 3, 1)),
                                                      _const(S, torch.arange(4))]), t, dom) is None
    # a constant that varies along the rows: declined
    assert eval_rows(S.call(ew_spec(aten.eq.Tensor, 2), [S.view(t, (2, 3, 1)),
                                                      _const(S, torch.arange(6).view(2, 3, 1))]), t, dom) is None
    # another input: declined
    u = S.atom("u", (2, 3), torch.int64)
    assert eval_rows(S.call(ew_spec(aten.add.Tensor, 2), [t, u]), t, dom) is None
    assert eval_rows(eq, t, dom) is not None


# ------------------------------------------------------------------ online-softmax merges (realform)
def _attn_store(seed: int):
    """Spellings of softmax(concat(s0, s1)) @ concat(v0, v1) (keys split in two), as terms."""
    from gg_notebook.ir.specs import reduce_spec
    from gg_notebook.lemmas.realform import RealForms

    rng = torch.Generator().manual_seed(seed)
    b, q, d = 2, 3, 4
    k0, k1 = int(torch.randint(2, 5, (1,), generator=rng)), int(torch.randint(2, 5, (1,), generator=rng))
    S = ExprStore()
    s = [S.atom("s0", (b, q, k0), torch.float64), S.atom("s1", (b, q, k1), torch.float64)]
    v = [S.atom("v0", (b, k0, d), torch.float64), S.atom("v1", (b, k1, d), torch.float64)]
    vals = {"s0": 3 * torch.randn(b, q, k0, generator=rng, dtype=torch.float64),
            "s1": 3 * torch.randn(b, q, k1, generator=rng, dtype=torch.float64),
            "v0": torch.randn(b, k0, d, generator=rng, dtype=torch.float64),
            "v1": torch.randn(b, k1, d, generator=rng, dtype=torch.float64)}
    call = S.call
    sub, exp, div, mul = (ew_spec(aten.sub.Tensor, 2), ew_spec(aten.exp.default, 1), ew_spec(aten.div.Tensor, 2),
                          ew_spec(aten.mul.Tensor, 2))
    sig = ew_spec(aten.sigmoid.default, 1)
    bmm = lambda p, w: call(_bmm_spec(), [p, w])  # noqa: E731
    amax = lambda t, dim=2: call(reduce_spec("amax", (dim,), True), [t])  # noqa: E731
    ssum = lambda t, dim=2, k=True: call(reduce_spec("sum", (dim,), k), [t])  # noqa: E731
    lse = lambda t, dim=2: call(reduce_spec("logsumexp", (dim,), True), [t])  # noqa: E731
    L = lse(S.cat(s, 2))
    spec = S.accum("sum", [bmm(call(exp, [call(sub, [s[r], L])]), v[r]) for r in range(2)])
    # max-then-sum all-reduces
    M = S.accum("max", [amax(p) for p in s])
    num = S.accum("sum", [bmm(call(exp, [call(sub, [p, M])]), w) for p, w in zip(s, v)])
    den = S.accum("sum", [ssum(call(exp, [call(sub, [p, M])])) for p in s])
    # per-block normalized outputs and their lse
    ls = [lse(p) for p in s]
    outs = [bmm(call(exp, [call(sub, [p, l_])]), w) for p, l_, w in zip(s, ls, v)]
    lse_all = lse(S.cat(ls, 2))
    ring = S.accum("sum", [call(mul, [o, call(exp, [call(sub, [l_, lse_all])])]) for o, l_ in zip(outs, ls)])
    sigmoid_update = call(sub, [outs[0], call(mul, [call(sig, [call(sub, [ls[1], ls[0]])]),
                                                     call(sub, [outs[0], outs[1]])])])
    # flash-decoding: own maxima, stacked and rescaled
    ms = [amax(p) for p in s]
    ps = [call(exp, [call(sub, [p, m_])]) for p, m_ in zip(s, ms)]
    os_ = S.cat([S.view(bmm(p, w), (1, b, q, d)) for p, w in zip(ps, v)], 0)
    lsum = S.cat([S.view(ssum(p), (1, b, q, 1)) for p in ps], 0)
    mst = S.cat([S.view(m_, (1, b, q, 1)) for m_ in ms], 0)
    alpha = call(exp, [call(sub, [mst, amax(mst, 0)])])
    flash = call(div, [ssum(call(mul, [os_, alpha]), 0, False), ssum(call(mul, [lsum, alpha]), 0, False)])
    right = [spec, call(div, [num, den]), ring, sigmoid_update, flash]
    wrong = [
        call(div, [S.accum("sum", [bmm(p, w) for p, w in zip(ps, v)]), S.accum("sum", [ssum(p) for p in ps])]),  # no rescale
        call(sub, [outs[0], call(mul, [call(sig, [call(sub, [ls[0], ls[1]])]), call(sub, [outs[0], outs[1]])])]),  # sign
        S.accum("sum", [call(mul, [o, call(exp, [call(sub, [l_, ls[0]])])]) for o, l_ in zip(outs, ls)]),  # block 0
        call(div, [num, S.accum("sum", [ssum(call(exp, [call(sub, [p, M])])) for p in s[:1]])]),  # local den
    ]
    return S, RealForms(S), right, wrong, vals


def _bmm_spec():
    from gg_notebook.lemmas import _cases as C

    spec, _ = C.spec_of(torch.bmm, torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64))
    return spec


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_online_softmax_merges_share_one_form_and_near_misses_do_not(seed):
    from gg_notebook.relations.expr import evaluate

    S, rf, right, wrong, vals = _attn_store(seed)
    leaf = lambda e: vals[e.attrs[0]]  # noqa: E731
    ref = evaluate(right[0], leaf)
    for t in right:
        assert torch.allclose(evaluate(t, leaf), ref)  # the spellings are right (else a test bug)
        assert rf.key(t) == rf.key(right[0]), f"a merge spelling gets another form: {t}"
    for t in wrong:
        assert not torch.allclose(evaluate(t, leaf), ref)
        assert rf.key(t) != rf.key(right[0]), "a wrong merge gets the form of the right one"
