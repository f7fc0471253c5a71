"""Each rank's inputs for a real run of a Problem's distributed program.

A rank's piece of every input is cut per its placement (`gg_notebook.problem.local_input`); a
``Partial()`` input is split at random (seeded) into pieces that sum to it, instead of rank 0 holding
it all.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Partial

from gg_notebook.problem import Problem


def local_inputs(problem: Problem, rank: int, partial_seed: int = 1234) -> tuple:
    """Rank ``rank``'s inputs; ``Partial()`` inputs are split randomly (seeded) instead of rank 0 holding all."""
    out = []
    for i, (t, p) in enumerate(zip(problem.inputs, problem.placements)):
        if isinstance(p, Partial):
            out.append(_random_partial_split(t, problem.world_size, partial_seed + i)[rank])
        else:
            out.append(_local(problem, t, p, rank))
    return tuple(out)


def _local(problem: Problem, t, p, rank):
    from gg_notebook.problem import local_input

    loc = local_input(t.detach(), p, rank, problem.world_size).clone()
    return loc.requires_grad_(t.requires_grad)


def _random_partial_split(t: torch.Tensor, world_size: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(t.shape, generator=g, dtype=t.dtype) for _ in range(world_size - 1)]
    last = t.detach() - sum(parts, torch.zeros_like(t))
    return parts + [last]
