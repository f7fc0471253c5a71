"""Elementwise operators fused with their elementwise consumer: ``up * silu(gate)`` as one value.

A rank may compute an elementwise expression in another shape than the specification: SwiGLU's
``up * F.silu(gate)`` written ``up * torch.sigmoid(gate) * gate``. No rank holds ``silu(gate)``,
so the sequential ``silu`` has no relation of its own; its consumer's value is held, as a whole.
The engine keeps such a stuck elementwise producer symbolic (deferred, `Engine.defer`) when its
consumer is elementwise, and ``ew-fusion`` relates the consumer together with it:

* the consumer and its deferred elementwise arguments form one expression tree over *leaves*
  (the relations the deferred calls were applied to, and the consumer's other arguments), a
  synthetic operator of kind ``fused_ew`` (`fused_spec`) whose value is the composition;
* plan 1: the fused operator on the leaves, whole;
* plan 2: when a leaf is a concatenation along dim d, the fused operator piece by piece (every
  node of the tree is elementwise without broadcasting, so position i along d only depends on
  position i of each leaf); leaves that are not concatenations along d are sliced at the same
  offsets.

The ``fused_ew`` matcher (`match_fused`) instantiates the tree on the leaves' terms and relates it
to a value some rank holds: the same term (data movement allowed), or, with ``exact="real"``, the
same scalar normal form (`gg_notebook.relations.linear`, where products are put in one order and
``silu(g) = g * sigmoid(g)``: `gg_notebook.relations.products`). Declines: a tree node that
broadcasts, a dtype change, a random (unique) call, more than `MAX_NODES` nodes.
"""

from __future__ import annotations

import torch

from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import Lemma, LemmaCase, register, register_matcher
from gg_notebook.relations.expr import ExprStore, OpSpec, ShapeError, Slot

MAX_NODES = 6


class Fused:
    """The composition an expression tree computes: ``("slot", i)`` or ``(spec, (children...))``."""

    def __init__(self, tree):
        self.tree = tree

    def __call__(self, *tensors):
        def go(t):
            if t[0] == "slot":
                return tensors[t[1]]
            spec, kids = t
            return spec.call([go(k) for k in kids])

        return go(self.tree)

    def __eq__(self, other):
        return isinstance(other, Fused) and other.tree == self.tree

    def __hash__(self):
        return hash(("fused", self.tree))

    def __repr__(self):
        def show(t):
            if t[0] == "slot":
                return f"s{t[1]}"
            return f"{t[0].short}({', '.join(show(k) for k in t[1])})"

        return show(self.tree)


def fused_spec(tree, n: int) -> OpSpec:
    f = Fused(tree)
    return OpSpec("fused_ew", f"fused[{f!r}]", f, (tuple(Slot(i) for i in range(n)), ()), (("tree", tree),))


def _tree(spec: OpSpec, args: tuple, out_shape: tuple):
    """(tree, leaves) for ``spec(args)`` with its deferred elementwise arguments inlined; None if a
    node broadcasts or changes the dtype, or nothing is deferred."""
    leaves: list = []
    index: dict[int, int] = {}
    count = [0]
    inlined = [False]

    def leaf(e):
        if e.id not in index:
            index[e.id] = len(leaves)
            leaves.append(e)
        return ("slot", index[e.id])

    def node(sp, xs, top):
        count[0] += 1
        if count[0] > MAX_NODES or sp.unique is not None or sp.out is not None:
            return None
        kids = []
        for a in xs:
            if tuple(a.shape) != tuple(out_shape):
                return None
            if a.op == "call" and not a.ground and a.attrs.kind == "ew":
                k = node(a.attrs, a.args, False)
                if k is None:
                    return None
                inlined[0] = True
                kids.append(k)
            else:
                kids.append(leaf(a))
        return (sp, tuple(kids))

    t = node(spec, args, True)
    if t is None or not inlined[0]:
        return None
    return t, leaves


def ew_fusion(S: ExprStore, spec: OpSpec, args: tuple, out_shape: tuple):
    if spec.kind != "ew" or spec.unique is not None:
        return
    found = _tree(spec, args, tuple(out_shape))
    if found is None:
        return
    tree, leaves = found
    fspec = fused_spec(tree, len(leaves))
    try:
        whole = S.call(fspec, leaves)
    except ShapeError:
        return
    if tuple(whole.shape) != tuple(out_shape):
        return
    cats = [a for a in leaves if a.op == "cat"]
    if cats:
        c = cats[0]
        d = c.attrs
        bounds, off = [], 0
        for p in c.args:
            bounds.append((off, off + p.shape[d]))
            off += p.shape[d]
        try:
            pieces = [S.call(fspec, [S.slice(a, d, lo, hi) for a in leaves]) for lo, hi in bounds]
            yield S.cat(pieces, d)
        except ShapeError:
            pass
    yield whole


def match_fused(engine, spec: OpSpec, args: tuple):
    """A ref to a value some rank holds that equals the fused expression on ``args``, or None."""
    tree = spec.param("tree")
    if tree is None:
        return None
    S = engine.store
    terms = [engine.to_term(a) for a in args]

    def go(t):
        if t[0] == "slot":
            return terms[t[1]]
        sp, kids = t
        return S.call(sp, [go(k) for k in kids])

    try:
        term = go(tree)
    except ShapeError:
        return None
    d = engine.index.realized_movement(term)
    if d is not None:
        return engine.index.ref(d)
    if engine.bitwise:
        return None
    hit = engine.index.realized_up_to_factor(term)
    if hit is not None and hit[1] == 1:
        return engine.index.ref(hit[0])
    return None


register_matcher("fused_ew", match_fused)


def _cases(rng):
    """A consumer with a deferred elementwise argument (a call expression among its arguments)."""
    F = torch.nn.functional
    for _ in range(3):
        m, n = C.dims(rng), C.dims(rng, 3, 8)
        for outer, inner, desc in (
            (lambda a, b: a * b, lambda g: F.silu(g), "up * silu(gate)"),
            (lambda a, b: a + b, lambda g: torch.tanh(g), "x + tanh(g)"),
            (lambda a, b: a - b, lambda g: g * g, "x - g * g (a binary producer)"),
        ):
            for split, dt in (({}, torch.float64), ({0: 1, 1: 1}, torch.float64), ({0: 0}, torch.float32)):
                a, g = C.randn(rng, m, n).to(dt), C.randn(rng, m, n).to(dt)
                spec, order = C.spec_of(outer, a, inner(g))
                ispec, iorder = C.spec_of(inner, g)
                case = C.make_case(spec, [a, g], rng, split=split, description=f"{desc}, split {split}, {dt}")
                S = case.store
                x, gl = case.args
                deferred = S.call(ispec, [gl] * len(iorder))
                args = [x, deferred] if order == [0, 1] else [deferred, x]
                yield LemmaCase(spec, tuple(args), case.values, S, case.description)
        # adversarial values: zeros, +-inf, nan in both operands (the plans are the same composition)
        a, g = C.randn(rng, m, n), C.randn(rng, m, n)
        a[0, 0], g[0, 1], g[-1, -1], a[-1, 0] = 0.0, float("inf"), float("-inf"), float("nan")
        spec, order = C.spec_of(lambda a, b: a * b, a, F.silu(g))
        ispec, _ = C.spec_of(lambda g: F.silu(g), g)
        case = C.make_case(spec, [a, g], rng, split={0: 0, 1: 0}, description="up * silu(gate), 0, inf, nan")
        x, gl = case.args
        d = case.store.call(ispec, [gl])
        yield LemmaCase(spec, (x, d) if order == [0, 1] else (d, x), case.values, case.store, case.description)
        # declines: a broadcasting consumer (bias [n]), nothing deferred
        a, b = C.randn(rng, m, n), C.randn(rng, n)
        spec, order = C.spec_of(lambda a, b: a * b, a, F.silu(b))
        ispec, _ = C.spec_of(lambda g: F.silu(g), b)
        case = C.make_case(spec, [a, b], rng, description="decline: the deferred argument broadcasts")
        x, bl = case.args
        yield LemmaCase(spec, (x, case.store.call(ispec, [bl])), case.values, case.store, case.description)
        yield C.case(lambda a, b: a * b, (C.randn(rng, m, n), C.randn(rng, m, n)), rng, split={0: 0},
                     description="decline: nothing deferred")


register(Lemma(
    name="ew-fusion",
    statement="op(.., f(g_1..g_k), ..) = fused[op(.., f(..), ..)](leaves), split along a concatenated dim of a leaf",
    kinds=("ew",),
    plans=ew_fusion,
    cases=_cases,
    conditions=("the consumer and the deferred producers are elementwise without broadcasting",
                "the fused value is related only to a value a rank holds (same term, or same normal form)"),
    bitwise_safe=True,
    priority=90,
    absorbs=("ew",),
))
