"""The graph view's data (graph_data.py), the sharding picture (sharding.py) and `GraphWidget`, without a
browser (the browser side is tests/e2e/test_graph_browser.py)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

import gg_notebook as gg
import gg_notebook.examples as ex
from gg_notebook.lemmas.base import REGISTRY
from gg_notebook.relations.expr import evaluate, leaves
from gg_notebook.widgets import graph_data as GD
from gg_notebook.widgets.sharding import TooLarge, sharding_html, sharding_layout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt4():
    """The GPT block forward+backward at 4 ranks, run to the end."""
    s = gg.ProofSession(ex.get("gpt_block_fwd_bwd").make(world_size=4))
    s.run()
    assert s.done and s.stuck is None
    return s


@pytest.fixture(scope="module")
def mlp_bug():
    s = gg.ProofSession(ex.get("mlp").make(world_size=2, bug="missing_allreduce"))
    s.run()
    assert s.stuck is not None
    return s


# ----------------------------------------------------------------------------- graph JSON
def test_graph_json_is_the_whole_sequential_graph(gpt4):
    g = GD.graph_json(gpt4)
    json.dumps(g)  # plain JSON
    seq = gpt4.engine.seq
    assert [n["name"] for n in g["nodes"]] == [n.name for n in seq.nodes]
    assert [n["id"] for n in g["nodes"]] == [f"seq:{n.name}" for n in seq.nodes]
    # the names are the relation table's names (underscores intact)
    assert set(gpt4.relations) <= {n["name"] for n in g["nodes"]}
    assert any(n["name"].startswith("_unsafe_view") for n in g["nodes"])
    ids = {n["id"] for n in g["nodes"]}
    assert all(a in ids and b in ids for a, b in g["edges"])
    assert len(g["edges"]) == sum(len(n.inputs) for n in seq.nodes)
    assert g["world_size"] == 4
    by = {n["name"]: n for n in g["nodes"]}
    mm = by["mm"]
    assert mm["op"] == "mm" and mm["target"] == "aten.mm.default" and mm["shape"] == [16, 16]
    assert mm["line"] == "gpt_block.py:38" and "h @ wq" in mm["code"]
    assert mm["module"] == "gpt_block"
    assert any(n.get("output") for n in g["nodes"])


def test_graph_state_follows_the_session():
    s = gg.ProofSession(ex.get("gpt_block").make(world_size=2))
    helper = GD.G.GraphHelper()
    st = GD.graph_state(s, helper)
    assert st["current"] == f"seq:{s.current.name}" and st["status"] == {st["current"]: "current"}
    for _ in range(20):
        s.step()
    st = GD.graph_state(s, helper)
    json.dumps(st)
    cur = s.current
    assert st["current"] == f"seq:{cur.name}" and st["status"][st["current"]] == "current"
    assert st["current"] in st["neighbourhood"]
    for name in s.engine.relations:
        assert st["status"][f"seq:{name}"] == GD.G.seq_status(s, name)
    # the rank operators drawn include every rank value the current operator's input relations use
    # (up to the per-rank cap), each linked from that input
    want = set()
    for i in cur.inputs:
        for c in s.engine.relations.get(i.name, [])[:2]:
            for leaf in leaves(c.expr):
                if leaf.op == "ref":
                    for r, node in s.engine.index.dvals[leaf.attrs[0]].locations:
                        want.add(f"r{r}:{node.name}")
    drawn = {d["id"] for d in st["rank_nodes"]}
    assert want and want <= drawn, (want, drawn)
    assert {d["name"] for d in st["rank_nodes"]} >= {w.split(":")[1] + "@" + w.split(":")[0] for w in want}
    linked = {b for _a, b in st["links"]}
    assert want <= linked
    assert all(a in st["neighbourhood"] for a, _b in st["links"])
    ids = drawn
    assert all(a in ids and b in ids for a, b in st["rank_edges"])


def test_graph_state_stuck(mlp_bug):
    st = GD.graph_state(mlp_bug)
    node = mlp_bug.stuck.node
    assert st["stuck"] and st["current"] == f"seq:{node}" and st["status"][f"seq:{node}"] == "stuck"


# ----------------------------------------------------------------------------- detail panel
def test_node_detail_relation_lemma_and_picture(gpt4):
    html = GD.node_detail(gpt4, "seq:mm")
    assert "mm = concat(mm@r0, mm@r1, mm@r2, mm@r3, dim=1)" in html
    lem = REGISTRY["concat-commute"]
    assert "lemma concat-commute" in html
    import html as H

    assert H.escape(lem.statement) in html
    assert all(H.escape(c) in html for c in lem.conditions)
    assert "class='gg-sharding'" in html and "data-tensor='mm'" in html
    assert "gpt_block.py:38" in html
    # an input: its placement in words
    assert "input placement" in GD.node_detail(gpt4, "seq:x")
    # a rank node: where its value lives
    r = GD.node_detail(gpt4, "r1:mm")
    assert "mm@r1" in r and "held by" in r
    assert GD.node_detail(gpt4, "seq:no_such_node") == "" and GD.node_detail(gpt4, "r9:mm") == ""
    assert GD.node_detail(gpt4, "bogus") == ""


# ----------------------------------------------------------------------------- sharding picture
def _check_against_values(engine, expr, lay):
    """Cross-check the layout with real numbers: perturbing one rank value changes exactly the
    elements of the blocks built from it."""
    lvs = [x for x in leaves(expr) if x.op == "ref"]
    gen = torch.Generator().manual_seed(0)
    vals = {x.id: torch.randn(tuple(x.shape), dtype=torch.float64, generator=gen) for x in lvs}
    base = evaluate(expr, lambda x: vals[x.id])
    names = [n for n, _ in lay.leaves]
    for x in lvs:
        k = names.index(engine.name(x))
        bumped = dict(vals)
        bumped[x.id] = vals[x.id] + 1.0 + torch.rand(tuple(x.shape), dtype=torch.float64, generator=gen)
        changed = evaluate(expr, lambda y: bumped[y.id]) != base
        expect = torch.zeros(tuple(expr.shape), dtype=torch.bool)
        for b in lay.blocks:
            if k in b.pieces:
                expect[tuple(slice(a, e) for a, e in b.region)] = True
        assert torch.equal(changed, expect), engine.name(x)


def test_sharding_of_every_relation_matches_the_numbers(gpt4):
    eng = gpt4.engine
    kinds = set()
    for name, cands in eng.relations.items():
        for c in cands[:2]:
            lay = sharding_layout(eng, c.expr)
            kinds |= {b.kind for b in lay.blocks}
            covered = sum(torch.Size([e - a for a, e in b.region]).numel() for b in lay.blocks)
            assert covered == torch.Size(c.expr.shape).numel(), name  # the blocks tile the tensor
            if not lay.truncated:
                _check_against_values(eng, c.expr, lay)
    assert {"shard", "replica"} <= kinds


def test_sharding_shard_replica_partial(gpt4, mlp_bug):
    eng = gpt4.engine
    lay = sharding_layout(eng, eng.relations["mm"][0].expr)
    assert [(b.kind, b.ranks, b.region) for b in lay.blocks] == [
        ("shard", (r,), ((0, 16), (4 * r, 4 * r + 4))) for r in range(4)]
    assert lay.split_dims == (1,)
    lay = sharding_layout(eng, eng.relations["x"][0].expr)
    assert [(b.kind, b.ranks) for b in lay.blocks] == [("replica", (0, 1, 2, 3))]
    # the missing all-reduce: the stuck operator's input is a partial sum over both ranks
    e2 = mlp_bug.engine
    name = next(i.name for i in e2.seq.by_name[mlp_bug.stuck.node].inputs if i.name.startswith("_unsafe_view"))
    expr = e2.relations[name][0].expr
    lay = sharding_layout(e2, expr)
    assert [(b.kind, b.ranks, b.reduce) for b in lay.blocks] == [("partial", (0, 1), "sum")]
    _check_against_values(e2, expr, lay)
    html = sharding_html(e2, expr, title=name)
    assert "data-kind='partial'" in html and "\u03a3 r0 + r1" in html and "stroke-dasharray" in html


def test_sharding_constructed_layouts(gpt4):
    """Mixed layouts built with the expression store over real rank values: partial sums of shards,
    slices, expands, 3-D with several split dims."""
    eng = gpt4.engine
    st = eng.store
    mm = eng.relations["mm"][0].expr  # concat(mm@r0..r3, dim=1), 16 x 16
    a = [x for x in leaves(mm) if x.op == "ref"]  # mm@r0 .. mm@r3, each 16 x 4
    # sum(concat(a0, a1), concat(a2, a3)): two partial blocks
    e = st.accum("sum", [st.cat([a[0], a[1]], 1), st.cat([a[2], a[3]], 1)])
    lay = sharding_layout(eng, e)
    assert [(b.kind, b.ranks, b.region) for b in lay.blocks] == [
        ("partial", (0, 2), ((0, 16), (0, 4))), ("partial", (1, 3), ((0, 16), (4, 8)))]
    _check_against_values(eng, e, lay)
    # a slice across two shards, then viewed to 3-D and expanded
    sl = st.slice(mm, 1, 2, 10)  # columns 2..10: r0 [2:4], r1 [4:8], r2 [8:10]
    lay = sharding_layout(eng, sl)
    assert [(b.ranks, b.region[1]) for b in lay.blocks] == [((0,), (0, 2)), ((1,), (2, 6)), ((2,), (6, 8))]
    _check_against_values(eng, sl, lay)
    v = st.expand(st.view(mm, (1, 16, 16)), (3, 16, 16))
    lay = sharding_layout(eng, v)
    assert lay.split_dims == (2,) and len(lay.blocks) == 4
    _check_against_values(eng, v, lay)
    # two split dims: concat along rows of column-concatenations
    two = st.cat([st.cat([a[0], a[1]], 1), st.cat([a[2], a[3]], 1)], 0)  # 32 x 8
    lay = sharding_layout(eng, two)
    assert lay.split_dims == (0, 1) and [b.ranks for b in lay.blocks] == [(0,), (1,), (2,), (3,)]
    _check_against_values(eng, two, lay)
    html = sharding_html(eng, two, title="two")
    assert "rows: dim 0" in html and "columns: dim 1" in html and html.count("class='gg-block'") == 4
    # three split dims: one panel per interval of the outermost; a value used twice is drawn twice
    v = [st.view(x, (4, 4, 4)) for x in a]
    inner = [st.cat([v[0], v[1]], 2), st.cat([v[2], v[3]], 2)]  # 4 x 4 x 8 each
    three = st.cat([st.cat([inner[0], inner[1]], 1), st.cat([inner[1], inner[0]], 1)], 0)  # 8 x 8 x 8
    lay = sharding_layout(eng, three)
    assert lay.split_dims == (0, 1, 2) and len(lay.blocks) == 8
    assert [b.ranks[0] for b in lay.blocks] == [0, 1, 2, 3, 2, 3, 0, 1]
    _check_against_values(eng, three, lay)
    html = sharding_html(eng, three, title="three")
    assert "dim 0 0:4" in html and "dim 0 4:8" in html and "rows: dim 1" in html


def test_sharding_too_large_is_said(gpt4, monkeypatch):
    import gg_notebook.widgets.sharding as S

    monkeypatch.setattr(S, "MAX_ELEMENTS", 10)
    expr = gpt4.engine.relations["mm"][0].expr
    with pytest.raises(TooLarge):
        S.sharding_layout(gpt4.engine, expr)
    assert "no sharding picture" in S.sharding_html(gpt4.engine, expr)


# ----------------------------------------------------------------------------- the widget
def test_graph_widget_follows_the_session():
    pytest.importorskip("anywidget")
    from gg_notebook.widgets.graph_widget import GraphWidget

    s = gg.ProofSession(ex.get("mlp").make(world_size=2))
    w = GraphWidget(s)
    assert len(w.graph["nodes"]) == len(s.engine.seq.nodes)
    graph_before = w.graph
    s.step()
    s.step()
    assert w.state["current"] == f"seq:{s.current.name}"
    assert w.graph is graph_before  # the static part is not re-sent on a step
    assert "no relation yet" in w.detail  # the current operator, before it is processed
    w.selected = "seq:w1"
    assert "concat(w1@r0, w1@r1, dim=1)" in w.detail and "gg-sharding" in w.detail
    s.run()
    assert w.state["current"] is None and w.state["done"]
    s.reset()
    assert w.state["current"] == f"seq:{s.current.name}"
    with pytest.raises(ValueError, match="mode"):
        GraphWidget(s, mode="everything")
    # every rank's graph is sent only when asked for
    assert w.rank_graph == {}
    w.mode = "ranks"
    rg = w.rank_graph
    assert len(rg["nodes"]) == sum(len(g.nodes) for g in s.engine.index.graphs)
    assert {n["id"] for n in rg["nodes"]} >= {"r0:mm", "r1:mm"} and rg["nodes"][0]["name"].endswith("@r0")
    ids = {n["id"] for n in rg["nodes"]}
    assert all(a in ids and b in ids for a, b in rg["edges"])
    assert GD.rank_graph_json(s, max_nodes=5) == {"too_large": len(rg["nodes"]), "max_nodes": 5}
    with pytest.raises(ValueError, match="group_by"):
        GraphWidget(s, group_by="file")
    # the browser sets `selected` (as a click does): the kernel answers with the detail
    w._handle_msg({"content": {"data": {"method": "update", "state": {"selected": "r0:mm"}}}, "buffers": []})
    assert "mm@r0" in w.detail


def test_bundle_is_built_from_the_committed_sources():
    """The shipped ESM bundle names the digest of js/src and the lockfile it was built from
    (js/build.mjs): rebuild it (npm ci && npm run build in js/) after changing them."""
    text = (REPO / "gg_notebook" / "widgets" / "static" / "graph_widget.js").read_text()
    m = re.search(r"sources=([0-9a-f]{16})", text.splitlines()[0])
    assert m, "the bundle has no sources digest in its banner"
    h = hashlib.sha256()
    for f in ("src/graph_widget.js", "package-lock.json"):
        h.update((REPO / "js" / f).read_bytes())
    assert m.group(1) == h.hexdigest()[:16], "js/ changed since the bundle was built: run `npm run build` in js/"
    assert "export" in text and "cytoscape" in text and "dagre" in text
    lock = json.loads((REPO / "js" / "package-lock.json").read_text())
    assert {"node_modules/cytoscape", "node_modules/cytoscape-dagre"} <= set(lock["packages"])
