"""The public spelling suite (issue #8): every case of tests/spellings/programs_*.py.

A correct spelling must be proved; a bug must be refuted with its culprit on the bug's line (or the
spec line tagged for it), and not where its correct twin is stuck. A case the engine cannot handle yet
carries ``missing`` (the missing mechanism) and is xfail(strict=True): it fails the day it passes.
"""

from __future__ import annotations

import pytest

from spellings import all_cases, evaluate

CASES = all_cases()
BY_NAME = {c.name: c for c in CASES}
_CACHE: dict = {}


def _param(c):
    marks = [pytest.mark.xfail(strict=True, reason=c.missing)] if c.missing else []
    return pytest.param(c, id=c.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_spelling(case):
    result, ok, msg = evaluate(case, BY_NAME, _CACHE)
    assert ok, f"{case.name}: {msg}\n{result}"
