"""Products in one order: ``a * silu(g)`` and ``(a * sigmoid(g)) * g`` are one term.

Over the reals multiplication is commutative and associative, and ``silu(g) = g * sigmoid(g)``
(SwiGLU written unfused: ``up * torch.sigmoid(gate) * gate``). The scalar normal form
(`gg_notebook.relations.linear`) writes every product of same-shaped, same-dtype floating tensors
as one canonical term: the factors of nested ``aten.mul.Tensor`` calls (and of ``aten.silu``, as
``g`` and ``sigmoid(g)``) sorted by term id, multiplied left to right. A factor of another shape
(broadcasting) or dtype stays whole, as does every product the rule cannot flatten. Never used
with ``exact="bitwise"`` (a reassociated product rounds differently).
"""

from __future__ import annotations

import torch

from gg_notebook.ir.specs import ew_spec
from gg_notebook.relations.expr import Expr, ShapeError

aten = torch.ops.aten
MUL = ew_spec(aten.mul.Tensor, 2)
SIGMOID = ew_spec(aten.sigmoid.default, 1)
SILU = ew_spec(aten.silu.default, 1)
MAX_FACTORS = 8


def _same(a: Expr, x: Expr) -> bool:
    return tuple(a.shape) == tuple(x.shape) and a.dtype == x.dtype


def is_product(x: Expr) -> bool:
    """A call this rule may rewrite: a same-shape mul, or a silu."""
    if x.op != "call" or x.ground or x.dtype is None or not x.dtype.is_floating_point:
        return False
    target = getattr(x.attrs, "target", None)  # (compared first: a spec compares field by field)
    if target is SILU.target and x.attrs == SILU:
        return True
    return target is MUL.target and x.attrs == MUL and all(_same(a, x) for a in x.args)


def factors(store, x: Expr, out: list) -> bool:
    """Append the factors of ``x`` (of ``x``'s shape and dtype) to ``out``; False if too many."""
    if len(out) > MAX_FACTORS:
        return False
    if x.op == "call" and not x.ground and x.attrs == MUL and all(_same(a, x) for a in x.args):
        return factors(store, x.args[0], out) and factors(store, x.args[1], out)
    if x.op == "call" and not x.ground and x.attrs == SILU:
        g = x.args[0]
        out.append(g)
        out.append(store.call(SIGMOID, [g]))
        return len(out) <= MAX_FACTORS
    out.append(x)
    return len(out) <= MAX_FACTORS


def canonical_product(store, x: Expr) -> Expr | None:
    """The canonical product term equal to ``x`` over the reals, or None if ``x`` is not a product
    this rule rewrites or already is canonical."""
    if not is_product(x):
        return None
    try:
        fs: list[Expr] = []
        if not factors(store, x, fs) or len(fs) < 2:
            return None
        if any(not _same(f, x) for f in fs):
            return None
        fs.sort(key=lambda e: e.id)
        out = fs[0]
        for f in fs[1:]:
            out = store.call(MUL, [out, f])
    except ShapeError:
        return None
    if out.id == x.id or not _same(out, x):
        return None
    return out


def worth_indexing(x: Expr) -> bool:
    """Could ``x``'s canonical product differ from ``x`` (a product of products, or a silu)?"""
    if not is_product(x):
        return False
    if x.attrs == SILU:
        return True
    return any(is_product(a) for a in x.args)
