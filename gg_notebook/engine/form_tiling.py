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

from gg_notebook.relations.expr import Expr

BUDGET = 40  # terms one normal form may normalize (as the index's own keys)


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
            k = index.forms.key(base, budget=BUDGET)
            if k is not None:
                keyed.setdefault(k[0], []).append((k[1], base))
        table = (n, keyed)
        index._gg_form_tiling = table
    return table[1]


def tiling_up_to_factor(index, term: Expr) -> tuple[Fraction, int, list] | None:
    """``(f, dim, dvals)`` with ``term == f * cat(dvals, dim)`` over the reals, or None."""
    if term.dtype is None or not term.dtype.is_floating_point or not index.slices_of:
        return None
    if term.id in index.slices_of:
        return None  # the exact tiling is the caller's (index.tiling)
    k = index.forms.key(term, budget=BUDGET)
    if k is None:
        return None
    found = None
    for c_base, base in _table(index).get(k[0], ()):
        if base.id == term.id or tuple(base.shape) != tuple(term.shape) or base.dtype != term.dtype:
            continue
        for dim, dvals in index.tiling(base):
            f = k[1] / c_base
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
        hit = index.realized_up_to_factor(index.store.scale(d.term, f))
        if hit is None or hit[1] != 1:
            return None
        out.append(hit[0])
    return out
