"""Tensor-parallel MLP: Megatron's ColumnParallelLinear -> GeLU -> RowParallelLinear.

``w1`` is split by columns (each rank computes its slice of the hidden layer, no communication),
``w2`` by rows (each rank produces a partial sum of the output), one all-reduce sums the partials,
and the replicated output bias is added once, after the reduction.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard

from gg_notebook.problem import Problem

from ._common import check_bug, randn, seeded
from ._types import Bug, Example


def mlp(x, w1, b1, w2, b2):
    """Single-device reference MLP: ``gelu(x @ w1 + b1) @ w2 + b2``."""
    h = F.gelu(x @ w1 + b1)
    y = h @ w2
    return y + b2  # gg: output_bias


def mlp_tp(x, w1, b1, w2, b2, *, bug=None):
    """One rank of a tensor-parallel MLP (column-parallel ``w1``/``b1``, row-parallel ``w2``).

    x: [batch, seq, hidden] replicated; w1: [hidden, ffn/W]; b1: [ffn/W]; w2: [ffn/W, hidden];
    b2: [hidden] replicated. Returns the full output on every rank.
    """
    h = F.gelu(x @ w1 + b1)  # this rank's ffn columns: no communication needed
    y = h @ w2  # partial sum over this rank's ffn rows
    if bug == "bias_before_reduce":
        y = y + b2
        dist.all_reduce(y)
        return y
    if bug != "missing_allreduce":
        dist.all_reduce(y)
    return y + b2


BUGS = {
    b.name: b
    for b in (
        Bug("missing_allreduce",
            "The row-parallel output is never all-reduced: every rank returns its partial sum plus the bias.",
            "aten.add", "output_bias"),
        Bug("bias_before_reduce",
            "The output bias is added on every rank before the all-reduce, so it is counted world_size times.",
            "aten.add", "output_bias"),
    )
}


def make(world_size: int = 2, bug: str | None = None, *, batch: int = 2, seq: int = 8, hidden: int = 16,
         ffn: int = 64, seed: int = 0, dtype=torch.float64, device="cpu") -> Problem:
    check_bug("mlp", bug, BUGS)
    g = seeded(seed)
    x = randn(g, batch, seq, hidden, dtype=dtype, device=device)
    w1 = randn(g, hidden, ffn, dtype=dtype, device=device, scale=hidden ** -0.5)
    b1 = randn(g, ffn, dtype=dtype, device=device, scale=0.1)
    w2 = randn(g, ffn, hidden, dtype=dtype, device=device, scale=ffn ** -0.5)
    b2 = randn(g, hidden, dtype=dtype, device=device, scale=0.1)
    return Problem(
        sequential=mlp,
        distributed=functools.partial(mlp_tp, bug=bug),
        inputs=(x, w1, b1, w2, b2),
        placements=(Replicate(), Shard(1), Shard(0), Shard(0), Replicate()),
        world_size=world_size,
        expect=(Replicate(),),
        name="mlp" if bug is None else f"mlp[{bug}]",
        input_names=("x", "w1", "b1", "w2", "b2"),
    )


EXAMPLES = [
    Example("mlp", "Megatron tensor-parallel MLP: column-parallel w1/b1, GeLU, row-parallel w2, all-reduce, bias.",
            make, BUGS),
]
