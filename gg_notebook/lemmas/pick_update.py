"""``x[arange, ids] -= u`` over a vocabulary split (ir/pick_update.py fuses the read-modify-write).

``pick-update-over-split``::

    pick_update[op](concat_k(x_k, dim=1), ids, u) = concat_k(pick_update_shard[op, start_k](x_k, ids, u), dim=1)

where ``pick_update_shard[op, s](x_k, ids, u)`` updates column ``ids - s`` of the rows whose id falls in
shard k (``[s, s + width_k)``) and leaves every other row as it is. Bit for bit: each element is
either the same ``x op u`` or the same ``x``.

The matcher relates a piece to a rank's own ``pick_update(x_k, j, v)`` (Megatron's backward:
``j`` = the masked shard-local target, ``v`` = ``1 - target_mask``) by evaluating ``j`` and ``v`` on
*every* id of the domain (domain.py): for in-shard ids ``j = id - s`` and ``v = u``; for out-of-shard
ids ``v`` must leave the element unchanged bit for bit (``x - (+0.0)``, ``x + (-0.0)``), whatever
column ``j`` names (the lowering proved it in range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gg_notebook.ir.pick_update import PickUpdate, pick_update_spec
from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, register, register_matcher
from gg_notebook.lemmas.domain import agree_where, eval_on_domain
from gg_notebook.relations.domains import IdDomain
from gg_notebook.relations.expr import Expr, ExprStore, OpSpec, Slot


@dataclass(frozen=True)
class PickUpdateShard:
    """Shard ``[start, start + width)`` of ``pick_update[op]`` over the full class range."""

    op: str
    start: int

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        local = ids.reshape(-1, 1) - self.start
        hot = (local == torch.arange(width, device=x.device)) & (local >= 0) & (local < width)
        upd = x - u.reshape(-1, 1) if self.op == "sub" else x + u.reshape(-1, 1)
        return torch.where(hot, upd, x)


def pick_update_shard_spec(op: str, start: int, width: int, domain: IdDomain) -> OpSpec:
    return OpSpec("pick_update_shard", f"pick_update_shard[{op}, {start}:+{width}]", PickUpdateShard(op, start),
                  ((Slot(0), Slot(1), Slot(2)), ()),
                  (("op", op), ("start", start), ("width", width), ("domain", domain), ("blame", "consumer")))


def pick_update_over_split(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple, ctx=None):
    if spec.kind != "pick_update" or not isinstance(spec.target, PickUpdate) or len(args) != 3:
        return
    x, ids, u = args
    if len(x.shape) != 2 or x.op != "cat" or x.attrs not in (1, -1) or len(x.args) < 2:
        return
    if ids.dtype not in (torch.int64, torch.int32) or tuple(ids.shape) != (x.shape[0],):
        return
    classes = x.shape[1]
    accepted = IdDomain.range(0, classes)
    domain = accepted if ctx is None else ctx.domain_of(ids, accepted, "index of x[arange, ids] -= u")
    outs, off = [], 0
    for piece in x.args:
        w = piece.shape[1]
        outs.append(S.call(pick_update_shard_spec(spec.target.op, off, w, domain), [piece, ids, u]))
        off += w
    yield S.cat(outs, 1)


def _cases(rng):
    for k in range(6):
        rows, v = C.dims(rng), C.dims(rng, 4, 12)
        dtype = (torch.float64, torch.float32, torch.float64, torch.bfloat16, torch.float64, torch.float32)[k]
        op = "sub" if k % 2 == 0 else "add"
        x = C.randn(rng, rows, v).to(dtype)
        if k == 2:
            x[0] = float("-inf")
            x[1, 0] = -0.0
        t = torch.randint(0, v, (rows,), generator=rng)
        t[0] = v - 1
        u = C.randn(rng, rows).to(dtype)
        if k == 4:
            u[0] = float("nan")
        yield C.make_case(pick_update_spec(op), [x, t, u], rng, split={0: 1},
                          description=f"x[arange, ids] {'-' if op == 'sub' else '+'}= u over classes split in uneven shards ({dtype})")
    # declines: x not split along the classes (split along the rows) -> no plan
    x = C.randn(rng, 6, 5)
    t = torch.randint(0, 5, (6,), generator=rng)
    yield C.make_case(pick_update_spec("sub"), [x, t, C.randn(rng, 6)], rng, split={0: 0},
                      description="split along the rows: declines")


register(Lemma(
    name="pick-update-over-split",
    statement="pick_update(concat_k(x_k, 1), ids, u) = concat_k(pick_update_shard_k(x_k, ids, u), 1)",
    kinds=("pick_update",),
    plans=pick_update_over_split,
    cases=_cases,
    conditions=("x concatenated along the classes (dim 1)", "ids in [0, C) (proved by the lowering)"),
    bitwise_safe=True,
    priority=40,
    needs_context=True,
))


def _ground(e: Expr) -> torch.Tensor | None:
    """The value of an input-independent term. A uniform constant may be held as one element
    (``full`` folded to a scalar); a view of such a value is that element broadcast."""
    import math

    from gg_notebook.relations.expr import apply_op, fold

    def node(x: Expr, vals):
        if x.op in ("atom", "ref"):
            raise ValueError("not ground")
        if x.op == "view" and vals[0].numel() == 1 and math.prod(x.attrs) != 1:
            return vals[0].reshape(()).expand(tuple(x.attrs))
        return apply_op(x.op, x.attrs, vals)

    if not e.ground:
        return None
    try:
        return fold(e, node)
    except Exception:  # noqa: BLE001 - not evaluable: no value to compare
        return None


def _uniform(e: Expr):
    v = _ground(e)
    if v is None or v.numel() == 0:
        return None
    flat = v.reshape(-1)
    same = (flat == flat[0]) | (flat.isnan() & flat[0].isnan())
    return flat[0] if bool(same.all()) and bool((flat.signbit() == flat[0].signbit()).all()) else None


def _on_domain(term: Expr, base: Expr, domain: torch.Tensor):
    """``term`` (one value per id) evaluated on every id of the domain: [K], or None."""
    if term.ground:
        c = _uniform(term)
        return None if c is None else c.expand(domain.shape[0])
    v = eval_on_domain(term, base, domain)
    if v is None or tuple(v.shape) != tuple(domain.shape):
        return None
    return v


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool((((a == b) & (a.signbit() == b.signbit())) | (a.isnan() & b.isnan())).all())


def match_pick_update_shard(engine, spec: OpSpec, args: tuple) -> Expr | None:
    """A rank value ``pick_update[op](x_k, j, v)`` equal to the shard piece on every id of the domain."""
    x_rel, t_rel, u_rel = args
    x_t, t_t, u_t = engine.to_term(x_rel), engine.to_term(t_rel), engine.to_term(u_rel)
    op, start, width = spec.param("op"), spec.param("start"), spec.param("width")
    if tuple(x_t.shape[1:]) != (width,) or not x_t.dtype.is_floating_point:
        return None
    domain = spec.param("domain").values(t_t.dtype)
    base = t_t
    while base.op == "view":
        base = base.args[0]
    want_u = _on_domain(u_t, base, domain)
    if want_u is None or want_u.dtype != x_t.dtype:
        return None
    local = domain - start
    inside = (local >= 0) & (local < width)
    keep = torch.zeros((), dtype=x_t.dtype)  # x - (+0.0) and x + (-0.0) are x, bit for bit
    if op == "add":
        keep = -keep
    index = engine.index
    for w in index.users_of(x_t):
        if w.op != "call" or w.attrs.kind != "pick_update" or w.attrs.param("op") != op or len(w.args) != 3:
            continue
        if w.args[0].id != x_t.id or tuple(w.shape) != tuple(x_t.shape) or w.dtype != x_t.dtype:
            continue
        jv = eval_on_domain(w.args[1], base, domain)
        vv = _on_domain(w.args[2], base, domain)
        if jv is None or vv is None or tuple(jv.shape) != tuple(domain.shape) or vv.dtype != x_t.dtype:
            continue
        if not agree_where(jv, local, inside):
            continue
        if not _same_bits(vv[inside], want_u[inside]):
            continue
        if not _same_bits(vv[~inside], keep.expand(int((~inside).sum()))):
            continue
        d = index.realized(w)
        if d is not None:
            return index.ref(d)
    return None


register_matcher("pick_update_shard", match_pick_update_shard)
