"""What the outputs of a real run stand for: their leaves, the global tensor the ranks' pieces make
under a placement, and whether a value matches the expected one (a relative tolerance for floats,
exact for integers)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.utils import _pytree as pytree


def flat_outputs(out: Any) -> list:
    """The leaves of a program's (possibly nested) output, in pytree order."""
    leaves, _ = pytree.tree_flatten(out)
    return leaves


def combine(per_rank: Sequence[torch.Tensor], placement) -> torch.Tensor | None:
    """The global tensor the ranks' outputs stand for under ``placement`` (None if they disagree on Replicate)."""
    if isinstance(placement, Shard):
        return torch.cat(list(per_rank), dim=placement.dim)
    if isinstance(placement, Partial):
        return sum(per_rank[1:], per_rank[0].clone())
    if isinstance(placement, Replicate):
        return per_rank[0]
    from gg_notebook.problem import OnRank

    if isinstance(placement, OnRank):
        return per_rank[placement.rank]
    raise ValueError(f"unsupported expect placement {placement!r}")


def mismatch(got: torch.Tensor, want: torch.Tensor, rtol: float) -> str | None:
    """Why ``got`` differs from ``want`` (None if it matches within ``rtol`` of ``want``'s scale)."""
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.dtype.is_floating_point or want.dtype.is_floating_point:
        scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
        err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
        return None if err <= rtol * scale else f"max abs error {err:.3g} (scale {scale:.3g})"
    return None if torch.equal(got, want) else "integer values differ"
