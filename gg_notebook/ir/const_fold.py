"""An elementwise operator whose operands are all uniform constants is a uniform constant.

``(target < 0) | (target >= V)`` with both comparisons folded to ``full(False)`` (targets declared in
``[0, V)``, ir/ranges.py) leaves ``bitwise_or(full(False), full(False))``; Megatron's cross-entropy
backward then computes ``1.0 - mask.float()`` from it. The lowering folds such a call to
``full(op(v_1, .., v_n))``: an elementwise kernel computes every element from the same operand values,
so every element is that one value (bit for bit; the operator runs on 0-dim tensors of the operands'
dtypes). Random operators are never folded.
"""

from __future__ import annotations

import torch


def fold_uniform(node, shape, dtype):
    """``(OpSpec, value)`` of the folded constant for an ``ew`` call node on uniform constants, else None."""
    from gg_notebook.ir.lower import _Full
    from gg_notebook.ir.ranges import _uniform_value
    from gg_notebook.relations.expr import OpSpec

    attrs = node.attrs
    if node.op != "call" or getattr(attrs, "kind", None) != "ew" or attrs.unique is not None or attrs.out is not None:
        return None
    if not node.inputs or dtype is None or len(shape) == 0:
        return None
    vals = []
    for i in node.inputs:
        if i.op != "const":
            return None
        v = _uniform_value(i)
        if v is None or v.dtype != i.dtype:
            return None
        vals.append(v.reshape(()))
    try:
        out = attrs.call(vals)
    except Exception:  # noqa: BLE001 - not evaluable on scalars: leave it
        return None
    if not isinstance(out, torch.Tensor) or out.numel() != 1 or out.dtype != dtype:
        return None
    value = out.reshape(()).item()
    return OpSpec("const", f"full({value})", _Full.of(tuple(shape), value, dtype), ((), ())), value
