"""End-to-end (issue 11, part A): the session widget a debugger trusts, in a real JupyterLab.

One notebook (one kernel, one page: browser tests are the slow ones) holds four widgets:

* A: head-parallel attention whose ranks take the softmax over the wrong axis, defined in a notebook
  cell. Run: progress shows within 0.5 s; the banner says refuted with the counterexample (values,
  error, where); the side-by-side view shows the specification's softmax next to the ranks' with
  their dims, under cell-aware source names ("cell [2], line ..."); the (numerically false)
  suggestion cannot be accepted, not even by clicking its disabled button.
* B: the fixed program. "Run to" a target matching nothing says so (submitted with Enter, nothing
  runs); Run says proved; Save, the history slider scrubbed back to 0, Load brings the state back.
* C: a correct program no lemma finishes: unknown ("the numbers agree"); Accept a true guess gives
  "assumed"; Undo takes the assumption back and the verdict follows.
* D: a long run (each operator slowed down): the busy indicator shows, Cancel stops it part-way.

Screenshots of the main states are saved in the test's artifacts directory (``$GG_E2E_ARTIFACTS`` or
the test's tmp dir; never committed). Button labels are checked not to be clipped.
"""

from __future__ import annotations

import re
import time

import pytest

from test_quickstart_browser import PROGRESS, WidgetUI, wait_until, widget_button

pytestmark = pytest.mark.timeout(240)

PROGRAMS = '''
import math, functools, time
import torch, torch.distributed as dist
import gg_notebook as gg
HEADS = 4

def attention(x, wq, wk, wv, wo):
    B, S, H = x.shape
    D = H // HEADS
    q = (x @ wq).view(B, S, HEADS, D).transpose(1, 2)
    k = (x @ wk).view(B, S, HEADS, D).transpose(1, 2)
    v = (x @ wv).view(B, S, HEADS, D).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v).transpose(1, 2).reshape(B, S, H) @ wo

def attention_tp(x, wq, wk, wv, wo, softmax_dim=2):
    B, S, _ = x.shape
    heads = HEADS // dist.get_world_size()
    D = wq.shape[1] // heads
    q = (x @ wq).view(B, S, heads, D).transpose(1, 2)
    k = (x @ wk).view(B, S, heads, D).transpose(1, 2)
    v = (x @ wv).view(B, S, heads, D).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    probs = torch.softmax(scores, dim=softmax_dim)
    out = (probs @ v).transpose(1, 2).reshape(B, S, heads * D) @ wo
    dist.all_reduce(out)
    return out

def problem(distributed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 16, dtype=torch.float64, generator=g)
    ws = [torch.randn(16, 16, dtype=torch.float64, generator=g) * 0.25 for _ in range(4)]
    return gg.Problem(attention, distributed, [x, *ws],
                      [gg.Replicate(), gg.Shard(1), gg.Shard(1), gg.Shard(1), gg.Shard(0)], 2,
                      expect=[gg.Replicate()], name="attention_tp")
'''

CELLS = [
    PROGRAMS,
    "a = gg.ProofSession(problem(attention_tp))\na.widget()",
    "b = gg.ProofSession(problem(functools.partial(attention_tp, softmax_dim=-1)))\nb.widget()",
    "def erfcx_tp(x):\n"
    "    return torch.exp(x * x) * torch.erfc(x)\n"
    "c = gg.ProofSession(gg.Problem(torch.special.erfcx, erfcx_tp, [torch.randn(4, 6, dtype=torch.float64)],\n"
    "                               [gg.Shard(1)], 2, expect=[gg.Shard(1)]))\n"
    "c.widget()",
    "from gg_notebook.examples import get\n"
    "d = gg.ProofSession(get('gpt_block').make(world_size=2))\n"
    "_step = d.engine.step\n"
    "def _slow_step():\n"
    "    time.sleep(0.1)  # a long run: 82 operators, about 8 s\n"
    "    return _step()\n"
    "d.engine.step = _slow_step\n"
    "d.widget()",
]


def widget(page, k: int) -> WidgetUI:
    w = WidgetUI(page)
    w.root = page.locator(".jp-OutputArea-output").filter(has=widget_button(page, "Step")).nth(k)
    return w


def shot(w: WidgetUI, artifacts, name: str) -> None:
    w.root.screenshot(path=str(artifacts / f"{name}.png"), timeout=15_000)


def clipped_buttons(w: WidgetUI) -> list[str]:
    """Labels of visible buttons whose text overflows the button, or that a container cuts off."""
    return w.root.evaluate("""el => [...el.querySelectorAll('button')]
        .filter(b => {
            if (b.offsetParent === null) return false;
            if (b.scrollWidth > b.clientWidth + 1) return true;
            const r = b.getBoundingClientRect();
            for (let p = b.parentElement; p && p !== el.parentElement; p = p.parentElement) {
                const cs = getComputedStyle(p);
                if (cs.overflowX === 'visible') continue;
                const q = p.getBoundingClientRect();
                if (r.right > q.right + 1 || r.left < q.left - 1) return true;
            }
            return false;
        })
        .map(b => b.textContent.trim())""")


def test_session_widget_one_verdict_side_by_side_accept_undo_cancel(lab, page, notebook_ui, artifacts):
    page.set_viewport_size({"width": 1400, "height": 1800})  # tall: whole widgets in the screenshots
    name = lab.write_notebook("e2e_session_widget.ipynb", CELLS)
    notebook_ui.open(name)
    notebook_ui.run_all()
    notebook_ui.wait_executed(timeout=120)
    a, b, c, d = (widget(page, k) for k in range(4))
    a.wait_rendered()
    d.root.wait_for(state="visible", timeout=30_000)
    assert clipped_buttons(a) == [], clipped_buttons(a)

    # ---- A: the buggy program. Progress within 0.5 s of the click, then the verdict.
    run = a.button("Run").first
    wait_until("Run enabled", run.is_enabled, page=page)
    # timed in the page: from the click event to the first DOM change showing progress (a MutationObserver)
    a.root.evaluate("""el => {
        window.__gg = {};
        el.addEventListener('click', () => { window.__gg.click = window.__gg.click || performance.now(); }, true);
        const seen = () => el.querySelector('.gg-busy-on, .gg-verdict');
        new MutationObserver((_, obs) => {
            if (window.__gg.click && seen()) { window.__gg.shown = performance.now(); obs.disconnect(); }
        }).observe(el, {subtree: true, childList: true, characterData: true, attributes: true});
    }""")
    run.click()
    page.wait_for_function("() => window.__gg && window.__gg.shown", polling="raf", timeout=10_000)
    first_progress = page.evaluate("() => (window.__gg.shown - window.__gg.click) / 1000")
    banner = a.wait_banner(lambda t: t.strip().startswith("refuted"), "'refuted'", timeout=60)
    cx = a.root.locator(".gg-counterexample").first.inner_text()
    assert re.search(r"seed \d+", cx) and "the specification gives" in cx and "the ranks give" in cx, cx
    assert "max error" in cx and "at index" in cx, cx
    assert "where:" in banner and "cell [" in banner, banner  # where, as a notebook cell
    shot(a, artifacts, "a_refuted")
    assert clipped_buttons(a) == [], clipped_buttons(a)
    side = a.root.locator(".gg-side-by-side").first.inner_text()
    assert "specification" in side and "ranks 0, 1" in side, side
    assert "_softmax(div, 3, False)" in side and "_softmax(div, 2, False)" in side, side
    assert "cell [" in side and "ipykernel_" not in a.text(), side
    assert "probs (spec:_softmax)" in a.text()
    # the explanation once (in the banner), not repeated in the panels
    why = a.root.locator(".gg-why").first.inner_text().strip()
    assert a.text().count(why[:60]) == 1
    # an accepted false guess is impossible: disabled, and a forced click changes nothing
    accept = a.button("Accept")
    wait_until("suggestions", lambda: accept.count() > 0, page=page)
    assert "numerically false" in a.text() and all(accept.nth(k).is_disabled() for k in range(accept.count()))
    accept.first.click(force=True)
    page.wait_for_timeout(500)
    assert "Your relations" not in a.text() and a.banner().strip().startswith("refuted")

    # ---- B: the fixed program. "Run to" a target matching nothing (Enter submits) says so.
    b.wait_progress(lambda d_, t: d_ == 0 and t > 0, "0 / N")
    run_to = b.root.locator("input[placeholder^='file.py:LINE']").first
    run_to.fill("aten.no_such_op")
    run_to.press("Enter")
    wait_until("'no operator ahead matches'", lambda: "no operator ahead matches" in b.text(), page=page)
    assert b.progress()[0] == 0
    b.click("Run")
    assert b.wait_banner(lambda t: t.strip().startswith("proved"), "'proved'", timeout=60).strip() == "proved"
    shot(b, artifacts, "b_proved")
    total = b.progress()[1]
    # Save, scrub the history back (keyboard on the slider), Load: the saved state returns
    b.click("Save")
    wait_until("'saved'", lambda: "saved" in b.text(), page=page)
    handle = b.root.locator(".noUi-handle").first
    handle.focus()
    handle.press("Home")
    b.wait_progress(lambda d_, t: d_ == 0, "0 after scrubbing the history back")
    wait_until("no verdict after scrubbing back", lambda: b.banner() == "", page=page)
    b.click("Load")
    b.wait_progress(lambda d_, t: d_ == t == total, "the saved state after Load")
    b.wait_banner(lambda t: t.strip() == "proved", "'proved' after Load")

    # ---- C: correct but unproved: unknown; accept a true guess: assumed; Undo: unknown again.
    c.click("Run")
    c.wait_banner(lambda t: t.strip().startswith("unknown") and "numbers agree" in t, "'unknown, numbers agree'",
                  timeout=60)
    accept = c.button("Accept")
    wait_until("an Accept button", lambda: accept.count() > 0, page=page)
    assert "numeric match" in c.text()
    accept.first.click()
    c.wait_banner(lambda t: t.strip().startswith("assumed"), "'assumed' after Accept")
    wait_until("'Your relations'", lambda: "Your relations" in c.text(), page=page)
    shot(c, artifacts, "c_assumed")
    assert clipped_buttons(c) == [], clipped_buttons(c)  # Accept / Retract / Add hint included
    c.click("Undo")
    c.wait_banner(lambda t: t.strip().startswith("unknown"), "'unknown' after Undo")
    wait_until("no 'Your relations' after Undo", lambda: "Your relations" not in c.text(), page=page)

    # ---- D: a long run shows that it is busy, and Cancel stops it.
    d.click("Run")
    wait_until("the busy indicator", lambda: "running..." in d.text(), timeout=10, page=page)
    shot(d, artifacts, "d_busy")
    d.click("Cancel")
    wait_until("the run cancelled", lambda: d.root.locator(".gg-busy-on").count() == 0, timeout=20, page=page)
    done, total = d.wait_progress(lambda d_, t: 0 < d_ < t, "part-way")
    page.wait_for_timeout(400)
    assert d.progress() == (done, total) and not d.banner()  # stopped: no verdict yet
    assert not d.button("Step").first.is_disabled()
    print(f"\n[e2e] first Run progress after {first_progress:.3f} s; cancelled at {done}/{total}")
    assert first_progress < 0.5, first_progress
