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


def _core(shape) -> tuple:
    """``shape`` without its leading 1s."""
    shape = list(shape)
    while shape and shape[0] == 1:
        shape.pop(0)
    return tuple(shape)


def ew_through_view(S: ExprStore, spec, args: tuple, out_shape: tuple):
    if spec.unique is not None or spec.out is not None:
        return
    out_shape = tuple(out_shape)
    src = None
    new = []
    bcast = []  # operands broadcast over leading dims (a bias): kept whole
    for a in args:
        if a.ground and _numel(a.shape) == 1 and len(a.shape) <= len(out_shape):
            new.append(a)
            continue
        if a.op == "view" and tuple(a.shape) == out_shape:
            s = tuple(a.args[0].shape)
            if src is None:
                src = s
            elif s != src:
                return
            new.append(a.args[0])
            continue
        core = _core(a.shape)
        if 0 < len(core) < len(out_shape) and len(a.shape) <= len(out_shape) \
                and out_shape[len(out_shape) - len(core):] == core:
            bcast.append(len(new))
            new.append(a)
            continue
        return
    if src is None:
        return
    for i in bcast:
        # the view must keep the dims the operand covers, in place (it regroups only leading dims)
        core = _core(new[i].shape)
        k = len(core)
        if k > len(src) or tuple(src[len(src) - k:]) != core:
            return
        if len(new[i].shape) > len(src):
            new[i] = S.view(new[i], core)
    new = [S.view(a, (1,) * len(src)) if a.ground and _numel(a.shape) == 1 and len(a.shape) else a for a in new]
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
    # a bias broadcast over the leading dims the view regroups (``x @ w + b`` on a 3-D x, where
    # ranks add the bias to the 2-D matmul); and a view that splits the bias's dim (declines)
    for k in range(3):
        b, s, v = C.dims(rng), C.dims(rng), C.dims(rng)
        x = C.randn(rng, b * s, v)
        if k == 0:
            bias, out, fn, desc = C.randn(rng, v), (b, s, v), (lambda a, c: a + c), "view plus a bias (trailing dim kept)"
        elif k == 1:
            bias, out, fn, desc = C.randn(rng, 1, v), (b, s, v), (lambda a, c: a * c), "view times a [1, v] weight"
        else:
            x = C.randn(rng, b, s * v)
            bias, out, fn, desc = C.randn(rng, v), (b, s, v), (lambda a, c: a + c), "view splits the bias's dim (declines)"
        spec, order = C.spec_of(fn, x.reshape(out), bias)
        case = C.make_case(spec, [(x, bias)[o] for o in order], rng)
        args = tuple(case.store.view(a, out) if tuple(a.shape) == tuple(x.shape) else a for a in case.args)
        yield type(case)(spec, args, case.values, case.store, desc)


register(Lemma(
    name="ew-through-view",
    statement="f(view(a, s), view(b, s), scalars) = view(f(a, b, scalars), s) for elementwise f",
    kinds=("ew",),
    plans=ew_through_view,
    cases=_cases,
    conditions=("every tensor operand is a view of the output's shape from one common source shape, or "
                "broadcasts over leading dims only (a bias) whose dims the view keeps in place",
                "other operands are constants with one element"),
    bitwise_safe=True,
    priority=60,
))
