"""The registry's record types (re-exported by ``gg_notebook.examples``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from gg_notebook.problem import Problem


@dataclass(frozen=True)
class Bug:
    """A realistic bug variant of an example's distributed program.

    ``culprit_op`` is the ATen overload packet (e.g. ``"aten.add"``, matched as a prefix of the
    overload name such as ``"aten.add.Tensor"``) of the first *sequential* operator whose output can
    no longer be related to the ranks' tensors; ``culprit_marker`` is the tag of the ``# gg: <tag>``
    comment on that operator's line in the sequential source.
    """

    name: str
    description: str
    culprit_op: str
    culprit_marker: str


@dataclass(frozen=True)
class Example:
    """A built-in example: ``make(world_size=2, bug=None, **sizes) -> Problem``."""

    name: str
    description: str
    make: Callable[..., Problem]
    bugs: dict[str, Bug] = field(default_factory=dict)
    backward: bool = False
    # how the programs run for real (gg_notebook/runners/): "local" (LocalTensorMode, all ranks in
    # this process) or "gloo" (one process per rank: point-to-point transfers need real peers)
    runs_on: str = "local"
    # the world sizes the example is built and tested at (a 2-D mesh example: (4, 8))
    world_sizes: tuple[int, ...] = (2, 4)
    # the verdict of the correct program: "proved", or "assumed" for a program captured for the
    # routing of its example inputs (data-dependent split sizes, capture.specialize)
    verdict: str = "proved"
