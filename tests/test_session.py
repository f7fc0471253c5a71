"""`ProofSession`: stepping agrees with `gg.verify`, run(until=...), undo/reset, hints (accepted,
refused, assumed), suggestions, accept, and save/load as JSON."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import gg_notebook as gg
from gg_notebook import examples as E
from gg_notebook.examples import mlp as mlp_module


# --------------------------------------------------------------------------- helpers
def _state(s: gg.ProofSession):
    """Everything a refused action must leave unchanged."""
    return (
        {k: [(r.text, r.status) for r in v] for k, v in s.relations.items()},
        s.progress,
        json.dumps(s.actions),
        s.stuck.node if s.stuck else None,
        {k: [c.expr.id for c in v] for k, v in s.engine.user_relations.items()},
        [(st.node, st.status, tuple(st.pretty)) for st in s.history],
    )


def _file_line(source: str) -> tuple[str, str]:
    path, line = source.rsplit(":", 1)
    return path.rsplit("/", 1)[-1], line


def _line_of(fn, text: str) -> int:
    """Line number of the (single) source line of ``fn`` containing ``text``."""
    lines, start = inspect.getsourcelines(fn)
    hits = [start + i for i, line in enumerate(lines) if text in line]
    assert len(hits) == 1, hits
    return hits[0]


def _step_through(problem) -> gg.ProofSession:
    s = gg.ProofSession(problem)
    n = 0
    while s.step() is not None:
        n += 1
        assert n <= s.progress[1]
    assert s.done
    return s


def _compare_with_verify(problem):
    """A session stepped to the end gives `gg.verify`'s verdict (one verdict: the same concrete checks)."""
    expected = gg.verify(problem)
    exhaustive = gg.verify(problem, greedy=False)
    s = _step_through(problem)
    got = s.result()
    for ref in (expected, exhaustive):
        assert got.status is ref.status, (str(got), str(ref))
        assert got.headline() == ref.headline()
    assert [(r.name, r.relation, r.ok) for r in got.relations] == \
        [(r.name, r.relation, r.ok) for r in exhaustive.relations]
    # the very same steps, with the same relations, as the batch run without its greedy first pass
    assert [(st.node, st.status, st.pretty) for st in s.history] == \
        [(st.node, st.status, st.pretty) for st in exhaustive.steps]
    assert not got.assumptions
    return s, got, expected


# --------------------------------------------------------------------------- stepping == verify
def test_stepping_gpt_block_matches_verify():
    s, got, _ = _compare_with_verify(E.get("gpt_block").make(world_size=2))
    assert got.status is gg.Status.PROVED and got.headline() == "proved"
    assert s.progress == (s.progress[1], s.progress[1]) and s.stuck is None and s.current is None
    # every sequential tensor is related, and the output as Replicate()
    assert all(s.relations[n.name] for n in s.engine.seq.nodes)
    assert all(r.status == "proved" for rels in s.relations.values() for r in rels if r.status != "deferred")


def test_stepping_gpt_block_fwd_bwd_matches_verify():
    _, got, _ = _compare_with_verify(E.get("gpt_block_fwd_bwd").make(world_size=2))
    assert got.status is gg.Status.PROVED
    assert len(got.relations) == 15 and all(r.ok for r in got.relations)


@pytest.mark.parametrize("name,bug", [("gpt_block", "missing_allreduce"),
                                      ("gpt_block_fwd_bwd", "unreduced_replicated_grad")])
def test_stepping_buggy_example_finds_the_same_culprit(name, bug):
    ex = E.get(name)
    problem = ex.make(world_size=2, bug=bug)
    s, got, expected = _compare_with_verify(problem)
    # one verdict: refuted by the same concrete check as verify, with the same counterexample
    assert got.status is gg.Status.REFUTED and expected.status is gg.Status.REFUTED
    assert (got.culprit.op, got.culprit.node, got.culprit.source) == \
        (expected.culprit.op, expected.culprit.node, expected.culprit.source)
    assert str(got.counterexample) == str(expected.counterexample)
    spec = ex.bugs[bug]
    assert got.culprit.op.startswith(spec.culprit_op + ".")
    # without the concrete check, the symbolic judgement says only where the proof is stuck
    sym = s.result(concrete=False)
    assert sym.status is gg.Status.UNKNOWN and sym.culprit.node == got.culprit.node
    assert _file_line(got.culprit.source) == _file_line(E.marker_line(problem.sequential, spec.culprit_marker))
    # the session's stuck step is the culprit, and stepping further does nothing
    assert s.stuck is not None and s.stuck.node == got.culprit.node and s.stuck.detail
    assert s.step() is None


# --------------------------------------------------------------------------- run(until=...)
def test_run_until_source_line_stops_before_its_first_operator():
    s = gg.ProofSession(E.get("mlp").make(world_size=2))
    line = _line_of(mlp_module.mlp, "y = h @ w2")
    steps = s.run(until=f"mlp.py:{line}")
    assert steps and not s.done
    cur = s.current
    assert _file_line(cur.source) == ("mlp.py", str(line))
    # nothing at that line has been executed yet
    assert all(not (st.source or "").endswith(f"mlp.py:{line}") for st in s.history)
    assert cur.name not in s.relations
    # the marker line (absolute "path:LINE", as marker_line gives it) works too
    marker = E.marker_line(mlp_module.mlp, "output_bias")
    s.run(until=marker)
    assert _file_line(s.current.source) == _file_line(marker)
    assert s.current.target.startswith("aten.add") and s.current.name not in s.relations
    assert s.progress == (s.progress[1] - 1, s.progress[1])
    s.run()
    assert s.done and s.result().status is gg.Status.PROVED


def test_run_until_op_name_stops_before_first_bmm():
    s = gg.ProofSession(E.get("gpt_block").make(world_size=2))
    first_bmm = next(i for i, n in enumerate(s.engine.seq.nodes) if n.target.startswith("aten.bmm"))
    steps = s.run(until="aten.bmm")
    assert len(steps) == first_bmm and s.progress[0] == first_bmm
    assert s.current.target.startswith("aten.bmm") and s.current.name not in s.relations
    assert not any(st.op.startswith("aten.bmm") for st in s.history)
    # continuing to the next bmm executes this one first
    s.run(until="aten.bmm")
    assert s.current.target.startswith("aten.bmm")
    assert sum(st.op.startswith("aten.bmm") for st in s.history) == 1


def test_run_until_stops_at_stuck_operator():
    s = gg.ProofSession(E.get("mlp").make(world_size=2, bug="missing_allreduce"))
    with pytest.raises(ValueError, match="no operator ahead matches 'aten.softmax'.*nothing was run"):
        s.run(until="aten.softmax")  # never matches: refused, not silently run to the end
    assert s.progress[0] == 0 and not s.actions
    s.run(until="aten.add")  # runs to the first add (no stop on an operator already reached)
    assert s.current.target.startswith("aten.add") and s.stuck is None
    s.run(until="aten.add")  # past it, stops before the next add (the last operator)
    assert s.current.name == "add_1" and s.progress == (13, 14)
    with pytest.raises(ValueError, match="it is the next operator already: use Step"):
        s.run(until="aten.add")
    s.step()
    assert s.stuck is not None and s.done and s.stuck.op.startswith("aten.add")


# --------------------------------------------------------------------------- undo / reset
def test_undo_restores_progress_and_relations():
    s = gg.ProofSession(E.get("mlp").make(world_size=2))
    s.run(until="aten.mm")
    s.step()  # the first mm
    before = ({k: list(v) for k, v in s.relations.items()}, s.progress)
    st = s.step()
    assert st is not None and st.node in s.relations
    assert s.progress[0] == before[1][0] + 1
    assert s.undo() is st
    assert ({k: list(v) for k, v in s.relations.items()}, s.progress) == before
    # undo all the way back, then forward again: the same proof
    while s.undo() is not None:
        pass
    assert s.progress[0] == 0 and not s.relations and not s.history
    s.run()
    assert s.result().status is gg.Status.PROVED


def test_undo_of_the_stuck_step_unsticks():
    s = gg.ProofSession(E.get("mlp").make(world_size=2, bug="missing_allreduce"))
    s.run()
    assert s.stuck is not None
    n = s.progress[0]
    s.undo()
    assert s.stuck is None and not s.done and s.progress[0] == n - 1
    assert s.current.name == "add_1"
    s.step()
    assert s.stuck is not None and s.stuck.node == "add_1"


def test_reset_starts_over_without_recapturing(monkeypatch):
    s = gg.ProofSession(E.get("gpt_block").make(world_size=2, bug="missing_allreduce"))
    s.run()
    first = s.result()
    first_steps = [list(st.pretty) for st in first.steps]  # (Result.steps aliases the live steps)
    # as if the programs could not be simulated: guesses are not checked (here all are false)
    monkeypatch.setattr(s, "check_numerically", lambda *a, **k: None)
    s.accept(0)  # an accepted guess, dropped by reset
    seq, index = s.engine.seq, s.engine.index

    def recapture(*a, **k):
        raise AssertionError("reset captured the programs again")

    import importlib

    import gg_notebook.capture as C

    monkeypatch.setattr(importlib.import_module("gg_notebook.verify"), "prepare", recapture)
    monkeypatch.setattr(C, "capture_and_lower", recapture)
    s.reset()
    assert s.engine.seq is seq and s.engine.index is index  # the same capture
    assert s.progress == (0, len(seq.nodes)) and not s.relations and not s.history and s.stuck is None
    assert not s.engine.user_relations
    s.run()
    again = s.result()
    assert again.headline() == first.headline() and not again.assumptions
    assert [st.pretty for st in again.steps] == first_steps


# --------------------------------------------------------------------------- refused hints
@pytest.fixture(scope="module")
def stuck_mlp():
    """An mlp[missing_allreduce] session stuck at the output bias add (shared: refusals change nothing)."""
    s = gg.ProofSession(E.get("mlp").make(world_size=2, bug="missing_allreduce"))
    s.run()
    assert s.stuck is not None and s.stuck.node == "add_1"
    return s


def _refused(s, tensor, expr, *needles):
    before = _state(s)
    with pytest.raises(ValueError) as info:
        s.hint(tensor, expr)
    assert isinstance(info.value, gg.HintError)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, msg
    assert _state(s) == before, f"refused hint {expr!r} changed the session"
    return msg


def test_hint_unknown_sequential_tensor(stuck_mlp):
    _refused(stuck_mlp, "no_such_tensor", "add_1@r0", "no_such_tensor")


def test_hint_unknown_rank_tensor_is_named(stuck_mlp):
    _refused(stuck_mlp, "add_1", "sum(ghost@r0, ghost@r1)", "ghost")
    _refused(stuck_mlp, "add_1", "add_1@r7", "add_1@r7")  # no rank 7
    _refused(stuck_mlp, "add_1", lambda t: t["ghost", 0] + t["ghost", 1], "ghost")


def test_hint_shape_mismatch_names_both_shapes(stuck_mlp):
    # mm@r0 is [16, 32]; add_1 is [2, 8, 16]
    _refused(stuck_mlp, "add_1", "mm@r0", "(16, 32)", "(2, 8, 16)")
    _refused(stuck_mlp, "add_1", lambda t: t["mm", 0], "(16, 32)", "(2, 8, 16)")


@pytest.mark.parametrize("expr", [
    "add_1@r0 + 1",
    "exp(add_1@r0)",
    "add_1@r0 * 2",
    "sum(add_1@r0, add_1@r1) / 2",
    "add_1@r0[:, ::2]",
    lambda t: torch.exp(t["add_1", 0]),
    lambda t: t["add_1", 0] + 1,
    lambda t: t["add_1", 0].exp(),
    lambda t: "add_1@r0",  # not built from the accessor
])
def test_hint_non_clean_is_refused(stuck_mlp, expr):
    _refused(stuck_mlp, "add_1", expr)


def test_hint_syntax_error_is_refused(stuck_mlp):
    _refused(stuck_mlp, "add_1", "concat(add_1@r0,", "cannot parse")


# --------------------------------------------------------------------------- accepted hints
def _cumsum_problem() -> gg.Problem:
    """A distributed cumsum along the sharded dim (local cumsum + the totals of earlier ranks).

    Correct, but no lemma knows cumsum, so the proof gets stuck there; everything after it is
    provable once the cumsum's relation is given."""

    from test_assumed import cumsum_seq as seq, cumsum_tp as tp  # the same program, written once

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64, generator=g)
    w = torch.randn(8, 3, dtype=torch.float64, generator=g)
    return gg.Problem(seq, tp, [x, w], [gg.Shard(1), gg.Shard(0)], 2, expect=[gg.Replicate()], name="cumsum_tp")


@pytest.fixture(scope="module")
def cumsum_problem():
    return _cumsum_problem()


def _offset_add(s, rank):
    """The name of rank ``rank``'s `c + offset` tensor (the last add before the mul)."""
    g = s.engine.index.graphs[rank]
    return [n.name for n in g.nodes if n.target.startswith("aten.add") and tuple(n.shape) == (4, 4)][-1]


def test_cumsum_distributed_program_is_correct_numerically(cumsum_problem):
    p = cumsum_problem
    x, w = p.inputs
    c = torch.cumsum(x, 1)
    cs = [torch.cumsum(xr, 1) for xr in x.chunk(2, 1)]
    assert torch.allclose(torch.cat([cs[0], cs[1] + x[:, :4].sum(1, keepdim=True)], 1), c)


def test_hint_on_stuck_tensor_is_an_assumption_and_never_plainly_proved(cumsum_problem):
    s = gg.ProofSession(cumsum_problem)
    s.run()
    assert s.stuck is not None and s.stuck.op.startswith("aten.cumsum")
    assert gg.verify(cumsum_problem).status is gg.Status.UNKNOWN
    text = f"concat({_offset_add(s, 0)}@r0, {_offset_add(s, 1)}@r1, dim=1)"
    view = s.hint("cumsum", text)
    assert view.status == "assumed" and view.text == text
    assert s.stuck is None and not s.done  # unstuck
    assert any(r.text == text and r.status == "assumed" for r in s.relations["cumsum"])
    s.run()
    assert s.done and s.stuck is None
    res = s.result()
    assert f"cumsum: {text}" in res.assumptions
    # every output is related, but only under the assumption: its own status, never PROVED
    assert res.status is gg.Status.ASSUMED and not res.proved and res.culprit is None
    assert res.headline() == "assumed: holds only under 1 assumption (not a proof)"
    assert "assumption" in str(res) and "assumption" in res.to_json()
    assert res.to_dict()["status"] == "assumed" and res.to_dict()["headline"].startswith("assumed:")
    assert res.certificate()["status"] == "assumed"
    assert "#bc4c00" in res._repr_html_() and "#1a7f37" not in res._repr_html_()
    # relations derived from the assumption are assumptions too, never proved
    assert all(r.status == "assumed" for r in s.relations["mul"])


def test_callable_hint_on_stuck_tensor(cumsum_problem):
    s = gg.ProofSession(cumsum_problem)
    s.run()
    a0, a1 = _offset_add(s, 0), _offset_add(s, 1)
    view = s.hint("cumsum", lambda t: torch.cat([t[a0, 0], t[a1, 1]], dim=1))
    # printed under the first name holding each value (rank 0's offset is zero: its sum is its cumsum)
    idx = s.engine.index
    shown = [s.engine.show(idx.ref(idx.dval_of(r, next(n for n in idx.graphs[r].nodes if n.name == a))))
             for r, a in ((0, a0), (1, a1))]
    assert view.status == "assumed" and view.text == f"concat({shown[0]}, {shown[1]}, dim=1)"
    s.run()
    assert s.result().status is gg.Status.ASSUMED and s.result().headline().startswith("assumed:")


def test_wrong_guess_is_marked_and_cannot_be_accepted(cumsum_problem):
    s = gg.ProofSession(cumsum_problem)
    s.run()
    # the ranks' local cumsums, without the offset: a clean guess of the right shape, but wrong
    wrong = "concat(cumsum@r0, cumsum@r1, dim=1)"
    sugg = s.suggestions()
    k = next(i for i, x in enumerate(sugg) if x.text == wrong)
    assert not sugg[k].acceptable and "numerically false" in sugg[k].numerically_false
    assert "cannot be accepted" in str(sugg[k])
    before = (s.progress, s.relations, s.stuck.node, list(s.actions), s.user_relations)
    with pytest.raises(ValueError, match=r"cannot be accepted: it is numerically false: on random input seed \d+, "
                                         r"cumsum is [-0-9.e]+ at flat index \d+ but the suggestion gives [-0-9.e]+"):
        s.accept(k)
    assert (s.progress, s.relations, s.stuck.node, list(s.actions), s.user_relations) == before
    # typing it as a hint is refused the same way
    with pytest.raises(ValueError, match="numerically false"):
        s.hint("cumsum", wrong)
    assert s.result().status is gg.Status.UNKNOWN


@pytest.mark.skipif(not hasattr(gg.ProofSession, "check_numerically"),
                    reason="this session does not check hints on random inputs")
def test_numerically_false_hint_is_refused(cumsum_problem):
    s = gg.ProofSession(cumsum_problem)
    s.run()
    _refused(s, "cumsum", "concat(cumsum@r0, cumsum@r1, dim=1)", "numerically false", "cumsum")


def test_callable_hint_equal_to_a_derived_relation_is_proved():
    s = gg.ProofSession(E.get("mlp").make(world_size=2))
    s.run(until="aten.add")  # past the first mm
    assert "mm" in s.relations
    view = s.hint("mm", lambda t: torch.cat([t["mm", 0], t["mm", 1]], dim=1))
    assert view.status == "proved" and view.text == "concat(mm@r0, mm@r1, dim=1)"
    assert s.actions[-1]["op"] == "relation" and s.actions[-1]["proved"] is True
    s.run()
    res = s.result()
    assert res.headline() == "proved" and not res.assumptions


# --------------------------------------------------------------------------- suggestions / accept
def test_suggestions_for_missing_allreduce_include_partial_sum():
    s = gg.ProofSession(E.get("mlp").make(world_size=2, bug="missing_allreduce"))
    s.run()
    sugg = s.suggestions()
    assert sugg and all(x.node == "add_1" and x.reason for x in sugg)
    partial = [x for x in sugg if x.kind == "partial"]
    assert partial, [str(x) for x in sugg]
    assert partial[0].text == "sum(add_1@r0, add_1@r1)" and "summed" in partial[0].reason
    assert "all-reduce" in partial[0].reason and not partial[0].proved
    assert "guess" in str(partial[0])
    # the program is wrong: the partials (bias added on every rank) are numerically false
    assert not partial[0].acceptable and "add_1 is" in partial[0].numerically_false
    # acceptable ones first, then by score
    ok = [x.acceptable for x in sugg]
    assert ok == sorted(ok, reverse=True)
    for group in (True, False):
        scores = [x.score for x in sugg if x.acceptable is group]
        assert scores == sorted(scores, reverse=True)
    # an explicit node works too, and nothing was changed by asking
    assert [x.text for x in s.suggestions("add_1")] == [x.text for x in sugg]


def test_accept_guess_marks_an_assumption(monkeypatch):
    s = gg.ProofSession(E.get("mlp").make(world_size=2, bug="missing_allreduce"))
    s.run()
    # as if the programs could not be simulated: the (false) guess cannot be checked, so it is accepted
    monkeypatch.setattr(s, "check_numerically", lambda *a, **k: None)
    sugg = s.suggestions()
    k = next(i for i, x in enumerate(sugg) if x.kind == "partial")
    view = s.accept(k)
    assert view.status == "assumed" and view.text == sugg[k].text
    assert s.stuck is None and s.done  # the stuck op was the last one
    res = s.result()
    assert f"add_1: {sugg[k].text}" in res.assumptions
    assert res.status is not gg.Status.PROVED  # partials are not the replicated output
    assert s.user_relations[0].origin == "accept" and s.actions[-1]["origin"] == "accept"
    with pytest.raises(ValueError, match="suggestions"):
        s.accept(99)


# --------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path, cumsum_problem):
    s = gg.ProofSession(cumsum_problem)
    s.run()
    s.step()  # a no-op when stuck: not recorded
    a0, a1 = _offset_add(s, 0), _offset_add(s, 1)
    s.hint("cumsum", lambda t: torch.cat([t[a0, 0], t[a1, 1]], dim=1))
    s.step()
    path = tmp_path / "session.json"
    s.save(path)
    data = json.loads(path.read_text())  # plain JSON
    assert data["format"] == "gg_notebook.session/1" and data["world_size"] == 2
    assert all(isinstance(a, dict) for a in data["actions"])

    t = gg.ProofSession.load(path, cumsum_problem)
    assert t.relations == s.relations
    assert t.progress == s.progress
    s.run()
    t.run()
    assert t.relations == s.relations
    assert t.result().headline() == s.result().headline()
    assert t.result().assumptions == s.result().assumptions


def test_save_load_gpt_block_partial_run(tmp_path):
    p = E.get("gpt_block").make(world_size=2)
    s = gg.ProofSession(p)
    s.run(until="aten.bmm")
    s.step()
    s.undo()
    s.step()
    s.step()
    path = tmp_path / "gpt.json"
    s.save(path)
    t = gg.ProofSession.load(path, p)
    assert t.relations == s.relations and t.progress == s.progress
    t.run()
    assert t.result().status is gg.Status.PROVED


def test_load_rejects_wrong_format_and_world_size(tmp_path, cumsum_problem):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something/else", "world_size": 2, "actions": []}))
    with pytest.raises(ValueError, match="not a gg_notebook session file"):
        gg.ProofSession.load(bad, cumsum_problem)

    s = gg.ProofSession(E.get("mlp").make(world_size=4))
    s.step()
    p4 = tmp_path / "w4.json"
    s.save(p4)
    with pytest.raises(ValueError, match="world_size=4") as info:
        gg.ProofSession.load(p4, cumsum_problem)
    assert "world_size=2" in str(info.value)

    garbage = tmp_path / "pickled.json"
    garbage.write_bytes(b"\x80\x04\x95not json")
    with pytest.raises(ValueError):
        gg.ProofSession.load(garbage, cumsum_problem)


def test_result_is_a_snapshot(monkeypatch):
    s = gg.ProofSession(E.get("mlp").make(world_size=2, bug="missing_allreduce"))
    monkeypatch.setattr(s, "check_numerically", lambda *a, **k: None)  # (the guess is false)
    s.run(until="aten.add")
    early = s.result()
    n = len(early.steps)
    s.run()
    stuck = s.result()
    s.accept(0)  # a guess: becomes an assumption and changes the live steps
    assert len(early.steps) == n
    assert stuck.steps[-1].status == "stuck" and stuck.steps[-1].pretty == []


# --------------------------------------------------------------------------- misc state
def test_context_history_and_listeners():
    s = gg.ProofSession(E.get("mlp").make(world_size=2, bug="missing_allreduce"))
    seen = []
    s.on_change(seen.append)
    s.step()
    s.run()
    ctx = s.context()
    assert [c for c in ctx if c[2]] and "gg: output_bias" in next(c[1] for c in ctx if c[2])
    assert len(s.history) == s.progress[0] and s.history[-1].stuck
    assert seen == ["step", "run"]
    assert "stuck at add_1" in repr(s)


# --------------------------------------------------------------------------- issue 11 (part A)
def test_run_progress_cancel_goto_and_restore(tmp_path):
    s = gg.ProofSession(E.get("mlp").make(world_size=2))
    seen = []
    steps = s.run(progress=lambda k: seen.append(k) or k >= 3)  # a cancel after 3 operators
    assert len(steps) == 3 and seen == [1, 2, 3] and s.actions[-1] == {"op": "run", "until": None, "steps": 3,
                                                                         "cancelled": True}
    s.goto(1)
    assert s.progress[0] == 1
    s.goto(6)
    assert s.progress[0] == 6
    s.save(tmp_path / "a.json")
    t = gg.ProofSession.load(tmp_path / "a.json", s.problem)
    assert t.progress == s.progress and t.relations == s.relations
    s.run()
    assert s.result().proved
    s.restore(tmp_path / "a.json")  # back to the saved state, in the same session
    assert s.progress == t.progress and s.relations == t.relations and not s.done


def test_verdict_follows_an_undone_assumption(cumsum_problem):
    """One verdict: a stuck correct program is unknown (the numbers agree); accepting a true guess makes
    it assumed; undoing the accept makes it unknown again (the verdict is recomputed, not stale)."""
    s = gg.ProofSession(cumsum_problem)
    s.run()
    r = s.result()
    assert r.status is gg.Status.UNKNOWN and any(f.kind == "numbers-agree" for f in r.findings)
    assert r.status is gg.verify(cumsum_problem).status
    s.hint("cumsum", f"concat({_offset_add(s, 0)}@r0, {_offset_add(s, 1)}@r1, dim=1)")
    s.run()
    assert s.result().status is gg.Status.ASSUMED
    while s.user_relations:
        s.undo()
    assert s.result().status is gg.Status.UNKNOWN and s.stuck is not None


def test_run_until_a_node_name_as_the_widget_shows_it():
    s = gg.ProofSession(E.get("mlp").make(world_size=2))
    s.run(until="spec:mm_1")
    assert s.current.name == "mm_1"
