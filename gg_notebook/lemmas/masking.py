"""Recognizing "x with some rows set to zero", however the program spells it.

Vocabulary-parallel code zeroes the rows a rank does not own, and a loss zeroes the positions whose
target is ``ignore_index``. Programs write that as ``x[M] = 0``, ``x.masked_fill(M, 0)``,
``torch.where(C, x, 0)``, ``torch.where(C, 0, x)`` or ``x * m`` with a 0/1 mask ``m``.
`kept_rows` recognizes every one of these and returns a function that, given a way to evaluate the
mask's term (on the whole id domain, see domain.py), says which rows are *kept*. The callers compare
that with the rows the identity needs kept, exhaustively, so a mask is accepted only if it is right
for every id.
"""

from __future__ import annotations

from typing import Callable

import torch

from gg_notebook.relations.expr import Expr, Slot

Evaluate = Callable[[Expr], "torch.Tensor | None"]
KeepFn = Callable[[Evaluate], "torch.Tensor | None"]

_INDEX_PUT = ("aten.index_put.default", "aten.index_put_.default")
_MASKED_FILL = ("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")


def is_zero(e: Expr) -> bool:
    """A constant whose every element is zero."""
    if e.op == "expand" or e.op == "view":
        return is_zero(e.args[0])
    if e.op != "const":
        return False
    try:
        v = e.attrs.call([])
    except Exception:  # noqa: BLE001
        return False
    return bool((v == 0).all())


def _row_mask(mask: Expr, row_shape: tuple) -> Expr | None:
    """``mask`` as a tensor of ``row_shape`` (one element per row), looking through broadcasting
    views; None if it does not have one element per row."""
    while mask.op in ("view", "expand") and tuple(mask.shape) != row_shape:
        mask = mask.args[0]
    if tuple(mask.shape) == row_shape:
        return mask
    # a mask with trailing size-1 dims (``~inside.unsqueeze(-1)``) broadcasts over each row; its
    # elements are in row order, which is all the domain check needs
    if tuple(mask.shape[:len(row_shape)]) == row_shape and all(s == 1 for s in mask.shape[len(row_shape):]):
        return mask
    # a single element (a constant condition, e.g. `t != -100` folded on a declared domain) is the
    # same for every row; evaluated on the domain it answers one value for every id
    if all(s == 1 for s in mask.shape) and mask.op == "const":
        return mask
    return None


def _not(v):
    return None if v is None else ~v.bool()


def _as_bool(v):
    return None if v is None else v.bool()


def _zero_one(v):
    """A 0/1 factor as booleans; None if any value is not exactly 0 or 1."""
    if v is None:
        return None
    if v.dtype == torch.bool:
        return v
    if not bool(((v == 0) | (v == 1)).all()):
        return None
    return v == 1


def kept_rows(e: Expr, x: Expr, row_shape: tuple | None = None) -> KeepFn | None:
    """If ``e`` is ``x`` with whole rows (elements of ``row_shape``, default ``x.shape[:-1]``) set
    to zero and the others unchanged, a function from a mask evaluator to the kept rows."""
    if e.op != "call" or not e.args:
        return None
    row_shape = tuple(x.shape[:-1]) if row_shape is None else tuple(row_shape)
    spec = e.attrs
    name = spec.name
    if name in _INDEX_PUT and len(e.args) == 3 and e.args[0].id == x.id:
        if spec.arg("accumulate", True) is not False:
            return None
        mask, value = e.args[1], e.args[2]
        if mask.dtype != torch.bool or not is_zero(value) or tuple(mask.shape) != row_shape:
            return None
        return lambda ev: _not(ev(mask))
    if name in _MASKED_FILL and e.args[0].id == x.id and len(e.args) >= 2:
        value = spec.arg("value", None)
        if isinstance(value, Slot):
            if not is_zero(e.args[value.i]):
                return None
        elif not (isinstance(value, (bool, int, float)) and value == 0):
            return None
        mask = _row_mask(e.args[1], row_shape)
        if mask is None:
            return None
        return lambda ev: _not(ev(mask))
    if name == "aten.where.self" and len(e.args) == 3:
        cond, a, b = e.args
        mask = _row_mask(cond, row_shape)
        if mask is None or cond.dtype != torch.bool:
            return None
        if a.id == x.id and is_zero(b):
            return lambda ev: _as_bool(ev(mask))
        if b.id == x.id and is_zero(a):
            return lambda ev: _not(ev(mask))
        return None
    if name == "aten.mul.Tensor" and len(e.args) == 2 and x.id in (e.args[0].id, e.args[1].id):
        other = e.args[1] if e.args[0].id == x.id else e.args[0]
        if other.id == x.id:
            return None
        mask = _row_mask(other, row_shape)
        if mask is None:
            return None
        return lambda ev: _zero_one(ev(mask))
    return None
