"""Per-rank capture processes forked from a Jupyter kernel: ProofSession and verify work, the ranks'
prints reach the cell, and the kernel keeps running (the children never touch its I/O channels)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent

CELLS = [
    """
import torch, torch.distributed as dist
import gg_notebook as gg
from gg_notebook.problem import Problem, Replicate, Shard, Partial

calls = 0

def seq_mlp(x, w1, w2):
    return torch.relu(x @ w1) @ w2

def dist_mlp(x, w1, w2):
    global calls
    calls += 1
    print(f"tracing rank {dist.get_rank()}")
    y = torch.relu(x @ w1) @ w2
    dist.all_reduce(y)
    return y

problem = Problem(sequential=seq_mlp, distributed=dist_mlp,
                  inputs=(torch.randn(4, 8), torch.randn(8, 16), torch.randn(16, 8)),
                  placements=(Replicate(), Shard(1), Shard(0)), world_size=4)
""",
    """
s = gg.ProofSession(problem)
s.run()
assert s.result().status is gg.Status.PROVED, s.result()
assert s.stats["capture_mode"] == "processes", s.stats
assert calls == 0  # the ranks ran in their own processes
""",
    """
r = gg.verify(problem)
assert r.status is gg.Status.PROVED
print("kernel still fine")
""",
]


@pytest.mark.timeout(300)
def test_session_and_verify_in_a_kernel(tmp_path, monkeypatch, unix_socket_kernel):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    client = nbclient.NotebookClient(nb, km=unix_socket_kernel, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on a failing cell
    texts = ["".join(o.get("text", "") for o in c.outputs if o.get("output_type") == "stream") for c in nb.cells]
    assert texts[1].splitlines() == [f"tracing rank {r}" for r in range(4)], texts[1]
    assert "kernel still fine" in texts[2]
