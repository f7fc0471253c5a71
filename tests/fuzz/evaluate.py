"""One fuzz case: build the (mutated) program, ask gg.verify, establish ground truth, classify.

Outcome classes (``Record.outcome``):
  false_proof        ground truth shows the program wrong (mismatch, crash or deadlock) and verify says PROVED
  false_refutation   ground truth agrees on every draw (and on the verifier's own counterexample) and verify says REFUTED
  ok                 anything else (refuted-wrong, proved-correct, unknown, a clear capture/problem error)
  internal_error     verify raised something other than CaptureError / ProblemError (a finding)
  invalid            the mutant cannot even be built (import-time error) or the specification rejects every draw
"""

from __future__ import annotations

import ast
import dataclasses
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from . import ground_truth, loader, mutators
from .subjects import Subject, all_subjects, dtype_of


@dataclass(frozen=True)
class Case:
    subject: str
    world_size: int
    dtype: str
    edit: int | None  # index into mutators.edits(subject tree); None: the unmutated program

    @property
    def key(self) -> str:
        return f"{self.subject}|W{self.world_size}|{self.dtype}|{'base' if self.edit is None else self.edit}"

    @staticmethod
    def from_key(key: str) -> "Case":
        subject, w, dtype, e = key.split("|")
        return Case(subject, int(w[1:]), dtype, None if e == "base" else int(e))


@dataclass
class Record:
    key: str
    subject: str
    world_size: int
    dtype: str
    operator: str
    intent: str  # "baseline" | "wrong" | "variant"
    choice: str
    line: int
    verdict: str  # proved / refuted / unknown / capture_error / problem_error / internal_error / timeout / invalid
    verdict_detail: str
    ground_truth: dict
    outcome: str
    verify_seconds: float
    ground_truth_seconds: float
    source: str = field(repr=False, default="")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


_EDITS: dict[str, list] = {}


def subject_edits(subject: Subject) -> list[mutators.Edit]:
    if subject.name not in _EDITS:
        _EDITS[subject.name] = mutators.edits(subject.tree, subject.mutable)
    return _EDITS[subject.name]


def case_source(case: Case) -> tuple[str, str, str, str, int]:
    """(source, operator, intent, choice, line) of ``case``."""
    subject = all_subjects()[case.subject]
    if case.edit is None:
        return subject.source, "none", "baseline", "", 0
    e = subject_edits(subject)[case.edit]
    return ast.unparse(mutators.apply(subject.tree, e)) + "\n", e.operator, e.intent, e.choice, e.line


def enumerate_cases(subjects: list[Subject] | None = None) -> list[Case]:
    subjects = list(all_subjects().values()) if subjects is None else subjects
    out = []
    for s in subjects:
        n = 0 if s.baseline_only else len(subject_edits(s))
        for w, dt in s.configs:
            out.append(Case(s.name, w, dt, None))
            out.extend(Case(s.name, w, dt, i) for i in range(n))
    return out


def problem_factory(subject: Subject, source: str, world_size: int, dtype: str) -> Callable:
    stem = subject.name.split(":")[-1].replace("@", "_")

    def make():
        module = loader.load_source(source, stem, subject.package)
        return subject.build(module, world_size, dtype_of(dtype))
    return make


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # pragma: no cover - only on hangs
    raise _Timeout()


def run_verify(problem, timeout: int = 120):
    """(verdict, detail, result or None)."""
    import gg_notebook as gg
    from gg_notebook.capture import CaptureError
    from gg_notebook.problem import ProblemError
    from gg_notebook.result import VerificationError

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        r = gg.verify(problem)
        detail = str(r.counterexample) if r.counterexample is not None else (str(r.culprit) if r.culprit else "")
        return r.status.value, detail[:500], r
    except CaptureError as e:
        return "capture_error", str(e)[:500], None
    except ProblemError as e:
        return "problem_error", str(e)[:500], None
    except VerificationError as e:
        if "_Timeout" in str(e):  # our alarm went off inside the engine, which wrapped it
            return "timeout", f"verify took more than {timeout}s", None
        return "internal_error", f"VerificationError: {str(e)[:500]}", None
    except _Timeout:
        return "timeout", f"verify took more than {timeout}s", None
    except Exception as e:  # noqa: BLE001 - an unexpected crash inside gg_notebook is a finding
        tb = traceback.format_exc().strip().splitlines()
        return "internal_error", f"{type(e).__name__}: {str(e)[:300]} | {' / '.join(tb[-3:])}", None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


DECISIVE = ("proved", "refuted")  # the verdicts a ground truth can contradict


def evaluate(case: Case, *, gloo: str = "fallback", seed: int = 0, truth: str = "always") -> Record:
    """Evaluate one enumerated case (a subject, a configuration and one edit or none). ``truth``:
    "always" runs the programs for real for every verdict (the full run's statistics count wrong programs
    by their ground truth); "decisive" only when the verdict is one a ground truth can contradict
    (`DECISIVE`): a capture error or unknown needs none (a mutant that deadlocks under gloo costs its
    whole timeout)."""
    loader.unload_all()
    source, operator, intent, choice, line = case_source(case)
    return evaluate_source(case.subject, source, case.world_size, case.dtype, key=case.key, operator=operator,
                           intent=intent, choice=choice, line=line, gloo=gloo, seed=seed, truth=truth)


def evaluate_source(subject_name: str, source: str, world_size: int, dtype: str, *, key: str = "",
                    operator: str = "none", intent: str = "baseline", choice: str = "", line: int = 0,
                    gloo: str = "fallback", seed: int = 0, truth: str = "always") -> Record:
    """Evaluate a program given as module source, built the way subject ``subject_name`` builds its own
    (``truth``: see `evaluate`)."""
    if truth not in ("always", "decisive"):
        raise ValueError(f"truth must be 'always' or 'decisive', not {truth!r}")
    subject = all_subjects()[subject_name]
    make = problem_factory(subject, source, world_size, dtype)
    if subject.gloo_only:
        gloo = "always"

    def record(verdict, detail, gt, outcome, tv=0.0, tg=0.0):
        return Record(key or f"{subject_name}|W{world_size}|{dtype}|source", subject_name, world_size, dtype, operator,
                      intent, choice, line, verdict, detail, gt, outcome, round(tv, 4), round(tg, 4), source)

    try:
        problem = make()
    except Exception as e:  # noqa: BLE001 - the mutant does not even import / build
        return record("invalid", f"build failed: {type(e).__name__}: {str(e)[:200]}", {}, "invalid")

    t0 = time.perf_counter()
    verdict, detail, result = run_verify(problem)
    tv = time.perf_counter() - t0

    if truth == "decisive" and verdict not in DECISIVE:
        outcome = "internal_error" if verdict == "internal_error" else "ok"
        return record(verdict, detail, ground_truth.GroundTruth("not run", f"verdict {verdict}").to_json(),
                      outcome, tv)

    t0 = time.perf_counter()
    draws = ground_truth.input_draws(problem, subject.gt_inputs, seed=seed, int_domain=subject.int_domain)
    gt = ground_truth.check(make, draws, gloo=gloo)
    if gt.verdict == "agrees" and verdict == "refuted" and result is not None and result.counterexample is not None:
        # the verifier's own counterexample: replay it on the real programs before calling it false
        tensors = tuple(t.detach().requires_grad_(o.requires_grad) if t.is_floating_point() else t
                        for t, o in zip(result.counterexample.tensors, problem.inputs))
        cex = [("verifier_counterexample", tensors)]
        again = ground_truth.check(make, cex, gloo=gloo)
        if again.verdict in ("differs", "crash"):
            gt = again
    tg = time.perf_counter() - t0

    if gt.verdict == "broken":
        outcome = "invalid"
    elif verdict == "internal_error":
        outcome = "internal_error"
    elif gt.verdict in ("differs", "crash") and verdict == "proved":
        outcome = "false_proof"
    elif gt.verdict == "agrees" and verdict == "refuted":
        outcome = "false_refutation"
    else:
        outcome = "ok"
    return record(verdict, detail, gt.to_json(), outcome, tv, tg)
