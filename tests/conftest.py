"""Shared test helpers."""

from __future__ import annotations

import os

import pytest
import torch

from gg_notebook.result import Culprit, OutputRelation, Result, Status

if os.environ.get("PYTEST_XDIST_WORKER"):
    # a worker shares the cores with the other workers (and the rank processes tests fork): torch's
    # intra-op threads would only spin against each other
    torch.set_num_threads(1)


def make_result(status: str | Status, name: str = "fake") -> Result:
    """A small hand-made Result of the given status (for tests that fake the engine)."""
    status = Status(status)
    ok = status in (Status.PROVED, Status.ASSUMED)
    culprit = None
    if status is Status.UNKNOWN:
        culprit = Culprit(op="aten.add.Tensor", node="add", source="model.py:3", detail="no relation")
    return Result(
        status=status,
        problem_name=name,
        relations=[OutputRelation(index=0, name="out", relation="y0 + y1" if ok else None,
                                  expected="Replicate()", ok=ok)],
        culprit=culprit,
        assumptions=["out: y0@r0 (a hint)"] if status is Status.ASSUMED else [],
    )


@pytest.fixture
def fake_result():
    return make_result


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 4 (many tests fork a process per rank themselves)."""
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 4))
