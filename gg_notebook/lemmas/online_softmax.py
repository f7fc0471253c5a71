"""Online softmax: attention with the keys / values split across ranks (flash-decoding, ring attention).

The sequential program computes ``softmax(s) @ v`` over all keys; the ranks hold ``s_r`` (scores
against their keys) and ``v_r`` and combine per-shard partial results, in many spellings:

* a MAX all-reduce of the row maxima ``M``, then SUM all-reduces of ``exp(s_r - M) @ v_r`` and of
  ``sum(exp(s_r - M))``, divided (``num / den``);
* each shard's ``(m_r, l_r, o_r)`` with its *own* maximum, gathered and rescaled by
  ``exp(m_r - max_r m_r)`` (flash-decoding);
* each shard's normalized output ``softmax(s_r) @ v_r`` and its log-sum-exp ``lse_r``, merged with
  weights ``exp(lse_r - logsumexp_r(lse_r))`` (ring attention), or pairwise with
  ``sigmoid(lse_b - lse)`` / ``logsigmoid`` updates.

Context parallelism (ring attention) splits the queries too: the scores are a concatenation along
the rows of row pieces, each split along the keys; the softmax is row-wise and the product's rows are
the left operand's, so each row piece is handled on its own (`_split_rows`).

All are the identity ``softmax(concat_r s_r) @ concat_r v_r = sum_r exp(s_r - LSE(s)) @ v_r`` with
``LSE(s)`` the log-sum-exp of the whole row. ``softmax-matmul-over-split-keys`` rewrites the
sequential ``(b)mm(softmax(concat(s_r)), concat(v_r))`` into that sum as a `real_value`, matched by
the real normal form of `realform`, where ``mm(exp(C + R), v) = exp(C) mm(exp(R), v)`` for a ``C``
constant along the contracted dim makes every rescaling and normalization of the partial products
cancel syntactically. Real-valued identities: ``exact="real"`` only.
"""

from __future__ import annotations

import torch

from gg_notebook.ir.specs import ew_spec, reduce_spec
from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.lemmas.realform import real_value
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError

aten = torch.ops.aten


def _softmax_input(a):
    """(the softmax call, its view's shape or None) if ``a`` is ``softmax(x, last)`` or a view of it
    that keeps the last dim; else None."""
    view = None
    if a.op == "view":
        view = tuple(a.shape)
        a = a.args[0]
    if a.op != "call" or a.attrs.target is not aten._softmax.default or a.attrs.arg("half_to_float") is not False:
        return None
    nd = len(a.shape)
    if int(a.attrs.arg("dim")) % nd != nd - 1:
        return None
    if view is not None and view[-1] != a.shape[-1]:
        return None
    return a, view


def _builder(n: int, d: int, mm, views, shape=None):
    def build(S, h):
        out = _build(S, h)
        return out if shape is None or tuple(out.shape) == tuple(shape) else S.view(out, shape)

    def _build(S, h):
        ss, vs = h[:n], h[n:]
        lse = S.call(reduce_spec("logsumexp", (d,), True), [S.cat(ss, d)])
        parts = []
        for r in range(n):
            p = S.call(ew_spec(aten.exp.default, 1), [S.call(ew_spec(aten.sub.Tensor, 2), [ss[r], lse])])
            if views[r] is not None:
                p = S.view(p, views[r])
            parts.append(S.call(mm, [p, vs[r]]))
        return S.accum("sum", parts)
    return build


def softmax_matmul_over_split_keys(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    if spec.target not in (aten.bmm.default, aten.mm.default) or len(args) != 2:
        return
    found = _softmax_input(args[0])
    if found is None:
        return
    sm, view = found
    x, v = sm.args[0], args[1]
    if x.dtype is None or not x.dtype.is_floating_point or x.dtype != sm.dtype or v.dtype != sm.dtype:
        return
    d = len(x.shape) - 1
    kdim = len(v.shape) - 2  # the contracted dim of the right operand
    if x.op == "cat" and x.attrs == d - 1 and d >= 1:
        yield from _split_rows(S, spec, sm, view, x, v, out_shape)
        return
    if x.op != "cat" or x.attrs != d or v.op != "cat" or v.attrs != kdim or len(x.args) != len(v.args):
        return
    if [p.shape[d] for p in x.args] != [p.shape[kdim] for p in v.args]:
        return  # the keys of each score piece are the rows of the same value piece
    n = len(x.args)
    views = [None if view is None else view[:-1] + (p.shape[d],) for p in x.args]
    holes = list(x.args) + list(v.args)
    # the ranks usually compute in the shape before the view (attention's [b, h, q, d], not [b*h, q, d])
    shapes = ([sm.shape[:-1] + (out_shape[-1],)] if view is not None else []) + [None]
    for shape in shapes:
        try:
            r = real_value(S, holes, _builder(n, d, spec, views, shape), "softmax @ v over split keys")
            yield S.view(r, out_shape) if tuple(r.shape) != tuple(out_shape) else r
        except ShapeError:
            continue


def _split_rows(S: ExprStore, spec: OpSpec, sm, view, x, v, out_shape: tuple):
    """The scores also split along the query rows (context parallelism: each rank its query block,
    each block against every key block): the softmax is row-wise and the rows of the left operand
    are the rows of the product, so ``(b)mm(view(softmax(cat_rows(x_i))), v) =
    cat_rows((b)mm(view_i(softmax(x_i)), v))``; each piece is then an online softmax over split keys.
    The view (if any) must keep the last two dims (it merges leading batch dims only)."""
    d = len(x.shape) - 1
    if view is not None and (len(view) < 2 or tuple(view[-2:]) != tuple(sm.shape[-2:])):
        return
    if len(out_shape) < 2 or tuple(out_shape[:-1]) != (tuple(view[:-1]) if view is not None else tuple(sm.shape[:-1])):
        return  # the product's rows are the softmax's rows (same leading dims)
    row_out = len(out_shape) - 2
    options: list[list] = []
    for piece in x.args:
        try:
            a = S.call(sm.attrs, [piece])
            if view is not None:
                a = S.view(a, tuple(view[:-2]) + (piece.shape[d - 1], view[-1]))
        except ShapeError:
            return
        shape = tuple(out_shape[:-2]) + (piece.shape[d - 1], out_shape[-1])
        found = list(softmax_matmul_over_split_keys(S, spec, (a, v), shape))
        if not found:
            return
        options.append(found)
    for j in range(min(len(o) for o in options)):
        try:
            yield S.cat([o[j] for o in options], row_out)
        except ShapeError:
            continue


def _case(rng, b, h, q, ks, dv, dtype=torch.float64, scale=1.0, split_v=True, description="", masked=None):
    """softmax(s) @ v through the [b*h, q, k] view attention uses; s split along the keys."""
    from gg_notebook.ir.specs import softmax_spec

    k = sum(ks)
    s = scale * C.randn(rng, b, h, q, k, dtype=dtype)
    if masked == "key":
        s[..., 0] = -float("inf")  # a masked key (probability 0)
    elif masked == "row":
        s[0, 0, 0, :] = -float("inf")  # a fully masked row: NaN on both sides
    v = C.randn(rng, b * h, k, dv, dtype=dtype)
    p = torch.softmax(s, -1).view(b * h, q, k)
    spec, _ = C.spec_of(torch.bmm, p, v)
    case = C.make_case(spec, (s, v), rng, split={0: 3, 1: 1 if split_v else 2})
    S = case.store
    sm = S.call(softmax_spec("softmax", 3), [case.args[0]])
    return type(case)(spec, (S.view(sm, (b * h, q, k)), case.args[1]), case.values, S, description)


def _rows_case(rng, b, h, qs, ks, dv, dtype=torch.float64, masked=False, view=True, description=""):
    """Context parallelism: the scores split along the query rows (pieces ``qs``) and, inside each
    row piece, along the keys (pieces ``ks``); the values split along the keys in the same pieces."""
    from gg_notebook.ir.specs import softmax_spec
    from gg_notebook.relations.expr import ExprStore

    q, k = sum(qs), sum(ks)
    s = C.randn(rng, b, h, q, k, dtype=dtype)
    if masked:  # a causal mask: -inf above the diagonal (every row keeps its first key)
        s = s.masked_fill(torch.ones(q, k, dtype=torch.bool).triu(1), -float("inf"))
    v = C.randn(rng, b * h, k, dv, dtype=dtype)
    S = ExprStore()
    values: dict = {}

    def atom(name, t):
        values[name] = t.clone()
        return S.atom(name, tuple(t.shape), t.dtype)

    rows = []
    for i, srows in enumerate(torch.split(s, qs, 2)):
        rows.append(S.cat([atom(f"s{i}_{j}", blk) for j, blk in enumerate(torch.split(srows, ks, 3))], 3))
    x = S.cat(rows, 2)
    vexpr = S.cat([atom(f"v{j}", blk) for j, blk in enumerate(torch.split(v, ks, 1))], 1)
    sm = S.call(softmax_spec("softmax", 3), [x])
    if view:
        p = torch.softmax(s, -1).view(b * h, q, k)
        spec, _ = C.spec_of(torch.bmm, p, v)
        left = S.view(sm, (b * h, q, k))
    else:  # a [b*h]-batched softmax, no view
        s3 = s.reshape(b * h, q, k)
        spec, _ = C.spec_of(torch.bmm, torch.softmax(s3, -1), v)
        x3 = S.cat([S.cat([atom(f"t{i}_{j}", blk) for j, blk in enumerate(torch.split(r, ks, 2))], 2)
                    for i, r in enumerate(torch.split(s3, qs, 1))], 1)
        left = S.call(softmax_spec("softmax", 2), [x3])
    return C.LemmaCase(spec, (left, vexpr), values, S, description)


def _cases(rng):
    for k in range(4):
        b, h, dv = C.dims(rng, 1, 3), C.dims(rng, 1, 3), C.dims(rng, 2, 4)
        qs = [C.dims(rng, 1, 3) for _ in range(C.dims(rng, 2, 4))]
        ks = [C.dims(rng, 1, 3) for _ in range(C.dims(rng, 2, 4))]
        yield _rows_case(rng, b, h, qs, ks, dv, masked=k == 1, view=k != 2,
                         description=f"query rows {qs} x keys {ks}{', causal' if k == 1 else ''}"
                                     f"{', no view' if k == 2 else ''}")
    yield _rows_case(rng, 2, 2, [2, 3], [4], 3, description="query rows split, keys whole (declines)")

    for k in range(6):
        b, h, q, dv = C.dims(rng, 2, 4), C.dims(rng, 1, 3), C.dims(rng, 1, 4), C.dims(rng, 2, 5)
        k_total = C.dims(rng, 4, 10)
        dtype = torch.float32 if k == 2 else torch.float64
        scale = 30.0 if k == 3 else 1.0  # large scores: softmax nearly one-hot
        yield _case(rng, b, h, q, [k_total], dv, dtype=dtype, scale=scale,
                    description=f"softmax @ v, keys split, {dtype}, score scale {scale}")
    b, h, q, dv = 2, 2, 3, 4
    yield _case(rng, b, h, q, [7], dv, masked="key", description="a masked key (-inf score)")
    yield _case(rng, b, h, q, [7], dv, masked="row", description="a fully masked row (-inf scores)")
    yield _case(rng, b, h, q, [6], dv, split_v=False, description="values split along another dim (declines)")


register(Lemma(
    name="softmax-matmul-over-split-keys",
    statement="(b)mm(softmax(concat_r(s_r), -1), concat_r(v_r)) = sum_r (b)mm(exp(s_r - LSE(concat(s))), v_r),"
              " matched to a rank value equal to it over the reals (realform, with mm(exp(C + R), v) ="
              " exp(C) mm(exp(R), v) for C constant along the keys)",
    kinds=("matmul",),
    absorbs=("softmax",),
    plans=softmax_matmul_over_split_keys,
    cases=_cases,
    conditions=("the softmax (half_to_float=False) is over the last dim, concatenated along it",
                "the right operand is concatenated along its contracted dim in the same pieces",
                "a view of the softmax keeps its last dim",
                "scores also split along the query rows (context parallelism): each row piece separately, the"
                " view (if any) keeping the last two dims; every row piece split along the keys",
                "related by the real normal form; exact='real' only"),
    priority=44,
    on=((aten.bmm.default, (), ()), (aten.mm.default, (), ())),
))
