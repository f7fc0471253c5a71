"""Rows moved by a constant index, lowered to data movement (slices and a concatenation).

``x[ids]``, ``x.index_select(d, ids)`` with a *constant* index tensor ``ids`` (a program captured
for the routing of its example inputs, `gg_notebook.capture.specialize`, has its token permutations
as constants) is ``cat([x[i:i+1 along d] for i in ids], d)``: consecutive ids are merged into one
slice. ``base.index_put([ids], v)`` (``out[ids] = v``) whose ids cover every row of ``base`` exactly
once (a permutation: nothing of ``base`` survives, no two writes collide) is ``v`` with its rows
put in place: ``v[inverse(ids)]``, lowered the same way.

Exact (bit for bit): only whole rows are copied. Declines (the call stays generic) on anything
else: a non-constant or non-integer index, an index out of range, ``accumulate=True``, more than
one index tensor, or too many pieces.
"""

from __future__ import annotations

import torch

from gg_notebook.ir.graph import Node

aten = torch.ops.aten
MAX_PIECES = 4096


def _const_ids(n) -> torch.Tensor | None:
    if not isinstance(n, Node) or n.op != "const" or n.dtype not in (torch.int64, torch.int32):
        return None
    try:
        v = n.attrs.call([])
    except Exception:  # noqa: BLE001 - not materializable
        return None
    if not isinstance(v, torch.Tensor) or v.device.type == "meta":
        return None
    return v.to(torch.int64)


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for i in ids:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]


def _gather_rows(low, src: Node, dim: int, ids: torch.Tensor, name: str) -> Node | None:
    """``src`` indexed along ``dim`` by the 1-D ids, as slices and a cat (None if not possible)."""
    size = src.shape[dim]
    flat = ids.reshape(-1)
    if flat.numel() == 0 or bool(((flat < -size) | (flat >= size)).any()):
        return None
    flat = torch.where(flat < 0, flat + size, flat)
    runs = _runs(flat.tolist())
    if len(runs) > MAX_PIECES:
        return None
    pieces = []
    for k, (a, b) in enumerate(runs):
        if a == 0 and b == size:
            pieces.append(src)
            continue
        sshape = list(src.shape)
        sshape[dim] = b - a
        pieces.append(low.emit("slice", (dim, a, b), (src,), tuple(sshape), src.dtype, name=f"{name}_rows{k}"))
    if len(pieces) == 1:
        return pieces[0]
    oshape = list(src.shape)
    oshape[dim] = flat.numel()
    return low.emit("cat", dim, pieces, tuple(oshape), src.dtype, name=f"{name}_cat")


def lower_const_index(low, fx, shape, dtype) -> Node | None:
    env = low.env
    target, args, kwargs = fx.target, fx.args, fx.kwargs
    if shape is None:
        return None
    if target is aten.index_select.default:
        src, dim, ids = env.get(args[0]), args[1], _const_ids(env.get(args[2]))
        if not isinstance(src, Node) or ids is None or ids.dim() > 1 or not isinstance(dim, int):
            return None
        dim %= max(len(src.shape), 1)
        out = _gather_rows(low, src, dim, ids, fx.name)
        return out
    if target is aten.index.Tensor:
        src, indices = env.get(args[0]), args[1]
        if not isinstance(src, Node) or not isinstance(indices, (list, tuple)):
            return None
        given = [i for i, t in enumerate(indices) if t is not None]
        if len(given) != 1 or any(t is not None for t in indices[:given[0]]):
            return None
        d = given[0]
        ids = _const_ids(env.get(indices[d]))
        if ids is None or d >= len(src.shape):
            return None
        out = _gather_rows(low, src, d, ids, fx.name)
        if out is None:
            return None
        if tuple(out.shape) != tuple(shape):  # a multi-dim index: its dims replace dim d
            out = low.view(out, tuple(shape), dtype)
        return out
    # index_put(base, [ids], v, accumulate=False) with ids a permutation of base's rows
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    base, indices, v = env.get(args[0]), args[1], env.get(args[2]) if isinstance(args[2], torch.fx.Node) else None
    if accumulate or not isinstance(base, Node) or not isinstance(v, Node) or not isinstance(indices, (list, tuple)):
        return None
    if len(indices) != 1 or indices[0] is None:
        return None
    ids = _const_ids(env.get(indices[0]))
    if ids is None or ids.dim() != 1 or not base.shape or ids.numel() != base.shape[0]:
        return None
    n = base.shape[0]
    ids = torch.where(ids < 0, ids + n, ids)
    if not torch.equal(torch.sort(ids).values, torch.arange(n)):
        return None  # not a permutation: some row of base survives, or two writes collide
    if tuple(v.shape) != tuple(base.shape) or v.dtype != base.dtype or tuple(shape) != tuple(base.shape):
        return None
    inverse = torch.empty_like(ids)
    inverse[ids] = torch.arange(n)
    return _gather_rows(low, v, 0, inverse, fx.name)
