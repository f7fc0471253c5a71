"""Output checks without `expect`, and scale factors that must never pass silently."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import Partial, Replicate, Shard

import gg_notebook as gg


def seq_mm(x, w):
    return x @ w


def dist_partial(x, w):
    return x @ w  # no reduction: each rank holds a partial sum


def dist_avg(x, w):
    y = x @ w
    dist.all_reduce(y, op=dist.ReduceOp.AVG)
    return y


def dist_div(x, w):
    y = x @ w
    dist.all_reduce(y)
    return y / dist.get_world_size()


def dist_rows(x, w):
    return x @ w  # rows of x are sharded: output rows are sharded


def _problem(fn, placements, expect=None):
    return gg.Problem(seq_mm, fn, (torch.randn(4, 8), torch.randn(8, 4)), placements, 2, expect=expect)


def test_without_expect_any_clean_relation_is_accepted():
    r = gg.verify(_problem(dist_partial, (Shard(1), Shard(0))))
    assert r.status is gg.Status.PROVED
    assert "Partial()" in r.relations[0].detail
    r = gg.verify(_problem(dist_rows, (Shard(0), Replicate())))
    assert r.status is gg.Status.PROVED
    assert "Shard(0)" in r.relations[0].detail


def test_expectation_mismatch_is_reported_at_the_output():
    r = gg.verify(_problem(dist_partial, (Shard(1), Shard(0)), expect=(Replicate(),)), concrete=False)
    assert r.status is gg.Status.UNKNOWN
    assert r.culprit is not None and r.culprit.op.startswith("aten.mm")
    assert r.culprit.source.endswith(f"test_findings.py:{seq_mm.__code__.co_firstlineno + 1}")
    r = gg.verify(_problem(dist_partial, (Shard(1), Shard(0)), expect=(Replicate(),)))
    assert r.status is gg.Status.REFUTED and r.counterexample is not None
    r = gg.verify(_problem(dist_partial, (Shard(1), Shard(0)), expect=(Partial(),)))
    assert r.status is gg.Status.PROVED


def test_scale_factor_is_a_finding_not_a_proof():
    for fn in (dist_avg, dist_div):
        for expect in (None, (Replicate(),)):
            r = gg.verify(_problem(fn, (Shard(1), Shard(0)), expect=expect))
            assert r.status is not gg.Status.PROVED, (fn.__name__, expect)
            assert [f.kind for f in r.findings][0] == "scale-factor", r.findings
            assert "0.5 x" in r.findings[0].message
            if expect is not None:  # the ranks' outputs really are half the sequential output
                assert r.status is gg.Status.REFUTED
            assert "scale" in str(r)
