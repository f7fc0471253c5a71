"""`GraphView`: the graph view's SVG as a clickable anywidget.

The frontend renders ``svg`` (HTML markup: graphviz's SVG, or a fallback message) and, on a click on a
graphviz node (``g.node``), sets ``selected`` to that node's id and saves it to the kernel. Graphviz
writes the DOT node name (``seq:NAME`` / ``rR:NAME``, see `graph.seq_id` / `graph.rank_id`) into the
node's ``<title>``. The selected node is outlined (CSS class ``gg-selected``) and every node gets a
``data-gg-node`` attribute with its id (for tests and styling).

Importing this module needs ``anywidget``; `SessionWidget` falls back to an HTML + Dropdown without it.
"""

from __future__ import annotations

import anywidget
import traitlets

_ESM = r"""
function nodeId(g) {
  const t = g.querySelector(":scope > title");
  return (t ? t.textContent : g.id || "").trim();
}

function render({ model, el }) {
  const box = document.createElement("div");
  box.className = "gg-graph-view";
  el.appendChild(box);

  const mark = () => {
    const sel = model.get("selected");
    box.querySelectorAll("g.node").forEach((g) => {
      g.classList.toggle("gg-selected", g.dataset.ggNode === sel);
    });
  };
  const draw = () => {
    box.innerHTML = model.get("svg") || "";
    box.querySelectorAll("g.node").forEach((g) => {
      g.dataset.ggNode = nodeId(g);
    });
    mark();
  };
  const onClick = (e) => {
    const g = e.target && e.target.closest ? e.target.closest("g.node") : null;
    if (!g || !box.contains(g)) return;
    const id = g.dataset.ggNode || nodeId(g);
    if (!id) return;
    model.set("selected", id);
    model.save_changes();
    mark();
  };
  box.addEventListener("click", onClick);
  model.on("change:svg", draw);
  model.on("change:selected", mark);
  draw();
  return () => {
    model.off("change:svg", draw);
    model.off("change:selected", mark);
    box.removeEventListener("click", onClick);
  };
}

export default { render };
"""

_CSS = """
.gg-graph-view g.node { cursor: pointer; }
.gg-graph-view g.node:hover path, .gg-graph-view g.node:hover polygon { stroke-width: 2; }
.gg-graph-view g.node.gg-selected path, .gg-graph-view g.node.gg-selected polygon {
  stroke-width: 3; stroke: #0969da;
}
"""


class GraphView(anywidget.AnyWidget):
    """The graph view: ``svg`` is drawn; clicking a node sets ``selected`` (its ``seq:``/``rR:`` id)."""

    _esm = _ESM
    _css = _CSS
    svg = traitlets.Unicode("").tag(sync=True)
    selected = traitlets.Unicode("").tag(sync=True)
