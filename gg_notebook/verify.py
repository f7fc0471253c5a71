"""`gg.verify`: capture -> lower -> index the ranks -> infer relations -> judge."""

from __future__ import annotations

import time

from torch.distributed.tensor import Partial, Replicate, Shard

from gg_notebook.engine.index import DIndex
from gg_notebook.engine.infer import Candidate, Engine
from gg_notebook.engine.judge import judge
from gg_notebook.ir.lower import lower
from gg_notebook.problem import Layout, Problem, validate_problem
from gg_notebook.relations.expr import ExprStore
from gg_notebook.relations.inputs import global_atoms, rank_input_terms
from gg_notebook.result import Result


def prepare(problem: Problem):
    """Capture and index ``problem``; returns an `Engine` ready to step, plus timing stats."""
    from gg_notebook.capture import capture_layout, capture_problem
    from gg_notebook.relations.layout import layout_terms_and_relation

    validate_problem(problem)
    stats: dict = {}
    t0 = time.perf_counter()
    cap = capture_problem(problem)
    t1 = time.perf_counter()
    seq = lower(cap.sequential, None)
    ranks = [lower(gm, r) for r, gm in enumerate(cap.ranks)]
    store = ExprStore()
    atoms = global_atoms(problem, store)
    layout_terms: dict = {}
    layout_rel_builders: dict = {}
    for i, p in enumerate(problem.placements):
        if isinstance(p, Layout):
            terms, builder = layout_terms_and_relation(problem, i, store, atoms[i], capture_layout)
            for r, t in enumerate(terms):
                layout_terms[(r, i)] = t
            layout_rel_builders[i] = builder
    terms = rank_input_terms(problem, store, atoms, layout_terms)
    index = DIndex(store, ranks, terms)
    input_relations: dict[str, list[Candidate]] = {}
    W = problem.world_size
    for n in seq.inputs:
        i = n.attrs
        p = problem.placements[i]
        refs = [index.ref(index.realized(terms[r][i])) if index.realized(terms[r][i]) else None for r in range(W)]
        if any(r is None for r in refs):
            input_relations[n.name] = []
            continue
        if isinstance(p, Replicate):
            rel = refs[0]
        elif isinstance(p, Shard):
            rel = store.cat(refs, p.dim % len(n.shape))
        elif isinstance(p, Partial):
            rel = store.accum("sum", refs)
        else:
            rel = layout_rel_builders[i](refs)
        input_relations[n.name] = [Candidate(rel, ("input placement",))]
    engine = Engine(seq, index, store, input_relations)
    t2 = time.perf_counter()
    stats.update({
        "capture_s": t1 - t0, "index_s": t2 - t1, "seq_nodes": len(seq.nodes),
        "rank_nodes": sum(len(g.nodes) for g in ranks), "distributed_values": len(index.dvals),
    })
    return engine, stats


def verify(problem: Problem, **options) -> Result:
    """Prove that ``problem.distributed`` refines ``problem.sequential`` (see `Problem`)."""
    engine, stats = prepare(problem)
    t0 = time.perf_counter()
    engine.run()
    stats["inference_s"] = time.perf_counter() - t0
    stats.update({k: v for k, v in engine.stats.items()})
    t1 = time.perf_counter()
    result = judge(engine, problem, stats)
    stats["judge_s"] = time.perf_counter() - t1
    stats["total_s"] = stats["capture_s"] + stats["index_s"] + stats["inference_s"] + stats["judge_s"]
    return result
