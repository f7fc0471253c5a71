"""Progress of `gg.verify`: which programs are captured, how far inference is.

``gg.verify(problem, progress=...)``:

- ``None`` / ``False`` (default): silent.
- ``True``: `tqdm.auto` bars on stderr (a text bar in a terminal, a widget bar in Jupyter), one per
  stage: "capture" (one step per program: the sequential trace, each rank's recording, each trace
  or derivation, with the rank in the bar's text) and "inference" (one step per operator of the
  sequential program).
- a callable ``f(stage, done, total, detail)``: called as each step finishes (``stage`` is
  "capture" or "inference"; ``total`` may grow while capture discovers work, e.g. the ranks to trace
  once the recordings are in); this is what a widget's progress bar uses.

Interrupting (Ctrl-C, the notebook's stop button) stops the capture processes and raises
KeyboardInterrupt as usual.
"""

from __future__ import annotations

import sys
from typing import Callable

Callback = Callable[[str, int, int, str], None]


def make_progress(progress) -> Callback | None:
    """The callback for ``gg.verify``'s ``progress`` argument (see the module docstring)."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return Bars()
    if callable(progress):
        return progress
    from gg_notebook.problem import ProblemError

    raise ProblemError(f"progress must be True, False, None or a callable f(stage, done, total, detail), "
                       f"not {type(progress).__name__}")


class Bars:
    """One `tqdm.auto` bar per stage (plain lines on stderr if tqdm is not installed)."""

    def __init__(self) -> None:
        self.bars: dict = {}
        try:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            self._tqdm = None

    def __call__(self, stage: str, done: int, total: int, detail: str = "") -> None:
        if self._tqdm is None:  # pragma: no cover
            print(f"{stage}: {done}/{total} {detail}", file=sys.stderr)
            return
        bar = self.bars.get(stage)
        if bar is None:
            unit = "program" if stage == "capture" else "op"
            bar = self.bars[stage] = self._tqdm(total=total, desc=stage, unit=unit, leave=True, file=sys.stderr)
        bar.total = max(total, done)
        bar.n = done
        bar.set_postfix_str(detail, refresh=False)
        bar.refresh()
        if done >= total and stage == "inference":
            self.close(stage)

    def close(self, stage: str | None = None) -> None:
        for s in [stage] if stage else list(self.bars):
            bar = self.bars.pop(s, None)
            if bar is not None:
                bar.close()


def describe_job(job: tuple) -> str:
    """What a capture job did, for the bar's text."""
    kind, who = job[0], job[1]
    name = "sequential" if who is None else f"rank {who}"
    if kind == "record":
        return f"{name} recorded"
    if kind == "rep":
        derived = [d.rank for d in (getattr(job[3], "diffs", job[3]) or [])]  # diffs, or an early job's channel
        return f"{name} traced, {_ranks(derived)} derived from it"
    return f"{name} traced"


def _ranks(rs: list[int]) -> str:
    if not rs:
        return "no rank"
    if len(rs) > 2 and rs == list(range(rs[0], rs[-1] + 1)):
        return f"ranks {rs[0]}-{rs[-1]}"
    return ("rank " if len(rs) == 1 else "ranks ") + ", ".join(map(str, rs))
