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


@pytest.fixture
def unix_socket_kernel():
    """A Jupyter kernel manager whose kernel talks over unix sockets, not TCP. Over TCP the client
    picks free ports (bind to port 0, release) and the kernel binds them a moment later; a process
    of another test (gloo ranks, a JupyterLab server) can take one in between, and the kernel dies
    ("Address already in use", seen in CI with parallel workers). Sockets live in a fresh short
    directory (a unix socket path must stay under ~100 characters). The client given it does not own
    it: the kernel is shut down here."""
    import shutil
    import tempfile

    from jupyter_client import KernelManager

    where = tempfile.mkdtemp(prefix="ggk")
    km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(where, "k"))
    try:
        yield km
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        shutil.rmtree(where, ignore_errors=True)
