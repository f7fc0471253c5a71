"""Numeric relation search: which clean combination of rank tensors equals a sequential value?

Tried, in order: one rank's tensor (a replica), possibly viewed or transposed; the same-named
tensor of every rank concatenated along a dim; the same-named tensors summed (partials). Each hit
is a relation in the engine's expression language with the evidence of how many random inputs it
matched. (A scale factor is tried last and flagged.)
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from gg_notebook.concrete.compare import close, max_error
from gg_notebook.relations.expr import Expr


@dataclass
class NumericMatch:
    expr: Expr
    kind: str  # replica | view | transpose | concat | partial | scaled
    error: float
    factor: float = 1.0


def candidates_for(engine, sims, seq_node, limit: int = 6, scaled: bool = False) -> list[NumericMatch]:
    """Relations that reproduce ``seq_node``'s value on every simulation in ``sims``.

    With ``scaled``, a replica or partial sum that matches up to one constant factor (the same on
    every input) is returned too, as kind "scaled": never clean, always flagged."""
    idx = engine.index
    S = engine.store
    W = idx.world_size
    shape = tuple(seq_node.shape)
    want = [sim.seq[seq_node.name] for sim in sims]
    found: list[NumericMatch] = []
    seen: set[int] = set()

    def ok(values) -> tuple[bool, float]:
        errs = []
        for v, w in zip(values, want):
            if not close(w, v, w.dtype):
                return False, float("inf")
            errs.append(max_error(w, v)[0])
        return True, max(errs) if errs else 0.0

    def add(expr: Expr, kind: str, err: float, factor: float = 1.0):
        if expr.id not in seen:
            seen.add(expr.id)
            found.append(NumericMatch(expr, kind, err, factor))

    def factor_of(values) -> float | None:
        """One factor c with want == c * value on every input, if there is one (and c != 1)."""
        if not want[0].dtype.is_floating_point or any(v.dtype.is_complex for v in values):
            return None
        cs = []
        for v, w in zip(values, want):
            v64, w64 = v.double().reshape(-1), w.double().reshape(-1)
            den = float((v64 * v64).sum())
            if den == 0 or not torch.isfinite(v64).all():
                return None
            if not math.isfinite(den):
                return None
            cs.append(float((w64 * v64).sum()) / den)
        c = cs[0]
        # an infinite or NaN ratio (the wanted value overflows or is not finite) is no factor
        if not all(math.isfinite(x) for x in cs) or c == 0 or abs(c - 1) < 1e-6 or any(abs(x - c) > 1e-6 * abs(c) for x in cs):
            return None
        good = all(close(w, v * c, w.dtype) for v, w in zip(values, want))
        return c if good else None

    scaled_matches: list[NumericMatch] = []

    g0 = idx.graphs[0]
    names = [n.name for n in g0.nodes]
    numel = 1
    for s_ in shape:
        numel *= s_
    for r, g in enumerate(idx.graphs):
        for n in g.nodes:
            vals = [sim.ranks[r][n.name] for sim in sims]
            if tuple(n.shape) == shape:
                good, err = ok(vals)
                if good:
                    add(idx.ref(idx.dval_of(r, n)), "replica", err)
                elif scaled and n.op != "const":
                    c = factor_of(vals)
                    if c is not None:
                        scaled_matches.append(NumericMatch(S.scale(idx.ref(idx.dval_of(r, n)), c), "scaled", 0.0, c))
            elif len(n.shape) == 2 and tuple(reversed(n.shape)) == shape:
                good, err = ok([v.t() for v in vals])
                if good:
                    add(S.permute(idx.ref(idx.dval_of(r, n)), (1, 0)), "transpose", err)
            elif _numel(n.shape) == numel and n.dtype == seq_node.dtype:
                good, err = ok([v.reshape(shape) for v in vals])
                if good:
                    add(S.view(idx.ref(idx.dval_of(r, n)), shape), "view", err)
            if len(found) >= limit:
                return found
    # same-named tensors on every rank: concatenations and partial sums
    for name in names:
        nodes = [g.by_name.get(name) for g in idx.graphs]
        if any(x is None for x in nodes) or W < 2:
            continue
        shapes = [tuple(x.shape) for x in nodes]
        refs = None
        if all(s_ == shape for s_ in shapes):
            vals = [sum(sim.ranks[r][name] for r in range(W)) for sim in sims]
            good, err = ok(vals)
            refs = [idx.ref(idx.dval_of(r, x)) for r, x in enumerate(nodes)]
            if good:
                add(S.accum("sum", refs), "partial", err)
            elif scaled and nodes[0].op != "const":
                c = factor_of(vals)
                if c is not None:
                    scaled_matches.append(NumericMatch(S.scale(S.accum("sum", refs), c), "scaled", 0.0, c))
        for d in range(len(shape)):
            if all(len(s_) == len(shape) for s_ in shapes) and \
                    all(s_[:d] + s_[d + 1:] == shape[:d] + shape[d + 1:] for s_ in shapes) and \
                    sum(s_[d] for s_ in shapes) == shape[d]:
                vals = [torch.cat([sim.ranks[r][name] for r in range(W)], d) for sim in sims]
                good, err = ok(vals)
                refs = refs or [idx.ref(idx.dval_of(r, x)) for r, x in enumerate(nodes)]
                if good:
                    add(S.cat(refs, d), "concat", err)
                elif scaled and nodes[0].op != "const":
                    c = factor_of(vals)
                    if c is not None:
                        scaled_matches.append(NumericMatch(S.scale(S.cat(refs, d), c), "scaled", 0.0, c))
        if len(found) >= limit:
            break
    if not found and scaled_matches:
        return scaled_matches[:limit]
    return found


def _numel(shape) -> int:
    n = 1
    for s_ in shape:
        n *= s_
    return n


def evaluate_relation(engine, expr: Expr, sim) -> torch.Tensor:
    """Value of a relation on one simulation (refs read from the rank that holds them)."""
    from gg_notebook.relations.expr import evaluate

    def leaf(e: Expr):
        if e.op != "ref":
            raise ValueError("relations have only ref leaves")
        d = engine.index.dvals[e.attrs[0]]
        rank, node = d.locations[0]
        return sim.ranks[rank][node.name]

    return evaluate(expr, leaf)
