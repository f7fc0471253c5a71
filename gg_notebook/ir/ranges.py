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
        self._image = _Image(self)

    def constant(self, n: Node):
        """The one value an integer or boolean elementwise function of a ranged input takes on
        its whole range (``target < 0`` for targets in ``[0, V)`` is False), else None."""
        if not self.inputs:
            return None
        hit = self._image._of(n)  # not memoized: ``n`` may be a candidate the caller discards
        if hit is None or hit[0] is None:
            return None
        v = hit[1]
        if not isinstance(v, torch.Tensor) or v.numel() == 0:
            return None
        flat = v.reshape(-1)
        if not bool((flat == flat[0]).all()):
            return None
        return flat[0].item()

    def never_true(self, n: Node) -> bool:
        """Is boolean ``n`` False everywhere, for every value of the input it depends on (a uniform
        False constant, or ``target < 0`` for targets in [0, V))?"""
        if n.dtype != torch.bool:
            return False
        if n.op == "const":
            v = _uniform_value(n)
            return v is not None and not bool(v)
        hit = self._image.image(n)
        return hit is not None and hit[1].numel() > 0 and not bool(hit[1].any())

    def same_as_operand(self, n: Node) -> Node | None:
        """An operand of ``n`` (same shape and dtype) that ``n`` equals on the whole range of the
        input both are functions of (``ids[mask] = 0`` where the mask is False for every id)."""
        if not self.inputs:
            return None
        hit = self._image._of(n)  # not memoized (see `constant`)
        if hit is None or hit[0] is None:
            return None
        for i in n.inputs:
            if tuple(i.shape) != tuple(n.shape) or i.dtype != n.dtype:
                continue
            other = self._image.image(i)
            if other is not None and other[0] is hit[0] and torch.equal(other[1], hit[1]):
                return i
        return None

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
        r = self._interval(n)
        if r is None and n.op == "call":
            r = self._image_range(n)
        return r

    def _image_range(self, n: Node) -> Range | None:
        """The exact range of an elementwise integer function of one ranged input, by evaluating it on
        every value of the input's range (``masked = ids - start; masked[out_of_shard] = 0`` is in
        ``[0, n)``, which interval arithmetic cannot see: the mask excludes the negative ids)."""
        img = self._image.of(n)
        if img is None or img.numel() == 0:
            return None
        return int(img.min()), int(img.max())

    def _interval(self, n: Node) -> Range | None:
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



MAX_IMAGE = 1 << 22  # largest input range evaluated exhaustively
_ELEMENTWISE_PUT = (aten.index_put.default, aten.index_put_.default)


class _Image:
    """Values of elementwise functions of one integer input on *every* value of its range.

    A node's image is (input node, 1-D tensor) with element i the node's value where that input
    holds ``lo + i`` (a uniform constant: (None, its value)). Only operators that combine operands
    position by position qualify (elementwise kernels, ``x[mask] = v`` with a same-shape boolean
    mask), and every operand must be the one input seen through reshapes (row-major order: positions
    stay aligned) or a uniform constant; anything else has no image. Memoized per node."""

    def __init__(self, ranges: "IntRanges") -> None:
        self.ranges = ranges
        self.memo: dict[int, tuple | None] = {}

    def of(self, n: Node) -> torch.Tensor | None:
        hit = self.image(n)
        return None if hit is None or hit[0] is None else hit[1]

    def image(self, n: Node) -> tuple | None:
        key = id(n)
        if key not in self.memo:
            self.memo[key] = self._of(n)
        return self.memo[key]

    def _of(self, n: Node):
        if n.op == "input":
            r = self.ranges.inputs.get(n.attrs)
            if r is None or r[1] - r[0] + 1 > MAX_IMAGE or not _int(n.dtype):
                return None
            return n, torch.arange(r[0], r[1] + 1, dtype=n.dtype)
        if n.op == "const":
            v = _uniform_value(n)
            return None if v is None else (None, v)
        if n.op in _MOVEMENT:
            src = n.inputs[0]
            hit = self.image(src)
            if hit is None:
                return None
            if hit[0] is src:
                # data movement of the input itself: every element is still one of the input's
                # elements, so this node ranges over the same values (a variable of its own)
                return n, hit[1]
            if n.op == "view" and _numel(src.shape) == _numel(n.shape):
                return hit  # a reshape keeps row-major positions aligned
            return None
        if n.op != "call":
            return None
        spec = n.attrs
        if spec.kind != "ew" and spec.target not in _ELEMENTWISE_PUT:
            return None
        if getattr(spec, "unique", None) is not None:
            return None
        if spec.target in _ELEMENTWISE_PUT:
            if spec.arg("accumulate", True) is not False or any(i.dtype != torch.bool for i in n.inputs[1:-1]):
                return None
        full = [i for i in n.inputs if i.op != "const"]
        if any(tuple(i.shape) != tuple(n.shape) for i in full):
            return None  # broadcasting would pair other positions
        if any(i.op == "const" and _numel(i.shape) not in (1, _numel(n.shape)) for i in n.inputs):
            return None
        var, vals = None, []
        for i in n.inputs:
            hit = self.image(i)
            if hit is None:
                return None
            if hit[0] is not None:
                if var is not None and hit[0] is not var:
                    return None  # two different inputs: positions are not one value's
                var = hit[0]
            vals.append(hit[1])
        if var is None:
            # uniform operands only: the result is uniform too (one value for every position)
            try:
                out = spec.call(vals)
            except Exception:  # noqa: BLE001
                return None
            if not isinstance(out, torch.Tensor) or out.numel() != 1:
                return None
            return None, out.reshape(())
        length = self.image(var)[1].shape[0]
        if spec.target in _ELEMENTWISE_PUT:  # a uniform mask as a mask of every position
            vals = [vals[0]] + [v.expand(length) if v.dim() == 0 else v for v in vals[1:-1]] + [vals[-1]]
        try:
            out = spec.call(vals)
        except Exception:  # noqa: BLE001 - not evaluable this way: no image
            return None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (length,):
            return None
        return var, out


def _numel(shape) -> int:
    k = 1
    for s in shape:
        k *= s
    return k


def _uniform_value(n: Node) -> torch.Tensor | None:
    fill = getattr(n.attrs.target, "constant_fill", None)
    if fill is not None:
        v = untyped(fill())
        if isinstance(v, (bool, int, float)):
            return torch.tensor(v, dtype=n.dtype)
    target = n.attrs.target
    stored = getattr(target, "tensor", None)  # a value node (relations/ground.py)
    if isinstance(stored, torch.Tensor) and getattr(target, "_uniform", False) and stored.numel() > 0:
        return stored.reshape(-1)[0].clone()
    data = getattr(target, "data", None)  # a tensor baked into the graph (lowering's _TensorConst)
    if isinstance(data, torch.Tensor) and 0 < data.numel() <= 1 << 16 and data.device.type != "meta":
        flat = data.reshape(-1)
        if bool((flat == flat[0]).all()):
            return flat[0].clone()
    return None
