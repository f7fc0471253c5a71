"""Reductions of a loss, and the per-row factors of its gradient, however the ranks spell them.

A loss with ``reduction="sum"`` / ``"mean"`` is a *full* reduction of the per-token loss. The
ranks compute the per-token loss in their own shape (Megatron: ``[batch, seq]``; others flatten to
``[batch * seq]``) and reduce it as they like: ``losses.mean()``, ``losses.view(-1).mean()``,
``torch.mean(losses, dim=(0, 1))``, ``losses.sum() / losses.numel()``. A full reduction does not
depend on the shape the elements are viewed in, so `FullReduce` (a synthetic operator the loss
lemmas emit) is matched by `match_full_reduce` against any full reduction of any view of the rank's
per-token value.

The gradient of such a loss scales every row of ``softmax - onehot`` by the upstream gradient:
``g`` (none), ``g`` broadcast (sum), ``g / total_weight`` (mean). In ``torch.autograd.grad(loss,
...)`` that factor is input-independent (``g = 1``, ``total_weight = number of tokens``), and the
ranks compute it their own way (``mean``'s backward: ``expand(1) / N``). `ScaleRows` is matched by
`match_scale_rows` against a rank's ``mul`` of the same value by an input-independent factor that
is equal *by value* (computed exactly, in the dtype both sides use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gg_notebook.lemmas.base import register_matcher
from gg_notebook.relations.expr import Expr, OpSpec, Slot, evaluate

_FULL_FNS = ("sum", "mean")


@dataclass(frozen=True)
class FullReduce:
    """The sum / mean of every element (a 0-dim tensor of the input's dtype)."""

    fn: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum() if self.fn == "sum" else x.mean()


def full_reduce_spec(fn: str) -> OpSpec:
    if fn not in _FULL_FNS:
        raise ValueError(f"full reduction {fn!r}: expected one of {_FULL_FNS}")
    return OpSpec("full_reduce", f"full_{fn}", FullReduce(fn), ((Slot(0),), ()), (("fn", fn), ("blame", "consumer")))


@dataclass(frozen=True)
class ScaleRows:
    """``x * g``, ``g`` broadcast against ``x`` (the per-row factor of a loss gradient)."""

    def __call__(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * g


def scale_rows_spec() -> OpSpec:
    return OpSpec("scale_rows", "scale_rows", ScaleRows(), ((Slot(0), Slot(1)), ()), (("blame", "consumer"),))


# ---------------------------------------------------------------------------------- matching
def ground_value(e: Expr, engine=None) -> torch.Tensor | None:
    """The value of an input-independent expression (None if it depends on inputs or fails).
    With an ``engine``, ``e`` may be a relation: its refs are read as the terms they stand for."""
    if engine is not None and hasattr(engine, "to_term"):
        e = engine.to_term(e)
    if not e.ground:
        return None

    def leaf(_x):
        raise ValueError("not ground")

    try:
        return evaluate(e, leaf)
    except Exception:  # noqa: BLE001 - not evaluable: no value to compare
        return None


def _view_family(index, x: Expr, depth: int = 2) -> list[Expr]:
    """Terms holding the elements of ``x`` in the same (row-major) order: the base it is a view
    of, and the realized views of that base (a view never reorders elements)."""
    base = x
    while base.op == "view":
        base = base.args[0]
    out, seen, frontier = [], set(), [base]
    for _ in range(depth + 1):
        nxt = []
        for e in frontier:
            if e.id in seen:
                continue
            seen.add(e.id)
            out.append(e)
            nxt.extend(u for u in index.users_of(e) if u.op == "view")
        frontier = nxt
    if x.id not in seen:
        out.insert(0, x)
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _is_full_reduce(u: Expr, c: Expr, fn: str) -> bool:
    """``u`` is the ``fn`` (sum/mean) of every element of ``c``, in ``c``'s dtype."""
    if u.op != "call" or u.attrs.kind != "reduce" or len(u.args) != 1 or u.args[0].id != c.id:
        return False
    spec = u.attrs
    if spec.param("fn") != fn or spec.param("keepdim") is not False or u.dtype != c.dtype:
        return False
    nd = len(c.shape)
    dims = spec.param("dims")
    if dims is None or sorted(d % max(nd, 1) for d in dims) != list(range(nd)):
        return False
    return spec.arg("dtype", None) in (None, c.dtype)


def _is_division_by(w: Expr, num: Expr, n: int) -> bool:
    """``w`` is ``num / n`` (true division by the number ``n``, written as a Python number or an
    input-independent tensor equal to it)."""
    if w.op != "call" or not w.args or w.args[0].id != num.id or w.dtype != num.dtype:
        return False
    name = w.attrs.name
    if name not in ("aten.div.Scalar", "aten.div.Tensor"):
        return False  # (div.Tensor_mode rounds)
    if len(w.args) == 1:
        other = w.attrs.arg("other")
        return isinstance(other, (int, float)) and not isinstance(other, bool) and other == n
    if len(w.args) == 2:
        v = ground_value(w.args[1])
        return v is not None and v.numel() == 1 and float(v.reshape(())) == float(n)
    return False


def match_full_reduce(engine, spec: OpSpec, args: tuple) -> Expr | None:
    """A rank value equal to the full sum / mean of ``args[0]`` (any view of it reduced whole; a
    mean also as the full sum divided by the number of elements)."""
    (x_rel,) = args
    fn = spec.param("fn")
    index = engine.index
    x_t = engine.to_term(x_rel)
    n = _numel(x_t.shape)
    for c in _view_family(index, x_t):
        for u in index.users_of(c):
            if _is_full_reduce(u, c, fn):
                d = index.realized(u)
                if d is not None and tuple(u.shape) == ():
                    return index.ref(d)
            if fn == "mean" and _is_full_reduce(u, c, "sum"):
                for w in index.users_of(u):
                    if _is_division_by(w, u, n) and tuple(w.shape) == ():
                        d = index.realized(w)
                        if d is not None:
                            return index.ref(d)
    return None


def _equal_broadcast(a: torch.Tensor, b: torch.Tensor, shape: tuple) -> bool:
    """``broadcast_to(a, shape) == broadcast_to(b, shape)`` elementwise, compared at the (smaller)
    broadcast shape of ``a`` and ``b``: broadcasting further only repeats elements of both alike."""
    try:
        if torch.broadcast_shapes(tuple(a.shape), tuple(b.shape), shape) != torch.Size(shape):
            return False
        common = torch.broadcast_shapes(tuple(a.shape), tuple(b.shape))
    except RuntimeError:
        return False
    return torch.equal(torch.broadcast_to(a, common), torch.broadcast_to(b, common))


def match_scale_rows(engine, spec: OpSpec, args: tuple) -> Expr | None:
    """A rank value ``x * f`` with ``f`` input-independent and equal, by value and broadcast to
    ``x``'s shape, to the factor ``args[1]`` (itself input-independent)."""
    x_rel, g_rel = args
    gv = ground_value(g_rel, engine)
    if gv is None:
        return None
    index = engine.index
    x_t = engine.to_term(x_rel)
    shape = tuple(x_t.shape)
    try:
        torch.broadcast_shapes(tuple(gv.shape), shape)
    except RuntimeError:
        return None
    for c in _view_family(index, x_t, depth=1):
        if not _same_elements_broadcast(tuple(c.shape), shape):
            continue
        for u in index.users_of(c):
            if (u.op != "call" or u.attrs.name != "aten.mul.Tensor" or len(u.args) != 2
                    or tuple(u.shape) != shape or u.dtype != x_t.dtype):
                continue
            a, b = u.args
            f = b if a.id == c.id else a if b.id == c.id else None
            if f is None or f.id == c.id:
                continue
            fv = ground_value(f)
            if fv is None or fv.dtype != gv.dtype:
                continue
            if _equal_broadcast(fv, gv, shape):
                d = index.realized(u)
                if d is not None:
                    r = index.ref(d)
                    return r if c.id == x_t.id else engine.store.view(r, shape)
        if not getattr(engine, "bitwise", False):
            for u in index.users_of(c):  # x / n for the factor 1 / n (real-only: x / n != x * fl(1 / n))
                if tuple(u.shape) != shape or u.dtype != x_t.dtype or not _divides_by_reciprocal(u, c, gv):
                    continue
                d = index.realized(u)
                if d is not None:
                    r = index.ref(d)
                    return r if c.id == x_t.id else engine.store.view(r, shape)
    return None


def _same_elements_broadcast(c_shape: tuple, shape: tuple) -> bool:
    """Is a tensor of ``c_shape`` broadcast to ``shape`` its own row-major view to ``shape``: the same
    shape, or only leading dims of size 1 added (``[N, V]`` read as ``[1, N, V]``, as a lowering that
    drops a leading unsqueeze before a broadcasting multiply leaves it)? Then an elementwise operator
    of result ``shape`` reads a view-family member ``c`` element for element as ``x``."""
    k = len(shape) - len(c_shape)
    return k >= 0 and shape[k:] == c_shape and all(s == 1 for s in shape[:k])


def _divides_by_reciprocal(u: Expr, c: Expr, gv: torch.Tensor) -> bool:
    """``u`` is ``c / f`` (true division) with ``f`` an input-independent uniform number whose
    reciprocal, rounded to ``gv``'s dtype, is every element of ``gv``."""
    if u.op != "call" or u.attrs.name not in ("aten.div.Tensor", "aten.div.Scalar") or not u.args:
        return False
    if u.args[0].id != c.id or u.attrs.arg("rounding_mode", None) is not None:
        return False
    if len(u.args) == 1:
        f = u.attrs.arg("other")
        if isinstance(f, bool) or not isinstance(f, (int, float)):
            return False
        fv = float(f)
    elif len(u.args) == 2:
        v = ground_value(u.args[1])
        if v is None or v.numel() != 1:
            return False
        fv = float(v.reshape(()))
    else:
        return False
    if fv == 0 or gv.numel() == 0 or not gv.dtype.is_floating_point:
        return False
    flat = gv.reshape(-1)
    if not bool((flat == flat[0]).all()):
        return False
    recip = torch.tensor(1.0, dtype=torch.float64) / torch.tensor(fv, dtype=torch.float64)
    return bool(recip.to(gv.dtype) == flat[0])


register_matcher("full_reduce", match_full_reduce)
register_matcher("scale_rows", match_scale_rows)

