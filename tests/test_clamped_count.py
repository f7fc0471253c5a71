"""A count clamped to 1 read as the count (engine/clamped_count.py): "assumed" with the assumption
count >= 1 in plain words, only for a boolean count the specification divides by; declined for
everything else; the concrete checks draw no input where the assumption fails, yet still refute
wrong programs."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import gg_notebook as gg
from gg_notebook.concrete.simulate import simulate
from gg_notebook.engine import clamped_count
from gg_notebook.verify import prepare

R, S0, S1 = gg.Replicate(), gg.Shard(0), gg.Shard(1)


def rn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mask(n, seed=1):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.5


def verify(seq, rank, inputs, placements, **kw):
    p = gg.Problem(sequential=seq, distributed=rank, inputs=list(inputs), placements=list(placements),
                   world_size=2, expect=[R])
    return gg.verify(p, capture="inprocess", **kw)


def masked_mean(x, m):
    return torch.where(m, x.sum(1), 0.0).sum() / m.sum()  # the mean over the kept rows of the row sums


def masked_sum(x, m):
    return torch.where(m, x.sum(1), 0.0).sum()


def spec_div_abs(x, m):
    return torch.where(m, x.sum(1), 0.0).sum() / x.abs().sum()


def _kept_sum(x, m):
    rs = x.sum(1)  # x [N, D] sharded along D, m [N] replicated
    dist.all_reduce(rs)
    return torch.where(m, rs, 0.0).sum()


def rank_clamp(x, m):
    return _kept_sum(x, m) / m.sum().clamp(min=1)


def masked_mean_float_count(x, m):
    return torch.where(m, x.sum(1), 0.0).sum() / m.to(x.dtype).sum()


def rank_maximum_float(x, m):
    n = m.to(x.dtype).sum()
    return _kept_sum(x, m) / torch.maximum(n, torch.ones_like(n))


def rank_clamp_2(x, m):
    return _kept_sum(x, m) / m.sum().clamp(min=2)  # not the count when it is 1


def rank_clamp_max(x, m):
    return _kept_sum(x, m) / m.sum().clamp(min=1, max=64)


def rank_clamp_not_a_count(x, m):
    w = x.abs().sum()
    dist.all_reduce(w)
    return _kept_sum(x, m) / w.clamp(min=1)


def rank_wrong_count(x, m):
    return _kept_sum(x, m) / (~m).sum().clamp(min=1)  # the unselected ones


def rank_clamp_bug_scaled(x, m):
    return 2.0 * _kept_sum(x, m) / m.sum().clamp(min=1)  # wrong: twice the mean


def flat_masked_mean(x, m):
    return torch.where(m, x, 0.0).sum() / m.sum()


def rank_sharded_count(x, m):
    s = torch.where(m, x, 0.0).sum()  # x and m sharded alike
    dist.all_reduce(s)
    n = m.sum()
    dist.all_reduce(n)
    return s / torch.clamp_min(n, 1)


def rank_local_count(x, m):
    s = torch.where(m, x, 0.0).sum()
    dist.all_reduce(s)
    return s / torch.clamp_min(m.sum(), 1)  # this shard's count only


XM = lambda: [rn(8, 4), mask(8)]  # noqa: E731


@pytest.mark.parametrize("spec,rank", [(masked_mean, rank_clamp), (masked_mean_float_count, rank_maximum_float)],
                         ids=["clamp-min", "float-count-maximum"])
def test_clamped_count_is_assumed(spec, rank):
    r = verify(spec, rank, XM(), [S1, R])
    assert r.status is gg.Status.ASSUMED, str(r)
    assert not r.proved
    assert len(r.assumptions) == 1
    a = r.assumptions[0]
    assert "at least one element of m is True" in a and "0/0 = NaN" in a and "test_clamped_count.py" in a, a


def test_all_reduced_count_is_assumed():
    r = verify(flat_masked_mean, rank_sharded_count, [rn(8), mask(8)], [S0, S0])
    assert r.status is gg.Status.ASSUMED, str(r)
    assert len(r.assumptions) == 1 and "0/0 = NaN" in r.assumptions[0]


def test_local_count_is_refuted():
    r = verify(flat_masked_mean, rank_local_count, [rn(8), mask(8)], [S0, S0])
    assert r.status is gg.Status.REFUTED, str(r)
    assert not r.assumptions


@pytest.mark.parametrize("spec,rank", [
    (masked_mean, rank_clamp_2), (masked_mean, rank_clamp_max), (spec_div_abs, rank_clamp_not_a_count),
    (masked_sum, rank_clamp), (masked_mean, rank_wrong_count), (masked_mean, rank_clamp_bug_scaled),
], ids=["clamp-min-2", "clamp-with-max", "not-a-count", "spec-does-not-divide", "wrong-count", "wrong-numerator"])
def test_declined(spec, rank):
    r = verify(spec, rank, XM(), [S1, R])
    assert r.status not in (gg.Status.PROVED, gg.Status.ASSUMED), str(r)
    assert not r.assumptions


@pytest.mark.parametrize("rank", [rank_wrong_count, rank_clamp_bug_scaled])
def test_wrong_programs_still_refuted(rank):
    r = verify(masked_mean, rank, XM(), [S1, R])
    assert r.status is gg.Status.REFUTED, str(r)


def test_clamp_min_2_refuted_where_the_count_is_one():
    # on 2 rows the count is 1 on half the draws: spec and ranks differ there, and nothing assumes otherwise
    p = gg.Problem(sequential=masked_mean, distributed=rank_clamp_2, inputs=[rn(2, 4), mask(2)], placements=[S1, R],
                   world_size=2, expect=[R])
    r = gg.verify(p, capture="inprocess", seeds=16)
    assert r.status is gg.Status.REFUTED, str(r)


def test_concrete_check_draws_no_input_violating_the_assumption():
    """A mask of 2 elements is all False on some random draws: there spec (NaN) and ranks (0) differ
    - and the verdict must stay 'assumed' (those inputs are outside the assumption)."""
    p = gg.Problem(sequential=masked_mean, distributed=rank_clamp, inputs=[rn(2, 4), torch.tensor([True, False])],
                   placements=[S1, R], world_size=2, expect=[R])
    engine, _ = prepare(p, capture="inprocess")
    sims = [simulate(p, engine.seq, engine.index.graphs, seed=s) for s in range(12)]
    assert any(not bool(s.inputs[1].any()) for s in sims), "the draws never hit an all-False mask"
    r = gg.verify(p, capture="inprocess", seeds=12)
    assert r.status is gg.Status.ASSUMED, str(r)
    assert any("agree" in str(f) for f in r.findings), [str(f) for f in r.findings]


@pytest.mark.parametrize("low", [1, 1.0, 0.5, 1e-6])
def test_identity_on_counts_at_least_one(low):
    """num / clamp(c, min=low) == num / c for every count c >= 1 (and not for c = 0: the assumption)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        m = torch.rand(int(torch.randint(1, 20, (1,), generator=g)), generator=g) > 0.7
        num = torch.where(m, torch.randn(m.shape, generator=g, dtype=torch.float64), 0.0).sum()  # a masked sum
        c = m.sum()
        a, b = num / c, num / c.clamp(min=low)
        if int(c) >= 1:
            assert torch.equal(a, b)
        else:
            assert torch.isnan(a) and b.item() == 0.0  # 0/0 against 0/low


def test_count_of_and_clamp_low_on_terms():
    """The term-level recognizers: sum of a boolean (or of its cast) is a count; clamp/clamp_min/maximum
    from below with 0 < m <= 1 and no max is a clamp; the rest is not."""
    p = gg.Problem(sequential=masked_mean, distributed=rank_clamp, inputs=XM(), placements=[S1, R],
                   world_size=2, expect=[R])
    engine, _ = prepare(p, capture="inprocess")
    counts = [d.term for d in engine.index.dvals if clamped_count.count_of(d.term) is not None]
    assert counts and all(t.dtype == torch.int64 for t in counts)
    clamps = [u for t in counts for u in engine.index.users_of(t) if clamped_count.clamp_low(u, t) == 1.0]
    assert clamps
    # a sum of a float tensor is no count
    assert all(clamped_count.count_of(d.term) is None for d in engine.index.dvals
               if d.term.op == "call" and d.term.dtype == torch.float64)
