"""One-hot masks of target ids, however a program builds them, decided over the whole id domain.

A vocabulary-parallel loss picks the target logit of each row. Besides ``x.gather(-1, idx)`` and
``x2d[arange, idx]`` (cross_entropy.py), programs write it as a masked one-hot product summed over
the classes::

    onehot = F.one_hot(idx, part).to(x.dtype) * in_range.unsqueeze(-1)   # eq(idx[..., None], arange)
    picked = (x * onehot).sum(-1)

and the gradient of the loss as ``softmax - onehot``. The mask ``M`` is a *row function* of the
targets: row ``k`` of ``M`` (its trailing dims) depends only on the target at position ``k``.
`eval_rows` checks that structurally and evaluates ``M`` on every id of the domain at once (one
row per id), so comparing it with the one-hot rows the identity needs is a proof over all ids, not
a test on the example targets (the same argument as `domain.eval_on_domain`, which is the special
case of an empty trailing shape).

The products are exact over the reals. In floating point ``x * 0`` is NaN for an infinite ``x``
(a ``-inf`` logit masked out), so the matchers answer only with ``exact="real"``.
"""

from __future__ import annotations

import math

import torch

from gg_notebook.relations.expr import Expr
from gg_notebook.lemmas.domain import _fresh_if_mutating

_SUM = "aten.sum.dim_IntList"


def _split(shape, n: int) -> int | None:
    """The smallest i with prod(shape[:i]) == n (the row prefix of ``shape``), or None."""
    p = 1
    if n == 1:
        return 0
    for i, s in enumerate(shape):
        p *= s
        if p == n:
            return i + 1
        if p > n or p == 0:
            return None
    return None


def _ground_value(x: Expr):
    from gg_notebook.lemmas.loss_reduce import ground_value

    return ground_value(x)


def eval_rows(term: Expr, var: Expr, values: torch.Tensor, max_elems: int = 1 << 22) -> torch.Tensor | None:
    """``term`` as a function of the rows of ``var``, evaluated with ``var``'s elements bound to
    ``values`` (1-D, one id per row): a tensor of shape ``[len(values)] + tail`` where ``term.shape
    = P + tail`` and ``prod(P) = var.numel()``. None unless ``term`` depends only on ``var`` and
    constants through operators that keep row k tied to element k of ``var``: elementwise
    operators whose non-constant operands share the row prefix (constants may vary only along the
    trailing dims), views that keep the row prefix's element count (row-major: a row stays a row),
    and expands of the trailing dims."""
    N = math.prod(var.shape)
    K = int(values.shape[0])
    memo: dict[int, tuple] = {}  # id -> (value [K] + tail, split index)
    vsplit = _split(tuple(var.shape), N)
    if vsplit is None:
        return None
    memo[var.id] = (values.reshape(K), vsplit)

    def go(x: Expr):
        hit = memo.get(x.id)
        if hit is not None:
            return hit
        shape = tuple(x.shape)
        i = _split(shape, N)
        if i is None or x.ground or x.op in ("atom", "ref", "const"):
            return None
        tail = shape[i:]
        if K * max(1, math.prod(tail)) > max_elems:
            return None
        if x.op == "view":
            a = go(x.args[0])
            if a is None:
                return None
            r = a[0].reshape((K,) + tail)
        elif x.op == "expand":
            src = x.args[0]
            a = go(src)
            if a is None or tuple(src.shape[:a[1]]) != shape[:i] or len(src.shape) - a[1] != len(tail):
                return None
            r = a[0].expand((K,) + tail)
        elif x.op == "call":
            spec = x.attrs
            if spec.kind != "ew" or spec.unique is not None or spec.out is not None:
                return None
            vals = []
            for a in x.args:
                if a.ground:
                    v = _ground_value(a)
                    if v is None:
                        return None
                    # right-aligned against ``shape``: it must not vary along the row prefix
                    nd = len(shape)
                    if v.dim() > nd:
                        return None
                    vs = (1,) * (nd - v.dim()) + tuple(v.shape)
                    if any(s != 1 for s in vs[:i]):
                        return None
                    vals.append(v.reshape((1,) + vs[i:]))
                    continue
                if len(a.shape) != len(shape) or tuple(a.shape[:i]) != shape[:i]:
                    return None
                av = go(a)
                if av is None or av[1] != i:
                    return None
                vals.append(av[0])
            try:
                r = spec.call(_fresh_if_mutating(spec, vals))
            except Exception:  # noqa: BLE001 - not evaluable row-wise
                return None
            if tuple(r.shape) != (K,) + tail:
                return None
        else:
            return None
        memo[x.id] = (r, i)
        return memo[x.id]

    out = go(term)
    return None if out is None else out[0]


def onehot_rows(domain: torch.Tensor, start: int, width: int, dtype, masked: bool) -> torch.Tensor:
    """Row k: one-hot of ``domain[k] - start`` over ``width`` classes where that id falls in
    ``[start, start + width)``; elsewhere zeros (``masked``) or the one-hot of the clamped id."""
    local = domain - start
    inside = (local >= 0) & (local < width)
    j = torch.arange(width)
    hot = local.unsqueeze(-1) == j
    if masked:
        hot = hot & inside.unsqueeze(-1)
    return hot.to(dtype)


def _other(u: Expr, x: Expr) -> Expr | None:
    a, b = u.args
    if a.id == x.id and b.id != x.id:
        return b
    if b.id == x.id and a.id != x.id:
        return a
    return None


def _is_row_mask_of(M: Expr, t: Expr, domain: torch.Tensor, start: int, x: Expr, dtype) -> str | None:
    """'masked' if ``M`` (same shape as ``x``) is the in-shard one-hot of ``t - start`` with rows
    of out-of-shard ids zero, 'inside' if it is right on in-shard ids only; else None."""
    if tuple(M.shape) != tuple(x.shape) or M.dtype != dtype:
        return None
    if math.prod(M.shape[:-1]) != math.prod(t.shape):
        return None
    width = x.shape[-1]
    mv = eval_rows(M, t, domain)
    if mv is None or tuple(mv.shape[1:]) != (width,):
        return None
    local = domain - start
    inside = (local >= 0) & (local < width)
    want = onehot_rows(domain, start, width, mv.dtype, masked=True)
    if torch.equal(mv, want):
        return "masked"
    if bool(inside.any()) and torch.equal(mv[inside], want[inside]):
        return "inside"
    return None


def onehot_picks(engine, x_t: Expr, t_t: Expr, domain: torch.Tensor, start: int):
    """Rank values ``sum_{-1}(x * M)`` with ``M`` a one-hot row mask of the targets: yields
    (term, kind), kind 'masked' (already zero outside the shard) or 'inside' (right in the shard
    only: a caller checks the masking that follows)."""
    if getattr(engine, "bitwise", False) or not x_t.dtype.is_floating_point:
        return
    index = engine.index
    last = len(x_t.shape) - 1
    for u in index.users_of(x_t):
        if u.op != "call" or u.attrs.name != "aten.mul.Tensor" or len(u.args) != 2:
            continue
        if tuple(u.shape) != tuple(x_t.shape) or u.dtype != x_t.dtype:
            continue
        M = _other(u, x_t)
        if M is None:
            continue
        kind = _is_row_mask_of(M, t_t, domain, start, x_t, x_t.dtype)
        if kind is None:
            continue
        for w in index.users_of(u):
            if w.op != "call" or w.attrs.name != _SUM or len(w.args) != 1 or w.dtype != u.dtype:
                continue
            spec = w.attrs
            if spec.param("dims") not in ((last,),) or spec.param("keepdim") is not False:
                continue
            if spec.arg("dtype", None) not in (None, u.dtype):
                continue
            yield w, kind


def onehot_subs(engine, p_t: Expr, t_t: Expr, domain: torch.Tensor, start: int):
    """Rank values ``p - M`` with ``M`` the in-shard one-hot row mask of the targets (zero rows
    for out-of-shard ids): the gradient of a cross-entropy over one vocabulary shard."""
    if getattr(engine, "bitwise", False) or not p_t.dtype.is_floating_point:
        return
    for u in engine.index.users_of(p_t):
        if u.op != "call" or u.attrs.name != "aten.sub.Tensor" or len(u.args) != 2 or u.args[0].id != p_t.id:
            continue
        if u.attrs.arg("alpha") != 1 or tuple(u.shape) != tuple(p_t.shape) or u.dtype != p_t.dtype:
            continue
        M = u.args[1]
        if M.id == p_t.id:
            continue
        if _is_row_mask_of(M, t_t, domain, start, p_t, p_t.dtype) == "masked":
            yield u
