"""Rules of the pointwise normal form for 2-norms and the clip coefficient ``min(1, c)`` (real mode
only, like the whole normal form).

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

from gg_notebook.ir.pointwise_normal import applies_to

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


@applies_to(aten.linalg_vector_norm.default)
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


@applies_to(aten.mul.Tensor)
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


@applies_to(aten.mul.Tensor)
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


@applies_to(aten.sum.default)
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


# ------------------------------------------------------------------------ the clip coefficient
# ``min(1, c)`` is spelled ``torch.clamp(c, max=1.0)`` (clip_grad_norm_), ``c.clamp_max(1.0)``,
# ``torch.minimum(c, torch.ones(()))``, ``torch.where(c > 1, 1.0, c)``: all are rewritten to
# ``clamp(c, None, 1.0)`` (and ``max(lo, c)`` spellings to ``clamp(c, lo, None)``). Only the
# ``where`` forms that also agree on NaN are taken: ``where(c > k, k, c)``, ``where(c >= k, k, c)``
# (NaN > k is False: both give NaN) for the upper bound, ``where(c < k, k, c)``, ``where(c <= k, k, c)``
# for the lower one; ``where(c < k, c, k)`` gives k on NaN where clamp gives NaN, and is left alone.

_FILL_LIKE = {aten.ones_like.default: 1, aten.zeros_like.default: 0}
_FILL_NEW = {aten.ones.default: 1, aten.zeros.default: 0}


def _through_copy(n):
    while _call(n, aten.detach.default, aten.lift_fresh_copy.default, aten.clone.default, aten.alias.default):
        n = n.args[0]
    return n


def _fill(rw, n):
    """The number every element of node ``n`` holds, if ``n`` is a constant fill, else None."""
    if _is_number(n):
        return n
    n = _through_copy(n)
    if not isinstance(n, fx.Node):
        return None
    if n.op == "get_attr":
        v = getattr(rw.gm, n.target, None)
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
            return v.item()
        return None
    if n.op != "call_function":
        return None
    if n.target in _FILL_LIKE or n.target in _FILL_NEW:
        return _FILL_LIKE.get(n.target, _FILL_NEW.get(n.target))
    if n.target is aten.full_like.default and len(n.args) >= 2 and _is_number(n.args[1]):
        return n.args[1]
    if n.target is aten.full.default and len(n.args) >= 2 and _is_number(n.args[1]):
        return n.args[1]
    if n.target is aten.scalar_tensor.default and n.args and _is_number(n.args[0]):
        return n.args[0]
    return None


def _number_like(x, c):
    """``c`` as the Python number ``clamp`` takes on ``x``'s dtype (a float on a floating ``x``)."""
    return float(c) if _dtype(x) in _REAL else c


def _bound_ok(x, n) -> bool:
    """``n`` has the shape and dtype of ``x``, a real floating tensor (a fill does not broadcast
    the result to a larger shape)."""
    return _dtype(x) in _REAL and _dtype(n) == _dtype(x) and _shape(n) == _shape(x) and _shape(x) is not None


def _exact_in(x, c) -> bool:
    """Is the number ``c`` exactly a value of ``x``'s dtype (then comparing in either dtype agrees)?"""
    try:
        return torch.tensor(c, dtype=_dtype(x)).item() == c
    except (TypeError, RuntimeError, OverflowError):
        return False


def _emit_clamp(rw, n, x, lo, hi, rule):
    lo = None if lo is None else _number_like(x, lo)
    hi = None if hi is None else _number_like(x, hi)
    if (lo is not None and hi is not None) or any(b is not None and not _exact_in(x, b) for b in (lo, hi)):
        return False
    return rw.replace(n, rw.emit(n, n, aten.clamp.default, (x, lo, hi)), rule)


@applies_to(aten.clamp_max.default, aten.clamp_min.default, aten.clamp.default, aten.minimum.default,
            aten.maximum.default, aten.where.self)
def rule_clamp_forms(rw, n: fx.Node) -> bool:
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return False
    t = n.target
    if t in (aten.clamp_max.default, aten.clamp_min.default) and len(n.args) == 2 and not n.kwargs:
        x, c = n.args
        if not isinstance(x, fx.Node) or not _is_number(c) or not _bound_ok(x, n):
            return False
        lo, hi = (c, None) if t is aten.clamp_min.default else (None, c)
        return _emit_clamp(rw, n, x, lo, hi, "clamp-one-bound")
    if t is aten.clamp.default and len(n.args) == 3 and not n.kwargs:
        x, lo, hi = n.args
        if not isinstance(x, fx.Node) or _dtype(x) not in _REAL:
            return False
        ints = [b for b in (lo, hi) if b is not None and isinstance(b, int) and not isinstance(b, bool)]
        if not ints or (lo is not None and not _is_number(lo)) or (hi is not None and not _is_number(hi)):
            return False
        if lo is not None and hi is not None:
            return False
        return _emit_clamp(rw, n, x, lo, hi, "clamp-float-bound")
    if t in (aten.minimum.default, aten.maximum.default) and len(n.args) == 2 and not n.kwargs:
        for x, k in (n.args, n.args[::-1]):
            c = _fill(rw, k)
            if isinstance(x, fx.Node) and c is not None and _bound_ok(x, n):
                lo, hi = (c, None) if t is aten.maximum.default else (None, c)
                return _emit_clamp(rw, n, x, lo, hi, "min-max-as-clamp")
        return False
    if t is aten.where.self and len(n.args) == 3 and not n.kwargs:
        cond, a, b = n.args
        if not _call(cond, aten.gt.Scalar, aten.ge.Scalar, aten.lt.Scalar, aten.le.Scalar) \
                or len(cond.args) != 2 or cond.kwargs:
            return False
        x, k = cond.args
        c = _fill(rw, a)
        if b is not x or not _is_number(k) or c is None or c != k or not _bound_ok(x, n):
            return False
        if isinstance(a, fx.Node) and (_dtype(a) != _dtype(x) or len(_shape(a) or ()) > len(_shape(x))):
            return False
        upper = cond.target in (aten.gt.Scalar, aten.ge.Scalar)  # where(x > k, k, x) = min(x, k)
        return _emit_clamp(rw, n, x, None if upper else c, c if upper else None, "where-as-clamp")
    return False


RULES = RULES + (rule_clamp_forms,)
