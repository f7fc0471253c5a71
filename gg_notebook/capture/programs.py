"""Capture and lower every program of a `Problem`, each rank in its own process.

A real job runs every rank in a fresh process. So does `capture_and_lower` (``mode="processes"``,
the default where the platform forks): the sequential program and each rank are traced *and
lowered* in a child forked from this process (`capture.forked`), up to one child per core at a
time, and the lowered IR graphs come back by value. Module-level state of the user's code (a counter
handing out offsets, a cache filled on first call, DTensor's caches) therefore starts afresh for every
rank, as in the real job. ``mode="inprocess"`` (and the fallback where fork is unavailable: Windows,
macOS) traces everything one after the other in this process, where such state leaks from one
rank into the next.

Besides the graphs, the parent gets plain data: each rank's collectives (matched here, across ranks),
output counts, input mutations and timings.

Capture once (``once=True``, the default; see `capture.symmetry`): every rank's function is first
*recorded* (run once on fake tensors, its operator calls written down: ~20x cheaper than a trace, each
rank in its own process too); the ranks whose recording equals rank 0's up to numbers are derived from
rank 0's traced graph with their own numbers, and only the others are traced. ``stats["capture"]``
says how many ranks were traced, how many specialized, and why any rank was not.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx

from gg_notebook.capture.collectives import IssuedCollective, MatchedCollective, match_collectives
from gg_notebook.capture.errors import CaptureError, program_name
from gg_notebook.capture.forked import ChildDied, ResultNotSent, fork_available, run_forked
from gg_notebook.capture.symmetry import (Diff, Recording, Specializer, compare, p2p_reason, record_rank,
                                          user_code_reason)
from gg_notebook.capture.tracing import (
    _n_outputs,
    check_output_counts,
    forget_rank_caches,
    recording_calls,
    trace_program,
    warm_up,
)
from gg_notebook.ir.graph import Graph
from gg_notebook.problem import Problem, ProblemError

MODES = ("auto", "processes", "inprocess")

Lower = Callable[[fx.GraphModule, "int | None"], Graph]


@dataclass
class LoweredProgram:
    """The lowered graphs of one `Problem`: ``ranks[r]`` is rank r's; collectives are matched."""

    sequential: Graph
    ranks: list[Graph]
    world_size: int
    collectives: list[MatchedCollective]
    input_mutations: dict = field(default_factory=dict)  # program (None: sequential) -> {input: node}
    stats: dict = field(default_factory=dict)


@dataclass
class _Captured:
    """One program, traced and lowered (what a child sends back)."""

    graph: Graph
    issued: list[IssuedCollective]
    n_outputs: int
    input_mutations: dict
    seconds: float


def _capture_one(problem: Problem, lower: Lower, rank: int | None) -> _Captured:
    t0 = time.perf_counter()
    gm, issued = trace_program(problem, rank)
    graph = lower(gm, rank)
    return _Captured(graph, issued, _n_outputs(gm), dict(gm.meta.get("gg_input_mutations", {})),
                     time.perf_counter() - t0)


def _capture_representative(problem: Problem, lower: Lower, rep: Recording, diffs: list[Diff],
                            rank: int) -> dict:
    """Trace ``rank`` (the representative) with its operator calls recorded, derive the graphs of
    the ranks in ``diffs`` from it (`symmetry.Specializer`) and lower them all.

    Returns {rank: _Captured | reason (str)}: a reason for each rank that could not be derived (it
    is traced on its own afterwards). If the representative's own trace fails here, every entry is
    a reason (the plain trace, without the recorder, then reports the error)."""
    t0 = time.perf_counter()
    try:
        with recording_calls():
            gm, issued = trace_program(problem, rank)
    except Exception as e:  # noqa: BLE001 - traced again without the recorder, which reports it
        why = f"the representative's recorded trace raised {type(e).__name__}"
        return {r: why for r in [rank, *(d.rank for d in diffs)]}
    traced = gm.meta.pop("gg_recording", None) or Recording(rank, error="no recording")
    spec = Specializer(gm, rep, traced)
    n_out, mutations = _n_outputs(gm), dict(gm.meta.get("gg_input_mutations", {}))
    trace_s = time.perf_counter() - t0
    out: dict = {}
    derived: list = []
    for d in diffs:  # every copy before lowering the representative: lowering rewrites its graph in place
        t1 = time.perf_counter()
        g = spec.graph_for(d)
        if isinstance(g, str):
            out[d.rank] = g
        else:
            derived.append((d.rank, g, time.perf_counter() - t1))
    # the representative (the lowest rank of its class) is lowered first, then the others in rank
    # order: a lowering error is reported for the same rank as when every rank is traced
    t2 = time.perf_counter()
    out[rank] = _Captured(lower(gm, rank), issued, n_out, mutations, trace_s + time.perf_counter() - t2)
    for r, g, copy_s in derived:
        t1 = time.perf_counter()
        graph = lower(g, r)
        out[r] = _Captured(graph, [dataclasses.replace(c, rank=r) for c in issued], n_out, mutations,
                           copy_s + time.perf_counter() - t1)
    return out


def _run(fn, items: list, in_processes: bool, workers: int, then=None) -> list:
    """``[fn(item) for item in items]`` (plus what ``then`` appends, see `run_forked`), each in its
    own forked process, on the executor `capture_and_lower` was given, or all in this process."""
    if not items:
        return []
    if _executor is not None:
        return _run_on_executor(_executor, fn, items, then)
    if in_processes:
        return run_forked(fn, items, workers, then)
    items = list(items)
    out = []
    k = 0
    while k < len(items):
        forget_rank_caches()
        out.append(fn(items[k]))
        if then is not None:
            items.extend(then(k, out[-1]))
        k += 1
    return out


_executor = None  # the concurrent.futures.Executor of the running capture_and_lower, if any
_progress = None  # its progress callback (capture.progress), if any


def _remote(fn, item):
    """Runs on an executor's worker: ``fn(item)`` as plain data (`ir.serialize` bytes), or the
    exception as a payload; never raises, so that the parent reports the error of the first item."""
    from gg_notebook.capture.forked import exception_payload
    from gg_notebook.ir import serialize

    try:
        forget_rank_caches()
        return "ok", serialize.dumps(fn(item))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        return "error", exception_payload(e)


def _run_on_executor(executor, fn, items: list, then=None) -> list:
    """`run_forked`'s contract on a `concurrent.futures.Executor`: every call submitted at once (and
    what ``then`` appends as results arrive); the exception of the first failing item is raised."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from gg_notebook.capture.forked import rebuild_exception
    from gg_notebook.ir import serialize

    items = list(items)
    pending: dict = {}
    results: dict[int, Any] = {}
    failures: dict[int, dict] = {}

    def submit(i: int) -> None:
        pending[executor.submit(_remote, fn, items[i])] = i

    for i in range(len(items)):
        submit(i)
    while pending:
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for f in done:
            i = pending.pop(f)
            try:
                kind, payload = f.result()
            except Exception as e:  # noqa: BLE001 - the executor itself failed (a worker died, ...)
                who = items[i][1] if isinstance(items[i], tuple) else items[i]
                for g in pending:
                    g.cancel()
                raise CaptureError(f"the executor failed while capturing {program_name(who)}: "
                                   f"{type(e).__name__}: {e}", rank=who) from e
            if kind != "ok":
                failures[i] = payload
                continue
            results[i] = serialize.loads(payload)
            if then is not None and not failures:
                for new in then(i, results[i]):
                    items.append(new)
                    submit(len(items) - 1)
    if failures:
        raise rebuild_exception(failures[min(failures)])
    return [results[i] for i in range(len(items))]


def _job(problem: Problem, lower: Lower, job: tuple):
    if job[-1] == "quiet":  # this rank's recording already ran its function (and showed its output)
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return _job(problem, lower, job[:-1])
    kind = job[0]
    if kind == "record":
        return record_rank(problem, job[1])
    if kind == "rep":
        return _capture_representative(problem, lower, job[2], job[3], job[1])
    return _capture_one(problem, lower, job[1])


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def capture_and_lower(problem: Problem, lower: Lower, mode: str = "auto", once: bool = True,
                      executor=None, progress=None) -> LoweredProgram:
    """See `_capture_and_lower`; ``executor``: a `concurrent.futures.Executor` of worker processes
    that runs the captures (records and traces) instead of forked children; ``progress``: a
    callback ``f("capture", done, total, detail)`` called as each capture job finishes."""
    global _executor, _progress
    if executor is not None:
        from concurrent.futures import ThreadPoolExecutor

        if isinstance(executor, ThreadPoolExecutor):
            raise ProblemError("executor: a ThreadPoolExecutor runs the captures in this process, where every "
                               "rank's trace needs the one process group; pass a ProcessPoolExecutor or a "
                               "cluster's executor (dask: Client.get_executor()), or no executor.")
    saved = _executor, _progress
    _executor, _progress = executor, progress
    try:
        return _capture_and_lower(problem, lower, mode, once)
    finally:
        _executor, _progress = saved


def _capture_and_lower(problem: Problem, lower: Lower, mode: str = "auto", once: bool = True) -> LoweredProgram:
    """Trace and ``lower`` the sequential program and every rank's program; match collectives.

    ``mode``: "processes" (each program in its own forked process), "inprocess" (all in this
    process, one after the other) or "auto" (processes where fork is available). ``once``: trace
    rank 0 and derive the ranks that provably run the same program up to numbers (module docstring)."""
    if mode not in MODES:
        raise ProblemError(f"capture must be one of {', '.join(map(repr, MODES))}, not {mode!r}")
    if mode == "processes" and not fork_available():
        raise ProblemError("capture='processes' needs the fork start method (Linux); use capture='inprocess'")
    W = problem.world_size
    programs: list[int | None] = [None, *range(W)]
    in_processes = mode == "processes" or (mode == "auto" and fork_available())
    warm_s = 0.0
    if in_processes and _executor is None:
        warm_s = warm_up()  # once per process, so that no child pays for the first trace
    workers = min(_cores(), len(programs)) if in_processes else 1
    once_stats: dict | None = None
    try:
        if once and W > 1:
            captured, once_stats = _capture_once(problem, lower, in_processes, workers)
        else:
            captured = _labelled(functools.partial(_job, problem, lower), [("one", p) for p in programs],
                                 in_processes, workers)
    except ChildDied as e:
        who = getattr(e, "item", None)
        raise CaptureError(
            f"{program_name(who)}'s capture process {e.how} while tracing "
            f"{'the sequential function' if who is None else 'the per-rank function'}: the process "
            "crashed or exited (e.g. a segfault in an extension or os._exit in the traced code). "
            "Run gg.verify(problem, capture='inprocess') to see the crash in this process.",
            rank=who,
        ) from None
    except ResultNotSent as e:
        from gg_notebook.result import VerificationError

        item = getattr(e, "item", None)
        e.item = item[1] if isinstance(item, tuple) else item
        raise VerificationError(
            f"gg_notebook failed while capturing {program_name(e.item)} in its own "
            f"process: {e}. This is a gg_notebook "
            "limitation, not a mistake in your problem: please report it with the program that triggers "
            "it; gg.verify(problem, capture='inprocess') avoids it.", stage="capturing",
            rank=getattr(e, "item", None),
        ) from e
    seq, ranks = captured[0], captured[1:]
    check_output_counts(seq.n_outputs, [c.n_outputs for c in ranks])
    matched = match_collectives([c.issued for c in ranks])
    stats = {
        "capture_mode": "executor" if _executor is not None else "processes" if in_processes else "inprocess",
        "capture_workers": workers if _executor is None else None,
        "capture_seq_s": seq.seconds,  # tracing + lowering, in its own process in "processes" mode
        "capture_rank_s": [c.seconds for c in ranks],
    }
    if warm_s:
        stats["capture_warmup_s"] = warm_s
    if once_stats is not None:
        stats["capture"] = once_stats
    return LoweredProgram(
        sequential=seq.graph, ranks=[c.graph for c in ranks], world_size=W, collectives=matched,
        input_mutations={r: c.input_mutations for r, c in zip(programs, captured)}, stats=stats,
    )


def _capture_once(problem: Problem, lower: Lower, in_processes: bool, workers: int) -> tuple[list, dict]:
    """The captures of [sequential, rank 0, ..., rank W-1], tracing only what `symmetry` cannot
    derive; and the stats of how (see the module docstring).

    Jobs, each in its own process: the sequential trace and rank 0's recording start at once; then
    the other ranks' recordings (or, if rank 0's recording shows that no rank can be derived from
    it, every rank's trace); when the recordings are in, one trace per class of ranks that run the
    same program up to numbers (deriving the others) and the trace of every rank in no class; a
    rank a representative could not derive after all is traced last."""
    W = problem.world_size
    rep = 0
    t0 = time.perf_counter()
    recs: dict[int, Recording] = {}
    reasons: dict[int, str] = {}
    times: dict[str, float] = {}

    def then(_i: int, res) -> list[tuple]:
        if isinstance(res, Recording):
            recs[res.rank] = res
            if res.rank == rep and len(recs) == 1:
                early = recs[rep].error or p2p_reason(recs[rep]) or user_code_reason(recs[rep], problem)
                if early:  # no rank can be derived from rank 0: trace them all, record nothing more
                    times["record_s"] = time.perf_counter() - t0
                    for r in range(W):
                        reasons[r] = early if r == rep else f"rank {rep} cannot be a representative: {early}"
                    return [("one", r, "quiet") if r == rep else ("one", r) for r in range(W)]
                return [("record", r) for r in range(W) if r != rep]
            if len(recs) < W:
                return []
            times["record_s"] = time.perf_counter() - t0
            # classes of ranks that run the same program up to numbers, each led by its lowest rank
            classes: list[tuple[int, list[Diff]]] = []
            first_reason: dict[int, str] = {}
            for r in range(W):
                for lead, members in classes:
                    d = compare(recs[lead], recs[r])
                    if isinstance(d, Diff):
                        members.append(d)
                        break
                    first_reason.setdefault(r, d)
                else:
                    classes.append((r, []))
            out = []
            for lead, members in classes:
                if members:
                    out.append(("rep", lead, recs[lead], members, "quiet"))
                    if lead != rep:
                        reasons[lead] = f"leads its own class (differs from rank {rep}: {first_reason[lead]})"
                else:
                    out.append(("one", lead, "quiet"))
                    reasons[lead] = (first_reason.get(lead) or recs[lead].error
                                     or "no other rank runs the same program up to numbers")
            return out
        if isinstance(res, dict):  # the representative's job
            failed = [r for r, c in sorted(res.items()) if isinstance(c, str)]
            for r in failed:
                reasons.setdefault(r, res[r])
            return [("one", r, "quiet") for r in failed]
        return []

    jobs = [("one", None), ("record", rep)]  # the other recordings follow if rank 0's can lead
    results = _labelled(functools.partial(_job, problem, lower), jobs, in_processes, workers, then)
    by_rank: dict = {}
    traced: set = set()
    reps: list = []
    for j, res in zip(results["jobs"], results["values"]):
        if j[0] == "rep":
            by_rank.update({r: c for r, c in res.items() if not isinstance(c, str)})
            if not isinstance(res[j[1]], str):
                traced.add(j[1])
                reps.append(j[1])
        elif j[0] == "one":
            by_rank[j[1]] = res
            if j[1] is not None:
                traced.add(j[1])
    stats = {
        "traced": len(traced), "specialized": W - len(traced), "representatives": sorted(reps),
        "traced_ranks": sorted(traced), "record_s": times.get("record_s"),
        "record_rank_s": [round(recs[r].seconds, 4) for r in range(W) if r in recs],
        "fallback": {r: reasons[r] for r in sorted(reasons) if r in traced},
        "fallback_reason": next((reasons[r] for r in sorted(reasons) if r in traced), None),
    }
    return [by_rank[None], *(by_rank[r] for r in range(W))], stats


def _labelled(job, jobs: list[tuple], in_processes: bool, workers: int, then=None):
    """`_run` of ``jobs``; a dead child is reported with the program it was capturing. With
    ``then`` (see `run_forked`): {"jobs": every job run, "values": their results}."""
    jobs = list(jobs)
    extra: list = []
    done = [0]

    def more(i, res):
        new = list(then(i, res)) if then is not None else []
        extra.extend(new)
        if _progress is not None:
            from gg_notebook.capture.progress import describe_job

            done[0] += 1
            everything = jobs + extra
            _progress("capture", done[0], len(everything), describe_job(everything[i]))
        return new

    try:
        values = _run(job, jobs, in_processes, workers, more)
    except ChildDied as e:
        everything = jobs + extra
        e.item = everything[e.index][1] if e.index < len(everything) else None
        raise
    return values if then is None else {"jobs": jobs + extra, "values": values}
