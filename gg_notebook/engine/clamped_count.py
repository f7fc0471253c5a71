"""A clamped count read as the count, under one recorded assumption (never a proof).

A mean over the kept elements divides by their number ``c``: the sequential program (e.g.
``F.cross_entropy(..., ignore_index=-100)``, or ``(x * keep).sum() / keep.sum()``) divides by
``c`` itself and is 0/0 = NaN when nothing is kept, while ranks often guard the division:
``loss.sum() / valid.sum().clamp(min=1)`` (also ``torch.clamp_min(c, 1)``, ``c.clamp(1)``,
``torch.maximum(c, torch.ones_like(c))``). The two are the same value exactly when ``c >= 1``.

That is not an identity, so no lemma says it. `lookup` below lets the sequential ``num / c`` be
the ranks' ``num / clamp(c, min=m)`` only when

* ``c`` is a count: the full sum of a boolean tensor (or of a cast of one) - an integer >= 0, and
  exact in the count's dtype for the number of elements summed;
* the clamp only raises the value to ``0 < m <= 1`` (no ``max``), so it is ``c`` whenever ``c >= 1``;
* the sequential program divides by that same count (the lookup is asked for ``num / c``, with
  ``c`` the relation of the sequential divisor, and finds the ranks' ``num / clamp(c)``);

and records the assumption ``c >= 1``. `assumptions` lists the recorded ones that a final relation
uses, in plain words (``Result.assumptions``: the verdict is then at most "assumed"), and
`holds_on` tells the concrete checks which simulated inputs satisfy them (inputs that violate an
assumption are not drawn as counterexamples: there the programs are known to differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gg_notebook.relations.expr import Expr, ShapeError, infer_shape, untyped, walk

aten = torch.ops.aten

_DIVS = (aten.div.Tensor,)
_CASTS = ("aten._to_copy.default", "prims.convert_element_type.default", "aten.to.dtype")
_COMPARE = {"aten.ne.Scalar": "!=", "aten.eq.Scalar": "==", "aten.ge.Scalar": ">=", "aten.gt.Scalar": ">",
            "aten.le.Scalar": "<=", "aten.lt.Scalar": "<"}


@dataclass
class ClampedCount:
    count: object  # the count's DVal (c)
    clamp: object  # the clamp's DVal (clamp(c, min=m))
    div: object  # the ranks' num / clamp(c) DVal: the relation that relies on c >= 1
    low: float  # m
    text: str


def _exact_ints(dtype: torch.dtype) -> int:
    if not dtype.is_floating_point:
        return torch.iinfo(dtype).max
    return 2 ** {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}.get(dtype, 0)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _strip(e: Expr) -> Expr:
    """``e`` without views and dtype casts (the same elements, in order)."""
    while True:
        if e.op == "view":
            e = e.args[0]
        elif e.op == "call" and e.attrs.kind == "ew" and e.attrs.name in _CASTS and len(e.args) == 1:
            e = e.args[0]
        else:
            return e


def _indicator(x: Expr) -> Expr | None:
    """The boolean tensor whose number of True elements ``x`` sums: ``x`` itself, or a cast of it."""
    b = x
    while b.dtype != torch.bool:
        if b.op == "view":
            b = b.args[0]
        elif b.op == "call" and b.attrs.kind == "ew" and b.attrs.name in _CASTS and len(b.args) == 1:
            b = b.args[0]
        else:
            return None
    return b


def count_of(c: Expr) -> list[Expr] | None:
    """The boolean tensors ``[b]`` if ``c`` is ``sum(b)`` over every dim (possibly of a cast of ``b``),
    or ``[b0, b1, ...]`` if ``c`` is the all-reduced sum of such counts (a mask sharded over the
    ranks): a 0-dim count of True elements, exact in ``c``'s dtype; else None."""
    if c.op == "accum" and c.attrs == "sum" and c.args and tuple(c.shape) == ():
        parts = [count_of(a) if a.dtype == c.dtype else None for a in c.args]
        if any(p is None for p in parts):
            return None
        bs = [b for p in parts for b in p]
        if c.dtype is None or sum(_numel(b.shape) for b in bs) > _exact_ints(c.dtype):
            return None
        return bs
    if c.op != "call" or c.attrs.kind != "reduce" or len(c.args) != 1 or tuple(c.shape) != ():
        return None
    spec = c.attrs
    if spec.param("fn") != "sum" or spec.param("keepdim") is not False:
        return None
    x = c.args[0]
    nd = len(x.shape)
    dims = spec.param("dims")
    if dims is None or sorted(d % max(nd, 1) for d in dims) != list(range(nd)):
        return None
    if c.dtype is None or c.dtype == torch.bool or c.dtype.is_complex or _numel(x.shape) > _exact_ints(c.dtype):
        return None
    b = _indicator(x)
    return None if b is None else [b]


def _number(v):
    v = untyped(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _ground_value(e: Expr) -> torch.Tensor | None:
    if not e.ground:
        return None
    from gg_notebook.relations.expr import evaluate

    try:
        return evaluate(e, lambda x: (_ for _ in ()).throw(ValueError("not ground")))
    except Exception:  # noqa: BLE001 - not evaluable: not a constant we can read
        return None


def clamp_low(u: Expr, c: Expr) -> float | None:
    """``m`` if term ``u`` is ``c`` clamped from below to ``m`` (no upper bound), with ``0 < m <= 1``."""
    if u.op != "call" or u.attrs.kind != "ew" or not u.args or tuple(u.shape) != ():
        return None
    spec = u.attrs
    t = spec.target
    if t is aten.maximum.default and len(u.args) == 2 and u.args[1].id == c.id:
        u_args = (u.args[1], u.args[0])  # commutative: the operands in canonical order
    else:
        u_args = u.args
    if u_args[0].id != c.id:
        return None
    if t is aten.clamp.default and len(u.args) == 1:
        if spec.arg("max", None) is not None:
            return None
        m = _number(spec.arg("min", None))
    elif t is aten.clamp_min.default and len(u.args) == 1:
        m = _number(spec.arg("min", None))
    elif t is aten.maximum.default and len(u.args) == 2:
        v = _ground_value(u_args[1])
        if v is None or v.numel() != 1 or v.dtype == torch.bool or v.is_complex():
            return None
        m = float(v.reshape(()))
    else:
        return None
    if m is None or not (0.0 < m <= 1.0):
        return None
    if u.dtype.is_floating_point and sum(_numel(b.shape) for b in count_of(c)) > _exact_ints(u.dtype):
        return None  # the clamped count is a float that may not hold c exactly
    return m


def _base_atom(e: Expr) -> Expr | None:
    """The global input ``e`` is a piece of (views and slices of one input), else None."""
    while e.op in ("view", "slice"):
        e = e.args[0]
    return e if e.op == "atom" else None


def _describe(bs: list[Expr]) -> str:
    """Plain words for "some b holds somewhere": ``at least one element of target is != -100``."""
    said = set()
    for b in bs:
        s = _strip(b)
        if s.op == "call" and s.attrs.name in _COMPARE and len(s.args) == 1:
            base = _base_atom(_strip(s.args[0]))
            other = s.attrs.arg("other", None)
            if base is None or _number(other) is None:
                return "the count the mean divides by is at least 1"
            said.add(f"at least one element of {base.attrs[0]} is {_COMPARE[s.attrs.name]} {untyped(other)}")
        elif _base_atom(s) is not None:
            said.add(f"at least one element of {_base_atom(s).attrs[0]} is True")
        else:
            return "the count the mean divides by is at least 1"
    return said.pop() if len(said) == 1 else "the count the mean divides by is at least 1"


def _where(d) -> str:
    srcs = []
    for r, n in d.locations:
        if n.source and n.source not in srcs:
            srcs.append(n.source)
    return ", ".join(srcs) if srcs else "a rank"


def lookup(engine, spec, terms: list[Expr]) -> Expr | None:
    """The ranks' ``num / clamp(c, min=m)`` for the sequential ``num / c`` (see the module docstring),
    with the assumption ``c >= 1`` recorded on ``engine``; None when anything does not fit."""
    if spec.target not in _DIVS or len(terms) != 2 or spec.arg("rounding_mode", None) is not None:
        return None
    num, den = terms
    bs = count_of(den)
    if bs is None:
        return None
    index = engine.index
    count = index.realized(den)
    if count is None:
        return None
    try:
        _, want = infer_shape(spec, ((num.shape, num.dtype), (den.shape, den.dtype)))
    except ShapeError:
        return None
    for u in index.users_of(den):
        low = clamp_low(u, den)
        if low is None:
            continue
        clamp = index.realized(u)
        if clamp is None:
            continue
        try:
            _, dtype = infer_shape(spec, ((num.shape, num.dtype), (u.shape, u.dtype)))
        except ShapeError:
            continue
        if dtype != want:
            continue
        t = engine.store.find("call", spec, (num, u), dtype)
        d = index.realized(t) if t is not None else None
        if d is None:
            continue
        clamp_src = _where(clamp)
        text = (f"{_describe(bs)} (the count the mean divides by is >= 1): where it is 0, the "
                f"specification divides by a count of 0 (0/0 = NaN) and the ranks divide by the count clamped "
                f"to {low:g} instead (at {clamp_src})")
        recorded = engine.__dict__.setdefault("clamped_counts", {})
        recorded.setdefault(d.id, ClampedCount(count, clamp, d, low, text))
        return index.ref(d)
    return None


def used(engine) -> list[ClampedCount]:
    """The recorded clamped counts whose division a final relation of some sequential node uses."""
    recorded = getattr(engine, "clamped_counts", None)
    if not recorded:
        return []
    ref_ids = {}
    for d_id, cc in recorded.items():
        ref_ids[engine.index.ref(cc.div).id] = cc
    out = []
    seen = set()
    for cands in engine.relations.values():
        for c in cands:
            for x in walk(c.expr):
                cc = ref_ids.get(x.id)
                if cc is not None and id(cc) not in seen:
                    seen.add(id(cc))
                    out.append(cc)
    return out


def assumptions(engine) -> list[str]:
    """`Result.assumptions` entries: one per clamped count a relation relies on."""
    return sorted({cc.text for cc in used(engine)})


def holds_on(engine, sim) -> bool:
    """Do the simulated inputs ``sim`` satisfy every assumption a relation relies on (each count,
    as the ranks computed it, is at least 1)?"""
    for cc in used(engine):
        for r, n in cc.count.locations:
            v = sim.ranks[r].get(n.name) if r < len(sim.ranks) else None
            if v is None:
                continue
            if not bool((v >= 1).all()):
                return False
    return True
