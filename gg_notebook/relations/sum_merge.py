"""Sums over adjacent slices merge: ``sum(y[a:b], D) + sum(y[b:c], D) = sum(y[a:c], D)`` (d in D).

The scalar normal form (`gg_notebook.relations.linear`) splits a sum over a concatenated dim into
the sums of its pieces, and every rank's value is normalized over its *own* pieces: a rank that
sums its shard ``x[4r:4r+4]`` holds ``sum(x[4r:4r+4])``, a rank that averages micro-batches holds
the sums of row slices of them. The sequential program sums the whole tensor, whose normal form
has one base ``sum(x)``. To compare the two, a form is brought to one canonical grouping: bases
that are sums over adjacent slices of one tensor along a summed dim, with equal coefficients, are
merged into the sum over their union (a slice covering the whole tensor is the tensor), a run at a
time, until no two bases merge. The identity holds over the reals (a sum is associative); the
normal form is never used with ``exact="bitwise"``.

Bases handled: ``sum(slice(y, d, a, b), D)`` with ``d`` in ``D`` (canonical sums have no keepdim),
optionally under one ``view`` (how ``keepdim=True`` is normalized); every piece of a run has the
same shape. A slice one element long along ``d`` counts as its own sum over ``d``.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from gg_notebook.ir.specs import reduced_dims
from gg_notebook.relations.expr import Expr, ShapeError

aten = torch.ops.aten


def _sum_of_slice(b: Expr):
    """(shape, y, d, a, e, dims) when base ``b`` is ``sum(y[a:e along d], dims)`` (d in dims) viewed as
    ``shape`` (b's own shape); else None. Canonical sums drop summed dims of size 1, so a slice one
    element long along d may appear as ``[view](sum(y[a:a+1], dims - {d}))`` or, with nothing else
    summed, as ``[view](y[a:a+1])``: the sum over d of a one-element extent is that extent."""
    shape = tuple(b.shape)
    if b.op == "view":
        b = b.args[0]
    if b.op == "slice":
        d, a, e = b.attrs
        if e - a != 1:
            return None
        return shape, b.args[0], d, a, e, (d,)
    if b.op != "call" or b.attrs.target is not aten.sum.dim_IntList or len(b.args) != 1:
        return None
    spec = b.attrs
    src = b.args[0]
    if spec.arg("keepdim", False) or spec.arg("dtype", None) not in (None, src.dtype) or src.dtype != b.dtype:
        return None
    if src.op != "slice":
        return None
    dims = tuple(reduced_dims(spec.arg("dim"), len(src.shape)))
    d, a, e = src.attrs
    if d not in dims:
        if e - a != 1:
            return None
        dims = tuple(sorted(dims + (d,)))
    return shape, src.args[0], d, a, e, dims


def merge_slice_sums(forms, form: tuple) -> tuple | None:
    """``form`` with runs of adjacent slice sums merged (see the module docstring); None if
    nothing merges. ``forms`` is the `LinearForms` whose canonical sum constructor is used."""
    from gg_notebook.relations.linear import _normalize

    groups: dict = {}
    for i, (b, c) in enumerate(form):
        info = _sum_of_slice(b)
        if info is None:
            continue
        view, y, d, a, e, dims = info
        groups.setdefault((view, y.id, d, dims, c), []).append((a, e, i, y))
    if not any(len(g) > 1 for g in groups.values()):
        return None
    S = forms.S
    drop: set[int] = set()
    extra: list[tuple[Expr, Fraction]] = []
    for (view, _, d, dims, c), pieces in groups.items():
        if len(pieces) < 2:
            continue
        pieces.sort(key=lambda p: (p[0], p[1]))
        run: list = [pieces[0]]
        runs = []
        for p in pieces[1:]:
            if p[0] == run[-1][1]:
                run.append(p)
            else:
                runs.append(run)
                run = [p]
        runs.append(run)
        for run in runs:
            if len(run) < 2:
                continue
            y = run[0][3]
            try:
                whole = S.slice(y, d, run[0][0], run[-1][1])
                merged = forms._sum_of(whole, dims)
                if merged is None:
                    continue
                if tuple(merged.shape) != view:
                    merged = S.view(merged, view)
            except ShapeError:
                continue
            drop.update(p[2] for p in run)
            extra.append((merged, c))
    if not drop:
        return None
    kept = [(b, c) for i, (b, c) in enumerate(form) if i not in drop]
    out = _normalize(kept + extra)
    if out is None:
        return None
    again = merge_slice_sums(forms, out) if len(out) > 1 else None
    return again if again is not None else out
