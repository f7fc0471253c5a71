"""Tilings found by the scalar normal form: a value equal, up to an exact factor, to a base the
ranks hold in slices.

The ranks hold slices of a base (a reduce-scatter's reduction, a value chunked by rank) whose term
has its own spelling: ``reduce_scatter(x / 4, AVG)`` reduces ``sum(x@r0 / 4, x@r1 / 4) / 2``. The
sequential value is found as ``0.125 * sum(x@r0, x@r1)``: the same value in another spelling, so
the exact lookup of its tiling misses. Here the bases of the ranks' slices are indexed by their
normal form up to a factor (`gg_notebook.relations.linear.LinearForms.key`): a term with the key of
a base ``B`` (coefficients ``c`` and ``c_B``) is ``(c / c_B) * B``, and ``B`` is the concatenation
of the slices that tile it. Equality over the reals (the normal form's), so never with
``exact="bitwise"`` (the caller checks).
"""

from __future__ import annotations

from fractions import Fraction

import torch

from gg_notebook.relations.expr import Expr
from gg_notebook.relations.linear import coefficient

aten = torch.ops.aten


def _table(index) -> dict:
    """{form key: [(first coefficient, base term)]} over the bases some rank holds slices of."""
    table = index.__dict__.get("_gg_form_tiling")
    n = len(index.slices_of)
    if table is None or table[0] != n:
        keyed: dict = {}
        for base_id in index.slices_of:
            base = index.store.nodes[base_id]
            if base.dtype is None or not base.dtype.is_floating_point:
                continue
            k = index.forms.key(base)
            if k is not None:
                keyed.setdefault(k[0], []).append((k[1], base))
        table = (n, keyed, {(k[0], k[1]) for k in keyed})
        index._gg_form_tiling = table
    return table[1]


def _table_shapes(index) -> set:
    """The (shape, dtype) pairs of `_table`'s keys: a term of another shape or dtype has none of them."""
    _table(index)
    return index._gg_form_tiling[2]


def _peel(e: Expr) -> tuple[Fraction, Expr]:
    """``(c, core)`` with ``e == c * core``: the scale nodes at its root taken off."""
    c = Fraction(1)
    while e.op == "scale" and isinstance(e.attrs, (Fraction, int)):  # (not a radical factor)
        c *= e.attrs
        e = e.args[0]
    return c, e


def _shallow_table(index) -> dict:
    """{core id: [(c, base)]} for the bases ``c * core`` some rank holds slices of (no normal form:
    a reduction of deep gradients is too large to normalize, its scale is at its root)."""
    table = index.__dict__.get("_gg_form_tiling_shallow")
    n = len(index.slices_of)
    if table is None or table[0] != n:
        keyed: dict = {}
        for base_id in index.slices_of:
            base = index.store.nodes[base_id]
            c, core = _peel(base)
            keyed.setdefault(core.id, []).append((c, base))
        table = (n, keyed)
        index._gg_form_tiling_shallow = table
    return table[1]


def tiling_up_to_factor(index, term: Expr) -> tuple[Fraction, int, list] | None:
    """``(f, dim, dvals)`` with ``term == f * cat(dvals, dim)`` over the reals, or None."""
    if term.dtype is None or not term.dtype.is_floating_point or not index.slices_of:
        return None
    if term.id in index.slices_of:
        return None  # the exact tiling is the caller's (index.tiling)
    c_term, core = _peel(term)
    shallow = _shallow_table(index).get(core.id, [])
    # the normal form of every term of a shape some tiled base has (each form is computed once and
    # memoized, whatever the order of the questions: `LinearForms.of`)
    k = index.forms.key(term) if (term.shape, term.dtype) in _table_shapes(index) else None
    deep = _table(index).get(k[0], ()) if k is not None else ()
    found = None
    for c_base, base in [(c_b / c_term, b) for c_b, b in shallow] + [(c_b / k[1], b) for c_b, b in deep]:
        if base.id == term.id or tuple(base.shape) != tuple(term.shape) or base.dtype != term.dtype:
            continue
        for dim, dvals in index.tiling(base):
            f = 1 / c_base
            if f == 1:
                return f, dim, dvals
            scaled = _scaled_pieces(index, dvals, f)  # each rank scales its slice itself
            if scaled is not None:
                return Fraction(1), dim, scaled
            found = found or (f, dim, dvals)
    return found


def _scaled_pieces(index, dvals, f: Fraction) -> list | None:
    """The values ``f * piece`` for every piece, if some rank holds each exactly (a reduce-scatter
    with SUM whose result each rank divides by the world size)."""
    out = []
    for d in dvals:
        hit = next((index.realized(u) for u in index.users_of(d.term)
                    if index.realized(u) is not None and _factor_of(index.forms, u, d.term) == f), None)
        if hit is None:
            return None
        out.append(hit)
    return out


def _factor_of(forms, u: Expr, piece: Expr) -> Fraction | None:
    """c if ``u`` is ``piece * c`` or ``piece / (1/c)`` in one step (c a Python number or a constant
    tensor filled with one number; same shape and dtype), else None. One step only: the piece's own
    history is not normalized (it may be deep: a gradient)."""
    if tuple(u.shape) != tuple(piece.shape) or u.dtype != piece.dtype:
        return None
    if u.op == "scale":
        return u.attrs if u.args[0] is piece and isinstance(u.attrs, (Fraction, int)) else None
    if u.op != "call" or u.attrs.target not in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
        return None
    spec = u.attrs
    divide = spec.target in (aten.div.Tensor, aten.div.Scalar)
    if divide and spec.arg("rounding_mode", None) is not None:
        return None
    s_self, s_other = spec.slot_of("self"), spec.slot_of("other")
    if s_other is None:  # a Python number
        c = coefficient(spec.arg("other"))
        if c is None or (divide and c == 0) or s_self is None or u.args[s_self] is not piece:
            return None
        return 1 / c if divide else c
    if s_self is None:
        return None
    a, b = u.args[s_self], u.args[s_other]
    if a is piece:
        c = forms.fill(b)
        if c is None or (divide and c == 0):
            return None
        return 1 / c if divide else c
    if b is piece and not divide:
        return forms.fill(a)
    return None
