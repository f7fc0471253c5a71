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

from gg_notebook.relations.expr import Expr, ExprStore, ShapeError, fold

aten = torch.ops.aten

MAX_TERMS = 32  # a product with more terms is left opaque (completeness, not soundness)

Form = frozenset


def _floating(e: Expr) -> bool:
    return e.dtype is not None and e.dtype.is_floating_point


class _Fail(Exception):
    """A rule does not apply: the term stays opaque."""


class RealForms:
    """Normal forms of the terms of one store (memoized by term id)."""

    def __init__(self, store: ExprStore, linear=None, cut: frozenset = frozenset()) -> None:
        from gg_notebook.relations.linear import LinearForms

        self.S = store
        self.linear = linear if linear is not None else LinearForms(store, cut=cut)
        self.cut = cut  # term ids taken as opaque bases (see LinearForms.cut)
        self._memo: dict[int, Form] = {}

    # ------------------------------------------------------------------ public
    def of(self, t: Expr) -> Form:
        hit = self._memo.get(t.id)
        if hit is not None:
            return hit
        form = None
        if _floating(t) and not t.ground and t.id not in self.cut:
            try:
                form = self._form(t)
            except (_Fail, ShapeError, RecursionError):
                form = None
        if form is None:
            form = frozenset({(self._opaque(t), Fraction(1))})
        self._memo[t.id] = form
        return form

    def key(self, t: Expr):
        """(shape, dtype, form)."""
        return (tuple(t.shape), t.dtype, self.of(t))

    # ------------------------------------------------------------------ structure
    def _opaque(self, t: Expr):
        return ("t", tuple(t.shape), t.id)

    def _form(self, t: Expr) -> Form:
        pairs = []
        lin = list(self.linear.of(t))  # (every term's linear form once, arguments first: LinearForms.of)
        lin, extra = self._log_sigmoid_pairs(lin)
        pairs.extend(extra)
        for b, c in lin:
            for bb, k in self._base(b):
                pairs.append((bb, c * k))
        return self._norm(pairs)

    def _log_sigmoid_pairs(self, lin):
        """PyTorch's decomposition of ``F.logsigmoid(x)``, ``minimum(0, x) - log1p(exp(-abs(x)))``,
        as two bases of a linear form with opposite coefficients: replaced by logsigmoid's form."""
        if len(lin) < 2:
            return lin, []
        mins = {}
        for i, (b, c) in enumerate(lin):
            x = _min_zero_arg(b)
            if x is not None:
                mins[x.id] = (i, c, x)
        if not mins:
            return lin, []
        used, extra = set(), []
        for j, (b, c) in enumerate(lin):
            x = _log1p_exp_neg_abs_arg(b)
            if x is None or x.id not in mins:
                continue
            i, ci, _ = mins[x.id]
            if ci != -c or i in used or j in used or b.shape != lin[i][0].shape:
                continue
            try:
                f = self.log_sigmoid_form(self._sub(x))
            except (_Fail, ShapeError):
                continue
            used.update((i, j))
            extra.extend((bb, ci * k) for bb, k in f)
        return [p for k, p in enumerate(lin) if k not in used], extra

    def _sigmoid_parts(self, f: Form):
        """(A, W) with ``f = A - B`` (A: the positive terms, B: the negated negative ones) and
        ``exp(W) = exp(A) + exp(B)`` merged into one exponential (log-sum-exp pieces); else _Fail."""
        A = frozenset((b, c) for b, c in f if c > 0)
        B = frozenset((b, -c) for b, c in f if c < 0)
        shape = next(iter(f))[0][1] if f else None
        if not A or not B or shape is None:
            raise _Fail("sigmoid of a one-sided form")
        total = self._norm([(("exp", shape, A), Fraction(1)), (("exp", shape, B), Fraction(1))])
        return A, self.log_form(total)

    def sigmoid_form(self, f: Form, shape) -> Form:
        """``sigmoid(A - B) = exp(A) / (exp(A) + exp(B)) = exp(A - W)``."""
        A, W = self._sigmoid_parts(f)
        return self.exp_form(self.add_forms(A, W, -1), shape)

    def log_sigmoid_form(self, f: Form) -> Form:
        """``logsigmoid(A - B) = A - log(exp(A) + exp(B)) = A - W``."""
        A, W = self._sigmoid_parts(f)
        return self.add_forms(A, W, -1)

    def _base(self, b: Expr) -> Form:
        """The form of a base of the linear form (a term no linear rule rewrites)."""
        if not _floating(b) or b.ground or b.id in self.cut:
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
        if target is aten.logaddexp.default:  # log(exp(x) + exp(y)), broadcast to the output
            if len(b.args) != 2 or any(a.dtype != b.dtype for a in b.args):
                return None
            x, y = b.args
            ex = self.exp_form(self.bc_form(self._sub(x), tuple(x.shape), shape), shape)
            ey = self.exp_form(self.bc_form(self._sub(y), tuple(y.shape), shape), shape)
            return self.log_form(self.add_forms(ex, ey))
        if target is aten.sigmoid.default:
            (a,) = b.args
            if a.dtype != b.dtype:
                return None
            return self.sigmoid_form(self._sub(a), shape)
        if target in (aten.mul.Tensor, aten.div.Tensor):
            if len(b.args) != 2 or any(a.dtype != b.dtype for a in b.args):
                return None
            if target is aten.div.Tensor and spec.arg("rounding_mode", None) is not None:
                return None
            sa, so = spec.slot_of("self"), spec.slot_of("other")
            if sa is None or so is None:
                return None
            x, y = b.args[sa], b.args[so]
            c = _uniform_number(x) if target is aten.div.Tensor else None
            if c is not None and not y.ground:  # c / y for a constant c filled with one number
                return self.scale_form(self.inverse(self.bc_form(self._sub(y), tuple(y.shape), shape)), c)
            fx = self.bc_form(self._sub(x), tuple(x.shape), shape)
            fy = self.bc_form(self._sub(y), tuple(y.shape), shape)
            if target is aten.div.Tensor:
                fy = self.inverse(fy)
            return self.mul_form(fx, fy)
        if target in (aten.bmm.default, aten.mm.default):
            return self.matmul_form(b)
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
                try:
                    out = self.sum_exp_form(fa, in_shape, D)
                except _Fail:
                    out = self.sum_of_slices(a, D)
                    if out is None:
                        raise
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

    def matmul_form(self, b: Expr) -> Form | None:
        """``mm(P, v)`` / ``bmm(P, v)`` with ``P = sum_i k_i exp(W_i)``: linear in ``P``, and a part
        ``C`` of ``W_i`` constant along the contracted (last) dim of ``P`` factors out of each row:
        ``mm(exp(C + R), v) = exp(C) * mm(exp(R), v)``. The product ``mm(exp(R), v)`` is the base
        ``("lmm", out_shape, R, v)``, written *inside* an exponent as its formal logarithm, so that
        ``exp(C + lmm)`` denotes ``exp(C) * mm(exp(R), v)`` and exponentials multiply into it
        (an online-softmax merge rescales unnormalized partial outputs this way). Only exponents
        are ever added to it: no rule takes the logarithm of an ``lmm`` value apart."""
        p, v = b.args
        if p.dtype != b.dtype or v.dtype != b.dtype or len(p.shape) != len(b.shape):
            return None
        pshape, oshape = tuple(p.shape), tuple(b.shape)
        last = len(pshape) - 1
        fp = self._sub(p)
        out = []
        for base, k in fp:
            if base[0] != "exp":
                raise _Fail("a matmul of a non-exponential")
            R, C = [], []
            for x, c in base[2]:
                (C if self._const_along(x, (last,)) else R).append((x, c))
            if not R:
                raise _Fail("a matmul of a row constant")
            c_out = []
            for x, c in C:
                inner = x[2]  # ("bc", pshape, inner) with inner's last dim 1
                c_out.append((self.bc_base(inner, oshape) if inner[1] != oshape else inner, c))
            lmm = ("lmm", oshape, self._norm(R), v.id)
            out.append((("exp", oshape, self._norm(c_out + [(lmm, Fraction(1))])), k))
        return self._norm(out)

    def sum_of_slices(self, a: Expr, D) -> Form | None:
        """``sum_d(a)`` over one small dim ``d`` along which ``a`` is built from a concatenation (the
        stack of gathered per-rank values) = the sum of the forms of its slices ``a[i]`` (each
        written by pushing the slice through elementwise operators down to the concatenation)."""
        if len(D) != 1:
            return None
        d = D[0]
        size = a.shape[d]
        if size > MAX_SLICES or size < 2 or not _cat_below(a, d):
            return None
        red = tuple(s for i, s in enumerate(a.shape) if i != d)
        pairs = []
        for i in range(size):
            t = _slice_through(self.S, a, d, i)
            if t is None:
                return None
            for b, c in self.view_form(self.of(t), red):
                pairs.append((b, c))
        return self._norm(pairs)

    def _is_opaque(self, f: Form, t: Expr) -> bool:
        return len(f) == 1 and next(iter(f)) == (self._opaque(t), Fraction(1))

    # ------------------------------------------------------------------ form algebra
    def _norm(self, pairs) -> Form:
        acc: dict = {}
        for b, c in pairs:
            acc[b] = acc.get(b, Fraction(0)) + c
        items = [(b, c) for b, c in acc.items() if c != 0]
        items = self._merge_lse(items)
        items = self._complement_lse(items)
        return frozenset(items)

    def _complement_lse(self, items):
        """``k exp(W) - k exp(W + L(P) - L(Q)) = k exp(W + L(Q minus P) - L(Q))`` for log-sum-exp
        bases over pieces P a proper part of Q (``exp L(Q) = exp L(P) + exp L(Q minus P)``): one minus
        a sigmoid weight is the weight of the other pieces (ring attention's output update)."""
        exps = [(i, b, c) for i, (b, c) in enumerate(items) if b[0] == "exp"]
        if len(exps) < 2 or not any(c < 0 for _, _, c in exps) or not any(c > 0 for _, _, c in exps):
            return items
        for i, b1, c1 in exps:
            for j, b2, c2 in exps:
                if i == j or c2 != -c1 or b1[1] != b2[1]:
                    continue
                diff = self._norm_plain(list(b2[2]) + [(x, -k) for x, k in b1[2]])
                if len(diff) != 2:
                    continue
                (x1, k1), (x2, k2) = sorted(diff, key=lambda p: -p[1])
                if k1 != 1 or k2 != -1:
                    continue
                w1, core1 = _unwrap(x1)
                w2, core2 = _unwrap(x2)
                if w1 != w2 or core1[0] != "lse" or core2[0] != "lse" or core1[1:4] != core2[1:4]:
                    continue
                p1, p2 = list(core1[4]), list(core2[4])
                rest = list(p2)
                try:
                    for x in p1:
                        rest.remove(x)
                except ValueError:
                    continue
                if not rest:
                    continue
                core3 = ("lse",) + core1[1:4] + (self._canon_pieces(rest, core1[2]),)
                w = self._norm_plain(list(b1[2]) + [(_rewrap(w1, core3), Fraction(1)), (x2, Fraction(-1))])
                if not w:
                    continue
                out = [p for k, p in enumerate(items) if k not in (i, j)] + [(("exp", b1[1], w), c1)]
                return self._complement_lse(self._merge_lse(out))
        return items

    @staticmethod
    def _norm_plain(pairs) -> Form:
        acc: dict = {}
        for b, c in pairs:
            acc[b] = acc.get(b, Fraction(0)) + c
        return frozenset((b, c) for b, c in acc.items() if c != 0)

    def scale_form(self, f: Form, c: Fraction) -> Form:
        return self._norm([(b, k * c) for b, k in f])

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
        if kind == "bc":
            inner = b[2]
            frm, ishape = b[1], inner[1]
            # a broadcast along the last dim only, viewed with the last dim kept: broadcast the view
            if (len(frm) == len(ishape) and frm[:-1] == ishape[:-1] and ishape[-1] == 1 and to and to[-1] == frm[-1]
                    and math.prod(to[:-1]) == math.prod(frm[:-1])):
                return self.bc_base(self.view_base(inner, to[:-1] + (1,)), to)
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
        if len(R) > 1:
            R = self._refold(R, in_shape)
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

    def _refold(self, R: list, shape) -> list:
        """``R`` (several bases, e.g. the logits ``h @ W`` distributed over the terms of a residual
        stream ``h``) as the one term whose linear normal form it is, when such a term exists: the
        log-sum-exp of a row then sees the row as that term, which rank pieces concatenate to.
        Equal linear forms are equal values, so this is a change of spelling only."""
        if any(b[0] != "t" or b[1] != tuple(shape) for b, _ in R):
            return R
        memo = self.linear._memo
        rev = getattr(self, "_rev", None)
        if rev is None or self._rev_n != len(memo):
            rev = {}
            for tid, form in memo.items():
                if len(form) < 2:
                    continue
                key = frozenset((b.id, c) for b, c in form)
                if key not in rev or tid < rev[key]:
                    rev[key] = tid
            self._rev, self._rev_n = rev, len(memo)
        tid = rev.get(frozenset((b[2], c) for b, c in R))
        if tid is None or tuple(self.S.nodes[tid].shape) != tuple(shape):
            return R
        return [(("t", tuple(shape), tid), Fraction(1))]

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


MAX_SLICES = 16


def _uniform_number(e: Expr) -> Fraction | None:
    """The exact rational every element of a ground constant equals (nonzero), or None."""
    if not e.ground or e.dtype is None or not e.dtype.is_floating_point:
        return None
    from gg_notebook.lemmas.loss_reduce import ground_value
    from gg_notebook.relations.linear import coefficient

    v = ground_value(e)
    if v is None or v.numel() == 0:
        return None
    flat = v.reshape(-1)
    if not bool((flat == flat[0]).all()):
        return None
    c = coefficient(float(flat[0]))
    return c if c else None


def _call_of(e: Expr, target, n: int) -> bool:
    return e.op == "call" and e.attrs.target is target and len(e.args) == n and e.attrs.out is None


def _is_zero_const(e: Expr) -> bool:
    from gg_notebook.lemmas.masking import is_zero

    return e.ground and is_zero(e)


def _min_zero_arg(b: Expr) -> Expr | None:
    """x for ``minimum(0, x)`` / ``minimum(x, 0)`` (a zero constant, same dtype)."""
    if not _call_of(b, aten.minimum.default, 2):
        return None
    u, v = b.args
    if _is_zero_const(u) and not _is_zero_const(v) and v.dtype == b.dtype and tuple(v.shape) == tuple(b.shape):
        return v
    if _is_zero_const(v) and not _is_zero_const(u) and u.dtype == b.dtype and tuple(u.shape) == tuple(b.shape):
        return u
    return None


def _log1p_exp_neg_abs_arg(b: Expr) -> Expr | None:
    """x for ``log1p(exp(neg(abs(x))))``."""
    if not _call_of(b, aten.log1p.default, 1):
        return None
    e = b.args[0]
    if not _call_of(e, aten.exp.default, 1):
        return None
    n = e.args[0]
    if not _call_of(n, aten.neg.default, 1):
        return None
    a = n.args[0]
    if not _call_of(a, aten.abs.default, 1):
        return None
    x = a.args[0]
    return x if x.dtype == b.dtype and tuple(x.shape) == tuple(b.shape) else None


def _cat_below(t: Expr, d: int, depth: int = 4) -> bool:
    """Is there a concatenation along ``d`` within ``depth`` elementwise operators of ``t``?"""
    if t.op == "cat" and t.attrs == d:
        return True
    if depth == 0 or t.op != "call" or t.attrs.kind != "ew":
        return False
    return any(len(x.shape) == len(t.shape) and x.shape[d] == t.shape[d] and _cat_below(x, d, depth - 1)
               for x in t.args)


def _slice_through(S: ExprStore, t: Expr, d: int, i: int, depth: int = 8) -> Expr | None:
    """A term equal to ``t[i:i+1]`` along ``d``, with the slice pushed through elementwise
    operators (operands of size 1 along ``d`` broadcast: kept whole) into a concatenation along
    ``d``; None if some operator is in the way."""
    if t.shape[d] == 1:
        return t
    if t.op == "cat" and t.attrs == d:
        return S.slice(t, d, i, i + 1)
    if depth == 0 or t.op != "call" or t.attrs.kind != "ew" or t.attrs.unique is not None:
        return None
    nd = len(t.shape)
    args = []
    for x in t.args:
        k = len(x.shape) - (nd - d)  # x's dim aligned with d (broadcasting aligns the trailing dims)
        if k < 0 or x.shape[k] == 1:
            args.append(x)  # broadcast along d: the same operand for every slice
            continue
        if len(x.shape) != nd or x.ground:
            return None
        y = _slice_through(S, x, d, i, depth - 1)
        if y is None:
            return None
        args.append(y)
    try:
        return S.call(t.attrs, args)
    except ShapeError:
        return None


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


_EXP_LOG = frozenset({"exp", "log", "logsumexp", "_softmax", "_log_softmax", "softmax", "log_softmax", "sigmoid", "log1p",
                     "logaddexp"})


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


def _held_below(index, terms) -> frozenset:
    """Ids of the rank values a formula's arguments are made of by data movement and sums (the
    shards of a concatenated or all-reduced argument): where a form relative to a cut stops."""
    out, stack, seen = set(), list(terms), set()
    while stack:
        x = stack.pop()
        if x.id in seen:
            continue
        seen.add(x.id)
        if index.realized(x) is not None:
            out.add(x.id)
        elif x.op in ("view", "permute", "slice", "expand", "cat", "accum"):
            stack.extend(x.args)
    return frozenset(out)


def realized_by_form(index, term: Expr, args=()):
    """A distributed value whose real normal form equals ``term``'s (same shape and dtype).

    With forms cut at the rank values ``args`` (the formula's arguments) are made of, when there
    are such values: a rank that computes the same function of them matches without normalizing
    the whole model below them. Complete forms otherwise."""
    if not _floating(term):
        return None
    candidates = index.same_inputs(term)  # equal forms read the same inputs
    if not candidates:
        return None
    cut = _held_below(index, args)
    if cut:
        shallow = RealForms(index.store, cut=cut)
        k = shallow.key(term)
        if k is not None:
            for d in candidates:
                if not d.term.ground and _near_exp_or_log(d.term) and shallow.key(d.term) == k:
                    return d
        # A rank value computed from those same values had its chance; complete forms would walk the
        # whole model below them (an inference's largest cost on a GPT) for values spelled another
        # way below the cut, which the test suites never needed.
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


def real_value(S: ExprStore, args, build, label: str, scaled: bool = False) -> Expr:
    """``call(real_value, args)`` whose value is ``build(S, holes)`` with holes standing for args.
    ``scaled``: the matcher may relate it to a rank value up to an exact factor (a relation that is
    not clean until a later operator cancels the factor)."""
    from gg_notebook.relations.expr import OpSpec, Slot

    holes = tuple(S.atom(f"$real{i}{tuple(a.shape)}", tuple(a.shape), a.dtype) for i, a in enumerate(args))
    formula = build(S, list(holes))
    fn = RealValue(formula, holes, label)
    params = (("label", label), ("blame", "consumer")) + ((("scaled", True),) if scaled else ())
    spec = OpSpec("real_value", f"real[{label}]", fn, (tuple(Slot(i) for i in range(len(args))), ()), params)
    return S.call(spec, list(args))


def substitute(S: ExprStore, formula: Expr, binding: dict) -> Expr:
    """``formula`` with every placeholder atom (by id) replaced by the term ``binding`` gives."""
    from gg_notebook.engine.infer import rebuild

    # a bound placeholder stands for its term: pre-filled, it is never looked into
    memo: dict[int, Expr] = dict(binding)
    return fold(formula, lambda x, args: rebuild(S, x, args) if x.args else x, memo)


def _scaled_key(f: Form):
    """(f / c0, c0): the form divided by the coefficient of its base of least hash (a canonical
    choice within one process), so that proportional forms share the first item."""
    if not f:
        return None
    b0, c0 = min(f, key=lambda bc: (hash(bc[0]), repr(bc[1])))
    return frozenset((b, c / c0) for b, c in f), c0


def realized_by_form_up_to_factor(index, term: Expr):
    """(dval, f) with ``term == f * dval`` over the reals (real normal forms proportional by an exact
    rational f != 0), or None. The forms are compared exactly after scaling."""
    if not _floating(term):
        return None
    candidates = index.same_inputs(term)  # proportional forms read the same inputs
    if not candidates:
        return None
    rf = forms_of(index)
    k = rf.key(term)
    if k is None:
        return None
    sk = _scaled_key(k[2])
    if sk is None:
        return None
    keys = getattr(index, "_real_key", None)
    if keys is None:
        keys = index._real_key = {}
    for d in candidates:
        if d.id not in keys:
            keys[d.id] = rf.key(d.term) if not d.term.ground and _near_exp_or_log(d.term) else None
        kd = keys[d.id]
        if kd is None or kd[:2] != k[:2]:
            continue
        skd = _scaled_key(kd[2])
        if skd is None or skd[0] != sk[0]:
            continue
        f = sk[1] / skd[1]
        if frozenset((b, c * f) for b, c in kd[2]) == k[2]:
            return d, f
    return None


def match_real_value(engine, spec, args) -> Expr | None:
    """A rank value equal over the reals to the formula applied to ``args``' terms (or, for a
    formula tagged ``scaled``, a multiple of one: ``f * ref``, a relation up to a factor)."""
    if getattr(engine, "bitwise", False):
        return None
    fn = spec.target
    terms = [engine.to_term(a) for a in args]
    t = substitute(engine.store, fn.formula, {h.id: x for h, x in zip(fn.holes, terms)})
    index = engine.index
    d = index.realized(t)
    if d is None:
        d = realized_by_form(index, t, terms)
    if d is None:  # a rank value equal by the linear (scalar) normal form alone
        hit = index.realized_up_to_factor(t)
        if hit is not None and (hit[1] == 1 or spec.param("scaled")):
            return index.ref(hit[0]) if hit[1] == 1 else engine.store.scale(index.ref(hit[0]), hit[1])
    if d is None and spec.param("scaled"):
        hit = realized_by_form_up_to_factor(index, t)
        if hit is not None:
            return engine.store.scale(index.ref(hit[0]), hit[1])
    return index.ref(d) if d is not None else None
