"""Rules of the pointwise normal form for 2-norms (real mode only, like the whole normal form).

A gradient clipped by its global norm is spelled ``sqrt(sum((g * g).sum() for g in grads))``, or
``torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()``, or as ``clip_grad_norm_`` computes
it, ``vector_norm(stack([vector_norm(g) for g in grads]))``. Over the reals these are one value;
the rules rewrite every spelling into the first one:

* ``linalg_vector_norm(x)`` (ord 2, every dim, no keepdim, no dtype; a real floating ``x``)
  -> ``sqrt(sum(x * x))``;
* ``stack(xs, d) * stack(ys, d)`` (same number of pieces, each pair of one shape and dtype)
  -> ``stack([x * y for x, y in zip(xs, ys)], d)``;
* ``sqrt(s) * sqrt(s)`` -> ``s`` when ``s`` is a sum of squares of a real tensor (``sum(y * y)``),
  so never negative: ``sqrt(s) ** 2 == s`` over the reals;
* ``sum(stack(xs, d))`` (a full sum, no dtype) of 0-dim pieces -> ``x0 + x1 + ...``.

Each rule decides on the whole operator (overload, dtype, every argument) and leaves anything else
alone. The rewritten nodes keep the source line of the node they replace.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

_REAL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _shape(n):
    v = _val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _dtype(n):
    v = _val(n)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _is_number(c) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool)


def _vector_norm_args(n: fx.Node):
    """``x`` if ``n`` is ``linalg_vector_norm(x, 2)`` over every dim, without keepdim or dtype."""
    if not _call(n, aten.linalg_vector_norm.default):
        return None
    names = ("self", "ord", "dim", "keepdim")
    if len(n.args) > len(names) or not n.args:
        return None
    a = dict(zip(names, n.args))
    for k, v in n.kwargs.items():
        if k in a or k not in names + ("dtype",):
            return None
        a[k] = v
    x = a["self"]
    ordv = a.get("ord", 2)
    if not isinstance(x, fx.Node) or not _is_number(ordv) or ordv != 2:
        return None
    if a.get("keepdim", False) is not False or a.get("dtype") is not None:
        return None
    shape = _shape(x)
    dim = a.get("dim")
    if shape is None:
        return None
    if dim is not None:
        dims = [dim] if isinstance(dim, int) else list(dim)
        if not dims or sorted(d % max(len(shape), 1) for d in dims) != list(range(len(shape))) \
                or len(set(dims)) != len(dims):
            return None
    if _dtype(x) not in _REAL or _dtype(n) != _dtype(x) or _shape(n) != ():
        return None
    return x


def rule_vector_norm(rw, n: fx.Node) -> bool:
    x = _vector_norm_args(n)
    if x is None:
        return False
    sq = rw.emit(n, n, aten.mul.Tensor, (x, x))
    s = rw.emit(n, n, aten.sum.default, (sq,))
    return rw.replace(n, rw.emit(n, n, aten.sqrt.default, (s,)), "vector_norm-written")


def _stack(n):
    """``(pieces, dim)`` of a ``stack(pieces, dim)`` node (dim normalized), else None."""
    if not _call(n, aten.stack.default) or not n.args or len(n.args) > 2 or n.kwargs:
        return None
    xs = n.args[0]
    d = n.args[1] if len(n.args) > 1 else 0
    if not isinstance(xs, (list, tuple)) or not xs or not all(isinstance(x, fx.Node) for x in xs):
        return None
    if not isinstance(d, int) or isinstance(d, bool):
        return None
    nd = len(_shape(n) or ())
    return list(xs), d % nd if nd else d


def rule_stack_product(rw, n: fx.Node) -> bool:
    if not _call(n, aten.mul.Tensor) or len(n.args) != 2 or n.kwargs:
        return False
    a, b = n.args
    sa, sb = _stack(a), _stack(b)
    if sa is None or sb is None or len(sa[0]) != len(sb[0]) or sa[1] != sb[1]:
        return False
    if _shape(a) != _shape(b) or _dtype(a) != _dtype(b) or _dtype(n) != _dtype(a) or _dtype(a) not in _REAL:
        return False
    pairs = list(zip(sa[0], sb[0]))
    if any(_shape(x) != _shape(y) or _dtype(x) != _dtype(a) or _dtype(y) != _dtype(a) for x, y in pairs):
        return False
    prods = [rw.emit(n, n, aten.mul.Tensor, (x, y)) for x, y in pairs]
    return rw.replace(n, rw.emit(n, n, aten.stack.default, (prods, sa[1])), "stack-product")


def _sum_of_squares(s) -> bool:
    """``s`` is ``sum(y * y)`` (a full sum, no dtype) of a real ``y``: never negative."""
    if not _call(s, aten.sum.default) or len(s.args) != 1 or s.kwargs:
        return False
    sq = s.args[0]
    if not _call(sq, aten.mul.Tensor) or len(sq.args) != 2 or sq.kwargs or sq.args[0] is not sq.args[1]:
        return False
    return _dtype(sq.args[0]) in _REAL and _dtype(s) == _dtype(sq.args[0])


def rule_sqrt_squared(rw, n: fx.Node) -> bool:
    if not _call(n, aten.mul.Tensor) or len(n.args) != 2 or n.kwargs or n.args[0] is not n.args[1]:
        return False
    r = n.args[0]
    if not _call(r, aten.sqrt.default) or len(r.args) != 1 or r.kwargs:
        return False
    s = r.args[0]
    if not _sum_of_squares(s) or _dtype(s) != _dtype(n) or _shape(s) != _shape(n):
        return False
    return rw.replace(n, s, "sqrt-squared")


def rule_sum_stack(rw, n: fx.Node) -> bool:
    if not _call(n, aten.sum.default) or len(n.args) != 1 or n.kwargs:
        return False
    st = _stack(n.args[0])
    if st is None:
        return False
    xs = st[0]
    dt = _dtype(n)
    if dt not in _REAL or any(_shape(x) != () or _dtype(x) != dt for x in xs):
        return False
    acc = xs[0]
    if len(xs) == 1:
        return rw.replace(n, rw.emit(n, n, aten.clone.default, (acc,)), "sum-of-stack")
    for x in xs[1:]:
        acc = rw.emit(n, n, aten.add.Tensor, (acc, x))
    return rw.replace(n, acc, "sum-of-stack")


RULES = (rule_vector_norm, rule_stack_product, rule_sqrt_squared, rule_sum_stack)
