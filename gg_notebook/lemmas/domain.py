"""Exhaustive evaluation of integer index arithmetic over its whole domain.

Vocab-parallel code turns token ids into shard-local ids and masks with elementwise integer ops
(``ids < start``, ``ids - start``, ``x[mask] = 0``...), written differently by every framework.
Instead of matching spellings, we evaluate such an elementwise term on *every* possible id
(``arange(V)``, the ids a sequential embedding/cross-entropy accepts): agreement on the whole
domain is a proof, not a test.
"""

from __future__ import annotations

import torch

from gg_notebook.relations.expr import Expr

_ELEMENTWISE_GENERIC = {"aten.index_put.default", "aten.index_put_.default"}


def eval_on_domain(term: Expr, var: Expr, values: torch.Tensor) -> torch.Tensor | None:
    """Evaluate elementwise ``term`` with ``var`` bound to ``values`` (1-D); None if ``term``
    depends on anything but ``var`` and constants, or uses a non-elementwise operator.

    Views keep elements in flat (row-major) order, so on the 1-D domain a view is the identity;
    every elementwise operator must see operands with one and the same shape (or scalars), which
    keeps element i of every operand tied to element i of ``var``.
    """
    memo = _shared_memo(var, values)
    if memo is None:
        memo = {var.id: values}
        root = var
        while root.op == "view":  # a reshape keeps row-major order: the same elements, position by position
            root = root.args[0]
            memo[root.id] = values
        _remember(var, values, memo)
    numel = 1
    for s in var.shape:
        numel *= s

    def nelem(x: Expr) -> int:
        n = 1
        for s in x.shape:
            n *= s
        return n

    def go(x: Expr):
        if x.id in memo:
            return memo[x.id]
        if x.op == "const":
            target = x.attrs.target
            stored = getattr(target, "tensor", None)  # a constant compared by value (relations/ground.py)
            if isinstance(stored, torch.Tensor) and isinstance(getattr(target, "_uniform", None), bool):
                if not target._uniform or stored.numel() == 0:
                    return None
                memo[x.id] = stored.reshape(-1)[0].clone()
                return memo[x.id]
            fill = getattr(target, "constant_fill", None)
            v = fill() if fill is not None else None
            if v is not None and not isinstance(v, torch.Tensor):
                from gg_notebook.relations.expr import untyped

                v = untyped(v)
            if v is not None and isinstance(v, (bool, int, float)):
                r = torch.tensor(v, dtype=x.dtype)  # a uniform constant, without materializing it
            else:
                v = x.attrs.call([])
                flat = v.reshape(-1)
                if v.numel() == 0 or not bool((flat == flat[0]).all()):
                    return None  # only uniform constants (scalars, zeros_like, full) are elementwise
                r = flat[0].clone()
        elif x.op == "view":
            if nelem(x) != numel:
                return None
            r = go(x.args[0])
            if r is None:
                return None
        elif x.op == "call":
            spec = x.attrs
            if spec.kind != "ew" and spec.name not in _ELEMENTWISE_GENERIC:
                return None
            if spec.unique is not None:
                return None
            if spec.name in _ELEMENTWISE_GENERIC:
                # x[mask] = v is elementwise only for boolean masks of x's shape, without accumulation
                if spec.arg("accumulate", True) is not False:
                    return None
                if len(x.args) < 3 or any(a.dtype != torch.bool for a in x.args[1:-1]):
                    return None
            shapes = {tuple(a.shape) for a in x.args if a.op != "const"}
            if len(shapes) > 1 or any(nelem(a) != numel for a in x.args if a.op != "const"):
                return None
            if any(a.op == "const" and nelem(a) not in (1, numel) for a in x.args):
                return None
            vals = []
            for a in x.args:
                v = go(a)
                if v is None:
                    return None
                vals.append(v)
            try:
                r = spec.call(_fresh_if_mutating(spec, vals))
            except Exception:  # noqa: BLE001 - not evaluable on the domain
                return None
        else:
            return None
        memo[x.id] = r
        return r

    r = go(term)
    if r is None or tuple(r.shape) == tuple(values.shape):
        return r
    # a term that does not read ``var`` (a uniform constant): the same value at every position
    return r.reshape(()).expand(values.shape) if r.numel() == 1 else None


# (id(var), id(values)) -> (var, values, {term id: value}): the evaluations of one variable bound to
# one domain tensor, shared by every question about it (a vocab-parallel matcher evaluates the same
# mask and shard-local ids once per rank and per operator it is asked about). A term's value is a
# function of the term, the variable and the bound values alone; the entry keeps ``var`` and
# ``values`` alive, so their ids are their own while it exists, and term ids are those of ``var``'s
# store (an expression's arguments live in its store). Values are read, never written: the
# evaluator copies the operands of an operator that writes into one (`_fresh_if_mutating`).
_SHARED: dict[tuple[int, int], tuple] = {}


def _shared_memo(var: Expr, values: torch.Tensor) -> dict | None:
    ent = _SHARED.get((id(var), id(values)))
    if ent is not None and ent[0] is var and ent[1] is values:
        return ent[2]
    return None


def _remember(var: Expr, values: torch.Tensor, memo: dict) -> None:
    if len(_SHARED) >= 8:  # (a run has a few variables; each entry holds domain-sized tensors)
        _SHARED.clear()
    _SHARED[(id(var), id(values))] = (var, values, memo)


def release_shared() -> None:
    """Drop the shared evaluations (the engine calls this at the end of a run: they hold tensors
    of the size of a vocabulary)."""
    _SHARED.clear()


def agree_where(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> bool:
    """``bool((a[where] == b[where]).all())`` for tensors of ``where``'s shape (a boolean mask):
    the same answer without the two boolean gathers (each a nonzero and a copy, on every id of a
    vocabulary: most of a vocab-parallel matcher's time). Other shapes take the gathers."""
    if a.shape == where.shape and b.shape == where.shape and where.dtype == torch.bool:
        return bool(((a == b) | ~where).all())
    return bool((a[where] == b[where]).all())


def _fresh_if_mutating(spec, vals: list) -> list:
    """``vals`` with every tensor copied when ``spec``'s operator writes into an argument (``x[m] = v``
    as ``index_put_``): an evaluation never changes an operand (the bound domain values are shared
    by every question about that domain, `IdDomain.values`, and memoized operands by later nodes)."""
    schema = getattr(spec.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return vals
    return [v.clone() if isinstance(v, torch.Tensor) else v for v in vals]


class Shard:
    """The ids of a domain tensor (`IdDomain.values`: ascending) in ``[start, end)``: one run of
    positions ``lo:hi``, so a check "on every id inside the shard" reads that run alone, without a
    mask over the whole vocabulary (built once per domain tensor and range: `shard_of`)."""

    __slots__ = ("domain", "start", "end", "run", "_inside")

    def __init__(self, domain: torch.Tensor, start: int, end: int, run: tuple[int, int] | None) -> None:
        self.domain, self.start, self.end = domain, start, end
        self.run = run  # (lo, hi), or None for a domain tensor that is not ascending (masks then)
        self._inside = None

    @property
    def inside(self) -> torch.Tensor:
        """``(domain >= start) & (domain < end)`` (shared: read it, never write into it)."""
        if self._inside is None:
            self._inside = (self.domain >= self.start) & (self.domain < self.end)
        return self._inside

    def covers_domain(self) -> bool:
        """Is every id of the domain inside the shard (``not (~inside).any()``)?"""
        if self.run is not None:
            return self.run == (0, self.domain.numel())
        return not bool((~self.inside).any())

    def local_ids_agree(self, jv: torch.Tensor, ignore: int | None = None) -> bool:
        """``jv == domain - start`` at every id inside the shard (except ``ignore``): the same answer
        as ``agree_where(jv, domain - start, inside & (domain != ignore))``."""
        dom = self.domain
        if self.run is None or jv.shape != dom.shape:
            where = self.inside if ignore is None else self.inside & (dom != ignore)
            return agree_where(jv, dom - self.start, where)
        lo, hi = self.run
        part = dom[lo:hi]
        ok = jv[lo:hi] == part - self.start
        if ignore is not None:
            ok = ok | (part == ignore)
        return bool(ok.all())


_SHARDS: dict[tuple, tuple] = {}  # (id(domain), start, end) -> (domain, Shard)
_ASCENDING: dict[int, tuple] = {}  # id(domain) -> (domain, strictly ascending?)


def shard_of(domain: torch.Tensor, start: int, end: int) -> Shard:
    """The `Shard` of ``domain`` (1-D) for ``[start, end)`` (memoized while the tensor lives in the
    table: entries keep it alive, so its id stays its own)."""
    key = (id(domain), start, end)
    ent = _SHARDS.get(key)
    if ent is not None and ent[0] is domain:
        return ent[1]
    asc = _ASCENDING.get(id(domain))
    if asc is None or asc[0] is not domain:
        if len(_ASCENDING) >= 64:
            _ASCENDING.clear()
        ok = domain.dim() == 1 and (domain.numel() < 2 or bool((domain[1:] > domain[:-1]).all()))
        asc = _ASCENDING[id(domain)] = (domain, ok)
    run = None
    if asc[1]:
        lo = int(torch.searchsorted(domain, torch.tensor(start, dtype=domain.dtype))) if domain.numel() else 0
        hi = int(torch.searchsorted(domain, torch.tensor(end, dtype=domain.dtype))) if domain.numel() else 0
        run = (lo, max(lo, hi))
    if len(_SHARDS) >= 256:
        _SHARDS.clear()
    sh = Shard(domain, start, end, run)
    _SHARDS[key] = (domain, sh)
    return sh
