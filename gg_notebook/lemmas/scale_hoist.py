"""Constant factors out of linear operators: ``op(.., c * x, ..) = c * op(.., x, ..)``.

A data-parallel rank differentiates the mean loss of its own batch slice, so every gradient it holds
is the global gradient's slice times the number of replicas (the factor cancels when the gradients
are averaged). On a 2-D mesh such a scaled gradient meets operators whose lemmas look for a whole
rank value in that argument (the vocabulary-parallel embedding backward wants the TP all-reduce of
the gradient, not ``0.5 *`` it), so the factor is taken out first and the operator related to the
ranks on the unscaled value; the factor stays on the result (a relation with a factor is never
clean: it must cancel later).

* ``scale-hoist``: for an operator linear in argument i separately (the linearity table:
  matmul, mul, embedding backward, activation backward, ...), ``op(.., c * x, ..) = c * op(.., x, ..)``;
  for one linear jointly in its tensor arguments (add, sub), only when every one of them carries the
  same factor ``c``. Over the reals (not bitwise: ``(c * x) @ w`` and ``c * (x @ w)`` may round
  differently).
* ``sum-of-concats``: ``sum_k concat_j(a_kj) = concat_j(sum_k a_kj)`` (and ``c * concat_j(x_j) =
  concat_j(c * x_j)``) when every term is concatenated along the same dim with the same piece sizes:
  an elementwise operator on a gradient reduced over a 2-D mesh (summed over the DP replicas of
  TP shards) then splits over the shards, each piece a DP all-reduce some rank holds.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import LemmaCase, Lemma, register
from gg_notebook.lemmas.dims import linear_args
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError


def _factor_of(a):
    if a.op == "scale" and a.args[0].shape == a.shape and a.args[0].dtype == a.dtype:
        return a.attrs
    return None


def scale_hoist(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    lin = linear_args(spec, [a.dtype for a in args])
    if lin is None:
        return
    mode, slots = lin
    if mode == "separately":
        for i in slots:
            c = _factor_of(args[i])
            if c is None:
                continue
            try:
                yield S.scale(S.call(spec, args[:i] + (args[i].args[0],) + args[i + 1:]), c)
            except ShapeError:
                continue
            return
    elif mode == "jointly" and len(slots) == len(args):
        factors = {_factor_of(a) for a in args}
        if len(factors) != 1 or None in factors:
            return
        (c,) = factors
        try:
            yield S.scale(S.call(spec, tuple(a.args[0] for a in args)), c)
        except ShapeError:
            return


def _cat_layout(e):
    """(dim, piece sizes, pieces) of a concatenation, looking through one factor; None otherwise."""
    c = None
    if e.op == "scale":
        c, e = e.attrs, e.args[0]
    if e.op != "cat":
        return None
    d = e.attrs
    return d, tuple(a.shape[d] for a in e.args), [a if c is None else ("scale", c, a) for a in e.args]


def _regrouped(S: ExprStore, a):
    """``a`` (``[c *] sum_k concat_j(a_kj)``) as ``concat_j([c *] sum_k a_kj)``; None if it is not one."""
    c = None
    if a.op == "scale":
        c, a = a.attrs, a.args[0]
    if not (a.op == "accum" and a.attrs == "sum" and len(a.args) > 1):
        return None
    layouts = [_cat_layout(t) for t in a.args]
    if any(l is None for l in layouts) or len({(l[0], l[1]) for l in layouts}) != 1:
        return None
    d, sizes, _ = layouts[0]

    def piece(p):
        return S.scale(p[2], p[1]) if isinstance(p, tuple) else p

    pieces = []
    for j in range(len(sizes)):
        total = S.accum("sum", [piece(l[2][j]) for l in layouts])
        pieces.append(total if c is None else S.scale(total, c))
    return S.cat(pieces, d)


def sum_of_concats(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    for i, a in enumerate(args):
        r = _regrouped(S, a)
        if r is None or r.shape != a.shape or r.dtype != a.dtype:
            continue
        try:
            yield S.call(spec, args[:i] + (r,) + args[i + 1:])
        except ShapeError:
            continue
        return


def regroup_case(fn, tensors, rng, arg: int, terms: int, dim: int, c, description: str) -> LemmaCase:
    """``fn(*tensors)`` with argument ``arg`` given as ``c * sum_k concat_j(a_kj)`` (``terms`` terms,
    each cut the same way along ``dim``)."""
    spec, order = C.spec_of(fn, *tensors)
    S = ExprStore()
    values, args = {}, []
    for slot, o in enumerate(order):
        t = tensors[o]
        if o != arg:
            values[f"a{slot}"] = t
            args.append(S.atom(f"a{slot}", tuple(t.shape), t.dtype))
            continue
        sizes = C.split_sizes(rng, t.shape[dim], 2 + int(torch.randint(0, 2, (1,), generator=rng)))
        parts = [torch.randn(t.shape, generator=rng, dtype=t.dtype) for _ in range(terms - 1)]
        parts.append(t / float(c) - sum(parts))
        cats = []
        for k, v in enumerate(parts):
            pieces = []
            for j, p in enumerate(torch.split(v, sizes, dim)):
                values[f"a{slot}_{k}_{j}"] = p.clone()
                pieces.append(S.atom(f"a{slot}_{k}_{j}", tuple(p.shape), p.dtype))
            cats.append(S.cat(pieces, dim))
        args.append(S.scale(S.accum("sum", cats), c))
    return LemmaCase(spec, tuple(args), values, S, description)


def scaled_case(fn, tensors, rng, scaled: dict[int, Fraction], description: str) -> LemmaCase:
    """``fn(*tensors)`` with argument i given as ``scaled[i] * atom`` (the atom holds tensor / c)."""
    spec, order = C.spec_of(fn, *tensors)
    S = ExprStore()
    values, args = {}, []
    for slot, o in enumerate(order):
        t = tensors[o]
        name = f"a{slot}"
        if o in scaled:
            c = scaled[o]
            values[name] = t / float(c)
            args.append(S.scale(S.atom(name, tuple(t.shape), t.dtype), c))
        else:
            values[name] = t
            args.append(S.atom(name, tuple(t.shape), t.dtype))
    return LemmaCase(spec, tuple(args), values, S, description)


def _cases(rng):
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    aten = torch.ops.aten
    half, third, neg = Fraction(1, 2), Fraction(1, 3), Fraction(-3, 4)
    for _ in range(3):
        m, n, k, b = C.dims(rng), C.dims(rng), C.dims(rng), C.dims(rng)
        yield scaled_case(lambda a, w: a @ w, (r(m, k), r(k, n)), rng, {0: half}, "mm, lhs scaled")
        yield scaled_case(lambda a, w: a @ w, (r(m, k), r(k, n)), rng, {1: neg}, "mm, rhs scaled")
        yield scaled_case(torch.bmm, (r(b, m, k), r(b, k, n)), rng, {0: third}, "bmm")
        yield scaled_case(lambda x, y: x * y, (r(m, n), r(m, n)), rng, {1: half}, "mul")
        yield scaled_case(lambda g, y: aten.tanh_backward(g, y), (r(m, n), torch.tanh(r(m, n))), rng, {0: half},
                          "tanh backward, grad scaled")
        ids = torch.randint(0, n, (b, m), generator=rng)
        yield scaled_case(lambda g, i: aten.embedding_dense_backward(g, i, n, -1, False), (r(b, m, k), ids), rng,
                          {0: third}, "embedding backward, grad scaled")
        yield scaled_case(lambda x, y: x + y, (r(m, n), r(m, n)), rng, {0: half, 1: half}, "add, both halved")
        yield scaled_case(lambda x, y: x - y, (r(m, n), r(n)), rng, {0: neg, 1: neg}, "sub, broadcast")
        yield scaled_case(lambda x: x.sum(0), (r(m, n),), rng, {0: neg}, "sum")


def _regroup_cases(rng):
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    for _ in range(3):
        m, n = C.dims(rng, 3, 7), C.dims(rng, 3, 7)
        yield regroup_case(lambda x: x * 0.1, (r(m, n),), rng, 0, 2, 0, Fraction(1, 2), "mul by lr, rows")
        yield regroup_case(lambda x, y: x - y, (r(m, n), r(m, n)), rng, 1, 3, 1, Fraction(1), "sub, cols, 3 terms")
        yield regroup_case(lambda x, y: x * y, (r(m, n), r(m, n)), rng, 0, 2, 1, Fraction(-1, 4), "mul tensor")
        yield regroup_case(torch.tanh, (r(m, n),), rng, 0, 2, 0, Fraction(1, 3), "tanh (not linear: still exact)")


def decline_cases(rng):
    """(why, case) pairs the lemma must not rewrite."""
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    h = Fraction(1, 2)
    yield "add with one scaled operand is not c * add", scaled_case(lambda x, y: x + y, (r(3, 4), r(3, 4)), rng,
                                                                    {0: h}, "")
    yield "add with different factors", scaled_case(lambda x, y: x + y, (r(3, 4), r(3, 4)), rng,
                                                    {0: h, 1: Fraction(1, 3)}, "")
    yield "round is not linear", scaled_case(torch.round, (r(3, 4) * 5,), rng, {0: h}, "")
    yield "a scalar added is affine", scaled_case(lambda x: x + 1.0, (r(3, 4),), rng, {0: h}, "")
    yield "floor division", scaled_case(lambda x: torch.div(x, 3, rounding_mode="floor"), (r(3, 4) * 5,), rng,
                                        {0: h}, "")
    yield "exp is not linear", scaled_case(torch.exp, (r(3, 4),), rng, {0: h}, "")


def regroup_decline_cases(rng):
    """(why, case): sums of concatenations cut differently are not regrouped."""
    S = ExprStore()
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    spec, _ = C.spec_of(lambda x: x * 0.1, r(4, 3))
    vals = {f"p{i}": r(*s) for i, s in enumerate(((1, 3), (3, 3), (2, 3), (2, 3)))}
    at = {k: S.atom(k, tuple(v.shape), v.dtype) for k, v in vals.items()}
    uneven = S.accum("sum", [S.cat([at["p0"], at["p1"]], 0), S.cat([at["p2"], at["p3"]], 0)])
    yield "the terms are cut at different rows", LemmaCase(spec, (uneven,), vals, S, "")
    vals2 = {"q0": r(4, 3), "q1": r(2, 3), "q2": r(2, 3)}
    at2 = {k: S.atom(k, tuple(v.shape), v.dtype) for k, v in vals2.items()}
    mixed = S.accum("sum", [at2["q0"], S.cat([at2["q1"], at2["q2"]], 0)])
    yield "one term is not a concatenation", LemmaCase(spec, (mixed,), vals2, S, "")


register(Lemma(
    name="scale-hoist",
    statement="op(.., c * x, ..) = c * op(.., x, ..)  when op is linear in that argument",
    kinds=("ew", "matmul", "reduce", "softmax_backward", "layer_norm_backward", "embedding_backward", "embedding",
           "generic"),
    plans=scale_hoist,
    cases=_cases,
    conditions=("op is linear in the scaled argument (separately), or in all of them jointly with one factor",),
    priority=12,
))

register(Lemma(
    name="sum-of-concats",
    statement="op(.., sum_k concat_j(a_kj), ..) = op(.., concat_j(sum_k a_kj), ..)  (same cuts)",
    kinds=("ew",),
    plans=sum_of_concats,
    cases=_regroup_cases,
    conditions=("every term of the sum is a concatenation along the same dim with the same piece sizes",),
    priority=60,
))
