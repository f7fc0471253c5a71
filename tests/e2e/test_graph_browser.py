"""End-to-end: the graph view (`GraphWidget`, cytoscape bundled into one ESM) in a real JupyterLab.

One notebook, one kernel, one page (CI time): the GPT block forward+backward at 4 ranks, stepped to
the middle of the attention. Checked in the browser, through the canvas' cytoscape core
(``.gg-gw-canvas``'s ``_cy``, rendered sizes and positions) and real mouse clicks:

* the neighbourhood view: the current operator drawn, highlighted and on screen, the rank operators
  its relation uses drawn (``rR:`` nodes) with links, every label at least 11 px at the default zoom,
  names with underscores intact (the label's first line is the engine's node name);
* the full-model view (all operators): the same at the default zoom; Fit shows everything; +/-
  zoom; Current comes back to a readable zoom with the current operator on screen;
* search: matches counted and highlighted; Enter centres the next match;
* collapse by source line: fewer nodes; clicking a group expands it;
* the full model with every rank's graph: the related rank operators highlighted and linked;
* clicking an operator shows its relation, the lemma behind its step with its statement, and the
  sharding picture (blocks coloured by rank: one block per rank for a column-split tensor).

Screenshots of the main states are saved under ``$GG_E2E_ARTIFACTS/<test>/`` (or the test's
tmp dir) on success too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

STEPS = 40  # operators processed before the widget is shown (mid-attention in the forward)

CELL = f"""
import gg_notebook as gg
import gg_notebook.examples as ex
from gg_notebook.widgets import GraphWidget
s = gg.ProofSession(ex.get("gpt_block_fwd_bwd").make(world_size=4))
for _ in range({STEPS}):
    s.step()
w = GraphWidget(s)
print("CURRENT", s.current.name, "SEQ", len(s.engine.seq.nodes))
w
"""

# a missing all-reduce (stuck): the stuck operator's input is a partial sum, selected from Python
CELL_BUG = """
bug = gg.ProofSession(ex.get("mlp").make(world_size=2, bug="missing_allreduce"))
bug.run()
wb = GraphWidget(bug, height=360)
wb.selected = "seq:_unsafe_view_1"
wb
"""

CY = "document.querySelector('.gg-gw-canvas')._cy"  # the first widget's (the GPT block)


def wait_until(what, fn, page, timeout=30.0):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - a re-render between calls
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        page.wait_for_timeout(150)


def artifacts(request, tmp_path) -> Path:
    base = os.environ.get("GG_E2E_ARTIFACTS")
    d = Path(base) / request.node.name if base else tmp_path / "e2e-artifacts"
    d.mkdir(parents=True, exist_ok=True)
    return d


def view(page) -> dict:
    """Viewport facts from the cytoscape core: zoom, node count, the smallest rendered label font of
    the nodes on screen, the current operator's rendered box and whether it is on screen."""
    return page.evaluate(f"""() => {{
        const cy = {CY};
        const c = document.querySelector('.gg-gw-canvas');
        const w = cy.width(), h = cy.height(), z = cy.zoom();
        let minFont = 1e9, onScreen = 0;
        cy.nodes().forEach(n => {{
            if (n.isParent()) return;
            const b = n.renderedBoundingBox({{includeLabels: false}});
            if (b.x2 < 0 || b.y2 < 0 || b.x1 > w || b.y1 > h) return;
            onScreen += 1;
            minFont = Math.min(minFont, parseFloat(n.style('font-size')) * z);
        }});
        const cur = c.dataset.current ? cy.getElementById(c.dataset.current) : null;
        const cb = cur && cur.nonempty() ? cur.renderedBoundingBox({{includeLabels: false}}) : null;
        return {{zoom: z, nodes: cy.nodes().length, onScreen, minFont, current: c.dataset.current,
                 currentVisible: !!cb && cb.x1 >= 0 && cb.y1 >= 0 && cb.x2 <= w && cb.y2 <= h,
                 currentClasses: cur && cur.nonempty() ? cur.classes().join(' ') : '',
                 allInside: cy.nodes().every(n => {{ const b = n.renderedBoundingBox();
                     return b.x1 >= -1 && b.y1 >= -1 && b.x2 <= w + 1 && b.y2 <= h + 1; }}),
                 layoutMs: c.dataset.layoutMs}};
    }}""")


def click_node(page, node_id: str) -> None:
    """Centre ``node_id`` and click it with the mouse (a real tap on the canvas)."""
    pos = page.evaluate(f"""(id) => {{
        const cy = {CY};
        const n = cy.getElementById(id);
        if (n.empty()) return null;
        cy.center(n);
        const p = n.renderedPosition();
        const r = document.querySelector('.gg-gw-canvas').getBoundingClientRect();
        return {{x: r.left + p.x, y: r.top + p.y}};
    }}""", node_id)
    assert pos is not None, f"node {node_id} is not drawn"
    page.wait_for_timeout(100)
    page.mouse.click(pos["x"], pos["y"])


def test_graph_view_gpt_block_fwd_bwd_4_ranks(lab, page, notebook_ui, request, tmp_path):
    out = artifacts(request, tmp_path)
    name = lab.write_notebook("e2e_graph_gpt_block.ipynb", [CELL, CELL_BUG])
    notebook_ui.open(name)
    notebook_ui.run_all()
    notebook_ui.wait_executed(timeout=120)
    printed = page.locator(".jp-OutputArea-output", has_text="CURRENT").first.inner_text()
    current = printed.split("CURRENT", 1)[1].split()[0]
    n_seq = int(printed.split("SEQ", 1)[1].split()[0])
    gw = page.locator(".gg-gw").first  # the GPT block's widget
    canvas = gw.locator(".gg-gw-canvas")
    canvas.wait_for(state="visible", timeout=60_000)
    wait_until("the graph drawn", lambda: int(canvas.get_attribute("data-nodes") or 0) > 3, page)

    # ---- neighbourhood view (the default)
    v = wait_until("the current operator drawn", lambda: (x := view(page))["current"] and x, page)
    assert v["current"] == f"seq:{current}", v
    assert v["currentVisible"], v
    assert "current" in v["currentClasses"], v
    assert v["minFont"] >= 11, f"labels {v['minFont']:.1f} px at the default zoom: {v}"
    ranks = page.evaluate(f"() => {CY}.nodes('.rank').map(n => n.id())")
    assert {r.split(":")[0] for r in ranks} >= {"r0", "r1", "r2", "r3"}, ranks
    assert page.evaluate(f"() => {CY}.edges('.link').length") > 0
    labels = page.evaluate(f"() => {CY}.nodes('.seq').map(n => [n.data('name'), n.data('label')])")
    assert any("_" in nm for nm, _ in labels), labels
    for nm, lab_text in labels:
        assert lab_text.split("\n")[0] == nm, (nm, lab_text)
    page.screenshot(path=str(out / "01_neighbourhood.png"))

    # ---- full model
    gw.locator(".gg-gw-mode").select_option("full")
    wait_until("the full model drawn", lambda: int(canvas.get_attribute("data-nodes") or 0) >= n_seq, page)
    v = view(page)
    assert v["nodes"] >= n_seq and v["currentVisible"] and v["minFont"] >= 11, v
    assert "current" in v["currentClasses"], v
    page.screenshot(path=str(out / "02_full_model.png"))

    # zoom buttons
    z0 = v["zoom"]
    gw.locator(".gg-gw-zoom-in").click()
    wait_until("zoomed in", lambda: view(page)["zoom"] > z0 * 1.2, page)
    gw.locator(".gg-gw-zoom-out").click()
    gw.locator(".gg-gw-zoom-out").click()
    wait_until("zoomed out", lambda: view(page)["zoom"] < z0 * 0.9, page)
    # Fit: the whole model inside the canvas; Current: back to readable labels around the current op
    gw.locator(".gg-gw-fit").click()
    v = wait_until("everything inside after Fit", lambda: (x := view(page))["allInside"] and x, page)
    assert v["onScreen"] == v["nodes"], v
    page.screenshot(path=str(out / "03_fit.png"))
    gw.locator(".gg-gw-current").click()
    v = wait_until("current operator centred, readable",
                   lambda: (x := view(page))["currentVisible"] and x["minFont"] >= 11 and x, page)

    # pan by dragging the background
    before = page.evaluate(f"() => {CY}.pan()")
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 15, box["y"] + box["height"] - 15)
    page.mouse.down()
    page.mouse.move(box["x"] + 115, box["y"] + box["height"] - 75, steps=5)
    page.mouse.up()
    after = page.evaluate(f"() => {CY}.pan()")
    assert after != before, (before, after)

    # ---- search
    search = gw.locator(".gg-gw-search")
    search.fill("softmax")
    count = gw.locator(".gg-gw-count")
    wait_until("search matches", lambda: count.inner_text().strip().split()[0].isdigit()
               and int(count.inner_text().split()[0]) > 0, page)
    matched = page.evaluate(f"() => {CY}.nodes('.match').map(n => n.data('name'))")
    assert matched and all("softmax" in (m + page.evaluate(
        f"(id) => {CY}.nodes().filter(n => n.data('name') === id).map(n => n.data('op') + n.data('code'))[0] || ''", m)
    ).lower() for m in matched), matched
    search.press("Enter")
    first = page.evaluate(f"""() => {{ const cy = {CY}; const m = cy.nodes('.match');
        const ok = m.filter(n => {{ const b = n.renderedBoundingBox({{includeLabels: false}});
            return b.x1 >= 0 && b.y1 >= 0 && b.x2 <= cy.width() && b.y2 <= cy.height(); }});
        return ok.length; }}""")
    assert first >= 1
    page.screenshot(path=str(out / "04_search.png"))
    search.fill("")

    # ---- collapse by source line
    n_full = int(canvas.get_attribute("data-nodes"))
    gw.locator(".gg-gw-group").select_option("line")
    wait_until("groups collapsed", lambda: int(canvas.get_attribute("data-nodes") or 0) < n_full, page)
    groups = page.evaluate(f"() => {CY}.nodes('.group').map(n => n.id())")
    assert groups, "no collapsed group"
    page.screenshot(path=str(out / "05_grouped.png"))
    n_grouped = int(canvas.get_attribute("data-nodes"))
    click_node(page, groups[0])
    wait_until("a group expanded", lambda: int(canvas.get_attribute("data-nodes") or 0) > n_grouped, page)
    gw.locator(".gg-gw-group").select_option("")
    wait_until("ungrouped", lambda: int(canvas.get_attribute("data-nodes") or 0) == n_full, page)

    # ---- the full model and every rank's graph (4 x 163 rank operators, laid out side by side)
    gw.locator(".gg-gw-mode").select_option("ranks")
    wait_until("every rank's graph drawn", lambda: int(canvas.get_attribute("data-nodes") or 0) > 4 * n_seq,
               page, timeout=90)
    v = view(page)
    assert v["currentVisible"] and v["minFont"] >= 11 and "current" in v["currentClasses"], v
    related = page.evaluate(f"() => {CY}.nodes('.rank.related').map(n => n.id())")
    assert {r.split(":")[0] for r in related} >= {"r0", "r1", "r2", "r3"}, related
    assert page.evaluate(f"() => {CY}.edges('.link').length") > 0
    gw.locator(".gg-gw-fit").click()
    wait_until("every program inside after Fit", lambda: view(page)["allInside"], page)
    page.screenshot(path=str(out / "06_full_model_and_ranks_fit.png"))
    gw.locator(".gg-gw-mode").select_option("full")
    wait_until("back to the full model", lambda: int(canvas.get_attribute("data-nodes") or 0) == n_full, page)

    # ---- sharding picture and lemma of a relation: mm (h @ wq at 4 ranks, split by columns)
    click_node(page, "seq:mm")
    detail = gw.locator(".gg-gw-detail")
    wait_until("the detail of mm", lambda: "concat(mm@r0, mm@r1, mm@r2, mm@r3, dim=1)" in detail.inner_text(), page)
    pic = detail.locator(".gg-sharding[data-tensor='mm'] .gg-block")
    wait_until("the sharding picture's blocks", lambda: pic.count() == 4, page)
    assert sorted(pic.nth(k).get_attribute("data-ranks") for k in range(4)) == ["0", "1", "2", "3"]
    fills = {pic.nth(k).locator("rect").get_attribute("fill") for k in range(4)}
    assert len(fills) == 4, fills  # one colour per rank
    text = detail.inner_text()
    assert "lemma concat-commute" in text and "op(.., concat(x_i, d), ..)" in text, text
    detail.screenshot(path=str(out / "07_sharding_mm.png"))
    # a replicated tensor: one block striped with the 4 ranks' colours
    click_node(page, "seq:x")
    rep = detail.locator(".gg-sharding[data-tensor='x'] .gg-block")
    wait_until("x's picture", lambda: rep.count() == 1, page)
    assert rep.first.get_attribute("data-kind") == "replica"
    assert rep.first.get_attribute("data-ranks") == "0,1,2,3"
    page.screenshot(path=str(out / "08_sharding_x.png"), full_page=True)

    # ---- the missing all-reduce: the stuck operator drawn as stuck; its input a partial sum
    bug_canvas = page.locator(".gg-gw-canvas").nth(1)
    bug_canvas.scroll_into_view_if_needed()
    wait_until("the buggy program's graph", lambda: int(bug_canvas.get_attribute("data-nodes") or 0) > 3, page)
    stuck = page.evaluate("""() => { const cy = document.querySelectorAll('.gg-gw-canvas')[1]._cy;
        return cy.nodes('.stuck').map(n => n.data('name')); }""")
    assert stuck == ["add_1"], stuck
    part = page.locator(".gg-gw-detail").nth(1).locator(
        ".gg-sharding[data-tensor='_unsafe_view_1'] .gg-block")
    wait_until("the partial-sum block", lambda: part.count() == 1, page)
    assert part.first.get_attribute("data-kind") == "partial"
    assert part.first.get_attribute("data-ranks") == "0,1"
    assert "\u03a3 r0 + r1" in (part.first.text_content() or "")
    page.locator(".gg-gw").nth(1).screenshot(path=str(out / "09_partial_sum_missing_allreduce.png"))
