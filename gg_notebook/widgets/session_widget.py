"""`SessionWidget`: a thin ipywidgets view over a `ProofSession`.

All state lives in the session. Every control calls the session API; the widget re-renders from
the session when the session reports a change (``session.on_change``). Rendering is incremental
and bounded: the relation table shows the last rows plus filter matches, the graph is a small
neighbourhood of the current operator, and pretty-printed relations and SVGs are cached.
"""

from __future__ import annotations

import html
import re
import threading
import time
import warnings
import weakref

import ipywidgets as W

from gg_notebook.session import views as V
from gg_notebook.widgets import graph as G

TABLE_ROWS = 30  # rows of the relation table without a filter (the most recent tensors)
FILTER_ROWS = 200  # at most this many filter matches

_BADGE = {
    "proved": ("#1a7f37", "#dafbe1"),
    "assumed": ("#9a6700", "#fff1d6"),
    "deferred": ("#57606a", "#eaeef2"),
    "numerically false": ("#cf222e", "#ffebe9"),
    "numeric match": ("#0969da", "#ddf4ff"),
    "shape guess": ("#57606a", "#f6f8fa"),
}
_MONO = "font-family:monospace;white-space:pre-wrap;word-break:break-all"


def badge(status: str) -> str:
    fg, bg = _BADGE.get(status, ("#57606a", "#eaeef2"))
    return (f"<span style='color:{fg};background:{bg};border:1px solid {fg};border-radius:8px;"
            f"padding:0 6px;font-size:11px'>{html.escape(status)}</span>")


def esc(s) -> str:
    return html.escape(str(s))


def _status(c) -> str:
    return "deferred" if c.deferred else ("assumed" if c.assumption else "proved")


class SessionWidget(W.VBox):
    """Step through a `ProofSession` (see the module docstring). Controls are attributes (for tests):
    ``step_button, run_button, undo_button, reset_button, run_to_text, run_to_button, progress,
    progress_label, message, current_html, relations_html, filter_text, suggestions_box,
    suggestion_buttons, hint_tensor, hint_text, hint_button, hint_message, assumptions_box,
    retract_buttons, graph_html, graph_select, graph_info, graph_view, banner``.

    A numerically false suggestion is shown with its disagreeing values and a disabled Accept
    button. The user relations (hints, accepted suggestions) are listed under "Your relations",
    each with a Retract button (``session.retract``); Undo takes back the last step or relation.

    The graph: with ``anywidget`` installed, ``graph_view`` is a clickable `GraphView` (clicking a node
    selects it in ``graph_select`` and ``graph_info`` shows its relations; the dropdown selects too) and
    ``graph_html`` is unused (empty, not displayed). Without anywidget, ``graph_view`` is None and
    ``graph_html`` shows the graph; the dropdown selects. ``graph_markup`` is the shown markup either way."""

    def __init__(self, session, *, graph: bool = True, table_rows: int = TABLE_ROWS,
                 background: bool | None = None, save_path: str | None = None):
        self.session = session
        # long actions (Run, Run to) in a thread, so that progress shows and Cancel is heard while they
        # run: by default inside a kernel (a browser is watching); synchronous otherwise (tests, scripts)
        self.background = _in_kernel() if background is None else background
        self._busy: threading.Thread | None = None
        self._cancel = threading.Event()
        self._last_progress = 0.0
        self.table_rows = table_rows
        self.version = 0  # bumped on every session change
        self._show_cache: dict[int, str] = {}
        self._svg_cache: dict[tuple, tuple[str, str]] = {}
        self._result_cache: tuple[int, object] | None = None
        self._graphs = G.GraphHelper()
        self._nb = None
        self._last_stuck: str | None = None
        self.graph_kind: str | None = None  # "svg" | "wasi" | "dot" after a render
        self.render_count = 0
        self._rendering = False

        btn_layout = _btn_layout

        self.step_button = W.Button(description="Step", tooltip="process the next operator", icon="step-forward", **btn_layout(4))
        self.run_button = W.Button(description="Run", tooltip="run until done or stuck", icon="play", **btn_layout(3))
        self.run_to_text = W.Text(placeholder="file.py:LINE or op name (aten.bmm)", layout=W.Layout(width="260px"))
        self.run_to_button = W.Button(description="Run to", tooltip="run until the next operator matches", **btn_layout(6))
        self.cancel_button = W.Button(description="Cancel", tooltip="stop the running Run after the current operator",
                                      icon="stop", button_style="danger", **btn_layout(6))
        self.cancel_button.layout.display = "none"
        self.busy = W.HTML()  # the busy indicator: "running... k operators" while a Run is going
        self.busy.add_class("gg-busy")
        self.save_path = W.Text(value=save_path or f"{_slug(session.problem.name)}.session.json",
                                layout=W.Layout(width="220px"))
        self.save_button = W.Button(description="Save", tooltip="session.save(path): the actions as JSON",
                                    icon="save", **btn_layout(4))
        self.load_button = W.Button(description="Load", tooltip="replay a saved session file into this session",
                                    icon="folder-open", **btn_layout(4))
        self.history = W.IntSlider(value=0, min=0, max=1, description="history", continuous_update=False,
                                   layout=W.Layout(width="420px"),
                                   tooltip="drag back to take steps back (forward to step again)")
        self.undo_button = W.Button(description="Undo", tooltip="take back the last step, hint or accepted suggestion",
                                    icon="undo", **btn_layout(4))
        self.reset_button = W.Button(description="Reset", tooltip="start over (drops hints)", icon="refresh",
                                     button_style="warning", **btn_layout(5))
        self.progress = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="300px"))
        self.progress_label = W.HTML()
        self.message = W.HTML()
        self.banner = W.HTML()
        self.current_html = W.HTML()
        self.filter_text = W.Text(placeholder="filter: tensor name or relation text", continuous_update=True,
                                  layout=W.Layout(width="320px"))
        self.relations_html = W.HTML()
        self.suggestions_box = W.VBox()
        self.suggestion_buttons: list[W.Button] = []
        self.hint_tensor = W.Dropdown(description="tensor", layout=W.Layout(width="220px"))
        self.hint_text = W.Text(placeholder="e.g. sum(mm_1@r0, mm_1@r1)",
                                layout=W.Layout(width="auto", min_width="200px", flex="1 1 240px"))
        self.hint_button = W.Button(description="Add hint", **btn_layout(8))
        self.hint_message = W.HTML()
        self.assumptions_box = W.VBox()
        self.retract_buttons: list[W.Button] = []
        self._assumptions_key: tuple | None = None
        self.graph_enabled = graph
        self.graph_html = W.HTML()
        gv = _graph_view_class() if graph else None
        self.graph_view = gv() if gv is not None else None
        self.graph_select = W.Dropdown(description="node", layout=W.Layout(width="300px"))
        self.graph_info = W.HTML()
        self.graph_info.add_class("gg-graph-info")

        self.step_button.on_click(lambda _b: self._do(self.session.step))
        self.run_button.on_click(lambda _b: self._run())
        self.run_to_button.on_click(self._on_run_to)
        self.cancel_button.on_click(self._on_cancel)
        self.save_button.on_click(self._on_save)
        self.load_button.on_click(self._on_load)
        self.history.observe(self._on_history, names="value")
        with warnings.catch_warnings():  # Enter submits (on_submit: the only Enter-only hook in ipywidgets 8)
            warnings.simplefilter("ignore", DeprecationWarning)
            self.run_to_text.on_submit(lambda _t: self._on_run_to())
            self.hint_text.on_submit(lambda _t: self._on_hint())
        self.undo_button.on_click(lambda _b: self._do(self.session.undo))
        self.reset_button.on_click(lambda _b: self._do(self.session.reset))
        self.hint_button.on_click(self._on_hint)
        self.filter_text.observe(lambda _c: self._render_relations(), names="value")
        self.graph_select.observe(self._on_graph_select, names="value")
        if self.graph_view is not None:
            self.graph_view.observe(self._on_graph_click, names="selected")

        controls = W.HBox([self.step_button, self.run_button, self.undo_button, self.reset_button,
                           self.run_to_text, self.run_to_button, self.cancel_button],
                          layout=W.Layout(flex_flow="row wrap"))
        prog = W.HBox([self.progress, self.progress_label, self.history, self.busy],
                      layout=W.Layout(flex_flow="row wrap"))
        files = W.HBox([W.HTML("<b>Session file</b>&nbsp;"), self.save_path, self.save_button, self.load_button],
                       layout=W.Layout(flex_flow="row wrap"))
        hint_box = W.VBox([W.HTML("<b>Hint</b> <span style='color:#666;font-size:11px'>relation syntax: "
                                  "<code>x@r0</code>, <code>x@r*</code>, <code>concat(a, b, dim=1)</code>, "
                                  "<code>sum(a, b)</code>, <code>a[:, 0:4]</code>, <code>a.view(..)</code></span>"),
                           W.HBox([self.hint_tensor, self.hint_text, self.hint_button],
                                  layout=W.Layout(flex_flow="row wrap")), self.hint_message])
        left = W.VBox([self.current_html, self.suggestions_box, hint_box, self.assumptions_box],
                      layout=W.Layout(width="50%"))
        graph_box = self.graph_view if self.graph_view is not None else self.graph_html
        right = W.VBox([W.HTML("<b>Graph</b> <span style='font-size:11px'>" + _legend() + "</span>"),
                        graph_box, self.graph_select, self.graph_info], layout=W.Layout(width="50%"))
        # The slot the graph lives in (the right column): the graph view (gg_notebook/widgets/graph*.py)
        # may replace its children (a bigger, zoomable view; a sharding picture) without touching the rest
        # of this widget. Its render hook is `_render_graph`, called on every session change.
        self.graph_slot = right
        table = W.VBox([W.HBox([W.HTML("<b>Relations</b>"), self.filter_text]), self.relations_html])
        super().__init__([self.banner, controls, prog, self.message, W.HBox([left, right]), table, files])

        self._set_tensor_options()
        ref = weakref.ref(self)

        def listener(action: str, _ref=ref) -> None:
            w = _ref()
            if w is not None:
                w._on_change(action)

        session.on_change(listener)
        self.render()

    # ------------------------------------------------------------------ actions
    def _do(self, fn, *args, **kw):
        """Call a session action; show an error inline instead of raising from a click handler."""
        if self._busy is not None and self._busy.is_alive() and threading.current_thread() is not self._busy:
            # one action at a time: the session is not changed under a running Run
            self.message.value = "<span style='color:#cf222e'>a Run is going: wait for it, or Cancel it</span>"
            return None
        before = self.version
        self.message.value = ""
        self.hint_message.value = ""
        try:
            out = fn(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - shown to the user, state is the session's
            self.message.value = f"<span style='color:#cf222e'>{esc(type(exc).__name__)}: {esc(V.pretty_text(str(exc)))}</span>"
            out = None
        if self.version == before:  # nothing changed (e.g. Step when done): still refresh
            self.render()
        return out

    def _on_run_to(self, _b=None) -> None:
        until = self.run_to_text.value.strip()
        if not until:
            self.message.value = "<span style='color:#cf222e'>type a file.py:LINE or an op name to run to</span>"
            return
        self._run(until=until)

    # Run / Run to: a busy indicator with the operators done, and a Cancel heard between operators
    def _run(self, until: str | None = None) -> None:
        if self._busy is not None and self._busy.is_alive():
            self.message.value = "<span style='color:#cf222e'>a Run is already going: Cancel it first</span>"
            return
        self._cancel.clear()
        self._set_busy(True, "starting...")
        if self.background:
            self._busy = threading.Thread(target=self._run_body, args=(until,), daemon=True,
                                          name="gg-session-run")
            self._busy.start()
        else:
            self._run_body(until)

    def _run_body(self, until) -> None:
        try:
            self._do(self.session.run, until=until, progress=self._on_progress)
        finally:
            self._set_busy(False)

    def _on_progress(self, k: int) -> bool:
        now = time.monotonic()
        if now - self._last_progress > 0.2:  # at most 5 updates a second
            self._last_progress = now
            done, total = self.session.progress
            self.progress.value = done
            self.progress_label.value = f"&nbsp;{done} / {total} operators"
            self.busy.value = self._busy_html(f"running... {k} operator{'s' if k != 1 else ''} done")
        return self._cancel.is_set()

    def _on_cancel(self, _b=None) -> None:
        self._cancel.set()
        self.busy.value = self._busy_html("cancelling after the current operator...")

    @staticmethod
    def _busy_html(text: str) -> str:
        return (f"<span class='gg-busy-on' style='color:#fff;background:#0969da;border-radius:8px;padding:1px 8px;"
                f"font-size:12px'>{esc(text)}</span>")

    def _set_busy(self, on: bool, text: str = "") -> None:
        if on:  # the indicator first: it is what the user waits to see
            self.busy.value = self._busy_html(text)
        self.cancel_button.layout.display = "" if on else "none"
        for b in (self.step_button, self.run_button, self.run_to_button, self.undo_button, self.reset_button,
                  self.load_button):
            if on:
                b.disabled = True
        self.busy.value = self._busy_html(text) if on else ""
        if not on:
            self._render_buttons(force=True)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a background Run to finish (scripts and tests)."""
        t = self._busy
        if t is not None:
            t.join(timeout)

    def _on_save(self, _b=None) -> None:
        path = self.save_path.value.strip()
        if not path:
            self.message.value = "<span style='color:#cf222e'>type a file name to save to</span>"
            return
        try:
            self.session.save(path)
        except OSError as exc:
            self.message.value = f"<span style='color:#cf222e'>could not save: {esc(V.pretty_text(str(exc)))}</span>"
            return
        self.message.value = (f"<span style='color:#1a7f37'>saved</span> {len(self.session.actions)} actions to "
                              f"<code>{esc(path)}</code>")

    def _on_load(self, _b=None) -> None:
        path = self.save_path.value.strip()
        if not path:
            self.message.value = "<span style='color:#cf222e'>type the file name to load</span>"
            return
        self._do(self.session.restore, path)
        if not self.message.value:
            warn = self.session.load_warnings
            self.message.value = (f"<span style='color:#1a7f37'>loaded</span> <code>{esc(path)}</code>"
                                  + (f"; not applied: {esc('; '.join(warn))}" if warn else ""))

    def _on_history(self, change) -> None:
        k = change["new"]
        if self._rendering or k == len(self.session.engine.steps):
            return
        self._do(self.session.goto, k)

    def _accept(self, k: int) -> None:
        self._do(self.session.accept, k)

    def _retract(self, k: int) -> None:
        self._do(self.session.retract, k)

    def _on_hint(self, _b=None) -> None:
        tensor = self.hint_tensor.value
        text = self.hint_text.value
        self.message.value = ""
        if not tensor:
            self.hint_message.value = "<span style='color:#cf222e'>choose a tensor</span>"
            return
        if not text.strip():
            self.hint_message.value = "<span style='color:#cf222e'>type a relation</span>"
            return
        if self._busy is not None and self._busy.is_alive():
            self.hint_message.value = "<span style='color:#cf222e'>a Run is going: wait for it, or Cancel it</span>"
            return
        try:
            rv = self.session.hint(tensor, text)
        except ValueError as exc:  # HintError included: the session is unchanged
            self.hint_message.value = f"<span style='color:#cf222e'>{esc(V.pretty_text(str(exc)))}</span>"
            return
        what = "proved (the engine derives it)" if rv.status == "proved" else "an assumption (not proved)"
        self.hint_message.value = (f"<span style='color:#1a7f37'>added</span> <code>{esc(tensor)} = {esc(rv.text)}"
                                   f"</code> {badge(rv.status)} &mdash; {what}")

    def _on_change(self, action: str) -> None:
        self.version += 1
        if self.session.done and self._busy is not None and self._busy.is_alive():
            self.busy.value = self._busy_html("checking the verdict (the same checks as gg.verify)...")
        self.render()

    # ------------------------------------------------------------------ rendering
    def show(self, e) -> str:
        s = self._show_cache.get(e.id)
        if s is None:
            s = self.session.engine.show(e)
            self._show_cache[e.id] = s
        return s

    def render(self) -> None:
        self.render_count += 1
        s = self.session
        done, total = s.progress
        self.progress.max = max(total, 1)
        self.progress.value = done
        self.progress_label.value = f"&nbsp;{done} / {total} operators"
        self._render_buttons()
        self._rendering = True
        try:
            self.history.max = max(total, 1)
            self.history.value = len(s.engine.steps)
        finally:
            self._rendering = False
        self._render_current()
        self._render_suggestions()
        self._render_hint_default()
        self._render_assumptions()
        self._render_relations()
        self._render_graph()
        self._render_banner()

    def _render_buttons(self, force: bool = False) -> None:
        s = self.session
        if not force and self._busy is not None and self._busy.is_alive():
            return
        self.step_button.disabled = s.done
        self.run_button.disabled = s.done
        self.run_to_button.disabled = s.done
        self.undo_button.disabled = not s.engine.steps and not s.engine.user_relations
        self.reset_button.disabled = False
        self.load_button.disabled = False

    def _render_current(self) -> None:
        s = self.session
        n = s.current
        if n is None:
            self.current_html.value = "<b>All operators processed.</b>"
            return
        stuck = s.stuck
        eng = s.engine
        names = V.variable_names(eng.seq)
        head = "<b style='color:#cf222e'>Stuck at</b>" if stuck is not None else "<b>Next operator</b>"
        parts = [f"{head} <code>{esc(V.display_name(n, names))}</code> &nbsp;<code>{esc(n.target or n.op)}</code>"
                 f" &nbsp;shape <code>{esc(tuple(n.shape))}</code>"
                 f"<div style='font-size:12px'>call <code class='gg-call'>{esc(V.call_text(n))}</code></div>"]
        parts.append(self._side_by_side(n))
        if n.inputs:
            rows = []
            for i in n.inputs:
                cands = eng.relations.get(i.name, [])
                rel = "<br>".join(f"<code>{esc(self.show(c.expr))}</code> {badge(_status(c))}" for c in cands[:3]) \
                    or "<i>no relation</i>"
                rows.append(f"<tr><td><code>{esc(V.display_name(i, names))}</code></td><td style='{_MONO}'>{rel}</td></tr>")
            parts.append("<div>inputs:</div><table style='font-size:12px'>" + "".join(rows) + "</table>")
        if stuck is not None:
            # the explanation is printed once: in the verdict banner (the session is done when stuck)
            parts.append("<div style='color:#cf222e;font-size:12px'>why: see the verdict above</div>")
        elif eng.steps:
            last = eng.steps[-1]
            rel = "; ".join(last.pretty[:2]) or "no relation"
            parts.append(f"<div style='color:#555;font-size:12px'>last step: <code>{esc(V.SPEC + last.node)}</code> "
                         f"({esc(last.status)}) = <code>{esc(rel)}</code></div>")
        self.current_html.value = "".join(parts)

    def _side_by_side(self, n) -> str:
        """The specification's line next to each rank's corresponding lines (ranks with the same lines
        share a column), the operator's line highlighted, each operator with its arguments."""
        s = self.session
        try:
            lines = V.corresponding(s, n)
        except Exception as exc:  # noqa: BLE001 - a view must never break the widget
            lines = []
            err = f"<div style='color:#cf222e'>rank lines unavailable: {esc(V.pretty_text(str(exc)))}</div>"
        else:
            err = ""

        def code(ctx) -> str:
            return "".join(
                f"<div class='{'gg-hl' if cur else ''}' style='{'background:#fff8c5;font-weight:bold' if cur else ''}'>"
                f"<span style='color:#888'>{k:>4} </span>{esc(text)}</div>" for k, text, cur in ctx)

        spec_ctx = V.context_lines(n, 2)
        spec_src = V.pretty_source(n.source, n.frames)
        spec = (f"<div style='font-weight:bold'>specification</div>"
                f"<div style='color:#555'>{esc(spec_src or 'no source line')}</div>"
                f"<div style='{_MONO}'>{code(spec_ctx) or esc(n.code or '')}</div>"
                f"<div><code>{esc(V.SPEC + n.name)} = {esc(V.call_text(n))}</code></div>")
        groups: dict[tuple, list[int]] = {}
        per: dict[int, list] = {}
        for x in lines:
            per.setdefault(x.rank, []).append(x)
        for r, xs in per.items():
            sig = tuple((x.source, x.call, x.role) for x in xs)
            groups.setdefault(sig, []).append(r)
        cols = []
        for sig, ranks in groups.items():
            xs = per[ranks[0]]
            title = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
            role = "its relation uses" if xs[0].role == "holds" else "operators using its inputs' values"
            body = []
            at = f"@r{ranks[0]}" if len(ranks) == 1 else " (on each)"
            for x in xs:
                var = f" <span style='color:#555'>({esc(x.variable)})</span>" if x.variable else ""
                body.append(f"<div style='color:#555;margin-top:2px'>{esc(x.source or 'no source line')}</div>"
                            f"<div style='{_MONO}'>{code(x.lines)}</div>"
                            f"<div><code>{esc(x.node)}{esc(at)} = {esc(x.call)}</code>{var}</div>")
            cols.append(f"<td style='vertical-align:top;border-left:1px solid #ddd;padding:2px 6px'>"
                        f"<div style='font-weight:bold'>{esc(title)}</div><div style='color:#555'>{role}</div>"
                        + "".join(body) + "</td>")
        if not cols:
            cols.append("<td style='vertical-align:top;color:#555;padding:2px 6px'>no rank operator is related yet</td>")
        return (f"<table class='gg-side-by-side' style='font-size:12px;border:1px solid #ddd;width:100%'><tr>"
                f"<td style='vertical-align:top;padding:2px 6px'>{spec}</td>{''.join(cols)}</tr></table>{err}")

    def _wants_suggestions(self) -> bool:
        s = self.session
        if s.stuck is not None:
            return True
        if not s.engine.steps:
            return False
        last = s.engine.steps[-1]
        return len([c for c in s.engine.relations.get(last.node, []) if not c.deferred]) > 1

    def _render_suggestions(self) -> None:
        if not self._wants_suggestions():
            self.suggestion_buttons = []
            self.suggestions_box.children = ()
            return
        s = self.session
        try:
            sugg = s.suggestions()
        except Exception as exc:  # noqa: BLE001
            self.suggestion_buttons = []
            self.suggestions_box.children = (W.HTML(f"<span style='color:#cf222e'>suggestions failed: {esc(V.pretty_text(str(exc)))}</span>"),)
            return
        node = s.stuck.node if s.stuck is not None else s.engine.steps[-1].node
        title = "stuck" if s.stuck is not None else "ambiguous: several relations"
        rows: list = [W.HTML(f"<b>Suggestions</b> for <code>{esc(node)}</code> ({title})"
                             + ("" if sugg else " &mdash; none; add a hint below"))]
        buttons = []
        for k, sg in enumerate(sugg):
            false = getattr(sg, "numerically_false", None)
            tag = badge(getattr(sg, "evidence", "numerically false" if false else "proved" if sg.proved else "guess"))
            b = W.Button(description="Accept", **_btn_layout(6),
                         tooltip=f"cannot be accepted: {false}" if false else f"session.accept({k})",
                         button_style="success" if sg.proved else "", disabled=bool(false))
            b.on_click(lambda _b, k=k: self._accept(k))
            buttons.append(b)
            why = (f"<br><span style='color:#cf222e'>cannot be accepted: {esc(V.pretty_text(false))}</span>" if false else "")
            rows.append(W.HBox([b, W.HTML(f"<div style='font-size:12px'><code style='{_MONO}'>{esc(sg.text)}</code> "
                                          f"{tag}<br><span style='color:#555'>{esc(V.pretty_text(sg.reason))}</span>{why}</div>")]))
        self.suggestion_buttons = buttons
        self.suggestions_box.children = tuple(rows)

    def _render_assumptions(self) -> None:
        """"Your relations": every hint / accepted suggestion with a Retract button."""
        rels = self.session.user_relations
        key = tuple((r.node, r.text, r.status, r.origin) for r in rels)
        if key == self._assumptions_key:
            return
        self._assumptions_key = key
        if not rels:
            self.retract_buttons = []
            self.assumptions_box.children = ()
            return
        rows: list = [W.HTML("<b>Your relations</b> <span style='color:#666;font-size:11px'>hints and accepted "
                             "suggestions; an assumed one makes the verdict at most 'assumed'</span>")]
        buttons = []
        for r in rels:
            b = W.Button(description="Retract", tooltip=f"session.retract({r.index})", **_btn_layout(7))
            b.on_click(lambda _b, k=r.index: self._retract(k))
            buttons.append(b)
            rows.append(W.HBox([b, W.HTML(f"<div style='font-size:12px'><code>{esc(r.node)}</code> = "
                                          f"<code style='{_MONO}'>{esc(r.text)}</code> {badge(r.status)} "
                                          f"<span style='color:#555'>({esc(r.origin)})</span></div>")]))
        self.retract_buttons = buttons
        self.assumptions_box.children = tuple(rows)

    def _set_tensor_options(self) -> None:
        names = [n.name for n in self.session.engine.seq.nodes]
        if list(self.hint_tensor.options) != names:
            self.hint_tensor.options = names

    def _render_hint_default(self) -> None:
        s = self.session
        stuck = s.stuck.node if s.stuck is not None else None
        if stuck is not None and stuck != self._last_stuck:
            self.hint_tensor.value = stuck
        elif self.hint_tensor.value is None and s.current is not None:
            self.hint_tensor.value = s.current.name
        self._last_stuck = stuck

    def _render_relations(self) -> None:
        eng = self.session.engine
        rels = eng.relations
        q = self.filter_text.value.strip().lower()
        names = list(rels)
        if q:
            matched = []
            for name in names:
                if q in name.lower() or q in (V.variable_names(eng.seq).get(name) or "").lower() or \
                        any(q in self.show(c.expr).lower() for c in rels[name]):
                    matched.append(name)
            shown = matched[:FILTER_ROWS]
            note = f"{len(matched)} of {len(names)} tensors match" + \
                   (f" (first {FILTER_ROWS} shown)" if len(matched) > FILTER_ROWS else "")
        else:
            shown = names[-self.table_rows:]
            note = f"last {len(shown)} of {len(names)} tensors" if len(names) > len(shown) else f"{len(names)} tensors"
        stuck = self.session.stuck.node if self.session.stuck is not None else None
        names = V.variable_names(eng.seq)
        rows = []
        for name in shown:
            cands = rels[name]
            bg = " style='background:#ffebe9'" if name == stuck else ""
            if not cands:
                cell = "<i>no relation</i>"
                st = "<span style='color:#cf222e;font-size:11px'>stuck</span>" if name == stuck else ""
            else:
                cell = "<br>".join(f"<code>{esc(self.show(c.expr))}</code>" for c in cands)
                st = "<br>".join(badge(_status(c)) for c in cands)
            var = names.get(name)
            shown_name = f"<code>{esc(V.SPEC + name)}</code>" + (
                f" <span style='color:#555'>{esc(var)}</span>" if var and not var.startswith("in ") else "")
            rows.append(f"<tr{bg}><td style='vertical-align:top'>{shown_name}</td>"
                        f"<td style='{_MONO};font-size:12px'>{cell}</td><td style='vertical-align:top'>{st}</td></tr>")
        self.relations_html.value = (
            f"<div style='color:#666;font-size:11px'>{esc(note)}</div>"
            "<div style='max-height:360px;overflow:auto'><table style='border-collapse:collapse;width:100%'>"
            "<tr><th style='text-align:left'>tensor</th><th style='text-align:left'>relation(s)</th>"
            "<th style='text-align:left'>status</th></tr>" + "".join(rows) + "</table></div>")

    def _render_graph(self) -> None:
        if not self.graph_enabled:
            self.graph_html.value = "<i>graph view off</i>"
            return
        s = self.session
        cur = s.current
        key = (cur.name if cur is not None else None, self.version, id(s.engine))
        hit = self._svg_cache.get(key)
        if hit is None:
            if cur is None:
                hit = ("none", "<i>no current operator</i>")
                self._nb = G.Neighbourhood(None)
            else:
                try:
                    self._nb = self._graphs.neighbourhood(s, cur)
                    hit = G.render(G.to_dot(s, self._nb, show=self.show))
                except Exception as exc:  # noqa: BLE001 - the graph view must never break the widget
                    hit = ("error", f"<span style='color:#cf222e'>graph view failed: {esc(V.pretty_text(str(exc)))}</span>")
            if len(self._svg_cache) > 64:
                self._svg_cache.clear()
            self._svg_cache[key] = hit
        self.graph_kind, markup = hit
        if self.graph_view is not None:
            self.graph_view.svg = markup
        else:
            self.graph_html.value = markup
        ids = self._nb.node_ids() if self._nb is not None else []
        if list(self.graph_select.options) != ids:
            keep = self.graph_select.value
            self.graph_select.options = ids
            if keep in ids:
                self.graph_select.value = keep
            elif cur is not None and G.seq_id(cur.name) in ids:
                self.graph_select.value = G.seq_id(cur.name)
        self._render_graph_info()

    @property
    def graph_markup(self) -> str:
        """The graph's current markup (SVG, DOT text or a message), in ``graph_view`` or ``graph_html``."""
        return self.graph_view.svg if self.graph_view is not None else self.graph_html.value

    def _on_graph_select(self, _change=None) -> None:
        if self.graph_view is not None:
            self.graph_view.selected = self.graph_select.value or ""
        self._render_graph_info()

    def _on_graph_click(self, change) -> None:
        """A click on a node in the browser (``graph_view.selected``): select it in the dropdown."""
        sel = change["new"]
        if not sel or sel == self.graph_select.value:
            return
        if sel in self.graph_select.options:
            self.graph_select.value = sel  # -> _on_graph_select -> graph_info
        else:  # not a node of the current neighbourhood (a stale view): show it if it exists
            try:
                self.graph_info.value = self.node_info(sel)
            except Exception:  # noqa: BLE001 - a malformed id from the frontend
                self.graph_info.value = ""

    def _render_graph_info(self) -> None:
        sel = self.graph_select.value
        if not sel:
            self.graph_info.value = ""
            return
        self.graph_info.value = self.node_info(sel)

    def node_info(self, node_id: str) -> str:
        """HTML describing a graph node (``seq:NAME`` or ``rR:NAME``): its relations or its rank value."""
        s = self.session
        eng = s.engine
        kind, name = node_id.split(":", 1)
        if kind == "seq":
            n = eng.seq.by_name.get(name)
            if n is None:
                return ""
            st = G.seq_status(s, name)
            cands = eng.relations.get(name, [])
            rel = "".join(f"<div><code style='{_MONO}'>{esc(self.show(c.expr))}</code> {badge(_status(c))}</div>"
                          for c in cands) or "<i>no relation</i>"
            step = next((x for x in reversed(eng.steps) if x.node == name), None)
            extra = f"<div style='color:#555'>{esc(V.pretty_text(step.detail))}</div>" if step is not None and step.detail else ""
            if s.stuck is not None and s.stuck.node == name:  # its explanation is in the verdict banner (once)
                extra = "<div style='color:#cf222e'>stuck: why, see the verdict above</div>"
            return (f"<div style='font-size:12px'><b>{esc(name)}</b> <code>{esc(n.target)}</code> "
                    f"{esc(tuple(n.shape))} [{esc(st)}]" + (f" at <code>{esc(V.pretty_source(n.source, n.frames))}</code>" if n.source else "")
                    + f"<div>{rel}</div>{extra}</div>")
        r = int(kind[1:])
        g = eng.index.graphs[r]
        n = g.by_name.get(name)
        if n is None:
            return ""
        try:
            dv = eng.index.dval_of(r, n)
            where = ", ".join(f"{m.name}@r{rr}" for rr, m in dv.locations[:8])
        except KeyError:
            where = ""
        refs = self._nb.rank_refs.get((r, name), []) if self._nb is not None else []
        return (f"<div style='font-size:12px'><b>{esc(name)}@r{r}</b> <code>{esc(n.target)}</code> "
                f"{esc(tuple(n.shape))}" + (f" at <code>{esc(V.pretty_source(n.source, n.frames))}</code>" if n.source else "")
                + (f"<div>same value at: <code>{esc(where)}</code></div>" if where else "")
                + (f"<div>used by the relation of: <code>{esc(', '.join(refs))}</code></div>" if refs else "")
                + "</div>")

    def result(self):
        """`session.result()`: the verdict `gg.verify` gives once the session is finished or stuck
        (the session computes it once per state)."""
        return self.session.result()

    def verdict(self) -> str:
        """The banner's headline: "proved", "assumed: holds only under N assumption(s) (not a proof)",
        "refuted: first wrong value at <op> (<node>, <where>)", "unknown: the numbers agree, a lemma is
        missing for <op> (<node>, <where>)", or, without a concrete check, "unknown: stuck at ..."."""
        r = self.result()
        if r.proved:
            return "proved"
        if r.status.value in ("assumed", "proved"):  # (a proved status with assumptions is assumed)
            return r.headline()
        c = r.culprit
        where = ""
        if c is not None:
            src = V.pretty_source(c.source)
            where = f" at {c.op} ({V.SPEC}{c.node}" + (f", {src})" if src else ")")
        if r.status.value == "refuted":
            return ("refuted: first wrong value" + where) if c is not None else "refuted"
        if any(f.kind == "numbers-agree" for f in r.findings):
            return "unknown: the numbers agree, a lemma is missing" + (f" for{where[3:]}" if where else "")
        return "unknown: stuck" + where if where else "unknown"

    def _render_banner(self) -> None:
        s = self.session
        if not s.done:
            self.banner.value = ""
            return
        try:
            r = self.result()
            text = self.verdict()
        except Exception as exc:  # noqa: BLE001
            self.banner.value = f"<div style='color:#cf222e'>could not judge: {esc(V.pretty_text(str(exc)))}</div>"
            return
        assumed = not r.proved and r.culprit is None and r.status.value in ("assumed", "proved")
        if r.proved:
            kind, colour, bg = "proved", "#1a7f37", "#dafbe1"
        elif assumed:  # not the green banner: an assumption is not a proof
            kind, colour, bg = "assumed", "#bc4c00", "#fff1e5"
        elif r.status.value == "refuted":
            kind, colour, bg = "refuted", "#cf222e", "#ffebe9"
        else:
            kind, colour, bg = "unknown", "#9a6700", "#fff8c5"
        body = ""
        if r.assumptions:
            body += "<ul style='margin:2px 0'>" + "".join(f"<li><code>{esc(a)}</code></li>" for a in r.assumptions) + "</ul>"
        if assumed:
            body += ("<div style='font-size:12px'>every output is related as expected, but only if the assumptions "
                     "above hold: retract them (or undo) to see where the proof needs them</div>")
        cx = r.counterexample
        if cx is not None:
            body += "<div class='gg-counterexample' style='font-size:12px;margin-top:3px'><b>counterexample</b>: "
            if cx.raised:
                body += esc(str(cx))
            elif cx.shapes and cx.shapes[1] is not None and cx.shapes[0] != cx.shapes[1]:
                body += esc(str(cx))
            else:
                ins = ", ".join(f"{k} {v}" for k, v in cx.inputs.items())
                body += (f"on random inputs (seed {cx.seed}: {esc(ins)}), output {cx.output} should equal "
                         f"{esc(cx.expected_relation)}, but at index <code>{esc(cx.worst_index)}</code> the "
                         f"specification gives <code>{esc(_nums(cx.sequential))}</code> and the ranks give "
                         f"<code>{esc(_nums(cx.rebuilt))}</code> (max error {cx.max_error:.3g}, relative "
                         f"{cx.relative_error:.3g})")
            body += "</div>"
        if not r.proved and r.culprit is not None:
            c = r.culprit
            src = V.pretty_source(c.source)
            body += (f"<div style='font-size:12px'>where: <code>{esc(V.SPEC + c.node)}</code> <code>{esc(c.op)}</code>"
                     + (f" at {esc(src)}" if src else "")
                     + (f": <code>{esc(c.code.strip())}</code>" if c.code else "")
                     + f"</div><div class='gg-why' style='font-size:12px'>{esc(V.pretty_text(c.detail))}</div>")
        st = s.stuck
        if st is not None and st.detail and (r.culprit is None or st.detail not in r.culprit.detail):
            # where the proof stopped, when the numbers blame another operator (the explanation is printed
            # here only: the other panels point to the banner)
            n = s.engine.seq.by_name[st.node]
            src = V.pretty_source(n.source, n.frames)
            body += (f"<div class='gg-why' style='font-size:12px'>the proof is stuck at <code>{esc(V.SPEC + st.node)}</code> "
                     f"<code>{esc(st.op)}</code>" + (f" ({esc(src)})" if src else "")
                     + f": {esc(V.pretty_text(st.detail))}</div>")
        for f in r.findings:
            if f.kind in ("numbers-agree", "scale-factor", "rank-raised", "not-simulated", "not-checked"):
                body += f"<div style='font-size:12px'>{esc(V.pretty_text(f.message))}</div>"
        if not r.proved and not assumed:
            bad = [o for o in r.relations if not o.ok]
            for o in bad[:4]:
                body += f"<div style='font-size:12px'>output <code>{esc(o)}</code> {esc(V.pretty_text(o.detail))}</div>"
        self.banner.value = (f"<div class='gg-verdict gg-verdict-{kind}' style='border:2px solid {colour};background:{bg};padding:6px;"
                             f"border-radius:6px'><b style='color:{colour};font-size:15px'>{esc(text)}</b>{body}</div>")


def _nums(xs) -> str:
    return "[" + ", ".join(f"{x:.6g}" for x in xs) + "]"


def _btn_layout(chars: int) -> dict:
    """A button wide enough for its label (``chars`` long) and icon: never clipped, never shrunk."""
    return dict(layout=W.Layout(width="auto", min_width=f"{chars * 9 + 42}px", flex="0 0 auto"))


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "session"


def _graph_view_class():
    """`GraphView` if anywidget imports, else None (the HTML + Dropdown fallback)."""
    try:
        import anywidget  # noqa: F401

        from gg_notebook.widgets.graph_view import GraphView
    except ImportError:
        return None
    return GraphView


def _legend() -> str:
    items = [("proved", "proved"), ("current", "current"), ("stuck", "stuck"), ("assumed", "assumed"),
             ("deferred", "deferred"), ("unvisited", "not yet visited")]
    return " ".join(f"<span style='background:{G.COLOURS[k]};padding:0 4px;border-radius:3px'>{esc(t)}</span>"
                    for k, t in items)
