"""The normalized IR: one small graph type for the sequential program and for every rank.

A node's ``op`` uses the same vocabulary as `gg_notebook.relations.expr` so that a rank node can
be interned as a term without translation:

* ``input`` (attrs: input index), ``const`` (attrs: an OpSpec evaluated without tensor args);
* clean data movement: ``view`` (shape), ``permute`` (perm), ``slice`` ((dim, start, end)),
  ``cat`` (dim), ``expand`` (shape);
* ``call`` (attrs: an OpSpec; its ``kind`` picks the lemmas: ew, matmul, reduce, softmax, ...);
* ``collective`` (attrs: the capture layer's CollectiveInfo).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class Node:
    name: str
    op: str
    attrs: Any
    inputs: tuple["Node", ...]
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    target: str = ""  # printable original ATen op, e.g. "aten.mm.default"
    source: str | None = None  # "file.py:LINE" in the user's code
    code: str | None = None  # that line's text
    frames: tuple = ()
    rank: int | None = None  # None for the sequential program
    index: int = 0  # position in the graph (topological order)
    fx_name: str = ""

    def __repr__(self) -> str:
        where = "seq" if self.rank is None else f"r{self.rank}"
        return f"<{where}:{self.name} {self.op} {self.target}>"

    @property
    def label(self) -> str:
        return self.name if self.rank is None else f"{self.name}@r{self.rank}"


@dataclass
class Graph:
    nodes: list[Node]
    inputs: list[Node]
    outputs: list[Node]
    rank: int | None = None
    by_name: dict[str, Node] = field(default_factory=dict)
    random_ops: list = field(default_factory=list)  # lower.RandomOp records (with a Problem.random policy)
    decomposed: dict = field(default_factory=dict)  # operator -> calls replaced by its definition (ir.decompose)
    # captured for the routing of the example inputs (capture.specialize): the assumption, in words
    specialized: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, n in enumerate(self.nodes):
            n.index = i
        self.by_name = {n.name: n for n in self.nodes}

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i.name].append(n)
        return out

    def __len__(self) -> int:
        return len(self.nodes)
