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
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx

from gg_notebook.capture.collectives import IssuedCollective, MatchedCollective, match_collectives
from gg_notebook.capture.errors import CaptureError, program_name
from gg_notebook.capture.forked import ChildDied, ResultNotSent, fork_available, run_forked
from gg_notebook.capture.tracing import _n_outputs, check_output_counts, forget_rank_caches, trace_program, warm_up
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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def capture_and_lower(problem: Problem, lower: Lower, mode: str = "auto") -> LoweredProgram:
    """Trace and ``lower`` the sequential program and every rank's program; match collectives.

    ``mode``: "processes" (each program in its own forked process), "inprocess" (all in this
    process, one after the other) or "auto" (processes where fork is available)."""
    if mode not in MODES:
        raise ProblemError(f"capture must be one of {', '.join(map(repr, MODES))}, not {mode!r}")
    if mode == "processes" and not fork_available():
        raise ProblemError("capture='processes' needs the fork start method (Linux); use capture='inprocess'")
    W = problem.world_size
    programs: list[int | None] = [None, *range(W)]
    in_processes = mode == "processes" or (mode == "auto" and fork_available())
    warm_s = 0.0
    if in_processes:
        warm_s = warm_up()  # once per process, so that no child pays for the first trace
        workers = min(_cores(), len(programs))
        try:
            captured = run_forked(functools.partial(_capture_one, problem, lower), programs, workers)
        except ChildDied as e:
            who = programs[e.index]
            raise CaptureError(
                f"{program_name(who)}'s capture process {e.how} while tracing "
                f"{'the sequential function' if who is None else 'the per-rank function'}: the process "
                "crashed or exited (e.g. a segfault in an extension or os._exit in the traced code). "
                "Run gg.verify(problem, capture='inprocess') to see the crash in this process.",
                rank=who,
            ) from None
        except ResultNotSent as e:
            from gg_notebook.result import VerificationError

            raise VerificationError(
                f"gg_notebook failed while capturing {program_name(getattr(e, 'item', None))} in its own "
                f"process: {e}. This is a gg_notebook "
                "limitation, not a mistake in your problem: please report it with the program that triggers "
                "it; gg.verify(problem, capture='inprocess') avoids it.", stage="capturing",
                rank=getattr(e, "item", None),
            ) from e
    else:
        workers = 1
        captured = []
        for r in programs:
            forget_rank_caches()
            captured.append(_capture_one(problem, lower, r))
    seq, ranks = captured[0], captured[1:]
    check_output_counts(seq.n_outputs, [c.n_outputs for c in ranks])
    matched = match_collectives([c.issued for c in ranks])
    stats = {
        "capture_mode": "processes" if in_processes else "inprocess",
        "capture_workers": workers,
        "capture_seq_s": seq.seconds,  # tracing + lowering, in its own process in "processes" mode
        "capture_rank_s": [c.seconds for c in ranks],
    }
    if warm_s:
        stats["capture_warmup_s"] = warm_s
    return LoweredProgram(
        sequential=seq.graph, ranks=[c.graph for c in ranks], world_size=W, collectives=matched,
        input_mutations={r: c.input_mutations for r, c in zip(programs, captured)}, stats=stats,
    )
