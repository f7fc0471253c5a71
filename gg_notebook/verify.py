"""`gg.verify`: capture -> lower -> index the ranks -> infer relations -> judge."""

from __future__ import annotations

import functools
import time

from torch.distributed.tensor import Partial, Replicate, Shard

from gg_notebook.engine.index import DIndex
from gg_notebook.engine.induction import Induction
from gg_notebook.engine.infer import Candidate, Engine
from gg_notebook.engine.judge import judge
from gg_notebook.ir.lower import lower
from gg_notebook.problem import Layout, Problem, ProblemError, RandomOpError, validate_expect, validate_problem
from gg_notebook.capture.progress import make_progress
from gg_notebook.relations.expr import ExprStore
from gg_notebook.relations.inputs import global_atoms, rank_input_terms
from gg_notebook.result import Result, Status, VerificationError

_REPORT = ("this is a gg_notebook limitation, not a mistake in your problem: please report it with the "
           "program that triggers it")


def _internal(stage: str, exc: BaseException, *, rank: int | None = None, node=None) -> VerificationError:
    """Wrap an unexpected exception from ``stage`` into a `VerificationError` naming where it happened."""
    op = getattr(node, "target", None) or None
    name = getattr(node, "name", None)
    source = getattr(node, "source", None)
    prog = "" if stage in ("indexing", "judging") else (
        " the sequential program" if rank is None else f" rank {rank}'s program")
    at = f" at {op} ({name})" if op else ""
    at += f", {source}" if source else ""
    code = getattr(node, "code", None)
    at += f" (`{code.strip()}`)" if code else ""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return VerificationError(
        f"gg_notebook failed while {stage}{prog}{at}: {type(exc).__name__}: {text}. {_REPORT}.",
        stage=stage, rank=rank, op=op, node=name, source=source,
    )


def _guard(stage: str, fn, *args, rank: int | None = None, node_of=None):
    """Run ``fn(*args)``; user-facing errors pass through, anything else becomes a `VerificationError`."""
    from gg_notebook.capture import CaptureError

    try:
        return fn(*args)
    except (ProblemError, CaptureError, VerificationError):
        raise
    except Exception as exc:  # noqa: BLE001 - LoweringError, IndexError_, ShapeError, bugs
        raise _internal(stage, exc, rank=rank, node=node_of() if node_of else None) from exc


def _lower(gm, rank, policy="refuse", decompositions=None, input_ranges=None, bitwise=False):
    if bitwise and gm.meta.get("gg_selections"):
        from gg_notebook.capture import CaptureError
        from gg_notebook.capture.errors import program_name

        src = gm.meta["gg_selections"][0]
        raise CaptureError(
            f"{program_name(rank)}: a boolean-mask selection reduced at once{f' at {src}' if src else ''} is verified "
            "as the fixed-shape sum(where(mask, x, 0)) (/ mask.sum() for a mean): the same value over the reals, "
            "not bit for bit (the sum adds in another order); use exact=\"real\".", rank=rank, source=src)
    return _guard("lowering", lower, gm, rank, policy, decompositions, input_ranges, rank=rank)


def input_ranges(problem: Problem) -> dict:
    """{input index: (lo, hi)} for the integer inputs whose domain the problem declares."""
    out = {}
    for name, d in problem.id_domains().items():
        if name in problem.input_names and d.ranges:
            out[problem.input_names.index(name)] = (d.ranges[0][0], d.ranges[-1][1] - 1)
    return out


def prepare(problem: Problem, *, capture: str = "auto", exact: str = "real", capture_once: bool = True,
            executor=None, progress=None):
    """Capture and index ``problem``; returns an `Engine` ready to step, plus timing stats.

    ``capture``: "processes" traces and lowers every rank in its own forked process (as a real
    job runs them: module-level state starts afresh per rank), "inprocess" all in this process,
    "auto" (default) processes where fork is available (see `gg_notebook.capture.programs`).

    Operators without a lemma are decomposed (`gg_notebook.ir.decompose`) only for ``exact="real"``:
    a definition equals its operator over the reals, not bit for bit."""
    from gg_notebook.capture import capture_and_lower

    validate_problem(problem)
    t0 = time.perf_counter()
    decompositions = dict(getattr(problem, "decompositions", None) or {}) if exact == "real" else None
    cap = capture_and_lower(problem, functools.partial(_lower, policy=getattr(problem, "random", "refuse"),
                                                       decompositions=decompositions,
                                                       input_ranges=input_ranges(problem),
                                                       bitwise=exact == "bitwise"), capture,
                            once=capture_once, executor=executor,
                            progress=make_progress(progress))
    t1 = time.perf_counter()
    policy = getattr(problem, "random", "refuse")
    check_random(cap.sequential, policy)
    resolve = getattr(problem.expect, "resolve", None)  # from_modules: forward's output count is known now
    if resolve is not None:
        problem.expect = resolve(len(cap.sequential.outputs))
    validate_expect(problem, cap.sequential.outputs)
    for g in cap.ranks:
        check_random(g, policy)
    stats: dict = dict(cap.stats)
    decomposed: dict = {}  # operator -> calls replaced by its definition, over all programs
    for g in (cap.sequential, *cap.ranks):
        for op, k in getattr(g, "decomposed", {}).items():
            decomposed[op] = decomposed.get(op, 0) + k
    if decomposed:
        stats["decomposed"] = decomposed
    specialized = [r for r, g in zip([None, *range(len(cap.ranks))], (cap.sequential, *cap.ranks))
                   if getattr(g, "specialized", None)]
    if specialized:  # capture.specialize: .tolist() values and routing indices of the example inputs
        stats["captured_for"] = "the routing of the given inputs (" + ", ".join(
            "sequential" if r is None else f"rank {r}" for r in specialized) + ")"
    return _guard("indexing", _index, problem, cap.sequential, cap.ranks, stats, t0, t1, exact == "real")


def check_random(graph, policy: str) -> None:
    """`RandomOpError` for the first random operator ``policy`` does not allow (see `Problem.random`)."""
    for r in getattr(graph, "random_ops", ()):
        if r.identity:
            continue
        at = f" at {r.source}" if r.source else ""
        code = f" (`{r.code.strip()}`)" if r.code else ""
        where = f"{r.op}{' (dropout)' if r.kind == 'dropout' else ''} in {r.program}{at}{code}"
        if r.kind == "dropout":
            msg = (f"random operator {where}: random values are never equal across programs, so gg_notebook "
                   f"refuses them by default. Pass gg.Problem(..., random=\"identity\") to verify with evaluation "
                   f"semantics (dropout as the identity, p ignored; recorded as an assumption, so the verdict is "
                   f"at most 'assumed'), or remove the randomness (model.eval(), F.dropout(..., training=False)).")
        else:
            allowed = " (random=\"identity\" covers only dropout)" if policy == "identity" else ""
            msg = (f"random operator {where}: its values are random and can never be related across programs"
                   f"{allowed}. Pass random values as inputs of the problem instead, or remove the randomness; "
                   f"for dropout use F.dropout / nn.Dropout with random=\"identity\".")
        raise RandomOpError(msg, op=r.op, rank=r.rank, source=r.source)


def _index(problem: Problem, seq, ranks, stats: dict, t0: float, t1: float, real: bool = True):
    from gg_notebook.capture import capture_layout
    from gg_notebook.relations.layout import layout_terms_and_relation

    store = ExprStore()
    store.real = real  # real-number-only term normal forms (relations/safe_softmax.py) are allowed
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
    engine.domains = problem.id_domains()
    t2 = time.perf_counter()
    stats.update({
        "capture_s": t1 - t0, "index_s": t2 - t1, "seq_nodes": len(seq.nodes),
        "rank_nodes": sum(len(g.nodes) for g in ranks), "distributed_values": len(index.dvals),
    })
    return engine, stats


def verify(problem: Problem, *, exact: str = "real", concrete: bool = True, seeds: int = 3,
           validate: bool = True, capture: str = "auto", capture_once: bool = True, executor=None,
           progress=None, greedy: bool = True, induction: bool = True) -> Result:
    """Prove that ``problem.distributed`` refines ``problem.sequential`` (see `Problem`).

    ``exact="real"`` (default): equality over real numbers (floating point compared with a tolerance
    in concrete checks). ``exact="bitwise"``: only rewrites that preserve floating-point results bit
    for bit (data movement; not reassociated sums), and concrete checks compare exactly.

    When the proof does not go through and ``concrete`` is set, both programs are run on ``seeds``
    random inputs: a disagreement refutes the program (with a counterexample), agreement leaves the
    verdict unknown and says a lemma is missing.

    After a proof, ``validate`` (default on) re-checks every relation and every lemma instance it
    used on fresh and adversarial inputs (translation validation, see `concrete.validate`); a
    failure turns the verdict into refuted (an output disagrees) or unknown (the proof is not
    trusted). Example inputs are checked against the domains declared in ``problem.domains``.


    ``capture="auto"`` (default) traces every rank in its own process where the platform forks,
    ``"inprocess"`` all in this process (see `prepare`). ``capture_once`` (default on) traces rank 0
    and derives every rank whose recorded operator calls equal rank 0's up to numbers from it; the
    other ranks are traced (``result.stats["capture"]`` says which and why; see
    `gg_notebook.capture.symmetry`).

    ``executor``: any `concurrent.futures.Executor` of worker *processes* (a
    ``ProcessPoolExecutor``, or a cluster's: ``distributed.Client(...).get_executor()`` with the
    ``[dask]`` extra) runs the per-rank recordings and traces instead of this machine's forked
    children; the problem and the lowered graphs travel pickled (dask pickles local functions too,
    a ProcessPoolExecutor only module-level ones). A worker may capture several programs in turn,
    so module-level state of the user's code is not fresh per rank there (it is with the default).

    ``greedy`` (default on): infer greedily first, exhaustively only if that does not prove the
    problem (`gg_notebook.engine.infer.Engine.run_greedy_first`): the verdict is the exhaustive
    search's either way, the relations of a proof may be fewer; ``greedy=False, induction=False``
    steps exactly as a `ProofSession` does.

    ``induction`` (default on): a model's repeated layers are proved once and carried to every
    layer that is provably the same (`gg_notebook.engine.induction`); the others are walked.
    ``result.stats["induction"]`` says how many were carried and why the others were not. A problem
    that is not proved that way is inferred again walking every operator, so its verdict (and
    culprit) are the walk's.

    ``progress``: True for tqdm.auto bars (capture per program and rank, inference per operator),
    or a callable ``f(stage, done, total, detail)`` (see `gg_notebook.capture.progress`)."""
    if exact not in ("real", "bitwise"):
        raise ProblemError(f"exact must be 'real' or 'bitwise', not {exact!r}")
    report = make_progress(progress)
    engine, stats = prepare(problem, capture=capture, exact=exact, capture_once=capture_once, executor=executor,
                            progress=report)
    engine.bitwise = exact == "bitwise"
    t0 = time.perf_counter()
    if induction:
        engine.induction = Induction(engine)
    if report is not None:
        _report_steps(engine, report)
    try:
        if greedy:
            passes = _guard("inferring", engine.run_greedy_first, functools.partial(_greedy_proves, problem, stats),
                            node_of=lambda: _current(engine))
        else:
            passes = _guard("inferring", engine.run_walking_if_needed,
                            functools.partial(_greedy_proves, problem, stats), node_of=lambda: _current(engine))
    finally:
        engine.__dict__.pop("step", None)  # the reporting wrappers (if any)
        if engine.induction is not None:
            engine.induction.__dict__.pop("advance", None)
    stats["inference_s"] = time.perf_counter() - t0
    if engine.induction is not None:
        # (a second pass walks every operator: then the relations judged are the walk's alone)
        stats["induction"] = dict(engine.induction.summary(),
                                  in_verdict=passes == 1 and engine.induction.stats["carried"] > 0)
    stats["inference_passes"] = passes
    stats.update({k: v for k, v in engine.stats.items()})
    return conclude(engine, problem, stats, exact=exact, concrete=concrete, seeds=seeds, validate=validate)


def _greedy_proves(problem: Problem, stats: dict, engine: Engine) -> bool:
    """Do the greedy pass's relations prove ``problem`` (`Engine.run_greedy_first`)? Proved, or
    assumed only under the problem's own assumptions (dropout as the identity, the routing of the
    example inputs), never under one a relation brought in (a clamped count, a user relation): any
    other outcome is decided by the exhaustive search, so the verdict is always the one it gives."""
    from gg_notebook.engine.clamped_count import assumptions as clamped_count_assumptions

    if engine.stuck_at is not None:
        return False
    result = judge(engine, problem, dict(stats))
    if result.status is Status.PROVED:
        return True
    return (result.status is Status.ASSUMED and not engine.user_relations
            and not clamped_count_assumptions(engine))


def conclude(engine: Engine, problem: Problem, stats: dict, *, exact: str = "real", concrete: bool = True,
             seeds: int = 3, validate: bool = True) -> Result:
    """The verdict of an inference that has run (finished or stuck): judge the relations, list the
    domains the proof relied on, validate a proof, refute by the problem's own example inputs, and
    run the concrete check (refuted with a counterexample, or "numbers agree: a lemma is missing").
    `verify` and `ProofSession.result` both end here, so a session and `verify` give one verdict."""
    t1 = time.perf_counter()
    result = _guard("judging", judge, engine, problem, stats)
    stats["judge_s"] = time.perf_counter() - t1
    facts = dict(engine.domain_facts)
    for name, d in problem.id_domains().items():
        # the lowering reads declared domains too (an index bounded by one, a mask constant on one),
        # without a lemma recording it: a declared domain the proof did not name is still listed
        if not any(name in f for f in facts.values()):
            facts[f"declared:{name}"] = (f"{name} ∈ {d.describe()} (declared in Problem.domains; the lowering may "
                                         f"rely on it: index bounds, masks that are constant on it)")
    result.domain_assumptions = sorted(facts.values())
    if result.status is Status.PROVED and validate:
        from gg_notebook.concrete.validate import validate_proof

        result = _guard("validating the proof", validate_proof, engine, problem, result, exact == "bitwise")
        stats["validate_s"] = result.stats.get("validate_s", 0.0)
    violation = _domain_violation(problem)
    if violation is not None:
        result = _refute_by_example(result, problem, *violation)
    if concrete and result.status in (Status.UNKNOWN, Status.ASSUMED):
        # an "assumed" verdict is checked too: a false assumption ends refuted, with the counterexample
        # (random="identity" is no exception: the simulator runs the same identity-dropout graphs)
        from gg_notebook.concrete.refute import concrete_check

        t2 = time.perf_counter()
        result = _guard("checking concretely", concrete_check, engine, problem, result, seeds,
                        exact == "bitwise")
        stats["concrete_s"] = time.perf_counter() - t2
    stats["total_s"] = sum(stats.get(k, 0.0) for k in ("capture_s", "index_s", "inference_s", "judge_s",
                                                        "validate_s", "concrete_s"))
    stats["exact"] = exact
    stats["world_size"] = problem.world_size
    return result


def _report_steps(engine: Engine, report) -> None:
    """Call ``report("inference", done, total, op)`` as the engine steps (about 100 times a run),
    a layer carried by induction (`engine.induction`) included."""
    step = engine.step
    total = len(engine.seq.nodes)
    every = max(1, total // 100)
    last = [0]

    def tick():
        k = engine.cursor
        if k // every != last[0] or engine.done:
            last[0] = k // every
            n = engine.seq.nodes[k - 1] if 0 < k <= total else None
            report("inference", total if engine.done else k, total, str(getattr(n, "target", "")) if n else "")

    def reporting_step():
        out = step()
        tick()
        return out

    engine.step = reporting_step
    induction = engine.induction
    if induction is not None:
        advance = induction.advance

        def reporting_advance(e):
            out = advance(e)
            if out:
                tick()
            return out

        induction.advance = reporting_advance


def _domain_violation(problem: Problem):
    """(input index, name, domain, flat position, value) of the first example value outside its
    declared domain, or None."""
    for name, dom in problem.id_domains().items():
        i = list(problem.input_names).index(name)
        t = problem.inputs[i]
        if t.device.type == "meta" or t.numel() == 0:
            continue
        out = dom.outside(t.detach().cpu().reshape(-1).long())
        if bool(out.any()):
            k = int(out.nonzero()[0])
            return i, name, dom, k, int(t.reshape(-1)[k])
    return None


def _refute_by_example(result: Result, problem: Problem, i: int, name: str, dom, k: int, value: int) -> Result:
    import torch

    from gg_notebook.result import Counterexample, Finding

    t = problem.inputs[i]
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(k), t.shape)) if t.dim() else ()
    msg = (f"the example input {name} holds {value} at index {idx}, outside its declared domain "
           f"{dom.describe()} (Problem.domains[{name!r}]): the proof assumes no such value occurs, and the "
           f"problem's own data contradicts that. Widen the domain (e.g. include ignore_index) or fix the input.")
    result.findings.append(Finding("domain-violation", msg))
    result.counterexample = Counterexample(
        seed=-1, output=-1, expected_relation=f"the declared domain of {name}", max_error=float("inf"),
        relative_error=float("inf"), sequential=[float(value)], rebuilt=[], worst_index=idx,
        inputs={n: f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} (the problem's example)"
                for n, x in zip(problem.input_names, problem.inputs)},
        tensors=[x.detach() for x in problem.inputs])
    result.status = Status.REFUTED
    return result


def _current(engine: Engine):
    """The sequential node the engine was working on (None when past the end)."""
    nodes = engine.seq.nodes
    return nodes[engine.cursor] if 0 <= engine.cursor < len(nodes) else None
