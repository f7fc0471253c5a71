"""Operators versus sums of partials: the lemmas behind row-parallel layers and gradients.

* ``partial-linear``: an operator linear in one argument (matmul, sum/mean, mul by a non-partial
  tensor, division by one, and the gradient argument of backward ops: softmax, layer norm,
  embedding, activation backward) distributes over a sum of partials in that argument, provided
  the other arguments are not partial themselves.
* ``partial-additive``: add/sub of two sums of partials with the same number of parts is the sum of
  the partwise add/sub. (Adding a *replicated* tensor to a partial sum is not an identity: that is
  the "bias added before the reduction" bug, so there is no such lemma.)
"""

from __future__ import annotations

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.lemmas.dims import linear_args
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError


def _is_partial(e) -> bool:
    return e.op == "accum" and e.attrs == "sum"


def partial_linear(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    lin = linear_args(spec, [a.dtype for a in args])
    if lin is None or lin[0] != "separately":
        return
    for i in lin[1]:
        a = args[i]
        factor = None
        if a.op == "scale" and _is_partial(a.args[0]):  # c * (sum of parts): an averaged reduction
            factor, a = a.attrs, a.args[0]
        if not _is_partial(a):
            continue
        if any(_is_partial(b) or (b.op == "scale" and _is_partial(b.args[0])) for j, b in enumerate(args) if j != i):
            continue
        try:
            pieces = [S.call(spec, args[:i] + (p,) + args[i + 1:]) for p in a.args]
            total = S.accum("sum", pieces)
            yield total if factor is None else S.scale(total, factor)
        except ShapeError:
            continue


def partial_additive(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    lin = linear_args(spec, [a.dtype for a in args])
    if lin is None or lin[0] != "jointly" or len(lin[1]) != len(args):
        return
    # c * (sum of parts) for every operand with one factor c (averaged reductions): factored out
    factors = {a.attrs if a.op == "scale" else None for a in args}
    if len(factors) != 1:
        return
    (factor,) = factors
    parts = [a.args[0] if factor is not None else a for a in args]
    if not all(_is_partial(a) for a in parts):
        return
    n = len(parts[0].args)
    if any(len(a.args) != n for a in parts):
        return
    try:
        total = S.accum("sum", [S.call(spec, tuple(a.args[k] for a in parts)) for k in range(n)])
        yield total if factor is None else S.scale(total, factor)
    except ShapeError:
        return


def _linear_cases(rng):
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    F = torch.nn.functional
    aten = torch.ops.aten
    for _ in range(3):
        m, n, k, b = C.dims(rng), C.dims(rng), C.dims(rng), C.dims(rng)
        parts = C.dims(rng, 2, 5)
        yield C.case(lambda a, w: a @ w, (r(m, k), r(k, n)), rng, partial={0: parts}, description="mm, lhs partial")
        yield C.case(lambda a, w: a @ w, (r(m, k), r(k, n)), rng, partial={1: parts}, description="mm, rhs partial")
        yield C.case(torch.bmm, (r(b, m, k), r(b, k, n)), rng, partial={0: parts}, description="bmm partial")
        yield C.case(lambda x, y: x * y, (r(m, n), r(m, n)), rng, partial={1: parts}, description="mul partial")
        yield C.case(lambda x: x * 0.25, (r(m, n),), rng, partial={0: parts}, description="mul scalar partial")
        yield C.case(lambda x, y: x / y, (r(m, n), r(m, n).abs() + 1), rng, partial={0: parts}, description="div partial")
        yield C.case(lambda x: x.sum(0), (r(m, n),), rng, partial={0: parts}, description="sum partial")
        yield C.case(lambda x: x.mean(-1, keepdim=True), (r(m, n),), rng, partial={0: parts}, description="mean partial")
        yield C.case(lambda g, x: aten.threshold_backward(g, x, 0), (r(m, n), r(m, n)), rng, partial={0: parts},
                     description="relu backward, grad partial")
        yield C.case(lambda g, x: aten.gelu_backward(g, x), (r(m, n), r(m, n)), rng, partial={0: parts},
                     description="gelu backward, grad partial")
        x = r(m, n)
        out = torch.softmax(x, -1)
        yield C.case(lambda g, o: aten._softmax_backward_data(g, o, -1, torch.float64), (r(m, n), out), rng,
                     partial={0: parts}, description="softmax backward, grad partial")
        ids = torch.randint(0, n, (b, m), generator=rng)
        yield C.case(lambda g, i: aten.embedding_dense_backward(g, i, n, -1, False), (r(b, m, k), ids), rng,
                     partial={0: parts}, description="embedding backward, grad partial")
        xx, w, bb = r(b, m, k), r(k), r(k)
        _, mean, rstd = aten.native_layer_norm(xx, (k,), w, bb, 1e-5)
        for o in (0, 1, 2):
            ln_bwd = _ln_bwd(k, o)
            yield C.case(ln_bwd, (r(b, m, k), xx, mean, rstd, w, bb), rng, partial={0: parts},
                         description=f"layer_norm backward out {o}, grad partial")
        yield C.case(lambda mk, x: x.masked_fill(mk, 0.0), (r(m, n) > 0, r(m, n)), rng, partial={1: parts},
                     description="masked_fill(0) partial")
        yield C.case(lambda a, w: a @ w, (r(m, k), r(k, n)), rng, averaged={0: parts},
                     description="mm, lhs an averaged reduction")
        yield C.case(lambda x: x * 0.25, (r(m, n),), rng, averaged={0: parts}, description="mul of an average")
        yield C.case(lambda g: aten.slice_backward(g, [m + 3, n], 0, 1, m + 1, 1), (r(m, n),), rng,
                     averaged={0: parts}, description="slice_backward of an averaged gradient")
        yield C.case(lambda g: aten.select_backward(g, [3, m, n], 0, 1), (r(m, n),), rng,
                     partial={0: parts}, description="select_backward of a partial gradient")


def _ln_bwd(k, o):
    def ln_bwd(g, x, mean, rstd, w, bb):
        return torch.ops.aten.native_layer_norm_backward(g, x, (k,), mean, rstd, w, bb, [True, True, True])[o]
    return ln_bwd


def _additive_cases(rng):
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    for _ in range(3):
        m, n = C.dims(rng), C.dims(rng)
        parts = C.dims(rng, 2, 5)
        yield C.case(lambda x, y: x + y, (r(m, n), r(m, n)), rng, partial={0: parts, 1: parts}, description="add")
        yield C.case(lambda x, y: x - y, (r(m, n), r(m, n)), rng, partial={0: parts, 1: parts}, description="sub")
        yield C.case(lambda x, y: x + y, (r(m, n), r(n)), rng, partial={0: parts, 1: parts}, description="add bcast")
        yield C.case(lambda x, y: x + y, (r(m, n), r(m, n)), rng, averaged={0: parts, 1: parts},
                     description="add of two averaged reductions")
        yield C.case(lambda x, y: x - y, (r(m, n), r(m, n)), rng, averaged={0: parts, 1: parts},
                     description="sub of two averaged reductions")


register(Lemma(
    name="partial-linear",
    statement="op(.., sum_i x_i, ..) = sum_i op(.., x_i, ..)  when op is linear in that argument",
    kinds=("ew", "matmul", "reduce", "softmax_backward", "layer_norm_backward", "embedding_backward", "embedding",
           "generic"),
    plans=partial_linear,
    cases=_linear_cases,
    conditions=("op is linear in the partial argument", "no other argument is partial"),
    priority=10,
))

register(Lemma(
    name="partial-additive",
    statement="sum_i x_i + sum_i y_i = sum_i (x_i + y_i)",
    kinds=("ew",),
    plans=partial_additive,
    cases=_additive_cases,
    conditions=("both operands are sums of the same number of partials",),
    priority=10,
))
