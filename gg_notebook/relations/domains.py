"""Domains of integer inputs: which token ids / class targets a proof may assume.

A lemma about token ids (a vocabulary-parallel lookup, a loss over sharded logits) is an identity
only over the ids it is checked on. By default that is *what the operator accepts*: ``[0, V)`` for
an embedding, ``[0, C)`` plus ``ignore_index`` for ``nll_loss`` (sentinels included). A problem may
narrow an input's domain (``gg.Problem(..., domains={"target": range(0, V)})``); a proof that uses
a narrowed domain lists it in ``Result.domain_assumptions``, and ``verify`` checks the problem's own
example inputs against every declared domain.

`IdDomain` is a finite set of integers kept as sorted disjoint half-open ranges: hashable (it goes
into operator specs) and cheap to enumerate for the exhaustive checks over all ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


_VALUES: dict = {}  # (ranges, dtype) -> `IdDomain.values` (shared, read-only by contract)


@dataclass(frozen=True)
class IdDomain:
    ranges: tuple[tuple[int, int], ...]  # sorted, disjoint, non-adjacent, non-empty [lo, hi)

    # ------------------------------------------------------------------ building
    @staticmethod
    def of_ranges(ranges: Iterable[tuple[int, int]]) -> "IdDomain":
        rs = sorted((int(a), int(b)) for a, b in ranges if int(b) > int(a))
        merged: list[list[int]] = []
        for a, b in rs:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return IdDomain(tuple((a, b) for a, b in merged))

    @staticmethod
    def range(lo: int, hi: int) -> "IdDomain":
        return IdDomain.of_ranges([(lo, hi)])

    @staticmethod
    def of(spec) -> "IdDomain":
        """From what a user writes: ``range(a, b)`` (step 1 or not), an IdDomain, or ints."""
        if isinstance(spec, IdDomain):
            return spec
        if isinstance(spec, range):
            if spec.step == 1:
                return IdDomain.range(spec.start, spec.stop)
            return IdDomain.of_values(list(spec))
        if isinstance(spec, torch.Tensor):
            return IdDomain.of_values(spec.reshape(-1).tolist())
        return IdDomain.of_values(list(spec))

    @staticmethod
    def of_values(values: Iterable[int]) -> "IdDomain":
        vals = sorted({int(v) for v in values})
        return IdDomain.of_ranges((v, v + 1) for v in vals)

    def union(self, other: "IdDomain") -> "IdDomain":
        return IdDomain.of_ranges(self.ranges + other.ranges)

    def intersect(self, other: "IdDomain") -> "IdDomain":
        out = []
        for a, b in self.ranges:
            for c, d in other.ranges:
                lo, hi = max(a, c), min(b, d)
                if lo < hi:
                    out.append((lo, hi))
        return IdDomain.of_ranges(out)

    # ------------------------------------------------------------------ reading
    def __contains__(self, v) -> bool:
        if v is None or isinstance(v, bool) or not isinstance(v, int):
            return False
        return any(a <= v < b for a, b in self.ranges)

    def __len__(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def issubset(self, other: "IdDomain") -> bool:
        return len(self.intersect(other)) == len(self)

    def values(self, dtype=torch.int64) -> torch.Tensor:
        """Every element, ascending (1-D). One tensor per domain and dtype, shared by every caller
        (a vocabulary's ids are enumerated by several matchers per question): read it, never write
        into it (the domain evaluators copy the operands of an operator that writes)."""
        key = (self.ranges, dtype)
        v = _VALUES.get(key)
        if v is None:
            if not self.ranges:
                v = torch.zeros(0, dtype=dtype)
            else:
                v = torch.cat([torch.arange(a, b, dtype=dtype) for a, b in self.ranges])
            if len(_VALUES) >= 64:
                _VALUES.clear()
            _VALUES[key] = v
        return v

    def sentinels(self) -> list[int]:
        """Isolated members (``ignore_index`` beside a range of class ids, say)."""
        return [a for a, b in self.ranges if b - a == 1]

    def boundaries(self) -> list[int]:
        """The first and last member of every range that has more than one member."""
        return [v for a, b in self.ranges if b - a > 1 for v in (a, b - 1)]

    def sample(self, shape, generator: torch.Generator, dtype=torch.int64,
               sentinel_p: float = 0.15, boundary_p: float = 0.1) -> torch.Tensor:
        """Random members: uniform over the domain, except that each position is a sentinel with
        probability ``sentinel_p`` and a range boundary with probability ``boundary_p`` (the
        values that tell a correct program from one that forgets a special case)."""
        n = len(self)
        if n == 0:
            raise ValueError("cannot sample from an empty domain")
        shape = tuple(shape)
        flat = torch.randint(0, n, shape, generator=generator, dtype=torch.int64)
        sizes = torch.tensor([b - a for a, b in self.ranges], dtype=torch.int64)
        ends = sizes.cumsum(0)
        starts = torch.tensor([a for a, _ in self.ranges], dtype=torch.int64)
        which = torch.bucketize(flat, ends, right=True)
        out = starts[which] + (flat - (ends[which] - sizes[which]))
        u = torch.rand(shape, generator=generator)
        for values, lo, hi in ((self.sentinels(), 0.0, sentinel_p),
                               (self.boundaries(), sentinel_p, sentinel_p + boundary_p)):
            if values:
                vals = torch.tensor(values, dtype=torch.int64)
                idx = torch.randint(0, len(values), shape, generator=generator)
                out = torch.where((u >= lo) & (u < hi), vals[idx], out)
        return out.to(dtype)

    def describe(self) -> str:
        parts = []
        for a, b in self.ranges:
            parts.append(f"{{{a}}}" if b - a == 1 else f"[{a}, {b})")
        return " ∪ ".join(parts) if parts else "∅"

    def __repr__(self) -> str:
        return f"IdDomain({self.describe()})"

    def outside(self, t: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the elements of ``t`` that are not members."""
        inside = torch.zeros(t.shape, dtype=torch.bool)
        for a, b in self.ranges:
            inside |= (t >= a) & (t < b)
        return ~inside
