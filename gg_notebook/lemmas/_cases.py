"""Random instances for lemma tests: real ATen operators traced and lowered like user code."""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from gg_notebook.lemmas.base import LemmaCase
from gg_notebook.relations.expr import ExprStore, OpSpec


def spec_of(fn: Callable, *tensors: torch.Tensor, out: int | None = None) -> tuple[OpSpec, list[int]]:
    """The OpSpec of the last compute node of ``fn`` and which inputs feed its tensor slots."""
    from gg_notebook.ir.lower import lower

    gm = make_fx(lambda *a: fn(*a))(*tensors)  # one placeholder per tensor, whatever fn's defaults
    g = lower(gm)
    calls = [n for n in g.nodes if n.op == "call"]
    node = g.outputs[0] if out is None else calls[out]
    order = [g.inputs.index(i) for i in node.inputs]
    return node.attrs, order


def split_sizes(rng: torch.Generator, total: int, pieces: int) -> list[int]:
    """``pieces`` positive sizes summing to ``total`` (uneven on purpose)."""
    pieces = max(1, min(pieces, total))
    cuts = sorted(torch.randperm(total - 1, generator=rng)[: pieces - 1].add(1).tolist())
    bounds = [0] + cuts + [total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def make_case(
    spec: OpSpec,
    tensors: Sequence[torch.Tensor],
    rng: torch.Generator,
    split: dict[int, int] | None = None,
    partial: dict[int, int] | None = None,
    pieces: int = 3,
    description: str = "",
    averaged: dict[int, int] | None = None,
) -> LemmaCase:
    """Build a case: argument ``i`` concatenated along ``split[i]`` or summed from ``partial[i]`` parts."""
    S = ExprStore()
    values: dict[str, torch.Tensor] = {}
    args = []
    split = split or {}
    partial = partial or {}
    averaged = averaged or {}
    sizes_cache: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        if i in split:
            d = split[i] % t.dim()
            key = t.shape[d]
            sizes = sizes_cache.setdefault(key, split_sizes(rng, t.shape[d], pieces))
            parts = []
            for k, piece in enumerate(torch.split(t, sizes, d)):
                name = f"a{i}_{k}"
                values[name] = piece.clone()
                parts.append(S.atom(name, tuple(piece.shape), piece.dtype))
            args.append(S.cat(parts, d))
        elif i in partial:
            n = partial[i]
            parts_vals = [torch.randn(t.shape, generator=rng, dtype=t.dtype) for _ in range(n - 1)]
            parts_vals.append(t - sum(parts_vals))
            parts = []
            for k, v in enumerate(parts_vals):
                name = f"a{i}_p{k}"
                values[name] = v
                parts.append(S.atom(name, tuple(v.shape), v.dtype))
            args.append(S.accum("sum", parts))
        elif i in averaged:
            from fractions import Fraction

            n = averaged[i]
            parts_vals = [torch.randn(t.shape, generator=rng, dtype=t.dtype) for _ in range(n - 1)]
            parts_vals.append(n * t - sum(parts_vals))
            parts = []
            for k, v in enumerate(parts_vals):
                name = f"a{i}_p{k}"
                values[name] = v
                parts.append(S.atom(name, tuple(v.shape), v.dtype))
            args.append(S.scale(S.accum("sum", parts), Fraction(1, n)))
        else:
            name = f"a{i}"
            values[name] = t
            args.append(S.atom(name, tuple(t.shape), t.dtype))
    return LemmaCase(spec, tuple(args), values, S, description)


def randn(rng, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=rng, dtype=dtype)


def dims(rng, lo=2, hi=7):
    return int(torch.randint(lo, hi, (1,), generator=rng))


def case(fn, tensors, rng, split=None, partial=None, description="", out=None, pieces=3,
         averaged=None) -> LemmaCase:
    """Trace ``fn(*tensors)``; split/partial/averaged are keyed by ``fn``'s argument positions
    (``averaged[i] = n``: argument i is ``(1/n) * sum`` of n parts, an AVG reduction)."""
    spec, order = spec_of(fn, *tensors, out=None if out == -1 else out)
    slot_tensors = [tensors[o] for o in order]
    split = {s: split[o] for s, o in enumerate(order) if split and o in split}
    partial = {s: partial[o] for s, o in enumerate(order) if partial and o in partial}
    averaged = {s: averaged[o] for s, o in enumerate(order) if averaged and o in averaged}
    return make_case(spec, slot_tensors, rng, split=split, partial=partial, pieces=pieces,
                     description=description or getattr(fn, "__name__", ""), averaged=averaged)


class CaseContext:
    """What the engine answers a lemma with ``needs_context``, fixed for one random case: the
    vocabulary partition the program declares and the domain of the ids (default: what the
    operator accepts)."""

    def __init__(self, partition: tuple | None = None, domain=None):
        self.partition = partition
        self.domain = domain

    def partitions(self, size):
        return [self.partition] if self.partition and sum(self.partition) == size else []

    def domain_of(self, expr, accepted, what: str = ""):
        return accepted if self.domain is None else self.domain.intersect(accepted)
