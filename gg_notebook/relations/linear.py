"""The scalar normal form: terms as linear combinations with exact rational coefficients.

Over the real numbers, many spellings of one value differ only by where the scalars sit:
``x.mean()`` is ``x.sum() / n``; an all-reduce with ``ReduceOp.AVG`` is a sum times ``1/W``;
``(a + b) / 2`` is ``a/2 + b/2``; ``mm(x, g / 4)`` is ``mm(x, g) / 4``; ``x.sum(-1).sum()`` is
``x.sum()``. `LinearForms.of` writes a term as ``sum_i c_i * b_i``: the ``c_i`` are exact
`Fraction`s and the *bases* ``b_i`` are terms that no rule below rewrites (a matmul of two
inputs, a canonical sum, a nonlinear call). Two terms with the same normal form have the same real
value; a term whose form is a multiple of another's holds that value up to a factor.

Every rule is an identity over the reals, applied only to floating-point tensors (integer
arithmetic has no ``/``, and an integer mean does not exist), and only where dtype and shape are
unchanged. The rules:

* ``accum(sum)`` (an all-reduce) adds forms; ``scale`` (``ReduceOp.AVG``) multiplies one;
* ``add``/``sub`` of two tensors (with ``alpha``), ``neg``, ``mul``/``div`` by a Python number or by
  a constant tensor whose every element is the same number (``ones_like(l).expand(..) / n``,
  how autograd spells the gradient of a mean);
* every operator the linearity table (`gg_notebook.ops.linearity`) lists as linear in an argument
  is distributed over that argument's form (``mm(x, a/2 + b/2) = mm(x, a)/2 + mm(x, b)/2``);
* ``mean(x, dims)`` is ``sum(x, dims) / n``; sums are canonical: nested sums merge, ``keepdim``
  becomes a view, and a sum over whole groups of a reshape looks through the reshape.

A form with more than `MAX_SPREAD` bases (a backward's residual-stream gradient, a sum over layers
and ranks) is not spread over an operator that reads it: ``f(c0 * T) = c0 * f(T)``, where ``T`` is
one opaque term per form up to a factor (the bases with their coefficients over the first one), so
its number still comes out and cancels, at one new term per operator instead of one per base.
Every term's form is computed once, arguments first, and memoized; no question has a budget, so a
form does not depend on which questions came before it.

A float literal is the rational it is nearest to when that rational has a small denominator
(``1/3`` written as ``0.333..``), else the square or fourth root of a short rational it is within a
few ulps of (``math.sqrt(8)``, ``8 ** -0.5``, SDPA's ``sqrt(scale)``: relations/exact.py, so that
``(q * c) @ (k * c).T`` cancels against ``/ math.sqrt(d)`` exactly); otherwise its exact binary value. The normal form is never used
with ``exact="bitwise"``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable

import torch

from gg_notebook.ir.specs import reduced_dims

from gg_notebook.relations.expr import Expr, ExprStore, ShapeError, reshape_groups
from gg_notebook.relations.products import canonical_product, worth_indexing as product_worth_indexing
from gg_notebook.relations.sum_merge import merge_slice_sums

aten = torch.ops.aten

# operators `_call` rewrites by their own rule (the others: by the linearity table)
_ARG_FORM_TARGETS = frozenset((
    aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor,
    aten.div.Scalar, aten.silu.default, aten.mean.dim, aten.sum.dim_IntList))
MAX_BASES = 64  # a form with more bases is kept as one opaque base (completeness, not soundness)
# a form with more bases is not spread over an operator linear in it (one new term per base, and a
# backward's gradient sums grow with depth); its number comes out instead: ``f(c * T) = c * f(T)``
# with ``T`` the one canonical term of the form up to its first coefficient (`_combination`)
MAX_SPREAD = 8

Form = tuple  # ((base Expr, Fraction), ...) sorted by base id, no zero coefficients
ONE = Fraction(1)
_PRODUCTS: dict = {}  # (a, b, divide) -> a * b or a / b, for radical coefficients (exact.py is slow)
_LINEAR_ARGS: dict = {}  # (spec, argument dtypes) -> `linear_args` (a pure function of them)
_REDUCE_SPECS: dict = {}  # (fn, dims, keepdim) -> reduce_spec(...): one spec object per reduction


def _reduce_spec(fn: str, dims: tuple, keepdim: bool):
    key = (fn, tuple(dims), bool(keepdim))
    spec = _REDUCE_SPECS.get(key)
    if spec is None:
        from gg_notebook.ir.specs import reduce_spec

        spec = _REDUCE_SPECS[key] = reduce_spec(fn, key[1], key[2])
    return spec


def _mul(a, b):
    """``a * b`` for coefficients (a product by one, or of two rationals, directly; radicals cached)."""
    if a.__class__ is Fraction and b.__class__ is Fraction:
        # (reduced fractions: numerator == denominator only for 1/1; read without Fraction.__eq__)
        if b._numerator == b._denominator:
            return a
        if a._numerator == a._denominator:
            return b
        return a * b
    if b == 1:
        return a
    if a == 1:
        return b
    key = (a, b, False)
    hit = _PRODUCTS.get(key)
    if hit is None:
        if len(_PRODUCTS) > 1 << 16:
            _PRODUCTS.clear()
        hit = _PRODUCTS[key] = a * b
    return hit


def _div(a, b):
    """``a / b`` for coefficients (see `_mul`)."""
    if a.__class__ is Fraction and b.__class__ is Fraction:
        if b._numerator == b._denominator:
            return a
        if a._numerator == b._numerator and a._denominator == b._denominator:
            return ONE
        return a / b
    if b == 1:
        return a
    if a == b:
        return ONE
    key = (a, b, True)
    hit = _PRODUCTS.get(key)
    if hit is None:
        if len(_PRODUCTS) > 1 << 16:
            _PRODUCTS.clear()
        hit = _PRODUCTS[key] = a / b
    return hit


def coefficient(v) -> Fraction | None:
    """A Python number as an exact rational (None for bools, NaN, infinities, non-numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, int):
        return Fraction(v)
    if not math.isfinite(v):
        return None
    exact = Fraction(v)
    near = exact.limit_denominator(1 << 24)
    if float(near) == v and near.denominator <= 1 << 16:
        return near
    # ``math.sqrt(d)``, ``d ** -0.5``, SDPA's ``sqrt(scale)``: the square or fourth root it spells
    from gg_notebook.relations.exact import read_float

    rad = read_float(v)
    if rad is not None:
        return rad
    return near if float(near) == v else exact


def _floating(e: Expr) -> bool:
    return e.dtype is not None and e.dtype.is_floating_point


def _normalize(pairs: Iterable[tuple[Expr, Fraction]]) -> Form | None:
    from gg_notebook.relations.exact import Inexpressible

    acc: dict[int, list] = {}
    for b, c in pairs:
        slot = acc.get(b.id)
        if slot is None:
            acc[b.id] = [b, c]
        else:
            try:
                slot[1] += c
            except Inexpressible:  # c1 + c2 with different radicals: not one coefficient
                return None
    out = tuple((b, c) for _, (b, c) in sorted(acc.items()) if c != 0)
    if len(out) > MAX_BASES:
        return None
    return out


class TooLarge(Exception):
    """A normal form would take too many terms to compute. Never raised since forms are bounded by
    `MAX_SPREAD` and `MAX_BASES` (every term's form is computed once, whatever the question); kept
    for callers that still catch it."""


class LinearForms:
    """Normal forms of the terms of one `ExprStore` (memoized by term id)."""

    def __init__(self, store: ExprStore, budget: int | None = None, cut: frozenset = frozenset()) -> None:
        # (``budget`` is accepted for old callers and ignored: see `of`)
        self.S = store
        # ids of terms taken as their own bases, never looked into (a form relative to a cut: two
        # values built over the same cut terms compare by forms computed above it; still sound,
        # since a form is equal to its term whatever is left opaque)
        self.cut = cut
        self._memo: dict[int, Form] = {}
        self._fill_memo: dict[int, Fraction | None] = {}
        self._worth: dict[tuple, bool] = {}
        self._reads_memo: dict[int, bool] = {}
        self._combos: dict[tuple, Expr] = {}  # normalized form -> its canonical term (`_combination`)
        self._combo_of: dict[int, tuple | None] = {}  # term id -> `_combination` of its form
        self._keys: dict[int, tuple | None] = {}  # term id -> `key`
        self._lin_memo: dict[int, tuple | None] = {}  # term id -> its operator's linear arguments
        self._lin_by_spec: dict[tuple, tuple] = {}  # (id(spec), dtypes) -> (spec, linear arguments)

    # ------------------------------------------------------------------ public
    def of(self, t: Expr, budget: int | None = None) -> Form:
        """``t`` as ((base, coefficient), ...); ``((t, 1),)`` when no rule applies. Every term's
        form is computed once, arguments first, and memoized: the answer does not depend on which
        questions came before. (``budget`` is ignored: a form's cost is bounded by `MAX_SPREAD`, a
        form with many bases is not spread over the operators that read it.)"""
        hit = self._memo.get(t.id)
        if hit is not None:
            return hit
        return self._of(t)

    def _of(self, t: Expr) -> Form:
        # iterative post-order over the arguments first (deep graphs must not recurse deeply)
        memo = self._memo
        stack = [t]
        while stack:
            x = stack[-1]
            if x.id in memo:  # (a node pushed twice, or computed by a rule meanwhile)
                stack.pop()
                continue
            if x.args:
                if not self._reads_arg_forms(x):
                    stack.pop()  # an operator no rule looks through: its own base, arguments never visited
                    memo[x.id] = ((x, ONE),)
                    continue
                todo = [a for a in x.args if a.id not in memo]
                if todo:
                    stack.extend(todo)
                    continue
            stack.pop()
            form = None
            if _floating(x):
                try:
                    form = self._rule(x)
                except ShapeError:
                    form = None
            if form and len(form) > 1:  # sums over adjacent slices as one sum (relations/sum_merge.py)
                form = merge_slice_sums(self, form) or form
            memo[x.id] = form if form else ((x, ONE),)
        return memo[t.id]

    def _reads_arg_forms(self, x: Expr) -> bool:
        """Can a rule of `_rule` use the forms of ``x``'s arguments? Not for a non-floating value, a
        constant, or an operator that is neither a sum, a scale, a data movement, a reduction by
        sum/mean, a product nor linear by the linearity table: its form is ``((x, 1),)`` whatever
        its arguments are, so a question about it never walks the graph below it."""
        hit = self._reads_memo.get(x.id)
        if hit is None:
            if x.id in self.cut:
                self._reads_memo[x.id] = False
                return False
            hit = self._reads_memo[x.id] = self._reads_arg_forms_uncached(x)
        return hit

    def _reads_arg_forms_uncached(self, x: Expr) -> bool:
        if not _floating(x):
            return False
        op = x.op
        if op in ("accum", "scale", "view", "permute", "slice", "expand", "cat"):
            return True
        if op != "call" or x.ground:
            return False
        spec = x.attrs
        if spec.unique is not None:
            return False
        if spec.target in _ARG_FORM_TARGETS:
            return True
        lin = self._linear_args(x)
        return lin is not None and lin[0] == "separately"

    def _linear_args(self, x: Expr):
        """`gg_notebook.ops.linearity.linear_args` of call ``x`` (memoized by term)."""
        hit = self._lin_memo.get(x.id, False)
        if hit is False:
            # a function of the operator and its arguments' dtypes only: shared by every term of
            # the same operator (the table reads the spec's arguments by schema, not cheap)
            dtypes = tuple([a.dtype for a in x.args])
            # first by the spec object (the store keeps one per operator identity; the global
            # table's specs are another run's objects, compared field by field)
            local = (id(x.attrs), dtypes)
            ent = self._lin_by_spec.get(local)
            if ent is not None and ent[0] is x.attrs:
                hit = ent[1]
            else:
                key = (x.attrs, dtypes)
                hit = _LINEAR_ARGS.get(key, False)
                if hit is False:
                    from gg_notebook.ops.linearity import linear_args

                    if len(_LINEAR_ARGS) > 1 << 16:
                        _LINEAR_ARGS.clear()
                    hit = _LINEAR_ARGS[key] = linear_args(x.attrs, list(dtypes))
                self._lin_by_spec[local] = (x.attrs, hit)  # (the spec kept alive: its id stays its own)
            self._lin_memo[x.id] = hit
        return hit

    def scalar_root(self, t: Expr) -> bool:
        """Does ``t``'s own operator bring in a number (a scale, a mean, a sum that may merge, a
        product or quotient by a number or by a constant filled with one, a negation)?"""
        if t.op == "scale":
            return True
        if t.op != "call" or t.ground:
            return False
        target = t.attrs.target
        if target in (aten.mean.dim, aten.sum.dim_IntList, aten.neg.default):
            return True
        if target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            spec = t.attrs
            if spec.slot_of("other") is None:
                return True
            return any(self.fill(a) is not None for a in t.args)
        if target in (aten.add.Tensor, aten.sub.Tensor):
            return coefficient(t.attrs.arg("alpha", 1)) != 1 or target is aten.sub.Tensor
        return False

    def worth_indexing(self, t: Expr, depth: int = 2) -> bool:
        """Could ``t`` be found *up to a factor* where its structure is not found as is? Only terms
        with a number at or just below their root (a mean, an average, a scaled product, a sum of
        scaled parts): indexing every value's normal form costs too much on large graphs, and a
        query whose form is one base is looked up by that base directly."""
        key = (t.id, depth)
        hit = self._worth.get(key)
        if hit is None:
            hit = self._worth[key] = self._worth_indexing(t, depth)
        return hit

    def _worth_indexing(self, t: Expr, depth: int) -> bool:
        if not _floating(t):
            return False
        if self.scalar_root(t):
            return True
        if t.op == "accum" and any(a.op == "call" and a.attrs.target in (aten.add.Tensor, aten.sub.Tensor)
                                   for a in t.args):
            return True  # something added to one rank's part before the all-reduce (a bias on rank 0)
        if product_worth_indexing(t):
            return True
        if depth == 0 or not t.args:
            return False
        if t.op in ("accum", "view", "permute", "slice", "expand", "cat") or (t.op == "call" and not t.ground):
            return any(self.worth_indexing(a, depth - 1) for a in t.args)
        return False

    def trivial(self, t: Expr) -> bool:
        f = self.of(t)  # (TooLarge propagates to the top-level question)
        return len(f) == 1 and f[0][0] is t and f[0][1] == 1

    def key(self, t: Expr, budget: int | None = None) -> tuple[tuple, Fraction] | None:
        """(key, first coefficient): the form up to a factor. Terms whose forms are multiples of
        each other have the same key; the value of the first is ``c / c'`` times the second.
        None if the form is empty. Memoized by term (``budget`` is ignored, see `of`)."""
        hit = self._keys.get(t.id, False)
        if hit is not False:
            return hit
        f = self.of(t)
        if not f:
            out = None
        else:
            c0 = f[0][1]
            if len(f) == 1:
                out = (t.shape, t.dtype, ((f[0][0].id, ONE),)), c0
            else:
                out = (t.shape, t.dtype, tuple((b.id, _div(c, c0)) for b, c in f)), c0
        self._keys[t.id] = out
        return out

    def ratio(self, a: Expr, b: Expr) -> Fraction | None:
        """r with ``a == r * b`` by their normal forms (None if they are not multiples)."""
        ka, kb = self.key(a), self.key(b)
        if ka is None or kb is None or ka[0] != kb[0]:
            return None
        return ka[1] / kb[1]

    # ------------------------------------------------------------------ rules
    def _rule(self, x: Expr) -> Form | None:
        op = x.op
        if op == "accum" and x.attrs == "sum":
            return _normalize(p for a in x.args for p in self.of(a))
        if op == "scale":
            c = x.attrs if not isinstance(x.attrs, float) else Fraction(x.attrs)
            return _normalize((b, _mul(c, k)) for b, k in self.of(x.args[0]))
        if op in ("view", "permute", "slice", "expand"):
            inner = self.of(x.args[0])
            if len(inner) == 1 and inner[0][0] is x.args[0] and inner[0][1] == 1:
                return None
            if len(inner) > MAX_SPREAD:
                return self._through_combination(x, x.args[0], lambda T: _rebuild_unary(self.S, x, T))
            return self._map(inner, lambda b: _rebuild_unary(self.S, x, b))
        if op == "cat":
            return self._cat(x)
        if op == "call":
            return self._call(x)
        return None

    def _combination(self, form: Form) -> tuple[Expr, Fraction] | None:
        """``(T, c0)`` with ``form == c0 * form(T)``: ``T`` the linear combination of the bases with
        their coefficients over the first one, one opaque term per form up to a factor
        (hash-consed: values whose forms are multiples of each other get the same ``T``; no
        constructor of the store looks into it, so a view or a permute of it is one new term, not
        one per base). None if a base is a constant."""
        c0 = form[0][1]
        key = tuple((b.id, _div(c, c0)) for b, c in form)
        T = self._combos.get(key)
        if T is None:
            if any(b.ground for b, _ in form):
                return None
            spec = combination_spec(tuple(k for _, k in key))
            first = form[0][0]
            T = self.S._intern("call", spec, tuple(b for b, _ in form), first.shape, first.dtype)
            self._combos[key] = T
            self._memo.setdefault(T.id, tuple((b, k) for (b, _), (_, k) in zip(form, key)))
        return T, c0

    def _combination_of(self, t: Expr) -> tuple[Expr, Fraction] | None:
        """`_combination` of ``t``'s form (memoized by term)."""
        hit = self._combo_of.get(t.id, False)
        if hit is False:
            hit = self._combo_of[t.id] = self._combination(self.of(t))
        return hit

    def _through_combination(self, x: Expr, src: Expr, fn) -> Form | None:
        """A linear map ``fn`` of ``src`` (a form with many bases) as ``fn(c0 * T) = c0 * fn(T)``
        (`_combination`)."""
        hit = self._combination_of(src)
        if hit is None:
            return None
        T, c0 = hit
        img = fn(T)
        if img is None or img.id == x.id:
            return None
        return _normalize((b, _mul(c0, k)) for b, k in self.of(img))

    def _map(self, form: Form, fn) -> Form | None:
        """Apply a linear map to every base (the images are normalized in turn)."""
        out = []
        for b, c in form:
            img = fn(b)
            if img is None:
                return None
            out.extend((bb, _mul(c, k)) for bb, k in self.of(img))
        return _normalize(out)

    def _cat(self, x: Expr) -> Form | None:
        """cat(c*a, c*b) = c*cat(a, b): a common factor comes out (the only canonical case)."""
        forms = [self.of(a) for a in x.args]
        if any(len(f) != 1 for f in forms):
            return None
        c = forms[0][0][1]
        if c == 1 or any(f[0][1] != c for f in forms):
            return None
        inner = self.S.cat([f[0][0] for f in forms], x.attrs)
        return _normalize((b, _mul(c, k)) for b, k in self.of(inner))

    def _call(self, x: Expr) -> Form | None:
        spec = x.attrs
        target = spec.target
        if spec.unique is not None or x.ground:
            return None
        args = x.args
        if target in (aten.add.Tensor, aten.sub.Tensor):
            return self._add(x, -1 if target is aten.sub.Tensor else 1)
        if target is aten.neg.default:
            return self._scaled(x, args[0], Fraction(-1))
        if target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            hit = self._times_number(x)
            if hit is not None:
                return hit
        if target in (aten.mul.Tensor, aten.silu.default):  # products in one order (relations/products.py)
            canon = canonical_product(self.S, x)
            if canon is not None:
                return self.of(canon)
        if target is aten.mean.dim:
            return self._mean(x)
        if target is aten.sum.dim_IntList:
            return self._sum(x)
        return self._distribute(x)

    def _scaled(self, x: Expr, a: Expr, c: Fraction) -> Form | None:
        if a.shape != x.shape or a.dtype != x.dtype:
            return None
        return _normalize((b, _mul(c, k)) for b, k in self.of(a))

    def _add(self, x: Expr, sign: int) -> Form | None:
        spec = x.attrs
        a_slot, b_slot = spec.slot_of("self"), spec.slot_of("other")
        if a_slot is None or b_slot is None:
            return None  # a Python scalar operand: affine, not linear
        alpha = coefficient(spec.arg("alpha", 1))
        if alpha is None:
            return None
        a, b = x.args[a_slot], x.args[b_slot]
        if a.dtype != x.dtype or b.dtype != x.dtype:
            return None
        terms = []
        for arg, c in ((a, Fraction(1)), (b, sign * alpha)):
            if self.fill(arg) == 0:  # an accumulator that starts at zeros: adds nothing
                continue
            if arg.shape != x.shape:
                try:
                    arg = self.S.expand(arg, x.shape)
                except ShapeError:
                    return None
            terms.extend((bb, _mul(c, k)) for bb, k in self.of(arg))
        return _normalize(terms)

    def _times_number(self, x: Expr) -> Form | None:
        """``x * c``, ``x / c`` with c a Python number or a constant tensor filled with one number."""
        spec = x.attrs
        divide = spec.target in (aten.div.Tensor, aten.div.Scalar)
        if divide and spec.arg("rounding_mode", None) is not None:
            return None
        s_self, s_other = spec.slot_of("self"), spec.slot_of("other")
        if s_other is None:  # a Python number
            c = coefficient(spec.arg("other"))
            if c is None or (divide and c == 0):
                return None
            return self._scaled(x, x.args[s_self], 1 / c if divide else c)
        if s_self is None:
            return None
        a, b = x.args[s_self], x.args[s_other]
        cb = self.fill(b)
        if cb is not None and (not divide or cb != 0):
            return self._scaled(x, a, 1 / cb if divide else cb)
        if not divide:
            ca = self.fill(a)
            if ca is not None:
                return self._scaled(x, b, ca)
        return None

    def _mean(self, x: Expr) -> Form | None:
        spec = x.attrs
        src = x.args[0]
        if spec.arg("dtype", None) not in (None, src.dtype) or src.dtype != x.dtype:
            return None
        dims = reduced_dims(spec.arg("dim"), len(src.shape))
        n = math.prod(src.shape[d] for d in dims)
        if n == 0:
            return None
        s = self.S.call(_reduce_spec("sum", dims, bool(spec.arg("keepdim"))), [src])
        return _normalize((b, k / n) for b, k in self.of(s))

    def _sum(self, x: Expr) -> Form | None:
        spec = x.attrs
        src = x.args[0]
        if spec.arg("dtype", None) not in (None, src.dtype) or src.dtype != x.dtype:
            return None
        dims = reduced_dims(spec.arg("dim"), len(src.shape))
        keep = bool(spec.arg("keepdim"))
        if keep:  # sum(x, d, keepdim=True) = view(sum(x, d), shape with ones)
            flat = self._sum_of(src, dims)
            if flat is None:
                return None
            return self._map(((flat, Fraction(1)),), lambda b: self.S.view(b, x.shape))
        inner = self.of(src)
        if len(inner) > MAX_SPREAD:
            return self._through_combination(x, src, lambda T: self._sum_of(T, dims))
        out = []
        changed = not (len(inner) == 1 and inner[0][0] is src and inner[0][1] == 1)
        for b, c in inner:
            terms = self._sum_terms(b, dims)
            if terms is None:
                return None
            if len(terms) != 1 or terms[0] is not x:
                changed = True
            out.extend((t, c) for t in terms)
        if not changed:
            return None
        return self._map(tuple(out), lambda b: b)

    def _sum_terms(self, y: Expr, dims: tuple[int, ...]) -> list[Expr] | None:
        """``sum(y, dims)`` as a sum of canonical sum terms: a concatenation along a summed dim
        splits into its pieces (the ranks' shards, an all-gathered stack of per-rank values)."""
        if y.op == "cat" and y.attrs in dims:
            out: list[Expr] = []
            for piece in y.args:
                t = self._sum_terms(piece, dims)
                if t is None:
                    return None
                out.extend(t)
            return out
        s = self._sum_of(y, dims)
        return None if s is None else [s]

    def _sum_of(self, y: Expr, dims: tuple[int, ...]) -> Expr | None:
        """The canonical term of ``sum(y, dims, keepdim=False)``: nested sums merged, reshapes of
        whole summed groups looked through."""
        while True:
            if not dims:
                return y
            ones = [d for d in dims if y.shape[d] == 1]
            if ones:  # summing a size-1 dim drops it: a view
                rest = tuple(d for d in dims if y.shape[d] != 1)
                out_shape = tuple(n for i, n in enumerate(y.shape) if i not in dims)
                s = self._sum_of(y, rest) if rest else y
                if s is None:
                    return None
                return self.S.view(s, out_shape) if tuple(s.shape) != out_shape else s
            if y.op == "call" and y.attrs.target is aten.sum.dim_IntList and not y.attrs.arg("keepdim") \
                    and y.attrs.arg("dtype", None) in (None, y.args[0].dtype) and y.args[0].dtype == y.dtype:
                inner = reduced_dims(y.attrs.arg("dim"), len(y.args[0].shape))
                kept = [d for d in range(len(y.args[0].shape)) if d not in inner]
                dims = tuple(sorted(set(inner) | {kept[d] for d in dims}))
                y = y.args[0]
                continue
            if y.op == "view":
                moved = _sum_through_view(y, dims)
                if moved is not None:
                    inner_dims, out_shape = moved
                    s = self._sum_of(y.args[0], inner_dims)
                    if s is None:
                        return None
                    return self.S.view(s, out_shape) if tuple(s.shape) != tuple(out_shape) else s
            break
        try:
            return self.S.call(_reduce_spec("sum", dims, False), [y])
        except ShapeError:
            return None

    def _distribute(self, x: Expr) -> Form | None:
        """An operator linear in some arguments (the linearity table), applied to forms."""
        spec = x.attrs
        lin = self._linear_args(x)
        if lin is None or lin[0] != "separately":
            return None
        slots = [i for i in lin[1] if not self.trivial(x.args[i])]
        if not slots:
            return None
        terms = [(list(x.args), Fraction(1))]
        for i in slots:
            nxt = []
            form = self.of(x.args[i])
            if len(form) > MAX_SPREAD:
                hit = self._combination_of(x.args[i])
                if hit is None:
                    return None
                form = ((hit[0], hit[1]),)
            for args, c in terms:
                for b, k in form:
                    if b.shape != x.args[i].shape or b.dtype != x.args[i].dtype:
                        return None
                    new = list(args)
                    new[i] = b
                    nxt.append((new, _mul(c, k)))
            terms = nxt
            if len(terms) > MAX_BASES:
                return None
        out = []
        for args, c in terms:
            call = self.S.call(spec, args)
            if call.shape != x.shape or call.dtype != x.dtype:
                return None
            if call.id == x.id:  # every spread argument was its own combination already
                if len(terms) == 1:
                    return None
                out.append((x, c))
                continue
            out.extend((b, _mul(c, k)) for b, k in self.of(call))
        return _normalize(out)

    # ------------------------------------------------------------------ constants
    def fill(self, g: Expr) -> Fraction | None:
        """The number every element of constant ``g`` equals, read from its structure (no
        evaluation: a meta-sized problem costs nothing): ``full``, ``ones_like``/``zeros_like``,
        views and expansions of one, and products/quotients by Python numbers."""
        if not g.ground or g.dtype is None or not g.dtype.is_floating_point:
            return None
        if g.id in self._fill_memo:
            return self._fill_memo[g.id]
        v = self._fill(g)
        self._fill_memo[g.id] = v
        return v

    def _fill(self, g: Expr) -> Fraction | None:
        if g.op in ("view", "permute", "slice", "expand"):
            return self.fill(g.args[0])
        if g.op == "const":
            from gg_notebook.relations.expr import untyped

            fill = getattr(g.attrs.target, "constant_fill", None)  # full / ones_like / zeros_like & co
            return coefficient(untyped(fill())) if fill is not None else None
        if g.op == "call":
            spec = g.attrs
            t = spec.target
            if t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
                if spec.arg("rounding_mode", None) is not None:
                    return None
                divide = t in (aten.div.Tensor, aten.div.Scalar)
                s_self, s_other = spec.slot_of("self"), spec.slot_of("other")
                a = self.fill(g.args[s_self]) if s_self is not None else None
                if s_other is None:
                    b = coefficient(spec.arg("other"))
                else:
                    b = self.fill(g.args[s_other])
                if a is None or b is None or (divide and b == 0):
                    return None
                return a / b if divide else a * b
            if t is aten.neg.default:
                a = self.fill(g.args[0])
                return None if a is None else -a
        return None


class _Combination:
    """The target of a `combination_spec`: ``sum_i c_i * x_i`` (evaluates what the term means)."""

    def __init__(self, coefficients: tuple) -> None:
        self.coefficients = coefficients

    def __eq__(self, other) -> bool:
        return isinstance(other, _Combination) and other.coefficients == self.coefficients

    def __hash__(self) -> int:
        return hash(("combination", self.coefficients))

    def __call__(self, *xs):
        out = xs[0] * float(self.coefficients[0])
        for c, x in zip(self.coefficients[1:], xs[1:]):
            out = out + x * float(c)
        return out


def combination_spec(coefficients: tuple):
    """The operator of a normal form's canonical term ``sum_i c_i * x_i`` (`LinearForms._combination`):
    its own kind, so that no lemma, matcher or linearity rule reads it."""
    from gg_notebook.relations.expr import OpSpec, Slot

    return OpSpec("linear-combination", "linear combination", _Combination(coefficients),
                  (tuple(Slot(i) for i in range(len(coefficients))), ()))


def _sum_through_view(v: Expr, dims: tuple[int, ...]):
    """sum(view(y, s), dims) = view(sum(y, dims'), s') when every reshape group of the view is
    either summed whole or not at all: (dims', s'), or None."""
    src, shape = v.args[0].shape, v.shape
    groups = reshape_groups(src, shape)
    if groups is None:
        return None
    inner: list[int] = []
    out_shape: list[int] = []
    for gi, go in groups:
        real = [o for o in go if shape[o] != 1]
        summed = [o for o in go if o in dims]
        if summed and any(o not in dims for o in real):
            return None
        if summed or (not real and any(o in dims for o in go)):
            inner.extend(gi)
        else:
            if any(o in dims for o in go):
                return None
            out_shape.extend(shape[o] for o in go)
    if not inner:
        return None
    return tuple(sorted(inner)), tuple(out_shape)


def _rebuild_unary(S: ExprStore, x: Expr, b: Expr) -> Expr | None:
    try:
        if x.op == "view":
            return S.view(b, x.attrs)
        if x.op == "permute":
            return S.permute(b, x.attrs)
        if x.op == "slice":
            d, s, e = x.attrs
            return S.slice(b, d, s, e)
        if x.op == "expand":
            return S.expand(b, x.attrs)
    except ShapeError:
        return None
    return None
