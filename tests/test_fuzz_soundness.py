"""Soundness fuzzing, CI subset (issue #7): gg.verify must never prove a wrong program nor refute a correct one.

Two parts, both with fixed seeds:
  * a stratified sample of the fuzzer's cases (every operator over the cheaper subjects, plus every
    unmutated program), each judged against ground truth from real runs (verdicts proved / refuted only);
  * the fuzz seeds (``tests/fuzz/seeds/``): programs earlier full runs found falsely proved or refuted.
The full run is ``python benchmarks/fuzz_soundness.py``. Nothing here is skipped or xfailed: a case
that the engine gets wrong fails.
"""

from __future__ import annotations

import collections
import random

import pytest

from fuzz import evaluate as ev
from fuzz.seeds import evaluate_seed, load_seeds
from fuzz.subjects import all_subjects

SAMPLE_SEED = 7
PER_OPERATOR = 6  # cases per mutation operator in the sample
# a crash inside gg.verify (anything but a CaptureError / ProblemError) is a finding like a false verdict
BAD_OUTCOMES = ("false_proof", "false_refutation", "internal_error")
SLOW_SUBJECTS = ("example:gpt", "example:gpt_fwd_bwd", "example:gpt_block_fwd_bwd", "example:gpt_block",
                 "example:gpt_block_sp_fwd_bwd",
                 "example:attention_fused_qkv")


def sample_keys() -> list[str]:
    cases = ev.enumerate_cases([s for s in all_subjects().values() if s.name not in SLOW_SUBJECTS])
    base = [c.key for c in cases if c.edit is None and c.world_size == 2]
    by_op = collections.defaultdict(list)
    for c in cases:
        if c.edit is not None:
            by_op[ev.subject_edits(all_subjects()[c.subject])[c.edit].operator].append(c)
    rng = random.Random(SAMPLE_SEED)
    picked = []
    for op in sorted(by_op):
        group = by_op[op]
        rng.shuffle(group)
        picked += [c.key for c in group[:PER_OPERATOR]]
    return base + picked


def _explain(rec) -> str:
    return (f"{rec.outcome.upper()}: {rec.key} ({rec.operator} {rec.choice}, line {rec.line}) verdict {rec.verdict}; "
            f"ground truth {rec.ground_truth.get('verdict')} {rec.ground_truth.get('detail', '')}\n{rec.source}")


@pytest.mark.parametrize("key", sample_keys())
def test_fuzz_sample(key):
    rec = ev.evaluate(ev.Case.from_key(key), truth="decisive")
    assert rec.outcome not in BAD_OUTCOMES, _explain(rec)


@pytest.mark.parametrize("seed", load_seeds(), ids=lambda s: s.name)
def test_fuzz_seed(seed):
    rec = evaluate_seed(seed)
    assert rec.outcome not in BAD_OUTCOMES, _explain(rec)


def test_ground_truth_sees_a_dropped_allreduce():
    """The oracle itself: the MLP without its all-reduce differs, the unmutated MLP agrees."""
    subject = all_subjects()["example:mlp"]
    drop = next(i for i, e in enumerate(ev.subject_edits(subject)) if e.operator == "drop_collective")
    wrong = ev.evaluate(ev.Case("example:mlp", 2, "float64", drop))
    right = ev.evaluate(ev.Case("example:mlp", 2, "float64", None))
    assert wrong.ground_truth["verdict"] == "differs", wrong.ground_truth
    assert right.ground_truth["verdict"] == "agrees", right.ground_truth
