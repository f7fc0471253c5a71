"""Attention masks, however they are spelled: additive 0/-inf masks, ``masked_fill(-inf)``, ``where``.

A causal (or any boolean) attention mask is written in at least four ways:

* ``scores + M`` with ``M = torch.triu(torch.full((S, S), -inf), 1)`` (an additive mask: every
  element 0 or -inf; ``M + scores`` too);
* ``scores.masked_fill(B, -inf)`` with ``B = ~torch.tril(torch.ones(S, S, dtype=bool))``
  (``masked_fill.Scalar``, or ``.Tensor`` with a -inf scalar tensor);
* ``torch.where(keep, scores, -inf)`` / ``torch.where(B, -inf, scores)``;
* inside ``F.scaled_dot_product_attention(is_causal=True)`` (decomposed to the masked_fill form,
  ir/decompose.py).

Over the reals (finite ``scores``), all of them are the same value: ``scores`` where the effective
boolean mask is False and -inf where it is True (``x + 0 = x``, ``x + -inf = -inf``). The masks
are input-independent values (relations/ground.py), so the effective mask is a concrete boolean
tensor, compared by value after broadcasting to the scores' shape (a ``[1, 1, S, S]`` mask and an
``[S, S]`` one, built with ``triu``, ``tril``, ``arange`` comparisons or a rank offset, are equal
when their elements are).

``neg-inf-mask`` rewrites any of these spec operators into one synthetic operator,
``masked_neg_inf(x, B)`` (kind ``neg_inf_mask``); ``neg-inf-mask-split`` applies it piecewise to a
concatenated ``x`` (slicing ``B`` along the same dim, or keeping it whole where it broadcasts); and
the matcher relates ``masked_neg_inf(x_r, B_r)`` to whatever a rank computes on ``x_r`` in any of the
spellings with an equal effective mask. Not bit-exact (``-0.0 + 0.0`` is ``+0.0``; ``inf + -inf`` is
NaN), so never used with exact="bitwise".
"""

from __future__ import annotations

import math

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, LemmaCase, register, register_matcher
from gg_notebook.relations.expr import Expr, ExprStore, OpSpec, ShapeError, Slot
from gg_notebook.relations.ground import broadcast_shapes, value_of

aten = torch.ops.aten
KIND = "neg_inf_mask"


def _masked_neg_inf(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with -inf where ``mask`` (broadcast to x's shape) is True."""
    return x.masked_fill(mask, float("-inf"))


MASK_SPEC = OpSpec(KIND, "masked_neg_inf", _masked_neg_inf, ((Slot(0), Slot(1)), ()))


def _is_neg_inf(v) -> bool:
    return isinstance(v, float) and math.isinf(v) and v < 0


def _all_neg_inf(t: torch.Tensor | None) -> bool:
    return (t is not None and t.dtype.is_floating_point and t.numel() > 0
            and bool(torch.isneginf(t).all()))


def _fits(mask: torch.Tensor, out_shape: tuple) -> bool:
    try:
        return broadcast_shapes(tuple(mask.shape), tuple(out_shape)) == tuple(out_shape)
    except RuntimeError:
        return False


def decode(spec: OpSpec, args, out_shape: tuple, out_dtype, val):
    """If ``spec(args)`` is "x with -inf where B" for a non-constant ``x`` of the output's shape and
    dtype and a constant boolean effective mask B: (slot of x, B as a bool tensor); else None.
    ``val(arg)`` is the value of a constant argument (None for any other)."""
    t = spec.target
    out_shape = tuple(out_shape)
    if out_dtype is None or not out_dtype.is_floating_point:
        return None

    def is_x(i):
        a = args[i]
        return val(a) is None and tuple(a.shape) == out_shape and a.dtype == out_dtype

    if t is aten.add.Tensor:
        alpha = spec.arg("alpha", 1)
        if isinstance(alpha, bool) or alpha != 1:
            return None
        a, b = spec.slot_of("self"), spec.slot_of("other")
        if a is None or b is None:
            return None
        for xi, mi in ((a, b), (b, a)):
            m = val(args[mi])
            if m is None or not is_x(xi) or m.dtype != out_dtype:
                continue
            neg = torch.isneginf(m)
            if not bool((neg | (m == 0)).all()) or not _fits(neg, out_shape):
                continue
            return xi, neg
        return None
    if t is aten.masked_fill.Scalar or t is aten.masked_fill.Tensor:
        xi, mi = spec.slot_of("self"), spec.slot_of("mask")
        if xi is None or mi is None or not is_x(xi):
            return None
        if t is aten.masked_fill.Scalar:
            if not _is_neg_inf(spec.arg("value")):
                return None
        else:
            vi = spec.slot_of("value")
            v = val(args[vi]) if vi is not None else None
            if v is None or v.dim() != 0 or not _all_neg_inf(v):
                return None
        m = val(args[mi])
        if m is None or m.dtype != torch.bool or not _fits(m, out_shape):
            return None
        return xi, m
    if t is aten.where.self:
        ci, ai, bi = spec.slot_of("condition"), spec.slot_of("self"), spec.slot_of("other")
        if ci is None or ai is None or bi is None:
            return None
        c = val(args[ci])
        if c is None or c.dtype != torch.bool or not _fits(c, out_shape):
            return None
        for xi, fi, mask in ((ai, bi, lambda c: c.logical_not()), (bi, ai, lambda c: c)):
            f = val(args[fi])
            if not is_x(xi) or not _all_neg_inf(f) or not _fits(f, out_shape):
                continue
            return xi, mask(c)
        return None
    return None


def _value_arg(to_term):
    def val(a: Expr):
        if not a.ground and a.op != "ref":
            return None
        return value_of(to_term(a)) if a.op == "ref" else value_of(a)
    return val


def _mask_node(S: ExprStore, mask: torch.Tensor) -> Expr | None:
    from gg_notebook.relations.ground import _value_node

    return _value_node(S, mask.contiguous())


# ---------------------------------------------------------------------------------- the lemmas
def neg_inf_mask(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple, ctx=None):
    to_term = getattr(ctx, "to_term", None) or (lambda e: e)
    if len(args) < 2 or any(a.dtype is None for a in args):
        return
    dtype = next((a.dtype for a in args if tuple(a.shape) == tuple(out_shape) and a.dtype.is_floating_point), None)
    memo = S.__dict__.setdefault("_neg_inf_masks", {})  # decoding a [S, S] mask is not free: once per mask
    val = _value_arg(to_term)
    # `decode` reads a non-constant operand only through its shape and dtype: every layer's scores
    # with the same mask share one decoded mask node
    key = (spec, tuple(("value", to_term(a).id) if val(a) is not None else ("x", tuple(a.shape), a.dtype)
                       for a in args), tuple(out_shape), dtype)
    if key not in memo:
        hit = decode(spec, args, out_shape, dtype, val)
        memo[key] = None if hit is None else (hit[0], _mask_node(S, hit[1]))
    hit = memo[key]
    if hit is None or hit[1] is None:
        return
    xi, node = hit
    try:
        yield S.call(MASK_SPEC, [args[xi], node])
    except ShapeError:
        return


def neg_inf_mask_split(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    """masked_neg_inf(concat_d(x_i), B) = concat_d(masked_neg_inf(x_i, B[rows of x_i along d]))."""
    if spec.kind != KIND or len(args) != 2:
        return
    x, b = args
    if x.op != "cat" or value_of(b) is None:
        return
    d = x.attrs
    k = d - (len(x.shape) - len(b.shape))  # the mask's dim aligned with x's dim d (broadcasting)
    pieces, off = [], 0
    try:
        for p in x.args:
            n = p.shape[d]
            bp = b if k < 0 or b.shape[k] == 1 else S.slice(b, k, off, off + n)
            pieces.append(S.call(MASK_SPEC, [p, bp]))
            off += n
        yield S.cat(pieces, d)
    except ShapeError:
        return


def match_masked(engine, spec: OpSpec, args: tuple) -> Expr | None:
    """A rank value equal to masked_neg_inf(x, B): a user of x's term that masks it, in any spelling,
    with the same effective mask."""
    if spec.kind != KIND or len(args) != 2:
        return None
    x, b = args
    x_term = engine.to_term(x)
    want = value_of(engine.to_term(b))
    if want is None:
        return None
    out_shape = tuple(x_term.shape)
    if not _fits(want, out_shape):
        return None
    want = torch.broadcast_to(want, out_shape)
    # the rank masks x itself, or the tensor x is a view of (a loop over heads masks [B, S, S]
    # scores that the spec sees as [B, 1, S, S]): masking is elementwise, so it commutes with the view
    bases = [x_term] + ([x_term.args[0]] if x_term.op == "view" else [])
    for y in bases:
        for u in engine.index.users_of(y):
            if u.op != "call" or tuple(u.shape) != tuple(y.shape) or u.dtype != y.dtype or u.attrs.unique is not None:
                continue
            hit = decode(u.attrs, u.args, u.shape, u.dtype, value_of)
            if hit is None or u.args[hit[0]].id != y.id:
                continue
            got = torch.broadcast_to(hit[1], tuple(y.shape)).reshape(out_shape)
            if not torch.equal(got, want):
                continue
            d = engine.index.realized(u)
            if d is not None:
                ref = engine.index.ref(d)
                return ref if y is x_term else engine.store.view(ref, out_shape)
    return None


# ---------------------------------------------------------------------------------- random cases
def _case(fn, x: torch.Tensor, consts: list, rng, split_dim: int | None, description: str) -> LemmaCase:
    """``fn(x, *consts)`` with ``x`` an atom (or concatenation of atoms along ``split_dim``) and the
    constants as value nodes."""
    spec, order = C.spec_of(fn, x, *consts)
    base = C.make_case(spec, [x], rng, split={0: split_dim} if split_dim is not None else None)
    S = base.store
    tensors = [x] + list(consts)
    args = []
    for o in order:
        if o == 0:
            args.append(base.args[0])
        else:
            from gg_notebook.engine.index import _const_term

            args.append(_const_term(S, tensors[o]))
    return LemmaCase(spec, tuple(args), base.values, S, description)


def _mask_cases(rng):
    inf = float("-inf")
    for k in range(3):
        b, h, s = C.dims(rng), C.dims(rng, 2, 4), C.dims(rng, 3, 7)
        x = C.randn(rng, b, h, s, s)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        rnd = torch.rand(s, s, generator=rng) < 0.4
        add_m = torch.full((s, s), inf, dtype=torch.float64).triu(1)
        split = (0, 1, 2)[k]
        yield _case(lambda t, m: t + m, x, [add_m], rng, split, f"scores + triu(-inf), split {split}")
        yield _case(lambda t, m: m + t, x, [add_m.where(rnd, 0.0)], rng, split, f"M + scores, split {split}")
        yield _case(lambda t, m: t.masked_fill(m, inf), x, [~causal], rng, split, f"masked_fill(~tril), split {split}")
        yield _case(lambda t, m: t.masked_fill(m, inf), x, [rnd.view(1, 1, s, s)], rng, split,
                    f"masked_fill 4-d mask, split {split}")
        yield _case(lambda t, m, v: t.masked_fill(m, v), x, [rnd, torch.tensor(inf, dtype=torch.float64)], rng,
                    split, "masked_fill.Tensor")
        ninf = torch.tensor(inf, dtype=torch.float64)
        yield _case(lambda t, c, v: torch.where(c, t, v), x, [causal, ninf], rng, split,
                    f"where(keep, s, -inf), split {split}")
        yield _case(lambda t, c, v: torch.where(c, v, t), x, [rnd, ninf], rng, split, "where(B, -inf, s)")
        # declines: a mask value that is not 0/-inf, a finite fill, alpha != 1
        yield _case(lambda t, m: t + m, x, [add_m.nan_to_num(neginf=-1e4)], rng, split, "additive -1e4 (declines)")
        yield _case(lambda t, m: t.masked_fill(m, -1e9), x, [~causal], rng, split, "masked_fill -1e9 (declines)")
        yield _case(lambda t, m: torch.add(t, m, alpha=2), x, [add_m], rng, split, "alpha=2 (declines)")
        yield _case(lambda t, c, v: torch.where(c, t, v), x, [causal, torch.tensor(0.0, dtype=torch.float64)], rng,
                    split, "where(keep, s, 0) (declines)")


def _split_cases(rng):
    for k in range(3):
        b, s = C.dims(rng), C.dims(rng, 3, 7)
        x = C.randn(rng, b, 2, s, s)
        mask = torch.rand(s, s, generator=rng) < 0.5
        for split in (0, 1, 2, 3):
            spec = MASK_SPEC
            base = C.make_case(spec, [x], rng, split={0: split})
            from gg_notebook.engine.index import _const_term

            m = _const_term(base.store, mask)
            yield LemmaCase(spec, (base.args[0], m), base.values, base.store, f"split along {split}")
        # declines: x not concatenated
        base = C.make_case(MASK_SPEC, [x], rng)
        yield LemmaCase(MASK_SPEC, (base.args[0], _const_term(base.store, mask)), base.values, base.store,
                        "x not split (declines)")


register(Lemma(
    name="neg-inf-mask",
    statement="x + M (M in {0, -inf}) = masked_fill(x, B, -inf) = where(~B, x, -inf) = masked_neg_inf(x, B), "
              "B = (M == -inf) compared by value",
    kinds=("ew",),
    plans=neg_inf_mask,
    cases=_mask_cases,
    conditions=("the mask is an input-independent value (every element 0 or -inf, or a bool mask with a -inf fill)",
                "x has the output's shape and dtype; alpha == 1", "exact='real' only (x + 0.0 drops a -0.0)"),
    priority=40,
    needs_context=True,
    on=((aten.add.Tensor, ("alpha",), ()),
        (aten.masked_fill.Scalar, ("value",), ()),
        (aten.masked_fill.Tensor, (), ()),
        (aten.where.self, (), ())),
))

register(Lemma(
    name="neg-inf-mask-split",
    statement="masked_neg_inf(concat_d(x_i), B) = concat_d(masked_neg_inf(x_i, B sliced like x_i along d))",
    kinds=(KIND,),
    plans=neg_inf_mask_split,
    cases=_split_cases,
    conditions=("x is a concatenation; B broadcasts along d or is sliced at the same offsets",),
    bitwise_safe=True,
    priority=40,
))

register_matcher(KIND, match_masked)
