"""Suggestions for a stuck (or ambiguous) proof step, from the engine's own knowledge.

* alternatives: other relations the engine derived for the tensor (accepting one only reorders);
* shape matches: distributed tensors that could hold the value - one rank's tensor of the same
  shape (a replica), the ranks' tensors from the same operator that concatenate to the shape, or
  that sum to it (partials) - ranked by operator and source line similarity. These are guesses:
  accepting one makes it an assumption until something proves it.

The concrete-execution engine adds numerically ranked suggestions through the same list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gg_notebook.relations.expr import Expr


@dataclass
class Suggestion:
    node: str  # sequential tensor it is for
    text: str  # the relation, in hint syntax
    reason: str
    score: float
    kind: str  # "alternative" | "replica" | "concat" | "partial" (| "numeric" with concrete execution)
    proved: bool = False  # True if the engine derived it (accepting it is not an assumption)
    expr: Expr | None = field(default=None, repr=False, compare=False)
    # why it is false on the session's random inputs (the disagreeing values); None if it is not
    # known to be false. A numerically false suggestion cannot be accepted.
    numerically_false: str | None = None
    checked: bool = False  # a shape guess the random inputs confirmed (evidence "numeric match")

    @property
    def acceptable(self) -> bool:
        return self.numerically_false is None

    @property
    def evidence(self) -> str:
        """What backs it: "proved" (derived), "numeric match" (equal on random inputs), "shape guess"
        (only the shape fits; not checked, or no simulation), "numerically false"."""
        if self.numerically_false is not None:
            return "numerically false"
        if self.proved:
            return "proved"
        return "numeric match" if self.kind == "numeric" or self.checked else "shape guess"

    @property
    def rank(self) -> int:
        """Sort key: by evidence, strongest first."""
        return {"proved": 0, "numeric match": 1, "shape guess": 2, "numerically false": 3}[self.evidence]

    def __str__(self) -> str:
        tag = self.evidence if self.numerically_false is None else ("proved" if self.proved else "guess")
        if self.numerically_false is not None:
            return f"{self.text}  [{tag}: {self.reason}; cannot be accepted: {self.numerically_false}]"
        return f"{self.text}  [{tag}: {self.reason}]"


def engine_suggestions(engine, node_name: str, limit: int = 8) -> list[Suggestion]:
    seq = engine.seq
    n = seq.by_name[node_name]
    out: list[Suggestion] = []
    cands = [c for c in engine.relations.get(node_name, []) if not c.deferred]
    if len(cands) > 1:
        for c in cands[1:]:
            out.append(Suggestion(node_name, engine.show(c.expr),
                                  f"also derived by the engine ({' > '.join(c.chain) or 'lookup'}); accept to prefer it",
                                  10.0, "alternative", proved=not c.assumption, expr=c.expr))
    if cands and len(out) >= limit:
        return out[:limit]
    idx = engine.index
    W = idx.world_size
    target = n.target
    line = (n.code or "").strip()

    def score(node) -> float:
        s = 0.0
        if node.target == target:
            s += 3
        if line and (node.code or "").strip() == line:
            s += 2
        return s

    # per-rank occurrences of each operator, in program order
    occurrences: dict[str, list[list]] = {}
    for g in idx.graphs:
        per: dict[str, list] = {}
        for node in g.nodes:
            per.setdefault(node.target, []).append(node)
        for t, nodes in per.items():
            occurrences.setdefault(t, [[] for _ in range(W)])[g.rank] = nodes
    seen: set[int] = {c.expr.id for c in cands}
    found: list[Suggestion] = []
    for g in idx.graphs[:1] if W else []:
        for node in g.nodes:
            if tuple(node.shape) != tuple(n.shape) or node.op == "input" and score(node) == 0:
                continue
            d = idx.dval_of(g.rank, node)
            e = idx.ref(d)
            if e.id in seen:
                continue
            seen.add(e.id)
            sc = score(node) + (1 if len(d.ranks) == W else 0)
            if sc <= 0:
                continue
            where = "every rank" if len(d.ranks) == W else f"rank {g.rank}"
            found.append(Suggestion(node_name, engine.show(e), f"{where} holds a tensor of this shape from "
                                    f"{node.target}" + (f" at {node.source}" if node.source else ""),
                                    sc, "replica", expr=e))
    S = engine.store
    for t, per_rank in occurrences.items():
        if t != target:
            continue
        count = min(len(x) for x in per_rank)
        for k in range(count):
            nodes = [per_rank[r][k] for r in range(W)]
            refs = [idx.ref(idx.dval_of(r, nodes[r])) for r in range(W)]
            base = score(nodes[0]) + 1
            if all(tuple(x.shape) == tuple(n.shape) for x in nodes) and W > 1:
                e = S.accum("sum", refs)
                if e.id not in seen:
                    seen.add(e.id)
                    found.append(Suggestion(node_name, engine.show(e),
                                            f"the ranks' {t} results summed (partials; a missing all-reduce?)",
                                            base, "partial", expr=e))
            for dim in range(len(n.shape)):
                try:
                    e = S.cat(refs, dim)
                except Exception:  # noqa: BLE001 - shapes that do not concatenate
                    continue
                if tuple(e.shape) == tuple(n.shape) and e.id not in seen and W > 1:
                    seen.add(e.id)
                    found.append(Suggestion(node_name, engine.show(e),
                                            f"the ranks' {t} results concatenated along dim {dim}",
                                            base + 0.5, "concat", expr=e))
    found.sort(key=lambda s: -s.score)
    out.extend(found)
    return out[:limit]
