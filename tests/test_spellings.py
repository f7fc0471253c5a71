"""The public spelling suite (issue #8): programs as ML systems engineers write them.

Every case of ``tests/spellings/programs_*.py`` (see ``tests/spellings/_case.py``): a correct
spelling must be proved; a bug must be refuted with its culprit on the ``# BUG`` line or on the
spec line tagged ``# gg: <culprit>``, and not where its correct twin is stuck. A case the engine
cannot handle yet is xfail(strict=True) with the missing mechanism as the reason, so it starts
failing (and must be unmarked) the day the mechanism lands.
"""

from __future__ import annotations

import pytest

from spellings import all_cases, evaluate

CASES = all_cases()
BY_NAME = {c.name: c for c in CASES}
_RESULTS: dict = {}  # results by case name, shared so a bug's twin is verified once


def _param(case):
    marks = [pytest.mark.xfail(strict=True, reason=case.missing)] if case.missing else []
    return pytest.param(case, id=f"{case.pattern}:{case.name}", marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_spelling(case):
    result, ok, message = evaluate(case, BY_NAME, _RESULTS)
    assert ok, f"{case.name}: {message}\n{result}"


def test_registry_is_well_formed():
    """Every bug has one '# BUG' line, a correct twin in the same pattern, and three correct spellings per
    pattern and group at least."""
    groups: dict = {}
    for c in CASES:
        groups.setdefault((c.pattern, c.name.split("/")[0]), []).append(c)
        if c.bug:
            c.bug_line()
            if c.twin is not None:
                assert not BY_NAME[c.twin].bug and BY_NAME[c.twin].pattern == c.pattern, c.name
    for (pattern, group), cases in groups.items():
        correct = [c for c in cases if not c.bug]
        assert len(correct) >= 3, f"{pattern}/{group}: {len(correct)} correct spellings, want >= 3"
        assert any(c.bug for c in cases), f"{pattern}/{group}: no bug"
