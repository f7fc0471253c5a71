"""Run a Problem's sequential program on its inputs (fresh leaf copies, so the inputs are untouched)."""

from __future__ import annotations

import torch

from gg_notebook.problem import Problem
from gg_notebook.runners.outputs import flat_outputs


def run_sequential(problem: Problem) -> list[torch.Tensor]:
    """The sequential program's output leaves (tensors detached)."""
    args = [t.detach().clone().requires_grad_(t.requires_grad) for t in problem.inputs]
    return [l.detach() if isinstance(l, torch.Tensor) else l for l in flat_outputs(problem.sequential(*args))]
