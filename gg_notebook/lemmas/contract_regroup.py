"""A reduction over a concatenation regroups its pieces in strided groups.

``contract-regroup-strided``: when an operator reduces a dim with an associative, commutative combiner
(matmul's contracted dim, a sum/amax/amin) and its operands are concatenations of ``n`` pieces along
that dim, the reduction does not depend on the order of the pieces. For each ``m`` dividing ``n``
(``1 < m < n``) it proposes the ``m`` strided groups ``G_j = {j, j + m, j + 2m, ...}``::

    op(concat(x_0..x_{n-1}, d), ..) = acc_j op(concat(x_i for i in G_j, d), ..)

Megatron's ``partition_stride=2`` layouts (the SwiGLU ``linear_fc1`` holding ``[gate_r; up_r]`` on rank r)
interleave the ranks' blocks in the sequential tensor: ``[gate_0, gate_1, up_0, up_1]``. The gradient
of fc1's input contracts over that dim; rank r's product is the group ``{gate_r, up_r}``, i.e. ``G_r`` with
``m = W``. Operands with the reduced dim that are not concatenations are sliced at the same bounds.
Exact for max/min; for sums, equal over the reals (the order of additions changes).
"""

from __future__ import annotations

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.lemmas.concat import cat_bounds
from gg_notebook.lemmas.dims import dim_roles
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError


def contract_regroup(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    shapes = [a.shape for a in args]
    roles = dim_roles(spec, shapes, out_shape)
    if roles is None:
        return
    seen = set()
    for i, a in enumerate(args):
        if a.op != "cat" or len(a.args) < 4:
            continue
        role = roles[i][a.attrs]
        if role is None or role[0] not in ("sum", "max", "min") or role in seen:
            continue
        seen.add(role)
        bounds = tuple(cat_bounds(a))
        n = len(bounds)
        # every operand's dim with this role (at most one per operand)
        dims = []
        for j, b in enumerate(args):
            dj = [t for t, r in enumerate(roles[j]) if r == role]
            if len(dj) > 1:
                break
            dims.append(dj[0] if dj else None)
        else:
            # the most groups first: the strided layout's ranks, in rank order (a coarser grouping
            # resolves too, as nested sums in another order)
            for m in range(n - 1, 1, -1):
                if n % m:
                    continue
                groups = [list(range(j, n, m)) for j in range(m)]
                try:
                    pieces = []
                    for G in groups:
                        new_args = []
                        for b, dj in zip(args, dims):
                            if dj is None:
                                new_args.append(b)
                            elif b.op == "cat" and b.attrs == dj and tuple(cat_bounds(b)) == bounds:
                                new_args.append(S.cat([b.args[k] for k in G], dj))
                            else:
                                new_args.append(S.cat([S.slice(b, dj, *bounds[k]) for k in G], dj))
                        pieces.append(S.call(spec, new_args))
                    yield S.accum(role[0], pieces)
                except ShapeError:
                    continue


def _cases(rng):
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    for _ in range(3):
        m, n, k, b = C.dims(rng), C.dims(rng), C.dims(rng, 6, 12), C.dims(rng)
        yield C.case(lambda a, w: a @ w, (r(m, k), r(k, n)), rng, split={0: 1, 1: 0}, pieces=4,
                     description="mm contracted over 4 pieces, strided groups")
        yield C.case(lambda a, w: a @ w, (r(m, k), r(k, n)), rng, split={0: 1}, pieces=6,
                     description="mm contracted, one side split in 6 pieces")
        yield C.case(torch.bmm, (r(b, m, k), r(b, k, n)), rng, split={0: 2, 1: 1}, pieces=4,
                     description="bmm contracted, strided groups")
        x = r(m, k)
        yield C.case(lambda x: x.sum(-1), (x,), rng, split={0: 1}, pieces=4, description="sum over 4 pieces")
        yield C.case(lambda x: x.amax(-1), (x,), rng, split={0: 1}, pieces=4, description="amax over 4 pieces")
        # declines: 3 pieces (no proper divisor), and a split along an output dim
        yield C.case(lambda a, w: a @ w, (r(m, k), r(k, n)), rng, split={0: 1, 1: 0}, pieces=3,
                     description="3 pieces: declines")
        yield C.case(lambda a, w: a @ w, (r(k, m), r(m, n)), rng, split={0: 0}, pieces=4,
                     description="rows split (not contracted): declines")


register(Lemma(
    name="contract-regroup-strided",
    statement="op(concat(x_0..x_{n-1}, d), ..) = acc_j op(concat(x_j, x_{j+m}, .., d), ..)  when op reduces d",
    kinds=("matmul", "reduce"),
    plans=contract_regroup,
    cases=_cases,
    conditions=("the concatenated dim is reduced by an associative, commutative combiner (sum, max, min)",
                "at least 4 pieces; m divides their number; operands sharing the reduced dim are regrouped alike"),
    bitwise_safe=False,
    priority=32,
))
