"""The mean of a loss over the kept tokens: ``reduction='mean'`` with ``ignore_index``.

``nll_loss(x, t, ignore_index=i, reduction='mean')`` divides the sum of the per-token losses
(ignored positions contribute 0) by the number of targets different from ``i`` (its
``total_weight``). That count depends on the data; the ranks compute it from the replicated targets
in their own spelling: ``(t != i).float().sum()``, ``t.ne(i).sum()``, ``(t.view(-1) != i).to(dtype)
.sum()``, ``keep.sum()`` of a mask they also multiply the loss with... `CountKept` is that number as
a synthetic operator; `match_count_kept` relates it to a rank value that is a *full sum* of a
per-position function of the targets that is 1 exactly where ``t != i`` and 0 elsewhere, checked on
every id of the targets' domain (domain.py): a proof over all target tensors, since the sum of a
per-position 0/1 indicator is the count whatever the positions hold.

The division itself is the rank's own ``div`` of the two, so the mean is matched term for term:
``sum(loss * keep) / keep.sum()``. When every target is ignored the count is 0 and the mean is
0 / 0 = NaN, on both sides; a rank that clamps the count (``keep.sum().clamp(min=1)``) returns 0
there instead and is *not* the same value: it is accepted only as "assumed", under the recorded
assumption that the count is at least 1 (engine/clamped_count.py), never as proved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gg_notebook.lemmas.base import register_matcher
from gg_notebook.lemmas.domain import eval_on_domain
from gg_notebook.relations.domains import IdDomain
from gg_notebook.relations.expr import Expr, OpSpec, Slot


@dataclass(frozen=True)
class CountKept:
    """The number of elements of ``t`` different from ``value``, as a 0-dim ``dtype`` tensor."""

    value: int
    dtype: torch.dtype

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return (t != self.value).sum().to(self.dtype)


def count_kept_spec(value: int, domain: IdDomain, dtype: torch.dtype) -> OpSpec:
    return OpSpec("count_kept", f"count_kept[{value}]", CountKept(value, dtype), ((Slot(0),), ()),
                  (("value", value), ("domain", domain), ("blame", "consumer")))


def _exact_ints(dtype: torch.dtype) -> int:
    """Every integer up to this is exactly representable in ``dtype``."""
    bits = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}.get(dtype, 0)
    return 2 ** bits


def _base(t: Expr) -> Expr:
    while t.op == "view":
        t = t.args[0]
    return t


def _is_full_sum(u: Expr, c: Expr) -> bool:
    if u.op != "call" or u.attrs.kind != "reduce" or len(u.args) != 1 or u.args[0].id != c.id:
        return False
    spec = u.attrs
    if spec.param("fn") != "sum" or spec.param("keepdim") is not False or tuple(u.shape) != ():
        return False
    nd = len(c.shape)
    dims = spec.param("dims")
    return dims is not None and sorted(d % max(nd, 1) for d in dims) == list(range(nd))


def match_count_kept(engine, spec: OpSpec, args: tuple) -> Expr | None:
    """A rank value equal to the number of targets ``!= value``: the full sum of a per-position
    0/1 (or boolean) function of the targets, 1 exactly on the kept ids of the whole domain."""
    (t_rel,) = args
    t_t = engine.to_term(t_rel)
    var = _base(t_t)
    value = spec.param("value")
    domain = spec.param("domain").values(t_rel.dtype)
    want = domain != value
    index = engine.index
    n = 1
    for s in var.shape:
        n *= s
    # elementwise functions of the targets, a few operators deep (compare, cast, views)
    frontier, seen = [var], set()
    for _ in range(5):
        nxt = []
        for e in frontier:
            for u in index.users_of(e):
                if u.id in seen or u.op not in ("view", "call"):
                    continue
                seen.add(u.id)
                if u.op == "call" and u.attrs.kind != "ew":
                    continue
                size = 1
                for s in u.shape:
                    size *= s
                if size != n:
                    continue
                nxt.append(u)
                sums = [w for w in index.users_of(u) if _is_full_sum(w, u)]
                if not sums:
                    continue
                kv = eval_on_domain(u, var, domain)
                if kv is None:
                    continue
                if kv.dtype == torch.bool:
                    ok = torch.equal(kv, want)
                else:
                    ok = torch.equal(kv, want.to(kv.dtype))
                if not ok:
                    continue
                for w in sums:
                    if w.dtype is None or not (w.dtype.is_floating_point or w.dtype in (torch.int64, torch.int32)):
                        continue
                    if w.dtype.is_floating_point and n > _exact_ints(w.dtype):
                        continue  # a float count that large may not be exact
                    if not w.dtype.is_floating_point and n > torch.iinfo(w.dtype).max:
                        continue
                    d = index.realized(w)
                    if d is not None:
                        return index.ref(d)
        frontier = nxt
    return None


register_matcher("count_kept", match_count_kept)
