"""The registry of the public spelling suite (issue #8).

Every module ``tests/spellings/programs_<pattern>.py`` defines

    CASES: list[SpellingCase]

and nothing else is needed: `all_cases()` imports every ``programs_*.py`` module of this package
and concatenates their ``CASES`` (module order by file name, case order as listed).
``tests/test_spellings.py`` parametrizes over `all_cases()`, and ``benchmarks/spelling_suite.py``
prints a table per ``pattern``.

Write the programs as plain module-level functions, as a user writes them (``torch.distributed``
calls, ``dist.get_rank()`` / ``dist.get_world_size()``, methods or functions, any spelling), one
sequential spec and one rank program per case. Inputs are built by a zero-argument callable
returning the list of global tensors (small: the suite must stay fast; float64 keeps concrete
checks crisp).

A correct case (``bug=False``) must end ``gg.Status.PROVED``, or, when it sets ``assumed`` (a tuple of
phrases), ``gg.Status.ASSUMED`` with exactly one `gg.Result.assumptions` entry per phrase, each
containing its phrase (a program equal to the spec only under a stated assumption, e.g. a mean whose
count the ranks clamp to 1: not the spec's 0/0 = NaN when every target is ignored). A bug (``bug=True``) must end
``gg.Status.REFUTED`` and be *localized*:

* exactly one line of the case's two functions carries the marker comment ``# BUG`` (``marker``):
  the line a human would fix, usually in the rank program;
* a culprit is a *sequential* operator (`gg.Culprit.source` is a line of the spec), so a bug in the
  rank program is localized when the culprit is the spec operator whose value first goes wrong:
  tag that spec line ``# gg: <tag>`` (the convention of gg_notebook/examples) and set
  ``culprit="<tag>"``. The culprit's source line must be the ``# BUG`` line or that tagged line;
* and it must not be an operator where the correct twin also gets stuck: ``twin`` names the correct
  case of the same group; if the twin is not proved, the bug's culprit node and line must differ from the
  twin's culprit node and line (otherwise the "localization" is only where the engine stops anyway).

`check_case` decides all of this, so the test and the benchmark agree.

A case the engine cannot prove (or localize) yet keeps its expectation and sets ``missing`` to a
one-line description of the missing mechanism; the test marks it ``xfail(strict=True,
reason=missing)`` so it starts failing the day the mechanism lands.

Example::

    def mean_seq(x):
        return x.mean()

    def mean_dp(x):
        s = x.sum()
        dist.all_reduce(s)
        return s / x.numel() / dist.get_world_size()

    CASES = [SpellingCase(
        name="dp-mean/sum-then-div", pattern="scalar", sequential=mean_seq, distributed=mean_dp,
        inputs=lambda: [rn(8, 4)], placements=[gg.Shard(0)], world_size=2, expect=[gg.Replicate()],
    )]

    def mean_dp_no_div(x):
        s = x.sum()
        dist.all_reduce(s)
        return s / x.numel()  # BUG: not divided by the world size

    # the spec, with its operators tagged:  return x.mean()  # gg: mean
    CASES.append(SpellingCase(
        name="dp-mean/bug-no-div", pattern="scalar", sequential=mean_seq, distributed=mean_dp_no_div,
        inputs=lambda: [rn(8, 4)], placements=[gg.Shard(0)], world_size=2, expect=[gg.Replicate()],
        bug=True, culprit="mean", twin="dp-mean/sum-then-div",
    ))
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

import gg_notebook as gg


@dataclass(frozen=True)
class SpellingCase:
    """One program of the suite: a spec, a rank program, and what gg.verify must say about them.

    name        unique within the suite, "<group>/<spelling>" (used as the pytest id)
    pattern     "scalar", "constants", "movement", "canonical", "decomposition", "loss", "attention"
    sequential  the single-device specification (plain function of the inputs)
    distributed one rank's program (plain function of the rank's local inputs)
    inputs      zero-argument callable returning the list of *global* example tensors
    placements  one gg placement (Replicate / Shard(d) / Partial / gg.Layout) per input
    world_size  number of ranks (2, sometimes 4)
    expect      one placement per output, or None (any clean relation)
    bug         False: must be proved; True: must be refuted, culprit on the ``marker`` line
    assumed     for a correct case: phrases of the assumptions it is proved under (then it must end
                ASSUMED with exactly these, one Result.assumptions entry containing each phrase)
    missing     None, or the one-line reason (the missing engine mechanism) for xfail(strict=True)
    domains     gg.Problem.domains (integer input -> range of values), if any
    exact       gg.verify(exact=...): None means the default "real"; or "bitwise"
    input_names gg.Problem.input_names, if the spec's parameter names should not be used
    random      gg.Problem.random ("refuse" default, or "identity")
    marker      the comment that marks the bug's line in the rank program or the spec
    culprit     for a bug: the tag of the spec line ``# gg: <tag>`` where the culprit is expected
                (None: the culprit must be on the ``marker`` line itself)
    twin        for a bug: the name of the correct case it is paired with
    note        free text (why the program is written this way; what the bug is)
    """

    name: str
    pattern: str
    sequential: Callable[..., Any]
    distributed: Callable[..., Any]
    inputs: Callable[[], Sequence[torch.Tensor]]
    placements: Sequence[Any]
    world_size: int = 2
    expect: Sequence[Any] | None = None
    bug: bool = False
    assumed: tuple[str, ...] = ()
    missing: str | None = None
    domains: dict | None = None
    exact: str | None = None
    input_names: Sequence[str] | None = None
    random: str = "refuse"
    marker: str = "# BUG"
    culprit: str | None = None
    twin: str | None = None
    note: str = ""
    meta: dict = field(default_factory=dict)

    def problem(self) -> gg.Problem:
        return gg.Problem(
            sequential=self.sequential, distributed=self.distributed, inputs=list(self.inputs()),
            placements=list(self.placements), world_size=self.world_size,
            expect=None if self.expect is None else list(self.expect), name=self.name,
            input_names=self.input_names, domains=self.domains, random=self.random,
        )

    def verify(self, **kw) -> gg.Result:
        """`gg.verify` of the case. The suite traces the ranks in this process (``capture="inprocess"``,
        3x faster than forking one process per rank; the programs keep no module state)."""
        if self.exact is not None:
            kw.setdefault("exact", self.exact)
        kw.setdefault("capture", "inprocess")
        return gg.verify(self.problem(), **kw)

    def bug_line(self) -> tuple[str, int]:
        """(file, line) of the ``marker`` comment in the rank program or the spec (exactly one)."""
        hits = []
        for fn in (self.distributed, self.sequential):
            fn = inspect.unwrap(fn)
            lines, first = inspect.getsourcelines(fn)
            path = inspect.getsourcefile(fn)
            for k, text in enumerate(lines):
                if self.marker in text:
                    hits.append((path, first + k))
        hits = sorted(set(hits))
        if len(hits) != 1:
            raise ValueError(f"case {self.name}: expected exactly one {self.marker!r} line, found {hits}")
        return hits[0]


    def culprit_line(self) -> tuple[str, int] | None:
        """(file, line) of the spec line tagged ``# gg: <culprit>``, or None without ``culprit``."""
        if self.culprit is None:
            return None
        fn = inspect.unwrap(self.sequential)
        lines, first = inspect.getsourcelines(fn)
        path = inspect.getsourcefile(fn)
        tag = re.compile(r"#\s*gg:\s*" + re.escape(self.culprit) + r"\b")
        hits = [(path, first + k) for k, text in enumerate(lines) if tag.search(text)]
        if len(hits) != 1:
            raise ValueError(f"case {self.name}: expected one '# gg: {self.culprit}' line in the spec, found {hits}")
        return hits[0]

    def expected_lines(self) -> list[tuple[str, int]]:
        """Where a bug's culprit may be: the ``# BUG`` line, and the tagged spec line if any."""
        out = [self.bug_line()]
        if self.culprit is not None:
            out.append(self.culprit_line())
        return out


def _short(path: str, line: int) -> str:
    return f"{path.split('/')[-1]}:{line}"


def check_case(case: SpellingCase, result: gg.Result, twin: gg.Result | None = None) -> tuple[bool, str]:
    """Does ``result`` meet the case's expectation? (ok, one-line explanation).

    For a bug, ``twin`` is the result of the correct twin (``case.twin``), when there is one."""
    if not case.bug and case.assumed:
        if result.status is not gg.Status.ASSUMED:
            return False, f"expected assumed ({len(case.assumed)} assumption(s)), got {result.headline()}"
        got = list(result.assumptions)
        unmatched = [a for a in case.assumed if sum(a in g for g in got) != 1]
        if unmatched or len(got) != len(case.assumed):
            return False, f"assumed, but under {got}; expected one assumption per phrase {list(case.assumed)}"
        return True, "assumed: " + "; ".join(got)
    if not case.bug:
        if result.status is gg.Status.PROVED and result.proved:
            return True, "proved"
        return False, f"expected proved, got {result.headline()}"
    if result.status is not gg.Status.REFUTED:
        return False, f"expected refuted, got {result.headline()}"
    c = result.culprit
    if c is None or not c.source:
        return False, "refuted, but no culprit source line"
    got_file, _, got_line = c.source.rpartition(":")
    want = case.expected_lines()
    if not any(got_line == str(line) and path.endswith(got_file.split("/")[-1]) for path, line in want):
        return False, (f"refuted, but culprit {c.op} at {c.source}; expected "
                       + " or ".join(_short(*w) for w in want))
    if twin is not None and twin.status is not gg.Status.PROVED and twin.culprit is not None \
            and (twin.culprit.node == c.node or twin.culprit.source == c.source):
        return False, (f"refuted at {c.source}, but the correct twin {case.twin} is stuck at the same "
                       f"operator ({c.op} {c.node}): not localized")
    return True, f"refuted at {c.source}"


def evaluate(case: SpellingCase, cases: dict | None = None, cache: dict | None = None):
    """Verify ``case`` (and its twin, for a bug) and judge it: ``(result, ok, message)``.

    ``cases`` maps names to cases (default: `all_cases()`); ``cache`` memoizes results by name."""
    cache = {} if cache is None else cache

    def run(c: SpellingCase) -> gg.Result:
        if c.name not in cache:
            cache[c.name] = c.verify()
        return cache[c.name]

    result = run(case)
    twin = None
    if case.bug and case.twin is not None:
        cases = cases if cases is not None else {c.name: c for c in all_cases()}
        twin = run(cases[case.twin])
    ok, msg = check_case(case, result, twin)
    return result, ok, msg


def modules() -> list:
    """Every ``programs_*`` module of this package, imported, by file name."""
    pkg = importlib.import_module(__package__)
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("programs_"))
    return [importlib.import_module(f"{__package__}.{n}") for n in names]


def all_cases() -> list[SpellingCase]:
    cases: list[SpellingCase] = []
    for mod in modules():
        cases.extend(getattr(mod, "CASES", []))
    names = [c.name for c in cases]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate spelling case names: {sorted(dup)}")
    known = set(names)
    for c in cases:
        if c.twin is not None and c.twin not in known:
            raise ValueError(f"case {c.name}: twin {c.twin!r} is not a case")
        if c.bug:
            c.bug_line()  # exactly one marker line
            c.culprit_line()
    return cases


def rn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A seeded random tensor (float64 by default) for ``inputs`` builders."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ri(low: int, high: int, *shape: int, seed: int = 0) -> torch.Tensor:
    """Seeded random int64 ids in [low, high)."""
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))
