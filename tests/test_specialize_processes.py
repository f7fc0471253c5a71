"""The real-run processes of capture.specialize (one forked gloo process per rank, to learn the values
a dropless program reads with `.tolist()`) never outlive their purpose: a rank that hangs is reported
by rank after the timeout, and when the capturing process itself is killed its rank processes die
with it instead of waiting in a rendezvous (holding the capture's pipes open)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import torch

import gg_notebook as gg
from gg_notebook.capture import specialize
from gg_notebook.capture.errors import CaptureError
from gg_notebook.capture.forked import fork_available

pytestmark = pytest.mark.skipif(not fork_available(), reason="needs fork")


@contextlib.contextmanager
def _plain(fn, rank, world_size):
    yield lambda *a: fn(*a, rank, world_size)


def _hangs_on_rank_1(x, rank, world_size):
    n = (x > 0).sum().tolist()
    if rank == 1:
        time.sleep(600)
    return x * n


def _hangs(x, rank, world_size):
    n = (x > 0).sum().tolist()
    time.sleep(600)
    return x * n


def _problem(program=_hangs_on_rank_1):
    return gg.Problem(sequential=lambda x: x * (x > 0).sum(), distributed=program,
                      inputs=[torch.randn(4)], placements=[gg.Replicate()], world_size=2)


def _children_of(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid and fields[0] != "Z":
                    kids.append(int(d))
            except OSError:
                pass
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_hanging_rank_is_reported_by_rank_after_the_timeout():
    before = set(_children_of(os.getpid()))  # (a test session may have its own: a JupyterLab server)
    t0 = time.monotonic()
    with pytest.raises(CaptureError, match=r"rank 1 on the example inputs timed out after 3 s"):
        specialize.recorded_reads(_problem(), 0, _plain, timeout=3)
    assert time.monotonic() - t0 < 30
    assert set(_children_of(os.getpid())) <= before  # every rank process reaped


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_rank_processes_die_with_a_killed_capture():
    rd, wr = os.pipe()
    mid = os.fork()
    if mid == 0:  # the capturing process (as a capture in a forked worker would be)
        os.close(rd)
        try:
            specialize.recorded_reads(_problem(_hangs), 0, _plain, timeout=600)
        finally:
            os._exit(0)
    os.close(wr)
    try:
        deadline = time.monotonic() + 60
        ranks = []
        while time.monotonic() < deadline and len(ranks) < 2:
            ranks = _children_of(mid)
            time.sleep(0.1)
        assert len(ranks) == 2, "the capture did not start its two rank processes"
        os.kill(mid, signal.SIGKILL)
        os.waitpid(mid, 0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in ranks):
            time.sleep(0.1)
        left = [p for p in ranks if _alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, "rank processes outlived the killed capture"
        # and nothing holds the capture's pipe open any more: EOF, not a hang
        os.set_blocking(rd, False)
        assert os.read(rd, 1) == b""
    finally:
        os.close(rd)
