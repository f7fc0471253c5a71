"""The softmax / loss family: vocab-parallel cross-entropy as Megatron writes it, alone and reduced.

The rank program is Megatron-LM's ``_VocabParallelCrossEntropy`` (in-place shift by the MAX
all-reduced row max, target mask, masked target gather by ``arange`` indexing of the flattened
logits, SUM all-reduces of the predicted logit and of the summed exponentials, hand-written
backward), taken from the independent benchmark model (benchmarks/independent_gpt.py), which
shares no code with gg_notebook's examples. The specification is ``F.cross_entropy`` with reduction
none / sum / mean (and ``log_softmax`` + ``nll_loss``). Each realistic bug is refuted and localized.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard

import gg_notebook as gg
from gg_notebook.lemmas import _cases as C
from gg_notebook.lemmas.loss_reduce import FullReduce, ScaleRows, full_reduce_spec, scale_rows_spec
from gg_notebook.lemmas.base import REGISTRY
from gg_notebook.relations.expr import ExprStore, evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from independent_gpt import make_problem, vocab_parallel_cross_entropy  # noqa: E402

V, B, S = 16, 2, 4


def _inputs(grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g).requires_grad_(grad)
    target = torch.randint(0, V, (B, S), generator=g)
    target[:, -1] = V - 1
    return logits, target


# ------------------------------------------------------------------ specifications
def ce_none(logits, target):
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1), reduction="none")


def ce_mean(logits, target):
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1))


def ce_sum(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")


def ce_sum_log_softmax_then_view(logits, target):
    return F.nll_loss(torch.log_softmax(logits, dim=-1).flatten(0, 1), target.flatten(), reduction="sum")


def ce_mean_log_softmax_nll(logits, target):
    lp = F.log_softmax(logits.reshape(-1, logits.size(-1)), dim=1)
    return F.nll_loss(lp, target.reshape(-1))


# ------------------------------------------------------------------ rank programs
def megatron_none(logits, target, bug=None):
    return vocab_parallel_cross_entropy(logits, target, bug).view(-1)


def megatron_mean(logits, target, bug=None):
    return vocab_parallel_cross_entropy(logits, target, bug).mean()


def megatron_mean_flat(logits, target, bug=None):
    losses = vocab_parallel_cross_entropy(logits, target, bug)
    return torch.mean(losses.view(-1), dim=0)


def megatron_sum(logits, target, bug=None):
    return torch.sum(vocab_parallel_cross_entropy(logits, target, bug))


def megatron_sum_over_numel(logits, target, bug=None):
    losses = vocab_parallel_cross_entropy(logits, target, bug)
    return losses.sum() / losses.numel()


SPELLINGS = {
    "none": (ce_none, megatron_none),
    "mean": (ce_mean, megatron_mean),
    "mean-of-flat-view": (ce_mean, megatron_mean_flat),
    "mean-as-sum-over-numel": (ce_mean, megatron_sum_over_numel),
    "sum": (ce_sum, megatron_sum),
    "mean-log_softmax-nll_loss": (ce_mean_log_softmax_nll, megatron_mean),
    "sum-log_softmax-then-view": (ce_sum_log_softmax_then_view, megatron_sum),
}


def _with_grad(fn, reduce_for_grad):
    def program(logits, target, **kw):
        loss = fn(logits, target, **kw)
        return (loss, torch.autograd.grad(reduce_for_grad(loss), logits)[0])
    program.__name__ = fn.__name__ + "_fwd_bwd"
    return program


def problem(spelling: str, world_size: int, backward: bool = False, bug: str | None = None):
    import functools

    seq, tp = SPELLINGS[spelling]
    red = (lambda x: x.sum()) if spelling == "none" else (lambda x: x)
    if backward:
        seq, tp = _with_grad(seq, red), _with_grad(tp, red)
    logits, target = _inputs(backward)
    return gg.Problem(
        sequential=seq, distributed=functools.partial(tp, bug=bug), inputs=[logits, target],
        placements=[Shard(2), Replicate()], world_size=world_size,
        expect=[Replicate(), Shard(2)] if backward else [Replicate()],
        input_names=["logits", "target"], domains={"target": range(0, V)},
        name=f"megatron_ce[{spelling}]")


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("spelling", ["none", "mean", "sum", "mean-of-flat-view", "mean-as-sum-over-numel",
                                      "mean-log_softmax-nll_loss"])
def test_megatron_cross_entropy_proved(spelling, backward, world_size):
    if world_size == 4 and spelling not in ("none", "mean"):
        pytest.skip("the other spellings at 2 ranks only (runtime)")
    r = gg.verify(problem(spelling, world_size, backward))
    assert r.status == gg.Status.PROVED, str(r)


def test_log_softmax_then_view_then_nll():
    r = gg.verify(problem("sum-log_softmax-then-view", 2))
    assert r.status == gg.Status.PROVED, str(r)


# ------------------------------------------------------------------ bugs
def _line_of(fn, text: str) -> str:
    import inspect

    lines, first = inspect.getsourcelines(fn)
    k = next(i for i, line in enumerate(lines) if text in line)
    return f"{Path(inspect.getsourcefile(fn)).name}:{first + k}"


SILENT_BUGS = ("no_sum_exp_allreduce", "no_predicted_allreduce", "wrong_vocab_start")


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("bug", SILENT_BUGS)
def test_megatron_cross_entropy_bug_refuted(bug, world_size):
    r = gg.verify(problem("mean", world_size, backward=False, bug=bug))
    assert r.status == gg.Status.REFUTED, str(r)
    # localized at the loss of the specification (its F.cross_entropy line), not earlier
    assert r.culprit is not None and r.culprit.source.endswith(_line_of(ce_mean, "F.cross_entropy")), str(r)


@pytest.mark.parametrize("bug", SILENT_BUGS)
def test_megatron_cross_entropy_bug_refuted_fwd_bwd(bug):
    r = gg.verify(problem("mean", 2, backward=True, bug=bug))
    assert r.status == gg.Status.REFUTED, str(r)
    assert r.culprit is not None and r.culprit.source.endswith(_line_of(ce_mean, "F.cross_entropy")), str(r)


def test_target_offset_not_subtracted_is_not_proved():
    """Without the shift by vocab_start_index, rank 1 indexes its logits with global ids: a real run
    fails with an out-of-bounds index (the rank simulator says so, naming the gather line)."""
    r = gg.verify(problem("mean", 2, bug="no_target_offset"))
    assert r.status != gg.Status.PROVED, str(r)
    assert r.culprit is not None and r.culprit.source.endswith(_line_of(ce_mean, "F.cross_entropy")), str(r)
    assert "out of bounds" in str(r), str(r)


def test_bug_in_the_gpt_is_localized_at_its_loss():
    import independent_gpt as G

    r = gg.verify(make_problem(2, layers=1, backward=False, bug="no_sum_exp_allreduce"))
    assert r.status == gg.Status.REFUTED, str(r)
    assert r.culprit.source.endswith(_line_of(G.gpt_forward_loss, "F.cross_entropy")), str(r)


def test_mean_needs_the_domain():
    """Without the declared domain a target may be ignore_index (-100): F.cross_entropy's mean
    divides by the number of non-ignored targets, Megatron's by all of them. Not a proof."""
    p = problem("mean", 2)
    p.domains = {}
    r = gg.verify(p)
    assert r.status != gg.Status.PROVED, str(r)


# ------------------------------------------------------------------ the independent GPT
def test_independent_gpt_forward_proved():
    r = gg.verify(make_problem(2, layers=1, backward=False))
    assert r.status == gg.Status.PROVED, str(r)


def test_independent_gpt_forward_backward_proved():
    r = gg.verify(make_problem(2, layers=1, backward=True))
    assert r.status == gg.Status.PROVED, str(r)



# ------------------------------------------------------------------ the synthetic operators
def test_full_reduce_and_scale_rows_are_what_they_say():
    rng = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=rng, dtype=torch.float64)
    assert torch.allclose(FullReduce("mean")(x), x.mean())
    assert torch.allclose(FullReduce("sum")(x), x.sum())
    g = torch.randn(3, 1, generator=rng, dtype=torch.float64)
    assert torch.equal(ScaleRows()(x, g), x * g)
    with pytest.raises(ValueError):
        full_reduce_spec("amax")
    S = ExprStore()
    a = S.atom("a", (3, 5), torch.float64)
    e = S.call(full_reduce_spec("mean"), [a])
    assert e.shape == () and torch.allclose(evaluate(e, lambda _: x), x.mean())
    e = S.call(scale_rows_spec(), [a, S.atom("g", (3, 1), torch.float64)])
    vals = {"a": x, "g": g}
    assert torch.equal(evaluate(e, lambda leaf: vals[leaf.attrs[0]]), x * g)


def test_reduce_regroup_declines_a_view_that_mixes_reduced_and_kept_elements():
    lemma = REGISTRY["reduce-regroup"]
    rng = torch.Generator().manual_seed(5)
    x = C.randn(rng, 4, 6)
    spec, _ = C.spec_of(lambda y: y.sum(0), x.reshape(6, 4))
    case = C.make_case(spec, (x,), rng)
    arg = case.store.view(case.args[0], (6, 4))  # [4, 6] viewed [6, 4]: row 0 of the view mixes rows
    plans = list(lemma.plans(case.store, spec, (arg,), (4,)))
    assert not plans


def test_cross_entropy_mean_with_ignore_index_divides_by_the_kept_count():
    """-100 may occur (no declared domain): the mean is the sum of the zeroed per-token losses over
    the number of kept targets (count_kept), never a plain full mean; the plans are identities."""
    from gg_notebook.relations.expr import walk

    lemma = REGISTRY["vocab-cross-entropy"]
    rng = torch.Generator().manual_seed(6)
    logits, tgt = C.randn(rng, 6, 8), torch.tensor([0, -100, 3, 1, -100, 5])
    for reduction in (1, 2):
        spec, _ = C.spec_of(lambda l, t, r=reduction: torch.ops.aten.nll_loss_forward(l, t, None, r, -100)[0],
                            torch.log_softmax(logits, -1), tgt)
        case = C.make_case(spec, (logits, tgt), rng, split={0: 1})
        from gg_notebook.ir.specs import softmax_spec
        lsm = case.store.call(softmax_spec("log_softmax", 1), [case.args[0]])
        plans = list(lemma.plans(case.store, spec, (lsm, case.args[1]), (), ctx=C.CaseContext()))
        assert plans
        ref = torch.ops.aten.nll_loss_forward(torch.log_softmax(logits, -1), tgt, None, reduction, -100)[0]
        for plan in plans:
            kinds = {x.attrs.kind for x in walk(plan) if x.op == "call"}
            assert "zero_where_equal" in kinds
            assert ("count_kept" in kinds) == (reduction == 1)
            assert not any(x.op == "call" and x.attrs.kind == "full_reduce" and x.attrs.param("fn") == "mean"
                           for x in walk(plan))
            got = evaluate(plan, lambda e: case.values[e.attrs[0]])
            assert torch.allclose(got, ref)


# ------------------------------------------------------------------ other spellings of the ranks
def lse_spelling(logits, target):
    """logsumexp written out (max all-reduce, exp-sum all-reduce, ``log(s) + m``) minus the target
    logit gathered from the *unshifted* logits (torch.gather, where, multiply by the mask)."""
    part = logits.size(-1)
    lo = dist.get_rank() * part
    m = logits.amax(dim=-1, keepdim=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    s = torch.exp(logits - m).sum(dim=-1)
    dist.all_reduce(s)
    lse = torch.log(s) + m.squeeze(-1)
    inside = (target >= lo) & (target < lo + part)
    local = torch.where(inside, target - lo, torch.zeros_like(target))
    picked = torch.gather(logits, -1, local.unsqueeze(-1)).squeeze(-1) * inside
    dist.all_reduce(picked)
    return (lse - picked).mean()


def gathered_logits(logits, target):
    """All-gather the vocabulary shards, then torch's own cross-entropy."""
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, logits)
    full = torch.cat(parts, dim=-1)
    return F.cross_entropy(full.view(-1, full.size(-1)), target.view(-1))


def _spelling_problem(fn):
    logits, target = _inputs(False)
    return gg.Problem(sequential=ce_mean, distributed=fn, inputs=[logits, target],
                      placements=[Shard(2), Replicate()], world_size=2, expect=[Replicate()],
                      input_names=["logits", "target"], domains={"target": range(0, V)})


def test_cross_entropy_on_gathered_logits_proved():
    r = gg.verify(_spelling_problem(gathered_logits))
    assert r.status == gg.Status.PROVED, str(r)


def test_logsumexp_spelling_proved():
    r = gg.verify(_spelling_problem(lse_spelling))
    assert r.status == gg.Status.PROVED, str(r)


# ------------------------------------------------------------------ the real normal form (realform)
def _nf_store(seed: int):
    """Spellings of softmax-family values over a row split in two shards, as ExprStore terms."""
    from gg_notebook.ir.specs import ew_spec, reduce_spec
    from gg_notebook.lemmas.realform import RealForms

    aten = torch.ops.aten
    rng = torch.Generator().manual_seed(seed)
    b, v0, v1 = int(torch.randint(2, 5, (1,), generator=rng)), int(torch.randint(2, 6, (1,), generator=rng)), \
        int(torch.randint(2, 6, (1,), generator=rng))
    S = ExprStore()
    G = S.atom("G", (b, v0 + v1), torch.float64)
    Y = S.atom("Y", (b, v0 + v1), torch.float64)
    vals = {"G": 3 * torch.randn(b, v0 + v1, generator=rng, dtype=torch.float64),
            "Y": torch.randn(b, v0 + v1, generator=rng, dtype=torch.float64)}
    x = [S.slice(G, 1, 0, v0), S.slice(G, 1, v0, v0 + v1)]
    sub, exp, log, div, add = (ew_spec(aten.sub.Tensor, 2), ew_spec(aten.exp.default, 1), ew_spec(aten.log.default, 1),
                               ew_spec(aten.div.Tensor, 2), ew_spec(aten.add.Tensor, 2))
    amax = lambda t, k: S.call(reduce_spec("amax", (1,), k), [t])  # noqa: E731
    ssum = lambda t, k: S.call(reduce_spec("sum", (1,), k), [t])  # noqa: E731
    lse = lambda t, k: S.call(reduce_spec("logsumexp", (1,), k), [t])  # noqa: E731
    call = S.call
    m = S.accum("max", [amax(p, True) for p in x])
    se = S.accum("sum", [ssum(call(exp, [call(sub, [p, m])]), True) for p in x])
    se0 = S.accum("sum", [ssum(call(exp, [p]), True) for p in x])
    gathered = S.cat([lse(p, True) for p in x], 1)
    spellings = {
        # softmax piece 0: every spelling below is the same real value
        "softmax0": [
            call(exp, [call(sub, [x[0], lse(G, True)])]),
            call(div, [call(exp, [call(sub, [x[0], m])]), se]),
            call(div, [call(exp, [x[0]]), se0]),
            call(exp, [call(sub, [x[0], lse(gathered, True)])]),
        ],
        "log_softmax0": [
            call(sub, [x[0], lse(G, True)]),
            call(sub, [call(sub, [x[0], m]), call(log, [se])]),
        ],
        "lse": [
            lse(G, True),
            call(add, [call(log, [se]), m]),
            lse(gathered, True),
        ],
    }
    wrong = {  # near misses that must not share a form with the spellings above
        "softmax0": [
            call(div, [call(exp, [call(sub, [x[0], m])]), ssum(call(exp, [call(sub, [x[0], m])]), True)]),  # local sum
            call(div, [call(exp, [x[0]]), se]),  # the numerator not shifted, the denominator shifted
            call(exp, [call(sub, [x[0], lse(S.cat([x[0], x[0]], 1), True)])]),  # a shard counted twice
        ],
        "log_softmax0": [call(sub, [x[0], call(log, [se])])],  # the shift m not added back
        "lse": [
            call(log, [se]),  # without + m
            lse(Y, True),
            S.call(reduce_spec("logsumexp", (1,), True), [call(sub, [G, Y])]),  # a shift varying along the row
        ],
    }
    return S, RealForms(S), spellings, wrong, vals


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_real_normal_form_equates_spellings_and_only_equal_values(seed):
    S, rf, spellings, wrong, vals = _nf_store(seed)
    leaf = lambda e: vals[e.attrs[0]]  # noqa: E731
    for name, group in spellings.items():
        ref = evaluate(group[0], leaf)
        for t in group:
            assert torch.allclose(evaluate(t, leaf), ref), name  # the spellings are right (else a test bug)
            assert rf.key(t) == rf.key(group[0]), f"{name}: a spelling gets another form"
        for t in wrong.get(name, []):
            assert not torch.allclose(evaluate(t, leaf), ref), name
            assert rf.key(t) != rf.key(group[0]), f"{name}: a wrong value gets the form of the right one"


def test_real_normal_form_is_never_used_bitwise():
    """exact='bitwise': the softmax lemmas are off (their forms hold over the reals only)."""
    assert not REGISTRY["softmax-over-split-dim"].bitwise_safe
    assert not REGISTRY["logsumexp-over-split-dim"].bitwise_safe
