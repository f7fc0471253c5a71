"""`SessionWidget`: a thin ipywidgets view over a `ProofSession`.

All state lives in the session. Every control calls the session API; the widget re-renders from
the session when the session reports a change (``session.on_change``). Rendering is incremental
and bounded: the relation table shows the last rows plus filter matches, the graph (a `GraphWidget`
in ``graph_slot``) sends the whole graph once and only the current operator's state on a step, and
pretty-printed relations are cached. Tensors are named the same way everywhere
(`views.display_name`: ``probs (spec:_softmax)``, ``mm_1@r0``).
"""

from __future__ import annotations

import html
import re
import threading
import time
import warnings

import ipywidgets as W

from gg_notebook.session import views as V

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
_SBS_CELL = "vertical-align:top;padding:2px 6px;border:1px solid #eee;min-width:0;overflow-wrap:anywhere"


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
    retract_buttons, graph_view, graph_slot, banner``.

    A numerically false suggestion is shown with its disagreeing values and a disabled Accept
    button. The user relations (hints, accepted suggestions) are listed under "Your relations",
    each with a Retract button (``session.retract``); Undo takes back the last step or relation.

    The graph: ``graph_view`` is a `GraphWidget` (zoom / pan / fit, search, collapse; the neighbourhood
    of the current operator by default, the full model or every rank's graph on demand; clicking a
    node shows its relations, lemmas and sharding picture in its side panel). It follows the current
    operator: the widget refreshes it after every session change. Without ``anywidget`` (or with
    ``graph=False``) ``graph_view`` is None and the slot says why."""

    def __init__(self, session, *, graph: bool = True, table_rows: int = TABLE_ROWS,
                 background: bool | None = None, save_path: str | None = None, graph_height: int = 460):
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
        self._result_cache: tuple[int, object] | None = None
        self._last_stuck: str | None = None
        self._tensor_options_for = None
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
        self.hint_tensor = W.Dropdown(description="tensor", layout=W.Layout(width="320px"))
        self.hint_text = W.Text(placeholder="e.g. sum(mm_1@r0, mm_1@r1)",
                                layout=W.Layout(width="auto", min_width="200px", flex="1 1 240px"))
        self.hint_button = W.Button(description="Add hint", **btn_layout(8))
        self.hint_message = W.HTML()
        self.assumptions_box = W.VBox()
        self.retract_buttons: list[W.Button] = []
        self._assumptions_key: tuple | None = None
        self.graph_enabled = graph
        self.graph_view = None
        graph_note = "<i>graph view off</i>"
        if graph:
            try:
                from gg_notebook.widgets.graph_widget import GraphWidget
            except ImportError as exc:  # anywidget missing: the rest of the widget works
                graph_note = (f"<i>the graph view needs <code>anywidget</code> "
                              f"(pip install anywidget): {esc(exc)}</i>")
            else:
                self.graph_view = GraphWidget(session, follow=False, height=graph_height)

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
        # the current operator (with the side-by-side lines: up to one column per rank) spans the width;
        # below it the actions (suggestions, hint, your relations) and the graph, wrapping when narrow
        left = W.VBox([self.suggestions_box, hint_box, self.assumptions_box],
                      layout=W.Layout(flex="1 1 360px", min_width="300px"))
        left.add_class("gg-actions")
        graph_box = self.graph_view if self.graph_view is not None else W.HTML(graph_note)
        # The slot the graph lives in (refreshed by `_render_graph` on every session change)
        self.graph_slot = W.VBox([W.HTML("<b>Graph</b>"), graph_box],
                                 layout=W.Layout(flex="2 1 620px", min_width="0"))
        self.graph_slot.add_class("gg-graph-slot")
        self.current_html.add_class("gg-current")
        table = W.VBox([W.HBox([W.HTML("<b>Relations</b>"), self.filter_text]), self.relations_html])
        super().__init__([self.banner, controls, prog, self.message, self.current_html,
                          W.HBox([left, self.graph_slot], layout=W.Layout(flex_flow="row wrap", width="100%")),
                          table, files])
        self.add_class("gg-session-widget")

        self._set_tensor_options()
        session.follow(self, "_on_change")
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
        head = "<b style='color:#cf222e'>Stuck at</b>" if stuck is not None else "<b>Next operator</b>"
        parts = [f"{head} <code>{esc(V.tensor_name(eng, n))}</code> &nbsp;<code>{esc(n.target or n.op)}</code>"
                 f" &nbsp;shape <code>{esc(tuple(n.shape))}</code>"
                 f"<div style='font-size:12px'>call <code class='gg-call'>{esc(V.call_text(n))}</code></div>"]
        parts.append(self._side_by_side(n))
        if n.inputs:
            rows = []
            for i in n.inputs:
                cands = eng.relations.get(i.name, [])
                rel = "<br>".join(f"<code>{esc(self.show(c.expr))}</code> {badge(_status(c))}" for c in cands[:3]) \
                    or "<i>no relation</i>"
                rows.append(f"<tr><td style='vertical-align:top;white-space:nowrap'><code>{esc(V.tensor_name(eng, i))}</code>"
                            f"</td><td style='{_MONO};vertical-align:top'>{rel}</td></tr>")
            parts.append("<div>inputs:</div><table style='font-size:12px'>" + "".join(rows) + "</table>")
        if stuck is not None:
            # the explanation is printed once: in the verdict banner (the session is done when stuck)
            parts.append("<div style='color:#cf222e;font-size:12px'>why: see the verdict above</div>")
        elif eng.steps:
            last = eng.steps[-1]
            rel = "; ".join(last.pretty[:2]) or "no relation"
            parts.append(f"<div style='color:#555;font-size:12px'>last step: <code>{esc(V.spec_name(eng, last.node))}</code> "
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
                f"<div><code>{esc(V.tensor_name(s.engine, n))} = {esc(V.call_text(n))}</code></div>")
        groups: dict[tuple, list[int]] = {}
        per: dict[int, list] = {}
        for x in lines:
            per.setdefault(x.rank, []).append(x)
        for r, xs in per.items():
            sig = tuple((x.source, x.call, x.role) for x in xs)
            groups.setdefault(sig, []).append(r)
        cols = []
        # many columns (ranks whose lines differ): each rank operator's own line only, no context
        many = len(groups) > 3
        for sig, ranks in groups.items():
            xs = per[ranks[0]]
            title = _ranks_title(ranks)
            role = "its relation uses" if xs[0].role == "holds" else "operators using its inputs' values"
            body = []
            same = "" if len(ranks) == 1 else f"<div style='color:#555'>names as on rank {ranks[0]} (the same on each)</div>"
            for x in xs:
                body.append(f"<div style='color:#555;margin-top:2px'>{esc(x.source or 'no source line')}</div>"
                            f"<div style='{_MONO}'>{code([c for c in x.lines if c[2] or not many])}</div>"
                            f"<div><code>{esc(x.name)} = {esc(x.call)}</code></div>")
            cols.append(f"<div class='gg-sbs-col' style='{_SBS_CELL}'>"
                        f"<div style='font-weight:bold'>{esc(title)}</div><div style='color:#555'>{role}</div>{same}"
                        + "".join(body) + "</div>")
        if not cols:
            cols.append(f"<div class='gg-sbs-col' style='{_SBS_CELL};color:#555'>no rank operator is related yet</div>")
        # a grid of columns at least 260 px wide: the specification first, then each group of ranks;
        # with many ranks whose lines differ (8 at TP8) the columns wrap onto more rows instead of being
        # squeezed or running off the output's right edge
        return (f"<div class='gg-side-by-side' style='display:grid;grid-template-columns:repeat(auto-fit, "
                f"minmax(260px, 1fr));gap:0;font-size:12px;line-height:1.4;border:1px solid #ddd;"
                f"box-sizing:border-box'>"
                f"<div class='gg-sbs-col gg-sbs-spec' style='{_SBS_CELL};background:#f6f8fa'>{spec}</div>"
                f"{''.join(cols)}</div>{err}")

    def _wants_suggestions(self) -> bool:
        s = self.session
        if s.stuck is not None:
            return True
        if not s.engine.steps or s.done:  # finished (not stuck): nothing is left to decide
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
        rows: list = [W.HTML(f"<b>Suggestions</b> for <code>{esc(V.spec_name(s.engine, node))}</code> ({title})"
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
            rows.append(W.HBox([b, W.HTML(f"<div style='font-size:12px'><code>{esc(V.spec_name(self.session.engine, r.node))}</code> = "
                                          f"<code style='{_MONO}'>{esc(r.text)}</code> {badge(r.status)} "
                                          f"<span style='color:#555'>({esc(r.origin)})</span></div>")]))
        self.retract_buttons = buttons
        self.assumptions_box.children = tuple(rows)

    def _set_tensor_options(self) -> None:
        eng = self.session.engine
        if self._tensor_options_for is not eng.seq:  # (label, value): the views' name, the node's name
            self._tensor_options_for = eng.seq
            self.hint_tensor.options = [(V.tensor_name(eng, n), n.name) for n in eng.seq.nodes]

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
                if q in V.spec_name(eng, name).lower() or \
                        any(q in self.show(c.expr).lower() for c in rels[name]):
                    matched.append(name)
            shown = matched[:FILTER_ROWS]
            note = f"{len(matched)} of {len(names)} tensors match" + \
                   (f" (first {FILTER_ROWS} shown)" if len(matched) > FILTER_ROWS else "")
        else:
            shown = names[-self.table_rows:]
            note = f"last {len(shown)} of {len(names)} tensors" if len(names) > len(shown) else f"{len(names)} tensors"
        stuck = self.session.stuck.node if self.session.stuck is not None else None
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
            rows.append(f"<tr{bg}><td style='vertical-align:top;white-space:nowrap;width:1%;padding-right:12px'>"
                        f"<code>{esc(V.spec_name(eng, name))}</code></td>"
                        f"<td style='{_MONO};font-size:12px'>{cell}</td><td style='vertical-align:top'>{st}</td></tr>")
        self.relations_html.value = (
            f"<div style='color:#666;font-size:11px'>{esc(note)}</div>"
            "<div style='max-height:360px;overflow:auto'><table style='border-collapse:collapse;width:100%'>"
            "<tr><th style='text-align:left'>tensor</th><th style='text-align:left'>relation(s)</th>"
            "<th style='text-align:left'>status</th></tr>" + "".join(rows) + "</table></div>")

    def _render_graph(self) -> None:
        """The graph follows the session: the current operator, statuses, related rank operators."""
        if self.graph_view is not None:
            self.graph_view.refresh()

    def result(self):
        """`session.result()`: the verdict `gg.verify` gives once the session is finished or stuck
        (the session computes it once per state)."""
        return self.session.result()

    def verdict(self) -> str:
        """The banner's headline: "proved", "assumed: holds only under N assumption(s) (not a proof)",
        "refuted: first wrong value at <op>: <name>, <where>", "unknown: the numbers agree, a lemma is
        missing for <op>: <name>, <where>" (<name> as `views.display_name`), or, without a concrete check, "unknown: stuck at ..."."""
        r = self.result()
        if r.proved:
            return "proved"
        if r.status.value in ("assumed", "proved"):  # (a proved status with assumptions is assumed)
            return r.headline()
        c = r.culprit
        where = ""
        if c is not None:
            src = V.pretty_source(c.source)
            where = f" at {c.op}: {V.spec_name(self.session.engine, c.node)}" + (f", {src}" if src else "")
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
            body += (f"<div style='font-size:12px'>where: <code>{esc(V.spec_name(s.engine, c.node))}</code> <code>{esc(c.op)}</code>"
                     + (f" at {esc(src)}" if src else "")
                     + (f": <code>{esc(c.code.strip())}</code>" if c.code else "")
                     + f"</div><div class='gg-why' style='font-size:12px'>{esc(V.pretty_text(c.detail))}</div>")
        st = s.stuck
        if st is not None and st.detail and (r.culprit is None or st.detail not in r.culprit.detail):
            # where the proof stopped, when the numbers blame another operator (the explanation is printed
            # here only: the other panels point to the banner)
            n = s.engine.seq.by_name[st.node]
            src = V.pretty_source(n.source, n.frames)
            body += (f"<div class='gg-why' style='font-size:12px'>the proof is stuck at <code>{esc(V.spec_name(s.engine, st.node))}</code> "
                     f"<code>{esc(st.op)}</code>" + (f" ({esc(src)})" if src else "")
                     + f": {esc(V.pretty_text(st.detail))}</div>")
        for f in r.findings:
            if f.kind in ("numbers-agree", "scale-factor", "rank-raised", "not-simulated", "not-checked"):
                body += f"<div style='font-size:12px'>{esc(V.pretty_text(f.message))}</div>"
        if not r.proved and not assumed:
            bad = [o for o in r.relations if not o.ok]
            for o in bad[:4]:
                name = V.spec_name(self.session.engine, o.name)
                what = f"{o.label} ({name})" if o.label else name
                line = f"out[{o.index}] {what} = {o.relation if o.relation is not None else '<no relation>'}"
                body += f"<div style='font-size:12px'>output <code>{esc(line)}</code> {esc(V.pretty_text(o.detail))}</div>"
        self.banner.value = (f"<div class='gg-verdict gg-verdict-{kind}' style='border:2px solid {colour};background:{bg};padding:6px;"
                             f"border-radius:6px'><b style='color:{colour};font-size:15px'>{esc(text)}</b>{body}</div>")


def _ranks_title(ranks: list[int]) -> str:
    """"rank 3", "ranks 0, 1", "ranks 0-7" (runs of three or more consecutive ranks as a range)."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    rs = sorted(ranks)
    parts, k = [], 0
    while k < len(rs):
        j = k
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        parts += [f"{rs[k]}\u2013{rs[j]}"] if j - k >= 2 else [str(r) for r in rs[k:j + 1]]
        k = j + 1
    return "ranks " + ", ".join(parts)


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
