"""`GraphWidget`: the session's graph as a zoomable, searchable anywidget (cytoscape + dagre).

    w = GraphWidget(session)          # or GraphWidget(session, mode="full", group_by="line")
    display(w)

The front-end is ``static/graph_widget.js``, one ESM file bundled at build time from ``js/`` (see
``js/build.mjs``; cytoscape and cytoscape-dagre from npm). The data is plain JSON built from the
session by `gg_notebook.widgets.graph_data` (``graph``: the whole sequential graph, sent once;
``state``: the current operator, statuses and related rank operators, sent after every step).

In the browser: a neighbourhood view of the current operator with the rank operators its relation
uses (dotted links), the full model, or the full model with every rank's whole graph (``ranks``:
the rank operators related to the current operator highlighted and linked); zoom (wheel, +/-), pan (drag), Fit, Current; collapse by
source line or by function/module (click a group to expand it, click an expanded group's box to
collapse it); search (name, operator, source line or code; Enter jumps to the next match). Clicking
a node sets ``selected``; the kernel answers with ``detail``: the node's relations, the lemmas
behind its step with their statements, and a sharding picture of each relation.

The widget follows the session by itself (``session.on_change``); a `SessionWidget` may embed it.
"""

from __future__ import annotations

import pathlib
import weakref

import anywidget
import traitlets

from gg_notebook.widgets import graph as G
from gg_notebook.widgets.graph_data import graph_json, graph_state, node_detail, rank_graph_json

MODES = ("neighbourhood", "full", "ranks")
STATIC = pathlib.Path(__file__).parent / "static"
BUNDLE = STATIC / "graph_widget.js"

_CSS = """
.gg-gw { font-family: var(--jp-ui-font-family, sans-serif); font-size: 12px; }
.gg-gw-bar { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; margin-bottom: 4px; }
.gg-gw-bar select, .gg-gw-bar input, .gg-gw-bar button { font-size: 12px; height: 26px; }
.gg-gw-search { width: 220px; }
.gg-gw-btn { min-width: 28px; padding: 0 8px; cursor: pointer; white-space: nowrap; }
.gg-gw-count { color: #555; min-width: 60px; }
.gg-gw-body { display: flex; gap: 6px; align-items: stretch; }
.gg-gw-canvas { flex: 1 1 62%; min-width: 300px; border: 1px solid #ccc; border-radius: 4px; background: #fff; }
.gg-gw-detail { flex: 1 1 38%; min-width: 220px; max-height: 640px; overflow: auto; border: 1px solid #eee;
  padding: 4px 6px; font-size: 12px; }
.gg-gw-detail code { font-size: 12px; word-break: break-all; white-space: pre-wrap; }
.gg-gw-detail ul { margin: 2px 0 4px 0; padding-left: 18px; }
.gg-gw-detail .gg-relation { border-top: 1px solid #eee; margin-top: 4px; padding-top: 4px; }
.gg-gw-detail .gg-lemma-statement code { background: #f6f8fa; }
.gg-gw-legend { font-size: 11px; margin-top: 3px; }
.gg-gw-key { display: inline-block; padding: 0 5px; margin-right: 4px; border-radius: 3px; }
.gg-gw-key-rank { border: 2px solid #56B4E9; }
.gg-gw-key-link { color: #2e7d32; }
"""


class GraphWidget(anywidget.AnyWidget):
    """The graph view of a `ProofSession` (see the module docstring)."""

    _esm = BUNDLE
    _css = _CSS
    graph = traitlets.Dict().tag(sync=True)
    state = traitlets.Dict().tag(sync=True)
    mode = traitlets.Unicode("neighbourhood").tag(sync=True)  # "neighbourhood" | "full" | "ranks"
    rank_graph = traitlets.Dict().tag(sync=True)  # every rank's graph, sent in the "ranks" mode only
    group_by = traitlets.Unicode("").tag(sync=True)  # "" | "line" | "module"
    selected = traitlets.Unicode("").tag(sync=True)
    detail = traitlets.Unicode("").tag(sync=True)
    height = traitlets.Int(520).tag(sync=True)

    def __init__(self, session, *, mode: str = "neighbourhood", group_by: str = "", height: int = 520,
                 follow: bool = True, **kw):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, not {mode!r}")
        if group_by not in ("", "line", "module"):
            raise ValueError(f"group_by must be '', 'line' or 'module', not {group_by!r}")
        super().__init__(mode=mode, group_by=group_by, height=height, **kw)
        self.session = session
        self._helper = G.GraphHelper()
        self._show_cache: dict[int, str] = {}
        self._picture_cache: dict[tuple, str] = {}  # (expr id, tensor) -> sharding picture HTML
        self._engine_id = None
        self.refresh()
        self.observe(self._on_selected, names="selected")
        self.observe(self._on_mode, names="mode")
        if follow:
            ref = weakref.ref(self)

            def listener(_action: str, _ref=ref) -> None:
                w = _ref()
                if w is not None:
                    w.refresh()

            session.on_change(listener)

    def show(self, e) -> str:
        s = self._show_cache.get(e.id)
        if s is None:
            s = self.session.engine.show(e)
            self._show_cache[e.id] = s
        return s

    def picture(self, expr, title: str) -> str:
        """The sharding picture of a relation, cached (expressions are hash-consed: an id is one
        expression for the engine's lifetime), so re-rendering the panel on a step costs nothing."""
        key = (expr.id, title)
        hit = self._picture_cache.get(key)
        if hit is None:
            from gg_notebook.widgets.sharding import sharding_html

            if len(self._picture_cache) > 256:
                self._picture_cache.clear()
            hit = self._picture_cache[key] = sharding_html(self.session.engine, expr, title=title)
        return hit

    def refresh(self) -> None:
        """Re-read the session: the graph once (or after a reset changed it), the state always;
        the detail panel follows the selected node (or the current operator when none is)."""
        s = self.session
        if self._engine_id != id(s.engine):
            self._engine_id = id(s.engine)
            self._show_cache.clear()
            self._picture_cache.clear()
            g = graph_json(s)
            if g != self.graph:
                self.graph = g
                self.rank_graph = {}
            self._on_mode()
        self.state = graph_state(s, self._helper)
        self._update_detail()

    def _on_mode(self, _change=None) -> None:
        if self.mode == "ranks" and not self.rank_graph:
            self.rank_graph = rank_graph_json(self.session)

    def _on_selected(self, _change=None) -> None:
        self._update_detail()

    def _update_detail(self) -> None:
        sel = self.selected or (self.state.get("current") or "")
        try:
            self.detail = node_detail(self.session, sel, show=self.show, picture=self.picture) if sel else ""
        except Exception as exc:  # noqa: BLE001 - the panel must never break the widget
            import html

            self.detail = f"<span style='color:#cf222e'>cannot describe {html.escape(sel)}: {html.escape(repr(exc))}</span>"
