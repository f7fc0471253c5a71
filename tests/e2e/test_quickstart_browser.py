"""End-to-end: the SessionWidget in a real JupyterLab, driven by headless chromium (Playwright).

Test 1 runs the quickstart notebook (a copy) and drives its widget: Reset, Step, Step, Run.
Test 2 builds a buggy session in a scratch notebook, runs it until stuck, sees its (numerically
false) suggestions that cannot be accepted and types an invalid hint. Test 3 accepts a true guess on a
correct program the engine cannot finish: the banner says "assumed", Retract takes it back.

What these tests rely on in the widget (keep stable, or update here):
* buttons found by their exact text: "Step", "Run", "Reset", "Accept", "Add hint";
* the progress label text "<done> / <total> operators";
* the verdict banner element ``.gg-verdict`` with "proved" / "assumed: holds only under N
  assumption(s) (not a proof)" / "refuted: first wrong value at ..." (with a ``.gg-counterexample``)
  / "unknown: the numbers agree, a lemma is missing for ...";
* the relation table: the ``<table>`` whose header has a "relation(s)" column; one ``<tr>`` per
  tensor holding the relation text and a status badge ("proved" / "assumed");
* a suggestion row: an HBox holding an "Accept" button and the suggestion's text in ``<code>``; a
  numerically false suggestion's button is disabled and its row says "numerically false";
* "Your relations": a row per hint / accepted suggestion with a "Retract" button;
* the hint row: an HBox holding a text ``<input>`` and the "Add hint" button; an invalid hint
  shows its error inline (HintError text, e.g. "cannot parse ...");
* the graph view (anywidget ``GraphView``): ``.gg-graph-view g.node[data-gg-node='seq:NAME']`` for
  a node; clicking one fills ``.gg-graph-info`` with that node's name and relations.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

pytestmark = pytest.mark.timeout(180)

QUICKSTART = "01_quickstart.ipynb"
PROGRESS = re.compile(r"(\d+)\s*/\s*(\d+)\s+operators")


# --------------------------------------------------------------------------- helpers
def wait_until(what: str, fn, timeout: float = 30.0, page=None):
    """Poll ``fn()`` until it returns a truthy value (returned); AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - a detached node while the widget re-renders
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        if page is not None:
            page.wait_for_timeout(150)
        else:
            time.sleep(0.15)


def widget_button(scope, name: str):
    """ipywidgets buttons by their exact text. (Not get_by_role: the Font Awesome icon's CSS glyph
    becomes part of a button's accessible name in chromium.)"""
    return scope.locator("button", has_text=re.compile(rf"^\s*{re.escape(name)}\s*$"))


class WidgetUI:
    """The SessionWidget's output in the notebook page."""

    def __init__(self, page):
        self.page = page
        # the output area that holds the widget: the one with a "Step" button
        self.root = page.locator(".jp-OutputArea-output").filter(
            has=widget_button(page, "Step")).first

    def wait_rendered(self, timeout: float = 60.0) -> None:
        self.page.locator(".jupyter-widgets").first.wait_for(state="visible", timeout=timeout * 1000)
        self.root.wait_for(state="visible", timeout=timeout * 1000)

    def button(self, name: str):
        return widget_button(self.root, name)

    def click(self, name: str) -> None:
        b = self.button(name).first
        b.wait_for(state="visible", timeout=15_000)
        wait_until(f"button {name!r} enabled", b.is_enabled, timeout=15, page=self.page)
        b.click()

    def text(self) -> str:
        return self.root.inner_text(timeout=10_000)

    def progress(self) -> tuple[int, int] | None:
        m = PROGRESS.search(self.text())
        return (int(m.group(1)), int(m.group(2))) if m else None

    def wait_progress(self, pred, what: str, timeout: float = 30.0) -> tuple[int, int]:
        return wait_until(f"progress {what}", lambda: (p := self.progress()) and pred(*p) and p,
                          timeout=timeout, page=self.page)

    def banner(self) -> str:
        b = self.root.locator(".gg-verdict")
        return b.first.inner_text(timeout=5_000) if b.count() else ""

    def wait_banner(self, pred, what: str, timeout: float = 30.0) -> str:
        return wait_until(f"verdict banner {what}", lambda: (t := self.banner()) and pred(t) and t,
                          timeout=timeout, page=self.page)

    def graph_node(self, node_id: str):
        return self.root.locator(f".gg-graph-view g.node[data-gg-node='{node_id}']").first

    def graph_info(self) -> str:
        info = self.root.locator(".gg-graph-info")
        return info.first.inner_text(timeout=5_000) if info.count() else ""

    def click_graph_node(self, node_id: str, pred, what: str, timeout: float = 20.0) -> str:
        """Click the graph node ``node_id`` until the info area satisfies ``pred`` (the SVG may be
        replaced by a re-render between locating and clicking, so a click can land on a stale node)."""
        state = {"clicked": 0.0}

        def attempt():
            text = self.graph_info()
            if pred(text):
                return text
            now = time.monotonic()
            if now - state["clicked"] > 5.0:
                state["clicked"] = now
                self.graph_node(node_id).click(timeout=5_000)
            return None

        return wait_until(f"graph info after clicking {node_id}: {what}", attempt, timeout=timeout,
                          page=self.page)

    def relation_rows(self) -> list[str]:
        """Texts of the relation table's rows (the table with a "relation(s)" header)."""
        table = self.root.locator("table").filter(
            has=self.page.locator("th", has_text="relation(s)")).first
        rows = table.locator("tr").all_inner_texts()
        return [r for r in rows[1:]]  # without the header

    def wait_row(self, pred, what: str, timeout: float = 30.0) -> str:
        return wait_until(f"relation table row {what}",
                          lambda: next((r for r in self.relation_rows() if pred(r)), None),
                          timeout=timeout, page=self.page)


def open_and_run_all(notebook_ui, name: str, timeout: float = 90.0) -> WidgetUI:
    notebook_ui.open(name)
    notebook_ui.run_all()
    notebook_ui.wait_executed(timeout=timeout)
    page = notebook_ui.page
    missing = page.locator(".jp-OutputArea-output", has_text="widgets not available here")
    if missing.count():
        raise AssertionError("the notebook could not import the widgets: " + missing.first.inner_text())
    w = WidgetUI(page)
    w.wait_rendered()
    return w


# --------------------------------------------------------------------------- tests
def test_quickstart_widget_step_and_run(lab, page, notebook_ui):
    """Run All on the quickstart notebook; its widget shows the proof; Reset, Step, Step, Run."""
    assert (NOTEBOOKS / QUICKSTART).exists(), f"notebooks/{QUICKSTART} is missing"
    w = open_and_run_all(notebook_ui, QUICKSTART)

    # The notebook ran the session to the end before displaying the widget.
    done, total = w.wait_progress(lambda d, t: d == t and t > 2, "done == total")
    assert w.wait_banner(lambda t: t.strip().startswith("proved"), "'proved'").strip() == "proved"

    # Reset: nothing processed, no relation, no verdict.
    w.click("Reset")
    w.wait_progress(lambda d, t: d == 0 and t == total, f"0 / {total}")
    # (each ipywidget updates on its own message: poll every part, never assert at once)
    wait_until("empty relation table", lambda: w.relation_rows() == [], page=page)
    wait_until("no verdict banner after Reset", lambda: w.banner() == "", page=page)

    # Step: one operator processed, its relation appears in the table.
    w.click("Step")
    w.wait_progress(lambda d, t: d == 1, f"1 / {total}")
    first = w.wait_row(lambda r: "@r" in r, "with the first relation")
    assert "proved" in first, first
    wait_until("exactly one relation row", lambda: len(w.relation_rows()) == 1, page=page)

    w.click("Step")
    w.wait_progress(lambda d, t: d == 2, f"2 / {total}")
    w.wait_row(lambda r: r != first and "@r" in r, "with a second relation")
    wait_until("exactly two relation rows", lambda: len(w.relation_rows()) == 2, page=page)

    # The graph view: one more Step (x, w1, w2 done; mm current, selected by default); clicking a
    # node shows its relations (x is replicated, w1 split by columns).
    w.click("Step")
    w.wait_progress(lambda d, t: d == 3, f"3 / {total}")
    for node in ("seq:x", "seq:w1", "seq:mm"):
        wait_until(f"graph node {node}", lambda node=node: w.graph_node(node).count() > 0, page=page)
    info = w.click_graph_node("seq:x", lambda t: "x@r*" in t and "w1@r0" not in t, "x's relation x@r*")
    assert "proved" in info, info
    info = w.click_graph_node("seq:w1", lambda t: "concat(w1@r0, w1@r1, dim=1)" in t and "x@r*" not in t,
                              "w1's relation concat(w1@r0, w1@r1, dim=1)")
    assert "proved" in info, info
    wait_until("the clicked node outlined", lambda: "gg-selected" in (
        w.graph_node("seq:w1").get_attribute("class") or ""), page=page)

    # Run: to the end, proved again.
    w.click("Run")
    w.wait_progress(lambda d, t: d == t == total, f"{total} / {total}")
    assert w.wait_banner(lambda t: "proved" in t, "'proved' after Run").strip() == "proved"
    wait_until("all relation rows", lambda: len(w.relation_rows()) >= 3, page=page)
    wait_until("Step disabled when done", w.button("Step").first.is_disabled, page=page)


def test_buggy_session_false_suggestions_and_invalid_hint(lab, page, notebook_ui):
    """A missing all-reduce: Run gets stuck; every suggestion is numerically false (its Accept button
    disabled); a bad hint errs."""
    name = lab.write_notebook("e2e_scratch_missing_allreduce.ipynb", [
        "import gg_notebook as gg\n"
        "from gg_notebook.examples import get\n"
        "s = gg.ProofSession(get('mlp').make(world_size=2, bug='missing_allreduce'))\n"
        "s.widget()",
    ])
    w = open_and_run_all(notebook_ui, name)
    w.wait_progress(lambda d, t: d == 0 and t > 0, "0 / N")

    w.click("Run")
    w.wait_banner(lambda t: t.strip().startswith("refuted"), "'refuted' after Run")
    accept = w.button("Accept")
    wait_until("an Accept button", lambda: accept.count() > 0, page=page)
    # The program is wrong: no clean relation holds, every suggestion is marked and cannot be accepted.
    wait_until("'numerically false' suggestions", lambda: "numerically false" in w.text(), page=page)
    assert all(accept.nth(k).is_disabled() for k in range(accept.count()))
    assert "cannot be accepted" in w.text()

    # An invalid hint: the error is shown inline, nothing else changes.
    rows_before = w.relation_rows()
    hint_row = w.root.locator(".widget-hbox").filter(
        has=widget_button(page, "Add hint")).last
    hint_input = hint_row.locator("input[type='text']").first
    hint_input.fill("sum(foo")
    hint_input.press("Tab")
    w.click("Add hint")
    wait_until("inline hint error 'cannot parse'", lambda: "cannot parse" in w.text(), page=page)
    assert w.relation_rows() == rows_before  # a refused hint changes nothing (and sends no update)


def test_accept_a_true_guess_is_assumed_and_retract_takes_it_back(lab, page, notebook_ui):
    """A correct program no lemma finishes: accepting the (numerically true) guess gives the "assumed"
    banner, not "proved"; Retract takes the assumption back and the proof is stuck again."""
    name = lab.write_notebook("e2e_scratch_erfcx.ipynb", [
        "import torch\n"
        "import gg_notebook as gg\n"
        "def seq(x):\n"
        "    return torch.special.erfcx(x)\n"
        "def tp(x):\n"
        "    return torch.exp(x * x) * torch.erfc(x)\n"
        "p = gg.Problem(seq, tp, [torch.randn(4, 6, dtype=torch.float64)], [gg.Shard(1)], 2,\n"
        "               expect=[gg.Shard(1)])\n"
        "s = gg.ProofSession(p)\n"
        "s.widget()",
    ])
    w = open_and_run_all(notebook_ui, name)
    w.wait_progress(lambda d, t: d == 0 and t > 0, "0 / N")
    w.click("Run")
    w.wait_banner(lambda t: t.strip().startswith("unknown") and "numbers agree" in t, "'unknown' (numbers agree) after Run")
    accept = w.button("Accept")
    wait_until("an Accept button", lambda: accept.count() > 0, page=page)
    row = accept.first.locator("xpath=..")
    suggestion = row.locator("code").first.inner_text().strip()
    assert suggestion and "numerically false" not in row.inner_text(), row.inner_text()
    accept.first.click()
    accepted = w.wait_row(lambda r: suggestion in r and "assumed" in r, f"with {suggestion!r} marked assumed")
    assert "assumed" in accepted
    wait_until("the accepted guess under 'Your relations'", lambda: "Your relations" in w.text(), page=page)
    # (the stuck operator was the last one: accepting its relation finishes the proof)
    banner = w.wait_banner(lambda t: t.strip().startswith("assumed"), "'assumed' after Accept")
    assert "holds only under 1 assumption" in banner and "not a proof" in banner, banner
    assert "gg-verdict-assumed" in (w.root.locator(".gg-verdict").first.get_attribute("class") or "")
    w.click("Retract")
    w.wait_banner(lambda t: t.strip().startswith("unknown"), "'unknown' after Retract")
    wait_until("no 'Your relations' after Retract", lambda: "Your relations" not in w.text(), page=page)
