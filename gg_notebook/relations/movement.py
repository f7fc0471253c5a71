"""Data movement decided exactly: the index-tensor decision procedure and the lookups built on it.

A *pure data-movement* term is built from ``view``, ``permute``, ``slice``, ``cat`` and ``expand``
over opaque *leaves* (any other node: an input atom, a compute call, a constant, an accumulation).
Every element of its value is one element of one leaf, at a position that depends only on shapes.
So two such terms are equal for *all* values of their leaves iff they are equal when every leaf
holds distinct integers (``arange`` with a different offset per leaf): the evaluated "index
tensors" say which leaf element each output element is.

The normalizing constructors of `ExprStore` give most spellings one node, but not all (a permute
of an expand versus an expand of a permute, ``repeat_interleave`` versus ``repeat_kv``, a stack
+ flatten versus a gather + transpose + reshape). This module decides the rest:

* `MovementIndex.equal(a, b)`: the decision procedure (memoized; refused above `MAX_NUMEL`
  elements, so meta-sized problems never allocate: they fall back to structural equality);
* `MovementIndex.realized(term)`: a distributed value whose term is index-equal to ``term``;
* `MovementIndex.call(spec, args)`: a rank's compute call whose arguments are index-equal to
  ``args`` (including the operand order of commutative operators);
* `MovementIndex.piece(term)`: a compute call that a rank applied to a *concatenation* along a
  position-wise dim is, piece by piece, the call on the pieces: ``mm(x, cat(a, b, dim=1))`` holds
  ``mm(x, a)`` as its columns ``[0, a.cols)``; the index knows every such piece as a slice of the
  rank's value (so a sequential ``mm(x, w)`` re-tiled into ``w``'s column blocks finds them);
* `retile(...)`: re-relate a value as another clean rebuild from realized values that are pure
  movement of the same leaves (a stuck operator's input tiled along another dim, e.g. Ulysses'
  sequence <-> heads re-layouts), by the index-tensor search of `gg_notebook.relations.layout`.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from gg_notebook.relations.expr import Expr, ExprStore, OpSpec, ShapeError, apply_op

MOVE_OPS = frozenset({"view", "permute", "slice", "cat", "expand"})
MAX_NUMEL = 1 << 20  # index tensors larger than this are not built (structural equality only)
MAX_CHECKS = 8  # candidates compared per lookup

_aten = torch.ops.aten
# operators whose two tensor operands commute (bit for bit: IEEE + and * are commutative)
_COMMUTATIVE = {
    _aten.mul.Tensor: (), _aten.add.Tensor: (("alpha", 1),), _aten.maximum.default: (),
    _aten.minimum.default: (), _aten.eq.Tensor: (), _aten.ne.Tensor: (), _aten.logical_and.default: (),
    _aten.logical_or.default: (), _aten.bitwise_and.Tensor: (), _aten.bitwise_or.Tensor: (),
}


def is_movement(e: Expr) -> bool:
    return e.op in MOVE_OPS


# ---------------------------------------------------------------------- products with one
def _is_one(c: Expr) -> bool:
    """``c`` holds exactly 1 in every element: a ``full`` factory or a uniform value node, under
    views / expands / slices / permutes (each keeps a uniform tensor uniform)."""
    from gg_notebook.ir.lower import _Full
    from gg_notebook.relations.expr import untyped
    from gg_notebook.relations.ground import Value

    while c.op in ("view", "expand", "slice", "permute"):
        c = c.args[0]
    if c.op != "const" or math.prod(c.shape) == 0 or c.dtype is None or c.dtype.is_complex:
        return False
    t = c.attrs.target
    if isinstance(t, _Full):
        v = untyped(t.value)
        return not isinstance(v, complex) and v == 1
    if isinstance(t, Value) and t.uniform and t.tensor.numel():
        return bool(t.tensor.reshape(-1)[0] == 1)
    return False


def _broadcasts_to(shape: tuple, out: tuple) -> bool:
    if len(shape) > len(out):
        return False
    return all(a == b or a == 1 for a, b in zip(shape[::-1], out[::-1]))


def unit_product_operand(e: Expr) -> Expr | None:
    """``x`` when ``e`` is ``x * 1`` (``aten.mul.Tensor`` by a tensor of ones in either order, or by
    the number 1) computed in ``x``'s own real dtype: then ``e`` is ``x`` broadcast to ``e``'s shape,
    for every value of ``x`` (IEEE ``x * 1 == x``: -0.0, infinities and NaN stay; integers and bools
    too). Complex ``e`` never (``inf * (1 + 0j)`` has a NaN part), nor a product whose dtype is not
    ``x``'s (a promotion rounds). This is data movement: the gradient of a sum is ``ones * dout``
    where another spelling has ``dout``."""
    if e.op != "call" or e.attrs.out is not None or e.dtype is None or e.dtype.is_complex:
        return None
    target = e.attrs.target
    if target is _aten.mul.Tensor and len(e.args) == 2:
        for x, c in ((e.args[0], e.args[1]), (e.args[1], e.args[0])):
            if x.dtype == e.dtype and _broadcasts_to(tuple(x.shape), tuple(e.shape)) and _is_one(c):
                return x
        return None
    if target in (_aten.mul.Tensor, _aten.mul.Scalar) and len(e.args) == 1:
        from gg_notebook.relations.expr import untyped

        other = untyped(e.attrs.arg("other", None))
        x = e.args[0]
        if (not isinstance(other, (complex, type(None))) and other == 1 and x.dtype == e.dtype
                and tuple(x.shape) == tuple(e.shape)):
            return x
    return None


class MovementIndex:
    """Index-tensor equality and movement-aware lookups over one `DIndex` (built lazily)."""

    def __init__(self, index) -> None:
        self.index = index
        self.store: ExprStore = index.store
        self._leaves: dict[int, tuple[int, ...] | None] = {}
        self._unit: dict[int, Expr | None] = {}
        self._eq: dict[tuple[int, int], bool] = {}
        self._by_sig: dict | None = None
        self._calls: dict | None = None
        self._ew: dict | None = None
        # piece term id -> (dval, dim, start, end): a call on a piece of a concatenated operand
        self.pieces: dict[int, tuple] = {}
        self._by_first_leaf: dict | None = None  # first leaf -> the values (index order) that move it first
        self._subset_index: dict = {}  # (shape-table key, argument position) -> {first leaf: positions}

    # ------------------------------------------------------------------ leaves and index tensors
    def leaves(self, e: Expr) -> tuple[int, ...]:
        """Ids of the opaque leaves ``e`` moves (``(e.id,)`` for a non-movement node), sorted."""
        hit = self._leaves.get(e.id)
        if hit is not None:
            return hit
        if e.op in MOVE_OPS:
            acc: set[int] = set()
            for a in e.args:
                acc.update(self.leaves(a))
            out = tuple(sorted(acc))
        else:
            x = self.unit(e)
            out = (e.id,) if x is None else self.leaves(x)
        self._leaves[e.id] = out
        return out

    def unit(self, e: Expr) -> Expr | None:
        """`unit_product_operand` of ``e``, memoized (``x * ones`` moves ``x``)."""
        if e.op != "call":
            return None
        hit = self._unit.get(e.id, False)
        if hit is False:
            hit = self._unit[e.id] = unit_product_operand(e)
        return hit

    def moves(self, e: Expr) -> bool:
        """``e`` is data movement of its leaves (a movement node, or a product with ones)."""
        return e.op in MOVE_OPS or self.unit(e) is not None

    def signature(self, e: Expr) -> tuple:
        return (tuple(e.shape), e.dtype, self.leaves(e))

    def _small(self, e: Expr, numbering: dict) -> bool:
        """Every node of ``e`` (and the leaves' total) small enough to evaluate on index tensors."""
        seen: set[int] = set()
        stack = [e]
        while stack:
            x = stack.pop()
            if x.id in seen:
                continue
            seen.add(x.id)
            if math.prod(x.shape) > MAX_NUMEL:
                return False
            if x.op in MOVE_OPS:
                stack.extend(x.args)
            elif self.unit(x) is not None:
                stack.append(self.unit(x))
        return True

    def index_tensor(self, e: Expr, numbering: dict) -> torch.Tensor:
        """``e`` evaluated with leaf ``l`` holding ``arange(numbering[l.id], ...)`` (int64)."""
        memo: dict[int, torch.Tensor] = {}

        def go(x: Expr) -> torch.Tensor:
            v = memo.get(x.id)
            if v is not None:
                return v
            if x.op in MOVE_OPS:
                v = apply_op(x.op, x.attrs, [go(a) for a in x.args])
            elif self.unit(x) is not None:
                v = go(self.unit(x)).expand(tuple(x.shape))
            else:
                off = numbering[x.id]
                v = torch.arange(off, off + math.prod(x.shape), dtype=torch.int64).view(x.shape)
            memo[x.id] = v
            return v

        return go(e)

    def numbering(self, leaf_ids: Iterable[int]) -> dict | None:
        out, off = {}, 0
        for i in sorted(set(leaf_ids)):
            out[i] = off
            off += math.prod(self.store.nodes[i].shape)
        if off > 4 * MAX_NUMEL:
            return None
        return out

    def equal(self, a: Expr, b: Expr) -> bool:
        """True iff ``a`` and ``b`` are the same data movement of the same leaves (so equal for all
        leaf values). False when they differ or when deciding it would need too large tensors."""
        if a.id == b.id:
            return True
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            return False
        if not self.moves(a) and not self.moves(b):
            return False  # two different opaque nodes
        key = (a.id, b.id) if a.id < b.id else (b.id, a.id)
        hit = self._eq.get(key)
        if hit is not None:
            return hit
        la, lb = set(self.leaves(a)), set(self.leaves(b))
        res = False
        if la & lb:  # (syntactic leaves may differ: a slice of a concatenation may use one piece)
            num = self.numbering(la | lb)
            if num is not None and self._small(a, num) and self._small(b, num):
                try:
                    res = bool(torch.equal(self.index_tensor(a, num), self.index_tensor(b, num)))
                except (RuntimeError, ShapeError):  # pragma: no cover - malformed movement
                    res = False
        self._eq[key] = res
        return res

    # ------------------------------------------------------------------ realized values
    # The tables below are built in two levels: rank values grouped by a cheap key (shape and dtype,
    # operator), and within a group by signature (the leaves each argument moves, a walk of its
    # history) only when a question asks about that group. A signature holds the cheap key, so the
    # answers are those of one table over every value, in the same (index) order.
    def _sig_group(self, shape, dtype) -> dict:
        if self._by_sig is None:
            groups: dict = {}
            for d in self.index.dvals:
                groups.setdefault((tuple(d.term.shape), d.term.dtype), []).append(d)
            self._by_sig = (groups, {})
        groups, tables = self._by_sig
        key = (tuple(shape), dtype)
        table = tables.get(key)
        if table is None:
            table = {}
            for d in groups.get(key, ()):
                table.setdefault(self.signature(d.term), []).append(d)
            tables[key] = table
        return table

    def realized(self, term: Expr):
        """A distributed value whose term is index-equal to ``term`` (a pure movement), or None."""
        if term.op not in MOVE_OPS:
            return None
        for d in self._sig_group(term.shape, term.dtype).get(self.signature(term), [])[:MAX_CHECKS]:
            if self.equal(term, d.term):
                return d
        return None

    # ------------------------------------------------------------------ compute calls
    def _call_group(self, spec: OpSpec) -> dict:
        if self._calls is None:
            groups: dict = {}
            for d in self.index.dvals:
                if d.term.op == "call":
                    groups.setdefault(d.term.attrs, []).append(d)
            self._calls = (groups, {})
        groups, tables = self._calls
        table = tables.get(spec)
        if table is None:
            table = {}
            for d in groups.get(spec, ()):
                table.setdefault(tuple(self.signature(a) for a in d.term.args), []).append(d)
            tables[spec] = table
        return table

    def _ew_group(self, op_key) -> dict:
        if self._ew is None:
            groups: dict = {}
            for d in self.index.dvals:
                t = d.term
                if t.op == "call":
                    key = _row_key(t.attrs, t.shape, t.args)
                    if key is not None:
                        groups.setdefault(key[0], []).append((d, key))
            self._ew = (groups, {})
        groups, tables = self._ew
        table = tables.get(op_key)
        if table is None:
            table = {}
            for d, key in groups.get(op_key, ()):
                table.setdefault(self._row_sig(key, d.term.args), []).append(d)
            tables[op_key] = table
        return table

    def _row_sig(self, key, args) -> tuple:
        dim = key[1]
        return (key[0], tuple((math.prod(a.shape), None if dim is None else a.shape[dim], a.dtype, self.leaves(a))
                              for a in args))

    def _rows(self, a: Expr, dim: int | None) -> Expr:
        """``a`` as [rows, row length]: the operator's dim moved last, the other dims flattened."""
        S = self.store
        n = math.prod(a.shape)
        if dim is None:
            return S.view(a, (n,))
        perm = [i for i in range(len(a.shape)) if i != dim] + [dim]
        return S.view(S.permute(a, perm), (n // max(a.shape[dim], 1), a.shape[dim]))

    def ew_call(self, spec: OpSpec, terms: list[Expr], shape: tuple):
        """A row-wise call (elementwise without broadcasting, or a softmax along one dim) that some
        rank applies to the same rows in the same order, however the rows are laid out:
        ``op(a, dim=j)`` vs the rank's ``op(b, dim=k)`` with ``a`` and ``b`` equal as
        [rows, row] after moving j resp. k last. Returns a relation over the rank's value."""
        key = _row_key(spec, shape, terms)
        if key is None:
            return None
        S = self.store
        for d in self._ew_group(key[0]).get(self._row_sig(key, terms), [])[:MAX_CHECKS]:
            k = _row_key(d.term.attrs, d.term.shape, d.term.args)[1]
            if all(self.equal(self._rows(a, key[1]), self._rows(b, k)) for a, b in zip(terms, d.term.args)):
                rows = self._rows(self.index.ref(d), k)
                if key[1] is None:
                    return S.view(rows, shape)
                j = key[1]
                perm = [i for i in range(len(shape)) if i != j] + [j]
                moved = S.view(rows, tuple(shape[i] for i in perm))
                inv = [perm.index(i) for i in range(len(shape))]
                return S.permute(moved, inv)
        return None

    def call(self, spec: OpSpec, terms: list[Expr]):
        """A distributed value computing ``spec`` on arguments index-equal to ``terms`` (also with
        the two operands of a commutative operator swapped), or None."""
        orders = [list(terms)]
        if _commutes(spec) and len(terms) == 2:
            orders.append([terms[1], terms[0]])
        table = None
        for args in orders:
            if not any(a.op in MOVE_OPS for a in args) and args is orders[0]:
                continue  # no movement to decide: the structural lookup already missed it
            if table is None:
                table = self._call_group(spec)
            for d in table.get(tuple(self.signature(a) for a in args), [])[:MAX_CHECKS]:
                if all(self.equal(a, b) for a, b in zip(args, d.term.args)):
                    return d
        # An argument may name leaves it does not use (a slice of a concatenation kept whole under an
        # expand or a permute): a rank's call whose arguments move a subset of the same leaves
        for args in orders:
            if not any(a.op in MOVE_OPS for a in args):
                continue
            mine = [set(self.leaves(a)) for a in args]
            checks = 0
            for d in self._subset_candidates((spec, tuple((tuple(a.shape), a.dtype) for a in args)), mine):
                if not all(set(self.leaves(b)) <= l for b, l in zip(d.term.args, mine)):
                    continue
                checks += 1
                if all(self.equal(a, b) for a, b in zip(args, d.term.args)):
                    return d
                if checks >= 2 * MAX_CHECKS:
                    break
        return None

    def _subset_candidates(self, key, mine: list) -> list:
        """The values of ``_shape_table()[key]`` (in its order) whose every argument's leaves may lie in
        ``mine`` (that argument's leaf set): a necessary condition, the first leaf of the argument with
        the fewest leaves in ``mine`` is among them. (A scan of the whole same-shape bucket per question
        grew with the square of the layer count: every layer's calls share their shapes.)"""
        bucket = self._shape_table().get(key)
        if not bucket:
            return []
        i = min(range(len(mine)), key=lambda j: len(mine[j]))
        by_first = self._subset_index.get((key, i))
        if by_first is None:
            by_first = {}
            for pos, d in enumerate(bucket):
                ls = self.leaves(d.term.args[i])
                by_first.setdefault(ls[0] if ls else None, []).append(pos)
            self._subset_index[(key, i)] = by_first
        positions = list(by_first.get(None, ()))
        for leaf in mine[i]:
            positions.extend(by_first.get(leaf, ()))
        positions.sort()
        return [bucket[p] for p in positions]

    def first_leaf_candidates(self, L) -> list:
        """The values some rank holds (in index order) whose first leaf is in ``L``: every value whose
        leaves all lie in ``L`` is among them."""
        by_first = self._by_first_leaf
        if by_first is None:
            by_first = {}
            for d in self.index.dvals:
                ls = self.leaves(d.term)
                by_first.setdefault(ls[0] if ls else None, []).append(d)
            self._by_first_leaf = by_first
        out = list(by_first.get(None, ()))
        for leaf in L:
            out.extend(by_first.get(leaf, ()))
        out.sort(key=lambda d: d.id)
        return out

    def _shape_table(self) -> dict:
        if getattr(self, "_calls_by_shape", None) is None:
            table: dict = {}
            for d in self.index.dvals:
                t = d.term
                if t.op == "call":
                    table.setdefault((t.attrs, tuple((tuple(a.shape), a.dtype) for a in t.args)), []).append(d)
            self._calls_by_shape = table
        return self._calls_by_shape

    # ------------------------------------------------------------------ pieces of calls on concatenations
    def register_pieces(self, term: Expr, dval) -> None:
        """Record the pieces of ``term`` (a rank's compute call) that are the same call on one piece
        of a concatenated operand along a dim mapping position-wise to an output dim."""
        from gg_notebook.lemmas.dims import dim_roles

        if term.op != "call" or term.attrs.unique is not None:
            return
        args = term.args
        if not any(a.op == "cat" for a in args):
            return
        try:
            roles = dim_roles(term.attrs, [a.shape for a in args], term.shape)
        except Exception:  # noqa: BLE001 - an operator without a dim table
            return
        if roles is None:
            return
        S = self.store
        for i, a in enumerate(args):
            if a.op != "cat":
                continue
            role = roles[i][a.attrs]
            if role is None or role[0] != "out":
                continue
            k = role[1]
            off = 0
            for part in a.args:
                lo, hi = off, off + part.shape[a.attrs]
                off = hi
                try:
                    new_args = []
                    for j, b in enumerate(args):
                        dj = [t for t, r in enumerate(roles[j]) if r == role]
                        new_args.append(S.slice(b, dj[0], lo, hi) if dj else b)
                    piece = S.call(term.attrs, new_args)
                except ShapeError:
                    continue
                if piece.shape[k] == term.shape[k]:
                    continue
                self.pieces.setdefault(piece.id, (dval, k, lo, hi))

    def piece(self, term: Expr):
        """(dval, dim, start, end) when ``term`` is a registered piece of a rank's call."""
        return self.pieces.get(term.id)


def _row_key(spec: OpSpec, shape: tuple, args) -> tuple | None:
    """(operator key without its dim, the dim it acts along or None) for calls that act row by
    row: an elementwise op whose tensor operands all have the output's shape (key: the spec), or a
    softmax / log-softmax (key: the spec with its dim abstracted). None for anything else."""
    if spec.out is not None or spec.unique is not None or not args:
        return None
    if any(tuple(a.shape) != tuple(shape) for a in args):
        return None
    if spec.kind == "ew":
        return (spec, None)
    if spec.kind == "softmax" and len(args) == 1 and shape:
        targs, kwargs = spec.template
        if len(targs) >= 2 and spec.target in (_aten._softmax.default, _aten._log_softmax.default):
            return ((spec.target, targs[:1] + targs[2:], kwargs, spec.param("fn")), spec.param("dim"))
    return None


def _commutes(spec: OpSpec) -> bool:
    fixed = _COMMUTATIVE.get(spec.target)
    if fixed is None:
        return False
    args, kwargs = spec.template
    from gg_notebook.relations.expr import Slot

    if len(args) < 2 or not isinstance(args[0], Slot) or not isinstance(args[1], Slot):
        return False
    return all(spec.arg(k, None) == v for k, v in fixed)


def movement_of(index) -> MovementIndex:
    """The `MovementIndex` of a `DIndex` (created on first use)."""
    m = getattr(index, "_movement", None)
    if m is None:
        m = MovementIndex(index)
        index._movement = m
    return m


def movement_lookup(index, spec: OpSpec, terms: list[Expr], found: Expr | None) -> Expr | None:
    """Engine hook: a relation for ``spec(terms)`` when no rank holds that term verbatim: a rank's
    call on index-equal arguments (a ref), or a registered piece of a rank's call (a slice of a ref).
    ``found`` is the interned term of the call, if the store has it."""
    m = movement_of(index)
    if found is not None:
        hit = m.piece(found)
        if hit is not None:
            d, k, lo, hi = hit
            return index.store.slice(index.ref(d), k, lo, hi)
    d = m.call(spec, terms)
    if d is not None:
        return index.ref(d)
    if spec.kind in ("ew", "softmax"):
        from gg_notebook.relations.expr import infer_shape

        try:
            shape, _ = infer_shape(spec, tuple((a.shape, a.dtype) for a in terms))
        except ShapeError:
            return None
        return m.ew_call(spec, terms, shape)
    return None


# ---------------------------------------------------------------------- re-tiling
MAX_RETILE_CANDIDATES = 24


def _computed_on(index, d) -> bool:
    """Does some rank compute on ``d`` (is its term an argument of a compute call)?"""
    return any(u.op == "call" for u in index.users_of(d.term))


def retile(index, term: Expr, sources=None, strict: bool = False) -> list[Expr]:
    """Clean rebuilds of ``term`` (a pure data movement of some leaves) from realized values that
    move the same leaves: one relation per dim the search can tile along (guillotine cuts into
    boxes of the values, each possibly reshaped/transposed once: `gg_notebook.relations.layout`).

    ``sources``: the dvals to rebuild from (default: the values some rank computes on whose
    leaves are among ``term``'s); with ``strict`` every source must consist of elements of
    ``term`` only (else nothing is returned). Every relation returned is checked on index tensors."""
    from gg_notebook.relations.layout import rebuild_plans

    m = movement_of(index)
    if term.op == "call" and sources is None:
        return []  # a computed value: the ranks' pieces of it are found by the lemmas
    L = set(m.leaves(term))
    num = m.numbering(L)
    if num is None or not m._small(term, num):
        return []
    T = m.index_tensor(term, num).reshape(-1)
    n = T.numel()
    if n == 0:
        return []
    total = max(num[i] + math.prod(index.store.nodes[i].shape) for i in num)
    inv = torch.full((total,), -1, dtype=torch.int64)
    inv[T] = torch.arange(n, dtype=torch.int64)
    if int((inv >= 0).sum()) != n:
        return []  # the term repeats elements (a broadcast): no box tiling of distinct pieces
    if sources is None:
        # (a value whose leaves are all in L has its first leaf in L: only those are looked at, in
        # index order, instead of every value some rank holds)
        sources = [d for d in m.first_leaf_candidates(L)
                   if d.term.id != term.id and set(m.leaves(d.term)) <= L and _computed_on(index, d)]
    locs, dvals = [], []
    for d in sources:
        if len(dvals) >= MAX_RETILE_CANDIDATES:
            break
        if not set(m.leaves(d.term)) <= L or not m._small(d.term, num):
            if strict:
                return []
            continue
        A = inv[m.index_tensor(d.term, num).reshape(-1)]
        if A.numel() == 0 or bool((A < 0).any()):
            if strict:
                return []
            continue  # holds elements the term does not have
        locs.append(A.view(d.term.shape).to(torch.int32))
        dvals.append(d)
    if not dvals:
        return []
    refs = [index.ref(d) for d in dvals]
    out: list[Expr] = []
    seen: set[int] = set()
    for build in rebuild_plans(locs, tuple(term.shape)):
        try:
            rel = build(index.store, refs)
        except ShapeError:
            continue
        if rel.id in seen:
            continue
        seen.add(rel.id)
        # the rebuild must be the same data movement as the term (decided on index tensors)
        if m.equal(_to_term(index, rel), term):
            out.append(rel)
    return out


def _to_term(index, e: Expr) -> Expr:
    from gg_notebook.engine.infer import rebuild

    memo: dict[int, Expr] = {}

    def go(x: Expr) -> Expr:
        hit = memo.get(x.id)
        if hit is not None:
            return hit
        if x.op == "ref":
            r = index.dvals[x.attrs[0]].term
        elif not x.args:
            r = x
        else:
            r = rebuild(index.store, x, [go(a) for a in x.args])
        memo[x.id] = r
        return r

    return go(e)


def substitute(store: ExprStore, e: Expr, repl: dict) -> Expr:
    """``e`` with the leaves whose id is in ``repl`` replaced (rebuilt with the normalizing constructors)."""
    from gg_notebook.engine.infer import rebuild

    memo: dict[int, Expr] = {}

    def go(x: Expr) -> Expr:
        hit = memo.get(x.id)
        if hit is not None:
            return hit
        if x.id in repl:
            r = repl[x.id]
        elif not x.args:
            r = x
        else:
            r = rebuild(store, x, [go(a) for a in x.args])
        memo[x.id] = r
        return r

    return go(e)


# ---------------------------------------------------------------------- writes into buffers
_UNINIT = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


def _packet(spec: OpSpec) -> str:
    n = spec.name[5:] if spec.name.startswith("aten.") else spec.name
    return n.split(".")[0]


def _write_index(m: MovementIndex, e: Expr, num: dict, memo: dict):
    """Index tensor of ``e`` where writes into buffers are data movement too: ``slice_scatter``,
    a same-dtype ``copy`` (the source, broadcast), and uninitialized buffers (-1). None if ``e``
    computes anything else (or is too large)."""
    v = memo.get(e.id)
    if v is not None:
        return v
    if math.prod(e.shape) > MAX_NUMEL:
        return None
    if e.op in MOVE_OPS:
        vals = [_write_index(m, a, num, memo) for a in e.args]
        if any(x is None for x in vals):
            return None
        v = apply_op(e.op, e.attrs, vals)
    elif e.op == "call" and _packet(e.attrs) in _UNINIT:  # (unique: never equal to another buffer)
        v = torch.full(tuple(e.shape), -1, dtype=torch.int64)
    elif e.op == "call" and e.attrs.target == _aten.slice_scatter.default and len(e.args) == 2:
        base, src = (_write_index(m, a, num, memo) for a in e.args)
        if base is None or src is None or e.args[0].dtype != e.args[1].dtype:
            return None
        sp = e.attrs
        v = torch.slice_scatter(base, src, sp.arg("dim"), sp.arg("start"), sp.arg("end"), sp.arg("step"))
    elif e.op == "call" and e.attrs.target == _aten.copy.default and len(e.args) == 2:
        dst, src = e.args
        if dst.dtype != src.dtype:
            return None
        s = _write_index(m, src, num, memo)
        if s is None:
            return None
        v = s.expand(tuple(dst.shape)).clone()
    else:
        if e.id not in num:
            return None
        off = num[e.id]
        v = torch.arange(off, off + math.prod(e.shape), dtype=torch.int64).view(e.shape)
    memo[e.id] = v
    return v


def _write_leaves(e: Expr, out: set, seen: set) -> None:
    if e.id in seen:
        return
    seen.add(e.id)
    if e.op in MOVE_OPS or (e.op == "call" and e.attrs.target in (_aten.slice_scatter.default, _aten.copy.default)):
        for a in e.args:
            _write_leaves(a, out, seen)
    elif not (e.op == "call" and _packet(e.attrs) in _UNINIT):
        out.add(e.id)


def canonical_write(index, term: Expr) -> Expr:
    """A buffer filled entirely by writes (``out = empty(..); out[r::W] = p_r`` ...) as the clean
    data movement of what was written, when no element is left uninitialized; else ``term``."""
    if term.op != "call" or term.attrs.target not in (_aten.slice_scatter.default, _aten.copy.default):
        return term
    m = movement_of(index)
    leaves: set[int] = set()
    _write_leaves(term, leaves, set())
    if not leaves:
        return term
    num = m.numbering(leaves)
    if num is None:
        return term
    T = _write_index(m, term, num, {})
    if T is None or bool((T < 0).any()):
        return term
    # a term, so over the leaves' terms: what was written need not be held whole by the rank (a
    # parameter gathered into a buffer's chunks is the global parameter, which no rank value is)
    return rebuild_from_index(index, T, num, leaves, over_terms=True) or term


def rebuild_from_index(index, T: torch.Tensor, num: dict, leaves, over_terms: bool = False) -> Expr | None:
    """The clean data movement of realized ``leaves`` whose index tensor (leaf ``l`` numbered from
    ``num[l]``) is ``T``, or None (a leaf not realized, an element of ``T`` repeated, a leaf only
    partly used, or no box rebuild matches ``T``). With ``over_terms`` the result is a term built
    over the leaves' terms themselves (they need not be realized)."""
    m = movement_of(index)
    if over_terms:
        sources = [index.store.nodes[i] for i in sorted(leaves)]
    else:
        sources = [index.realized(index.store.nodes[i]) for i in sorted(leaves)]
        if any(d is None for d in sources):
            return None
    flat = T.reshape(-1)
    total = max(num[i] + math.prod(index.store.nodes[i].shape) for i in num)
    inv = torch.full((total,), -1, dtype=torch.int64)
    inv[flat] = torch.arange(flat.numel(), dtype=torch.int64)
    if int((inv >= 0).sum()) != flat.numel():
        return None  # an element written twice from one place: not a box tiling
    from gg_notebook.relations.layout import rebuild_plans

    terms = sources if over_terms else [d.term for d in sources]
    locs = []
    for t in terms:
        off = num[t.id]
        A = inv[torch.arange(off, off + math.prod(t.shape))]
        if bool((A < 0).any()):
            return None  # a source only partly written (or overwritten later)
        locs.append(A.view(t.shape).to(torch.int32))
    refs = terms if over_terms else [index.ref(d) for d in sources]
    for build in rebuild_plans(locs, tuple(T.shape)):
        try:
            built = build(index.store, refs)
            new = built if over_terms else _to_term(index, built)
        except ShapeError:
            continue
        got = m.index_tensor(new, num) if m._small(new, num) else None
        if got is not None and torch.equal(got, T):
            return new
    return None
