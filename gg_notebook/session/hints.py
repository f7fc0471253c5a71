"""Manual relations ("hints"): a small documented syntax, or a Python callable over rank tensors.

Syntax (what the relation set shows, so a user can copy, edit and paste):

    mm_3@r0                      rank 0's tensor named mm_3
    x@r*                         a tensor every rank holds (the same value on all ranks)
    concat(a, b, ..., dim=1)     concatenation (``cat`` also accepted)
    sum(a, b, ...)               sum over ranks' partials (``max(...)``, ``min(...)`` likewise)
    a[:, 0:4]                    slices with unit step
    a.view(2, 8) / a.reshape(..) a.permute(1, 0) / a.transpose(0, 1) / a.t()
    replica(a)                   the same as ``a``

Anything else (arithmetic, other functions) is refused: a relation must be clean. A callable gets
an accessor ``t`` with ``t["mm_3", 0]`` (or ``t.mm_3[0]``) returning symbolic rank tensors that
support ``torch.cat``, ``+`` (sum of partials), indexing, ``view/reshape/permute/transpose/t``.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Callable

import torch

from gg_notebook.relations.expr import Expr, ShapeError

_REF = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)@r(\d+|\*)")


class HintError(ValueError):
    """A hint that cannot be accepted; the message says why."""


def parse_hint(text: str, engine) -> Expr:
    """Parse ``text`` into a relation over the ranks' tensors (see module docstring)."""
    refs: list[tuple[str, str]] = []

    def sub(m: re.Match) -> str:
        refs.append((m.group(1), m.group(2)))
        return f"__ref{len(refs) - 1}__"

    src = _REF.sub(sub, text.strip())
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as exc:
        raise HintError(f"cannot parse {text!r}: {exc.msg}") from None
    env = {f"__ref{i}__": _resolve(engine, name, rank) for i, (name, rank) in enumerate(refs)}
    return _Eval(engine, env, text).visit(tree.body)


def _resolve(engine, name: str, rank: str) -> Expr:
    idx = engine.index
    W = idx.world_size
    ranks = range(W) if rank == "*" else [int(rank)]
    dvals = []
    for r in ranks:
        if r >= W:
            raise HintError(f"{name}@r{r}: there are only ranks 0..{W - 1}")
        g = idx.graphs[r]
        node = g.by_name.get(name)
        if node is None:
            close = sorted(n for n in g.by_name if n.startswith(name.split("_")[0]))[:6]
            raise HintError(f"rank {r} has no tensor named {name!r}" + (f" (similar: {', '.join(close)})" if close else ""))
        dvals.append(idx.dval_of(r, node))
    if rank == "*" and any(d.id != dvals[0].id for d in dvals):
        raise HintError(f"{name}@r* is not the same value on every rank; name one rank, e.g. {name}@r0")
    return idx.ref(dvals[0])


class _Eval(ast.NodeVisitor):
    def __init__(self, engine, env, text):
        self.engine, self.env, self.text = engine, env, text
        self.S = engine.store

    def fail(self, what: str):
        raise HintError(f"{what} in {self.text!r}: a hint may only use tensor names, concat, sum/max/min, slices, "
                        f"view/reshape, permute/transpose/t and replica")

    def visit(self, node):  # noqa: D401 - ast dispatch
        try:
            return super().visit(node)
        except ShapeError as exc:
            raise HintError(f"shapes do not fit in {self.text!r}: {exc}") from None

    def generic_visit(self, node):
        self.fail(f"{type(node).__name__} is not allowed")

    def visit_Name(self, node):
        if node.id in self.env:
            return self.env[node.id]
        self.fail(f"unknown name {node.id!r} (write rank tensors as name@rK or name@r*)")

    def visit_Constant(self, node):
        if isinstance(node.value, (int, float)):
            return node.value
        self.fail(f"constant {node.value!r}")

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return -node.operand.value
        self.fail("arithmetic")

    def visit_Tuple(self, node):
        return tuple(self.visit(e) for e in node.elts)

    visit_List = visit_Tuple

    def _tensors(self, args):
        vals = [self.visit(a) for a in args]
        if len(vals) == 1 and isinstance(vals[0], tuple):
            vals = list(vals[0])
        if not vals or not all(isinstance(v, Expr) for v in vals):
            self.fail("expected tensors")
        return vals

    def visit_Call(self, node):
        kw = {k.arg: self.visit(k.value) for k in node.keywords}
        if isinstance(node.func, ast.Name):
            fn = node.func.id
            if fn in ("concat", "cat"):
                dim = kw.get("dim", 0)
                return self.S.cat(self._tensors(node.args), int(dim))
            if fn in ("sum", "max", "min"):
                return self.S.accum(fn, self._tensors(node.args))
            if fn == "replica":
                (t,) = self._tensors(node.args)
                return t
            self.fail(f"function {fn}()")
        if isinstance(node.func, ast.Attribute):
            base = self.visit(node.func.value)
            if not isinstance(base, Expr):
                self.fail("method on a non-tensor")
            name = node.func.attr
            args = [self.visit(a) for a in node.args]
            if len(args) == 1 and isinstance(args[0], tuple):
                args = list(args[0])
            if name in ("view", "reshape"):
                return self.S.view(base, tuple(int(a) for a in args))
            if name == "permute":
                return self.S.permute(base, tuple(int(a) for a in args))
            if name == "transpose":
                return self.S.transpose(base, int(args[0]), int(args[1]))
            if name == "t":
                return self.S.permute(base, (1, 0))
            if name == "expand":
                return self.S.expand(base, tuple(int(a) for a in args))
            self.fail(f"method .{name}()")
        self.fail("call")

    def visit_Subscript(self, node):
        base = self.visit(node.value)
        if not isinstance(base, Expr):
            self.fail("indexing a non-tensor")
        sl = node.slice
        items = sl.elts if isinstance(sl, ast.Tuple) else [sl]
        out = base
        for d, it in enumerate(items):
            if not isinstance(it, ast.Slice):
                self.fail("integer indexing (use a slice a:b)")
            if it.step is not None:
                self.fail("a slice step")
            lo = self.visit(it.lower) if it.lower is not None else 0
            hi = self.visit(it.upper) if it.upper is not None else base.shape[d]
            out = self.S.slice(out, d, int(lo), int(hi))
        return out


class _Sym:
    """A symbolic rank tensor for callable hints."""

    def __init__(self, expr: Expr, S):
        self.expr, self.S = expr, S

    @property
    def shape(self):
        return torch.Size(self.expr.shape)

    def view(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        return _Sym(self.S.view(self.expr, tuple(int(s) for s in shape)), self.S)

    reshape = view

    def permute(self, *perm):
        perm = perm[0] if len(perm) == 1 and isinstance(perm[0], (tuple, list)) else perm
        return _Sym(self.S.permute(self.expr, tuple(perm)), self.S)

    def transpose(self, a, b):
        return _Sym(self.S.transpose(self.expr, a, b), self.S)

    def t(self):
        return _Sym(self.S.permute(self.expr, (1, 0)), self.S)

    def __add__(self, other):
        if not isinstance(other, _Sym):
            raise HintError("a hint may only add rank tensors (a sum of partials), not numbers")
        return _Sym(self.S.accum("sum", [self.expr, other.expr]), self.S)

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        out = self.expr
        for d, it in enumerate(idx):
            if it is Ellipsis or not isinstance(it, slice) or it.step not in (None, 1):
                raise HintError("a hint may only slice with a:b")
            lo = 0 if it.start is None else it.start
            hi = out.shape[d] if it.stop is None else it.stop
            out = self.S.slice(out, d, lo, hi)
        return _Sym(out, self.S)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.cat, torch.concat, torch.concatenate):
            parts = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            S = parts[0].S
            return _Sym(S.cat([p.expr for p in parts], dim), S)
        raise HintError(f"{getattr(func, '__name__', func)} is not clean: a hint may only move data or sum partials")

    def __getattr__(self, name):
        raise HintError(f".{name} is not allowed in a hint")


class _Accessor:
    def __init__(self, engine):
        self._engine = engine

    def __getitem__(self, key):
        name, rank = key
        return _Sym(_resolve(self._engine, name, "*" if rank in ("*", None) else str(int(rank))), self._engine.store)

    def __getattr__(self, name):
        eng = self.__dict__["_engine"]

        class _ByRank:
            def __getitem__(_, rank):
                return _Sym(_resolve(eng, name, "*" if rank in ("*", None) else str(int(rank))), eng.store)

        return _ByRank()


def hint_from_callable(fn: Callable[[Any], Any], engine) -> Expr:
    try:
        out = fn(_Accessor(engine))
    except HintError:
        raise
    except ShapeError as exc:
        raise HintError(f"shapes do not fit: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a user callable can raise anything
        raise HintError(f"the hint function raised {type(exc).__name__}: {exc}") from None
    if not isinstance(out, _Sym):
        raise HintError("the hint function must return a rank tensor expression built from its argument")
    return out.expr
