"""Custom layouts (`gg.Layout`): trace the user's ``fn(global, rank, W)`` into a clean term per rank,
then find how the global tensor is rebuilt from the ranks' locals."""

from __future__ import annotations

from gg_notebook.problem import Problem, ProblemError


def layout_terms_and_relation(problem: Problem, i: int, store, atom, capture_layout):
    raise ProblemError(
        f"input {i} ({problem.input_names[i]}) uses a gg.Layout, which is not supported yet"
    )
