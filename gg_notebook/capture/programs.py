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
says how many ranks were traced, how many specialized, and why any rank was not, and the seconds of
work per phase (``phases_s``: record, trace, copy, lower, and the representative's wait).

Both cores stay busy (forked children, no executor): rank 0 is traced in every case (as the
representative of its class, or alone), so its trace starts at once, beside the sequential trace,
and is not preceded by a plain recording: the recorder runs inside the trace, and its recording is
handed over (`forked.hand_over`) as soon as the trace ends and is what the other ranks' recordings,
running meanwhile, are compared with. Rank 0 is then lowered and waits for the comparison
(`_Members`), holding no worker slot meanwhile (`forked.waiting`); the ranks of its class are then
copied and lowered by the representative and helpers forked from it, one share each (`_derive`).
The derived graphs generate no Python code (lazy graph modules: lowering only walks them). With an
executor, or in this process, rank 0 is recorded plainly first, a representative starts when the
recordings are in and derives its ranks itself.
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
from gg_notebook.capture.forked import ChildDied, Interim, ResultNotSent, fork_available, run_forked
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
    phases: dict = field(default_factory=dict)  # seconds spent {"trace_s", "copy_s", "lower_s", "wait_s"}
    pass1: str | None = None  # how its first pass was traced (tracing._trace: "direct" or "make_fx ..."); None if derived


def _capture_one(problem: Problem, lower: Lower, rank: int | None) -> _Captured:
    t0 = time.perf_counter()
    gm, issued = trace_program(problem, rank)
    t1 = time.perf_counter()
    graph = lower(gm, rank)
    t2 = time.perf_counter()
    return _Captured(graph, issued, _n_outputs(gm), dict(gm.meta.get("gg_input_mutations", {})),
                     t2 - t0, {"trace_s": t1 - t0, "lower_s": t2 - t1}, gm.meta.get("gg_pass1"))


class _Members:
    """The channel over which this process tells a representative started early (before the other
    ranks' recordings were in) which ranks to derive: `give` the `Diff`s of its class (perhaps none)
    or `stop` (a capture failed: nothing to derive). Created before the representative's process is
    forked; it `receive`s them there. One message, the first of the two."""

    def __init__(self) -> None:
        import multiprocessing

        self._recv, self._send = multiprocessing.get_context("fork").Pipe(duplex=False)
        self._parent = os.getpid()
        self.diffs: list[Diff] | None = None  # what was given (here, in the parent)

    def give(self, diffs: list[Diff]) -> None:
        if self.diffs is None:
            self.diffs = list(diffs)
            self._send.send_bytes(_serialize().dumps(("diffs", self.diffs)))

    def stop(self) -> None:
        if self.diffs is None:
            self.diffs = []
            self._send.send_bytes(_serialize().dumps(("stop",)))

    def receive(self) -> list[Diff] | None:
        """In the representative's process: the diffs, or None if told to stop. Ends this process
        if its parent is gone (nobody would ever answer)."""
        while not self._recv.poll(1.0):
            if os.getppid() != self._parent:
                os._exit(1)
        msg = _serialize().loads(self._recv.recv_bytes())
        return msg[1] if msg[0] == "diffs" else None

    def close(self) -> None:
        self._recv.close()
        self._send.close()


def _serialize():
    from gg_notebook.ir import serialize

    return serialize


@dataclass
class _Packed:
    """Captures lowered in a helper process of a representative ({rank: _Captured | reason}), still
    pickled: unpacked only in the parent (`_unpack`), not once more in between."""

    data: bytes


def _unpack(res: dict) -> dict:
    """A representative's result with its `_Packed` parts unpacked (in place; returned)."""
    for k in [k for k, v in res.items() if isinstance(v, _Packed)]:
        res.update(_serialize().loads(res.pop(k).data))
    return res


def _trace_representative(problem: Problem, rank: int):
    """(graph, collectives, the recording made under make_fx), or why the recorded trace failed."""
    try:
        with recording_calls():
            gm, issued = trace_program(problem, rank)
    except Exception as e:  # noqa: BLE001 - traced again without the recorder, which reports it
        return f"the representative's recorded trace raised {type(e).__name__}"
    return gm, issued, gm.meta.pop("gg_recording", None) or Recording(rank, error="no recording")


def _capture_representative(problem: Problem, lower: Lower, rep: "Recording | None", diffs: "list[Diff] | _Members",
                            rank: int, workers: int = 1) -> dict:
    """Trace ``rank`` (the representative) with its operator calls recorded, derive the graphs of
    the ranks in ``diffs`` from it (`symmetry.Specializer`) and lower them all.

    ``rep`` is the rank's plain recording, which the diffs were made against (the recording under
    the trace must equal it), or None: the rank was not recorded plainly, and the recording made by
    its trace is what the other ranks are compared with. It is handed over to the parent
    (`forked.hand_over`) as soon as the trace ends, before lowering.

    ``diffs`` is a `_Members` when the trace starts before the other ranks' recordings are in: the
    representative is traced and lowered, then waits (holding no worker slot, `forked.waiting`) for
    the diffs of its class; its graph is copied first (lowering rewrites a graph in place).
    ``workers`` > 1: the derived ranks are copied and lowered by that many processes, this one and
    helpers forked from it (`_derive`).

    Returns {rank: _Captured | reason (str) | _Packed}: a reason for each rank that could not be
    derived (it is traced on its own afterwards). If the representative's own trace fails here, every
    entry is a reason (the plain trace, without the recorder, then reports the error)."""
    t0 = time.perf_counter()
    traced = _trace_representative(problem, rank)
    trace_s = time.perf_counter() - t0
    if rep is None:  # the other ranks are compared with the recording this trace made
        from gg_notebook.capture.forked import hand_over

        rep = traced[2] if not isinstance(traced, str) else Recording(rank, error=traced)
        if not hand_over(rep):
            raise RuntimeError("a representative without a plain recording runs in a forked child")
    out: dict = {}
    phases = {"trace_s": trace_s, "copy_s": 0.0, "lower_s": 0.0, "wait_s": 0.0}
    early = isinstance(diffs, _Members)
    if early:
        if not isinstance(traced, str):
            gm, issued, rec = traced
            n_out, mutations = _n_outputs(gm), dict(gm.meta.get("gg_input_mutations", {}))
            t1 = time.perf_counter()
            pristine = _copy_graph(gm)
            t2 = time.perf_counter()
            # the representative is the lowest rank of its class: its lowering error is the one reported
            out[rank] = _Captured(lower(gm, rank), issued, n_out, mutations, 0.0, pass1=gm.meta.get("gg_pass1"))
            phases["copy_s"] += t2 - t1
            phases["lower_s"] += time.perf_counter() - t2
            traced = pristine, issued, rec
        from gg_notebook.capture.forked import waiting

        t1 = time.perf_counter()
        with waiting():
            diffs = diffs.receive()
        phases["wait_s"] = time.perf_counter() - t1
        if diffs is None:  # another capture failed: that failure is reported
            return {}
    if isinstance(traced, str):
        return {r: traced for r in [rank, *(d.rank for d in diffs)]}
    gm, issued, rec = traced
    spec = Specializer(gm, rep, rec)
    n_out, mutations = _n_outputs(gm), dict(gm.meta.get("gg_input_mutations", {}))
    derived, phases["helpers"] = _derive(spec, sorted(diffs, key=lambda d: d.rank), lower, issued, n_out,
                                         mutations, workers, None if early else (rank, phases))
    out.update(derived)
    rep_c = out[rank]
    rep_c.seconds = phases["trace_s"] + phases["copy_s"] + phases["lower_s"]
    rep_c.phases = phases
    return out


def _copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (its graph, meta and constants) that lowering ``gm`` leaves as it is."""
    from gg_notebook.capture.symmetry import _copy_with

    return _copy_with(gm, [])


def _derive(spec: Specializer, diffs: list[Diff], lower: Lower, issued, n_out: int, mutations: dict,
            workers: int, rep: "tuple[int, dict] | None") -> tuple[dict, int]:
    """The derived ranks' captures (or reasons), ``diffs`` in rank order; with ``rep`` = (rank,
    phases), the representative's graph ``spec.gm`` is lowered here too, after every copy made of it
    in this process (lowering rewrites it in place) and before any derived rank is lowered.

    With ``workers`` > 1 the ranks are split in consecutive shares: this process takes the first (the
    lowest ranks, so a lowering error it meets is the one to report), one forked helper each of the
    others, which send their captures back pickled (`_Packed`). A helper's lowering error is reported
    if no lower rank has one; a helper that dies has its share redone here (a crash then ends this
    process, as it would have without helpers). Returns (the captures, the number of helpers)."""
    n = max(1, min(workers, len(diffs)))
    shares = [diffs[len(diffs) * k // n: len(diffs) * (k + 1) // n] for k in range(n)]
    helpers = [_fork_share(spec, share, lower, issued, n_out, mutations) for share in shares[1:]]
    try:
        out, error = _derive_share(spec, shares[0], lower, issued, n_out, mutations, rep)
        if error is not None:
            raise error
        for share, helper in zip(shares[1:], helpers):
            got = _join_share(helper)
            if got is None:  # the helper died: redo its share here
                part, error = _derive_share(spec, share, lower, issued, n_out, mutations, None)
                if error is not None:
                    raise error
                out.update(part)
            elif got[0] == "error":
                from gg_notebook.capture.forked import rebuild_exception

                raise rebuild_exception(got[1])
            else:
                out[("packed", share[0].rank)] = _Packed(got[1])
        return out, len(helpers)
    finally:
        for pid, fd in helpers:
            _reap(pid, fd)


def _derive_share(spec: Specializer, share: list[Diff], lower: Lower, issued, n_out: int, mutations: dict,
                  rep: "tuple[int, dict] | None") -> tuple[dict, BaseException | None]:
    """Copy (every copy first) and lower the ranks of ``share`` (and ``rep``'s graph, see `_derive`);
    ({rank: _Captured | reason}, the first lowering error or None)."""
    out: dict = {}
    copies = []
    for d in share:
        t1 = time.perf_counter()
        g = spec.graph_for(d)
        if isinstance(g, str):
            out[d.rank] = g
        else:
            copies.append((d.rank, g, time.perf_counter() - t1))
    try:
        if rep is not None:
            rank, phases = rep
            phases["copy_s"] += sum(c for _, _, c in copies)
            t2 = time.perf_counter()
            gm = spec.gm
            out[rank] = _Captured(lower(gm, rank), issued, n_out, mutations, 0.0, pass1=gm.meta.get("gg_pass1"))
            phases["lower_s"] += time.perf_counter() - t2
        for r, g, copy_s in copies:
            t1 = time.perf_counter()
            graph = lower(g, r)
            lower_s = time.perf_counter() - t1
            out[r] = _Captured(graph, [dataclasses.replace(c, rank=r) for c in issued], n_out, mutations,
                               copy_s + lower_s, {"copy_s": copy_s, "lower_s": lower_s})
    except Exception as e:  # noqa: BLE001 - reported by the caller, lowest rank first
        return out, e
    return out, None


def _fork_share(spec, share, lower, issued, n_out, mutations) -> tuple[int, int]:
    """Fork a helper that derives ``share`` and writes ("ok", pickled {rank: ...}) or ("error", payload)
    to a pipe; (its pid, the pipe's read end). Plain os.fork: this process may be a daemonic child,
    which multiprocessing does not let have children."""
    from gg_notebook.capture.forked import exception_payload
    from gg_notebook.runners.gloo import die_with_parent

    serialize = _serialize()
    parent = os.getpid()
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # the helper
        code = 0
        try:
            os.close(rd)
            die_with_parent(parent, 24 * 3600.0)
            out, error = _derive_share(spec, share, lower, issued, n_out, mutations, None)
            if error is not None:
                data = serialize.dumps(("error", exception_payload(error)))
            else:
                data = serialize.dumps(("ok", serialize.dumps(out)))
            with os.fdopen(wr, "wb") as f:
                f.write(data)
        except BaseException:  # noqa: BLE001 - the parent redoes the share
            code = 1
        finally:
            os._exit(code)
    os.close(wr)
    return pid, rd


def _join_share(helper: tuple[int, int]):
    """What the helper sent, or None if it ended without sending it."""
    pid, fd = helper
    chunks = []
    try:
        while True:
            b = os.read(fd, 1 << 22)
            if not b:
                break
            chunks.append(b)
    except OSError:
        return None
    if not chunks:
        return None
    try:
        return _serialize().loads(b"".join(chunks))
    except Exception:  # noqa: BLE001 - cut short: the helper died while writing
        return None


def _reap(pid: int, fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    try:
        os.kill(pid, 9)
    except OSError:
        pass
    try:
        os.waitpid(pid, 0)
    except OSError:
        pass


def _run(fn, items: list, in_processes: bool, workers: int, then=None, on_failure=None) -> list:
    """``[fn(item) for item in items]`` (plus what ``then`` appends, see `run_forked`), each in its
    own forked process, on the executor `capture_and_lower` was given, or all in this process."""
    if not items:
        return []
    if _executor is not None:
        return _run_on_executor(_executor, fn, items, then)
    if in_processes:
        return run_forked(fn, items, workers, then, on_failure)
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
        if len(job) > 2 and job[2].closed:
            return _NotRecorded(job[1])
        return record_rank(problem, job[1])
    if kind == "rep":
        return _capture_representative(problem, lower, job[2], job[3], job[1], job[4] if len(job) > 4 else 1)
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
    # how each traced program's first pass was made: capture.direct_trace, or make_fx where it refused
    stats["capture_pass1"] = {("sequential" if p is None else p): c.pass1
                              for p, c in zip(programs, captured) if c.pass1 is not None}
    if once_stats is not None:
        stats["capture"] = once_stats
    return LoweredProgram(
        sequential=seq.graph, ranks=[c.graph for c in ranks], world_size=W, collectives=matched,
        input_mutations={r: c.input_mutations for r, c in zip(programs, captured)}, stats=stats,
    )


def _capture_once(problem: Problem, lower: Lower, in_processes: bool, workers: int) -> tuple[list, dict]:
    """The captures of [sequential, rank 0, ..., rank W-1], tracing only what `symmetry` cannot
    derive; and the stats of how (see the module docstring).

    With forked children (no executor), jobs, each in its own process: the sequential trace, rank 0's
    recorded trace (`_capture_representative`: it hands its recording over as soon as its trace
    ends, is lowered, then waits for the comparison, `_Members`) and the other ranks' recordings. If
    rank 0's recording shows that no rank can be derived from it (an error, point-to-point transfers,
    custom operators), every rank is traced: the recordings that have not started by then are not
    made (`_Gate`). Without forked children (an executor, or this process), rank 0 is recorded first,
    then the others. When the recordings are in, one trace per (other) class of ranks that run the
    same program up to numbers (deriving the others) and the trace of every rank in no class; a rank
    a representative could not derive after all is traced last. A problem with decompositions traces
    every rank (`symmetry.user_code_reason`) without recording any."""
    W = problem.world_size
    rep = 0
    t0 = time.perf_counter()
    recs: dict[int, Recording] = {}
    reasons: dict[int, str] = {}
    times: dict[str, float] = {}
    forked = in_processes and _executor is None
    derive_workers = workers if forked else 1  # a representative's helpers are forked from it
    members: list[_Members] = []  # rank 0's early representative job, if any
    gate = _Gate()
    early: list[str] = []  # why no rank can be derived from rank 0's recording, once known

    def decide_early(why: str) -> list[tuple]:
        """No rank is derived from rank 0: trace each (rank 0's early job keeps its own capture)."""
        early.append(why)
        gate.closed = True
        times["record_s"] = time.perf_counter() - t0
        for r in range(W):
            reasons[r] = why if r == rep else f"rank {rep} cannot be a representative: {why}"
        out = []
        if members:
            members[0].give([])
        else:
            out.append(("one", rep, "quiet"))
        # a rank recorded already showed its output; the others are traced when their recording
        # job ends (`_NotRecorded`: it started after this), or at once if none was scheduled
        out += [("one", r, "quiet") for r in sorted(recs) if r != rep]
        if not forked:
            out += [("one", r) for r in range(W) if r != rep and r not in recs]
        return out

    def then(_i: int, res) -> list[tuple]:
        if isinstance(res, Interim):  # rank 0's recording, made by its early trace
            res = res.value
        if isinstance(res, _NotRecorded):
            return [("one", res.rank)]
        if isinstance(res, Recording):
            if early:  # a recording that was running when rank 0's showed that nobody is derived
                return [("one", res.rank, "quiet")]
            recs[res.rank] = res
            if res.rank == rep:
                why = res.error or p2p_reason(res) or user_code_reason(res, problem)
                if why:
                    return decide_early(why)
                if not forked:
                    return [("record", r) for r in range(W) if r != rep]
            if len(recs) < W:
                return []
            times["record_s"] = time.perf_counter() - t0
            # classes of ranks that run the same program up to numbers, each led by its lowest rank
            classes: list[tuple[int, list[Diff]]] = []
            first_reason: dict[int, str] = {}
            for r in range(W):
                for lead, ms in classes:
                    d = compare(recs[lead], recs[r])
                    if isinstance(d, Diff):
                        ms.append(d)
                        break
                    first_reason.setdefault(r, d)
                else:
                    classes.append((r, []))
            out = []
            for lead, ms in classes:
                if ms:
                    if lead != rep:
                        reasons[lead] = f"leads its own class (differs from rank {rep}: {first_reason[lead]})"
                else:
                    reasons[lead] = (first_reason.get(lead) or recs[lead].error
                                     or "no other rank runs the same program up to numbers")
                if lead == rep and members:
                    members[0].give(ms)  # already traced (and lowered), waiting for these
                elif ms:
                    out.append(("rep", lead, recs[lead], ms, derive_workers, "quiet"))
                else:
                    out.append(("one", lead, "quiet"))
            return out
        if isinstance(res, dict):  # a representative's job
            _unpack(res)
            failed = [r for r, c in sorted(res.items()) if isinstance(c, str)]
            for r in failed:
                reasons.setdefault(r, res[r])
            return [("one", r, "quiet") for r in failed]
        return []

    def on_failure(_i: int) -> None:  # a capture failed: rank 0's representative must not wait forever
        for m in members:
            m.stop()

    planned = user_code_reason(Recording(rep), problem)  # the problem's own decompositions
    if planned:
        jobs = [("one", None)]
        early.append(planned)
        for r in range(W):
            reasons[r] = planned
            jobs.append(("one", r))
    elif forked:
        # rank 0 is traced whatever the others' recordings say (as representative, or alone)
        members.append(_Members())
        jobs = [("one", None), ("rep", rep, None, members[0], derive_workers),
                *(("record", r, gate) for r in range(W) if r != rep)]
    else:
        jobs = [("one", None), ("record", rep)]  # the other recordings follow if rank 0's can lead
    try:
        results = _labelled(functools.partial(_job, problem, lower), jobs, in_processes, workers, then,
                            on_failure)
    finally:
        for m in members:
            m.stop()
            m.close()
    by_rank: dict = {}
    traced: set = set()
    reps: list = []
    phases = {"trace_s": 0.0, "copy_s": 0.0, "lower_s": 0.0, "wait_s": 0.0}
    for j, res in zip(results["jobs"], results["values"]):
        if j[0] == "rep":
            _unpack(res)
            by_rank.update({r: c for r, c in res.items() if not isinstance(c, str)})
            if not isinstance(res.get(j[1], ""), str):
                traced.add(j[1])
                if _class_of(j):  # an early rank 0 may have led no class after all
                    reps.append(j[1])
        elif j[0] == "one":
            by_rank[j[1]] = res
            if j[1] is not None:
                traced.add(j[1])
    helpers = 0
    for c in by_rank.values():
        for k, v in c.phases.items():
            if k == "helpers":
                helpers += v
            else:
                phases[k] = phases.get(k, 0.0) + v
    stats = {
        "traced": len(traced), "specialized": W - len(traced), "representatives": sorted(reps),
        "traced_ranks": sorted(traced), "record_s": times.get("record_s"),
        # seconds of each plain recording (an early rank 0 is recorded by its trace: not listed)
        "record_rank_s": {r: round(recs[r].seconds, 4) for r in range(W) if r in recs and recs[r].seconds},
        "recorded_by_trace": [rep] if members and rep in recs else [],
        "early_representative": bool(members),
        "derive_helpers": helpers,  # processes forked by representatives to copy and lower derived ranks
        # seconds of work summed over processes (not wall time): recording, tracing (sequential and
        # ranks), copying derived graphs, lowering, and a representative's wait for the recordings
        "phases_s": {"record_s": round(sum(r.seconds for r in recs.values()), 3),
                     **{k: round(v, 3) for k, v in phases.items()}},
        "fallback": {r: reasons[r] for r in sorted(reasons) if r in traced},
        "fallback_reason": next((reasons[r] for r in sorted(reasons) if r in traced), None),
    }
    return [by_rank[None], *(by_rank[r] for r in range(W))], stats


@dataclass
class _NotRecorded:
    """A recording job that started after rank 0's recording showed that no rank is derived."""

    rank: int


class _Gate:
    """Closed once no recording is needed. A recording job reads it in its forked child, that is as
    it was when the child started: a job that starts after the gate closed records nothing."""

    closed = False


def _class_of(job: tuple) -> list[Diff]:
    """The ranks a representative's job derives (``job[3]``: the diffs, or the `_Members` told them)."""
    return (job[3].diffs or []) if isinstance(job[3], _Members) else job[3]


def _labelled(job, jobs: list[tuple], in_processes: bool, workers: int, then=None, on_failure=None):
    """`_run` of ``jobs``; a dead child is reported with the program it was capturing. With
    ``then`` (see `run_forked`): {"jobs": every job run, "values": their results}."""
    jobs = list(jobs)
    extra: list = []
    done = [0]

    def more(i, res):
        new = list(then(i, res)) if then is not None else []
        extra.extend(new)
        if _progress is not None and not isinstance(res, Interim):
            from gg_notebook.capture.progress import describe_job

            done[0] += 1
            everything = jobs + extra
            _progress("capture", done[0], len(everything), describe_job(everything[i]))
        return new

    try:
        values = _run(job, jobs, in_processes, workers, more, on_failure)
    except ChildDied as e:
        everything = jobs + extra
        e.item = everything[e.index][1] if e.index < len(everything) else None
        raise
    return values if then is None else {"jobs": jobs + extra, "values": values}
