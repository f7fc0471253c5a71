"""The inference engine: walk the sequential graph and relate each tensor to the ranks.

For each sequential operator (one *step*), the engine takes the candidate relations of its inputs,
applies the operator to them and rewrites the result with the lemmas until every compute piece is
an operator applied to distributed values, which it then looks up in the hash-consed index of the
ranks (`DIndex`). Whatever survives is a clean expression over distributed tensors: a relation.

Everything is deterministic (lemmas in registry order, candidates in discovery order), memoized
per (operator, argument relations), and recorded as `Step`s so a session can replay and show it.

`gg.verify` runs greedily first (`Engine.run_greedy_first`): an operator's input relations are
combined only until one combination gives a clean relation, a push stops at the first lemma that
gives one, and the scalar normal form is asked last. Every relation found is still a lemma's or a
rank's, so a greedy proof is a proof; when the greedy relations do not prove the problem (stuck, an
output without the relation it needs), the exhaustive search runs from the start, and its verdict
is the answer. A session steps exhaustively.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field

import torch

from gg_notebook.engine.index import DIndex
from gg_notebook.engine.heap import long_lived_heap
from gg_notebook.ir.graph import Graph, Node
from gg_notebook.engine.clamped_count import lookup as clamped_count_lookup
from gg_notebook.engine.form_tiling import tiling_up_to_factor
from gg_notebook.lemmas import MATCHERS, lemmas_for
from gg_notebook.lemmas.base import absorbed_by
from gg_notebook.lemmas.domain import release_shared
from gg_notebook.relations.movement import movement_lookup, retile
from gg_notebook.relations.expr import (Expr, ExprStore, OpSpec, ShapeError, has_factor, infer_shape, leaves, pretty,
                                        size, walk)
from gg_notebook.relations.ground import is_value

MAX_CANDIDATES = 4
MAX_COMBOS = 16
MAX_DEPTH = 3


@dataclass(frozen=True)
class Candidate:
    """A relation ``seq tensor == expr`` and the lemma chain that justifies it."""

    expr: Expr
    chain: tuple[str, ...] = ()
    assumption: bool = False  # True for an unproven hint / accepted suggestion
    deferred: bool = False  # the operator applied to its inputs' relations, awaiting a fused lemma


@dataclass
class Step:
    """One rewrite iteration: a sequential operator and what the engine found for it."""

    index: int
    node: str
    op: str
    source: str | None
    code: str | None
    inputs: dict[str, list[str]]
    candidates: list[Candidate]
    pretty: list[str]
    status: str  # "related" | "stuck" | "input" | "deferred"
    seconds: float = 0.0
    detail: str = ""
    blamed: str | None = None  # an earlier step this step's failure was attributed to
    saved: tuple | None = None  # (status, detail) before a later step blamed this one (restored by undo)

    @property
    def stuck(self) -> bool:
        return self.status == "stuck"



@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` torch intra-op threads, restoring the previous number after."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

class Engine:
    def __init__(self, seq: Graph, index: DIndex, store: ExprStore, input_relations: dict[str, list[Candidate]]):
        self.seq = seq
        self.index = index
        self.store = store
        self.input_relations = input_relations
        self.relations: dict[str, list[Candidate]] = {}
        self.steps: list[Step] = []
        self.cursor = 0
        self.stuck_at: Step | None = None
        self._term_memo: dict[int, Expr] = {}
        self._push_memo: dict[tuple, list[Candidate]] = {}
        # (expr id, bitwise) -> `realize` / `up_to_factor`: functions of the expression and the
        # index alone (the index is fixed once built), asked again for the same candidate
        self._realize_memo: dict[tuple, Expr | None] = {}
        self._factor_memo: dict[tuple, Expr | None] = {}
        self._lookup_memo: dict[tuple, Expr | None] = {}  # (spec, argument ids, bitwise) -> `lookup`
        self.stats = {"lookups": 0, "lemma_plans": 0, "pushes": 0}
        self.deferred: dict[str, Step] = {}
        self._users: dict | None = None
        self.user_relations: dict[str, list[Candidate]] = {}  # hints / accepted suggestions, by node
        self.bitwise = False  # exact="bitwise": only lemmas that preserve floating-point results bit for bit
        self.disabled: set[str] = set()  # lemma names switched off (experiments, tests)
        # greedy: an operator's inputs' relations are tried combination by combination only until one
        # gives a clean relation (`infer`); the other combinations mostly find the same relations again
        # (a matmul of a replicated value, of its other spellings, of its row blocks). `run_greedy_first`
        # falls back to the exhaustive search when the greedy relations do not prove the problem.
        self.greedy = False
        self._failures: list[tuple[int, OpSpec]] = []
        # every lemma application the relations rest on: (lemma, operator, argument relations, plan),
        # re-checked numerically after a proof (translation validation)
        self.instances: list[tuple[str, OpSpec, tuple, Expr]] = []
        self.domains: dict = {}  # input name -> IdDomain declared in Problem.domains
        self.domain_facts: dict[str, str] = {}  # every id domain a lemma relied on (for the result)
        # proof by induction over repeated layers (engine/induction.py): `run` asks it before each
        # step; None (a session's stepping, the default) walks every operator
        self.induction = None

    # ------------------------------------------------------------------ naming
    def name(self, leaf: Expr) -> str:
        if leaf.op == "ref":
            return self.index.dvals[leaf.attrs[0]].label(self.index.world_size)
        return str(leaf.attrs[0])

    def show(self, e: Expr) -> str:
        # a relation is printed at its step and again at every step that reads it: once per node
        # (its leaves' labels do not change once the index is built)
        memo = self.__dict__.setdefault("_show_memo", {})
        s = memo.get(e.id)
        if s is None:
            s = memo[e.id] = pretty(e, self.name, memo)  # (subexpressions rendered once, into the same memo)
        return s

    # ------------------------------------------------------------------ terms
    def to_term(self, e: Expr) -> Expr:
        """Translate a relation (over refs) into a term (over global inputs)."""
        memo = self._term_memo
        hit = memo.get(e.id)
        if hit is not None:
            return hit
        if e.op == "ref":
            t = self.index.dvals[e.attrs[0]].term
        elif not e.args:
            t = e
        else:
            t = rebuild(self.store, e, [self.to_term(a) for a in e.args])
        memo[e.id] = t
        return t

    def realize(self, e: Expr) -> Expr | None:
        """A ref to the distributed value equal to ``e``, if some rank holds it."""
        if e.op == "ref":
            return e
        key = (e.id, self.bitwise)
        memo = self._realize_memo
        if key in memo:
            return memo[key]
        r = memo[key] = self._realize(e)
        return r

    def _realize(self, e: Expr) -> Expr | None:
        t = self.to_term(e)
        d = self.index.realized_movement(t)
        if d is not None:
            return self.index.ref(d)
        for dim, dvals in self.index.tiling(t):
            return self.store.cat([self.index.ref(v) for v in dvals], dim)
        if not self.bitwise:
            hit = self.index.realized_up_to_factor(t)
            if hit is not None and hit[1] == 1:
                return self.index.ref(hit[0])
            tiled = tiling_up_to_factor(self.index, t)  # the same tiling in another spelling
            if tiled is not None and tiled[0] == 1:
                return self.store.cat([self.index.ref(v) for v in tiled[2]], tiled[1])
        return None

    def up_to_factor(self, t: Expr) -> Expr | None:
        """``f * ref`` for a distributed value equal to term ``t`` up to an exact factor f (the
        scalar normal form; never with exact="bitwise"). A relation with f != 1 is not clean."""
        if self.bitwise:
            return None
        memo = self._factor_memo
        if t.id in memo:
            return memo[t.id]
        r = memo[t.id] = self._up_to_factor(t)
        return r

    def _up_to_factor(self, t: Expr) -> Expr | None:
        hit = self.index.realized_up_to_factor(t)
        if hit is None:
            tiled = tiling_up_to_factor(self.index, t)
            if tiled is None:
                return None
            f, dim, dvals = tiled
            return self.store.scale(self.store.cat([self.index.ref(v) for v in dvals], dim), f)
        d, f = hit
        return self.store.scale(self.index.ref(d), f)

    # ------------------------------------------------------------------ push
    def lookup(self, spec: OpSpec, args: tuple, factor: bool = True) -> Expr | None:
        """A relation for ``spec`` on ``args`` some rank holds as is: by term, by data movement, by a
        matcher; then (``factor``) by the scalar normal form, possibly up to a factor (`up_to_factor`)."""
        self.stats["lookups"] += 1
        # a function of the operator, the argument relations and the fixed index (not of the depth
        # `push` asks it at: the same call is pushed again deeper or shallower by other plans); what
        # a matcher records on the engine on the way (domain facts, clamped counts) is the same
        # record each time
        key = (spec, tuple([a.id for a in args]), self.bitwise)
        memo = self._lookup_memo
        hit = memo.get(key, memo)
        if hit is memo:
            hit = memo[key] = self._lookup(spec, args)
        if hit is None and factor:
            return self.lookup_factor(spec, args)
        return hit

    def lookup_factor(self, spec: OpSpec, args: tuple) -> Expr | None:
        """The last resort of `lookup`: the call's term found by the scalar normal form (never with
        exact="bitwise"); memoized by the term (`up_to_factor`)."""
        if spec.unique is None and not self.bitwise:
            try:
                return self.up_to_factor(self.store.call(spec, [self.to_term(a) for a in args]))
            except ShapeError:
                return None
        return None

    def _lookup(self, spec: OpSpec, args: tuple) -> Expr | None:
        if spec.unique is None:
            terms = [self.to_term(a) for a in args]
            if all(is_value(t) for t in terms):
                # arguments that are input-independent values, even if the relation reads them from
                # a rank: the result is a value too (relations/ground.py), which `rank` relates to the
                # ranks by value; a result too large to evaluate goes the usual way (lemmas)
                v = self.store.call(spec, terms)
                if is_value(v):
                    return v
            try:
                _, dtype = infer_shape(spec, tuple((a.shape, a.dtype) for a in terms))
            except ShapeError:
                return None
            t = self.store.find("call", spec, terms, dtype)
            if t is not None:
                d = self.index.realized(t)
                if d is not None:
                    return self.index.ref(d)
            # the same call on arguments that are the same data movement (decided on index
            # tensors), or one piece of a rank's call on a concatenated operand
            hit = movement_lookup(self.index, spec, terms, t)
            if hit is not None:
                return hit
            # num / c against the ranks' num / clamp(c, min=1): only under the recorded assumption c >= 1
            hit = clamped_count_lookup(self, spec, terms)
            if hit is not None:
                return hit
        if all(a.ground for a in args) and spec.unique is None:
            return self.store.call(spec, args)  # a constant computation
        matcher = MATCHERS.get(spec.kind)
        if matcher is not None:
            found = matcher(self, spec, args)
            if found is not None:
                return found
        return None  # (`lookup` then asks `lookup_factor`)

    def push(self, spec: OpSpec, args: tuple, depth: int = MAX_DEPTH) -> list[Candidate]:
        greedy = self.greedy
        key = (spec, tuple(a.id for a in args), depth, greedy)
        hit = self._push_memo.get(key)
        if hit is not None:
            return hit
        self._push_memo[key] = []  # cut cycles
        self.stats["pushes"] += 1
        out: list[Candidate] = []
        # greedy: the scalar normal form last, only if no lemma gives a clean relation (it normalizes
        # the call's whole history, and the operators whose relations are concatenations - every
        # matmul under sequence parallelism - are related by a lemma, not found up to a factor)
        found = self.lookup(spec, args, factor=not greedy)
        if found is not None:
            out.append(Candidate(found, ("match",) if found.op != "scale" else ("scalar-algebra",)))
        if depth > 0 and not any(not has_factor(c.expr) for c in out):
            try:
                out_shape, _ = infer_shape(spec, tuple((a.shape, a.dtype) for a in args))
            except ShapeError:
                out_shape = None
            if out_shape is not None:
                for lemma in lemmas_for(spec.kind):
                    if lemma.name in self.disabled or (self.bitwise and not lemma.bitwise_safe):
                        continue
                    if not lemma.applies_to(spec):
                        continue
                    plans = (lemma.plans(self.store, spec, args, out_shape, ctx=self) if lemma.needs_context
                             else lemma.plans(self.store, spec, args, out_shape))
                    for plan in plans:
                        self.stats["lemma_plans"] += 1
                        res = self.resolve(plan, depth - 1)
                        if res is not None:
                            self.instances.append((lemma.name, spec, args, plan))
                            expr, chain = res
                            out.append(Candidate(expr, (lemma.name,) + chain))
                            break
                    if len(out) >= MAX_CANDIDATES:
                        break
                    if greedy and any(not has_factor(c.expr) and not _has_compute(c.expr) for c in out):
                        break  # greedy: the first lemma that gives a clean relation is enough
        if greedy and found is None and not any(not has_factor(c.expr) and not _has_compute(c.expr) for c in out):
            found = self.lookup_factor(spec, args)
            if found is not None:
                out.insert(0, Candidate(found, ("match",) if found.op != "scale" else ("scalar-algebra",)))
        out = [c for c in _dedupe(out) if not _has_compute(c.expr)]
        out.sort(key=lambda c: has_factor(c.expr))  # a clean relation before one up to a factor
        self._push_memo[key] = out
        return out

    def resolve(self, plan: Expr, depth: int):
        """Resolve every compute piece of ``plan``; None if one cannot be related."""
        chain: list[str] = []
        memo: dict[int, Expr] = {}

        def go(e: Expr) -> Expr | None:
            if e.id in memo:
                return memo[e.id]
            if e.op == "call" and not e.ground:
                args = []
                for a in e.args:  # resolve nested pieces first, innermost out
                    v = go(a)
                    if v is None:
                        return None
                    args.append(v)
                cands = self.push(e.attrs, tuple(args), depth)
                if not cands:
                    self._failures.append((depth, e.attrs))
                    return None
                best = cands[0]
                chain.extend(c for c in best.chain if c != "match")
                r = best.expr
                if e.shape is not None and tuple(r.shape) != tuple(e.shape):
                    # a term built with the minimal broadcast (ground.py) keeps its output shape while
                    # its arguments lost leading 1-dims: the pushed call's value is that shape's view
                    if _strip_ones(r.shape) != _strip_ones(e.shape):
                        raise ShapeError(f"resolved {e.attrs.short} to shape {r.shape}, expected {e.shape}")
                    r = self.store.view(r, e.shape)
            elif not e.args:
                r = e
            else:
                new = []
                for a in e.args:
                    v = go(a)
                    if v is None:
                        return None
                    new.append(v)
                r = rebuild(self.store, e, new)
            memo[e.id] = r
            return r

        try:
            r = go(plan)
        except ShapeError:
            return None
        if r is None:
            return None
        return r, tuple(dict.fromkeys(chain))

    # ------------------------------------------------------------------ steps
    @property
    def done(self) -> bool:
        return self.cursor >= len(self.seq.nodes) or self.stuck_at is not None

    def step(self) -> Step | None:
        """Infer relations for the next sequential node; returns the recorded step."""
        if self.done:
            return None
        n = self.seq.nodes[self.cursor]
        t0 = time.perf_counter()
        inputs = {i.name: [self.show(c.expr) for c in self.relations.get(i.name, [])] for i in n.inputs}
        blamed: Step | None = None
        if n.op == "input":
            cands = list(self.input_relations.get(n.name, []))
            status = "input"
        else:
            self._failures = []
            cands = self.infer(n)
            if self.greedy and (not cands or all(has_factor(c.expr) for c in cands)):
                # greedy and no clean relation: this operator searched exhaustively before the
                # whole proof is (`run_greedy_first`)
                self.greedy = False
                try:
                    cands = _dedupe(cands + self.infer(n))
                finally:
                    self.greedy = True
            if not cands or all(has_factor(c.expr) for c in cands):
                # none, or only up to a factor: other relations of the inputs may give a clean one
                cands = cands + self.infer(n, refine=True)
            status = "related" if cands else "stuck"
            deferred_inputs = [self.deferred[i.name] for i in n.inputs if i.name in self.deferred]
            if cands and n.op == "view" and deferred_inputs:  # a view of a value kept symbolically
                cands = [Candidate(c.expr, c.chain, c.assumption, deferred=True) for c in cands]
                status = "deferred"
            # (an input known only up to a factor that should cancel here is blamed, not deferred)
            if not cands and self.fusable(n) and self.scale_origin(n) is None:
                cands = self.defer(n)
                status = "deferred" if cands else "stuck"
            if not cands and deferred_inputs:
                blamed = self.blame(n, deferred_inputs)
                while blamed is not None and self.seq.by_name[blamed.node].op == "view":  # to the producer
                    ins = [self.deferred[i.name] for i in self.seq.by_name[blamed.node].inputs if i.name in self.deferred]
                    if not ins:
                        break
                    blamed = ins[0]
            elif not cands:
                blamed = self.scale_origin(n)
        cands = self.rank(cands) if status != "deferred" else cands
        extra = [c for c in self.user_relations.get(n.name, []) if c.expr.id not in {x.expr.id for x in cands}]
        if extra:
            cands = [c for c in cands if not c.deferred] + extra
            if status in ("stuck", "deferred") and cands:
                status = "related"
                blamed = None
        self.relations[n.name] = cands
        step = Step(
            index=self.cursor, node=n.name, op=n.target, source=n.source, code=n.code, inputs=inputs,
            candidates=cands, pretty=[self.show(c.expr) for c in cands], status=status,
            seconds=time.perf_counter() - t0,
        )
        if status == "deferred":
            step.detail = "no relation yet: kept symbolically for a lemma that fuses it with its consumer"
            self.deferred[n.name] = step
        if status == "stuck":
            step.detail = self.explain_stuck(n)
            if blamed is not None and blamed is not step:
                step.blamed = blamed.node
                blamed.saved = (blamed.status, blamed.detail)
                if blamed.status == "deferred":
                    blamed.detail = (f"{blamed.op} could not be related even together with its consumer "
                                     f"{n.target} ({n.name})")
                    hints = self.explain_stuck(self.seq.by_name[blamed.node]).partition("; ")[2]
                    if hints:  # e.g. an input known only as partial sums: a missing all-reduce
                        blamed.detail += f"; {hints}"
                    step.detail = f"its input {blamed.node} ({blamed.op}) has no relation"
                else:  # its value is held by the ranks only up to a factor that never cancels
                    partial = any(x.op == "accum" for c in blamed.candidates for x in walk(c.expr))
                    why = ("is an all-reduce missing (the ranks hold per-rank parts of it, with a factor: a mean "
                           "over a sharded dim?), or a scale factor" if partial else
                           "a missing or extra scale factor (a division by the world size, the number of "
                           "micro-batches, a softmax scale?)")
                    blamed.detail = (
                        f"the ranks hold {blamed.node} only up to a constant factor ({blamed.pretty[0]}), and "
                        f"{n.target} ({n.name}) needs its exact value: {why}")
                    step.detail = f"its input {blamed.node} ({blamed.op}) is known only up to a factor"
                blamed.status = "stuck"
                self.stuck_at = blamed
            else:
                self.stuck_at = step
        self.steps.append(step)
        self.cursor += 1
        return step

    def undo(self) -> Step | None:
        """Take back the last step (its relations, and a stuck verdict it caused)."""
        if not self.steps:
            return None
        step = self.steps.pop()
        self.cursor = step.index
        self.relations.pop(step.node, None)
        self.deferred.pop(step.node, None)
        if step.blamed is not None:
            blamed = next((s for s in self.steps if s.node == step.blamed), None)
            if blamed is not None and blamed.saved is not None:
                blamed.status, blamed.detail = blamed.saved
                blamed.saved = None
        if self.stuck_at is not None and (self.stuck_at is step or step.blamed is not None):
            self.stuck_at = None
        return step

    def add_user_relation(self, node: str, cand: Candidate) -> None:
        """Record a relation the user gave for ``node`` (a hint or an accepted suggestion).

        A node not visited yet gets it when its step runs. A visited node gets it now; if that node
        is where the proof is stuck, the proof is unstuck (and a consumer step whose failure was
        blamed on it is taken back, to be retried)."""
        self.user_relations.setdefault(node, [])
        if all(c.expr.id != cand.expr.id for c in self.user_relations[node]):
            self.user_relations[node].append(cand)
        step = next((s for s in self.steps if s.node == node), None)
        if step is None:
            return
        last = self.steps[-1]
        if last is not step and last.blamed == node:
            self.undo()  # the consumer is retried with the new relation
        cands = [c for c in self.relations.get(node, []) if not c.deferred]
        if all(c.expr.id != cand.expr.id for c in cands):
            cands.append(cand)
        self.relations[node] = cands
        step.candidates = cands
        step.pretty = [self.show(c.expr) for c in cands]
        if step.status in ("stuck", "deferred"):
            step.status = "related"
            step.detail = "related by a user relation"
            self.deferred.pop(node, None)
        if self.stuck_at is step:
            self.stuck_at = None

    def undo_to(self, index: int) -> None:
        while self.steps and self.steps[-1].index >= index:
            self.undo()

    @property
    def seq_output_names(self) -> set[str]:
        return {o.name for o in self.seq.outputs}

    def domain_of(self, e: Expr, accepted, what: str):
        """The ids a lemma may assume ``e`` (a relation) ranges over: ``accepted`` (what the
        operator accepts, sentinels included) narrowed by the domains declared for the inputs it
        is read from, if it is pure data movement of such inputs. Every use is recorded."""
        from gg_notebook.relations.domains import IdDomain

        term = self.to_term(e)
        names = _moved_atoms(term)
        declared = [self.domains[n] for n in names] if names and all(n in self.domains for n in names) else []
        if declared:
            d = declared[0]
            for x in declared[1:]:
                d = d.union(x)
            used = d.intersect(accepted)
            self.domain_facts[f"{what}:{','.join(names)}"] = (
                f"{', '.join(names)} ∈ {d.describe()} (declared in Problem.domains; used for the {what})")
            return used
        src = f"{', '.join(names)}" if names else "computed values"
        self.domain_facts[f"{what}:{src}"] = (
            f"{src} ∈ {accepted.describe()} (every value the operator accepts; used for the {what})")
        return accepted if isinstance(accepted, IdDomain) else IdDomain.of(accepted)

    def partitions(self, size: int) -> list[tuple[int, ...]]:
        """Piece sizes of the concatenations the input placements declare for a dim of ``size``."""
        out: list[tuple[int, ...]] = []
        for cands in self.input_relations.values():
            for c in cands:
                e = c.expr
                if e.op == "cat" and e.shape[e.attrs] == size:
                    sizes = tuple(a.shape[e.attrs] for a in e.args)
                    if sizes not in out:
                        out.append(sizes)
        return out

    def fusable(self, n: Node) -> bool:
        """Can a lemma at one of ``n``'s consumers fuse ``n``? (1-hop look-ahead.)"""
        if n.op != "call" or n.name in self.seq_output_names:
            return False
        if n.attrs.kind == "ew" and any(i.name in self.deferred for i in n.inputs):
            return False  # elementwise fusion is one level deep: a failure stays at the first stuck operator
        if self._users is None:
            self._users = self.seq.users()
        kind = n.attrs.kind
        frontier, seen = list(self._users.get(n.name, [])), set()
        while frontier:  # through pure views (a reshape keeps every value: the lemma sees the view)
            u = frontier.pop()
            if u.name in seen:
                continue
            seen.add(u.name)
            if u.op == "call" and kind in absorbed_by(u.attrs.kind):
                return True
            if u.op == "view" and u.name not in self.seq_output_names:
                frontier.extend(self._users.get(u.name, []))
        return False

    def defer(self, n: Node) -> list[Candidate]:
        """Keep ``n`` applied to its inputs' relations, for a fused lemma at its consumer."""
        in_cands = [self.relations.get(i.name, []) for i in n.inputs]
        if any(not c for c in in_cands):
            return []
        args = tuple(c[0].expr for c in in_cands)
        try:
            return [Candidate(self.store.call(n.attrs, args), ("deferred",), deferred=True)]
        except ShapeError:
            return []

    def scale_origin(self, n: Node) -> Step | None:
        """The input step of ``n`` whose value the ranks hold only up to a factor (every relation
        has one), where the factor should have cancelled and did not: the latest step of such a
        chain, next to the operator that needs the exact value. None if there is no such input."""
        by_node = {s.node: s for s in self.steps}
        found = [by_node[i.name] for i in n.inputs
                 if i.name in by_node and (rels := [c for c in self.relations.get(i.name, []) if not c.deferred])
                 and all(has_factor(c.expr) for c in rels)]
        return max(found, key=lambda st: st.index) if found else None

    def blame(self, n: Node, deferred_inputs: list[Step]) -> Step | None:
        """Whose semantics failed: the consumer's (a piece the fused lemma made for ``n``) or the
        deferred producer's? Pieces tagged ``blame=consumer`` point at ``n``."""
        if not self._failures:
            return deferred_inputs[0]
        top = max(d for d, _ in self._failures)
        spec = [s for d, s in self._failures if d == top][-1]
        if spec.param("blame") == "consumer":
            return None
        return deferred_inputs[0]

    def run(self) -> None:
        # the engine's tensor work is many small evaluations (id domains, input-independent
        # values): intra-op threads cost more in hand-offs than they save, most of all on a busy
        # machine, so the whole run uses one (the caller's setting is restored)
        with torch_threads(1), long_lived_heap() as keep:
            try:
                while not self.done:
                    if self.induction is None or not self.induction.advance(self):
                        self.step()
                    keep()  # what this step made lives as long as the run (engine/heap.py)
            finally:
                release_shared()  # id-domain evaluations shared by the run's matchers (lemmas/domain.py)

    def run_greedy_first(self, accept) -> int:
        """`run` greedily (see ``greedy``); if ``accept(self)`` says its relations do not do (the proof
        is stuck, or an output lacks the relation it needs), take every step back and `run` again with
        the exhaustive search, walking every operator (no `induction`): then the relations, and the
        verdict, are exactly those of a plain `run`. The second pass starts afresh (no pushes or
        lookups of the first, so the lemma instances and the domain facts recorded with them are the
        second pass's own) but keeps what is a function of an expression and the fixed index alone
        (terms, values realized, values up to a factor). Returns the number of passes (1 or 2)."""
        self.greedy = True
        try:
            self.run()
        finally:
            self.greedy = False
        if accept(self):
            return 1
        self._run_again_walking()
        return 2

    def run_walking_if_needed(self, accept) -> int:
        """`run` (with `induction`, if set); if ``accept(self)`` says its relations do not do and some
        layer was carried by induction, take every step back and `run` walking every operator: the
        verdict of a problem induction does not prove is the walk's. Returns the number of passes."""
        self.run()
        if self.induction is None or not self.induction.stats["carried"] or accept(self):
            return 1
        self._run_again_walking()
        return 2

    def _run_again_walking(self) -> None:
        """`restart`, then `run` walking every operator (`induction` off for the run)."""
        self.restart()
        induction, self.induction = self.induction, None
        try:
            self.run()
        finally:
            self.induction = induction

    def restart(self) -> None:
        """Take every step back and forget what the steps found (pushes, lookups, lemma instances,
        domain facts); keep what is a function of an expression and the fixed index alone."""
        self.undo_to(0)
        self.stuck_at = None
        self.deferred.clear()
        self.relations.clear()
        self._push_memo.clear()
        self._lookup_memo.clear()  # (a matcher records domain facts on its way: asked again)
        self.instances.clear()
        self.domain_facts.clear()

    def refined(self, cands: list[Candidate]) -> list[Candidate]:
        """Other clean relations for the same value: the finest tilings by slices some rank holds
        (a rank that splits its shard again, into micro-batches or chunks, computes on those)."""
        out: list[Candidate] = []
        seen = {c.expr.id for c in cands}
        for c in cands:
            if c.deferred:
                continue
            t = self.to_term(c.expr)
            for dim, dvals in self.index.finest_tilings(t):
                e = self.store.cat([self.index.ref(v) for v in dvals], dim)
                if e.id not in seen:
                    seen.add(e.id)
                    out.append(Candidate(e, c.chain + ("finer tiling",), c.assumption))
            e = self.coarsened(c.expr)
            if e is not None and e.id not in seen:
                seen.add(e.id)
                out.append(Candidate(e, c.chain + ("coarser tiling",), c.assumption))
            # other tilings of the same elements by values the ranks compute on (index tensors)
            for e in retile(self.index, t):
                if e.id not in seen:
                    seen.add(e.id)
                    out.append(Candidate(e, c.chain + ("re-tiling",), c.assumption))
        return out

    def coarsened(self, e: Expr) -> Expr | None:
        """``e`` (a concatenation) with every longest run of consecutive pieces that some rank
        holds as one value replaced by that value (a rank's shard made of several pieces: its
        q|k|v blocks, its heads)."""
        if e.op != "cat" or len(e.args) < 3:
            return None
        pieces, d = e.args, e.attrs
        out, i, changed = [], 0, False
        while i < len(pieces):
            for j in range(len(pieces), i + 1, -1):
                if j - i == len(pieces):
                    continue  # the whole: realize() already tried it
                run = self.store.cat(list(pieces[i:j]), d)
                r = self.realize(run) if run.op == "cat" else None
                if r is not None and r.op == "ref":
                    out.append(r)
                    i, changed = j, True
                    break
            else:
                out.append(pieces[i])
                i += 1
        return self.store.cat(out, d) if changed else None

    def infer(self, n: Node, refine: bool = False) -> list[Candidate]:
        S = self.store
        in_cands = [self.relations.get(i.name, []) for i in n.inputs]
        if n.op == "const":
            return [Candidate(S.const(n.attrs, n.shape, n.dtype), ("constant",))] if not refine else []
        if any(not c for c in in_cands):
            return []
        if refine:
            extra = [self.refined(c) for c in in_cands]
            if not any(extra):
                return []
            in_cands = [e + c for c, e in zip(in_cands, extra)]
        out: list[Candidate] = []
        for combo in itertools.islice(itertools.product(*in_cands), MAX_COMBOS):
            args = tuple(c.expr for c in combo)
            assumed = any(c.assumption for c in combo)
            try:
                if n.op == "call":
                    found = self.push(n.attrs, args)
                    found = [Candidate(c.expr, c.chain, assumed) for c in found]
                else:
                    found = [Candidate(rebuild(S, _proto(S, n, args), list(args)), ("clean",), assumed)]
            except ShapeError:
                continue
            out.extend(found)
            if len(_dedupe(out)) >= MAX_CANDIDATES:
                break
            if self.greedy and n.op == "call" and any(not has_factor(c.expr) for c in found):
                break
        return out

    def rank(self, cands: list[Candidate]) -> list[Candidate]:
        """Add realized forms, dedupe, prefer refs and small expressions; keep a few."""
        extended: list[Candidate] = []
        for c in cands:
            r = self.realize(c.expr)
            if r is not None and r.id != c.expr.id:
                extended.append(Candidate(r, c.chain + ("realize",), c.assumption))
            extended.append(c)
            t = self.to_term(c.expr)
            if is_value(t) and r is not None and r.op == "ref":
                # a constant every rank holds whole may also be held in pieces (rank r: its rows)
                for dim, dvals in self.index.tiling(t):
                    tiled = self.store.cat([self.index.ref(v) for v in dvals], dim)
                    extended.append(Candidate(tiled, c.chain + ("realize",), c.assumption))
        extended = _dedupe(extended)
        extended.sort(key=lambda c: (c.assumption, has_factor(c.expr), c.expr.op != "ref", size(c.expr)))
        return extended[:MAX_CANDIDATES]

    def explain_stuck(self, n: Node) -> str:
        """Why no relation: the likeliest reason, phrased as something to check in the program."""
        from gg_notebook.lemmas.dims import dim_roles, linear_args

        if n.op == "call" and not any(True for _ in lemmas_for(n.attrs.kind)):
            return (f"no lemma knows {n.target}, and no rank computes it on tensors related to its inputs "
                    f"(a rank computing the same operator on the same values would have matched)")
        hints = []
        if n.op == "call":
            lin = linear_args(n.attrs, [i.dtype for i in n.inputs])
            linear_slots = set(lin[1]) if lin else set()
            if lin and lin[0] == "jointly":
                # every input best known as per-rank partials: the op itself could act on partials;
                # one held whole (a replicated residual) added to a partial sum is the likely bug
                partial_all = all(
                    bool(self.relations.get(i.name)) and self.relations[i.name][0].expr.op == "accum"
                    for i in n.inputs)
                linear_slots = linear_slots if partial_all else set()
            shapes = [i.shape for i in n.inputs]
            try:
                roles = dim_roles(n.attrs, shapes, n.shape)
            except Exception:  # noqa: BLE001
                roles = None
            for slot, i in enumerate(n.inputs):
                rels = self.relations.get(i.name, [])
                if not rels:
                    continue
                best = rels[0].expr
                if all(r.expr.op == "accum" for r in rels) and best.attrs == "sum" and slot not in linear_slots:
                    at = f" (computed at {i.source}{f': `{i.code.strip()}`' if i.code else ''})" if i.source else ""
                    hints.append(
                        f"input {i.name}{at} is only known as a sum of per-rank partials ({self.show(best)}); "
                        f"{n.target} needs its full value - is an all-reduce missing before this operator, "
                        f"or is something added to a partial sum before the reduction?")
                elif all(r.expr.op == "cat" for r in rels) and roles is not None:
                    d = best.attrs
                    if d < len(roles[slot]) and roles[slot][d] is None:
                        hints.append(
                            f"input {i.name} is split across ranks along dim {d} ({self.show(best)}), and "
                            f"{n.target} mixes values along that dim - gather it first or split another dim")
        base = ("no rank computes this operator on tensors related to its inputs, and no lemma rewrites it "
                "into pieces that a rank computes")
        return base + ("; " + " ".join(hints) if hints else "")

    def nearby(self, n: Node, limit: int = 8) -> list[str]:
        """Distributed operators that consume the tensors the culprit's inputs are related to."""
        dvals = []
        for i in n.inputs:
            for c in self.relations.get(i.name, []):
                for leaf in leaves(c.expr):
                    if leaf.op == "ref":
                        dvals.append(self.index.dvals[leaf.attrs[0]])
        seen, out = set(), []
        users_by_rank = {g.rank: g.users() for g in self.index.graphs}
        for d in dvals:
            for rank, node in d.locations:
                for u in users_by_rank[rank].get(node.name, []):
                    key = (rank, u.name)
                    if key in seen:
                        continue
                    seen.add(key)
                    where = f" at {u.source}" if u.source else ""
                    out.append(f"rank {rank}: {u.name} = {u.target}({', '.join(x.name for x in u.inputs)}){where}")
                    if len(out) >= limit:
                        return out
        return out


def _proto(S: ExprStore, n: Node, args) -> Expr:
    """A clean node of ``n``'s kind (only its op/attrs are used by `rebuild`)."""
    return _Proto(n.op, n.attrs)


class _Proto:
    def __init__(self, op, attrs):
        self.op = op
        self.attrs = attrs
        self.shape = None
        self.dtype = None


def _strip_ones(shape) -> tuple:
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def rebuild(S: ExprStore, e, args: list[Expr]) -> Expr:
    """Rebuild node ``e`` over new arguments with the normalizing constructors."""
    op = e.op
    if op == "call":
        return S.call(e.attrs, args)
    if op == "view":
        return S.view(args[0], e.attrs)
    if op == "permute":
        return S.permute(args[0], e.attrs)
    if op == "slice":
        d, a, b = e.attrs
        return S.slice(args[0], d, a, b)
    if op == "cat":
        return S.cat(args, e.attrs)
    if op == "expand":
        return S.expand(args[0], e.attrs)
    if op == "accum":
        return S.accum(e.attrs, args)
    if op == "scale":
        return S.scale(args[0], e.attrs)
    raise ShapeError(f"cannot rebuild {op}")


def _moved_atoms(term: Expr) -> list[str] | None:
    """Names of the input atoms ``term`` is pure data movement of (None if it computes)."""
    names: list[str] = []
    for x in walk(term):
        if x.op == "atom":
            names.append(str(x.attrs[0]))
        elif x.op not in ("view", "permute", "slice", "cat", "expand"):
            return None
    return list(dict.fromkeys(names)) or None


def _has_compute(e: Expr) -> bool:
    """True if ``e`` still contains a compute call on distributed tensors (not a relation)."""
    return e.pending


def _dedupe(cands: list[Candidate]) -> list[Candidate]:
    seen, out = set(), []
    for c in cands:
        if c.expr.id in seen:
            continue
        seen.add(c.expr.id)
        out.append(c)
    return out
