"""Proof certificates: everything a proof claims, in JSON, re-checkable without the inference engine.

A certificate lists every sequential tensor's relations (in the hint syntax), the lemma chain behind
each, which relations are assumptions, and the lemmas used (with their statements). The checker
re-captures the programs, parses every relation against the ranks' graphs, evaluates it on *fresh*
random inputs with the rank simulator, and re-runs the randomized soundness cases of every lemma
the certificate names. It reports the first step that fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

FORMAT = "gg_notebook.certificate/1"


@dataclass
class CertificateCheck:
    ok: bool
    checked_relations: int
    checked_lemmas: int
    skipped: list[str] = field(default_factory=list)  # relations that are constants (nothing to check)
    failure: str | None = None  # the first failing step
    node: str | None = None
    assumptions: list[str] = field(default_factory=list)  # an "assumed" certificate: checked, not proved

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            under = (f" (assumed: it holds only under {len(self.assumptions)} assumption(s), not a proof)"
                     if self.assumptions else "")
            return (f"certificate ok{under}: {self.checked_relations} relations checked on fresh random inputs, "
                    f"{self.checked_lemmas} lemmas re-tested")
        return f"certificate rejected at {self.node}: {self.failure}"


def make_certificate(result) -> dict:
    from gg_notebook.lemmas import REGISTRY

    steps = []
    used: set[str] = set()
    for st in result.steps:
        rels = []
        for text, c in zip(st.pretty, st.candidates):
            if getattr(c, "deferred", False):
                continue
            chain = [x for x in c.chain]
            used.update(x for x in chain if x in REGISTRY)
            rels.append({"relation": text, "lemmas": chain, "assumption": bool(c.assumption)})
        steps.append({"node": st.node, "op": st.op, "source": st.source, "status": st.status, "relations": rels})
    return {
        "format": FORMAT,
        "problem": result.problem_name,
        "status": result.status.value,
        "world_size": result.stats.get("world_size"),
        "steps": steps,
        "outputs": [{"index": r.index, "node": r.name, "relation": r.relation, "expected": r.expected, "ok": r.ok}
                    for r in result.relations],
        "assumptions": list(result.assumptions),
        "lemmas": {name: {"statement": REGISTRY[name].statement, "conditions": list(REGISTRY[name].conditions)}
                   for name in sorted(used)},
    }


def check_certificate(problem, cert, seeds: tuple[int, ...] = (1001, 1002)) -> CertificateCheck:
    """Re-check ``cert`` (a dict or JSON text) for ``problem`` independently of the inference engine."""
    from gg_notebook.concrete.compare import close, max_error
    from gg_notebook.concrete.search import evaluate_relation
    from gg_notebook.concrete.simulate import simulate
    from gg_notebook.lemmas import REGISTRY
    from gg_notebook.session.hints import HintError, parse_hint
    from gg_notebook.verify import prepare

    if isinstance(cert, str):
        cert = json.loads(cert)
    if cert.get("format") != FORMAT:
        return CertificateCheck(False, 0, 0, failure=f"not a gg_notebook certificate (format {cert.get('format')!r})")
    assumed = list(cert.get("assumptions") or [])
    if cert.get("status") == "proved" and (assumed or any(
            rel.get("assumption") for st in cert.get("steps", []) for rel in st.get("relations", []))):
        return CertificateCheck(False, 0, 0, failure="the certificate says 'proved' but relies on assumptions "
                                                     "(a proof under assumptions is 'assumed')")
    engine, _ = prepare(problem)  # capture + index only: the inference engine does not run
    seq = engine.seq
    sims = [simulate(problem, seq, engine.index.graphs, seed=s) for s in seeds]
    checked, skipped = 0, []
    names = {st["node"] for st in cert["steps"]}
    missing_outputs = [o.name for o in seq.outputs if o.name not in names]
    if missing_outputs:
        return CertificateCheck(False, 0, 0, failure=f"no relation for outputs {missing_outputs}", node=missing_outputs[0])
    for st in cert["steps"]:
        node = seq.by_name.get(st["node"])
        if node is None:
            return CertificateCheck(False, checked, 0, failure="the sequential program has no such tensor",
                                    node=st["node"])
        for rel in st["relations"]:
            text = rel["relation"]
            if "const[" in text:
                skipped.append(f"{st['node']}: {text}")
                continue
            try:
                e = parse_hint(text, engine)
            except HintError as exc:
                return CertificateCheck(False, checked, 0, failure=f"relation {text!r} does not parse: {exc}",
                                        node=st["node"])
            if tuple(e.shape) != tuple(node.shape):
                return CertificateCheck(False, checked, 0, node=st["node"],
                                        failure=f"relation {text!r} has shape {tuple(e.shape)}, the tensor {tuple(node.shape)}")
            for sim in sims:
                want = sim.seq[node.name]
                got = evaluate_relation(engine, e, sim)
                if got.shape != want.shape or not close(want, got, want.dtype):
                    err = max_error(want, got)[0] if got.shape == want.shape else float("inf")
                    return CertificateCheck(False, checked, 0, node=st["node"],
                                            failure=f"relation {text!r} is false on fresh random input seed "
                                                    f"{sim.seed} (max error {err:.3g})")
            checked += 1
    # every lemma the certificate relies on passes its randomized soundness cases again
    rng = torch.Generator().manual_seed(seeds[0])
    lemmas = 0
    for name in cert.get("lemmas", {}):
        lemma = REGISTRY.get(name)
        if lemma is None:
            return CertificateCheck(False, checked, lemmas, failure=f"unknown lemma {name!r}", node=None)
        from gg_notebook.relations.expr import evaluate

        for case in lemma.cases(rng):
            leaf = (lambda vals: (lambda e: vals[e.attrs[0]]))(case.values)
            lhs = case.spec.call([evaluate(a, leaf) for a in case.args])
            for plan in case.plans(lemma, tuple(lhs.shape)):
                if not close(lhs, evaluate(plan, leaf), lhs.dtype, bitwise=False):
                    return CertificateCheck(False, checked, lemmas, node=None,
                                            failure=f"lemma {name} fails on a random case ({case.description})")
        lemmas += 1
    return CertificateCheck(True, checked, lemmas, skipped, assumptions=assumed)
