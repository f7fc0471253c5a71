"""Capture once, in parallel: rank 0's recorded trace starts before the other ranks' recordings are in
and waits for them without holding a core (`capture.forked.waiting`); the derived ranks are copied and
lowered by helper processes forked from the representative (`capture.programs._derive`); derived
graphs generate no Python code unless someone runs them (`torch.fx._lazy_graph_module`).

The verdicts, the graphs, the reported errors (the lowest rank's) and the stats must be what the
serial scheme gives.
"""

import multiprocessing
import os
import signal

import pytest
import torch
import torch.distributed as dist

import gg_notebook as gg
from gg_notebook.capture import CaptureError, forked, programs, symmetry
from gg_notebook.capture import tracing as T
from gg_notebook.capture.programs import capture_and_lower
from gg_notebook.ir.lower import lower as ir_lower
from test_capture_once import problem as _problem, row_parallel  # written once

pytestmark = pytest.mark.skipif(not forked.fork_available(), reason="needs fork")


def problem(fn, W=8, n=16, seed=0):
    return _problem(fn, W=W, n=n, seed=seed)


def rank_scaled(x, w):
    r = dist.get_rank()
    y = (x * (r + 2.0)) @ w / (r + 2.0)  # rank constants: substituted in every derived rank
    dist.all_reduce(y)
    return y


def rank_scaled_wrongly(x, w):
    r = dist.get_rank()
    y = (x * (r + 2.0)) @ w
    y = y / 2.0 if r < 5 else y / (r + 2.0)  # right for rank 0 and ranks >= 5 only... not rank 1-4
    dist.all_reduce(y)
    return y


def every_rank_differs(x, w):
    y = x @ w
    for _ in range(dist.get_rank()):  # another number of operator calls on every rank
        y = y + 0.0
    dist.all_reduce(y)
    return y


def _signature(g):
    return [(n.op, n.target, n.shape, n.dtype, n.source, tuple(i.index for i in n.inputs)) for n in g.nodes]


def _alarm(seconds):
    """Fail instead of hanging (a child waiting forever would block the test run)."""
    def boom(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    return old


@pytest.fixture
def cores(monkeypatch):
    """Pretend this machine has ``n`` cores (the helpers are forked processes: they run on any machine)."""
    def set_cores(n):
        monkeypatch.setattr(programs, "_cores", lambda: n)
    return set_cores


# ------------------------------------------------------------------ run_forked: waiting children


def _waits_or_answers(item):
    kind, conn = item
    if kind == "wait":
        with forked.waiting():
            if not conn.poll(30):
                raise TimeoutError("the parent never answered")
            return ("got", conn.recv())
    if kind == "fail":
        raise ValueError("the second call fails")
    return ("done", kind)


def test_a_waiting_child_holds_no_worker_slot():
    """One worker: the first call waits for data the parent sends when the second call's result is in;
    without `waiting` the second call would never start."""
    recv, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    old = _alarm(60)
    try:
        def then(i, res):
            if res == ("done", "answer"):
                send.send("the answer")
            return []

        out = forked.run_forked(_waits_or_answers, [("wait", recv), ("answer", None)], workers=1, then=then)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert out == [("got", "the answer"), ("done", "answer")]


def test_on_failure_releases_a_waiting_child():
    recv, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    seen = []

    def on_failure(i):
        seen.append(i)
        send.send("stop")

    old = _alarm(60)
    try:
        with pytest.raises(ValueError, match="second call fails"):
            forked.run_forked(_waits_or_answers, [("wait", recv), ("fail", None)], workers=1, on_failure=on_failure)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert seen == [1]


# ------------------------------------------------------------------ the representative's helpers


@pytest.mark.parametrize("fn", [row_parallel, rank_scaled])
def test_helpers_lower_the_same_graphs(fn, cores):
    p = problem(fn)
    cores(1)
    serial = capture_and_lower(p, ir_lower)
    cores(3)
    par = capture_and_lower(p, ir_lower)
    assert par.stats["capture"]["derive_helpers"] == 2 and serial.stats["capture"]["derive_helpers"] == 0
    assert par.stats["capture"]["traced_ranks"] == serial.stats["capture"]["traced_ranks"] == [0]
    assert _signature(par.sequential) == _signature(serial.sequential)
    for a, b in zip(par.ranks, serial.ranks):
        assert a.rank == b.rank and _signature(a) == _signature(b)
    assert [(c.kind, c.group, c.nodes) for c in par.collectives] == [(c.kind, c.group, c.nodes) for c in serial.collectives]


def _failing_lower(ranks):
    def lower(gm, rank):
        if rank in ranks:
            raise ValueError(f"cannot lower rank {rank}")
        return ir_lower(gm, rank)
    return lower


@pytest.mark.parametrize("bad,reported", [({3, 6}, 3), ({6}, 6), ({2, 7}, 2), ({0, 5}, 0), ({5, 7}, 5)])
@pytest.mark.parametrize("n_cores", [1, 3])
def test_the_lowest_ranks_lowering_error_is_reported(bad, reported, n_cores, cores):
    """Derived ranks 1-7 in shares [1, 2] (the representative), [3, 4], [5, 6, 7] (helpers)."""
    cores(n_cores)
    with pytest.raises(ValueError, match=f"cannot lower rank {reported}$"):
        capture_and_lower(problem(row_parallel), _failing_lower(bad))


def _exits_lowering(rank):
    def lower(gm, r):
        if r == rank:
            os._exit(7)
        return ir_lower(gm, r)
    return lower


@pytest.mark.parametrize("n_cores", [1, 3])
def test_a_lowering_that_kills_its_process_is_reported_for_the_representative(n_cores, cores):
    """As without helpers: the representative's process (rank 0's) ends; a dead helper's share is
    redone by the representative, which then ends the same way."""
    cores(n_cores)
    with pytest.raises(CaptureError, match="rank 0's capture process exited with code 7") as e:
        capture_and_lower(problem(row_parallel), _exits_lowering(6))
    assert e.value.rank == 0


# ------------------------------------------------------------------ rank 0 traced early


def test_rank_0_traced_early_and_leading_no_class_is_traced_alone():
    r = gg.verify(problem(every_rank_differs, W=3, n=12))
    c = r.stats["capture"]
    assert c["early_representative"] and c["representatives"] == [] and c["traced_ranks"] == [0, 1, 2], c
    assert "no other rank" in c["fallback"][0] and "operator calls" in c["fallback"][1], c
    assert r.status is gg.verify(problem(every_rank_differs, W=3, n=12), capture_once=False).status


@pytest.mark.parametrize("fn", [rank_scaled, rank_scaled_wrongly])
def test_early_representative_gives_the_verdict_of_tracing_every_rank(fn, cores):
    cores(2)
    r = gg.verify(problem(fn))
    c = r.stats["capture"]
    assert c["early_representative"] and c["traced_ranks"] == [0] and c["specialized"] == 7, c
    assert set(c["phases_s"]) >= {"record_s", "trace_s", "copy_s", "lower_s", "wait_s"}, c
    assert r.status is gg.verify(problem(fn), capture_once=False).status
    assert r.status is (gg.Status.PROVED if fn is rank_scaled else gg.Status.REFUTED)


def test_no_early_representative_in_process_or_on_an_executor():
    from concurrent.futures import ProcessPoolExecutor

    r = gg.verify(problem(rank_scaled, W=4), capture="inprocess")
    assert not r.stats["capture"]["early_representative"] and r.stats["capture"]["traced_ranks"] == [0]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("fork")) as ex:
        r2 = gg.verify(problem(rank_scaled, W=4), executor=ex)
    assert not r2.stats["capture"]["early_representative"] and r2.stats["capture"]["traced_ranks"] == [0]
    assert r.status is r2.status is gg.Status.PROVED


def fails_on_rank_5(x, w):
    if dist.get_rank() == 5:
        raise ValueError("rank 5 has no weights")
    return row_parallel(x, w)


def test_a_failing_recording_rank_is_reported_and_the_representative_released():
    """Rank 5's recording fails (so it is traced on its own, which raises) while rank 0's early trace
    waits for its class: the error is rank 5's, nothing hangs."""
    old = _alarm(120)
    try:
        with pytest.raises(CaptureError, match="rank 5") as e:
            gg.verify(problem(fails_on_rank_5))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert e.value.rank == 5


# ------------------------------------------------------------------ lazy graph modules


def scaled_locally(x, w):
    r = dist.get_rank()
    return (x * (r + 2.0)) @ w  # no collective: the graph runs as is


def test_derived_graph_generates_its_code_only_when_used():
    p = problem(scaled_locally, W=4)
    recs = [symmetry.record_rank(p, r) for r in range(4)]
    with T.recording_calls():
        gm0, _ = T.trace_program(p, 0)
    spec = symmetry.Specializer(gm0, recs[0], gm0.meta["gg_recording"])
    g = spec.graph_for(symmetry.compare(recs[0], recs[3]))
    assert type(g)._needs_recompile()  # no code generated yet
    full, _ = T.trace_program(p, 3)
    assert g.code == full.code  # generated on demand, the same as rank 3's own trace
    # and it runs: rank 3's function on concrete local inputs
    x, w = p.inputs
    xl, wl = x[:, 6:8], w[6:8]
    assert torch.allclose(g(xl, wl)[0], (xl * 5.0) @ wl)


# ------------------------------------------------------------------ Ctrl-C


_INTERRUPTED = r'''
import os, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import gg_notebook as gg
from gg_notebook.problem import Problem, Replicate, Shard

PIDS = {pids!r}

def linear(x, w):
    return x @ w

def slow_on_rank_3(x, w):
    with open(PIDS, "a") as f:
        f.write(f"{{os.getpid()}}\n")
    if dist.get_rank() == 3:
        time.sleep(120)  # its recording never ends: rank 0's early trace waits for it
    y = x @ w
    dist.all_reduce(y)
    return y

g = torch.Generator().manual_seed(0)
p = Problem(sequential=linear, distributed=slow_on_rank_3,
            inputs=(torch.randn(3, 8, generator=g), torch.randn(8, 5, generator=g)),
            placements=(Shard(1), Shard(0)), world_size=4, expect=(Replicate(),))
print("start", flush=True)
gg.verify(p)
'''


def test_ctrl_c_while_the_representative_waits_stops_every_process(tmp_path):
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    script = tmp_path / "run.py"
    script.write_text(_INTERRUPTED.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          pids=str(pids)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # rank 0's trace and the recordings of ranks 1-3 have started (rank 3's recording sleeps)
        while time.monotonic() < deadline and (not pids.exists() or len(pids.read_text().split()) < 4):
            time.sleep(0.2)
        assert pids.exists() and len(pids.read_text().split()) >= 4, pids.read_text() if pids.exists() else None
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)  # as a notebook's interrupt: this process only
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    time.sleep(0.5)
    alive = []
    for pid in {int(p) for p in pids.read_text().split()}:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    assert not alive, f"capture processes left running: {alive}"


# ------------------------------------------------------------------ what a rank prints is shown once


def printing_rank_scaled(x, w):
    print(f"<rank {dist.get_rank()} runs>")
    return rank_scaled(x, w)


def printing_pipeline(x, w):
    rank = dist.get_rank()
    print(f"<rank {rank} runs>")
    if rank == 0:
        dist.send(x @ w, dst=1)
        return torch.empty(0)
    h = torch.empty(x.shape[0], w.shape[1])
    dist.recv(h, src=0)
    return h


@pytest.mark.parametrize("n_cores", [1, 2, 4])
def test_every_rank_prints_once_whether_derived_or_traced(n_cores, cores, capfd):
    """Rank 0 is recorded by its trace (no plain recording before it); ranks 1-3 by their recordings.
    A pipeline (point to point) derives nothing: every rank is traced, and recordings that had not
    started when rank 0's showed it are not made; a rank is never shown twice nor left out."""
    cores(n_cores)
    r = gg.verify(problem(printing_rank_scaled, W=4))
    c = r.stats["capture"]
    assert r.status is gg.Status.PROVED and c["traced_ranks"] == [0] and c["recorded_by_trace"] == [0], c
    assert 0 not in c["record_rank_s"] and set(c["record_rank_s"]) == {1, 2, 3}, c
    out = capfd.readouterr().out
    assert [out.count(f"<rank {k} runs>") for k in range(4)] == [1, 1, 1, 1], out

    x, w = torch.randn(4, 6), torch.randn(6, 3)
    p = gg.Problem(lambda x, w: x @ w, printing_pipeline, (x, w), (gg.Replicate(),) * 2, 2,
                   expect=(gg.OnRank(1),))
    r = gg.verify(p)
    c = r.stats["capture"]
    assert r.status is gg.Status.PROVED and c["traced_ranks"] == [0, 1], c
    assert "point to point" in c["fallback"][0] and "cannot be a representative" in c["fallback"][1], c
    out = capfd.readouterr().out
    assert [out.count(f"<rank {k} runs>") for k in range(2)] == [1, 1], out
