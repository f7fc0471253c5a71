"""Proof by induction over a model's layers: prove one layer, carry its relations to the others.

A model's layers are the same operators on other weights and on the previous layer's output. The
engine walks each of them afresh, and at 126 layers that walk is most of inference. This module
proves one layer (the *template*) as a problem of its own, then gives every other layer that is
provably the same the template's relations, renamed. Soundly:

1. **The template is its own problem.** The sequential segment and every rank's segment
   (`engine.repeats`) are cut out; whatever flows into a segment from outside becomes an input of
   that sub-problem. On the ranks' side every such distributed value is a fresh opaque atom (one
   atom per value, so a value replicated across ranks stays one), except input-independent values
   (a causal mask), which keep their terms. The hypotheses are the relations the walk found for
   the sequential segment's inputs, renamed onto those atoms. The sub-problem is then inferred by
   the same engine. Its relations hold for *any* values that satisfy the hypotheses: the lemmas
   cannot look behind an atom (no history, no domain, no value), which is the point of making
   the atoms fresh.
2. **A layer is an instance only if it is provably the same.** For the sequential segment and for
   every rank's segment, the operators at each offset are the same (operator, every argument,
   shape, dtype) and wired the same (`repeats.match_segments`); every collective's peers are its
   template peers' counterparts (per communicator, all ranks' collectives sit the same number of
   positions further); each atom's counterparts are one distributed value on every rank that holds
   it (input-independent values: the same value); and every hypothesis, renamed, is among the
   relations the walk holds for the layer's inputs.
3. **Then** the layer's relations are the template's with every distributed value renamed to its
   counterpart, and each of them is recorded as a `Step` (its detail names the template layer).

Whatever fails a check is walked as before, so the verdict of a layer that differs (a bug) is the
walk's, localized where the walk localizes it. Relations carried this way are also re-checked
numerically after a proof, with every other relation (`concrete.validate`); the template's lemma
instances are validated as the walk's are.
"""

from __future__ import annotations

import dataclasses
import time

from gg_notebook.engine.repeats import (Segment, crossing_counts, match_segments, periodic_regions, segments,
                                        signature_ids)
from gg_notebook.ir.graph import Graph, Node
from gg_notebook.relations.expr import Expr, ExprStore, ShapeError
from gg_notebook.relations.ground import is_value

MAX_TEMPLATES_PER_REGION = 3


@dataclasses.dataclass
class _Template:
    region: int
    number: int  # which period of the region
    seq_seg: Segment
    rank_segs: list[Segment]
    hypotheses: list[list[Expr]]  # per seq boundary position: relations (over the full index) assumed
    # the values the ranks' segments read or pull in: (dval id, [(rank, member position or -1 - boundary
    # position)], kept as a value)
    atoms: list[tuple[int, list[tuple[int, int]], bool]]
    sub: object  # the template's Engine
    collectives: list[list[tuple[tuple, int, int]]]  # per rank: (communicator, offset, index)
    label: str


class Induction:
    """Attach to an `Engine` (``engine.induction``); `Engine.run` asks `advance` before each step."""

    def __init__(self, engine) -> None:
        seq = engine.seq
        self.seq_ids = signature_ids(seq)
        crossing = crossing_counts(seq)
        self.starts: dict[int, tuple[int, int, int]] = {}  # seq start -> (stop, region, period number)
        self.regions = periodic_regions(self.seq_ids)
        for ri, reg in enumerate(self.regions):
            for t, (a, b) in enumerate(segments(reg, crossing)):
                self.starts[a] = (b, ri, t)
        self._rank_ids: dict[int, object] = {}
        self._rank_regions: dict[int, list] = {}
        self._rank_cuts: dict[int, list] = {}
        self._users = None
        self._templates: dict[tuple[int, bool], list[_Template]] = {}
        self._attempts: dict[tuple[int, bool], int] = {}
        self.stats = {"regions": len(self.regions), "segments": len(self.starts), "carried": 0, "templates": 0,
                      "seconds": 0.0, "fallbacks": []}

    def summary(self) -> dict:
        """For ``result.stats["induction"]``: repeated segments found, layers carried (each
        template's own included), templates proved, seconds, and why a segment was walked."""
        return {"segments": self.stats["segments"], "carried": self.stats["carried"],
                "templates": self.stats["templates"], "seconds": round(self.stats["seconds"], 3),
                "walked_because": list(self.stats["fallbacks"])}

    # ------------------------------------------------------------------ driver
    def advance(self, engine) -> bool:
        """If the engine's next node starts a segment that a template covers, record its steps and
        return True; otherwise (not a segment, or a check fails) return False: the walk goes on."""
        hit = self.starts.get(engine.cursor)
        if hit is None or engine.stuck_at is not None or engine.user_relations:
            return False
        t0 = time.perf_counter()
        try:
            return self._advance(engine, *hit)
        finally:
            self.stats["seconds"] += time.perf_counter() - t0

    def _advance(self, engine, stop: int, region: int, number: int) -> bool:
        key = (region, engine.greedy)
        templates = self._templates.setdefault(key, [])
        why = None
        for k, tpl in enumerate(templates):  # the last one that fitted first
            why = self._carry(engine, tpl, number)
            if why is None:
                templates.insert(0, templates.pop(k))
                return True
        if why is not None:  # (this layer may be the first of another run of equal layers)
            self._note(engine, f"layer at {engine.seq.nodes[engine.cursor].name}: {why}")
        if self._attempts.get(key, 0) >= MAX_TEMPLATES_PER_REGION:
            return False
        self._attempts[key] = self._attempts.get(key, 0) + 1
        tpl, why = self._template(engine, region, number, engine.cursor, stop)
        if tpl is None:
            self._note(engine, f"template at {engine.seq.nodes[engine.cursor].name}: {why}")
            return False
        why = self._carry(engine, tpl, number)
        if why is not None:  # (the template's own layer always matches itself)
            self._note(engine, f"template at {engine.seq.nodes[engine.cursor].name}: {why}")
            return False
        templates.insert(0, tpl)
        self.stats["templates"] += 1
        return True

    def _note(self, engine, text: str) -> None:
        if len(self.stats["fallbacks"]) < 20:
            self.stats["fallbacks"].append(text)

    # ------------------------------------------------------------------ graphs
    def _ranks(self, engine, r: int):
        """Rank ``r``'s signature ids, periodic regions and its own cuts between periods
        ``[(start, period)]`` (`repeats.segments`)."""
        if r not in self._rank_ids:
            g = engine.index.graphs[r]
            ids = self._rank_ids[r] = signature_ids(g)
            regions = self._rank_regions[r] = periodic_regions(ids)
            crossing = crossing_counts(g)
            self._rank_cuts[r] = sorted((a, reg.period) for reg in regions for a, _ in segments(reg, crossing))
        return self._rank_ids[r], self._rank_regions[r], self._rank_cuts[r]

    def _seq_users(self, engine):
        if self._users is None:
            self._users = engine.seq.users()
        return self._users

    # ------------------------------------------------------------------ the template
    def _template(self, engine, region: int, number: int, start: int, stop: int):
        from gg_notebook.engine.index import DIndex
        from gg_notebook.engine.infer import Candidate, Engine

        index, store, seq = engine.index, engine.store, engine.seq
        W = index.world_size
        if seq.random_ops or any(g.random_ops for g in index.graphs):
            return None, "the program draws random numbers"
        seq_seg = Segment.of(seq, start, stop)
        if any(n.op == "input" for n in seq_seg.nodes):
            return None, "the layer holds one of the program's inputs"
        hyps_full: list[list[Expr]] = []
        for b in seq_seg.boundary:
            rels = engine.relations.get(b.name, [])
            if not rels:
                return None, f"its input {b.name} has no relation"
            if any(c.assumption or c.deferred for c in rels):
                return None, f"its input {b.name} is related by an assumption or kept symbolically"
            hyps_full.append([c.expr for c in rels])
        # each rank's layer starts after the values the hypotheses name: per sequential input, the
        # relation whose values a rank has first (another may name a value it makes much later, an
        # all-reduce of the gradients at the end); there, at the rank's own cut between periods
        avail = [-1] * W
        for rels in hyps_full:
            best = None
            for e in rels:
                last = [-1] * W
                for leaf in _refs(e):
                    d = index.dvals[leaf.attrs[0]]
                    if is_value(d.term):
                        continue
                    first: dict[int, int] = {}
                    for r, n in d.locations:
                        if n.op != "input" and (r not in first or n.index < first[r]):
                            first[r] = n.index
                    for r, i in first.items():
                        last[r] = max(last[r], i + 1)
                if best is None or max(last) < max(best):
                    best = last
            for r in range(W):
                avail[r] = max(avail[r], best[r])
        rank_segs: list[Segment] = []
        for r in range(W):
            g = index.graphs[r]
            _, regions, cuts = self._ranks(engine, r)
            if avail[r] < 0:  # the layer reads the program's inputs only: the rank's first layer
                c = cuts[0][0] if cuts else -1
            else:
                c = next((c for c, period in cuts if avail[r] <= c < avail[r] + period), avail[r])
            reg = next((x for x in regions if x.start <= c and c + x.period <= x.stop), None)
            if reg is None:
                return None, f"rank {r}'s program does not repeat from {g.nodes[min(c, len(g.nodes) - 1)].name}"
            cut = c
            seg = Segment.of(g, cut, cut + reg.period, pull=True)
            if any(n.op == "collective" and n.attrs.p2p for n in seg.nodes):
                return None, f"rank {r}'s layer sends or receives point to point"
            if any(n.op == "input" for n in seg.nodes):  # (an input is the sub-problem's own, by position)
                return None, f"rank {r}'s layer holds one of its program's inputs"
            rank_segs.append(seg)
        # one atom per distributed value flowing into the ranks' segments, in a store of the
        # sub-problem's own (its distributed values are numbered afresh: a ref is its number)
        sub_store = ExprStore()
        sub_store.real = store.real
        atom_of: dict[int, int] = {}  # full dval id -> position in atoms
        atoms: list[tuple[int, list[tuple[int, int]], bool]] = []
        input_terms: list[list[Expr]] = []

        def entry(d, r: int, p: int) -> int:
            k = atom_of.get(d.id)
            if k is None:
                k = atom_of[d.id] = len(atoms)
                atoms.append((d.id, [], is_value(d.term)))
            atoms[k][1].append((r, p))
            return k

        for r, seg in enumerate(rank_segs):
            row = []
            for p, b in enumerate(seg.boundary):
                d = index.dval_of(r, b)
                k = entry(d, r, -1 - p)
                row.append(_rename(sub_store, d.term, _no_ref, {}) if atoms[k][2] else
                           sub_store.atom(f"⟨{d.label(W)}⟩", tuple(d.shape), d.dtype))
            input_terms.append(row)
        # the data movement pulled in (`Segment`): values a relation may name too
        for r, seg in enumerate(rank_segs):
            for m, node in enumerate(seg.members):
                if not seg.start <= node.index < seg.stop:
                    entry(index.dval_of(r, node), r, m)
        sub_ranks = [_subgraph(seg, r) for r, seg in enumerate(rank_segs)]
        try:
            sub_index = DIndex(sub_store, sub_ranks, input_terms)
        except Exception as e:  # noqa: BLE001 - collectives that do not pair up inside the segments
            return None, f"the ranks' segments do not index on their own ({type(e).__name__}: {e})"
        users = self._seq_users(engine)
        inside = {n.name for n in seq_seg.nodes}
        outs = {o.name for o in seq.outputs}
        sub_seq = _subgraph(seq_seg, None, outputs=lambda n: n.name in outs or any(
            u.name not in inside for u in users.get(n.name, ())))
        # the hypotheses, renamed onto the sub-problem's values (a relation naming a value no segment
        # reads is left out)
        full_to_sub = {}
        for d_id, locs, _ in atoms:
            r, p = locs[0]
            full_to_sub[d_id] = sub_index.ref(sub_index.dval_of(r, _sub_node(sub_ranks[r], p)))
        kept: list[list[Expr]] = []
        sub_rel: dict[str, list] = {}
        onto_memo: dict = {}
        for b, rels in zip(seq_seg.boundary, hyps_full):
            keep_full, keep_sub = [], []
            for e in dict.fromkeys(_onto(engine, e, full_to_sub, onto_memo) for e in rels):
                if all(x.attrs[0] in full_to_sub for x in _refs(e)):
                    try:
                        s = _rename(sub_store, e, lambda x: full_to_sub[x.attrs[0]], {})
                    except ShapeError:
                        continue
                    keep_full.append(e)
                    keep_sub.append(Candidate(s, ("induction hypothesis",)))
            if not keep_sub:
                return None, (f"no relation of its input {b.name} ({', '.join(engine.show(e) for e in rels)}) is over "
                              f"values the ranks' layers read")
            kept.append(keep_full)
            sub_rel[b.name] = keep_sub
        sub = Engine(sub_seq, sub_index, sub_store, sub_rel)
        sub.greedy, sub.bitwise, sub.disabled = engine.greedy, engine.bitwise, set(engine.disabled)
        while not sub.done:
            sub.step()
        if sub.stuck_at is not None:
            st = sub.stuck_at
            return None, f"the layer alone is stuck at {st.node} ({st.op}): {st.detail}"
        if sub.__dict__.get("clamped_counts"):
            return None, "the layer relies on a clamped count"
        for s in sub.steps:
            if s.status == "deferred" and s.node in {o.name for o in sub_seq.outputs}:
                return None, f"{s.node} is kept symbolically for a consumer outside the layer"
            if any(c.assumption for c in s.candidates):
                return None, f"{s.node} is related by an assumption"
        colls = [[(n.attrs.communicator, k, n.attrs.index) for k, n in enumerate(seg.members)
                  if n.op == "collective"] for seg in rank_segs]
        label = f"{seq_seg.nodes[0].name}..{seq_seg.nodes[-1].name}"
        return _Template(region, number, seq_seg, rank_segs, kept, atoms, sub, colls, label), None

    # ------------------------------------------------------------------ carrying it
    def _carry(self, engine, tpl: _Template, number: int) -> str | None:
        """Record the steps of period ``number`` of the template's region from the template's
        relations; the reason it is not an instance otherwise (nothing recorded)."""
        from gg_notebook.engine.infer import Candidate, Step

        index, store, seq = engine.index, engine.store, engine.seq
        shift = number - tpl.number
        P = tpl.seq_seg.stop - tpl.seq_seg.start
        seq_seg = (tpl.seq_seg if shift == 0 else
                   Segment.of(seq, tpl.seq_seg.start + shift * P, tpl.seq_seg.stop + shift * P))
        if seq_seg.start != engine.cursor:
            return "not where the walk is"
        if shift and not match_segments(tpl.seq_seg, seq_seg, self.seq_ids):
            return "the sequential layer differs from the template's"
        rank_segs = []
        for r, t in enumerate(tpl.rank_segs):
            if shift == 0:
                rank_segs.append(t)
                continue
            n = t.stop - t.start
            a = t.start + shift * n
            g = index.graphs[r]
            if a < 0 or a + n > len(g.nodes):
                return f"rank {r} has no such layer"
            seg = Segment.of(g, a, a + n, pull=True)
            if not match_segments(t, seg, self._ranks(engine, r)[0]):
                return f"rank {r}'s layer differs from the template's"
            rank_segs.append(seg)
        if shift:
            # every collective's peers are the counterparts of its template peers
            delta: dict = {}
            for r, seg in enumerate(rank_segs):
                for comm, off, i in tpl.collectives[r]:
                    d = seg.members[off].attrs.index - i
                    if delta.setdefault(comm, d) != d:
                        return f"rank {r}'s collectives on {comm} do not pair up as the template's do"
        # the atoms' counterparts: one distributed value each
        dval_map: dict[int, object] = {}
        for d_id, locs, value in tpl.atoms:
            found = {index.dval_of(r, _seg_node(rank_segs[r], p)).id for r, p in locs}
            if len(found) != 1 or (value and found != {d_id}):
                return "a value the layer reads is not one value on the ranks that read it"
            dval_map[d_id] = index.dvals[found.pop()]
        ref_of = lambda x: index.ref(dval_map[x.attrs[0]])  # noqa: E731
        if shift:
            dval_map_j = {d.id: d for d in dval_map.values()}
            onto_memo: dict = {}
            for b, hyps in zip(seq_seg.boundary, tpl.hypotheses):
                have = {_onto(engine, c.expr, dval_map_j, onto_memo).id for c in engine.relations.get(b.name, [])
                        if not c.assumption and not c.deferred}
                for h in hyps:
                    try:
                        if _rename(store, h, ref_of, {}).id not in have:
                            return f"its input {b.name} is not related as the template's input is"
                    except ShapeError:
                        return f"its input {b.name} is not related as the template's input is"
        # the template's values -> this layer's
        sub = tpl.sub
        full_of: list[int] = []  # sub dval id -> this layer's dval id
        for d in sub.index.dvals:
            r, n = d.locations[0]
            node = (rank_segs[r].boundary[n.attrs] if n.op == "input"
                    else rank_segs[r].members[n.index - len(tpl.rank_segs[r].boundary)])
            full_of.append(index.dval_of(r, node).id)
        refs: dict[int, Expr] = {}

        def carried(x: Expr) -> Expr:
            e = refs.get(x.attrs[0])
            if e is None:
                e = refs[x.attrs[0]] = index.ref(index.dvals[full_of[x.attrs[0]]])
            return e

        # one value of this layer per value of the template's: the template's normal forms are this
        # layer's too, so its relations are interned as they are (else rebuilt by the constructors)
        as_is = len(set(full_of)) == len(full_of)
        memo: dict[int, Expr] = {}
        new_steps = []
        by_node = {s.node: s for s in sub.steps}
        try:
            for tn, n in zip(tpl.seq_seg.nodes, seq_seg.nodes):
                s = by_node[tn.name]
                cands = [Candidate(_rename(store, c.expr, carried, memo, as_is), c.chain, False, c.deferred)
                         for c in s.candidates]
                new_steps.append((n, s, cands))
        except ShapeError as e:
            return f"a relation does not carry over ({e})"
        if shift == 0:
            memo = {}
            for name, spec, args, plan in sub.instances:
                engine.instances.append((name, spec, tuple(_rename(store, a, carried, memo) for a in args),
                                         _rename(store, plan, carried, memo)))
            engine.domain_facts.update(sub.domain_facts)
        detail = f"by induction: the same operators as the layer {tpl.label}, proved on its own"
        for n, s, cands in new_steps:
            inputs = {i.name: [engine.show(c.expr) for c in engine.relations.get(i.name, [])] for i in n.inputs}
            engine.relations[n.name] = cands
            step = Step(index=engine.cursor, node=n.name, op=n.target, source=n.source, code=n.code, inputs=inputs,
                        candidates=cands, pretty=[engine.show(c.expr) for c in cands], status=s.status,
                        detail=detail)
            if s.status == "deferred":
                engine.deferred[n.name] = step
            engine.steps.append(step)
            engine.cursor += 1
        self.stats["carried"] += 1
        return None


def _refs(e: Expr):
    from gg_notebook.relations.expr import walk

    return [x for x in walk(e) if x.op == "ref"]


def _rename(store: ExprStore, e: Expr, leaf, memo: dict, as_is: bool = False) -> Expr:
    """``e`` with every ref ``x`` replaced by ``leaf(x)``, rebuilt in ``store`` with its constructors
    (constants are interned there too: ``e`` may be another store's).

    ``as_is``: ``leaf`` is one to one on ``e``'s refs. A clean relation's nodes other than calls are
    normalized by their structure alone (a view of a view, a slice of a concatenation, nested sums),
    so the image of a normal form is interned as it is; calls (whose operands are ordered by term
    id) and input-independent values still go through the constructors."""
    from gg_notebook.engine.infer import rebuild

    hit = memo.get(e.id)
    if hit is not None:
        return hit
    op = e.op
    if op == "ref":
        out = leaf(e)
    elif op == "atom":  # (a relation names distributed values, never a program's input itself)
        raise ShapeError(f"a relation names the input {e.attrs[0]}")
    elif op == "const":
        out = store.const(e.attrs, e.shape, e.dtype)
    else:
        args = [_rename(store, a, leaf, memo, as_is) for a in e.args]
        if as_is and op != "call" and not e.ground:
            out = store._intern(op, e.attrs, tuple(args), e.shape, e.dtype)
        else:
            out = rebuild(store, e, args)
    memo[e.id] = out
    return out


def _onto(engine, e: Expr, dvals: dict, memo: dict) -> Expr:
    """``e`` (a relation) with every piece whose term some value of ``dvals`` (ids) has replaced by
    a ref to that value, outermost first: the same relation over the values a layer reads (the walk
    may name a value the ranks read only through a view of it as that view of the value). A
    relation already over those values is left as it is."""
    hit = memo.get(e.id)
    if hit is not None:
        return hit
    out = e
    if memo.get(("all in", e.id)) is None:
        memo[("all in", e.id)] = all(x.attrs[0] in dvals for x in _refs(e))
    if memo[("all in", e.id)]:
        pass  # already over those values (the rule on both sides of a comparison: the same)
    elif e.op != "ref" and not e.ground:
        try:
            d = engine.index.by_term.get(engine.to_term(e).id)
        except ShapeError:
            d = None
        if d is not None and d.id in dvals:
            out = engine.index.ref(d)
        elif e.args:
            from gg_notebook.engine.infer import rebuild

            args = [_onto(engine, a, dvals, memo) for a in e.args]
            if any(a is not b for a, b in zip(args, e.args)):
                out = rebuild(engine.store, e, args)
    memo[e.id] = out
    return out


def _seg_node(seg: Segment, p: int) -> Node:
    """A segment's member ``p`` (>= 0) or boundary value ``-1 - p``."""
    return seg.members[p] if p >= 0 else seg.boundary[-1 - p]


def _sub_node(g: Graph, p: int) -> Node:
    """The node of a segment's sub-graph (`_subgraph`) for its member ``p`` or boundary value ``-1 - p``."""
    return g.nodes[len(g.inputs) + p] if p >= 0 else g.inputs[-1 - p]


def _no_ref(x: Expr) -> Expr:
    raise ShapeError("an input-independent value names a distributed value")


def _subgraph(seg: Segment, rank: int | None, outputs=None) -> Graph:
    """``seg`` as a graph of its own: an input node (same name) per boundary value, then copies of
    its nodes."""
    inputs = [Node(b.name, "input", p, (), tuple(b.shape), b.dtype, target="input", rank=rank)
              for p, b in enumerate(seg.boundary)]
    made: list[Node] = []
    for node, wiring in zip(seg.nodes, seg.wiring):
        ins = tuple(inputs[-1 - w] if w < 0 else made[w] for w in wiring)
        made.append(dataclasses.replace(node, inputs=ins))
    outs = [n for n in made if outputs(n)] if outputs is not None else []
    return Graph(inputs + made, inputs, outs, rank=rank)
