"""Custom layouts (`gg.Layout`): trace the user's ``fn(global, rank, W)`` into a clean term per rank,
then find how the global tensor is rebuilt from the ranks' locals.

Terms. Each rank's layout function is traced (`capture_layout`) and lowered; its IR must be pure data
movement (``view``/``permute``/``slice``/``cat``/``expand``), which is replayed with the store's
normalizing constructors over the input's atom. Anything that computes values (arithmetic, factories,
advanced indexing with index tensors, dtype casts, collectives) is refused with a `ProblemError`
naming the op and its source line.

Relation (the "index-tensor trick"). The terms are evaluated on ``I = arange(numel).view(shape)``, so
each rank's local tells which global element every local element holds. A rebuild is then searched:

* every local gets *aligned* candidates of the global's rank: the local itself (same ndim) and a
  ``view -> permute -> view`` of it whose dims each walk along one global dim (undoing transposes and
  flattenings such as ``[3, n] -> [3n]``);
* the global box is covered along some dim ``d`` by maximal runs, each run a box slice of one
  candidate; a slab that no candidate holds whole is covered recursively along the other dims
  (guillotine cuts, e.g. 2-D block layouts);
* the cheapest plan (fewest pieces) over the top-level dims is kept, built with the clean
  constructors and checked by evaluating it on the locals (it must reproduce ``I`` exactly).

Replicated layouts (some rank's term is the whole input) and contiguous-slice layouts (every term is
one slice of the input along the same dim) are recognized from the terms alone, at any size.

Limits: the index evaluation materializes int32 tensors of the global's size, so inputs with more
than ``MAX_NUMEL`` (2**24) elements are refused (`ProblemError`); layouts whose locals can only be
glued back with a gather (no box structure after one view/permute) are refused as "no clean rebuild".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from gg_notebook.problem import Problem, ProblemError
from gg_notebook.relations.expr import Expr, ExprStore, ShapeError, evaluate

MAX_NUMEL = 2 ** 24
_ALLOWED = ("index, slice, cat, split, reshape or transpose")


# ====================================================================== terms
def _what(problem: Problem, i: int) -> str:
    what = getattr(problem, "what", None)
    if what is not None:
        return what
    return f"input {i} ({problem.input_names[i]})"


def _layout_term(problem: Problem, i: int, store: ExprStore, atom: Expr, capture_layout, r: int) -> Expr:
    from gg_notebook.ir.lower import lower

    layout = problem.placements[i]
    W = problem.world_size
    what = _what(problem, i)
    lname = layout.name or getattr(layout.fn, "__name__", "layout")
    try:
        gm = capture_layout(layout, problem.inputs[i], r, W)
    except Exception as exc:  # noqa: BLE001 - the user's function failed to trace
        src = getattr(exc, "source", None)
        at = f" at {src}" if src and src not in str(exc) else ""
        raise ProblemError(
            f"{what}: the Layout {lname} failed on rank {r}{at}: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        graph = lower(gm, r)
    except Exception as exc:  # noqa: BLE001
        raise ProblemError(f"{what}: the Layout {lname} could not be lowered on rank {r}: {exc}") from exc
    if len(graph.outputs) != 1:
        raise ProblemError(f"{what}: the Layout {lname} must return one tensor on rank {r}, "
                           f"got {len(graph.outputs)}")
    env: dict[str, Expr] = {}
    for n in graph.nodes:
        op = n.op
        try:
            if op == "input":
                if tuple(n.shape) != tuple(atom.shape):
                    raise ProblemError(f"{what}: the Layout's input has shape {n.shape}, expected {atom.shape}")
                t = atom
            elif op == "view":
                t = store.view(env[n.inputs[0].name], n.attrs)
            elif op == "permute":
                t = store.permute(env[n.inputs[0].name], n.attrs)
            elif op == "slice":
                d, a, b = n.attrs
                t = store.slice(env[n.inputs[0].name], d, a, b)
            elif op == "cat":
                t = store.cat([env[x.name] for x in n.inputs], n.attrs)
            elif op == "expand":
                t = store.expand(env[n.inputs[0].name], n.attrs)
            else:
                opname = n.target or op
                if op == "call" and getattr(n.attrs, "name", None):
                    opname = n.attrs.name
                where = f" at {n.source}" if n.source else ""
                code = f" (`{n.code.strip()}`)" if n.code else ""
                raise ProblemError(
                    f"{what}: the Layout computes {opname}{where}{code} on rank {r}; "
                    f"a Layout may only {_ALLOWED}"
                )
        except ShapeError as exc:
            raise ProblemError(f"{what}: could not replay the Layout's {n.target} at {n.source} "
                               f"on rank {r}: {exc}") from exc
        if tuple(t.shape) != tuple(n.shape):
            raise ProblemError(f"{what}: the Layout's {n.target} at {n.source} on rank {r} has shape "
                               f"{tuple(n.shape)} but replays to {tuple(t.shape)}")
        env[n.name] = t
    out = env[graph.outputs[0].name]
    if out.dtype != atom.dtype:  # pragma: no cover - casts lower to calls and are refused above
        raise ProblemError(f"{what}: the Layout changes the dtype on rank {r}")
    return out


# ====================================================================== candidates
@dataclass
class _Cand:
    """An aligned view of rank ``rank``'s local: view(split) -> permute(perm) -> view(final)."""

    rank: int
    split: tuple
    perm: tuple
    groups: list  # per global dim: positions (in permuted order) merged into it, outer first
    final: tuple
    A: torch.Tensor  # the local's index values in this arrangement (shape == final)

    def key(self):
        return (self.rank, self.split, self.perm, self.final)

    def coords_of(self, q: int) -> tuple:
        """Coordinates in ``A`` of the local's flat element ``q``."""
        sc = []
        for s in reversed(self.split):
            sc.append(q % s)
            q //= s
        sc.reverse()
        pc = [sc[p] for p in self.perm]
        out = []
        for grp in self.groups:
            c = 0
            for pos in grp:
                c = c * self.split[self.perm[pos]] + pc[pos]
            out.append(c)
        return tuple(out)

    def build(self, store: ExprStore, ref: Expr) -> Expr:
        x = store.view(ref, self.split)
        x = store.permute(x, self.perm)
        return store.view(x, self.final)


def _unravel(v: torch.Tensor, shape: tuple) -> torch.Tensor:
    """[k] flat indices -> [k, ndim] coordinates."""
    v = v.long()
    cols = []
    for s in reversed(shape):
        cols.append(v % s)
        v = v // s
    cols.reverse()
    return torch.stack(cols, -1) if cols else v.new_zeros(v.shape + (0,))


def _unravel1(v: int, shape: tuple) -> tuple:
    out = []
    for s in reversed(shape):
        out.append(v % s)
        v //= s
    return tuple(reversed(out))


def _candidates(rank: int, L: torch.Tensor, G: tuple) -> list[_Cand]:
    n = len(G)
    out: list[_Cand] = []
    if L.numel() == 0:
        return out
    aligned = _aligned(rank, L, G)
    if aligned is not None:
        out.append(aligned)
    if L.dim() == n:
        ident = _Cand(rank, tuple(L.shape), tuple(range(n)), [[k] for k in range(n)], tuple(L.shape), L)
        if aligned is None or aligned.key() != ident.key():
            out.append(ident)
    return out


def _aligned(rank: int, L: torch.Tensor, G: tuple) -> _Cand | None:
    """Split each local dim into factors that each walk along one global dim, then group them."""
    n = len(G)
    origin = [0] * L.dim()
    split: list[int] = []
    gdim: list[int | None] = []
    stride: list[int] = []
    for j, s in enumerate(L.shape):
        idx = list(origin)
        idx[j] = slice(None)
        line = L[tuple(idx)].reshape(-1)
        factors = []  # inner first: (size, global dim, global step)
        while True:
            m = line.numel()
            if m <= 1:
                factors.append((max(m, 1), None, 0))
                break
            C = _unravel(line, G)
            changed = (C[1] != C[0]).nonzero().flatten().tolist()
            if len(changed) != 1:
                return None
            g = changed[0]
            step = int(C[1, g] - C[0, g])
            others = [k for k in range(n) if k != g]
            if others:
                moved = (C[:, others] != C[0, others]).any(1).nonzero().flatten()
            else:
                moved = torch.empty(0, dtype=torch.long)
            if moved.numel() == 0:
                factors.append((m, g, step))
                break
            run = int(moved[0])
            if m % run:
                return None
            factors.append((run, g, step))
            line = line[::run]
        for size, g, step in reversed(factors):
            split.append(size)
            gdim.append(g if size > 1 else None)
            stride.append(step)
    if math.prod(split) != L.numel():  # pragma: no cover - factors multiply to the local's dims
        return None
    perm: list[int] = []
    groups: list[list[int]] = []
    final: list[int] = []
    for g in range(n):
        mine = [k for k in range(len(split)) if gdim[k] == g]
        mine.sort(key=lambda k: -stride[k])
        groups.append(list(range(len(perm), len(perm) + len(mine))))
        perm.extend(mine)
        final.append(math.prod(split[k] for k in mine))
    perm.extend(k for k in range(len(split)) if gdim[k] is None)
    A = L.reshape(split).permute(perm).reshape(final)
    return _Cand(rank, tuple(split), tuple(perm), groups, tuple(final), A)


# ====================================================================== search
class _Search:
    def __init__(self, I: torch.Tensor, cands: list[_Cand], pos: list[torch.Tensor], G: tuple):
        self.I, self.cands, self.pos, self.G = I, cands, pos, G
        self.strides = [math.prod(G[k + 1:]) for k in range(len(G))]

    def flat(self, coords) -> int:
        return sum(c * s for c, s in zip(coords, self.strides))

    def where(self, c: _Cand, v: int):
        q = int(self.pos[c.rank][v])
        return None if q < 0 else c.coords_of(q)

    @staticmethod
    def box(t: torch.Tensor, lo, size) -> torch.Tensor:
        for k, (a, s) in enumerate(zip(lo, size)):
            t = t.narrow(k, a, s)
        return t

    def holds(self, c: _Cand, p, lo, size) -> bool:
        if any(pk + sk > ak for pk, sk, ak in zip(p, size, c.A.shape)):
            return False
        return torch.equal(self.box(c.A, p, size), self.box(self.I, lo, size))

    def run(self, c: _Cand, lo, hi, d: int, k: int):
        """Longest t such that the slab [k, k+t) along d of box (lo, hi) is a box of ``c``."""
        start = list(lo)
        start[d] = k
        p = self.where(c, self.flat(start))
        if p is None:
            return 0, None
        size = [h - l for l, h in zip(lo, hi)]
        tmax = min(hi[d] - k, c.A.shape[d] - p[d])

        def ok(t):
            sz = list(size)
            sz[d] = t
            return self.holds(c, p, start, sz)

        if tmax < 1 or not ok(1):
            return 0, p
        good, t = 1, 2
        while t <= tmax and ok(t):  # gallop, then bisect
            good, t = t, t * 2
        bad = min(t, tmax + 1)
        while bad - good > 1:
            mid = (good + bad) // 2
            if ok(mid):
                good = mid
            else:
                bad = mid
        return good, p

    def extent(self, lo, hi, d: int, k: int) -> int:
        """Thickness of a slab that no candidate holds whole: how far the holder of its first
        element keeps walking along d."""
        start = list(lo)
        start[d] = k
        best = 1
        for c in self.cands:
            p = self.where(c, self.flat(start))
            if p is None:
                continue
            tmax = min(hi[d] - k, c.A.shape[d] - p[d])
            line_c = c.A[tuple(p[:d]) + (slice(p[d], p[d] + tmax),) + tuple(p[d + 1:])]
            line_i = self.I[tuple(start[:d]) + (slice(k, k + tmax),) + tuple(start[d + 1:])]
            bad = (line_c != line_i).nonzero()
            t = int(bad[0]) if bad.numel() else tmax
            best = max(best, t)
            break
        return best

    def solve(self, lo, hi, dims: tuple, top: bool = False):
        size = [h - l for l, h in zip(lo, hi)]
        v = self.flat(lo)
        for ci, c in enumerate(self.cands):  # one candidate holds the whole box
            p = self.where(c, v)
            if p is not None and self.holds(c, p, lo, size):
                return ("piece", ci, p, tuple(size))
        best = None
        for d in dims:
            if size[d] <= 1 and any(size[e] > 1 for e in dims if e != d):
                continue
            plan = self.cover(lo, hi, d, tuple(e for e in dims if e != d))
            if plan is None:
                continue
            if best is None or _cost(plan) < _cost(best):
                best = plan
            if not top:
                break
        return best

    def cover(self, lo, hi, d: int, rest: tuple):
        parts = []
        k = lo[d]
        while k < hi[d]:
            best_t, best = 0, None
            for ci, c in enumerate(self.cands):
                t, p = self.run(c, lo, hi, d, k)
                if t > best_t:
                    best_t, best = t, (ci, p)
            if best_t:
                ci, p = best
                size = [h - l for l, h in zip(lo, hi)]
                size[d] = best_t
                parts.append(("piece", ci, p, tuple(size)))
                k += best_t
                continue
            if not rest:
                return None
            t = self.extent(lo, hi, d, k)
            sub = None
            for tt in ((t, 1) if t > 1 else (1,)):
                slo, shi = list(lo), list(hi)
                slo[d], shi[d] = k, k + tt
                sub = self.solve(tuple(slo), tuple(shi), rest)
                if sub is not None:
                    t = tt
                    break
            if sub is None:
                return None
            parts.append(sub)
            k += t
        if len(parts) == 1:
            return parts[0]
        return ("cat", d, parts)


def _cost(plan) -> int:
    if plan[0] == "piece":
        return 1
    return 1 + sum(_cost(p) for p in plan[2])


def _build(plan, cands: list[_Cand], store: ExprStore, refs: list[Expr], memo: dict) -> Expr:
    if plan[0] == "piece":
        _, ci, p, size = plan
        c = cands[ci]
        if ci not in memo:
            memo[ci] = c.build(store, refs[c.rank])
        x = memo[ci]
        for k, (a, s) in enumerate(zip(p, size)):
            x = store.slice(x, k, a, a + s)
        return x
    _, d, parts = plan
    return store.cat([_build(q, cands, store, refs, memo) for q in parts], d)


def _index_tensor(shape: tuple) -> torch.Tensor:
    return torch.arange(math.prod(shape), dtype=torch.int32).view(shape)


def _locals(terms: list[Expr], atom: Expr, I: torch.Tensor) -> list[torch.Tensor]:
    leaf = lambda e: I if e is atom else None  # noqa: E731
    memo: dict = {}
    return [evaluate(t, leaf, memo) for t in terms]


def _symbolic_plan(atom: Expr, terms: list[Expr]):
    """Replicated and contiguous-slice layouts, read off the terms without any index tensor."""
    for r, t in enumerate(terms):
        if t is atom:
            return ("rank", r)
    dims = {t.attrs[0] for t in terms if t.op == "slice" and t.args[0] is atom}
    if len(dims) != 1 or any(not (t.op == "slice" and t.args[0] is atom) for t in terms):
        return None
    d = dims.pop()
    by_start: dict[int, tuple[int, int]] = {}
    for r, t in enumerate(terms):
        _, a, b = t.attrs
        if a not in by_start or b > by_start[a][0]:
            by_start[a] = (b, r)
    cur, ranks = 0, []
    while cur in by_start and cur < atom.shape[d]:
        cur, r = by_start[cur]
        ranks.append(r)
    if cur != atom.shape[d]:
        return None
    return ("refcat", d, ranks)


def _plan_relation(problem: Problem, i: int, atom: Expr, terms: list[Expr]):
    what = _what(problem, i)
    G = tuple(atom.shape)
    numel = math.prod(G)
    W = len(terms)
    fast = _symbolic_plan(atom, terms)
    if fast is not None:
        return [], fast
    if numel > MAX_NUMEL:
        raise ProblemError(
            f"{what}: the Layout's input has {numel} elements; inverting a custom Layout is limited to "
            f"{MAX_NUMEL} elements (use a smaller example tensor of the same structure, or a Shard/Replicate placement)"
        )
    I = _index_tensor(G)
    locs = _locals(terms, atom, I)
    covered = torch.zeros(numel, dtype=torch.bool)
    for L in locs:
        if L.numel():
            covered[L.reshape(-1).long()] = True
    if numel and not bool(covered.all()):
        missing = (~covered).nonzero().flatten()
        first = int(missing[0])
        raise ProblemError(
            f"{what}: the ranks' local copies do not cover the global tensor: {missing.numel()} of {numel} "
            f"elements are on no rank, the first is element {_unravel1(first, G)} (flat index {first}); "
            f"a Layout must give every element of the global tensor to some rank"
        )
    if numel == 0:
        for r, L in enumerate(locs):
            if tuple(L.shape) == G:
                return [], ("rank", r)
        raise ProblemError(f"{what}: the global tensor is empty and no rank holds it with its shape")
    cands: list[_Cand] = []
    for r, L in enumerate(locs):
        cands.extend(_candidates(r, L, G))
    pos = []
    for r, L in enumerate(locs):
        pr = torch.full((numel,), -1, dtype=torch.int32)
        if L.numel():
            pr[L.reshape(-1).long()] = torch.arange(L.numel(), dtype=torch.int32)
        pos.append(pr)
    search = _Search(I, cands, pos, G)
    plan = search.solve(tuple(0 for _ in G), G, tuple(range(len(G))), top=True)
    if plan is None:
        raise ProblemError(
            f"{what}: the ranks' local copies cover the global tensor but no clean rebuild was found "
            f"(the global tensor must be a concatenation of slices of the ranks' locals, each possibly "
            f"reshaped or transposed once); W={W}, local shapes {[tuple(L.shape) for L in locs]}"
        )
    return cands, plan


# ====================================================================== entry point
def layout_terms_and_relation(
    problem: Problem, i: int, store: ExprStore, atom: Expr, capture_layout
) -> tuple[list[Expr], Callable[[list[Expr]], Expr]]:
    """Rank terms of input ``i``'s custom Layout and a builder of its clean rebuild relation.

    Returns ``(terms, builder)``: ``terms[r]`` is rank r's local copy as a clean term over ``atom``;
    ``builder(refs)`` (``refs[r]`` a ``ref`` of rank r's local) returns a clean expression over the
    refs equal to the global tensor. Raises `ProblemError` when the Layout computes values, fails, or
    its locals cannot be glued back cleanly.
    """
    W = problem.world_size
    terms = [_layout_term(problem, i, store, atom, capture_layout, r) for r in range(W)]
    _check_terms(problem, i, atom, terms)
    cands, plan = _plan_relation(problem, i, atom, terms)
    what = _what(problem, i)

    def builder(refs: list[Expr]) -> Expr:
        if len(refs) != W:
            raise ProblemError(f"{what}: expected {W} rank refs, got {len(refs)}")
        if plan[0] == "rank":
            return refs[plan[1]]
        if plan[0] == "refcat":
            return store.cat([refs[r] for r in plan[2]], plan[1])
        rel = _build(plan, cands, store, list(refs), {})
        # check the rebuilt relation on the index tensor, refs bound to the ranks' locals
        I = _index_tensor(tuple(atom.shape))
        locs = _locals(terms, atom, I)
        by_id = {ref.id: locs[r] for r, ref in enumerate(refs)}
        got = evaluate(rel, lambda e: by_id[e.id])
        if tuple(got.shape) != tuple(I.shape) or not torch.equal(got, I):
            raise ProblemError(f"{what}: internal error: the rebuilt relation does not reproduce the "
                               f"global tensor")
        return rel

    return terms, builder


def _check_terms(problem: Problem, i: int, atom: Expr, terms: list[Expr]) -> None:
    """Cross-check the traced terms against the Layout run eagerly on the example input."""
    g = problem.inputs[i]
    if g.is_meta or g.numel() > MAX_NUMEL:
        return
    layout = problem.placements[i]
    memo: dict = {}
    for r, t in enumerate(terms):
        try:
            want = layout.fn(g, r, problem.world_size)
        except Exception:  # noqa: BLE001 - traced fine; eager differences are not ours to judge
            return
        got = evaluate(t, lambda e: g if e is atom else None, memo)
        if not isinstance(want, torch.Tensor) or tuple(want.shape) != tuple(got.shape) or not torch.equal(want, got):
            raise ProblemError(
                f"{_what(problem, i)}: the traced Layout disagrees with running it on rank {r} "
                f"(data-dependent layout?); a Layout must depend only on shapes, rank and world size"
            )


# ====================================================================== re-tiling (engine)
def rebuild_plans(locs: list[torch.Tensor], G: tuple, max_numel: int = MAX_NUMEL) -> list[Callable]:
    """Rebuilds of a global box ``G`` from locals given as index tensors (``locs[r]`` holds, for
    every local element, the flat index in ``G`` of the element it is; every value in range).

    Unlike a Layout, the locals need not cover ``G``: plans that cover it are returned, one per
    top-level dim the cover cuts along first (plus a single piece if one local holds it whole), as
    builders ``build(store, refs) -> Expr`` (``refs[r]`` the ref of local r). Used by the engine to
    re-relate a value to another tiling of the same elements (`gg_notebook.relations.movement`)."""
    numel = math.prod(G)
    if numel == 0 or numel > max_numel:
        return []
    I = _index_tensor(G)
    cands: list[_Cand] = []
    for r, L in enumerate(locs):
        cands.extend(_candidates(r, L, G))
    if not cands:
        return []
    pos = []
    for L in locs:
        pr = torch.full((numel,), -1, dtype=torch.int32)
        if L.numel():
            pr[L.reshape(-1).long()] = torch.arange(L.numel(), dtype=torch.int32)
        pos.append(pr)
    search = _Search(I, cands, pos, G)
    lo, hi = tuple(0 for _ in G), tuple(G)
    dims = tuple(range(len(G)))
    plans = []
    whole = search.solve(lo, hi, ())
    if whole is not None and whole[0] == "piece":
        plans.append(whole)
    for d in dims:
        if G[d] <= 1:
            continue
        try:
            plan = search.cover(lo, hi, d, tuple(e for e in dims if e != d))
        except (RuntimeError, IndexError):  # pragma: no cover - defensive: a malformed local
            plan = None
        if plan is not None and plan not in plans:
            plans.append(plan)

    def builder(plan):
        return lambda store, refs: _build(plan, cands, store, list(refs), {})

    return [builder(p) for p in plans]


# ====================================================================== output layouts (expect)
class _OutputShim:
    """What `_layout_term` / `_check_terms` read of a problem, for the k-th *output*."""

    def __init__(self, layout, example: torch.Tensor, world_size: int, k: int):
        self.placements = [layout]
        self.inputs = [example]
        self.world_size = world_size
        self.input_names = [f"output {k}"]
        self.what = f"expect[{k}] (a Layout of output {k})"


_OUT_CACHE: dict = {}


def output_layout_terms(layout, shape: tuple, dtype, world_size: int, k: int, store: ExprStore,
                        capture_layout) -> tuple[Expr, list[Expr]]:
    """(atom, terms): the atom standing for the sequential k-th output and, per rank, the clean term
    over it that ``layout.fn(output, rank, W)`` computes (refused like an input Layout if it
    computes values)."""
    example = torch.zeros(shape, dtype=dtype)
    shim = _OutputShim(layout, example, world_size, k)
    atom = store.atom(f"<expect[{k}]>", tuple(shape), dtype)
    terms = [_layout_term(shim, 0, store, atom, capture_layout, r) for r in range(world_size)]
    return atom, terms
