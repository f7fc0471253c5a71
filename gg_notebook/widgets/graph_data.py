"""The graph view's data, built from a `ProofSession` as plain JSON (no browser needed).

Two parts, so that a step sends little:

* `graph_json(session)`: the whole sequential graph, once per session (it never changes): one entry
  per operator with its name (the engine's node name, exactly as the relation table prints it), the
  operator, shape, source line and code, and its *groups* for collapsing (``line``: the user's source
  line; ``module``: the innermost user function or module of its call stack);
* `graph_state(session)`: what changes with every step: the current operator, each visited
  operator's status (proved / assumed / deferred / stuck), the current operator's neighbourhood,
  and the rank operators related to it (the rank values its inputs' relations use, with their
  users on that rank), with dotted links from each sequential input to those rank operators.

`node_detail(session, node_id)` describes one node (relations, the lemmas behind its step with their
statements, and the sharding picture of each relation) as HTML for the side panel.

Node ids: ``seq:NAME`` for the specification's operators, ``rR:NAME`` for rank R's (``NAME@rR`` is
how relations and hints write them).
"""

from __future__ import annotations

import html
import os

from gg_notebook.widgets import graph as G

STATUSES = ("proved", "current", "stuck", "assumed", "deferred", "unvisited")


def _op_short(target: str, op: str) -> str:
    t = (target or op or "").replace("_c10d_functional.", "c10d.")
    if t.startswith("aten."):
        t = t[5:]
    if t.endswith(".default"):
        t = t[: -len(".default")]
    return t


def _line_group(n) -> str | None:
    """``file.py:LINE`` (the base name; notebook cells keep what the capture recorded)."""
    src = n.source
    if not src:
        return None
    path, _, line = src.rpartition(":")
    return f"{os.path.basename(path) or path}:{line}" if line.isdigit() else src


def _frames_key(fr) -> tuple:
    return (str(fr[0]), str(fr[2])) if len(fr) >= 3 else (str(fr),)


def module_groups(nodes) -> dict[str, str]:
    """Node name -> its call path through the user's functions / modules below the program itself,
    e.g. ``gpt_block`` or ``parallel_attention > copy_to_tensor_model_parallel_region``.

    The frames every operator shares (the caller's: a notebook cell, a test runner, ``verify``'s
    wrapper, and the program function) are dropped; an operator on the program's own top level is
    grouped under the program function's name. Operators without frames (inputs) get no group."""
    stacks = {n.name: [fr for fr in (n.frames or ()) if len(fr) >= 3] for n in nodes}
    framed = [s for s in stacks.values() if s]
    if not framed:
        return {}
    common = 0
    first = framed[0]
    while common < len(first) and all(len(s) > common and _frames_key(s[common]) == _frames_key(first[common])
                                      for s in framed):
        common += 1
    out = {}
    for name, st in stacks.items():
        if not st:
            continue
        rest = [str(fr[2]) for fr in st[common:]]
        if rest:
            out[name] = " > ".join(rest)
        elif common:
            out[name] = str(st[common - 1][2])
    return out


def node_json(n, rank: int | None = None, module: str | None = None) -> dict:
    name = n.name if rank is None else f"{n.name}@r{rank}"
    d = {
        "id": G.seq_id(n.name) if rank is None else G.rank_id(rank, n.name),
        "name": name,
        "op": _op_short(n.target, n.op),
        "target": n.target or n.op,
        "shape": list(n.shape) if n.shape is not None else None,
        "kind": n.op,
        "line": _line_group(n),
        "code": (n.code or "").strip() or None,
        "module": module,
    }
    if rank is not None:
        d["rank"] = rank
    return d


def graph_json(session) -> dict:
    """The whole sequential graph (see the module docstring); JSON-serializable."""
    eng = session.engine
    seq = eng.seq
    outputs = {n.name for n in seq.outputs}
    nodes = []
    mods = module_groups(seq.nodes)
    for n in seq.nodes:
        d = node_json(n, module=mods.get(n.name))
        if n.name in outputs:
            d["output"] = True
        nodes.append(d)
    edges = [[G.seq_id(i.name), G.seq_id(n.name)] for n in seq.nodes for i in n.inputs]
    return {"nodes": nodes, "edges": edges, "world_size": eng.index.world_size,
            "fingerprint": f"{len(nodes)}:{len(edges)}:{seq.nodes[0].name if seq.nodes else ''}"}


MAX_RANK_GRAPH_NODES = 4000  # the "every rank" view stays usable (a dagre layout of a few seconds)


def rank_graph_json(session, max_nodes: int = MAX_RANK_GRAPH_NODES) -> dict:
    """Every rank's whole graph (nodes ``rR:NAME`` named ``NAME@rR``, edges), for the view of the
    full model with all ranks; ``{"too_large": N}`` when the ranks hold more than ``max_nodes``."""
    graphs = session.engine.index.graphs
    total = sum(len(g.nodes) for g in graphs)
    if total > max_nodes:
        return {"too_large": total, "max_nodes": max_nodes}
    nodes, edges = [], []
    for r, g in enumerate(graphs):
        mods = module_groups(g.nodes)
        nodes += [node_json(n, r, mods.get(n.name)) for n in g.nodes]
        edges += [[G.rank_id(r, i.name), G.rank_id(r, n.name)] for n in g.nodes for i in n.inputs]
    return {"nodes": nodes, "edges": edges}


def statuses(session) -> dict[str, str]:
    """Node id -> status for every operator that is not unvisited (``current`` included)."""
    eng = session.engine
    out = {}
    for name in eng.relations:
        out[G.seq_id(name)] = G.seq_status(session, name)
    st = session.stuck
    if st is not None:
        out[G.seq_id(st.node)] = "stuck"
    cur = session.current
    if cur is not None and st is None:
        out[G.seq_id(cur.name)] = "current"
    return out


def graph_state(session, helper: G.GraphHelper | None = None, radius: int = 2) -> dict:
    """The per-step part (see the module docstring); JSON-serializable."""
    helper = helper or G.GraphHelper()
    cur = session.current
    mods = _rank_modules(session, helper)
    state = {"current": G.seq_id(cur.name) if cur is not None else None,
             "status": statuses(session), "neighbourhood": [], "rank_nodes": [], "rank_edges": [],
             "links": [], "done": bool(session.done), "stuck": session.stuck is not None}
    if cur is None:
        return state
    nb = helper.neighbourhood(session, cur, radius=radius)
    state["neighbourhood"] = [G.seq_id(n.name) for n in nb.seq]
    for r, nodes in sorted(nb.ranks.items()):
        for n, used in nodes:
            d = node_json(n, r, mods[r].get(n.name))
            d["used"] = bool(used)
            d["used_by"] = list(nb.rank_refs.get((r, n.name), []))
            state["rank_nodes"].append(d)
        state["rank_edges"] += [[G.rank_id(r, a), G.rank_id(r, b)] for a, b in nb.rank_edges.get(r, [])]
    shown = {(d["rank"], d["name"].rsplit("@r", 1)[0]) for d in state["rank_nodes"]}
    for (r, name), refs in nb.rank_refs.items():
        if (r, name) in shown:
            state["links"] += [[G.seq_id(s), G.rank_id(r, name)] for s in refs]
    return state


def _rank_modules(session, helper) -> list[dict]:
    """`module_groups` of every rank graph, cached on the helper (the graphs never change)."""
    graphs = session.engine.index.graphs
    key = tuple(id(g) for g in graphs)
    cached = getattr(helper, "_gg_rank_modules", None)
    if cached is None or cached[0] != key:
        cached = (key, [module_groups(g.nodes) for g in graphs])
        helper._gg_rank_modules = cached
    return cached[1]


# ---------------------------------------------------------------------------- detail panel
_ENGINE_STEPS = {
    "clean": "the engine pushed a view / permute / slice through the relation of the input "
             "(an identity of the expression language, no lemma needed)",
    "match": "the result is a value some rank computes (the same term over the global inputs)",
    "realize": "the relation was rewritten to a value a rank really holds (same term)",
    "input placement": "given: the input's placement (how the program's inputs are split across ranks)",
    "constant": "an input-independent constant, evaluated",
    "finer tiling": "the concatenation was cut into finer pieces to match the other operand",
    "coarser tiling": "adjacent pieces were joined to match the other operand",
    "re-tiling": "the pieces were regrouped to match the other operand",
}


def _esc(s) -> str:
    return html.escape(str(s))


def lemma_html(name: str) -> str:
    """A lemma (or engine step) in words: its name, statement and conditions."""
    from gg_notebook.lemmas.base import REGISTRY

    lem = REGISTRY.get(name)
    if lem is None:
        words = _ENGINE_STEPS.get(name)
        if words is None:
            return f"<li><b>{_esc(name)}</b></li>"
        return f"<li><b>{_esc(name)}</b>: {_esc(words)}</li>"
    conds = "".join(f"<li>{_esc(c)}</li>" for c in lem.conditions)
    return (f"<li class='gg-lemma' data-lemma='{_esc(name)}'><b>lemma {_esc(name)}</b>"
            f"<div class='gg-lemma-statement'><code>{_esc(lem.statement)}</code></div>"
            + (f"<div>holds when:</div><ul>{conds}</ul>" if conds else "") + "</li>")


def _status_of(c) -> str:
    return "deferred" if c.deferred else ("assumed" if c.assumption else "proved")


def node_detail(session, node_id: str, *, show=None, picture=None, max_relations: int = 3) -> str:
    """HTML for the side panel: the node, its relations with their lemma chains and sharding
    pictures (sequential nodes), or where the value lives (rank nodes). ``picture(expr, name)``
    draws a relation (default: `sharding.sharding_html`; the widget passes a cached one)."""
    from gg_notebook.widgets.sharding import sharding_html

    eng = session.engine
    picture = picture or (lambda e, title: sharding_html(eng, e, title=title))
    show = show or eng.show
    kind, _, name = node_id.partition(":")
    if kind == "seq":
        n = eng.seq.by_name.get(name)
        if n is None:
            return ""
        st = G.seq_status(session, name)
        parts = [f"<div class='gg-detail-head'><b>{_esc(name)}</b> <code>{_esc(n.target or n.op)}</code> "
                 f"{_esc(tuple(n.shape))} <span class='gg-st gg-st-{_esc(st)}'>{_esc(st)}</span></div>"]
        if n.source:
            parts.append(f"<div>at <code>{_esc(n.source)}</code>"
                         + (f": <code>{_esc(n.code.strip())}</code>" if n.code else "") + "</div>")
        cands = eng.relations.get(name, [])
        if not cands:
            parts.append("<div><i>no relation yet</i></div>")
        for c in cands[:max_relations]:
            text = show(c.expr)
            parts.append(f"<div class='gg-relation'><div><code>{_esc(name)} = {_esc(text)}</code> "
                         f"({_esc(_status_of(c))})</div>")
            parts.append(picture(c.expr, name))
            if c.chain:
                parts.append("<div>why:</div><ul class='gg-lemmas'>"
                             + "".join(lemma_html(x) for x in dict.fromkeys(c.chain)) + "</ul>")
            parts.append("</div>")
        if len(cands) > max_relations:
            parts.append(f"<div>(and {len(cands) - max_relations} more relations)</div>")
        return "".join(parts)
    if not kind.startswith("r") or not kind[1:].isdigit():
        return ""
    r = int(kind[1:])
    if r >= len(eng.index.graphs):
        return ""
    g = eng.index.graphs[r]
    n = g.by_name.get(name)
    if n is None:
        return ""
    parts = [f"<div class='gg-detail-head'><b>{_esc(name)}@r{r}</b> <code>{_esc(n.target or n.op)}</code> "
             f"{_esc(tuple(n.shape))}</div>"]
    if n.source:
        parts.append(f"<div>at <code>{_esc(n.source)}</code>"
                     + (f": <code>{_esc(n.code.strip())}</code>" if n.code else "") + "</div>")
    try:
        dv = eng.index.dval_of(r, n)
        where = ", ".join(f"{m.name}@r{rr}" for rr, m in dv.locations[:16])
        parts.append(f"<div>the same value is held by: <code>{_esc(where)}</code></div>")
    except (KeyError, AttributeError):
        pass
    return "".join(parts)
