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


def _groups(index) -> dict:
    """{(shape, dtype): [base terms]} over the floating bases some rank holds slices of."""
    groups = index.__dict__.get("_gg_form_tiling_groups")
    n = len(index.slices_of)
    if groups is None or groups[0] != n:
        by_shape: dict = {}
        for base_id in index.slices_of:
            base = index.store.nodes[base_id]
            if base.dtype is None or not base.dtype.is_floating_point:
                continue
            by_shape.setdefault((tuple(base.shape), base.dtype), []).append(base)
        groups = (n, by_shape, {})
        index._gg_form_tiling_groups = groups
    return groups


def _table(index, shape, dtype, mask: int) -> dict:
    """{form key: [(first coefficient, base term)]} over the bases of this shape and dtype some rank
    holds slices of that read exactly the global inputs ``mask`` (`DIndex.leaf_mask`). A form key
    holds its shape and dtype: bases of other shapes never match, so their forms are computed only
    when a term of their shape asks. A multiple of a value reads the same inputs, as in
    `DIndex.realized_up_to_factor`: the forms of bases that read other inputs (another layer's
    activations) are never computed for the question (inputs that cancel out, ``(x + y) - y``,
    are not looked through: such a value is not found up to a factor, never a wrong match)."""
    _, by_shape, tables = _groups(index)
    key = (tuple(shape), dtype, mask)
    table = tables.get(key)
    if table is None:
        table = {}
        for base in by_shape.get(key[:2], ()):
            if index.leaf_mask(base) != mask:
                continue
            k = index.forms.key(base)
            if k is not None:
                table.setdefault(k[0], []).append((k[1], base))
        tables[key] = table
    return table


def _table_shapes(index) -> dict:
    """The (shape, dtype) pairs of the bases some rank holds slices of: a term of another shape or
    dtype has none of their form keys."""
    return _groups(index)[1]


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
    # (a term's form is computed only if some tiled base of its shape and dtype has a key: with
    # none, no key of the term could be found in the table)
    table = (_table(index, term.shape, term.dtype, index.leaf_mask(term))
             if (tuple(term.shape), term.dtype) in _table_shapes(index) else {})
    k = index.forms.key(term) if table else None
    deep = table.get(k[0], ()) if k is not None else ()
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
