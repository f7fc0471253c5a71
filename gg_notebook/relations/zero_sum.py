"""A sum of zero-padded disjoint pieces is their concatenation: the "manual all-gather".

    out = torch.zeros(m, n * W); out[:, r*n:(r+1)*n] = y; dist.all_reduce(out)

Every rank writes its piece into its own slots of a zero buffer; the all-reduce adds the ranks'
buffers. Where exactly one rank wrote, the sum is that rank's element plus zeros (``x + 0 == x``
exactly, also bit for bit: ``-0.0 + 0.0`` is ``+0.0``, which compares equal); where no rank wrote
the sum would be a zero, and where two ranks wrote it is a real sum, so those are declined.

`zero_padded_sum` decides it on index tensors (`gg_notebook.relations.movement`): each summand is a
chain of writes (``slice_scatter``, a same-dtype ``copy``, data movement) into a constant whose
every element is zero; its written elements carry the index of the leaf element written, its
untouched ones -1. If every output position holds a leaf index in exactly one summand, the sum is
the data movement those indices describe, rebuilt from the realized leaves (the ranks' pieces)
and checked on index tensors; otherwise the term is returned unchanged.
"""

from __future__ import annotations

import math

import torch

from gg_notebook.relations.expr import Expr, apply_op
from gg_notebook.relations.movement import MAX_NUMEL, MOVE_OPS, movement_of, rebuild_from_index

_aten = torch.ops.aten
_WRITES = (_aten.slice_scatter.default, _aten.copy.default)


def _is_zero(e: Expr) -> bool:
    from gg_notebook.relations.ground import value_of

    v = value_of(e)
    if v is None or v.is_complex() or v.dtype == torch.bool:
        return False
    return bool((v == 0).all())


def _leaves(e: Expr, out: set, seen: set) -> bool:
    """Collect the written leaves of ``e``; False if ``e`` contains something that is neither a
    write, data movement, a zero constant nor a leaf (never: every other node is a leaf)."""
    if e.id in seen:
        return True
    seen.add(e.id)
    if e.op in MOVE_OPS or (e.op == "call" and e.attrs.target in _WRITES):
        return all(_leaves(a, out, seen) for a in e.args)
    if not _is_zero(e):
        out.add(e.id)
    return True


def _index(e: Expr, num: dict, memo: dict):
    """Index tensor of ``e`` with zero constants as -1; None where ``e`` is not a chain of writes and
    movement over zero buffers and numbered leaves (or too large)."""
    v = memo.get(e.id)
    if v is not None:
        return v
    if math.prod(e.shape) > MAX_NUMEL:
        return None
    if e.id in num:
        off = num[e.id]
        v = torch.arange(off, off + math.prod(e.shape), dtype=torch.int64).view(tuple(e.shape))
    elif e.op in MOVE_OPS:
        vals = [_index(a, num, memo) for a in e.args]
        if any(x is None for x in vals):
            return None
        v = apply_op(e.op, e.attrs, vals)
    elif _is_zero(e):
        v = torch.full(tuple(e.shape), -1, dtype=torch.int64)
    elif e.op == "call" and e.attrs.target == _aten.slice_scatter.default and len(e.args) == 2:
        if e.args[0].dtype != e.args[1].dtype or e.args[0].dtype != e.dtype:
            return None
        base, src = (_index(a, num, memo) for a in e.args)
        if base is None or src is None:
            return None
        sp = e.attrs
        try:
            v = torch.slice_scatter(base, src, sp.arg("dim"), sp.arg("start"), sp.arg("end"), sp.arg("step"))
        except (RuntimeError, TypeError):
            return None
    elif e.op == "call" and e.attrs.target == _aten.copy.default and len(e.args) == 2:
        dst, src = e.args
        if dst.dtype != src.dtype or dst.dtype != e.dtype:
            return None
        s = _index(src, num, memo)
        if s is None:
            return None
        try:
            v = s.expand(tuple(dst.shape)).clone()
        except RuntimeError:
            return None
    else:
        return None
    memo[e.id] = v
    return v


def zero_padded_sum(index, term: Expr) -> Expr:
    """``term`` (an all-reduce sum) as the data movement of what the summands wrote into zero
    buffers, when every element is written by exactly one summand; else ``term`` unchanged."""
    if term.op != "accum" or term.attrs != "sum" or len(term.args) < 2:
        return term
    if term.dtype is None or term.dtype == torch.bool or term.dtype.is_complex:
        return term
    if not any(a.op == "call" and a.attrs.target in _WRITES for a in term.args):
        return term  # no summand writes into a buffer (the common all-reduce): nothing to decide
    if any(a.dtype != term.dtype or tuple(a.shape) != tuple(term.shape) for a in term.args):
        return term
    leaves: set[int] = set()
    seen: set[int] = set()
    for a in term.args:
        _leaves(a, leaves, seen)
    if not leaves:
        return term
    m = movement_of(index)
    num = m.numbering(leaves)
    if num is None:
        return term
    memo: dict = {}
    parts = []
    for a in term.args:
        T = _index(a, num, memo)
        if T is None:
            return term
        parts.append(T)
    stacked = torch.stack(parts)
    written = (stacked >= 0).sum(0)
    if bool((written != 1).any()):
        return term  # an element no rank wrote (a zero) or that two ranks add: a real sum
    T = stacked.max(0).values
    new = rebuild_from_index(index, T, num, leaves)
    return new if new is not None else term
