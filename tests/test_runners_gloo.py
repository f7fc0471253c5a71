"""The gloo launcher (`gg_notebook.runners.gloo`): rank processes meet through a file store in a
fresh temporary directory, never a port, so runs at the same time (two test processes, two
pytest-xdist workers, two threads) never meet in each other's rendezvous; the directory is gone
after every run, whether it succeeded, failed or timed out; a failing rank is reported at once."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

from gg_notebook.capture.forked import fork_available
from gg_notebook.runners.gloo import RankTimeout, fork_ranks

pytestmark = pytest.mark.skipif(not fork_available(), reason="needs fork")

# One job: once both jobs have said "ready", each runs the same gloo runs from two threads at once.
_JOB = """
import sys, threading
from gg_notebook import examples as E
from gg_notebook.runners.compare import compare

failures = []

def runs(thread):
    for i in range(4):
        try:
            ok, msg = compare(E.get("vocab_cross_entropy").make(world_size=2), backend="gloo")
            if not ok:
                failures.append(f"thread {thread} run {i}: {msg}")
            ok, _ = compare(E.get("vocab_cross_entropy").make(world_size=2, bug="local_max"), backend="gloo")
            if ok:
                failures.append(f"thread {thread} run {i}: the bug went unseen")
        except Exception as e:
            failures.append(f"thread {thread} run {i}: {type(e).__name__}: {e}")

print("ready", flush=True)
sys.stdin.readline()
threads = [threading.Thread(target=runs, args=(t,)) for t in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("failures:", failures, flush=True)
sys.exit(1 if failures else 0)
"""


def test_gloo_runs_at_the_same_time_all_succeed():
    """Two processes, each with two threads, each thread running gloo runs back to back: every run
    succeeds (with a port chosen and released before rank 0 bound it, runs could meet each other's
    rendezvous: ``Gloo connectFullMesh failed``, address in use)."""
    jobs = [subprocess.Popen([sys.executable, "-c", _JOB], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for j in jobs:
            assert j.stdout.readline().strip() == "ready", j.stderr.read()[-2000:]
        for j in jobs:  # start both together
            j.stdin.write("go\n")
            j.stdin.flush()
        outs = [j.communicate(timeout=300) for j in jobs]
    finally:
        for j in jobs:
            if j.poll() is None:
                j.kill()
                j.wait()
    for j, (out, err) in zip(jobs, outs):
        assert j.returncode == 0, out[-2000:] + err[-2000:]


def _all_reduce(rank: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fails_on_rank_1(rank: int) -> float:
    if rank == 1:
        raise ValueError("boom")
    return _all_reduce(rank)  # rank 0 waits for rank 1 in vain


def _hangs_on_rank_1(rank: int) -> None:
    if rank == 1:
        time.sleep(600)


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """Where the launcher makes its rendezvous directories (to see that none is left)."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def test_ranks_meet_through_a_file_store_that_is_removed(temp_dir):
    assert fork_ranks(3, _all_reduce, timeout=60) == {0: (6.0, None), 1: (6.0, None), 2: (6.0, None)}
    assert os.listdir(temp_dir) == []


def test_a_failing_rank_is_reported_at_once_and_the_store_removed(temp_dir):
    t0 = time.monotonic()
    got = fork_ranks(2, _fails_on_rank_1, timeout=120, stop_at_first_error=True)
    assert got == {1: (None, "ValueError('boom')")}
    assert time.monotonic() - t0 < 60  # not the timeout
    assert os.listdir(temp_dir) == []


def test_every_rank_is_waited_for_unless_told_to_stop(temp_dir):
    got = fork_ranks(2, _fails_on_rank_1, timeout=120, describe=lambda e: f"{type(e).__name__}: {e}")
    assert got[1] == (None, "ValueError: boom") and got[0][1] is not None  # rank 0's all-reduce failed
    assert os.listdir(temp_dir) == []


def test_a_hanging_rank_times_out_by_rank_and_the_store_is_removed(temp_dir):
    t0 = time.monotonic()
    with pytest.raises(RankTimeout, match="rank 1 timed out after 2 s") as e:
        fork_ranks(2, _hangs_on_rank_1, timeout=2)
    assert e.value.rank == 1 and time.monotonic() - t0 < 30
    assert os.listdir(temp_dir) == []


def _no_collective(rank: int) -> int:
    return rank * 10


def test_ranks_without_collectives_never_leave_a_peer_connecting(temp_dir):
    # a rank that runs no collective used to finish and destroy its group while a peer was still
    # connecting its mesh ("Connection closed by peer": ~1 run in 100 here); all ranks now meet first
    for _ in range(40):
        got = fork_ranks(4, _no_collective, timeout=60, stop_at_first_error=True)
        assert got == {r: (r * 10, None) for r in range(4)}, got
    assert os.listdir(temp_dir) == []


def _outputs_of_every_dtype(x):
    r = dist.get_rank()
    return (x.to(torch.bfloat16) + r, x.to(torch.float16) * r, (x > r).clone(), x.to(torch.int64)[0, 0] + r,
            torch.empty(0, 3, dtype=torch.bfloat16), x.to(torch.complex64).t(), r)


@pytest.mark.parametrize("world_size", [2, 3])
def test_outputs_come_back_bit_exact_in_every_dtype(world_size):
    from torch.distributed.tensor import Replicate

    from gg_notebook.problem import Problem
    from gg_notebook.runners.gloo import run_gloo

    x = torch.tensor([[1.5, -2.25, 3.0], [1e-3, -0.0, 7.0]])
    p = Problem(sequential=lambda x: x, distributed=_outputs_of_every_dtype, inputs=(x,),
                placements=(Replicate(),), world_size=world_size)
    outs = run_gloo(p)
    assert len(outs) == world_size
    for r, got in enumerate(outs):
        want = [x.to(torch.bfloat16) + r, x.to(torch.float16) * r, x > r, x.to(torch.int64)[0, 0] + r,
                torch.empty(0, 3, dtype=torch.bfloat16), x.to(torch.complex64).t()]
        for g, w in zip(got[:-1], want):
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w), (r, g, w)
        assert got[-1] == r
