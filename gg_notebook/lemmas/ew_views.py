"""An elementwise operator applied to views is the view of the operator applied to their sources.

``f(view(a, s), view(b, s))`` = ``view(f(a, b), s)`` when every tensor operand is a view from one
and the same source shape (scalar-like constants aside): the elements are paired the same way in
both spellings. A program that flattens ``[B, S, V] -> [B*S, V]`` before a loss (as
``F.cross_entropy`` callers do) gets its per-token values in ``[B*S]``, while ranks keep ``[B, S]``.
"""

from __future__ import annotations

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.relations.expr import ExprStore, ShapeError


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def ew_through_view(S: ExprStore, spec, args: tuple, out_shape: tuple):
    if spec.unique is not None or spec.out is not None:
        return
    src = None
    new = []
    for a in args:
        if a.ground and _numel(a.shape) == 1 and len(a.shape) <= len(out_shape):
            new.append(a)
            continue
        if a.op != "view" or tuple(a.shape) != tuple(out_shape):
            return
        s = tuple(a.args[0].shape)
        if src is None:
            src = s
        elif s != src:
            return
        new.append(a.args[0])
    if src is None:
        return
    new = [S.view(a, (1,) * len(src)) if a.ground and len(a.shape) else a for a in new]
    try:
        inner = S.call(spec, new)
    except ShapeError:
        return
    if tuple(inner.shape) != src:
        return
    yield S.view(inner, out_shape)


def _cases(rng):
    import torch

    for k in range(4):
        b, s, v = C.dims(rng), C.dims(rng), C.dims(rng)
        x, y = C.randn(rng, b, s, v), C.randn(rng, b, s, v)
        flat = (b * s, v)
        if k == 0:
            fn, tensors, desc = (lambda a: a.pow(2)), (x,), "pow of a view"
        elif k == 1:
            fn, tensors, desc = (lambda a, c: a * c), (x, y), "mul of views"
        elif k == 2:
            fn, tensors, desc = (lambda a: torch.sigmoid(a)), (x,), "sigmoid of a flat view"
        else:
            fn, tensors, desc = (lambda a, c: a - c), (x, C.randn(rng, b * s, v)), "view minus a plain tensor (declines)"
        spec, order = C.spec_of(fn, *[t.reshape(flat) for t in tensors])
        case = C.make_case(spec, [tensors[o] for o in order], rng)
        args = tuple(case.store.view(a, flat) if tuple(a.shape) != flat else a for a in case.args)
        yield type(case)(spec, args, case.values, case.store, desc)


register(Lemma(
    name="ew-through-view",
    statement="f(view(a, s), view(b, s), scalars) = view(f(a, b, scalars), s) for elementwise f",
    kinds=("ew",),
    plans=ew_through_view,
    cases=_cases,
    conditions=("every tensor operand is a view of the output's shape from one common source shape",
                "other operands are constants with one element"),
    bitwise_safe=True,
    priority=60,
))
