"""Run a Problem's programs for real and compare: the distributed outputs, combined per
``problem.expect``, against the sequential outputs.

The distributed program runs on all ranks in this process (`local_tensor`, the default) or on real
gloo processes (`gloo`); this is a numeric check of the examples, independent of any verifier.
"""

from __future__ import annotations

from typing import Callable

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
    msg = compare_outputs(problem, seq, ranks, lambda got, want: mismatch(got, want, rtol))
    return (False, msg) if msg else (True, "match")


def compare_outputs(problem: Problem, seq: list, ranks: list[list],
                    differs: Callable[[torch.Tensor, torch.Tensor], str | None]) -> str | None:
    """Where the ranks' outputs, combined per ``problem.expect``, differ from the sequential outputs
    ``seq`` (``differs(got, want)``: a message, or None where they agree); None if nowhere."""
    expect = problem.expect or (Replicate(),) * len(seq)
    if any(len(r) != len(seq) for r in ranks):
        return f"ranks return {[len(r) for r in ranks]} outputs, sequential {len(seq)}"
    for k, (s, e) in enumerate(zip(seq, expect)):
        outs = [r[k] for r in ranks]
        if isinstance(e, Replicate):
            for r, o in enumerate(outs):
                msg = differs(o, s)
                if msg:
                    return f"output {k} on rank {r}: {msg}"
            continue
        if not all(isinstance(o, torch.Tensor) for o in outs):
            return f"output {k}: not tensors on every rank"
        if isinstance(e, Layout):  # every rank's output is its piece of the sequential output
            for r, o in enumerate(outs):
                msg = differs(o, e.fn(s, r, problem.world_size))
                if msg:
                    return f"output {k} on rank {r} (per {e!r}): {msg}"
            continue
        try:
            full = combine(outs, e)
        except RuntimeError as err:
            return f"output {k}: cannot combine per {e}: {err}"
        msg = differs(full, s)
        if msg:
            return f"output {k} combined per {e}: {msg}"
    return None
