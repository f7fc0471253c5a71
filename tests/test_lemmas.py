"""Soundness of every registered lemma on its own random instances.

A lemma's plans must be identities: for each `LemmaCase` (an operator applied to clean
expressions over random atoms), every plan the lemma proposes must evaluate to the same tensor as
the operator applied to the evaluated arguments. The suite is parametrized over the whole
`REGISTRY`, so a lemma added without cases (or whose cases never trigger a plan) fails it.
"""

from __future__ import annotations

import pytest
import torch

import gg_notebook.lemmas  # noqa: F401  (registers every lemma)
from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.base import REGISTRY, Lemma, register
from gg_notebook.relations.expr import evaluate, pretty

SEEDS = (0, 1, 2)
ATOL = RTOL = 1e-8
# rounding of a reassociated sum in lower precisions (cases in float32 / bfloat16 check the same
# identity; their reference is the operator itself in that dtype)
_TOL = {torch.float64: 1e-8, torch.float32: 3e-5, torch.float16: 3e-2, torch.bfloat16: 5e-2}


def _same(got: torch.Tensor, ref: torch.Tensor) -> str | None:
    """None if ``got`` matches ``ref``, else a short reason."""
    if tuple(got.shape) != tuple(ref.shape):
        return f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if ref.is_complex() or got.is_complex():
        if not (ref.is_complex() and got.is_complex()):
            return f"complex/real result differs (dtypes {got.dtype} / {ref.dtype})"
        return _same(torch.view_as_real(got.resolve_conj()), torch.view_as_real(ref.resolve_conj()))
    if ref.is_floating_point():
        tol = _TOL.get(ref.dtype, ATOL)
        if not torch.allclose(got.to(torch.float64), ref.to(torch.float64), atol=tol, rtol=tol, equal_nan=True):
            err = (got.to(torch.float64) - ref.to(torch.float64)).abs().max().item()
            return f"max abs error {err:.3g}"
        return None
    if got.dtype != ref.dtype or not torch.equal(got, ref):
        return f"integer/bool result differs (dtypes {got.dtype} / {ref.dtype})"
    return None


def _plans(lemma: Lemma, case, out_shape: tuple):
    """The lemma's plans for ``case``, called the way the engine calls it (with the case's context
    for lemmas that declare ``needs_context``)."""
    if hasattr(case, "plans"):
        return case.plans(lemma, out_shape)
    return lemma.plans(case.store, case.spec, case.args, out_shape)


def check_lemma(lemma: Lemma, seed: int) -> dict:
    """Run every case of ``lemma`` drawn with ``seed``; raise AssertionError on any unsound plan.

    Returns counts (cases, plans) so callers can assert on coverage.
    """
    rng = torch.Generator().manual_seed(seed)
    n_cases = n_plans = 0
    failures: list[str] = []
    for case in lemma.cases(rng):
        n_cases += 1
        values = case.values

        def leaf(e, values=values):
            return values[e.attrs[0]]

        arg_vals = [evaluate(a, leaf) for a in case.args]
        ref = case.spec.call(arg_vals)
        out_shape = tuple(ref.shape)
        for plan in _plans(lemma, case, out_shape):
            n_plans += 1
            where = f"{lemma.name} seed={seed} case={case.description!r} plan={pretty(plan, lambda x: str(x.attrs[0]))}"
            if tuple(plan.shape) != out_shape:
                failures.append(f"{where}: plan shape {plan.shape} != {out_shape}")
                continue
            try:
                got = evaluate(plan, leaf)
            except Exception as exc:  # noqa: BLE001 - an unevaluable plan is unsound too
                failures.append(f"{where}: evaluation failed: {exc!r}")
                continue
            bad = _same(got, ref)
            if bad:
                failures.append(f"{where}: {bad}")
    if n_cases == 0:
        raise AssertionError(f"lemma {lemma.name!r} yields no test case: every lemma must be testable")
    if n_plans == 0:
        raise AssertionError(f"lemma {lemma.name!r}: none of its {n_cases} cases produces a plan (seed {seed})")
    if failures:
        raise AssertionError(f"{len(failures)} unsound plan(s):\n" + "\n".join(failures[:10]))
    return {"cases": n_cases, "plans": n_plans}


def test_registry_not_empty():
    assert len(REGISTRY) >= 5
    for expected in ("concat-commute", "concat-contract", "partial-linear", "partial-additive", "merged-batch"):
        assert expected in REGISTRY


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_lemma_sound(name, seed):
    check_lemma(REGISTRY[name], seed)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_lemma_documented(name):
    lemma = REGISTRY[name]
    assert lemma.name == name
    assert isinstance(lemma.statement, str) and lemma.statement.strip()
    assert lemma.conditions and all(isinstance(c, str) and c.strip() for c in lemma.conditions)
    assert lemma.kinds


# --------------------------------------------------------------------------- meta-tests
def _mm_contracted_cases(rng):
    for _ in range(3):
        m, k, n = C.dims(rng), C.dims(rng, 3, 8), C.dims(rng)
        yield C.case(lambda a, w: a @ w, (C.randn(rng, m, k), C.randn(rng, k, n)), rng, split={0: 1, 1: 0},
                     description="mm contracted (toy)")


def _pieces(S, spec, args):
    """mm pieces over a split contracted dim (the right pieces, wrongly combined by the toys)."""
    a, w = args
    if a.op != "cat" or a.attrs != 1:
        return None
    pieces, off = [], 0
    for p in a.args:
        hi = off + p.shape[1]
        pieces.append(S.call(spec, [p, S.slice(w, 0, off, hi)]))
        off = hi
    return pieces


def _wrong_max(S, spec, args, out_shape):
    pieces = _pieces(S, spec, args)
    if pieces:
        yield S.accum("max", pieces)  # should be "sum"


def _wrong_concat(S, spec, args, out_shape):
    pieces = _pieces(S, spec, args)
    if pieces:
        yield S.cat(pieces, 0)  # claims the row blocks of the result are the shard products


def _toy(name, plans, cases=_mm_contracted_cases):
    return Lemma(name=name, statement="mm(concat(a_i, 1), concat(w_i, 0)) = ... (deliberately wrong)",
                 kinds=("matmul",), plans=plans, cases=cases, conditions=("none",))


@pytest.mark.parametrize("plans", [_wrong_max, _wrong_concat], ids=["max-instead-of-sum", "concat-of-pieces"])
def test_checker_catches_wrong_lemma(plans):
    name = "toy-wrong-mm-contract"
    register(_toy(name, plans))
    try:
        with pytest.raises(AssertionError, match="unsound"):
            check_lemma(REGISTRY[name], 0)
    finally:
        del REGISTRY[name]
    assert name not in REGISTRY


def test_checker_catches_untestable_lemma():
    def no_cases(rng):
        return iter(())

    def never(S, spec, args, out_shape):
        return iter(())

    for toy, msg in ((_toy("toy-no-cases", _wrong_max, cases=no_cases), "no test case"),
                     (_toy("toy-no-plans", never), "produces a plan")):
        register(toy)
        try:
            with pytest.raises(AssertionError, match=msg):
                check_lemma(REGISTRY[toy.name], 0)
        finally:
            del REGISTRY[toy.name]
        assert toy.name not in REGISTRY


def test_checker_accepts_right_toy():
    """The same toy with the right combiner passes: the checker is not trivially failing."""

    def right(S, spec, args, out_shape):
        pieces = _pieces(S, spec, args)
        if pieces:
            yield S.accum("sum", pieces)

    name = "toy-right-mm-contract"
    register(_toy(name, right))
    try:
        counts = check_lemma(REGISTRY[name], 0)
        assert counts["plans"] == counts["cases"] == 3
    finally:
        del REGISTRY[name]


# ------------------------------------------------------------------------------------------------
# Negative goals: each lemma must *decline* when one of its conditions fails (a rewrite there would
# be numerically wrong). Each entry: lemma name, a case builder, why the rewrite would be wrong.
def _decline_cases():
    from gg_notebook.relations.domains import IdDomain

    aten = torch.ops.aten
    rng = torch.Generator().manual_seed(7)
    r = lambda *s: C.randn(rng, *s)  # noqa: E731
    F = torch.nn.functional
    out = []

    def add(lemma, case, why):
        out.append(pytest.param(lemma, case, id=f"{lemma}: {why}"))

    add("partial-linear", C.case(lambda x: torch.div(x, 3, rounding_mode="floor"), (r(3, 4),), rng, partial={0: 2}),
        "floor division rounds each partial")
    add("partial-linear", C.case(lambda x: x.to(torch.bfloat16), (r(3, 4),), rng, partial={0: 2}),
        "a narrowing cast rounds each partial")
    add("partial-linear", C.case(lambda x: x.to(torch.int32), (r(3, 4) * 10,), rng, partial={0: 2}),
        "a cast to int truncates each partial")
    add("partial-linear", C.case(torch.round, (r(3, 4),), rng, partial={0: 2}), "round is not linear")
    add("partial-linear", C.case(lambda x, m: x.masked_fill(m, 1.0), (r(3, 4), r(3, 4) > 0), rng, partial={0: 2}),
        "masked_fill with a non-zero value is affine")
    from gg_notebook.lemmas.pads import decline_cases as pad_declines

    for why, case in pad_declines(rng):
        add("pad-commute", case, why)
    from gg_notebook.lemmas.scale_hoist import decline_cases as hoist_declines, regroup_decline_cases

    for why, case in hoist_declines(rng):
        add("scale-hoist", case, why)
    for why, case in regroup_decline_cases(rng):
        add("sum-of-concats", case, why)
    add("partial-additive", C.case(lambda x: x + 1.0, (r(3, 4),), rng, partial={0: 2}),
        "a scalar added to every partial")
    add("partial-additive", C.case(lambda x: 2 - x, (r(3, 4),), rng, partial={0: 2}), "rsub of a scalar")
    ids = torch.randint(0, 4, (2, 6), generator=rng)
    add("concat-contract", C.case(lambda g, i: aten.embedding_dense_backward(g, i, 4, -1, True), (r(2, 6, 3), ids),
                                  rng, split={0: 1, 1: 1}), "scale_grad_by_freq counts ids over all tokens")
    ctx = C.CaseContext(partition=(2, 2))
    for flags, why in (((-1, True), "scale_grad_by_freq"), ((1, False), "padding_idx")):
        spec, _ = C.spec_of(lambda g, i, f=flags: aten.embedding_dense_backward(g, i, 4, f[0], f[1]), r(2, 6, 3), ids)
        case = C.make_case(spec, (r(2, 6, 3), ids), rng)
        add("vocab-embedding-backward", type(case)(spec, case.args, case.values, case.store, why, ctx), why)
    lsm, t = torch.log_softmax(r(6, 5), -1), torch.tensor([0, -100, 2, 3, 4, 1])
    spec, _ = C.spec_of(lambda l, x: aten.nll_loss_forward(l, x, None, 1, -100)[1], lsm, t)
    case = C.make_case(spec, (lsm, t), rng)
    add("nll-total-weight", type(case)(spec, case.args, case.values, case.store, "", C.CaseContext()),
        "mean reduction counts only non-ignored targets")
    logits, tgt = r(6, 8), torch.tensor([0, 7, 3, 1, 2, 5])
    # (reduction mean with ignore_index possible is modelled: sum of the zeroed losses / count_kept)
    for reduction, weight, why in ((0, r(8).abs(), "class weights"), (1, r(8).abs(), "class weights, mean")):
        def nll(l, x, *w, red=reduction):
            return aten.nll_loss_forward(l, x, w[0] if w else None, red, -100)[0]
        tensors = (torch.log_softmax(logits, -1), tgt) + ((weight,) if weight is not None else ())
        spec, _ = C.spec_of(nll, *tensors)
        case = C.make_case(spec, (logits, tgt) + tensors[2:], rng, split={0: 1})
        lsm_e = case.store.call(_log_softmax_spec(), [case.args[0]])
        add("vocab-cross-entropy", type(case)(spec, (lsm_e,) + case.args[1:], case.values, case.store, why,
                                              C.CaseContext()), why)
    x6 = r(4, 6)
    add("gather-over-split-classes", C.case(lambda a, i: a.gather(0, i), (x6, torch.randint(0, 4, (1, 6), generator=rng)),
                                            rng, split={0: 1}), "the gathered dim is not the split one")
    add("gather-over-split-classes", C.case(lambda a, i: a.gather(1, i), (x6, torch.randint(0, 6, (4, 2), generator=rng)),
                                            rng, split={0: 1}), "two picks per row")
    add("gather-over-split-classes", C.case(lambda a, i: a.gather(1, i, sparse_grad=True),
                                            (x6, torch.randint(0, 6, (4, 1), generator=rng)), rng, split={0: 1}),
        "sparse_grad")
    add("mean-as-sum", C.case(lambda x: x.mean(dtype=torch.float32), (r(3, 4),), rng, split={0: 0}),
        "dtype= narrows the accumulation (float64 -> float32)")
    add("mean-as-sum", C.case(lambda x: x.mean(dtype=torch.float32), (r(3, 4).to(torch.bfloat16),), rng,
                              split={0: 0}), "dtype= changes the type of the mean")
    add("contract-regroup-strided", C.case(lambda a, w: a @ w, (r(3, 9), r(9, 2)), rng, split={0: 1, 1: 0}, pieces=3),
        "three pieces have no strided grouping")
    add("contract-regroup-strided", C.case(lambda a, w: a @ w, (r(8, 3), r(3, 2)), rng, split={0: 0}, pieces=4),
        "the split dim is not contracted")
    x35 = r(3, 5)
    add("concat-commute", C.case(lambda x: torch.topk(x, 2, dim=-1)[0], (x35,), rng, split={0: 1}),
        "top-k along the split dim")
    add("concat-commute", C.case(lambda x: torch.topk(x, 2, dim=0)[1], (x35,), rng, split={0: 0}),
        "top-k indices along the split dim")
    add("concat-commute", C.case(lambda x: torch.cumsum(x, 1), (x35,), rng, split={0: 1}),
        "cumulative sum along the split dim")
    add("concat-commute", C.case(lambda x: torch.sort(x, 0)[0], (x35,), rng, split={0: 0}), "sort along the split dim")
    cs = C.case(lambda x: torch.cumsum(x, 0), (r(6, 4),), rng)
    cs = type(cs)(cs.spec, (cs.store.slice(cs.args[0], 0, 2, 5),), cs.values, cs.store)
    add("slice-hoist", cs, "cumulative sum along the sliced dim")
    from gg_notebook.lemmas.indexed import decline_cases as indexed_declines

    for why, case in indexed_declines(rng):
        add("concat-commute-indexed", case, why)
    from gg_notebook.ir.pick_update import pick_update_spec
    add("pick-update-over-split", C.make_case(pick_update_spec("sub"), [r(6, 5), torch.randint(0, 5, (6,), generator=rng),
                                                                       r(6)], rng, split={0: 0}),
        "split along the rows, not the classes")
    return out


def _log_softmax_spec():
    from gg_notebook.ir.specs import softmax_spec
    return softmax_spec("log_softmax", 1)


@pytest.mark.parametrize("name,case", _decline_cases())
def test_lemma_declines_when_a_condition_fails(name, case):
    lemma = REGISTRY[name]
    values = case.values
    leaf = lambda e: values[e.attrs[0]]  # noqa: E731
    ref = case.spec.call([evaluate(a, leaf) for a in case.args])
    plans = list(_plans(lemma, case, tuple(ref.shape)))
    assert not plans, f"{name} rewrote a call it must decline: {[pretty(p, lambda x: str(x.attrs[0])) for p in plans]}"


# A lemma that writes another formula must say, for every operator it rewrites, which arguments
# it models and which cannot matter; an argument it forgot (ignore_index, scale_grad_by_freq) is
# how a wrong program gets proved.
_REPLACING = {"vocab-embedding", "vocab-embedding-backward", "vocab-cross-entropy", "nll-total-weight",
              "softmax-over-split-dim", "logsumexp-over-split-dim", "nll-over-split-classes",
              "vocab-cross-entropy-backward", "mean-as-sum", "reduce-regroup", "sum-log-softmax-over-split",
              "constant-on-domain", "select-by-constant-mask", "softmax-matmul-over-split-keys", "neg-inf-mask",
              "embedding-constant-ids", "gather-over-split-classes", "nll-backward-total-weight-unused",
              "vocab-cross-entropy-backward-ignore", "pad-commute", "batch1-bmm-as-mm"}


@pytest.mark.parametrize("name", sorted(_REPLACING))
def test_replacing_lemma_declares_every_argument(name):
    lemma = REGISTRY[name]
    assert lemma.on, f"{name} rewrites into another formula but declares no overloads (on=...)"
    for op, reads, unaffected in lemma.on:
        scalars = [a.name for a in op._schema.arguments if not str(a.type).startswith("Tensor")]
        missing = [a for a in scalars if a not in reads and a not in unaffected]
        assert not missing, f"{name} on {op}: say whether {missing} change(s) what the lemma relies on"


def test_every_lemma_is_either_reapplying_or_declared():
    """New lemmas land in one of the two groups on purpose."""
    reapplying = {"concat-commute", "concat-contract", "slice-hoist", "partial-linear", "partial-additive",
                  "merged-batch", "ew-through-view", "complex-view-commute", "complex-view-slice-hoist",
                  "slice-hoist-shared", "sum-regroup-slices", "ew-fusion", "neg-inf-mask-split",
                  "contract-regroup-strided", "reduce-split-concat", "concat-commute-indexed",
                  # the same call on an equal argument (the factor hoisted / the sum regrouped)
                  "scale-hoist", "sum-of-concats",
                  # pick_update is gg_notebook's own operator (ir/pick_update.py), not an ATen overload:
                  # its one parameter (sub | add) is read by the lemma and carried into every piece
                  "pick-update-over-split"}
    unknown = set(REGISTRY) - reapplying - _REPLACING
    assert not unknown, f"classify these lemmas (re-applying the same call, or replacing with on=...): {unknown}"
