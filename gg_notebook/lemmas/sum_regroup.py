"""A sum over a concatenation regroups its pieces: the slices of one value sum to that value's sum.

``sum(concat(y[0:1], z[0:1], y[1:2], z[1:2], dim=0), dims)`` with dim 0 summed is
``sum(y, dims) + sum(z, dims)``: a sum does not care in which order, or in which grouping, its
elements are added (over the reals). This is what a rank that takes strided micro-batches of its
shard (``x[step::M]``) computes: the sequential rows, tiled as the ranks hold them, interleave the
rows of the ranks' micro-batch values; each micro-batch value is summed (or averaged) whole.

``sum-regroup-slices`` proposes, for ``sum(concat(p_1..p_n, d), dims)`` with ``d`` summed, the
sum over groups: pieces that are slices along ``d`` of one value ``y`` which together cover ``y``
exactly once along ``d`` are replaced by ``y`` (every other piece stays itself), then
``concat-contract``'s split: ``sum_g sum(y_g, dims)``. It declines when no value is covered by two
or more of the pieces, and for a ``dtype=`` that changes the type. Only ``aten.sum.dim_IntList``.
"""

from __future__ import annotations

import torch

from gg_notebook.ir.specs import reduced_dims
from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError

aten = torch.ops.aten


def sum_regroup_slices(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    if spec.target is not aten.sum.dim_IntList or len(args) != 1 or spec.out is not None:
        return
    x = args[0]
    if x.op != "cat" or x.dtype is None or x.dtype == torch.bool:
        return
    if spec.arg("dtype", None) not in (None, x.dtype):
        return
    d = x.attrs
    dims = tuple(reduced_dims(spec.arg("dim"), len(x.shape)))
    if d not in dims:
        return
    # pieces that are slices along d, by the value they slice: [(start, end, position)]
    by_base: dict[int, list] = {}
    bases = {}
    for i, p in enumerate(x.args):
        if p.op == "slice" and p.attrs[0] == d:
            _, a, b = p.attrs
            by_base.setdefault(p.args[0].id, []).append((a, b, i))
            bases[p.args[0].id] = p.args[0]
    groups = {}
    for bid, parts in by_base.items():
        if len(parts) < 2:
            continue
        parts.sort()
        cur, ok = 0, True
        for a, b, _ in parts:
            if a != cur:
                ok = False
                break
            cur = b
        if ok and cur == bases[bid].shape[d]:
            groups[bid] = parts
    if not groups:
        return
    first = {parts[0][2]: bid for bid, parts in groups.items()}
    grouped = {i for parts in groups.values() for _, _, i in parts}
    pieces = []
    for i, p in enumerate(x.args):
        if i in first:
            pieces.append(bases[first[i]])
        elif i not in grouped:
            pieces.append(p)
    try:
        sums = [S.call(spec, [p]) for p in pieces]
        plan = sums[0] if len(sums) == 1 else S.accum("sum", sums)
    except ShapeError:
        return
    if tuple(plan.shape) != tuple(out_shape):
        return
    yield plan


def _case(rng, x, order, d, dims, keepdim, description, mutate=None):
    """sum over ``dims`` of ``x`` re-tiled along ``d``: the pieces of atoms a_k (slices of ``x``
    cut into len(order) blocks) placed in ``order`` (block ids), each block a slice of its atom."""
    spec, _ = C.spec_of(lambda t: torch.sum(t, dims, keepdim=keepdim), x)
    S = ExprStore()
    n = x.shape[d]
    half = n // 2
    # two atoms y (first half of x along d) and z (second half); cut each into single rows
    y, z = x.narrow(d, 0, half), x.narrow(d, half, n - half)
    values = {"y": y.clone(), "z": z.clone()}
    ay, az = S.atom("y", tuple(y.shape), y.dtype), S.atom("z", tuple(z.shape), z.dtype)
    rows = [(ay, k) for k in range(half)] + [(az, k) for k in range(n - half)]
    pieces = [S.slice(rows[i][0], d, rows[i][1], rows[i][1] + 1) for i in order]
    if mutate is not None:
        pieces = mutate(S, pieces, ay, az)
    from gg_notebook.lemmas.base import LemmaCase

    return LemmaCase(spec, (S.cat(pieces, d),), values, S, description)


def _cases(rng):
    for _ in range(3):
        m, n = C.dims(rng, 2, 5) * 2, C.dims(rng)
        x = C.randn(rng, m, n)
        half = m // 2
        inter = [i for k in range(half) for i in (k, half + k)]  # y0, z0, y1, z1, ...
        yield _case(rng, x, inter, 0, (0, 1), False, "strided micro-batch rows, sum of all")
        yield _case(rng, x, inter, 0, (0,), True, "interleaved rows, sum over rows, keepdim")
        xt = C.randn(rng, n, m)
        yield _case(rng, xt, inter, 1, (1,), False, "interleaved columns, sum over columns")
        rev = list(reversed(range(m)))
        yield _case(rng, x, rev, 0, (0,), False, "rows in reverse order")
        yield _case(rng, x.float(), inter, 0, (0, 1), False, "float32")
        big = x.clone()
        big[0] = 1e6
        big[half] = -1e6
        yield _case(rng, big, inter, 0, (0, 1), False, "cancelling +-1e6 rows")
        # declines: a row missing from a group (a value only partly covered), a row used twice
        yield _case(rng, x, inter, 0, (0, 1), False, "one value not covered (only the other regrouped)",
                    mutate=lambda S, p, ay, az: p[:-1] + [S.slice(az, 0, 0, 1)])
        yield _case(rng, x, inter, 0, (1,), False, "decline: the cat dim is not summed")


register(Lemma(
    name="sum-regroup-slices",
    statement="sum(concat(.., y[a_i:b_i], .., d), dims) = sum(y, dims) + sum(other pieces, dims)  when d is summed "
              "and the slices of y along d among the pieces cover y exactly once",
    kinds=("reduce",),
    plans=sum_regroup_slices,
    cases=_cases,
    conditions=("aten.sum.dim_IntList over the concatenated dim, no dtype= that changes the type",
                "the slices of each regrouped value along that dim cover it exactly once"),
    bitwise_safe=False,
    priority=31,
))
