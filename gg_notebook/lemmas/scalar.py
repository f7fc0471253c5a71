"""Means as scaled sums: the lemma that lets a mean over a sharded dim reach the ranks' sums.

* ``mean-as-sum``: ``mean(X, dims) = (1/n) * sum(X, dims)`` with ``n`` the number of elements
  averaged. The sum then splits over a concatenated dim like any sum (``concat-contract``), and each
  rank's piece is found *up to a factor* by the scalar normal form (a rank that computes the mean of
  its shard holds ``sum(x_r) / n_r``). The factors are exact rationals and must cancel: the relation
  is clean only when they do (``all_reduce(mean(x_r)) / W`` over equal shards), otherwise the scale
  factor stays visible as a finding. Floating point only, and only without a ``dtype=`` that
  changes the type (the normal form does the same).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


from gg_notebook.ir.specs import reduce_spec, reduced_dims
from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError

aten = torch.ops.aten


def mean_as_sum(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    x = args[0]
    if x.dtype is None or not x.dtype.is_floating_point:
        return
    if spec.arg("dtype", None) not in (None, x.dtype):
        return
    if x.op not in ("cat", "accum"):  # a whole value: the ranks' own mean is found directly
        return
    dims = reduced_dims(spec.arg("dim"), len(x.shape))
    n = math.prod(x.shape[d] for d in dims)
    if n == 0:
        return
    try:
        total = S.call(reduce_spec("sum", dims, bool(spec.arg("keepdim"))), [x])
    except ShapeError:
        return
    yield S.scale(total, Fraction(1, n))


def _cases(rng):
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    for _ in range(3):
        m, n, k = C.dims(rng), C.dims(rng), C.dims(rng, 2, 4)
        yield C.case(lambda x: x.mean(), (r(m, n),), rng, split={0: 0}, description="mean of all, rows split")
        yield C.case(lambda x: x.mean(-1), (r(m, n),), rng, split={0: 1}, description="mean over the split dim")
        yield C.case(lambda x: torch.mean(x, dim=(0, 2), keepdim=True), (r(m, k, n),), rng, split={0: 2},
                     description="mean over two dims, keepdim")
        yield C.case(lambda x: x.mean(0), (r(m, n),), rng, partial={0: 3}, description="mean of a partial sum")
        yield C.case(lambda x: x.float().mean(), (r(m, n).float(),), rng, split={0: 0}, description="float32")
    # adversarial values: zeros, large magnitudes of both signs, bfloat16 rounding, a single element per piece
    z = r(6, 4)
    z[::2] = 0.0
    z[1, :] = 1e6
    z[3, :] = -1e6
    yield C.case(lambda x: x.mean(0), (z,), rng, split={0: 0}, pieces=6, description="zeros, +-1e6, one row per piece")
    yield C.case(lambda x: x.mean(-1), (r(3, 8).to(torch.bfloat16),), rng, split={0: 1}, description="bfloat16")
    yield C.case(lambda x: x.mean(), (r(1, 1),), rng, partial={0: 2}, description="a single element, partial")


register(Lemma(
    name="mean-as-sum",
    statement="mean(X, dims) = (1/n) * sum(X, dims),  n = number of elements averaged",
    kinds=("reduce",),
    plans=mean_as_sum,
    cases=_cases,
    conditions=("floating-point X", "no dtype= that changes the type",
                "the scale factors must cancel for the relation to be clean"),
    priority=40,
    on=((aten.mean.dim, ("self", "dim", "keepdim", "dtype"), ()),),
))
