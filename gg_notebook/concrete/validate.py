"""Translation validation: after every proof, check what it claims on fresh, adversarial inputs.

A proof is a chain of lemma applications and lookups. Each lemma is tested on its own random
cases, but a lemma that is wrong for an argument nobody thought of (an attribute, a dtype, a
sentinel id) would still "prove" a wrong program. So `validate_proof` re-evaluates, on fresh
inputs the inference never saw (plain random values, then adversarial ones: zeros, negatives,
exact ties, values that round differently in bfloat16/half, integer boundaries and sentinels such
as ``ignore_index``):

* every relation of every sequential tensor (sequential value == relation rebuilt from the ranks);
* every lemma instance the relations rest on (the operator on its arguments == the lemma's plan,
  with the distributed values the simulation computed).

An output whose relation fails is a real disagreement: the verdict becomes **refuted** with that
input as the counterexample. Any other failure (an intermediate relation, a lemma instance) makes
the verdict **unknown** and names the lemma and tensor: the proof is not trusted.
"""

from __future__ import annotations

import time

from gg_notebook.result import Finding, Result, Status

SEEDS = ((1009, False), (2003, True), (3001, True))  # (seed, adversarial)
# above this many input elements the programs are not run again for validation (a finding says so)
MAX_ELEMENTS = 4_000_000


def validate_proof(engine, problem, result: Result, bitwise: bool = False) -> Result:
    import math

    from gg_notebook.concrete.simulate import few_threads

    elements = sum(math.prod(t.shape) for t in problem.inputs)
    if elements > MAX_ELEMENTS:
        result.findings.append(Finding(
            "not-validated",
            f"the proof was not re-checked on fresh inputs (translation validation): the inputs have {elements:,} "
            f"elements, more than the {MAX_ELEMENTS:,} validation runs at full size; verify a smaller "
            f"configuration of the same program to have it validated"))
        result.stats["validated"] = False
        return result
    with few_threads(elements):
        return _validate(engine, problem, result, bitwise)


def _validate(engine, problem, result: Result, bitwise: bool) -> Result:
    from gg_notebook.concrete.compare import judged_as
    from gg_notebook.concrete.simulate import RankRaised, SimulationError, simulate

    t0 = time.perf_counter()
    with judged_as(engine.seq, bitwise):
        try:
            sims = [simulate(problem, engine.seq, engine.index.graphs, seed=s, adversarial=adv) for s, adv in SEEDS]
        except RankRaised as exc:
            # a rank's operator rejects values on which the sequential program runs: not a proof
            from gg_notebook.concrete.refute import refute_rank_raised

            result.stats["validated"] = False
            result.findings.append(Finding(
                "validation-failed", f"re-running the programs on fresh inputs: {exc.describe()}", exc.node.source))
            result.status = Status.UNKNOWN
            return refute_rank_raised(engine, problem, result, exc)
        except SimulationError as exc:
            result.findings.append(Finding(
                "not-validated",
                f"the proof was not re-checked on fresh inputs (translation validation) because the programs "
                f"cannot be run here: {exc}"))
            result.stats["validated"] = False
            return result
        failure = _check_relations(engine, sims) or _check_instances(engine, sims)
    result.stats["validate_s"] = time.perf_counter() - t0
    result.stats["validated"] = failure is None
    result.stats["validated_instances"] = len(engine.instances)
    if failure is None:
        return result
    kind, node, text, sim = failure
    if kind == "output":
        from gg_notebook.concrete.refute import concrete_check_on

        result.findings.append(Finding("validation-failed", text, getattr(engine.seq.by_name.get(node), "source", None)))
        result.status = Status.UNKNOWN
        return concrete_check_on(engine, problem, result, sims, bitwise)
    result.status = Status.UNKNOWN
    result.findings.append(Finding("validation-failed", text, getattr(engine.seq.by_name.get(node), "source", None)))
    return result


def _check_relations(engine, sims):
    from gg_notebook.concrete.compare import close, max_error
    from gg_notebook.concrete.search import evaluate_relation

    outputs = {o.name for o in engine.seq.outputs}
    # outputs first: a wrong output is a refutation, whatever else fails
    order = [n for n in engine.seq.nodes if n.name in outputs] + \
            [n for n in engine.seq.nodes if n.name not in outputs]
    for n in order:
        for c in engine.relations.get(n.name, []):
            if c.deferred or c.assumption:
                continue
            for sim in sims:
                want = sim.seq[n.name]
                try:
                    got = evaluate_relation(engine, c.expr, sim)
                except Exception as exc:  # noqa: BLE001
                    return ("relation", n.name, f"{n.name}: its relation {engine.show(c.expr)} could not be "
                            f"evaluated on fresh input seed {sim.seed}: {type(exc).__name__}: {exc}", sim)
                if got.shape != want.shape or not close(want, got, want.dtype):
                    err = max_error(want, got)[0] if got.shape == want.shape else float("inf")
                    lemmas = ", ".join(x for x in c.chain if x not in ("match", "input placement")) or "exact lookup"
                    kind = "output" if n.name in outputs else "relation"
                    return (kind, n.name,
                            f"translation validation: {n.name} ({n.target}{', ' + n.source if n.source else ''}) "
                            f"= {engine.show(c.expr)} is false on fresh input seed {sim.seed}"
                            f"{' (adversarial values)' if sim.seed != 1009 else ''}: max error {err:.3g}; "
                            f"the relation rests on {lemmas}", sim)
    return None


def _check_instances(engine, sims):
    from gg_notebook.concrete.compare import close, max_error
    from gg_notebook.relations.expr import evaluate

    for sim in sims:
        memo: dict = {}

        def leaf(e, sim=sim):
            if e.op != "ref":
                raise ValueError(f"unexpected leaf {e.op}")
            d = engine.index.dvals[e.attrs[0]]
            rank, node = d.locations[0]
            return sim.ranks[rank][node.name]

        for name, spec, args, plan in engine.instances:
            try:
                lhs = spec.call([evaluate(a, leaf, memo) for a in args])
                rhs = evaluate(plan, leaf, memo)
            except Exception as exc:  # noqa: BLE001
                return ("instance", None, f"translation validation: lemma {name} on {spec.short} could not be "
                        f"re-evaluated on fresh input seed {sim.seed}: {type(exc).__name__}: {exc}", sim)
            if lhs.shape != rhs.shape or not close(lhs, rhs, lhs.dtype):
                err = max_error(lhs, rhs)[0] if lhs.shape == rhs.shape else float("inf")
                return ("instance", None,
                        f"translation validation: lemma {name} applied to {spec.short}"
                        f"({', '.join(engine.show(a) for a in args)}) is false on fresh input seed {sim.seed}: "
                        f"max error {err:.3g}; the proof is not trusted", sim)
    return None
