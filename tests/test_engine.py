"""Engine behaviour users rely on: determinism, recorded steps, and useful culprits."""

from __future__ import annotations

import gg_notebook as gg
from gg_notebook import examples as E
from gg_notebook.lemmas import REGISTRY


def test_verify_is_deterministic():
    a = gg.verify(E.get("gpt_block").make(world_size=2))
    b = gg.verify(E.get("gpt_block").make(world_size=2))
    assert [s.pretty for s in a.steps] == [s.pretty for s in b.steps]
    assert [r.relation for r in a.relations] == [r.relation for r in b.relations]


def test_steps_record_operator_source_candidates_and_lemmas():
    r = gg.verify(E.get("mlp").make(world_size=2))
    assert r.status is gg.Status.PROVED
    calls = [s for s in r.steps if s.status != "input"]
    assert calls and all(s.source and "mlp.py" in s.source for s in calls)
    assert all(s.candidates for s in r.steps)
    chains = {name for s in r.steps for c in s.candidates for name in c.chain}
    used = chains & set(REGISTRY)
    assert {"concat-commute", "concat-contract"} <= used, chains
    # a row-parallel matmul is related as a sum of the shard products
    mm2 = [s for s in r.steps if s.op.startswith("aten.mm") and any(p.startswith("sum(") for p in s.pretty)]
    assert mm2, [s.pretty for s in r.steps]


def test_culprit_has_inputs_nearby_ops_and_hint():
    r = gg.verify(E.get("mlp").make(world_size=2, bug="missing_allreduce"))
    c = r.culprit
    assert c is not None and c.op.startswith("aten.add")
    assert any("sum(" in rel for rels in c.input_relations.values() for rel in rels)
    assert c.nearby and all(line.startswith("rank ") for line in c.nearby)
    assert "all-reduce missing" in c.detail
    assert c.code and "gg: output_bias" in c.code
    text = str(r)
    assert "culprit" in text and c.source in text
    assert r._repr_html_().startswith("<div")
    assert '"status": "refuted"' in r.to_json()
    assert r.counterexample is not None and r.counterexample.max_error > 0
