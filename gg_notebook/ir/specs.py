"""Canonical OpSpecs for operators that ATen spells several ways.

Relations are matched against the ranks by term identity, so one value must have one spelling:
``x.max(-1)[0]``, ``x.amax(dim=2)`` and ``torch.amax(x, (2,), False)`` all become
``amax(x, dims=(2,), keepdim=False)``. The lowering and the lemmas build specs through here.
"""

from __future__ import annotations

import torch

from gg_notebook.relations.expr import OpSpec, Slot

aten = torch.ops.aten

_REDUCE_TARGETS = {
    "sum": aten.sum.dim_IntList,
    "mean": aten.mean.dim,
    "amax": aten.amax.default,
    "amin": aten.amin.default,
    "logsumexp": aten.logsumexp.default,
}


def reduced_dims(dim, n: int) -> tuple[int, ...]:
    """A reduction's ``dim`` argument as sorted non-negative dims of an ``n``-dim input (None or an
    empty list: every dim)."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(n))
    if isinstance(dim, int):
        dim = (dim,)
    return tuple(sorted({int(d) % max(n, 1) for d in dim}))


def reduce_spec(fn: str, dims: tuple[int, ...], keepdim: bool, dtype=None) -> OpSpec | None:
    target = _REDUCE_TARGETS.get(fn)
    if target is None:
        return None
    kwargs = (("dtype", dtype),) if dtype is not None and fn in ("sum", "mean") else ()
    return OpSpec("reduce", str(target), target, ((Slot(0), tuple(dims), bool(keepdim)), kwargs),
                  (("fn", fn), ("dims", tuple(dims)), ("keepdim", bool(keepdim))))


def ew_spec(target, n_tensors: int) -> OpSpec:
    """An elementwise op over ``n_tensors`` tensor arguments and nothing else."""
    return OpSpec("ew", str(target), target, (tuple(Slot(i) for i in range(n_tensors)), ()))


def softmax_spec(fn: str, dim: int) -> OpSpec:
    target = aten._log_softmax.default if fn == "log_softmax" else aten._softmax.default
    return OpSpec("softmax", str(target), target, ((Slot(0), dim, False), ()), (("dim", dim), ("fn", fn)))
