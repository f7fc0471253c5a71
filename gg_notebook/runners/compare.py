"""Run a Problem's programs for real and compare: the distributed outputs, combined per
``problem.expect``, against the sequential outputs.

The distributed program runs on all ranks in this process (`local_tensor`, the default) or on real
gloo processes (`gloo`); this is a numeric check of the examples, independent of any verifier.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Replicate

from gg_notebook.problem import Layout, Problem
from gg_notebook.runners.gloo import run_gloo
from gg_notebook.runners.local_tensor import run_local_tensor
from gg_notebook.runners.outputs import combine, mismatch
from gg_notebook.runners.sequential import run_sequential


def run_distributed(problem: Problem, backend: str = "auto") -> list[list[torch.Tensor]]:
    """Per-rank outputs; ``backend`` is ``"local"``, ``"gloo"`` or ``"auto"`` (local, gloo on failure)."""
    if backend == "local":
        return run_local_tensor(problem)
    if backend == "gloo":
        return run_gloo(problem)
    try:
        return run_local_tensor(problem)
    except Exception:
        return run_gloo(problem)


def compare(problem: Problem, backend: str = "auto", rtol: float = 1e-6) -> tuple[bool, str]:
    """Whether the distributed program's combined outputs match the sequential outputs."""
    seq = run_sequential(problem)
    ranks = run_distributed(problem, backend)
    expect = problem.expect or (Replicate(),) * len(seq)
    if any(len(r) != len(seq) for r in ranks):
        return False, f"ranks return {[len(r) for r in ranks]} outputs, sequential {len(seq)}"
    for k, (s, e) in enumerate(zip(seq, expect)):
        outs = [r[k] for r in ranks]
        if isinstance(e, Replicate):
            for r, o in enumerate(outs):
                msg = mismatch(o, s, rtol)
                if msg:
                    return False, f"output {k} on rank {r}: {msg}"
            continue
        if isinstance(e, Layout):  # every rank's output is its piece of the sequential output
            for r, o in enumerate(outs):
                msg = mismatch(o, e.fn(s, r, problem.world_size), rtol)
                if msg:
                    return False, f"output {k} on rank {r} (per {e!r}): {msg}"
            continue
        try:
            full = combine(outs, e)
        except RuntimeError as err:
            return False, f"output {k}: cannot combine per {e}: {err}"
        msg = mismatch(full, s, rtol)
        if msg:
            return False, f"output {k} combined per {e}: {msg}"
    return True, "match"
