"""`gg.verify`: capture, lower, infer, judge."""

from __future__ import annotations

from gg_notebook.problem import Problem
from gg_notebook.result import Result


def verify(problem: Problem, **options) -> Result:
    raise NotImplementedError("engine under construction")
