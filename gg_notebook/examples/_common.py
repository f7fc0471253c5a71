"""Small helpers shared by the example builders (not part of any example's program)."""

from __future__ import annotations

import torch


def check_bug(example: str, bug, bugs) -> None:
    if bug is not None and bug not in bugs:
        raise ValueError(f"{example} has no bug {bug!r}; known bugs: {', '.join(sorted(bugs)) or 'none'}")


def randn(generator: torch.Generator, *shape, dtype=torch.float64, device="cpu", scale=1.0,
          requires_grad=False) -> torch.Tensor:
    """Seeded normal tensor; on ``device="meta"`` only the shape is made."""
    if str(device) == "meta":
        t = torch.empty(*shape, dtype=dtype, device="meta")
    else:
        t = torch.randn(*shape, dtype=dtype, generator=generator) * scale
    return t.requires_grad_(requires_grad)


def randint(generator: torch.Generator, high: int, *shape, device="cpu") -> torch.Tensor:
    if str(device) == "meta":
        return torch.empty(*shape, dtype=torch.int64, device="meta")
    return torch.randint(0, high, shape, dtype=torch.int64, generator=generator)


def seeded(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g
