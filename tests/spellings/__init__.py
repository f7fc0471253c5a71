"""The public spelling suite (issue #8): small programs as ML systems engineers write them.

Every ``programs_*.py`` module in this package defines ``CASES: list[SpellingCase]`` (see
`_case.py`); `all_cases()` discovers them, so a new pattern module needs no registration.
"""

from ._case import SpellingCase, all_cases, check_case, evaluate, modules  # noqa: F401
