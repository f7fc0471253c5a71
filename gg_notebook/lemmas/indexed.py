"""Index operators along one dim versus a concatenation along another: the routing of an MoE layer.

``gather(x, d, idx)``, ``scatter(x, d, idx, src)``, ``scatter_add(x, d, idx, src)`` and
``argmax(x, d)`` / ``argmin(x, d)`` act on each 1-D slice along ``d`` on its own: output position
``i`` (``i_d`` aside) reads only position ``i`` of every operand along the other dims. So a
concatenation of the operands along a dim ``j != d`` commutes, *when every tensor operand has the
output's size along j* (a gather whose index is narrower than its source along j reads source rows
by position, not piecewise: then the dim is entangled and the lemma declines). ``argmax`` without
``keepdim`` drops ``d``: dims after it shift by one. A token-parallel router (``probs.argmax(-1)``,
``probs.gather(-1, idx)``, a dispatch buffer filled by ``scatter_add`` along the slot dim) is then
the concatenation of the ranks' routers.

The identity holds for every value (it only moves elements), so it is bitwise safe.
"""

from __future__ import annotations

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.lemmas.concat import _split_plans
from gg_notebook.relations.expr import OpSpec

aten = torch.ops.aten

INDEXED = {
    aten.gather.default: ("self", "index"),
    aten.scatter.src: ("self", "index", "src"),
    aten.scatter.value: ("self", "index"),
    aten.scatter_add.default: ("self", "index", "src"),
}
ARG_REDUCE = (aten.argmax.default, aten.argmin.default)


def indexed_roles(spec: OpSpec, shapes, out_shape):
    """`dims.dim_roles` for the operators above (None for any other)."""
    if spec.target in ARG_REDUCE:
        dim = spec.arg("dim", None)
        if dim is None or len(shapes) != 1:
            return None
        n = len(shapes[0])
        d = dim % n
        keep = bool(spec.arg("keepdim", False))
        return [[None if j == d else ("out", j if keep or j < d else j - 1) for j in range(n)]]
    names = INDEXED.get(spec.target)
    if names is None:
        return None
    slots = [spec.slot_of(nm) for nm in names]
    if any(s is None for s in slots) or sorted(set(slots)) != list(range(len(shapes))):
        return None
    n = len(out_shape)
    if any(len(s) != n for s in shapes):
        return None
    d = spec.arg("dim") % n
    roles = []
    for s in shapes:
        roles.append([("out", j) if j != d and all(t[j] == out_shape[j] for t in shapes) else None for j in range(n)])
    return roles


def _plans(S, spec, args, out_shape):
    if spec.target not in INDEXED and spec.target not in ARG_REDUCE:
        return
    yield from _split_plans(S, spec, args, out_shape, "out", roles_fn=indexed_roles)


def _cases(rng):
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    for _ in range(3):
        b, m, n = C.dims(rng), C.dims(rng), C.dims(rng, 3, 8)
        x = r(b, m, n)
        idx = torch.randint(0, n, (b, m, 2), generator=rng)
        yield C.case(lambda x, i: x.gather(-1, i), (x, idx), rng, split={0: 0, 1: 0}, description="gather, batch split")
        yield C.case(lambda x, i: torch.gather(x, 2, i), (x, idx), rng, split={0: 1, 1: 1}, description="gather, rows split")
        src = r(b, m, 2)
        yield C.case(lambda x, i, s: x.scatter_add(2, i, s), (x, idx, src), rng, split={0: 0, 1: 0, 2: 0},
                     description="scatter_add, batch split")
        yield C.case(lambda x, i, s: torch.scatter_add(x, -1, i, s), (x, idx, src), rng, split={1: 1, 2: 1},
                     description="scatter_add, index and source split by rows (base sliced)")
        uniq = torch.stack([torch.randperm(n, generator=rng)[:2] for _ in range(b * m)]).view(b, m, 2)
        yield C.case(lambda x, i, s: x.scatter(2, i, s), (x, uniq, src), rng, split={0: 1, 1: 1, 2: 1},
                     description="scatter (distinct ids), rows split")
        yield C.case(lambda x, i: x.scatter(2, i, 0.5), (x, uniq), rng, split={0: 0, 1: 0},
                     description="scatter of a value, batch split")
        yield C.case(lambda x: x.argmax(-1), (x,), rng, split={0: 1}, description="argmax, rows split")
        yield C.case(lambda x: torch.argmax(x, 1, keepdim=True), (x,), rng, split={0: 2},
                     description="argmax keepdim, last dim split")
        yield C.case(lambda x: x.argmin(0), (x,), rng, split={0: 2}, description="argmin over dim 0, last dim split")


def decline_cases(rng):
    """(why, case): the lemma must not rewrite these."""
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    x = r(4, 6)
    yield "gather along the split dim", C.case(lambda x, i: x.gather(1, i), (x, torch.randint(0, 6, (4, 2), generator=rng)),
                                               rng, split={0: 1})
    yield "index narrower than the source along the split dim", C.case(
        lambda x, i: x.gather(1, i), (x, torch.randint(0, 6, (3, 2), generator=rng)), rng, split={0: 0})
    yield "argmax along the split dim", C.case(lambda x: x.argmax(1), (x,), rng, split={0: 1})
    yield "argmax over all elements", C.case(lambda x: x.argmax(), (x,), rng, split={0: 0})
    yield "scatter_add along the split dim", C.case(
        lambda x, i, s: x.scatter_add(0, i, s), (x, torch.randint(0, 4, (4, 6), generator=rng), r(4, 6)), rng,
        split={0: 0, 1: 0, 2: 0})


register(Lemma(
    name="concat-commute-indexed",
    statement="gather/scatter/scatter_add/argmax along d of concat(x_i, j) = concat of the pieces, j != d",
    kinds=("generic",),
    plans=_plans,
    cases=_cases,
    conditions=("the concatenated dim is not the indexed dim",
                "every tensor operand has the output's size along the concatenated dim"),
    bitwise_safe=True,
    priority=20,
))
