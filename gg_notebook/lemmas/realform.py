"""A real-number normal form for the softmax family: exp, log, log-sum-exp, and their stabilizers.

Softmax, log_softmax, logsumexp and cross-entropy over a dimension split across ranks are written
in many ways: a MAX all-reduce of the row maxima then ``exp(x - m)``, no stabilizer at all, each
shard's ``torch.logsumexp`` all-gathered and combined with another ``logsumexp``, ``log(s) + m``,
``x - m - log(s)``, ``exp(x - lse)``... Over the real numbers they are all the same value, and the
reason is always one of a few identities. `RealForms.of` writes a term in a form where those
identities hold syntactically, so that two spellings of one value get one key:

* the linear structure of `gg_notebook.relations.linear` (exact rational coefficients: ``a - b``,
  ``x / 2``, an all-reduce SUM, a mean);
* ``log(exp(W)) = W``; ``exp(A) * exp(B) = exp(A + B)``; ``a / (k exp(W)) = (a / k) exp(-W)``;
* ``sum_D exp(R + C) = exp(C + LSE_D(R))`` for C constant along the reduced dims D (broadcast
  along them: a row maximum, a row log-sum-exp, any per-row number): *the stabilizer cancels*;
* ``LSE_D`` over a concatenation along a reduced dim is one ``LSE_D`` over the union of the pieces
  (``log(exp(LSE a) + exp(LSE b)) = LSE(cat(a, b))``), in either direction, so per-shard sums of
  exponentials merged by an all-reduce, or per-shard ``logsumexp`` values stacked and combined
  again, give the log-sum-exp of the whole row; a reduction over size-1 dims is the identity;
* ``logsumexp(x, D) = log(sum_D(exp(x)))``, ``softmax(x) = exp(x - LSE(x))``, ``log_softmax(x) =
  x - LSE(x)``.

Every rule is an identity over the reals for finite values (the stabilized and unstabilized forms
differ in floating point: overflow, rounding), so the form is used only with ``exact="real"``, as
the linear one. Forms are compared with shapes and dtypes: a key is ``(shape, dtype, form)``; a
form is a frozenset of ``(base, coefficient)`` pairs and bases are tuples carrying their shape:

    ("t", shape, id)             an opaque term (its hash-consed id in the store)
    ("exp", shape, W)            e ** W, W a form of that shape
    ("lse", shape, D, c, ids)    log sum over D of exp(c * piece), pieces = the ids of the terms
                                 whose union (along dims in D) is reduced; adjacent slices joined
    ("lsef", shape, D, R)        log sum over D of exp(R), R a general form (no merging)
    ("view", shape, base)        a reshape of a base (row-major)
    ("bc", shape, base)          a base broadcast to shape (same rank, size-1 dims expanded)

A term no rule applies to is its own opaque base, so the form is always defined; what it decides
is equality, never inequality.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from gg_notebook.ir.specs import reduced_dims

from gg_notebook.relations.expr import Expr, ExprStore, ShapeError

aten = torch.ops.aten

MAX_TERMS = 32  # a product with more terms is left opaque (completeness, not soundness)

Form = frozenset


def _floating(e: Expr) -> bool:
    return e.dtype is not None and e.dtype.is_floating_point


class _Fail(Exception):
    """A rule does not apply: the term stays opaque."""


class RealForms:
    """Normal forms of the terms of one store (memoized by term id)."""

    def __init__(self, store: ExprStore, linear=None) -> None:
        from gg_notebook.relations.linear import LinearForms

        self.S = store
        self.linear = linear if linear is not None else LinearForms(store)
        self._memo: dict[int, Form] = {}

    # ------------------------------------------------------------------ public
    def of(self, t: Expr) -> Form:
        hit = self._memo.get(t.id)
        if hit is not None:
            return hit
        form = None
        if _floating(t) and not t.ground:
            try:
                form = self._form(t)
            except (_Fail, ShapeError, RecursionError):
                form = None
        if form is None:
            form = frozenset({(self._opaque(t), Fraction(1))})
        self._memo[t.id] = form
        return form

    def key(self, t: Expr):
        """(shape, dtype, form), or None when the linear form is too large to compute."""
        from gg_notebook.relations.linear import TooLarge

        try:
            return (tuple(t.shape), t.dtype, self.of(t))
        except TooLarge:
            return None

    # ------------------------------------------------------------------ structure
    def _opaque(self, t: Expr):
        return ("t", tuple(t.shape), t.id)

    def _form(self, t: Expr) -> Form:
        pairs = []
        for b, c in self.linear.of(t, 30):
            for bb, k in self._base(b):
                pairs.append((bb, c * k))
        return self._norm(pairs)

    def _base(self, b: Expr) -> Form:
        """The form of a base of the linear form (a term no linear rule rewrites)."""
        if not _floating(b) or b.ground:
            return frozenset({(self._opaque(b), Fraction(1))})
        try:
            f = self._rule(b)
        except (_Fail, ShapeError):
            f = None
        if f is None:
            return frozenset({(self._opaque(b), Fraction(1))})
        return f

    def _sub(self, a: Expr) -> Form:
        """The form of an argument (a different term than the one being normalized)."""
        return self.of(a)

    def _rule(self, b: Expr) -> Form | None:
        op = b.op
        if op == "view":
            a = b.args[0]
            if a.dtype != b.dtype:
                return None
            inner = self._sub(a)
            if self._is_opaque(inner, a):
                return None
            return self.view_form(inner, tuple(b.shape))
        if op == "expand":
            a = b.args[0]
            return self.bc_form(self._sub(a), tuple(a.shape), tuple(b.shape))
        if op != "call":
            return None
        spec = b.attrs
        if spec.unique is not None or spec.out is not None:
            return None
        target = spec.target
        shape = tuple(b.shape)
        if target is aten.exp.default:
            (a,) = b.args
            if a.dtype != b.dtype:
                return None
            return self.exp_form(self._sub(a), shape)
        if target is aten.log.default:
            (a,) = b.args
            if a.dtype != b.dtype:
                return None
            return self.log_form(self._sub(a))
        if target in (aten.mul.Tensor, aten.div.Tensor):
            if len(b.args) != 2 or any(a.dtype != b.dtype for a in b.args):
                return None
            if target is aten.div.Tensor and spec.arg("rounding_mode", None) is not None:
                return None
            sa, so = spec.slot_of("self"), spec.slot_of("other")
            if sa is None or so is None:
                return None
            x, y = b.args[sa], b.args[so]
            fx = self.bc_form(self._sub(x), tuple(x.shape), shape)
            fy = self.bc_form(self._sub(y), tuple(y.shape), shape)
            if target is aten.div.Tensor:
                fy = self.inverse(fy)
            return self.mul_form(fx, fy)
        if spec.kind == "reduce" and target in (aten.sum.dim_IntList, aten.logsumexp.default):
            (a,) = b.args
            if a.dtype != b.dtype or (target is aten.sum.dim_IntList and spec.arg("dtype", None) not in (None, a.dtype)):
                return None
            in_shape = tuple(a.shape)
            D = reduced_dims(spec.arg("dim"), len(in_shape))
            keep = bool(spec.arg("keepdim"))
            fa = self._sub(a)
            if target is aten.logsumexp.default:
                s = self.sum_exp_form(self.exp_form(fa, in_shape), in_shape, D)
                out = self.log_form(s)
            else:
                out = self.sum_exp_form(fa, in_shape, D)
            return self.view_form(out, shape) if keep else out
        if spec.kind == "softmax" and target in (aten._softmax.default, aten._log_softmax.default):
            (a,) = b.args
            if spec.arg("half_to_float") is not False or a.dtype != b.dtype:
                return None
            d = int(spec.arg("dim")) % len(a.shape)
            in_shape = tuple(a.shape)
            fa = self._sub(a)
            lse = self.log_form(self.sum_exp_form(self.exp_form(fa, in_shape), in_shape, (d,)))
            red = tuple(s for i, s in enumerate(in_shape) if i != d)
            kd = tuple(1 if i == d else s for i, s in enumerate(in_shape))
            lse_b = self.bc_form(self.view_form(lse, kd), kd, in_shape) if red != in_shape else lse
            diff = self.add_forms(fa, lse_b, -1)
            return diff if target is aten._log_softmax.default else self.exp_form(diff, in_shape)
        return None

    def _is_opaque(self, f: Form, t: Expr) -> bool:
        return len(f) == 1 and next(iter(f)) == (self._opaque(t), Fraction(1))

    # ------------------------------------------------------------------ form algebra
    def _norm(self, pairs) -> Form:
        acc: dict = {}
        for b, c in pairs:
            acc[b] = acc.get(b, Fraction(0)) + c
        items = [(b, c) for b, c in acc.items() if c != 0]
        items = self._merge_lse(items)
        return frozenset(items)

    def add_forms(self, a: Form, b: Form, k=1) -> Form:
        return self._norm(list(a) + [(bb, c * k) for bb, c in b])

    def exp_form(self, w: Form, shape) -> Form:
        if not w:
            raise _Fail("exp(0)")
        return frozenset({(("exp", tuple(shape), w), Fraction(1))})

    def log_form(self, f: Form) -> Form:
        if len(f) == 1:
            (b, c), = f
            if b[0] == "exp" and c == 1:
                return b[2]
        raise _Fail("log of a non-exponential")

    def inverse(self, f: Form) -> Form:
        if len(f) == 1:
            (b, c), = f
            if b[0] == "exp":
                w = frozenset((bb, -k) for bb, k in b[2])
                return frozenset({(("exp", b[1], w), 1 / c)})
        raise _Fail("1 / a non-exponential")

    def mul_form(self, a: Form, b: Form) -> Form:
        if len(a) * len(b) > MAX_TERMS:
            raise _Fail("too many terms")
        if not all(x[0] == "exp" for x, _ in b):
            a, b = b, a
        if not all(x[0] == "exp" for x, _ in b):
            raise _Fail("a product of two non-exponentials")
        out = []
        for x, cx in a:
            for y, cy in b:
                if x[0] != "exp":
                    raise _Fail("a product with a non-exponential")
                out.append((("exp", x[1], self.add_forms(x[2], y[2])), cx * cy))
        return self._norm(out)

    # ------------------------------------------------------------------ shapes
    def view_base(self, b, to):
        to = tuple(to)
        if b[1] == to:
            return b
        kind = b[0]
        if kind == "t":
            return ("t", to, self.S.view(self.S.nodes[b[2]], to).id)
        if kind == "exp":
            return ("exp", to, self.view_form(b[2], to))
        if kind == "view":
            return self.view_base(b[2], to)
        return ("view", to, b)

    def view_form(self, f: Form, to) -> Form:
        return self._norm((self.view_base(b, to), c) for b, c in f)

    def bc_base(self, b, to):
        to = tuple(to)
        if b[1] == to:
            return b
        kind = b[0]
        if kind == "exp":
            return ("exp", to, self.bc_form(b[2], b[1], to))
        if kind == "bc":
            return ("bc", to, b[2])
        return ("bc", to, b)

    def bc_form(self, f: Form, frm, to) -> Form:
        frm, to = tuple(frm), tuple(to)
        if frm == to:
            return f
        if len(frm) > len(to):
            raise _Fail("not a broadcast")
        if len(frm) < len(to):
            frm = (1,) * (len(to) - len(frm)) + frm
            f = self.view_form(f, frm)
        if any(a != b and a != 1 for a, b in zip(frm, to)):
            raise _Fail("not a broadcast")
        return self._norm((self.bc_base(b, to), c) for b, c in f)

    # ------------------------------------------------------------------ sums of exponentials
    def sum_exp_form(self, f: Form, in_shape, D) -> Form:
        """The form of ``sum_D(y)`` (keepdim=False) for y of form ``f``: each exponential base
        becomes exp(C + LSE_D(R)); a form with another base is not handled."""
        in_shape = tuple(in_shape)
        out = []
        for b, c in f:
            if b[0] != "exp":
                raise _Fail("a sum of non-exponentials (left to the linear form)")
            for bb, k in self._sum_exp(b[2], in_shape, D):
                out.append((bb, c * k))
        return self._norm(out)

    def _const_along(self, b, D) -> bool:
        return b[0] == "bc" and all(b[2][1][d] == 1 for d in D)

    def _sum_exp(self, w: Form, in_shape, D) -> Form:
        red = tuple(s for i, s in enumerate(in_shape) if i not in D)
        if all(in_shape[d] == 1 for d in D):
            return self.exp_form(self.view_form(w, red), red)
        R, C = [], []
        for b, c in w:
            (C if self._const_along(b, D) else R).append((b, c))
        c_red = []
        for b, c in C:
            inner = b[2]
            ishape = inner[1]
            ired = tuple(s for i, s in enumerate(ishape) if i not in D)
            v = self.view_base(inner, ired)
            c_red.append((self.bc_base(v, red) if ired != red else v, c))
        c_form = self._norm(c_red)
        n = math.prod(in_shape[d] for d in D)
        if not R:
            return frozenset({(("exp", red, c_form), Fraction(n))}) if c_form else self._fail("sum of exp(0)")
        if len(R) == 1 and R[0][0][0] == "t":
            (b, c), = R
            term = self.S.nodes[b[2]]
            pieces = _flatten_cat(term, D)
            if len(pieces) > 1 and any(not self._is_opaque(self.of(p), p) for p in pieces):
                total = []
                for p in pieces:
                    fp = frozenset((bb, c * k) for bb, k in self.of(p))
                    for bb, k in self._sum_exp(fp, tuple(p.shape), D):
                        total.append((bb, k))
                total = self._norm(total)
                return self._times_exp(total, c_form)
            L = ("lse", red, tuple(D), c, self._canon_pieces([p.id for p in pieces], D))
        else:
            L = ("lsef", red, tuple(D), frozenset(R))
        return frozenset({(("exp", red, self._norm([(L, Fraction(1))] + c_red)), Fraction(1))})

    def _fail(self, why):
        raise _Fail(why)

    def _times_exp(self, f: Form, c_form: Form) -> Form:
        out = []
        for b, k in f:
            if b[0] != "exp":
                raise _Fail("not an exponential")
            out.append((("exp", b[1], self.add_forms(b[2], c_form)), k))
        return self._norm(out)

    def _canon_pieces(self, ids, D) -> tuple:
        """The pieces of a union, adjacent slices of one tensor joined (``cat`` normalizes them)."""
        terms = [self.S.nodes[i] for i in ids]
        changed = True
        while changed and len(terms) > 1:
            changed = False
            for i in range(len(terms)):
                for j in range(len(terms)):
                    if i == j:
                        continue
                    for d in D:
                        try:
                            j_ = self.S.cat([terms[i], terms[j]], d)
                        except ShapeError:
                            continue
                        if j_.op != "cat":
                            terms = [t for k, t in enumerate(terms) if k not in (i, j)] + [j_]
                            changed = True
                            break
                    if changed:
                        break
                if changed:
                    break
        return tuple(sorted(t.id for t in terms))

    def _merge_lse(self, items):
        """exp(C + LSE_D(P)) * k + exp(C + LSE_D(Q)) * k = exp(C + LSE_D(P u Q)) * k (the pieces of
        a row split across ranks, summed by an all-reduce), wrappers (views, broadcasts) alike."""
        groups: dict = {}
        rest = []
        for b, c in items:
            if b[0] != "exp":
                rest.append((b, c))
                continue
            lse = [(x, k) for x, k in b[2] if k == 1 and _core(x)[0] == "lse"]
            if len(lse) != 1:
                rest.append((b, c))
                continue
            x = lse[0][0]
            wrappers, core = _unwrap(x)
            others = frozenset(p for p in b[2] if p[0] != x)
            gkey = (b[1], c, wrappers, core[1], core[2], core[3], others)
            groups.setdefault(gkey, []).append((b, c, core))
        if not any(len(g) > 1 for g in groups.values()):
            return items
        out = list(rest)
        for gkey, members in groups.items():
            if len(members) == 1:
                out.append(members[0][:2])
                continue
            shape, c, wrappers, red, D, coef, others = gkey
            ids = [i for _, _, core in members for i in core[4]]
            core = ("lse", red, D, coef, self._canon_pieces(ids, D))
            x = _rewrap(wrappers, core)
            out.append((("exp", shape, frozenset(others | {(x, Fraction(1))})), c))
        return out


def _unwrap(x):
    wrappers = []
    while x[0] in ("view", "bc"):
        wrappers.append((x[0], x[1]))
        x = x[2]
    return tuple(wrappers), x


def _rewrap(wrappers, core):
    for kind, shape in reversed(wrappers):
        core = (kind, shape, core)
    return core


def _core(x):
    return _unwrap(x)[1]


def _flatten_cat(t: Expr, D) -> list[Expr]:
    if t.op == "cat" and t.attrs in D:
        out = []
        for a in t.args:
            out.extend(_flatten_cat(a, D))
        return out
    return [t]


# ---------------------------------------------------------------------------- the index side
def forms_of(index) -> RealForms:
    """The `RealForms` of an index's store (built once per index)."""
    rf = getattr(index, "_real_forms", None)
    if rf is None:
        rf = RealForms(index.store, index.forms)
        index._real_forms = rf
    return rf


_EXP_LOG = frozenset({"exp", "log", "logsumexp", "_softmax", "_log_softmax", "softmax", "log_softmax"})


def _near_exp_or_log(t: Expr, depth: int = 3) -> bool:
    """Is there an exp / log / log-sum-exp / softmax at most ``depth`` operators below ``t``? Only
    such values can differ from a spelling by what this normal form rewrites; indexing the forms
    of every value of a large graph costs seconds."""
    stack, seen = [(t, 0)], set()
    while stack:
        x, k = stack.pop()
        if x.id in seen:
            continue
        seen.add(x.id)
        if x.op == "call":
            target = x.attrs.target
            packet = getattr(getattr(target, "overloadpacket", None), "__name__", "")
            if packet in _EXP_LOG:
                return True
        if k < depth:
            stack.extend((a, k + 1) for a in x.args)
    return False


def realized_by_form(index, term: Expr):
    """A distributed value whose real normal form equals ``term``'s (same shape and dtype)."""
    if not _floating(term):
        return None
    candidates = index.same_inputs(term)  # equal forms read the same inputs
    if not candidates:
        return None
    rf = forms_of(index)
    keys = getattr(index, "_real_key", None)
    if keys is None:
        keys = index._real_key = {}  # dval id -> its real normal form key (None: none)
    k = rf.key(term)
    if k is None:
        return None
    for d in candidates:
        if d.id not in keys:
            keys[d.id] = rf.key(d.term) if not d.term.ground and _near_exp_or_log(d.term) else None
        if keys[d.id] == k:
            return d
    return None


# ---------------------------------------------------------------------------- the synthetic operator
class RealValue:
    """A value given by a formula over its arguments (an expression over placeholder atoms),
    related to a rank value equal to it over the reals (`match_real_value`)."""

    __slots__ = ("formula", "holes", "label")

    def __init__(self, formula: Expr, holes: tuple, label: str) -> None:
        self.formula, self.holes, self.label = formula, tuple(holes), label

    def __call__(self, *tensors):
        from gg_notebook.relations.expr import evaluate

        pos = {h.id: i for i, h in enumerate(self.holes)}
        return evaluate(self.formula, lambda leaf: tensors[pos[leaf.id]])

    def __eq__(self, other) -> bool:
        return isinstance(other, RealValue) and self.formula is other.formula and self.holes == other.holes

    def __hash__(self) -> int:
        return hash((self.formula.id, tuple(h.id for h in self.holes)))

    def __repr__(self) -> str:
        return f"real[{self.label}]"


_HOLE = 0


def real_value(S: ExprStore, args, build, label: str) -> Expr:
    """``call(real_value, args)`` whose value is ``build(S, holes)`` with holes standing for args."""
    from gg_notebook.relations.expr import OpSpec, Slot

    holes = tuple(S.atom(f"$real{i}{tuple(a.shape)}", tuple(a.shape), a.dtype) for i, a in enumerate(args))
    formula = build(S, list(holes))
    fn = RealValue(formula, holes, label)
    spec = OpSpec("real_value", f"real[{label}]", fn, (tuple(Slot(i) for i in range(len(args))), ()),
                  (("label", label), ("blame", "consumer")))
    return S.call(spec, list(args))


def substitute(S: ExprStore, formula: Expr, binding: dict) -> Expr:
    """``formula`` with every placeholder atom (by id) replaced by the term ``binding`` gives."""
    from gg_notebook.engine.infer import rebuild

    memo: dict[int, Expr] = {}
    stack = [formula]
    while stack:
        x = stack[-1]
        if x.id in memo:
            stack.pop()
            continue
        if x.id in binding:
            memo[x.id] = binding[x.id]
            stack.pop()
            continue
        todo = [a for a in x.args if a.id not in memo]
        if todo:
            stack.extend(todo)
            continue
        stack.pop()
        memo[x.id] = rebuild(S, x, [memo[a.id] for a in x.args]) if x.args else x
    return memo[formula.id]


def match_real_value(engine, spec, args) -> Expr | None:
    """A rank value equal over the reals to the formula applied to ``args``' terms."""
    if getattr(engine, "bitwise", False):
        return None
    fn = spec.target
    terms = [engine.to_term(a) for a in args]
    t = substitute(engine.store, fn.formula, {h.id: x for h, x in zip(fn.holes, terms)})
    index = engine.index
    d = index.realized(t)
    if d is None:
        d = realized_by_form(index, t)
    return index.ref(d) if d is not None else None
