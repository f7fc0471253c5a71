"""The expression language shared by terms (what a tensor computes) and relations (how to rebuild it).

One hash-consed node type, `Expr`, serves two purposes:

* *terms*: every distributed tensor is interned as an expression over the global inputs
  (``atom`` leaves). Two rank tensors with the same term hold the same value, so replicas on
  different ranks become one distributed value without any search;
* *relations*: a sequential tensor is related to the ranks by an expression whose leaves are
  ``ref`` nodes (a distributed value that some rank really holds) combined with *clean* operators
  only: ``view``, ``permute``, ``slice``, ``cat``, ``expand``, ``accum`` (sum/max/min over ranks)
  and constants. ``scale`` (multiplication by a number) is representable but never clean.

The clean constructors below normalize as they build (views and slices are pushed below
concatenations, nested concatenations flatten, adjacent slices merge, identities vanish), so
structurally different spellings of one value get one node. Every normalization is an identity
over real numbers; each is exercised by the randomized tests in tests/test_expr.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, Callable, Iterable, Sequence

import torch

from gg_notebook.ir.pointwise_normal import commuted_args

_EMBEDDING = torch.ops.aten.embedding.default
_MASKED_FILL = torch.ops.aten.masked_fill.Scalar
_ADD, _SUB = torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor


def _all_zero(e) -> bool:
    """A value node (input-independent constant) whose every element is zero."""
    from gg_notebook.relations.ground import value_of

    v = value_of(e) if e.ground else None
    if v is None or v.is_complex() or v.dtype == torch.bool:
        return False
    return bool((v == 0).all())


def _without_zero(spec, args, shape, dtype):
    """``x + 0``, ``0 + x``, ``x - 0`` (a constant zero tensor): ``x`` itself when the result keeps
    x's shape and dtype (``-0.0 + 0.0`` is ``+0.0``, which compares equal; NaN and inf stay)."""
    if len(args) != 2 or spec.arg("alpha", 1) != 1:
        return None
    sides = (0, 1) if spec.target is _ADD else (0,)
    for keep in sides:
        x, z = args[keep], args[1 - keep]
        if x.dtype != dtype or not _all_zero(z):
            continue
        if tuple(x.shape) == tuple(shape):
            return x
        if _strip_leading_ones(x.shape) == _strip_leading_ones(shape) and len(x.shape) < len(shape):
            return ("view", x)  # the zero only broadcast x by leading 1-dims
    return None


def _strip_leading_ones(shape) -> tuple:
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape
CLEAN_OPS = frozenset({"ref", "const", "view", "permute", "slice", "cat", "expand", "accum"})
ACCUM_FNS = ("sum", "max", "min")


@dataclass(frozen=True)
class Slot:
    """Marks where tensor argument ``i`` goes in an operator call template."""

    i: int


class Lit:
    """A Python scalar in an operator call, with its type: ``1``, ``1.0`` and ``True`` are three
    different literals (they select different overloads, dtypes and results), although Python
    compares them equal. NaN equals NaN here, so that a call template stays hashable and equal to
    itself."""

    __slots__ = ("value", "_key")

    def __init__(self, value) -> None:
        if isinstance(value, Lit):
            value = value.value
        self.value = value
        v = "nan" if isinstance(value, float) and math.isnan(value) else value
        object.__setattr__(self, "_key", (type(value).__name__, v))

    def __eq__(self, other) -> bool:
        return isinstance(other, Lit) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return repr(self.value)

    def __reduce__(self):
        return (Lit, (self.value,))


_SCALARS = (bool, int, float, complex)


def typed(v):
    """``v`` with every Python scalar wrapped in `Lit` (lists become tuples; SymInts ints)."""
    if isinstance(v, (Lit, Slot)):
        return v
    if isinstance(v, torch.SymInt):
        return Lit(int(v))
    if isinstance(v, torch.SymFloat):
        return Lit(float(v))
    if isinstance(v, torch.SymBool):
        return Lit(bool(v))
    if isinstance(v, _SCALARS):
        return Lit(v)
    if isinstance(v, (list, tuple)):
        return tuple(typed(x) for x in v)
    return v


def untyped(v):
    """The plain Python value of a template entry (`Lit` unwrapped, recursively)."""
    if isinstance(v, Lit):
        return v.value
    if isinstance(v, tuple):
        return tuple(untyped(x) for x in v)
    return v


_MISSING = object()


@dataclass(frozen=True)
class OpSpec:
    """A compute operator with its non-tensor arguments fixed.

    ``kind`` selects the lemmas that apply ("ew", "matmul", "reduce", "softmax", ...), ``params``
    holds kind-specific normalized parameters, and ``target``/``template`` evaluate the operator on
    concrete (or meta) tensors, which also gives output shapes of rewritten calls for free.

    The template is the *full* call: every argument, with scalars typed (`Lit`), so two specs are
    equal only if they are the same overload called with the same arguments. Read arguments by
    schema name with `arg`, never by position.
    """

    kind: str
    name: str  # printable ATen name, e.g. "aten.mm.default"
    target: Any
    template: tuple  # (args, kwargs-items) with Slot markers and Lit scalars
    params: tuple = ()
    out: int | None = None  # index into a tuple-returning op
    unique: str | None = None  # non-None for random ops: never equal to another call

    def __post_init__(self) -> None:
        args, kwargs = self.template
        object.__setattr__(self, "template", (typed(tuple(args)), tuple((k, typed(v)) for k, v in kwargs)))

    # every interned call hashes its spec (a tuple of the operator and its whole template): the hash
    # is computed once per spec; equality is the dataclass's (all fields), with shortcuts
    def _fields(self) -> tuple:
        return (self.kind, self.name, self.target, self.template, self.params, self.out, self.unique)

    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(self._fields())
            object.__setattr__(self, "_hash", h)
        return h

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if other.__class__ is not self.__class__:
            return NotImplemented
        if hash(self) != hash(other):
            return False
        return self._fields() == other._fields()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_hash", None)  # a hash is this process's (string hashes are salted per process)
        state.pop("_bound", None)
        state.pop("_shapes", None)
        return state

    def param(self, key: str, default=None):
        for k, v in self.params:
            if k == key:
                return v
        return default

    def arg(self, name: str, default=_MISSING):
        """The value of the operator's argument ``name`` as its schema binds it (defaults filled
        in, scalars as plain Python values, tensor arguments as their `Slot`). Raises KeyError for
        a name the schema does not have (or a non-ATen target), unless ``default`` is given."""
        bound = self.__dict__.get("_bound", _MISSING)
        if bound is _MISSING:  # (kept on the spec: equal specs of other ranks are other objects)
            bound = _bind(self)
            object.__setattr__(self, "_bound", bound)
        if bound is None or name not in bound:
            if default is not _MISSING:
                return default
            raise KeyError(f"{self.name} has no argument {name!r}")
        return bound[name]

    def slot_of(self, name: str) -> int | None:
        """The tensor-slot index of argument ``name`` (None if it is not a tensor argument)."""
        v = self.arg(name, None)
        return v.i if isinstance(v, Slot) else None

    def call(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        args, kwargs = self.template
        filled = _fill(args, tensors)
        kw = {k: _fill(v, tensors) for k, v in kwargs}
        out = self.target(*filled, **kw)
        if self.out is not None:
            out = out[self.out]
        return out

    @property
    def short(self) -> str:
        n = self.name
        if n.startswith("aten."):
            n = n[5:]
        for suffix in (".default", ".Tensor", ".Scalar", ".self", ".dim_IntList", ".int"):
            if n.endswith(suffix):
                n = n[: -len(suffix)]
        if self.out is not None:
            n += f"[{self.out}]"
        return n


@lru_cache(maxsize=65536)
def _bind(spec: OpSpec) -> dict | None:
    schema = getattr(spec.target, "_schema", None)
    if schema is None:
        return None
    args, kwargs = spec.template
    out: dict = {}
    formal = list(schema.arguments)
    for a, v in zip(formal, args):
        out[a.name] = untyped(v)
    given = dict(kwargs)
    for a in formal[len(args):]:
        if a.name in given:
            out[a.name] = untyped(given[a.name])
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def _fill(t, tensors):
    if isinstance(t, Slot):
        return tensors[t.i]
    if isinstance(t, Lit):
        return t.value
    if isinstance(t, tuple):
        return tuple(_fill(x, tensors) for x in t)
    if isinstance(t, list):
        return [_fill(x, tensors) for x in t]
    return t


class Expr:
    """A hash-consed expression node. Build them through `ExprStore`, never directly."""

    __slots__ = ("id", "op", "attrs", "args", "shape", "dtype", "key", "ground", "pending", "scaled")

    def __init__(self, id, op, attrs, args, shape, dtype, key):
        self.id = id
        self.op = op
        self.attrs = attrs
        self.args = args
        self.shape = shape
        self.dtype = dtype
        self.key = key
        # ground: no ref/atom leaves (a constant); pending: a compute call on non-constant values;
        # scaled: holds a value only up to a factor (one pass over the arguments: built per node)
        ground = op != "ref" and op != "atom"
        pending = False
        scaled = op == "scale"
        for a in args:
            if not a.ground:
                ground = False
            if a.pending:
                pending = True
            if a.scaled:
                scaled = True
        self.ground = ground
        self.pending = pending or (op == "call" and not ground)
        self.scaled = scaled

    def __repr__(self) -> str:
        return f"Expr#{self.id}<{self.op}>"

    @property
    def is_clean(self) -> bool:
        return self.op in CLEAN_OPS


class ShapeError(ValueError):
    """A rewrite produced an expression whose shapes do not fit."""


class ExprStore:
    """Interns expressions and owns the normalizing constructors."""

    # ground nodes (no atom/ref leaf, not random) are evaluated and interned by value, so that
    # equal input-independent values are one node whatever their spelling (relations/ground.py)
    by_value = True
    # real-number-only normal forms of terms (exact="real"; set by gg.verify): relations/safe_softmax.py
    real = False

    def __init__(self) -> None:
        self._table: dict[tuple, Expr] = {}
        self.nodes: list[Expr] = []
        self._specs: dict = {}  # OpSpec -> the one equal OpSpec the store's nodes use
        self._spec_ids: dict[int, tuple] = {}  # id(spec) -> (spec, its canonical equal spec)
        # (op, argument id, parameters) -> the node `view` / `permute` / `slice` returned: each is a
        # pure function of its argument node and parameters in one store (the store only grows and
        # interns), so a repeated call (a normal form rebuilding the same view of a base) is a lookup
        self._movement_memo: dict[tuple, Expr] = {}

    # ------------------------------------------------------------------ interning
    def _intern(self, op, attrs, args, shape, dtype) -> Expr:
        # the dtype is part of a node's identity: the same operator on the same values in another
        # dtype is another value (an int64 hash is not its float32 spelling)
        if op == "call" or op == "const":
            # one spec object per operator identity: every rank lowers its own (equal) specs, and
            # tables keyed by spec then compare them field by field on every lookup
            ent = self._spec_ids.get(id(attrs))
            if ent is not None and ent[0] is attrs:
                attrs = ent[1]
            else:  # (an equal spec of another object compares field by field: once per object)
                canon = self._specs.setdefault(attrs, attrs)
                self._spec_ids[id(attrs)] = (attrs, canon)  # (kept alive: its id stays its own)
                attrs = canon
        key = (op, attrs, tuple([a.id for a in args]), dtype)
        e = self._table.get(key)
        if e is None and self.by_value and op != "atom" and op != "ref" and all([a.ground for a in args]):
            from gg_notebook.relations.ground import canonical

            e = canonical(self, op, attrs, args, shape, dtype)
            if e is not None:
                self._table[key] = e
        if e is None:
            e = Expr(len(self.nodes), op, attrs, tuple(args), tuple(shape), dtype, key)
            self._table[key] = e
            self.nodes.append(e)
        return e

    def find(self, op, attrs, args, dtype) -> Expr | None:
        if op == "call" and self.by_value and getattr(attrs, "kind", None) == "ew":
            args = self._broadcast_args(attrs, args)
        if op == "call" and self.by_value and getattr(attrs, "target", None) is _EMBEDDING:
            from gg_notebook.relations.ground import canonical_call

            alt = canonical_call(self, attrs, args)
            if alt is not None:
                return alt
        if op == "call" and self.real and getattr(attrs, "target", None) is _MASKED_FILL:
            from gg_notebook.relations.safe_softmax import canonical_safe_softmax

            alt = canonical_safe_softmax(self, attrs, args)
            if alt is not None:
                return alt
        if op == "call":
            args = commuted_args(attrs, tuple(args))
        return self._table.get((op, attrs, tuple(a.id for a in args), dtype))

    def _broadcast_args(self, spec, args):
        """Value-node operands of an elementwise call in their smallest broadcast form (ground.py)."""
        from gg_notebook.relations.ground import minimal_broadcast

        new = minimal_broadcast(self, spec, args)
        return args if new is None else new

    # ------------------------------------------------------------------ leaves
    def atom(self, name: str, shape, dtype) -> Expr:
        # the shape is part of an atom's identity: two leaves of one name and dtype but different
        # shapes are different values (attrs[0] stays the name)
        return self._intern("atom", (name, tuple(int(n) for n in shape)), (), shape, dtype)

    def ref(self, dval_id: int, shape, dtype) -> Expr:
        return self._intern("ref", (dval_id,), (), shape, dtype)

    def const(self, spec: OpSpec, shape, dtype) -> Expr:
        return self._intern("const", spec, (), shape, dtype)

    def call(self, spec: OpSpec, args: Sequence[Expr], shape=None, dtype=None) -> Expr:
        if shape is not None:
            return self._call(spec, args, shape, dtype)
        # a pure function of the spec and the argument nodes in one store (like `view`): by the
        # spec object (kept alive in the entry, so its id stays its own) and the arguments' ids
        if args.__class__ is not tuple and args.__class__ is not list:
            args = tuple(args)
        key = ("call", id(spec), tuple([a.id for a in args]))
        ent = self._movement_memo.get(key)
        if ent is not None and ent[0] is spec:
            return ent[1]
        out = self._call(spec, args, None, None)
        self._movement_memo[key] = (spec, out)
        return out

    def _call(self, spec: OpSpec, args: Sequence[Expr], shape, dtype) -> Expr:
        if shape is None:
            shape, dtype = infer_shape(spec, tuple((a.shape, a.dtype) for a in args))
        if self.by_value and spec.kind == "ew":
            args = self._broadcast_args(spec, args)
        if self.by_value and spec.target is _EMBEDDING:  # a lookup at constant ids: rows of the table
            from gg_notebook.relations.ground import canonical_call

            alt = canonical_call(self, spec, args)
            if alt is not None:
                return alt
        if self.real and spec.target is _MASKED_FILL:  # _safe_softmax without an all-masked row
            from gg_notebook.relations.safe_softmax import canonical_safe_softmax

            alt = canonical_safe_softmax(self, spec, args)
            if alt is not None:
                return alt
        if spec.target is _ADD or spec.target is _SUB:
            kept = _without_zero(spec, args, shape, dtype)
            if isinstance(kept, tuple):
                return self.view(kept[1], shape)
            if kept is not None:
                return kept
        # a * b and b * a: one term (operands of a commutative call in a canonical order)
        return self._intern("call", spec, commuted_args(spec, tuple(args)), shape, dtype)

    # ------------------------------------------------------------------ clean constructors
    def view(self, x: Expr, shape: Sequence[int]) -> Expr:
        key = ("view", x.id, shape if shape.__class__ is tuple else tuple(shape))
        hit = self._movement_memo.get(key)
        if hit is None:
            hit = self._movement_memo[key] = self._view(x, shape)
        return hit

    def _view(self, x: Expr, shape: Sequence[int]) -> Expr:
        shape = _resolve_shape(tuple(int(s) for s in shape), x.shape)
        if math.prod(shape) != math.prod(x.shape):
            raise ShapeError(f"cannot view {x.shape} as {shape}")
        if shape == x.shape:
            return x
        if x.op == "view":
            return self.view(x.args[0], shape)
        if x.op == "scale" and x.args[0].op == "accum":  # an averaged reduction: the factor outermost
            return self.scale(self.view(x.args[0], shape), x.attrs)
        if x.op == "accum":
            return self.accum(x.attrs, [self.view(a, shape) for a in x.args])
        if x.op == "cat":
            pushed = self._view_of_cat(x, shape)
            if pushed is not None:
                return pushed
        if x.op == "expand":
            pass
        return self._intern("view", shape, (x,), shape, x.dtype)

    def _view_of_cat(self, x: Expr, shape) -> Expr | None:
        d = x.attrs
        groups = reshape_groups(x.shape, shape)
        if groups is None:
            return None
        for in_dims, out_dims in groups:
            if d not in in_dims:
                continue
            lead_in = [i for i in in_dims if i < d]
            if any(x.shape[i] != 1 for i in lead_in):
                return None
            inner_in = math.prod(x.shape[i] for i in in_dims if i > d)
            # the first output dim of the group with size > 1 carries the concatenation
            j = next((o for o in out_dims if shape[o] != 1), out_dims[0] if out_dims else None)
            if j is None:
                return None
            inner_out = math.prod(shape[o] for o in out_dims if o > j)
            pieces = []
            for part in x.args:
                flat = part.shape[d] * inner_in
                if flat % inner_out:
                    return None
                pshape = list(shape)
                pshape[j] = flat // inner_out
                pieces.append(self.view(part, pshape))
            return self.cat(pieces, j)
        return None

    def permute(self, x: Expr, perm: Sequence[int]) -> Expr:
        key = ("permute", x.id, perm if perm.__class__ is tuple else tuple(perm))
        hit = self._movement_memo.get(key)
        if hit is None:
            hit = self._movement_memo[key] = self._permute(x, perm)
        return hit

    def _permute(self, x: Expr, perm: Sequence[int]) -> Expr:
        perm = tuple(int(p) % max(len(x.shape), 1) for p in perm)
        if sorted(perm) != list(range(len(x.shape))):
            raise ShapeError(f"bad permutation {perm} for shape {x.shape}")
        if perm == tuple(range(len(perm))):
            return x
        if x.op == "scale" and x.args[0].op == "accum":
            return self.scale(self.permute(x.args[0], perm), x.attrs)
        real = [p for p in perm if x.shape[p] != 1]
        if real == sorted(real):  # only size-1 dims move: the same elements in the same order, a view
            return self.view(x, tuple(x.shape[p] for p in perm))
        if x.op == "permute":
            inner = x.attrs
            return self.permute(x.args[0], tuple(inner[p] for p in perm))
        if x.op == "cat":
            d = x.attrs
            return self.cat([self.permute(a, perm) for a in x.args], perm.index(d))
        if x.op == "accum":
            return self.accum(x.attrs, [self.permute(a, perm) for a in x.args])
        if x.op == "view":
            moved = self._permute_through_view(x, perm)
            if moved is not None:
                return moved
        shape = tuple(x.shape[p] for p in perm)
        return self._intern("permute", perm, (x,), shape, x.dtype)

    def _permute_through_view(self, x: Expr, perm) -> Expr | None:
        """permute(view(X, s), p) == view(permute(X, p'), s[p]) when p moves whole view groups."""
        src = x.args[0]
        groups = reshape_groups(src.shape, x.shape)
        if groups is None or any(not gi or not go for gi, go in groups):
            return None
        group_of = {}
        for g, (_, go) in enumerate(groups):
            for o in go:
                group_of[o] = g
        order: list[int] = []
        k = 0
        while k < len(perm):
            g = group_of[perm[k]]
            go = groups[g][1]
            if tuple(perm[k:k + len(go)]) != tuple(go):
                return None
            order.append(g)
            k += len(go)
        inner = tuple(i for g in order for i in groups[g][0])
        shape = tuple(x.shape[p] for p in perm)
        return self.view(self.permute(src, inner), shape)

    def transpose(self, x: Expr, d0: int, d1: int) -> Expr:
        n = len(x.shape)
        perm = list(range(n))
        d0, d1 = d0 % n, d1 % n
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return self.permute(x, perm)

    def slice(self, x: Expr, dim: int, start: int, end: int) -> Expr:
        key = ("slice", x.id, dim, start, end)
        hit = self._movement_memo.get(key)
        if hit is None:
            hit = self._movement_memo[key] = self._slice(x, dim, start, end)
        return hit

    def _slice(self, x: Expr, dim: int, start: int, end: int) -> Expr:
        n = len(x.shape)
        dim = dim % n
        size = x.shape[dim]
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(start, min(size, end + size if end < 0 else end))
        if start == 0 and end == size:
            return x
        if start == end:  # empty: keep it as is, normalizing would only lose the shape
            shape = list(x.shape)
            shape[dim] = 0
            return self._intern("slice", (dim, start, end), (x,), shape, x.dtype)
        if x.op == "slice" and x.attrs[0] == dim:
            s0 = x.attrs[1]
            return self.slice(x.args[0], dim, s0 + start, s0 + end)
        if x.op == "slice" and x.attrs[0] > dim:  # slices along two dims commute: the smaller dim inside
            d1, a1, b1 = x.attrs
            return self.slice(self.slice(x.args[0], dim, start, end), d1, a1, b1)
        if x.op == "cat":
            d = x.attrs
            if d != dim:
                return self.cat([self.slice(a, dim, start, end) for a in x.args], d)
            pieces, off = [], 0
            for a in x.args:
                lo, hi = off, off + a.shape[d]
                s, e = max(start, lo), min(end, hi)
                if s < e:
                    pieces.append(self.slice(a, d, s - lo, e - lo))
                off = hi
            return self.cat(pieces, d)
        if x.op == "accum":
            return self.accum(x.attrs, [self.slice(a, dim, start, end) for a in x.args])
        if x.op == "scale" and x.args[0].op == "accum":
            return self.scale(self.slice(x.args[0], dim, start, end), x.attrs)
        if x.op == "permute":
            perm = x.attrs
            return self.permute(self.slice(x.args[0], perm[dim], start, end), perm)
        if x.op == "view":
            moved = self._slice_through_view(x, dim, start, end)
            if moved is not None:
                return moved
        if x.op == "expand":
            src = x.args[0]
            k = dim - (len(x.shape) - len(src.shape))
            if k < 0 or src.shape[k] == 1:
                shape = list(x.shape)
                shape[dim] = end - start
                return self.expand(src, shape)
        shape = list(x.shape)
        shape[dim] = end - start
        return self._intern("slice", (dim, start, end), (x,), shape, x.dtype)

    def _slice_through_view(self, x: Expr, dim: int, start: int, end: int) -> Expr | None:
        """slice(view(Y, s), d) == view(slice(Y, d'), s') when d is the outermost non-trivial dim of
        its view group and the slice bounds are whole multiples of the group's inner size."""
        src = x.args[0]
        groups = reshape_groups(src.shape, x.shape)
        if groups is None:
            return None
        for gi, go in groups:
            if dim not in go:
                continue
            if any(x.shape[o] != 1 for o in go if o < dim):
                return None
            inner_out = math.prod(x.shape[o] for o in go if o > dim)
            lo, hi = start * inner_out, end * inner_out  # bounds in the group's flat index
            real_in = [i for i in gi if src.shape[i] != 1]
            if not real_in:
                return None
            d_in = real_in[0]
            inner_in = math.prod(src.shape[i] for i in gi if i > d_in)
            if lo % inner_in or hi % inner_in:
                return None
            sliced = self.slice(src, d_in, lo // inner_in, hi // inner_in)
            shape = list(x.shape)
            shape[dim] = end - start
            return self.view(sliced, shape)
        return None

    def cat(self, xs: Iterable[Expr], dim: int) -> Expr:
        xs = list(xs)
        key = ("cat", dim, tuple([x.id for x in xs]))
        hit = self._movement_memo.get(key)
        if hit is None:
            hit = self._movement_memo[key] = self._cat(xs, dim)
        return hit

    def _cat(self, xs: list, dim: int) -> Expr:
        if not xs:
            raise ShapeError("cannot concatenate nothing")
        n = len(xs[0].shape)
        dim = dim % n
        flat: list[Expr] = []
        for x in xs:
            if len(x.shape) != n or any(x.shape[i] != xs[0].shape[i] for i in range(n) if i != dim):
                raise ShapeError(f"cannot concatenate shapes {[a.shape for a in xs]} along {dim}")
            if x.op == "cat" and x.attrs == dim:
                flat.extend(x.args)
            elif x.shape[dim] > 0:
                flat.append(x)
        if not flat:  # every piece is empty
            return xs[0]
        merged: list[Expr] = []
        for x in flat:
            if merged:
                prev = merged[-1]
                joined = self._join_slices(prev, x, dim)
                if joined is not None:
                    merged[-1] = joined
                    continue
            merged.append(x)
        if len(merged) == 1:
            return merged[0]
        if merged[0].op == "accum":  # the ranks' slices of one reduction, gathered (relations/cat_sums.py)
            from gg_notebook.relations.cat_sums import cat_of_accums

            summed = cat_of_accums(self, merged, dim)
            if summed is not None:
                return summed
        swapped = self._swap_nested(merged, dim)
        if swapped is not None:
            return swapped
        collapsed = self._collapse_blocks(merged, dim)
        if collapsed is not None:
            return collapsed
        shape = list(merged[0].shape)
        shape[dim] = sum(a.shape[dim] for a in merged)
        return self._intern("cat", dim, tuple(merged), shape, merged[0].dtype)

    def _swap_nested(self, pieces: list, dim: int) -> Expr | None:
        """cat_e(cat_d(a0, a1), cat_d(b0, b1)) == cat_d(cat_e(a0, b0), cat_e(a1, b1)) when the inner
        concatenations split dim d at the same offsets. The canonical nesting has the outer
        concatenation along the smaller dim, so both spellings of a block layout get one node."""
        grid = _cat_grid(pieces)
        if grid is None or grid[0] >= dim:
            return None
        d, sizes = grid
        return self.cat([self.cat([p.args[i] for p in pieces], dim) for i in range(len(sizes))], d)

    def _collapse_blocks(self, pieces: list, dim: int) -> Expr | None:
        """cat_d(cat_e(a[i0:i1], b[j0:j1]), cat_e(a[i1:i2], b[j1:j2])) == cat_e(a[i0:i2], b[j0:j2])
        (e > d; slices along d): a block grid whose every column is consecutive slices of one
        value is that value's concatenation along e. This is what the swapped spelling
        cat_e(cat_d(a[i0:i1], a[i1:i2]), ..) gives (its inner slices join), so both spellings of the
        grid are one node (a sequence-sharded operand times a column-sharded weight). Only when
        every column joins into one value that is not a concatenation (no rewrite back and forth)."""
        grid = _cat_grid(pieces)
        if grid is None or grid[0] <= dim:
            return None
        e, sizes = grid
        cols = []
        for i in range(len(sizes)):
            base, start, end = _as_slice(pieces[0].args[i], dim)
            if base is None:
                return None
            for p in pieces[1:]:
                b, s, t = _as_slice(p.args[i], dim)
                if b is not base or s != end:
                    return None
                end = t
            cols.append((base, start, end))
        out = [self.slice(b, dim, s, t) for b, s, t in cols]
        if any(x.op == "cat" for x in out):
            return None
        return self.cat(out, e)

    def _join_slices(self, a: Expr, b: Expr, dim: int) -> Expr | None:
        """slice(x, d, i, j) ++ slice(x, d, j, k) == slice(x, d, i, k); same for a whole-prefix."""
        base_a, sa, ea = _as_slice(a, dim)
        base_b, sb, eb = _as_slice(b, dim)
        if base_a is base_b and base_a is not None and ea == sb:
            return self.slice(base_a, dim, sa, eb)
        return None

    def expand(self, x: Expr, shape: Sequence[int]) -> Expr:
        shape = tuple(int(s) if s != -1 else x.shape[i - (len(shape) - len(x.shape))] for i, s in enumerate(shape))
        if shape == x.shape:
            return x
        lead = len(shape) - len(x.shape)
        if x.op == "expand":  # a broadcast of a broadcast is one broadcast of the source
            return self.expand(x.args[0], shape)
        if x.op == "cat" and x.shape[x.attrs] == shape[x.attrs + lead]:
            # the concatenated dim is not broadcast: each piece broadcasts on its own (GQA's
            # repeat_kv of head-sharded K/V stays a concatenation over the ranks)
            d = x.attrs
            pieces = []
            for a in x.args:
                s = list(shape)
                s[d + lead] = a.shape[d]
                pieces.append(self.expand(a, s))
            return self.cat(pieces, d + lead)
        return self._intern("expand", shape, (x,), shape, x.dtype)

    def accum(self, fn: str, xs: Iterable[Expr]) -> Expr:
        xs = list(xs)
        if fn not in ACCUM_FNS:
            raise ValueError(f"unknown accumulation {fn}")
        flat: list[Expr] = []
        for x in xs:
            if x.op == "accum" and x.attrs == fn:
                flat.extend(x.args)
            else:
                flat.append(x)
        if len(flat) == 1:
            return flat[0]
        shapes = {x.shape for x in flat}
        if len(shapes) != 1:
            raise ShapeError(f"cannot accumulate shapes {sorted(shapes)}")
        if fn == "sum" and getattr(self, "real", False) and flat[0].op == "scale" \
                and all(x.op == "scale" and x.attrs == flat[0].attrs for x in flat[1:]):
            # c*a + c*b == c*(a + b) over the reals (an averaging reduction, ReduceOp.AVG, is the
            # sum of the parts times 1/W whichever way it is written)
            return self.scale(self.accum(fn, [x.args[0] for x in flat]), flat[0].attrs)
        return self._intern("accum", fn, tuple(flat), flat[0].shape, flat[0].dtype)

    def scale(self, x: Expr, factor) -> Expr:
        """``factor * x`` with an exact rational factor (a float is taken at its exact value)."""
        from gg_notebook.relations.exact import Radical

        factor = factor if isinstance(factor, Radical) else Fraction(factor)
        if factor == 1:
            return x
        if x.op == "scale":
            return self.scale(x.args[0], x.attrs * factor)
        return self._intern("scale", factor, (x,), x.shape, x.dtype)


def _cat_grid(pieces: list) -> tuple[int, tuple] | None:
    """(d, sizes) when every piece is a concatenation along the same dim d of pieces of the same
    sizes along d (a block grid); else None."""
    first = pieces[0]
    if first.op != "cat":
        return None
    d = first.attrs
    sizes = tuple(a.shape[d] for a in first.args)
    for p in pieces[1:]:
        if p.op != "cat" or p.attrs != d or tuple(a.shape[d] for a in p.args) != sizes:
            return None
    return d, sizes


def _as_slice(x: Expr, dim: int):
    if x.op == "slice" and x.attrs[0] == dim:
        return x.args[0], x.attrs[1], x.attrs[2]
    return None, None, None


def _resolve_shape(shape: tuple, src: tuple) -> tuple:
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        total = math.prod(src)
        shape = tuple(total // known if s == -1 else s for s in shape)
    return shape


def reshape_groups(src: Sequence[int], dst: Sequence[int]):
    """Pair up runs of source and destination dims whose sizes multiply to the same number.

    Returns a list of (source dims, destination dims); size-1 dims are attached to a neighbouring
    group. None if the shapes do not have the same number of elements.
    """
    if math.prod(src) != math.prod(dst):
        return None
    groups = []
    i = j = 0
    n, m = len(src), len(dst)
    while i < n or j < m:
        gi, gj = [], []
        pi = pj = 1
        if i < n:
            gi.append(i); pi *= src[i]; i += 1
        if j < m:
            gj.append(j); pj *= dst[j]; j += 1
        while pi != pj:
            if pi < pj and i < n:
                gi.append(i); pi *= src[i]; i += 1
            elif j < m:
                gj.append(j); pj *= dst[j]; j += 1
            else:
                return None
        # absorb trailing size-1 dims into this group
        while i < n and src[i] == 1 and (j >= m or dst[j] != 1):
            gi.append(i); i += 1
        while j < m and dst[j] == 1 and (i >= n or src[i] != 1):
            gj.append(j); j += 1
        groups.append((gi, gj))
    return groups


# ---------------------------------------------------------------------- shapes of compute calls
def infer_shape(spec: OpSpec, arg_meta: tuple) -> tuple[tuple, Any]:
    """Output (shape, dtype) of ``spec`` applied to arguments of the given shapes, via meta tensors."""
    table = getattr(spec, "__dict__", None)
    if table is None:
        return _infer_shape_cached(spec, arg_meta)
    shapes = table.get("_shapes")
    if shapes is None:  # kept on the spec: no comparison of equal specs field by field per lookup
        shapes = {}
        object.__setattr__(spec, "_shapes", shapes)
    hit = shapes.get(arg_meta)
    if hit is None:
        hit = shapes[arg_meta] = _infer_shape_cached(spec, arg_meta)
    return hit


@lru_cache(maxsize=65536)
def _infer_shape_cached(spec: OpSpec, arg_meta: tuple):
    metas = [torch.empty(s, dtype=dt, device="meta") for s, dt in arg_meta]
    try:
        out = spec.call(metas)
    except Exception as exc:  # noqa: BLE001 - any failure means the rewrite does not fit
        raise ShapeError(f"{spec.name} does not accept shapes {[s for s, _ in arg_meta]}: {exc}") from None
    return tuple(out.shape), out.dtype


# ---------------------------------------------------------------------- evaluation
def fold(e: Expr, fn: Callable[[Expr, list], Any], memo: dict | None = None):
    """``fn(x, [results of x's arguments])`` for every node of ``e``, arguments first, each node
    once (``memo``: id -> result, kept across calls; a node already in it is not visited again, so
    a pre-filled entry stands for its whole subterm). Iterative: deep terms do not recurse."""
    memo = {} if memo is None else memo
    stack = [e]
    while stack:
        x = stack[-1]
        if x.id in memo:
            stack.pop()
            continue
        pending = [a for a in x.args if a.id not in memo]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        memo[x.id] = fn(x, [memo[a.id] for a in x.args])
    return memo[e.id]


def evaluate(e: Expr, leaf: Callable[[Expr], torch.Tensor], memo: dict | None = None) -> torch.Tensor:
    """Evaluate ``e`` on concrete tensors; ``leaf`` gives values of ``atom`` and ``ref`` nodes."""
    return fold(e, lambda x, vals: _eval_node(x, vals, leaf), memo)


def _eval_node(x: Expr, vals, leaf):
    if x.op in ("atom", "ref"):
        return leaf(x)
    out = apply_op(x.op, x.attrs, vals)
    if x.op == "call" and isinstance(out, torch.Tensor) and tuple(out.shape) != tuple(x.shape) \
            and out.dim() < len(x.shape) and out.numel() == math.prod(x.shape):
        # an elementwise call over minimally broadcast arguments (ground.py) computes without the
        # leading 1-dims of the shape the term records
        out = out.reshape(x.shape)
    return out


def apply_op(op: str, attrs, vals: list[torch.Tensor]) -> torch.Tensor:
    """Apply one (non-leaf) operator of the expression language / IR to concrete values."""
    if op == "const":
        return attrs.call([])
    if op == "call":
        return attrs.call(vals)
    if op == "view":
        return vals[0].reshape(attrs)
    if op == "permute":
        return vals[0].permute(attrs)
    if op == "slice":
        d, s, e = attrs
        return vals[0].narrow(d, s, e - s)
    if op == "cat":
        return torch.cat(vals, attrs)
    if op == "expand":
        return vals[0].expand(attrs)
    if op == "accum":
        out = vals[0]
        for v in vals[1:]:
            if attrs == "sum":
                out = out + v
            elif attrs == "max":
                out = torch.maximum(out, v)
            else:
                out = torch.minimum(out, v)
        return out
    if op == "scale":
        return vals[0] * float(attrs)
    raise ValueError(f"cannot evaluate {op}")


# ---------------------------------------------------------------------- printing
def pretty(e: Expr, name: Callable[[Expr], str], memo: dict[int, str] | None = None) -> str:
    """Readable, Python-like rendering; ``name`` renders leaves (``ref``/``atom``). ``memo``: node id
    -> its rendering, shared by a caller that renders many expressions of one store with one
    ``name`` (every subexpression is rendered once)."""
    if memo is None:
        memo = {}

    def go(x: Expr) -> str:
        if x.id in memo:
            return memo[x.id]
        op = x.op
        if op in ("ref", "atom"):
            s = name(x)
        elif op == "const":
            s = f"const[{x.attrs.short}{_const_args(x.attrs)}]"
        elif op == "call":
            s = f"{x.attrs.short}({', '.join(go(a) for a in x.args)})"
        elif op == "view":
            s = f"{go(x.args[0])}.view({', '.join(map(str, x.attrs))})"
        elif op == "permute":
            s = f"{go(x.args[0])}.permute({', '.join(map(str, x.attrs))})"
        elif op == "slice":
            d, a, b = x.attrs
            idx = ", ".join([":"] * d + [f"{a}:{b}"])
            s = f"{go(x.args[0])}[{idx}]"
        elif op == "cat":
            s = f"concat({', '.join(go(a) for a in x.args)}, dim={x.attrs})"
        elif op == "expand":
            s = f"{go(x.args[0])}.expand({', '.join(map(str, x.attrs))})"
        elif op == "accum":
            s = f"{x.attrs}({', '.join(go(a) for a in x.args)})"
        elif op == "scale":
            s = f"{_number(x.attrs)} * {go(x.args[0])}"
        else:
            s = f"<{op}>"
        memo[x.id] = s
        return s

    return go(e)


def _number(c) -> str:
    """A rational factor as people write it: 0.5, 1/3, 12."""
    if not isinstance(c, (int, float, Fraction)):
        return f"({c})"  # an exact radical (relations/exact.py)
    c = Fraction(c)
    if c.denominator == 1:
        return str(c.numerator)
    if c.denominator & (c.denominator - 1) == 0 and c.denominator <= 1 << 20:  # a short binary fraction
        return f"{float(c):g}"
    return f"({c.numerator}/{c.denominator})"


def _const_args(spec: OpSpec) -> str:
    args, _ = spec.template
    shown = [repr(a) for a in args if not isinstance(a, Slot)]
    return "(" + ", ".join(shown) + ")" if shown else ""


def walk(e: Expr):
    """Every distinct node of ``e`` once, parents before children, arguments left to right."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if x.id in seen:
            continue
        seen.add(x.id)
        yield x
        stack.extend(reversed(x.args))


def leaves(e: Expr) -> list[Expr]:
    """The ``ref``/``atom`` leaves of ``e`` (each once, in first-seen order)."""
    return [x for x in walk(e) if x.op in ("ref", "atom")]


def is_clean(e: Expr) -> bool:
    """True if ``e`` uses clean operators only (no compute calls, no scale factors)."""
    return all(x.op in CLEAN_OPS for x in walk(e))


def has_factor(e: Expr) -> bool:
    """True if ``e`` holds a value only up to a factor (a ``scale`` node: never clean). Constant
    computations are not factors: a relation may compute on constants."""
    return e.scaled


def size(e: Expr) -> int:
    """Number of distinct nodes: the cost used to rank candidate relations."""
    return sum(1 for _ in walk(e))
