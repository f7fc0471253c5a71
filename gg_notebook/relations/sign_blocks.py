"""A product with a constant of signs is data movement with negations: ``x * [-1, -1, +1, +1]``.

RoPE's ``rotate_half`` is often spelled without slicing: ``torch.roll(x, d // 2, -1) * sign`` with
``sign = cat(-ones(d // 2), ones(d // 2))``. Multiplying by ``+1`` is the identity and by ``-1`` a
negation, exactly (IEEE: a sign flip; also bit for bit). So ``mul(a, K)`` where the constant ``K``
(an input-independent value, `gg_notebook.relations.ground`) holds only ``-1`` and ``+1`` and varies
along one dim ``d`` of the output only is the same value as

    cat(s_1(a[lo_1:hi_1 along d]), s_2(a[lo_2:hi_2 along d]), ..., dim=d)

over the maximal runs of equal sign (at least two), with ``s = neg`` for ``-1`` and the identity for
``+1``. `sign_blocks` writes a rank's term that way when it is interned (the index keeps the
product's own term as an alias of the same value, so the spelling ``x * sign`` still finds it), so
its pieces meet the spelling with explicit slices and ``neg``; `register_cat_pieces` records each
computed piece of a rank's concatenated value as a slice of that value, so a lookup of the piece
(``neg(x2)``) finds it.

Declines (returns the term unchanged) unless: ``aten.mul.Tensor`` of two tensors, floating point,
both of the output's dtype, ``a`` of the output's shape (``K`` may broadcast), ``K`` a value with
every element exactly ``-1`` or ``+1`` that is constant along every output dim but one.
"""

from __future__ import annotations

import torch

from gg_notebook.ir.specs import ew_spec
from gg_notebook.relations.expr import Expr, ShapeError

_aten = torch.ops.aten
NEG = ew_spec(_aten.neg.default, 1)
MAX_NUMEL = 1 << 16


def _signs(k: Expr, shape: tuple):
    """(dim, [(lo, hi, sign)]) for constant ``k`` broadcast to ``shape``, or None. Decided on ``k``'s
    own (small) value: a dim it broadcasts along (size 1) does not vary."""
    from gg_notebook.relations.ground import value_of

    v = value_of(k)
    if v is None or v.numel() > MAX_NUMEL or v.dim() > len(shape) or v.numel() == 0 or not shape:
        return None
    v = v.reshape((1,) * (len(shape) - v.dim()) + tuple(v.shape))
    if any(s != 1 and s != n for s, n in zip(v.shape, shape)):
        return None
    if not bool(((v == 1) | (v == -1)).all()):
        return None
    varying = [d for d in range(len(shape)) if v.shape[d] > 1 and not bool((v == v.narrow(d, 0, 1)).all())]
    if len(varying) > 1:
        return None
    if not varying:
        return 0, [(0, shape[0], float(v.reshape(-1)[0]))]
    d = varying[0]
    line = v.movedim(d, -1).reshape(-1, shape[d])[0]
    runs, lo = [], 0
    for i in range(1, shape[d] + 1):
        if i == shape[d] or line[i] != line[lo]:
            runs.append((lo, i, float(line[lo])))
            lo = i
    return d, runs


def sign_blocks(store, term: Expr) -> Expr:
    """``term`` rewritten as slices and negations when it multiplies by a constant of signs."""
    if term.op != "call" or term.attrs.target is not _aten.mul.Tensor or len(term.args) != 2:
        return term
    spec = term.attrs
    if spec.slot_of("self") is None or spec.slot_of("other") is None or spec.out is not None:
        return term
    if term.dtype is None or not term.dtype.is_floating_point:
        return term
    x, y = term.args
    if x.ground == y.ground:
        return term
    a, k = (y, x) if x.ground else (x, y)
    if a.dtype != term.dtype or k.dtype != term.dtype or tuple(a.shape) != tuple(term.shape):
        return term
    found = _signs(k, tuple(term.shape))
    if found is None:
        return term
    d, runs = found
    if len(runs) < 2:
        return term  # x * ones, x * -ones: the product itself is the plain spelling
    try:
        pieces = []
        for lo, hi, s in runs:
            p = store.slice(a, d, lo, hi)
            pieces.append(p if s == 1 else store.call(NEG, [p]))
        out = store.cat(pieces, d)
    except ShapeError:
        return term
    if tuple(out.shape) != tuple(term.shape) or out.dtype != term.dtype:
        return term
    return out


def register_cat_pieces(index, term: Expr, dval) -> None:
    """Every computed piece of ``term`` (a rank's concatenation) is a slice of ``dval``."""
    from gg_notebook.relations.movement import movement_of

    if term.op != "cat":
        return
    m = movement_of(index)
    d, off = term.attrs, 0
    for p in term.args:
        hi = off + p.shape[d]
        if p.op == "call" and hi > off:
            m.pieces.setdefault(p.id, (dval, d, off, hi))
        off = hi
