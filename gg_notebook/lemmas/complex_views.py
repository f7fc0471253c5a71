"""``view_as_complex`` / ``view_as_real`` versus concatenation and slicing (complex RoPE, Llama style).

``view_as_complex(x)`` reads the last dim of ``x`` (size 2) as (real, imaginary) pairs; ``view_as_real(z)``
is its inverse, adding that dim. Every other dim maps position-wise to the same output dim, so

    view_as_complex(concat(x_i, d)) = concat(view_as_complex(x_i), d)     (d not the pair dim)
    view_as_real(concat(z_i, d))    = concat(view_as_real(z_i), d)
    view_as_complex(x[a:b along d]) = view_as_complex(x)[a:b along d]    (likewise view_as_real)

Both are pure reinterpretations (no arithmetic), so the rewrites hold bit for bit. The operator is
re-applied unchanged to the pieces (same OpOverload, no other arguments), and the pair dim itself
is never split.
"""

from __future__ import annotations

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register
from gg_notebook.relations.expr import ShapeError

aten = torch.ops.aten

_TO_COMPLEX = {aten.view_as_complex.default}
_TO_REAL = {aten.view_as_real.default}
for _name in ("view_as_complex_copy", "view_as_real_copy"):
    _p = getattr(aten, _name, None)
    if _p is not None:
        (_TO_COMPLEX if "complex" in _name else _TO_REAL).add(_p.default)


def _movable(spec, x, d: int) -> bool:
    """May a concatenation / slice of the operand along dim ``d`` move through the view?"""
    if spec.target in _TO_COMPLEX:
        return 0 <= d < len(x.shape) - 1  # the last (pair) dim is read whole
    if spec.target in _TO_REAL:
        return 0 <= d < len(x.shape)
    return False


def complex_view_commute(S, spec, args, out_shape):
    if len(args) != 1:
        return
    x = args[0]
    if x.op != "cat" or not _movable(spec, x, x.attrs):
        return
    try:
        yield S.cat([S.call(spec, [piece]) for piece in x.args], x.attrs)
    except ShapeError:
        return


def complex_view_slice_hoist(S, spec, args, out_shape):
    if len(args) != 1:
        return
    x = args[0]
    if x.op != "slice" or not _movable(spec, x.args[0], x.attrs[0]):
        return
    d, lo, hi = x.attrs
    try:
        yield S.slice(S.call(spec, [x.args[0]]), d, lo, hi)
    except ShapeError:
        return


def _pairs(rng, *shape):
    return C.randn(rng, *shape, 2)


def _complex(rng, *shape):
    return torch.view_as_complex(C.randn(rng, *shape, 2))


def _commute_cases(rng):
    for _ in range(2):
        a, b, c = C.dims(rng), C.dims(rng, 2, 6), C.dims(rng)
        x = _pairs(rng, a, b, c)
        z = _complex(rng, a, b, c)
        yield C.case(torch.view_as_complex, (x,), rng, split={0: 1}, description="view_as_complex, heads split")
        yield C.case(torch.view_as_complex, (x,), rng, split={0: 0}, description="view_as_complex, rows split")
        yield C.case(torch.view_as_complex, (x,), rng, split={0: 2}, description="view_as_complex, last non-pair dim")
        yield C.case(torch.view_as_real, (z,), rng, split={0: 1}, description="view_as_real, heads split")
        yield C.case(torch.view_as_real, (z,), rng, split={0: 2}, description="view_as_real, last dim split")
        # must decline: the pair dim of view_as_complex cannot be split (each piece has size 1)
        yield C.case(torch.view_as_complex, (x,), rng, split={0: 3}, pieces=2,
                     description="view_as_complex, pair dim split (declines)")


def _hoist_cases(rng):
    for _ in range(2):
        a, b, c = C.dims(rng), C.dims(rng, 4, 8), C.dims(rng)
        lo = int(torch.randint(0, b // 2, (1,), generator=rng))
        hi = int(torch.randint(lo + 1, b + 1, (1,), generator=rng))
        for fn, t, desc in ((torch.view_as_complex, _pairs(rng, a, b, c), "view_as_complex of a slice"),
                            (torch.view_as_real, _complex(rng, a, b, c), "view_as_real of a slice")):
            case = C.case(fn, (t,), rng, description=desc)
            args = (case.store.slice(case.args[0], 1, lo, hi),)
            yield type(case)(case.spec, args, case.values, case.store, desc)


register(Lemma(
    name="complex-view-commute",
    statement="view_as_complex(concat(x_i, d)) = concat(view_as_complex(x_i), d) for d not the pair dim; "
              "view_as_real likewise",
    kinds=("complex_view",),
    plans=complex_view_commute,
    cases=_commute_cases,
    conditions=("the concatenated dim is not the (size-2) pair dim view_as_complex reads",),
    bitwise_safe=True,
    priority=20,
))

register(Lemma(
    name="complex-view-slice-hoist",
    statement="view_as_complex(x[a:b along d]) = view_as_complex(x)[a:b along d] for d not the pair dim; "
              "view_as_real likewise",
    kinds=("complex_view",),
    plans=complex_view_slice_hoist,
    cases=_hoist_cases,
    conditions=("the sliced dim is not the (size-2) pair dim view_as_complex reads",),
    bitwise_safe=True,
    priority=35,
))
