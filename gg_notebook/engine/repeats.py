"""Repeated stretches of a graph (a model's layers) and the checks that two of them are the same.

`engine.induction` proves one layer and carries its relations to the others. This module has the
graph side of that, with no knowledge of relations:

* `periodic_regions`: maximal stretches of a graph whose operator sequence repeats with a fixed
  period (the layers of a model, found from the operators alone: no module names). A node's
  `signature` is everything that decides its semantics: op, target, the full operator spec, shape,
  dtype; a collective's communicator and kind (its position among the communicator's collectives
  aside).
* `segments`: one region cut into periods, at the phase where the fewest values cross a cut (the
  residual stream between two layers, not the middle of an attention).
* `Segment` / `match_segments`: the wiring check. Two segments of one graph are isomorphic when the
  nodes at each offset have the same signature and take their inputs from the same offsets, or from
  outside the segment; the outside inputs of one map to those of the other (`Segment.boundary`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import numpy as np

from gg_notebook.ir.graph import Graph, Node

MIN_REPEATS = 3
MAX_CANDIDATE_PERIODS = 24


def signature(n: Node) -> tuple:
    """What decides ``n``'s semantics, apart from its inputs."""
    attrs = n.attrs
    if n.op == "collective":
        attrs = dataclasses.replace(attrs, index=0)  # (its position: `match_segments` checks the offsets)
    elif n.op == "input":
        attrs = ("input", n.name)  # never repeats: an input is never inside a segment
    return (n.op, n.target, tuple(n.shape), n.dtype, attrs)


def signature_ids(g: Graph) -> np.ndarray:
    table: dict = {}
    return np.fromiter((table.setdefault(signature(n), len(table)) for n in g.nodes), dtype=np.int64,
                       count=len(g.nodes))


@dataclass(frozen=True)
class Region:
    """``graph.nodes[start:stop]`` repeats with ``period``."""

    start: int
    stop: int
    period: int

    @property
    def repeats(self) -> int:
        return (self.stop - self.start) // self.period


def periodic_regions(ids: np.ndarray, min_repeats: int = MIN_REPEATS) -> list[Region]:
    """The maximal periodic stretches of ``ids`` with at least ``min_repeats`` periods, largest
    coverage first, not overlapping. Candidate periods are the commonest distances between two
    occurrences of one signature (a layer's operators recur one period apart)."""
    n = len(ids)
    if n < 2 * min_repeats:
        return []
    last: dict[int, int] = {}
    gaps: Counter = Counter()
    for i, s in enumerate(ids.tolist()):
        j = last.get(s)
        if j is not None:
            gaps[i - j] += 1
        last[s] = i
    found: list[Region] = []
    for period, count in gaps.most_common(MAX_CANDIDATE_PERIODS):
        if count < min_repeats - 1 or period * min_repeats > n:
            continue
        eq = ids[:-period] == ids[period:]
        # runs of equal positions: [a, b) with eq true -> nodes [a, b + period) repeat with this period
        padded = np.concatenate(([False], eq, [False]))
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        for a, b in zip(edges[::2].tolist(), edges[1::2].tolist()):
            stop = b + period
            if (stop - a) // period >= min_repeats:
                found.append(Region(a, stop, period))
    found.sort(key=lambda r: (-(r.repeats * r.period), r.period, r.start))
    chosen: list[Region] = []
    for r in found:
        if all(r.stop <= c.start or r.start >= c.stop for c in chosen):
            chosen.append(r)
    return sorted(chosen, key=lambda r: r.start)


def crossing_counts(g: Graph) -> np.ndarray:
    """``out[c]``: how many computed values (not inputs) made before node c are read at c or later."""
    n = len(g.nodes)
    last_use = np.full(n, -1, dtype=np.int64)
    for node in g.nodes:
        for i in node.inputs:
            if node.index > last_use[i.index]:
                last_use[i.index] = node.index
    delta = np.zeros(n + 2, dtype=np.int64)
    for node in g.nodes:
        u = last_use[node.index]
        if node.op != "input" and u > node.index:
            delta[node.index + 1] += 1
            delta[u + 1] -= 1
    return np.cumsum(delta)[:n + 1]


def segments(region: Region, crossing: np.ndarray, min_repeats: int = MIN_REPEATS) -> list[tuple[int, int]]:
    """``region`` cut into whole periods ``[(start, stop)]``, at the phase whose cuts have the fewest
    crossing values in all (ties: the most periods, then the earliest). All cuts count: the first
    one alone may sit where the stretch before the region happens to be thin."""
    P = region.period
    best = None
    for c in range(region.start, region.start + P):
        k = (region.stop - c) // P
        if k < min_repeats:
            continue
        key = (float(crossing[c:c + (k + 1) * P:P].mean()), -k, c)
        if best is None or key < best[0]:
            best = (key, c, k)
    if best is None:
        return []
    _, c, k = best
    return [(c + t * P, c + (t + 1) * P) for t in range(k)]


MOVEMENT = frozenset({"view", "permute", "slice", "expand"})


@dataclass
class Segment:
    """``graph.nodes[start:stop]`` and, with ``pull``, the chains of pure data movement (a view, a
    transpose, a slice) outside it that its nodes read through: its `members` (pulled nodes first
    where first read, then the node reading them), its outside inputs in order of first use
    (`boundary`: the roots of those chains, or values read directly), and each member's inputs
    (`wiring`: a member position, or ``-1 - position`` in `boundary`).

    A rank reads a value saved in the forward pass through the view its forward took of it, while a
    relation names the value itself: pulling the view in keeps the value the relation names an
    input of the segment."""

    graph: Graph
    start: int
    stop: int
    members: list[Node]
    boundary: list[Node]
    wiring: list[tuple[int, ...]]

    @property
    def nodes(self) -> list[Node]:
        return self.members

    @classmethod
    def of(cls, g: Graph, start: int, stop: int, pull: bool = False) -> "Segment":
        boundary: list[Node] = []
        members: list[Node] = []
        wiring: list[tuple[int, ...]] = []
        pos: dict[int, int] = {}  # node index -> member position (>= 0) or -1 - boundary position

        def place(i: Node) -> int:
            k = pos.get(i.index)
            if k is not None:
                return k
            if start <= i.index < stop:
                raise AssertionError("a segment node read before it is placed")
            if pull and i.op in MOVEMENT and len(i.inputs) == 1:
                w = (place(i.inputs[0]),)
                k = pos[i.index] = len(members)
                members.append(i)
                wiring.append(w)
                return k
            k = pos[i.index] = -1 - len(boundary)
            boundary.append(i)
            return k

        for node in g.nodes[start:stop]:
            w = tuple(pos[i.index] if start <= i.index < stop else place(i) for i in node.inputs)
            pos[node.index] = len(members)
            members.append(node)
            wiring.append(w)
        return cls(g, start, stop, members, boundary, wiring)


def match_segments(a: Segment, b: Segment, ids: np.ndarray) -> bool:
    """Are ``a`` and ``b`` (of one graph, signature ids ``ids``) the same operators wired the same
    way? Their members and boundaries then correspond position by position."""
    if len(a.members) != len(b.members) or b.start < 0 or b.stop > len(b.graph.nodes):
        return False
    if b.stop - b.start != a.stop - a.start or not np.array_equal(ids[a.start:a.stop], ids[b.start:b.stop]):
        return False
    if a.wiring != b.wiring:
        return False
    if len(a.members) != a.stop - a.start:  # the pulled members too
        pa = [m.index for m in a.members if not a.start <= m.index < a.stop]
        pb = [m.index for m in b.members if not b.start <= m.index < b.stop]
        return np.array_equal(ids[pa], ids[pb])
    return True
