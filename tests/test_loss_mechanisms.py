"""Mechanisms of the loss family added for issue #8 item 6: one-hot row masks of targets
(`gg_notebook.lemmas.onehot`), decided over the whole id domain."""

from __future__ import annotations

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
