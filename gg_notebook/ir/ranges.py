"""Integer value ranges of IR nodes: what an index tensor can hold, proved from how it was built.

Some spellings differ only outside the values an index can take: ``weight[ids]`` wraps a negative
id where ``F.embedding(ids, weight)`` raises, so the two are one value exactly when every id is in
``[0, V)``. `int_range` bounds an integer node by interval arithmetic over the operators that build
it (``clamp``, ``arange``, shifts by a number, ``where``/``masked_fill`` with a number, ``remainder``,
data movement) and over the domains the problem declares for its inputs (`Problem.domains`). Any
operator it does not know gives no range: the lowering then keeps the spelling as it is.
"""

from __future__ import annotations

import torch

from gg_notebook.ir.graph import Node
from gg_notebook.relations.expr import untyped

aten = torch.ops.aten

Range = tuple[int, int]  # inclusive [lo, hi]

_MOVEMENT = ("view", "permute", "slice", "expand")


def _int(dtype) -> bool:
    return dtype is not None and not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _num(v):
    v = untyped(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not v.is_integer():
        return None
    return int(v)


class IntRanges:
    """Memoized ranges of the nodes of one graph; ``inputs`` maps input index -> (lo, hi)."""

    def __init__(self, inputs: dict[int, Range] | None = None) -> None:
        self.inputs = dict(inputs or {})
        self._memo: dict[int, Range | None] = {}

    def of(self, n: Node) -> Range | None:
        key = id(n)
        if key not in self._memo:
            self._memo[key] = self._range(n) if _int(n.dtype) else None
        return self._memo[key]

    def within(self, n: Node, lo: int, hi: int) -> bool:
        r = self.of(n)
        return r is not None and lo <= r[0] and r[1] <= hi

    def _range(self, n: Node) -> Range | None:
        if n.op == "input":
            return self.inputs.get(n.attrs)
        if n.op in _MOVEMENT:
            return self.of(n.inputs[0])
        if n.op == "cat":
            rs = [self.of(i) for i in n.inputs]
            return None if any(r is None for r in rs) else (min(r[0] for r in rs), max(r[1] for r in rs))
        if n.op == "const":
            return _const_range(n)
        if n.op != "call":
            return None
        spec = n.attrs
        t = spec.target
        try:
            if t in (aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default):
                src = self.of(n.inputs[spec.slot_of("self")])
                lo = _num(spec.arg("min", None)) if t is not aten.clamp_max.default else None
                hi = _num(spec.arg("max", None)) if t is not aten.clamp_min.default else None
                if src is None:
                    return (lo, hi) if lo is not None and hi is not None else None
                a = src[0] if lo is None else max(src[0], lo)
                b = src[1] if hi is None else min(src[1], hi)
                return (a, b) if a <= b else (lo if lo is not None else a, lo if lo is not None else a)
            if t in (aten.add.Tensor, aten.sub.Tensor) and spec.slot_of("other") is None:
                src = self.of(n.inputs[spec.slot_of("self")])
                c, alpha = _num(spec.arg("other")), _num(spec.arg("alpha", 1))
                if src is None or c is None or alpha is None:
                    return None
                d = c * alpha * (1 if t is aten.add.Tensor else -1)
                return (src[0] + d, src[1] + d)
            if t is aten.remainder.Scalar:
                m = _num(spec.arg("other"))
                return (0, m - 1) if m is not None and m > 0 else None
            if t is aten.where.self:
                a, b = self.of(n.inputs[spec.slot_of("self")]), self.of(n.inputs[spec.slot_of("other")])
                return None if a is None or b is None else (min(a[0], b[0]), max(a[1], b[1]))
            if t in (aten.where.ScalarOther, aten.where.ScalarSelf, aten.masked_fill.Scalar):
                tensor_arg = "self"
                scalar_arg = "other" if t is aten.where.ScalarOther else ("self" if t is aten.where.ScalarSelf else "value")
                if t is aten.where.ScalarSelf:
                    tensor_arg = "other"
                a = self.of(n.inputs[spec.slot_of(tensor_arg)])
                v = _num(spec.arg(scalar_arg))
                return None if a is None or v is None else (min(a[0], v), max(a[1], v))
            if t is aten._to_copy.default:
                src_node = n.inputs[spec.slot_of("self")]
                return self.of(src_node) if _int(src_node.dtype) else None
        except (KeyError, TypeError, IndexError):
            return None
        return None


def _const_range(n: Node) -> Range | None:
    spec = n.attrs
    fill = getattr(spec.target, "constant_fill", None)
    if fill is not None:
        v = _num(fill())
        return None if v is None else (v, v)
    t = spec.target
    if t is aten.scalar_tensor.default:
        v = _num(spec.arg("s", None))
        return None if v is None else (v, v)
    if t in (aten.arange.default, aten.arange.start, aten.arange.start_step):
        try:
            start = _num(spec.arg("start", 0)) if t is not aten.arange.default else 0
            end = _num(spec.arg("end"))
            step = _num(spec.arg("step", 1)) if t is aten.arange.start_step else 1
        except KeyError:
            return None
        if None in (start, end, step) or step == 0 or not n.shape or n.shape[0] == 0:
            return None
        last = start + (n.shape[0] - 1) * step
        return (min(start, last), max(start, last))
    return None

