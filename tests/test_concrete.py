"""Concrete execution: simulator vs real gloo ranks, refutation, numeric suggestions, hint checks,
certificates and the bitwise exactness mode."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import gg_notebook as gg
from gg_notebook import examples as E
from gg_notebook.concrete.compare import close
from gg_notebook.concrete.simulate import simulate
from gg_notebook.verify import prepare

_GLOO_SCRIPT = """
import dataclasses, sys, torch
from gg_notebook import examples as E
from gg_notebook.runners.gloo import run_gloo
name, path = sys.argv[1], sys.argv[2]
inputs = torch.load(path)
original = E.get(name).make(world_size=E.get(name).world_sizes[0])
inputs = [t.requires_grad_(o.requires_grad) if o.requires_grad else t for t, o in zip(inputs, original.inputs)]
problem = dataclasses.replace(original, inputs=tuple(inputs))
torch.save(run_gloo(problem), path + ".out")
"""


@pytest.mark.parametrize("name", sorted(n for n in E.EXAMPLES if not n.startswith("gpt")) + ["gpt_block_fwd_bwd"])
def test_simulator_agrees_with_gloo_processes(name, tmp_path):
    """The one-process simulator against real gloo ranks (run in a fresh interpreter, so that the
    forked gloo workers never inherit this test process's state)."""
    import subprocess
    import sys

    problem = E.get(name).make(world_size=E.get(name).world_sizes[0])
    engine, _ = prepare(problem)
    sim = simulate(problem, engine.seq, engine.index.graphs, seed=5)
    path = tmp_path / "inputs.pt"
    torch.save([t.detach() for t in sim.inputs], path)
    proc = subprocess.run([sys.executable, "-c", _GLOO_SCRIPT, name, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    real = torch.load(str(path) + ".out")
    for r, g in enumerate(engine.index.graphs):
        for k, out in enumerate(g.outputs):
            assert close(real[r][k].to(sim.ranks[r][out.name].dtype), sim.ranks[r][out.name]), (name, r, k)


# every seeded bug: refuted with a counterexample (inputs, a nonzero error) at its line, at every registered
# world size: tests/test_verify_examples.py


def test_correct_program_without_lemma_is_unknown_and_numbers_agree():
    def seq(x):
        return torch.special.erfcx(x)

    def dist(x):
        return torch.exp(x * x) * torch.erfc(x)

    r = gg.verify(gg.Problem(seq, dist, (torch.randn(4, 6, dtype=torch.float64),), (gg.Shard(1),), 2,
                             expect=(gg.Shard(1),)))
    assert r.status is gg.Status.UNKNOWN
    assert r.counterexample is None
    msgs = [f.message for f in r.findings if f.kind == "numbers-agree"]
    assert msgs and "looks correct" in msgs[0] and "special_erfcx" in msgs[0]


TRUE_RELATION_CASES = [
    ("mlp", "concat-contract"),
    ("sp_layernorm_mlp", "concat-contract"),
    ("sp_layernorm_mlp", "concat-commute"),
    ("gpt_block", "concat-contract"),
    ("vocab_embedding", "vocab-embedding"),
]


@pytest.mark.parametrize("name,lemma", TRUE_RELATION_CASES)
def test_true_relation_is_among_the_top_three_suggestions(name, lemma):
    problem = E.get(name).make(world_size=2)
    full = gg.ProofSession(problem)
    full.run()
    crippled = gg.ProofSession(problem)
    crippled.engine.disabled = {lemma}
    crippled.run()
    stuck = crippled.stuck
    assert stuck is not None, "disabling the lemma should make the proof stuck"
    truth = {r.text for r in full.relations[stuck.node] if r.status == "proved"}
    top3 = [s.text for s in crippled.suggestions()[:3]]
    assert truth & set(top3), (stuck.node, truth, top3)
    best = next(s for s in crippled.suggestions()[:3] if s.text in truth)
    assert "random inputs" in best.reason


def test_numerically_false_hint_is_refused_with_values():
    s = gg.ProofSession(E.get("mlp").make(world_size=2, bug="missing_allreduce"))
    s.run()
    before = (s.progress, {k: list(v) for k, v in s.relations.items()}, list(s.actions))
    with pytest.raises(ValueError, match="numerically false.*seed 0"):
        s.hint(s.stuck.node, f"{s.stuck.node}@r0")
    assert (s.progress, {k: list(v) for k, v in s.relations.items()}, list(s.actions)) == before


@pytest.mark.parametrize("name", ["mlp", "gpt_block", "vocab_cross_entropy"])
def test_certificate_roundtrip_and_tampering(name):
    problem = E.get(name).make(world_size=2)
    r = gg.verify(problem)
    cert = r.certificate()
    check = gg.check_certificate(problem, cert)
    assert check.ok and check.checked_relations > 0 and check.checked_lemmas > 0, str(check)
    bad = copy.deepcopy(cert)
    changed = False
    for st in bad["steps"]:
        for rel in st["relations"]:
            t = rel["relation"]
            if "@r0" in t and "@r1" in t:
                rel["relation"] = t.replace("@r0", "@rX").replace("@r1", "@r0").replace("@rX", "@r1")
                changed = True
                break
        if changed:
            break
    assert changed
    check = gg.check_certificate(problem, bad)
    assert not check.ok and "false on fresh random input" in check.failure and check.node == st["node"]


def test_bitwise_mode():
    # a row-parallel matmul sums shard products: equal over the reals, not bit for bit
    r = gg.verify(E.get("mlp").make(world_size=2), exact="bitwise")
    assert r.status is not gg.Status.PROVED
    # a vocab-parallel lookup only moves data (and adds exact zeros): bitwise exact
    r = gg.verify(E.get("vocab_embedding").make(world_size=2), exact="bitwise")
    assert r.status is gg.Status.PROVED
    with pytest.raises(gg.ProblemError):
        gg.verify(E.get("mlp").make(world_size=2), exact="approximately")
