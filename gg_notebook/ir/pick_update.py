"""``x[arange(n), ids] -= u`` (or ``+= u``) as one operator: a read-modify-write of one element per row.

Megatron's vocab-parallel cross-entropy backward writes the gradient as::

    grad_2d[arange_1d, masked_target_1d] -= softmax_update

which functionalizes to ``index_put(x, [arange, ids], index(x, [arange, ids]) - u)``: a pick of one
element per row (lowered to ``gather``), an elementwise update, and a write back to the same
positions. Lowered piece by piece the pick is a value no rank computes (each rank picks from its own
vocabulary shard), so the lowering fuses the three into ``pick_update(x, ids, u)``::

    pick_update[op](x, ids, u) = where(onehot(ids, C), x op u[:, None], x)

which is the same tensor element for element (bit for bit): the rows are distinct (``arange(n)``
indexes every row once), so each row has exactly one written position, holding ``x[i, ids_i] op u_i``,
and every other element keeps its value. Fused only when every id is provably in ``[0, C)`` (the same
condition under which ``x[arange, ids]`` lowers to ``gather``: a negative id would wrap in the write).
The lemma ``pick-update-over-split`` (lemmas/pick_update.py) splits it over a vocabulary split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gg_notebook.relations.expr import OpSpec, Slot

aten = torch.ops.aten

_OPS = {"aten.sub.Tensor": "sub", "aten.add.Tensor": "add"}


@dataclass(frozen=True)
class PickUpdate:
    """``where(onehot(ids), x op u[:, None], x)`` for a 2-D ``x``, 1-D ``ids`` and ``u`` (op: sub | add)."""

    op: str

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        hot = ids.reshape(-1, 1) == torch.arange(x.shape[-1], device=x.device)
        upd = x - u.reshape(-1, 1) if self.op == "sub" else x + u.reshape(-1, 1)
        return torch.where(hot, upd, x)


def pick_update_spec(op: str) -> OpSpec:
    return OpSpec("pick_update", f"pick_update[{op}]", PickUpdate(op), ((Slot(0), Slot(1), Slot(2)), ()),
                  (("op", op),))


def _strip_views(n):
    while n.op == "view":
        n = n.inputs[0]
    return n


def index_put_as_pick_update(lowerer, fx, shape, dtype):
    """The fused node for ``index_put(x, [arange(n), ids], x.gather(1, ids[:, None]).view(n) op u)``
    (non-accumulating), else None."""
    from gg_notebook.ir.lower import _is_arange

    args = list(fx.args) + [fx.kwargs.get("accumulate", False)] * (4 - len(fx.args))
    x_fx, indices, values_fx, accumulate = args[:4]
    if accumulate is not False or not isinstance(indices, (list, tuple)) or len(indices) != 2:
        return None
    if not all(isinstance(i, torch.fx.Node) for i in indices) or not isinstance(values_fx, torch.fx.Node):
        return None
    env = lowerer.env
    x, rows, cols, vals = env.get(x_fx), env.get(indices[0]), env.get(indices[1]), env.get(values_fx)
    if not all(hasattr(v, "op") for v in (x, rows, cols, vals)):
        return None
    if len(x.shape) != 2 or tuple(shape) != tuple(x.shape) or x.dtype != dtype or not dtype.is_floating_point:
        return None
    n, C = x.shape
    if tuple(cols.shape) != (n,) or cols.dtype not in (torch.int64, torch.int32) or not _is_arange(rows, n):
        return None
    if not lowerer.ranges.within(cols, 0, C - 1):
        return None
    if vals.op != "call" or tuple(vals.shape) != (n,) or vals.dtype != dtype or len(vals.inputs) != 2:
        return None
    spec = vals.attrs
    op = _OPS.get(getattr(spec, "name", ""))
    if op is None or spec.arg("alpha", 1) != 1:
        return None
    picked, u = vals.inputs
    if tuple(u.shape) != (n,) or u.dtype != dtype:
        return None
    g = _strip_views(picked)
    if g.op != "call" or getattr(g.attrs, "target", None) is not aten.gather.default or g.attrs.arg("dim") != 1 \
            or g.attrs.arg("sparse_grad", False) is not False or len(g.inputs) != 2 or g.inputs[0] is not x:
        return None
    if tuple(g.shape) != (n, 1) or _strip_views(g.inputs[1]) is not _strip_views(cols):
        return None
    if tuple(g.inputs[1].shape) != (n, 1):
        return None
    return lowerer.emit("call", pick_update_spec(op), (x, cols, u), shape, dtype, target=f"pick_update[{op}]")
