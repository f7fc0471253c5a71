"""Every built-in correct example is proved, every seeded bug is not, at the right operator and line."""

from __future__ import annotations

import pytest

import gg_notebook as gg
from gg_notebook import examples as E

CORRECT = [(name, w) for name in sorted(E.EXAMPLES) for w in E.get(name).world_sizes]
BUGGY = [(name, bug, w) for name in sorted(E.EXAMPLES) for bug in sorted(E.get(name).bugs)
         for w in E.get(name).world_sizes]


@pytest.mark.parametrize("name,world_size", CORRECT)
def test_correct_example_is_proved(name, world_size):
    result = gg.verify(E.get(name).make(world_size=world_size))
    assert result.status.value == E.get(name).verdict, str(result)
    assert (result.status is gg.Status.PROVED) == (not result.assumptions), str(result)
    assert result.culprit is None
    assert all(r.ok and r.relation for r in result.relations)


@pytest.mark.parametrize("name,bug,world_size", BUGGY)
def test_bug_is_localized(name, bug, world_size):
    ex = E.get(name)
    problem = ex.make(world_size=world_size, bug=bug)
    result = gg.verify(problem)
    assert result.status is gg.Status.REFUTED, str(result)  # with a counterexample, not just "not proved"
    ce = result.counterexample
    assert ce is not None and ce.max_error > 0 and ce.inputs, str(result)
    assert "refuted" in str(result) and "counterexample" in str(result)
    spec = ex.bugs[bug]
    assert result.culprit is not None, str(result)
    assert result.culprit.op.startswith(spec.culprit_op + "."), (result.culprit, spec)
    expected_line = E.marker_line(problem.sequential, spec.culprit_marker)
    assert result.culprit.source is not None
    # both are "path:LINE"; compare the file name and line
    got_file, got_line = result.culprit.source.rsplit(":", 1)
    exp_file, exp_line = expected_line.rsplit(":", 1)
    assert got_line == exp_line and exp_file.endswith(got_file.split("/")[-1]), (result.culprit.source, expected_line)
