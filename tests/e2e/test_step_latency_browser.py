"""Opt-in measurement (``GG_E2E_BENCH=1``; not part of CI): a Step click on the TP8 x 8 GPT forward
(benchmarks/bench_widget_step.py's model, 674 operators) in a real JupyterLab, timed in the page from the
click to the progress label and the graph showing the next operator (kernel step, widget messages,
the graph's layout and drawing), in the neighbourhood view and in the full-model view. Prints the
medians; asserts the acceptance bound (0.2 s) loosely (0.4 s: a shared 2-core machine)."""

import os

import pytest

from test_session_widget_browser import shot, timed_step_click, wait_until, widget

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not os.environ.get("GG_E2E_BENCH"), reason="a measurement: GG_E2E_BENCH=1")]

CELL = """
import gg_notebook as gg, gg_notebook.examples as ex, time
t = time.perf_counter()
s = gg.ProofSession(ex.gpt.make(8, layers=8, hidden=768, heads=16, vocab=49152, seq=1536, batch=8, device="meta"))
s.run(max_steps=300)
print("PREP", time.perf_counter() - t)
s.widget()
"""


def test_tp8x8_step_in_browser(lab, page, notebook_ui, artifacts):
    page.set_viewport_size({"width": 1400, "height": 1800})
    name = lab.write_notebook("tmp_tp8x8.ipynb", [CELL])
    notebook_ui.open(name)
    notebook_ui.run_all()
    notebook_ui.wait_executed(timeout=300)
    e = widget(page, 0)
    e.root.wait_for(state="visible", timeout=60_000)
    wait_until("graph", lambda: (x := e.graph_view()) and x["current"], page=page, timeout=60)
    out = {}
    for mode in ("neighbourhood", "full"):
        e.root.locator(".gg-gw-mode").first.select_option(mode)
        page.wait_for_timeout(3000)
        ms = []
        for _ in range(15):
            wait_until("Step enabled", e.button("Step").first.is_enabled, page=page)
            ms.append(timed_step_click(e))
        ms.sort()
        out[mode] = (ms[len(ms) // 2], ms)
        v = e.graph_view()
        print(mode, "minFont", v["minFont"], "currentVisible", v["currentVisible"])
        shot(e, artifacts, f"tp8x8_{mode}")
    print("\n[tp8x8] step click, ms (median, all):",
          {k: (round(m), [round(x) for x in ms]) for k, (m, ms) in out.items()}, "screenshots:", artifacts)
    assert all(m < 400 for m, _ in out.values()), out
